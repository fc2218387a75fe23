"""Process workers (COMFY_MULTIGPU_WORKER_MODE=process): the executor a GPU's worker thread uses when
its prompts run in a child process of their own (host/child_main.py).

`ProcessExecutor` stands where ComfyUI's PromptExecutor stands in thread mode (execute, success,
status_messages, history_result, reset), so the worker's loop, the scheduler, the journal, the API
and the web UI do not change. A reader thread per child delivers what the child's executor sends to
clients through the real PromptServer (as the worker, so only the submitting client gets it) and
answers the child's questions: shared weights (runtime/segment_store.py) and output-name
reservations (runtime/save_names.py). A child that dies fails the prompt it ran and is started again
at once in the background; other GPUs never notice.

Host objects touched: PromptServer.instance (send_sync, client_id, last_node_id, sockets_metadata,
all through the worker's per-worker attributes); folder_paths (where ComfyUI lives); sys.argv.
"""
from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from ..policy.config import ENV_CHILD
from . import child_link
from .context import current_worker

logger = logging.getLogger("comfy_multigpu")

CHILD_START_S = 600.0          # longest a child may take to import ComfyUI and its custom nodes
CHILD_STOP_S = 5.0
EXTENSION_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ChildDied(RuntimeError):
    """The worker's child process ended while it ran something."""


@dataclass(frozen=True)
class SpawnSpec:
    """How children start: ComfyUI's directory, its command line, whether weights are shared."""
    comfyui_dir: str
    argv: tuple
    sharing: bool
    python: str = sys.executable

    @classmethod
    def of_this_process(cls, sharing: bool) -> "SpawnSpec":
        import folder_paths
        return cls(os.path.dirname(os.path.realpath(folder_paths.__file__)), tuple(sys.argv[1:]), sharing)


def visible_device(label: str, env=os.environ) -> Optional[str]:
    """CUDA_VISIBLE_DEVICES for the child of the worker on `label` ("cuda:1" -> the second device the
    main process sees); None for a CPU worker."""
    if not label.startswith("cuda"):
        return None
    index = int(label.split(":", 1)[1]) if ":" in label else 0
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return str(index)
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    return entries[index]


