"""Graceful drain on SIGTERM: readiness turns 503 and new prompts get 503 at once, running prompts get
up to the drain timeout to finish, waiting ones stay in the journal, then ComfyUI stops the way it does
on Ctrl-C (its own clean-up runs) and the process exits 0. A second SIGTERM stops at once.

Host objects touched: the process's SIGTERM handler, installed and reverted by the patch installer
as the manifest's `sigterm-drain` entry (make_sigterm_handler), and PromptServer.instance.loop (to stop it).
"""
from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger("comfy_multigpu")


def make_sigterm_handler(original, pool):
    """Factory for the manifest's `sigterm-drain` entry (kind "signal"): the handler that drains `pool`.
    `original` is the handler it replaces (put back by the installer on revert)."""
    return Drain(pool).on_sigterm


class Drain:
    def __init__(self, pool):
        self.pool = pool
        self.done = threading.Event()

    @property
    def timeout_s(self) -> float:
        return self.pool.drain_timeout_s

    def on_sigterm(self, signum, frame) -> None:
        if not self.pool.scheduler.start_draining():
            logger.warning("comfy-multigpu: second SIGTERM: stopping now")
            self._stop_loop()
            return
        logger.warning("comfy-multigpu: SIGTERM: draining (no new prompts; running ones get up to %.0f s)",
                       self.timeout_s)
        threading.Thread(target=self._drain, daemon=True, name="comfy-multigpu-drain").start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        scheduler = self.pool.scheduler
        while scheduler.snapshot().running_count and time.monotonic() < deadline:
            time.sleep(0.05)
        snap = scheduler.snapshot()
        running, waiting = snap.running_count, snap.pending_count
        journal = "kept in the journal" if self.pool.journal is not None else "LOST: the journal is off"
        if running:
            logger.warning("comfy-multigpu: drain timeout: %d prompt(s) still running will run again after a "
                           "restart; %d waiting %s", running, waiting, journal)
        else:
            logger.info("comfy-multigpu: drained: nothing running; %d waiting prompt(s) %s", waiting, journal)
        self.done.set()
        self._stop_loop()

    def _stop_loop(self) -> None:
        def stop():
            raise KeyboardInterrupt("comfy-multigpu drain finished")   # main.py's Ctrl-C path: clean exit
        server = self.pool.server
        if server is None:               # SIGTERM before the workers launched
            import server as comfy_server
            server = comfy_server.PromptServer.instance
        server.loop.call_soon_threadsafe(stop)
