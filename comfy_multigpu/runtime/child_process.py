"""One started child of a process worker, seen from the main process: the process, its link, and the
two threads that serve it. The reader delivers what the child's executor sends to clients (through
the real PromptServer, as the worker, so only the submitting client gets it), applies its notes, and
hands command answers to whoever waits in `replies`; a second thread answers the child's questions
(shared weights, output-name reservations), which may wait on other GPUs, so the reader never blocks
and a death is seen at once. When the child ends, everything it held is given back, "died" is put in
`replies`, and `on_death` is called (the executor starts a new one).

Host objects touched: PromptServer.instance (send_sync, last_node_id, through the worker's attributes).
"""
from __future__ import annotations

import logging
import os
import queue
import subprocess
import threading
from typing import Callable, Optional

from . import child_link
from .context import current_worker

logger = logging.getLogger("comfy_multigpu")

STOP_WAIT_S = 5.0


class ChildProcess:
    def __init__(self, worker, server, store, command: list, tail: list, env: dict,
                 on_death: Callable[["ChildProcess"], None]):
        """Start `command --fd N tail` (N: the child's end of the link)."""
        self.worker = worker
        self.server = server
        self.store = store
        self.on_death = on_death
        self.replies: queue.Queue = queue.Queue()
        self.dead = threading.Event()
        self.restart_asked = False          # set by the executor, under its lock
        self._calls: queue.Queue = queue.Queue()
        self.link, theirs = child_link.pair()
        try:
            self.proc = subprocess.Popen(command + ["--fd", str(theirs.fileno())] + tail, env=env,
                                         pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except BaseException:
            self.link.close()
            raise
        finally:
            theirs.close()
        name = f"comfy-multigpu-gpu{worker.gpu_id}-child{self.proc.pid}"
        threading.Thread(target=self._read, daemon=True, name=name).start()
        threading.Thread(target=self._answer_calls, daemon=True, name=f"{name}-calls").start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return not self.dead.is_set() and self.proc.poll() is None

    def send(self, message: tuple) -> None:
        """Send a command; a dead link is reported through `replies` by the reader."""
        try:
            self.link.send(message)
        except child_link.LinkClosed:
            pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    # ---- the reader ---------------------------------------------------------------------------
    def _read(self) -> None:
        current_worker.set(self.worker)
        while True:
            try:
                message, fds = self.link.recv()
            except child_link.LinkClosed:
                break
            except Exception:                  # a frame that does not unpickle: drop it, go on
                logger.warning("[GPU %s] unreadable message from the process worker", self.worker.gpu_id,
                               exc_info=True)
                continue
            try:
                self._dispatch(message, fds)
            except Exception:
                logger.warning("[GPU %s] message %r from the process worker failed", self.worker.gpu_id,
                               message[0], exc_info=True)
        self._ended()

    def _dispatch(self, message: tuple, fds: list) -> None:
        kind = message[0]
        if kind == "call":
            self._calls.put((message, fds))
            return
        for fd in fds:
            os.close(fd)
        if kind == "event":
            _, event, data, sid = message
            if event == "executing" and isinstance(data, dict):
                self.server.last_node_id = data.get("node")
            self.server.send_sync(event, data, sid)
        elif kind == "note":
            self._note(*message[1:])
        else:
            self.replies.put(message)

    def _note(self, name: str, *args) -> None:
        if name == "weights_released" and self.store is not None:
            self.store.released(self.worker.gpu_id, args[0])
        elif name == "names_release":
            self.worker.pool.save_names.release(self.worker.gpu_id)

    def _ended(self) -> None:
        """The link closed: the child is gone (or going); give back what it held, then say so."""
        self.link.close()
        try:
            code = self.proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._calls.put(None)
        if self.store is not None:
            self.store.abandon(self.worker.gpu_id)
        self.worker.pool.save_names.release(self.worker.gpu_id)
        self.dead.set()
        self.replies.put(("died", code))
        self.on_death(self)

    # ---- the child's questions ------------------------------------------------------------------
    def _answer_calls(self) -> None:
        current_worker.set(self.worker)
        while True:
            item = self._calls.get()
            if item is None:
                return
            (_, call_id, name, args), fds = item
            value, out_fds = self._answer(name, args, fds)
            for fd in fds:
                os.close(fd)
            try:
                self.link.send(("reply", call_id, value), fds=out_fds)
            except child_link.LinkClosed:
                return

    def _answer(self, name: str, args: tuple, fds: list) -> tuple:
        gpu = self.worker.gpu_id
        try:
            if name == "weights_acquire":
                grant = self.store.acquire(gpu, *args)
                value = {"action": grant.action, "key": grant.key, "blob": grant.blob,
                         "segment": grant.segment, "reason": grant.reason}
                return value, ((grant.fd,) if grant.action == "attach" else ())
            if name == "weights_published":
                self.store.published(gpu, *args, fds.pop())
                return None, ()
            if name == "weights_failed":
                self.store.failed(gpu, *args)
                return None, ()
            if name == "names_reserve":
                return self.worker.pool.save_names.reserve(gpu, tuple(args[0])), ()
            return ValueError(f"unknown call {name!r}"), ()
        except Exception as ex:
            logger.warning("[GPU %s] call %s from the process worker failed", gpu, name, exc_info=True)
            return RuntimeError(f"{type(ex).__name__}: {ex}"), ()


def stop_child(child: Optional[ChildProcess], timeout: float = STOP_WAIT_S) -> None:
    """Ask `child` to stop after what it runs now; kill it if it has not ended after `timeout`."""
    if child is None:
        return
    child.send(("stop",))
    try:
        child.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.proc.wait()
