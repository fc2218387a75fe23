"""One GPU worker: its thread, executor, device, the lease it runs and its per-prompt host state. Its
queue lives in the scheduler: the loop asks the scheduler for its next lease and reports how it ended.
Host objects touched: through pool.host (host/services.py), and the PromptServer (send_sync).
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Optional

from .context import current_worker
from .host_state import HostState
from .prompt import ExecutionStatus, Lease

if TYPE_CHECKING:
    from .pool import WorkerPool

logger = logging.getLogger("comfy_multigpu")


def _error_message(prompt_id: str, ex: BaseException, prefix: str = "") -> dict:
    """The execution_error data of a prompt that failed outside ComfyUI's per-node handling."""
    return {"prompt_id": prompt_id, "exception_message": f"{prefix}{type(ex).__name__}: {ex}",
            "exception_type": type(ex).__name__, "timestamp": int(time.time() * 1000)}


class WorkerLog(logging.LoggerAdapter):
    """Prefixes every line with the worker's GPU id: "[GPU 1] ..."."""

    def process(self, msg, kwargs):
        return f"[GPU {self.extra['gpu_id']}] {msg}", kwargs


class GpuWorker:
    """All state of one GPU but its queue (the scheduler's). Only its own thread writes `lease`."""

    def __init__(self, pool: "WorkerPool", gpu_id: int, device: Any, label: str):
        self.pool = pool
        self.gpu_id = gpu_id
        self.device = device          # torch.device the worker's models and tensors live on
        self.label = label            # "cuda:1" / "cpu", as configured
        self.log = WorkerLog(logger, {"gpu_id": gpu_id})
        self.lease: Optional[Lease] = None      # what it runs now
        self.up = False
        self.thread: Optional[threading.Thread] = None
        self.started = threading.Event()
        # Per-prompt host state that ComfyUI keeps in process globals (see patches/manifest.toml).
        self.host_state = HostState()
        self.interrupt_lock = threading.Lock()
        self.interrupted = False
        self._loaded: dict[int, weakref.ref] = {}   # LoadedModel has __eq__ but no __hash__
        self.restarts = 0                       # times its loop died and was started again
        self._models: dict[str, None] = {}     # model keys of recent successful prompts, oldest first
        self.weight = 1.0                       # relative speed for placement (COMFY_MULTIGPU_GPU_WEIGHTS)
        self.free_memory: Optional[int] = None  # device bytes free after the last prompt (CUDA only)
        self.executor = None                    # PromptExecutor, or process_executor.ProcessExecutor

    @property
    def busy(self) -> bool:
        return self.lease is not None

    @property
    def down(self) -> bool:
        """Started once and no longer running (a worker still starting up is not down)."""
        return self.started.is_set() and not self.up

    # ---- model files recent prompts used (placement affinity) ---------------------------------
    RECENT_MODELS = 32

    def remember_models(self, keys) -> None:
        for key in keys:
            self._models.pop(key, None)
            self._models[key] = None
        while len(self._models) > self.RECENT_MODELS:
            self._models.pop(next(iter(self._models)))

    def recent_models(self) -> tuple:
        """Model keys of recent successful prompts, oldest first."""
        return tuple(self._models)

    def measure_free_memory(self) -> None:
        """Device memory free now (placement prefers the GPU where a load evicts least); CUDA only:
        CPU workers share one RAM, so it cannot tell them apart."""
        if getattr(self.device, "type", "cpu") != "cuda":
            return
        if self.pool.process_mode:             # the child measured it; this process keeps off the GPU
            self.free_memory = getattr(self.executor, "device_free", None)
            return
        try:
            self.free_memory = self.pool.host.free_memory(self.device)
        except Exception:      # a device in trouble: placement then treats it as full
            self.log.warning("Could not read free memory of %s", self.label, exc_info=True)
            self.free_memory = 0

    def device_memory(self) -> Optional[tuple[int, int]]:
        """(used, total) bytes of a CUDA device now (dashboard, /metrics); None on CPU workers,
        which share the host's RAM, or when the device does not answer."""
        if getattr(self.device, "type", "cpu") != "cuda":
            return None
        if self.pool.process_mode:             # as its child saw it last (this process keeps off the GPU)
            memory = getattr(self.executor, "memory", None)
            return (memory[1] - memory[0], memory[1]) if memory else None
        try:
            import torch
            free, total = torch.cuda.mem_get_info(self.device)
        except Exception:
            return None
        return total - free, total

    # ---- models this worker loaded ------------------------------------------------------------
    def note_loaded(self, loaded_model) -> None:
        self._loaded[id(loaded_model)] = weakref.ref(loaded_model)

    def loaded_models(self) -> list:
        live = []
        for key, ref in list(self._loaded.items()):
            obj = ref()
            if obj is None:
                self._loaded.pop(key, None)
            else:
                live.append(obj)
        return live

    # ---- interrupt flag --------------------------------------------------------------------
    def set_interrupt(self, value: bool = True) -> None:
        with self.interrupt_lock:
            self.interrupted = value
        if value and self.pool.process_mode and self.executor is not None:
            self.executor.interrupt(None)

    def interrupt_lease(self, lease: Lease) -> bool:
        """Interrupt `lease` only if this worker still runs it: a flag set after it ended would stop
        the next prompt (the next execute's own reset clears any flag set before its lease ended)."""
        with self.interrupt_lock:
            if self.lease is not lease or lease.ended.is_set():
                return False
            self.interrupted = True
        if self.pool.process_mode and self.executor is not None:
            self.executor.interrupt(lease.prompt.prompt_id)
        return True

    def take_interrupt(self) -> bool:
        """True once if an interrupt was requested; clears it (stock throw_exception_if_... semantics)."""
        with self.interrupt_lock:
            was = self.interrupted
            self.interrupted = False
            return was

    # ---- thread ----------------------------------------------------------------------------
    def start(self, server) -> None:
        self.thread = threading.Thread(target=self._run, args=(server,), daemon=True,
                                       name=f"comfy-multigpu-gpu{self.gpu_id}")
        self.thread.start()

    RESTART_DELAY_S = 1.0

    def _run(self, server) -> None:
        """The thread: runs the loop until the pool shuts down; if the loop itself dies (a fault
        outside any prompt's handling), fails its prompt cleanly, reports the worker down and starts
        the loop again."""
        current_worker.set(self)
        if getattr(self.device, "type", "cpu") == "cuda" and not self.pool.process_mode:
            import torch
            torch.cuda.set_device(self.device)
        while not self.pool.stopping:
            try:
                self._loop(server)
                break                           # the scheduler closed: shutdown
            except BaseException as ex:       # noqa: B036 - nothing may end this thread
                self.up = False
                self.restarts += 1
                self.log.error("Worker died (%s: %s); its prompt ends as an error, restarting in %.0f s",
                               type(ex).__name__, ex, self.RESTART_DELAY_S, exc_info=True)
                self._fail_running(server, ex)
                self.pool.scheduler.wake()     # its waiting auto prompts may move to healthy workers now
                time.sleep(self.RESTART_DELAY_S)
        self.up = False

    def _loop(self, server) -> None:
        if self.pool.process_mode and self.executor is not None:
            executor = self.executor             # the loop restarted: its child (and keeper) go on
        else:
            executor = self.executor = self.pool.new_executor(self, server)
        self.measure_free_memory()
        self.up = True
        self.log.info("Worker started on %s", self.label)
        self.started.set()
        scheduler = self.pool.scheduler
        while True:
            lease, messages = scheduler.wait_next(self.gpu_id)
            if lease is None and not messages:
                return                          # the scheduler closed: shutdown
            if lease is not None:
                self.lease = lease           # left set if the loop dies: _fail_running ends it
                self._execute(executor, server, lease)
                self.lease = None
            if messages:
                self._apply_messages(executor, messages)

    def _fail_running(self, server, ex: BaseException) -> None:
        """The loop died while running a prompt: record it as an error (history, journal, clients)."""
        lease, self.lease = self.lease, None
        if lease is None or lease.ended.is_set():
            return
        prompt = lease.prompt
        message = _error_message(prompt.prompt_id, ex, "worker died: ")
        status = ExecutionStatus("error", False, [("execution_error", message)])
        self.pool.save_names.release(self.gpu_id)
        run_s = max(0.0, time.monotonic() - lease.started)
        self.pool.scheduler.finish(lease, {"outputs": {}, "meta": {}}, status, run_s)
        self.report(prompt, status, run_s, lease.started_wall)
        if prompt.client_id is not None:
            server.send_sync("execution_error", message, prompt.client_id)
            server.send_sync("executing", {"node": None, "prompt_id": prompt.prompt_id}, prompt.client_id)

    def _execute(self, executor, server, lease: Lease) -> None:
        prompt = lease.prompt
        prompt_id = prompt.prompt_id
        server.last_prompt_id = prompt_id
        self.pool.note_started(lease)
        self.pool.host.prompt_started()
        started = time.perf_counter()
        executor.history_result = {"outputs": {}, "meta": {}}
        try:
            executor.execute(prompt.prompt, prompt_id, prompt.run_extra_data(), prompt.outputs)
            success, messages = executor.success, executor.status_messages
            lease.notes.update(getattr(executor, "notes", None) or {})     # a process worker's child's
        except (Exception, SystemExit) as ex:  # raised outside ComfyUI's per-node handling
            self.log.exception("Prompt %s failed outside node execution", prompt_id)
            success = False
            messages = executor.status_messages + [("execution_error", _error_message(prompt_id, ex))]
        finally:
            self.pool.save_names.release(self.gpu_id)
        if success:
            self.remember_models(prompt.models)
        self.measure_free_memory()
        status = ExecutionStatus("success" if success else "error", success, messages)
        elapsed = time.perf_counter() - started
        self.pool.scheduler.finish(lease, executor.history_result, status, elapsed)
        if server.client_id is not None:
            server.send_sync("executing", {"node": None, "prompt_id": prompt_id}, server.client_id)
        self.report(prompt, status, elapsed, lease.started_wall)
        self.pool.host.prompt_finished(executor.history_result, prompt_id)
        self.pool.request_gc()

    def report(self, prompt, status: ExecutionStatus, run_s: float, started_wall: float) -> None:
        """One greppable line per prompt (the seeds' per-GPU metric lines) and the live figures."""
        outcome = status.outcome
        created = prompt.extra_data.get("create_time") if isinstance(prompt.extra_data, dict) else None
        wait_s = max(0.0, started_wall - created / 1000) if isinstance(created, (int, float)) else None
        self.log.info("prompt_done gpu=%d prompt_id=%s outcome=%s queue_wait_s=%s run_s=%.3f", self.gpu_id,
                      prompt.prompt_id, outcome, "na" if wait_s is None else f"{wait_s:.3f}", run_s)
        self.pool.note_finished(self.gpu_id, outcome, run_s, wait_s)

    def _apply_messages(self, executor, messages: dict) -> None:
        """Between prompts: /free for this worker (unload this device's models and/or reset this
        executor's caches) and /preload onto this device."""
        if self.pool.process_mode:
            self._apply_in_child(executor, messages)
            return
        free_memory = messages.get("free_memory", False)
        if messages.get("unload_models", free_memory):
            if self.pool.weights is not None:
                self.pool.weights.release_held(self.gpu_id)
            self.pool.host.unload_models()     # patched: this worker's device only
            self.log.info("Unloaded models (/free)")
        if free_memory:
            executor.reset()
            self.log.info("Reset node caches (/free)")
        for request in messages.get("preload", ()):
            from .preload import run_on_worker
            run_on_worker(self, request)
        self.measure_free_memory()
        self.pool.request_gc()

    def _apply_in_child(self, executor, messages: dict) -> None:
        """The same, done by this worker's child process."""
        from .preload import PLACEMENT_KEYS
        free_memory = messages.get("free_memory", False)
        unload = messages.get("unload_models", free_memory)
        if unload or free_memory:
            try:
                executor.free(unload, free_memory)
                self.log.info("%s (/free, in its process)", " and ".join(
                    w for w, on in (("Unloaded models", unload), ("reset node caches", free_memory)) if on))
            except Exception as ex:          # its child died meanwhile: a new one has nothing loaded
                self.log.warning("/free in its process: %s", ex)
        for request in messages.get("preload", ()):
            try:
                state = executor.preload(request.kind, request.name, True)
            except Exception as ex:
                self.log.warning("Preload of %s %s failed: %s", request.kind, request.name, ex)
                request.done.set_exception(ex)
                continue
            if state == "on_device":
                self.remember_models([f"{PLACEMENT_KEYS[request.kind]}:{request.name}"])
            self.log.info("Preloaded %s %s onto %s (in its process)", request.kind, request.name, self.label)
            request.done.set_result(state)
        self.measure_free_memory()

    def info(self) -> dict:
        """This worker's own facts for /queue/all and the dashboard (its queue: the scheduler's)."""
        info = {"gpu_id": self.gpu_id, "device": self.label, "up": not self.down, "restarts": self.restarts,
                "weight": self.weight, "free_memory": self.free_memory, "models": list(self._models)}
        if self.pool.process_mode:
            info["process"] = self.executor.describe() if self.executor is not None else None
        return info
