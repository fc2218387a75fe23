"""The worker pool: owns every GpuWorker, the scheduler that holds their queues, the shared weights,
the journal, the live board and the threads beside the workers (housekeeping, watchdog); starts them
all and shuts them down. Host objects touched: through `host` (host/services.py) only.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Mapping

from ..policy.admission import Limits
from .board import Board
from .heap import freeze_startup_objects, release_free_heap
from .local_scheduler import LocalScheduler
from .save_names import SaveNames
from .weights import PinCounts
from .worker import GpuWorker

logger = logging.getLogger("comfy_multigpu")

GC_INTERVAL_S = 10.0              # main.py gc_collect_interval


@dataclass(frozen=True)
class PoolOptions:
    """Settings the pool runs with (policy/config.py resolves them from the environment)."""
    pools: Optional[Mapping[str, tuple]] = None
    weights: tuple = ()                  # relative speed per GPU
    max_overtakes: int = 0
    limits: Limits = Limits()
    watchdog_s: float = 0.0              # 0: off
    drain_timeout_s: float = 600.0
    gc_freeze: bool = True               # freeze start-up objects out of the GC (heap.py)
    spawn: Any = None                    # process_executor.SpawnSpec: process workers; None: threads


class WorkerPool:
    def __init__(self, devices: Iterable[tuple[Any, str]], options: PoolOptions = PoolOptions(), *,
                 host=None, journal=None, weights=None):
        if host is None:
            from ..host.services import ComfyServices
            host = ComfyServices()
        self.host = host                           # host/services.py ComfyServices, or a test double
        self.options = options
        self.workers = [GpuWorker(self, i, dev, label) for i, (dev, label) in enumerate(devices)]
        for w, weight in zip(self.workers, options.weights):
            w.weight = weight
        self.weights = weights                     # WeightStore (threads) / SegmentStore (processes) / None
        # process workers own one GPU each: a prompt asking for several runs on one (and says why)
        self.scheduler = LocalScheduler(self.workers, options.pools, options.max_overtakes, options.limits,
                                        journal, on_change=self._queue_updated,
                                        max_gang=1 if options.spawn is not None else 0)
        self.fleet = None                          # fleet.member.FleetMember of a fleet member, else None
        self.server = None                         # ComfyUI's PromptServer, from launch()
        self.board = Board()                       # dashboard: live progress, subscribers
        self.save_names = SaveNames()
        self.socket_targets: dict[str, int] = {}   # WebSocket sid -> GPU it was opened for
        self.model_lock = threading.RLock()        # guards comfy.model_management.current_loaded_models
        self.pin_counts = PinCounts()
        self.metrics = None                        # api.metrics.Metrics once it observes this pool
        self.finish_listeners: list[Callable] = [] # (gpu_id, outcome, run_s, wait_s) per finished prompt
        self.load_listeners: list[Callable] = []   # (gpu_id, seconds, count) per load onto a device
        self.start_hooks: list[Callable] = []      # run once, in launch(), before workers start
        self.gc_runs = 0                           # housekeeping passes (GC + cache emptying) so far
        self.gc_frozen = 0                         # objects frozen at start
        self.gc_last_s = 0.0                       # how long the last pass held up the workers
        self._gc_cond = threading.Condition(threading.Lock())
        self._gc_wanted = False
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def __len__(self) -> int:
        return len(self.workers)

    # ---- read-through of the scheduler's settings ------------------------------------------------
    @property
    def pools(self) -> dict:
        return self.scheduler.pools

    @property
    def default_pool(self) -> Optional[str]:
        return self.scheduler.default_pool

    @property
    def process_mode(self) -> bool:
        """Each worker runs its prompts in a child process of its own (COMFY_MULTIGPU_WORKER_MODE)."""
        return self.options.spawn is not None

    def new_executor(self, worker: GpuWorker, server):
        """What runs the worker's prompts: ComfyUI's PromptExecutor in this process, or a child's."""
        if self.process_mode:
            from .process_executor import ProcessExecutor
            return ProcessExecutor(worker, server, self.options.spawn, self.weights)
        return self.host.new_executor(server)

    @property
    def draining(self) -> bool:
        return self.scheduler.draining

    @property
    def journal(self):
        """runtime.journal.Journal the scheduler records accepted prompts in, or None (switched off)."""
        return self.scheduler.journal

    @property
    def drain_timeout_s(self) -> float:
        return self.options.drain_timeout_s

    def attach_journal(self, journal) -> tuple[int, int]:
        """Record every accepted prompt in `journal` from now on, after putting back what it holds:
        history, and unfinished prompts into the queues. Returns (history entries, requeued)."""
        self.scheduler.journal = journal
        return self.scheduler.restore(journal)

    # ---- life cycle ------------------------------------------------------------------------
    def launch(self, server) -> None:
        """Called from the thread ComfyUI starts for prompt_worker: hooks, then the workers."""
        if self.options.gc_freeze:
            # Before any worker exists: what a prompt creates must never be frozen (a model frozen
            # while it loads could not be freed by the collector again).
            self.gc_frozen, took = freeze_startup_objects()
            logger.info("comfy-multigpu: %d start-up objects frozen out of the garbage collector (%.0f ms; "
                        "COMFY_MULTIGPU_GC_FREEZE=0 turns this off)", self.gc_frozen, 1000 * took)
        for hook in self.start_hooks:
            hook(server)
        self.start(server)

    def start(self, server, timeout: float = 60.0) -> None:
        """Start every worker thread (and the watchdog); returns when all are up or `timeout` passed."""
        self.server = server
        for w in self.workers:
            w.start(server)
        if self.options.watchdog_s > 0:
            self._spawn(self._run_watchdog, "comfy-multigpu-watchdog")
        for w in self.workers:
            if not w.started.wait(timeout):
                logger.error("[GPU %s] Worker did not start within %.0f s", w.gpu_id, timeout)

    def start_housekeeping(self) -> None:
        """Housekeeping in a thread of its own (in ComfyUI it runs in the prompt_worker thread)."""
        self._spawn(self.run_housekeeping, "comfy-multigpu-housekeeping")

    def shutdown(self, timeout: float = 10.0) -> list[str]:
        """Stop every thread the pool started and join them (idempotent); running prompts are
        interrupted and end as errors in history (and the journal). Returns the names of threads still
        alive after `timeout`. For tests and embedders: a server stops through the SIGTERM drain
        (lifecycle.py), which lets running prompts finish and keeps waiting ones for the next start."""
        self._stopping.set()
        self.scheduler.close()
        with self._gc_cond:
            self._gc_cond.notify_all()
        for w in self.workers:
            w.set_interrupt(True)
        deadline = time.monotonic() + timeout
        threads = [w.thread for w in self.workers if w.thread is not None] + self._threads
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.stop_children()
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            logger.warning("comfy-multigpu: shutdown: %s still running after %.0f s", ", ".join(alive), timeout)
        return alive

    def stop_children(self) -> None:
        """Process mode: stop every worker's child, then drop the shared segments (idempotent; also
        run at exit)."""
        if not self.process_mode:
            return
        executors = [w.executor for w in self.workers if w.executor is not None]
        for executor in executors:
            executor.request_stop()              # all at once; then wait for each
        for executor in executors:
            executor.stop()
        if self.weights is not None:
            self.weights.close()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, daemon=True, name=name)
        self._threads.append(thread)
        thread.start()

    # ---- watchdog and housekeeping -------------------------------------------------------------
    def _run_watchdog(self) -> None:
        limit = self.options.watchdog_s
        while not self._stopping.wait(min(1.0, limit / 4)):
            self.scheduler.check_health(time.monotonic(), limit)

    def request_gc(self) -> None:
        with self._gc_cond:
            self._gc_wanted = True
            self._gc_cond.notify()

    def run_housekeeping(self) -> None:
        """GC and cache emptying once for all workers, at most every GC_INTERVAL_S, after prompts."""
        last = 0.0
        while not self._stopping.is_set():
            with self._gc_cond:
                while not self._gc_wanted and not self._stopping.is_set():
                    self._gc_cond.wait()
            wait = GC_INTERVAL_S - (time.perf_counter() - last)
            if wait > 0:
                self._stopping.wait(min(wait, GC_INTERVAL_S))
                continue
            with self._gc_cond:
                self._gc_wanted = False
            started = time.perf_counter()
            self.host.collect()
            if self.weights is not None:
                self.weights.evict()          # files whose last view the GC just freed
            release_free_heap()
            last = time.perf_counter()
            self.gc_last_s = last - started
            self.gc_runs += 1
            self.host.after_collect(idle=self.scheduler.tasks_remaining() == 0)

    def _queue_updated(self) -> None:
        if self.server is not None:
            self.server.queue_updated()

    # ---- events of one prompt (called by its worker) --------------------------------------------
    def note_started(self, lease) -> None:
        """A lease began on its workers (rank 0 calls this): the dashboard's strips and busy share."""
        self.board.note_started(lease)

    def note_finished(self, gpu_id: int, outcome: str, run_s: float, wait_s: Optional[float]) -> None:
        self.board.note_finished(gpu_id, outcome, run_s)
        for listener in self.finish_listeners:
            listener(gpu_id, outcome, run_s, wait_s)

    def note_device_load(self, gpu_id: int, seconds: float, count: int) -> None:
        for listener in self.load_listeners:
            listener(gpu_id, seconds, count)

    def observe(self, metrics) -> None:
        """Metrics (api/metrics.py) count this pool's events and read its state at scrape time."""
        self.metrics = metrics
        self.finish_listeners.append(metrics.prompt_finished)
        self.load_listeners.append(metrics.device_load)
        if self.weights is not None:
            self.weights.load_listeners.append(metrics.file_load)

    # ---- loaded-model ownership --------------------------------------------------------------
    def request_preload(self, gpu_id: int, request) -> None:
        """/preload onto a device: the worker does it in its thread, after its running prompt."""
        self.scheduler.post([gpu_id], "preload", request, append=True)

    def models_on_devices(self, entry) -> list[int]:
        """GPUs that have a view of a shared file loaded on their device (for GET /multigpu/models);
        in process mode, the GPUs whose process maps it."""
        if self.process_mode:
            return sorted(g for g in entry.users if g >= 0)
        import comfy.model_management as mm
        from .weights import entry_of_module
        gpus = []
        with self.model_lock:
            current = list(mm.current_loaded_models)
            for worker in self.workers:
                for loaded in worker.loaded_models():
                    patcher = getattr(loaded, "model", None)
                    module = getattr(patcher, "model", None)
                    if module is None or not any(loaded is c for c in current):
                        continue
                    if entry_of_module(self.weights, module) is entry:
                        gpus.append(worker.gpu_id)
                        break
        return gpus

    def models_in_use_by_others(self, worker: Optional[GpuWorker], device) -> list:
        """LoadedModel entries that busy workers other than `worker` hold on `device`."""
        # Lock-free read of who is busy: this runs under model_lock, and weakref finalizers may take
        # model_lock in a thread that holds the scheduler's lock.
        keep = []
        for other in self.workers:
            if other is worker or not other.busy or (device is not None and other.device != device):
                continue
            keep.extend(other.loaded_models())
        return keep
