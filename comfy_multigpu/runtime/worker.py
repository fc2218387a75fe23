"""One GPU worker: its pending heap, running prompt, thread, executor, device and per-prompt host state.

Host objects touched: execution.PromptExecutor (one per worker), the PromptServer (send_sync),
comfy.model_management (unload on /free), the asset seeder (main.py:420-473 equivalents).
"""
from __future__ import annotations

import heapq
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Optional

from .context import current_worker

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
    """All state of one GPU. The pool's mutex guards `pending`, `running` and `flags`."""

    def __init__(self, pool: "WorkerPool", gpu_id: int, device: Any, label: str):
        self.pool = pool
        self.gpu_id = gpu_id
        self.device = device          # torch.device the worker's models and tensors live on
        self.label = label            # "cuda:1" / "cpu", as configured
        self.log = WorkerLog(logger, {"gpu_id": gpu_id})
        self.cond = threading.Condition(pool.mutex)
        self.pending: list[tuple] = []          # heap of stock 6-tuples
        self.pinned: list[tuple] = []           # heap of (number, prompt id) of its pinned pending prompts
        self.running: dict[int, tuple] = {}     # item_id -> stock 6-tuple
        self.flags: dict[str, Any] = {}
        self.up = False
        self.thread: Optional[threading.Thread] = None
        self.started = threading.Event()
        # Per-prompt host state that ComfyUI keeps in process globals (see patches/manifest.toml).
        self.attrs: dict[str, Any] = {"client_id": None, "last_node_id": None, "last_prompt_id": None}
        self.interrupt_lock = threading.Lock()
        self.interrupted = False
        self.progress_registry = None
        self.graph_prefix = ["", 0, 0]          # GraphBuilder root, call index, graph index
        self.ram_release_callback = None
        self.ram_headroom = 0
        self._loaded: dict[int, weakref.ref] = {}   # LoadedModel has __eq__ but no __hash__
        self.save_keys: set = set()
        self.restarts = 0                       # times its loop died and was started again
        self.running_since = 0.0                # time.monotonic() when its running prompt started
        self.unhealthy = ""                     # why the watchdog took it out of placement ("" = fine)
        self._models: dict[str, None] = {}     # model keys of recent successful prompts, oldest first
        self.weight = 1.0                       # relative speed for placement (COMFY_MULTIGPU_GPU_WEIGHTS)
        self.free_memory: Optional[int] = None  # device bytes free after the last prompt (CUDA only)

    # ---- queue side (called with pool.mutex held) -------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.running)

    @property
    def down(self) -> bool:
        """Started once and no longer running (a worker still starting up is not down)."""
        return self.started.is_set() and not self.up

    def push(self, item: tuple, pinned: bool = False) -> None:
        heapq.heappush(self.pending, item)
        if pinned:     # found again by pool._first_pinned; started/deleted ones are dropped there
            heapq.heappush(self.pinned, (item[0], item[1]))
        self.cond.notify()

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
        import comfy.model_management
        try:
            self.free_memory = int(comfy.model_management.get_free_memory(self.device))
        except Exception:      # a device in trouble: placement then treats it as full
            self.log.warning("Could not read free memory of %s", self.label, exc_info=True)
            self.free_memory = 0

    def device_memory(self) -> Optional[tuple[int, int]]:
        """(used, total) bytes of a CUDA device now (dashboard, /metrics); None on CPU workers,
        which share the host's RAM, or when the device does not answer."""
        if getattr(self.device, "type", "cpu") != "cuda":
            return None
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
        """The thread: runs the loop, and if the loop itself dies (a fault outside any prompt's
        handling), fails its prompt cleanly, reports the worker down and starts the loop again."""
        current_worker.set(self)
        if getattr(self.device, "type", "cpu") == "cuda":
            import torch
            torch.cuda.set_device(self.device)
        while True:      # daemon thread: lives as long as the process
            try:
                self._loop(server)
            except BaseException as ex:       # noqa: B036 - nothing may end this thread
                self.up = False
                self.restarts += 1
                self.log.error("Worker died (%s: %s); its prompt ends as an error, restarting in %.0f s",
                               type(ex).__name__, ex, self.RESTART_DELAY_S, exc_info=True)
                self._fail_running(server, ex)
                with self.cond:
                    self.pool.wake_idle()     # its waiting auto prompts may move to healthy workers now
                time.sleep(self.RESTART_DELAY_S)

    def _loop(self, server) -> None:
        executor = self.pool.new_executor(server)
        self.measure_free_memory()
        self.up = True
        self.log.info("Worker started on %s", self.label)
        self.started.set()
        while True:
            with self.cond:
                while True:      # next prompt, else wait (or handle /free)
                    job = self.pool.take_next(self)
                    if job is not None or self.flags:
                        break
                    self.cond.wait()
            if job is not None:
                self._execute(executor, server, *job)
            with self.cond:
                flags, self.flags = self.flags, {}
            if flags:
                self._apply_flags(executor, flags)

    def _fail_running(self, server, ex: BaseException) -> None:
        """The loop died while running a prompt: record it as an error (history, journal, clients)."""
        import execution
        with self.pool.mutex:
            jobs = list(self.running.items())
        for item_id, item in jobs:
            message = _error_message(item[1], ex, "worker died: ")
            status = execution.PromptQueue.ExecutionStatus(status_str="error", completed=False,
                                                          messages=[("execution_error", message)])
            self.pool.release_save_keys(self)
            self.pool.task_done(self, item_id, {"outputs": {}, "meta": {}}, status)
            since = self.running_since
            run_s = max(0.0, time.monotonic() - since) if since else 0.0
            self.report(item[1], status, run_s, item[3], time.time() - run_s)
            client = item[3].get("client_id") if isinstance(item[3], dict) else None
            if client is not None:
                server.send_sync("execution_error", message, client)
                server.send_sync("executing", {"node": None, "prompt_id": item[1]}, client)

    def _execute(self, executor, server, item: tuple, item_id: int) -> None:
        import execution
        prompt_id = item[1]
        server.last_prompt_id = prompt_id
        extra_data = item[3].copy()
        extra_data.update(item[5])       # sensitive extra data, merged as main.py does
        self.pool.prompt_started(self)
        started, started_wall = time.perf_counter(), time.time()
        executor.history_result = {"outputs": {}, "meta": {}}
        try:
            executor.execute(item[2], prompt_id, extra_data, item[4])
            success, messages = executor.success, executor.status_messages
        except (Exception, SystemExit) as ex:  # raised outside ComfyUI's per-node handling
            self.log.exception("Prompt %s failed outside node execution", prompt_id)
            success = False
            messages = executor.status_messages + [("execution_error", _error_message(prompt_id, ex))]
        finally:
            self.pool.release_save_keys(self)
        if success:
            from ..policy.placement import prompt_models
            self.remember_models(prompt_models(item[2]))
        self.measure_free_memory()
        status = execution.PromptQueue.ExecutionStatus(
            status_str="success" if success else "error", completed=success, messages=messages)
        elapsed = time.perf_counter() - started
        self.pool.task_done(self, item_id, executor.history_result, status, elapsed)
        if server.client_id is not None:
            server.send_sync("executing", {"node": None, "prompt_id": prompt_id}, server.client_id)
        self.report(prompt_id, status, elapsed, item[3], started_wall)
        self.pool.prompt_finished(self, executor.history_result, prompt_id)

    def report(self, prompt_id: str, status, run_s: float, extra_data, started_wall: float) -> None:
        """One greppable line per prompt (the seeds' per-GPU metric lines) and the Prometheus figures."""
        from ..api.metrics import outcome_of
        outcome = outcome_of(status.status_str, status.messages)
        created = extra_data.get("create_time") if isinstance(extra_data, dict) else None
        wait_s = max(0.0, started_wall - created / 1000) if isinstance(created, (int, float)) else None
        self.log.info("prompt_done gpu=%d prompt_id=%s outcome=%s queue_wait_s=%s run_s=%.3f", self.gpu_id,
                      prompt_id, outcome, "na" if wait_s is None else f"{wait_s:.3f}", run_s)
        if self.pool.metrics is not None:
            self.pool.metrics.prompt_finished(self.gpu_id, outcome, run_s, wait_s)
        self.pool.board.note_finished(self.gpu_id)

    def _apply_flags(self, executor, flags: dict) -> None:
        """Between prompts: /free for this worker (unload this device's models and/or reset this
        executor's caches) and /preload onto this device."""
        import comfy.model_management
        free_memory = flags.get("free_memory", False)
        if flags.get("unload_models", free_memory):
            if self.pool.weights is not None:
                self.pool.weights.release_held(self.gpu_id)
            comfy.model_management.unload_all_models()   # patched: this worker's device only
            self.log.info("Unloaded models (/free)")
        if free_memory:
            executor.reset()
            self.log.info("Reset node caches (/free)")
        for request in flags.get("preload", ()):
            from .preload import run_on_worker
            run_on_worker(self, request)
        self.measure_free_memory()
        self.pool.request_gc()

    def snapshot(self) -> dict:
        """Counts for /queue/all and placement (pool.mutex held by the caller)."""
        return {"gpu_id": self.gpu_id, "device": self.label, "up": not self.down,
                "healthy": not self.unhealthy, "restarts": self.restarts,
                "weight": self.weight, "free_memory": self.free_memory, "models": list(self._models),
                "running_count": len(self.running), "pending_count": len(self.pending)}