class ProcessExecutor:
    def __init__(self, worker, server, spawn: SpawnSpec, store=None):
        self.worker = worker
        self.server = server
        self.spawn = spawn
        self.store = store                     # runtime.segment_store.SegmentStore, or None
        self.history_result: dict = {"outputs": {}, "meta": {}}
        self.success = False
        self.status_messages: list = []
        self.info: dict = {}                   # what the child said when ready (pid, device, seconds)
        self.memory: Optional[tuple] = None   # (free, total) bytes of its CUDA device, as the child saw last
        self.proc: Optional[subprocess.Popen] = None
        self.link: Optional[child_link.Link] = None
        self._replies: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._start_error: Optional[str] = None
        self._current: Optional[str] = None
        self._lock = threading.Lock()          # proc, link, replies, and the state below
        self._busy = 0                         # starts and conversations under way
        self._stopping = False
        self._restarting: Optional[subprocess.Popen] = None   # the dead child a restart is asked for
        # Children are started by one thread that lives as long as this executor: the kernel kills a
        # child when the *thread* that started it ends (PR_SET_PDEATHSIG), not only its process.
        self._starts: queue.Queue = queue.Queue()
        threading.Thread(target=self._keep, daemon=True, name=f"comfy-multigpu-gpu{worker.gpu_id}-keeper").start()
        self._starts.put("start")
        self._ready.wait()
        if self._start_error is not None:
            self._starts.put("stop")               # the worker's loop makes a new executor
            raise ChildDied(self._start_error)

    # ---- life cycle -----------------------------------------------------------------------------
    def _keep(self) -> None:
        while self._starts.get() != "stop":
            if self.alive():                   # asked twice for one death: the new child is up
                self._ready.set()
                continue
            self._start_error = None
            with self._lock:
                self._busy += 1
            try:
                self.start()
            except Exception as ex:
                self._start_error = str(ex)
                self.worker.log.error("%s", ex)
            finally:
                with self._lock:
                    self._busy -= 1
            self._ready.set()

    def start(self) -> None:
        """Start the child and wait until ComfyUI is up in it (raises ChildDied if it cannot start);
        called in the keeper thread."""
        link, theirs = child_link.pair()
        env = dict(os.environ)
        env[ENV_CHILD] = str(self.worker.gpu_id)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (EXTENSION_ROOT, env.get("PYTHONPATH")) if p)
        device = visible_device(self.worker.label)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        command = [self.spawn.python, "-m", "comfy_multigpu.host.child_main", "--fd", str(theirs.fileno()),
                   "--gpu", str(self.worker.gpu_id), "--comfyui", self.spawn.comfyui_dir]
        if not self.spawn.sharing:
            command.append("--no-sharing")
        command += ["--", *self.spawn.argv]
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=env, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        replies: queue.Queue = queue.Queue()
        with self._lock:
            self.proc, self.link, self._replies = proc, link, replies
        threading.Thread(target=self._read, args=(link, proc, replies), daemon=True,
                         name=f"comfy-multigpu-gpu{self.worker.gpu_id}-child").start()
        try:
            reply = replies.get(timeout=CHILD_START_S)
        except queue.Empty:
            reply = ("failed", f"not ready after {CHILD_START_S:.0f} s")
        if reply[0] != "ready":
            self._kill()
            text = reply[1] if reply[0] == "failed" else f"exit code {reply[1]}"
            raise ChildDied(f"the process of GPU {self.worker.gpu_id} did not start: {text}")
        self.info = reply[1]
        self.memory = self.info.get("memory")
        self.worker.log.info("Process worker started: pid %s on %s (%s), ComfyUI up in %.1f s%s",
                             self.info["pid"], self.info["device"], self.worker.label,
                             time.perf_counter() - started,
                             "; DynamicVRAM on in its process" if self.info.get("dynamic_vram") else "")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def request_stop(self) -> None:
        """Ask the child to stop after what it runs now; no new child is started after this."""
        with self._lock:
            self._stopping = True
        self._starts.put("stop")
        if self.link is not None:
            try:
                self.link.send(("stop",))
            except child_link.LinkClosed:
                pass

    def stop(self, timeout: float = CHILD_STOP_S) -> None:
        """request_stop, then wait; kill the child if it has not ended after `timeout`."""
        self.request_stop()
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill()

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _restart_after(self, reason: str, proc) -> None:
        """The child `proc` died: count it, then start a new one in the background (the API never
        waits); once per death, whoever notices it first (the reader thread or a conversation)."""
        with self._lock:
            if self._stopping or self._restarting is proc:
                return
            self._restarting = proc
        self._ready.clear()
        self.worker.restarts += 1
        self.worker.log.error("Process worker died (%s); starting a new one", reason)
        self._starts.put("start")

    # ---- the reader thread ------------------------------------------------------------------------
    def _read(self, link, proc, replies: queue.Queue) -> None:
        current_worker.set(self.worker)
        while True:
            try:
                message, fds = link.recv()
            except child_link.LinkClosed:
                break
            kind = message[0]
            if kind == "event":
                self._relay(*message[1:])
            elif kind == "call":
                self._answer(link, message[1], message[2], message[3], fds)
            elif kind == "note":
                self._note(*message[1:])
            else:
                replies.put(message)
        code = proc.wait()
        link.close()
        if self.store is not None:
            self.store.abandon(self.worker.gpu_id)
        self.worker.pool.save_names.release(self.worker.gpu_id)
        replies.put(("died", code))            # for a start or a conversation waiting on it
        with self._lock:
            idle = self._busy == 0 and proc is self.proc
        if idle:                               # died between prompts: replace it now
            self._restart_after(f"exit code {code}, while idle", proc)

    def _relay(self, event, data, sid) -> None:
        if event == "executing" and isinstance(data, dict):
            self.server.last_node_id = data.get("node")
        self.server.send_sync(event, data, sid)

    def _answer(self, link, call_id: int, name: str, args: tuple, fds: list) -> None:
        out_fds: tuple = ()
        try:
            if name == "weights_acquire":
                grant = self.store.acquire(self.worker.gpu_id, *args)
                value = {"action": grant.action, "key": grant.key, "blob": grant.blob,
                         "segment": grant.segment, "reason": grant.reason}
                out_fds = (grant.fd,) if grant.action == "attach" else ()
            elif name == "weights_published":
                self.store.published(self.worker.gpu_id, *args, fds.pop())
                value = None
            elif name == "weights_failed":
                self.store.failed(self.worker.gpu_id, *args)
                value = None
            elif name == "names_reserve":
                self.worker.pool.save_names.reserve(self.worker.gpu_id, args[0])
                value = None
            else:
                value = ValueError(f"unknown call {name!r}")
        except Exception as ex:
            logger.warning("[GPU %s] call %s from the process worker failed", self.worker.gpu_id, name,
                           exc_info=True)
            value = RuntimeError(f"{type(ex).__name__}: {ex}")
        for fd in fds:
            os.close(fd)
        try:
            link.send(("reply", call_id, value), fds=out_fds)
        except child_link.LinkClosed:
            pass

    def _note(self, name: str, *args) -> None:
        if name == "weights_released" and self.store is not None:
            self.store.released(self.worker.gpu_id, args[0])
        elif name == "names_release":
            self.worker.pool.save_names.release(self.worker.gpu_id)

    # ---- what the worker asks ---------------------------------------------------------------------
    def _converse(self, message: tuple) -> tuple:
        """Send a command and wait for its answer; ChildDied if the child ends first."""
        with self._lock:
            self._busy += 1
        try:
            self._ready.wait()
            if self._start_error is not None:
                error, self._start_error = self._start_error, None
                self._restart_after(error, self.proc)
                raise ChildDied(error)
            with self._lock:
                proc, link, replies = self.proc, self.link, self._replies
            try:
                link.send(message)
            except child_link.LinkClosed:
                pass                     # the reader thread reports the death below
            reply = replies.get()
            if reply[0] == "died":
                reason = f"exit code {reply[1]}"
                self._restart_after(reason, proc)
                raise ChildDied(f"the process of GPU {self.worker.gpu_id} died ({reason})")
            return reply
        finally:
            with self._lock:
                self._busy -= 1

    def execute(self, prompt, prompt_id, extra_data, outputs) -> None:
        client_id = extra_data.get("client_id")
        self.server.client_id = client_id
        metadata = {}
        sockets_metadata = getattr(self.server, "sockets_metadata", {}) or {}
        if client_id in sockets_metadata:
            metadata[client_id] = sockets_metadata[client_id]
        self.history_result, self.success, self.status_messages = {"outputs": {}, "meta": {}}, False, []
        self._current = prompt_id
        try:
            reply = self._converse(("execute", prompt, prompt_id, extra_data, outputs, metadata))
        finally:
            self._current = None
        _, self.history_result, self.success, self.status_messages, self.memory, error = reply
        if error is not None:
            self.success = False
            self.status_messages = list(self.status_messages) + [("execution_error", {
                "prompt_id": prompt_id, "exception_message": error, "exception_type": error.split(":", 1)[0],
                "timestamp": int(time.time() * 1000)})]

    def interrupt(self, prompt_id: Optional[str]) -> None:
        """Stop what the child runs (`prompt_id`: only if that is what it runs); from any thread."""
        link = self.link
        if link is None:
            return
        try:
            link.send(("interrupt", prompt_id))
        except child_link.LinkClosed:
            pass

    def free(self, unload_models: bool, free_memory: bool) -> None:
        _, self.memory = self._converse(("free", unload_models, free_memory))

    def reset(self) -> None:
        self.free(False, True)

    def preload(self, kind: str, name: str, onto_device: bool) -> str:
        _, state, error = self._converse(("preload", kind, name, onto_device))
        if error is not None:
            raise RuntimeError(error)
        return state

    @property
    def device_free(self) -> Optional[int]:
        return self.memory[0] if self.memory else None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "alive": self.alive(), "device": self.info.get("device")}
