"""FleetMember: this machine's part in a fleet (COMFY_MULTIGPU_FLEET). `join` puts the FleetScheduler in
front of the pool's LocalScheduler (before the host's queue is swapped, so every route sees it); `start`
connects and starts the intake and the event relay once ComfyUI's server runs; `stop` hands back what
was taken but not started. Host objects touched: comfy.cli_args.args (listen, port), PromptServer.instance.
"""
from __future__ import annotations

import logging
import socket
from typing import Optional

from .files import FleetInputs, FleetNames
from .intake import FleetIntake
from .relay import EventRelay
from .scheduler import FleetScheduler
from .store import FleetStore

logger = logging.getLogger("comfy_multigpu")


def default_node_url() -> str:
    """Where the other machines reach this one: ComfyUI's --listen address and --port."""
    from comfy.cli_args import args
    listen = (args.listen or "127.0.0.1").split(",")[0].strip()
    if listen in ("0.0.0.0", "::", ""):
        listen = socket.getfqdn()
    if ":" in listen:
        listen = f"[{listen}]"
    return f"http://{listen}:{args.port}"


class FleetMember:
    def __init__(self, settings, pool, store: Optional[FleetStore] = None):
        self.settings = settings
        self.pool = pool
        self.store = store or FleetStore(settings.url, settings.node)
        self.scheduler = FleetScheduler(pool.scheduler, self.store, settings, pool.workers)
        self.node_url = settings.node_url or default_node_url()
        self.intake = FleetIntake(self.scheduler, pool, self.node_url)
        self.names = FleetNames(self.store)
        self.inputs = FleetInputs(self.store, self.store.machines)
        self.intake.before_run = self._fetch_inputs
        self.relay: Optional[EventRelay] = None
        self._known: tuple = (0.0, {})

    @classmethod
    def join(cls, settings, pool) -> "FleetMember":
        member = cls(settings, pool)
        pool.scheduler = member.scheduler
        pool.fleet = member
        pool.save_names.fleet = member.names
        return member

    def known_machines(self) -> dict:
        """Registered machines (cached for a moment; {} while Redis cannot be reached)."""
        import time
        stamp, machines = self._known
        if time.monotonic() - stamp > 1.0:
            try:
                machines = self.store.machines()
            except Exception:
                machines = {}
            self._known = (time.monotonic(), machines)
        return machines

    def _fetch_inputs(self, taken) -> None:
        try:
            self.inputs.fetch_for(taken.record[2])
        except Exception as ex:       # the prompt still runs: its loader says which file is missing
            logger.warning("Fleet: could not fetch the inputs of %s from the machine they were uploaded "
                           "at: %s", taken.prompt_id, ex)

    def start(self, server, interrupt_local) -> None:
        self.relay = EventRelay(self.store, server, interrupt_local)
        self.relay.start()
        self.intake.start()

    def stop(self) -> None:
        self.intake.stop()
        if self.relay is not None:
            self.relay.stop()

    # ---- for the HTTP layer ----------------------------------------------------------------------
    @property
    def reachable(self) -> bool:
        return self.intake.reachable

    def status(self) -> dict:
        """The fleet view: machines, their GPUs, lanes, counters (/multigpu/fleet, metrics, dashboard)."""
        out = {"node": self.settings.node, "url": self.node_url, "redis": self.settings.safe_url,
               "reachable": self.reachable, "redis_version": self.intake.version,
               "lease_s": self.settings.lease_s, "attempts": self.settings.attempts,
               "taken_here": self.intake.takes, "take_calls": self.intake.take_calls, "redis_calls": self.store.calls,
               "bell_wakeups": self.intake.wakeups,
               "completions_fenced_here": self.scheduler.fenced,
               "events_published": self.relay.published if self.relay else 0,
               "events_delivered": self.relay.delivered if self.relay else 0,
               "inputs_fetched": self.inputs.fetched}
        try:
            out["machines"] = self.store.machines()
            out["lanes"] = {lane: {"waiting": w, "leased": l} for lane, (w, l) in self.store.lane_backlog().items()}
            out["stats"] = self.store.stats()
            out["active"] = self.store.active_count()
        except Exception as ex:
            out["error"] = str(ex)
        return out
