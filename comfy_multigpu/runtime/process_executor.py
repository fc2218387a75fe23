"""Process workers (COMFY_MULTIGPU_WORKER_MODE=process): the executor a GPU's worker thread uses when
its prompts run in a child process of their own (host/child_main.py).

`ProcessExecutor` stands where ComfyUI's PromptExecutor stands in thread mode (execute, success,
status_messages, history_result, reset), so the worker's loop, the scheduler, the journal, the API
and the web UI do not change. Its child (runtime/child_process.py) is started by a keeper thread that
lives as long as the executor (the kernel kills a child when the *thread* that started it ends:
PR_SET_PDEATHSIG). A child that dies fails the prompt it ran (the client gets execution_error) and a
new one is started at once in the background, with a growing pause while starts keep failing (the
worker shows down meanwhile); other GPUs never notice.

Host objects touched: PromptServer.instance (send_sync, client_id, last_node_id, sockets_metadata,
all through the worker's per-worker attributes); folder_paths (where ComfyUI lives); sys.argv.
"""
from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from ..policy.config import ENV_CHILD
from .child_process import ChildProcess, stop_child

logger = logging.getLogger("comfy_multigpu")

CHILD_START_S = 600.0          # longest a child may take to import ComfyUI and its custom nodes
CHILD_STOP_S = 5.0
RETRY_PAUSES_S = (0.0, 1.0, 5.0, 15.0, 30.0)   # before each start after consecutive failed ones
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
        self.memory: Optional[tuple] = None    # (free, total) bytes of its CUDA device, as the child saw last
        self.child: Optional[ChildProcess] = None
        self.notes: dict = {}                  # the last prompt's notes for its history entry
        self._lock = threading.Lock()          # child, start state, stopping
        self._ready = threading.Event()        # set: `child` is up, or the last start failed
        self._start_error: Optional[str] = None
        self._start_pending = True
        self._failures = 0
        self._stopping = False
        self._starts: queue.Queue = queue.Queue()
        self._keeper = threading.Thread(target=self._keep, daemon=True,
                                        name=f"comfy-multigpu-gpu{worker.gpu_id}-keeper")
        self._keeper.start()
        self._starts.put("start")
        self._ready.wait()
        if self._start_error is not None:
            self.request_stop()
            raise ChildDied(self._start_error)

    # ---- life cycle (the keeper thread) -----------------------------------------------------------
    def _keep(self) -> None:
        while self._starts.get() != "stop":
            time.sleep(RETRY_PAUSES_S[min(self._failures, len(RETRY_PAUSES_S) - 1)])
            if self._stopping:
                break
            try:
                child = self._start()
            except Exception as ex:
                self._failures += 1
                self.worker.log.error("%s", ex)
                with self._lock:
                    self._start_error, self._start_pending = str(ex), False
                    self._ready.set()
                self._mark_up(False)
                continue
            self._failures = 0
            with self._lock:
                self.child, self._start_error, self._start_pending = child, None, False
                self._ready.set()
            self._mark_up(True)
        stop_child(self.child, CHILD_STOP_S)   # the child must end before this thread does
        with self._lock:
            self._start_error = "the process worker is stopping"
            self._ready.set()

    def _start(self) -> ChildProcess:
        env = dict(os.environ)
        env[ENV_CHILD] = str(self.worker.gpu_id)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (EXTENSION_ROOT, env.get("PYTHONPATH")) if p)
        device = visible_device(self.worker.label)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        command = [self.spawn.python, "-m", "comfy_multigpu.host.child_main", "--gpu", str(self.worker.gpu_id),
                   "--comfyui", self.spawn.comfyui_dir] + ([] if self.spawn.sharing else ["--no-sharing"])
        started = time.perf_counter()
        child = ChildProcess(self.worker, self.server, self.store, command, ["--", *self.spawn.argv], env,
                             self._died)
        try:
            reply = child.replies.get(timeout=CHILD_START_S)
        except queue.Empty:
            reply = ("failed", f"not ready after {CHILD_START_S:.0f} s")
        if reply[0] != "ready":
            child.kill()
            text = reply[1] if reply[0] == "failed" else f"exit code {reply[1]}"
            raise ChildDied(f"the process of GPU {self.worker.gpu_id} did not start: {text}")
        self.info = reply[1]
        self.memory = self.info.get("memory")
        self.worker.log.info("Process worker started: pid %s on %s (%s), ComfyUI up in %.1f s%s",
                             self.info["pid"], self.info["device"], self.worker.label,
                             time.perf_counter() - started,
                             "; DynamicVRAM on in its process" if self.info.get("dynamic_vram") else "")
        return child

    def _mark_up(self, up: bool) -> None:
        """After the first start the worker's `up` follows its child (placement avoids a down one)."""
        if self.worker.started.is_set() and self.worker.up != up:
            self.worker.up = up
            self.worker.pool.scheduler.wake()

    def _died(self, child: ChildProcess) -> None:
        """The reader of `child` saw it end: a new one, unless stopping or it was never the current one."""
        code = child.proc.returncode
        with self._lock:
            if self._stopping or child is not self.child or child.restart_asked:
                return
            child.restart_asked = True
            self._start_pending = True
            self._ready.clear()
        self.worker.restarts += 1
        self.worker.log.error("Process worker died (exit code %s); starting a new one", code)
        self._starts.put("start")

    def request_stop(self) -> None:
        """No new child; the current one stops after what it runs now (see stop)."""
        with self._lock:
            self._stopping = True
        self._starts.put("stop")

    def stop(self, timeout: float = CHILD_STOP_S) -> None:
        """request_stop, then wait for the keeper, which waits for the child (killed after `timeout`)."""
        self.request_stop()
        self._keeper.join(timeout + 2.0)

    def alive(self) -> bool:
        child = self.child
        return child is not None and child.alive()

    # ---- what the worker asks ---------------------------------------------------------------------
    def _converse(self, message: tuple) -> tuple:
        """Send a command to the current child and wait for its answer; ChildDied if it ends first
        or no child can be started. A child found dead before anything was sent is replaced first."""
        while True:
            self._ready.wait()
            with self._lock:
                child, error = self.child, self._start_error
                if error is not None and not self._start_pending and not self._stopping:
                    self._start_pending = True         # the next command tries again (after a pause)
                    self._ready.clear()
                    self._starts.put("start")
            if error is not None:
                raise ChildDied(error)
            if child.dead.is_set():
                self._died(child)
                continue
            child.send(message)
            reply = child.replies.get()
            if reply[0] == "died":
                raise ChildDied(f"the process of GPU {self.worker.gpu_id} died (exit code {reply[1]})")
            return reply

    def execute(self, prompt, prompt_id, extra_data, outputs) -> None:
        client_id = extra_data.get("client_id")
        self.server.client_id = client_id
        self.worker.set_interrupt(False)          # the child has its own flag; keep this one clean
        sockets_metadata = getattr(self.server, "sockets_metadata", {}) or {}
        metadata = {client_id: sockets_metadata[client_id]} if client_id in sockets_metadata else {}
        self.history_result, self.success, self.status_messages = {"outputs": {}, "meta": {}}, False, []
        self.notes = {}
        try:
            reply = self._converse(("execute", prompt, prompt_id, extra_data, outputs, metadata))
        except ChildDied as ex:
            if client_id is not None:
                self.server.send_sync("execution_error", _error(prompt_id, ex), client_id)
            raise
        _, self.history_result, self.success, self.status_messages, self.memory, error, self.notes = reply
        if error is not None:
            self.success = False
            self.status_messages = list(self.status_messages) + [("execution_error", _error(prompt_id, error))]

    def interrupt(self, prompt_id: Optional[str]) -> None:
        """Stop `prompt_id` (None: whatever runs) in the child, now or as soon as it starts there."""
        child = self.child
        if child is not None:
            child.send(("interrupt", prompt_id))

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
        return self.child.pid if self.child is not None else None

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "alive": self.alive(), "device": self.info.get("device")}


def _error(prompt_id: str, ex) -> dict:
    text = ex if isinstance(ex, str) else f"{type(ex).__name__}: {ex}"
    return {"prompt_id": prompt_id, "exception_message": text, "exception_type": text.split(":", 1)[0],
            "timestamp": int(time.time() * 1000)}
