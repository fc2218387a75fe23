"""The worker pool: owns every GpuWorker, the shared history, and the one housekeeping thread.

Host objects touched: execution.PromptExecutor / CacheType (built per worker as main.py:378-398
does), gc + comfy.model_management.soft_empty_cache (once for all workers, main.py:462-473),
hook_breaker_ac10a0.restore_functions, the asset seeder (pause while any worker runs).
"""
from __future__ import annotations

import copy
import gc
import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional

from ..policy import placement
from ..policy.admission import Limits
from ..api.dashboard import Board
from .heap import freeze_startup_objects, release_free_heap
from .weights import PinCounts
from .worker import GpuWorker

logger = logging.getLogger("comfy_multigpu")

MAXIMUM_HISTORY_SIZE = 10000      # execution.py MAXIMUM_HISTORY_SIZE
GC_INTERVAL_S = 10.0              # main.py gc_collect_interval
SAVE_WAIT_S = 120.0               # longest wait for another worker's output-file numbering


def executor_cache_settings(args, total_ram_mb: float):
    """The cache type and cache_args main.py's prompt_worker builds (main.py:379-398 of 0.33.0)."""
    import execution
    cache_ram = 0
    cache_ram_inactive = 0
    if not args.cache_classic and not args.cache_none and args.cache_lru <= 0:
        cache_ram = min(10.0, max(2.0, total_ram_mb * 0.10 / 1024.0))
        cache_ram_inactive = min(128.0, total_ram_mb / 1024.0)
        if len(args.cache_ram) > 0:
            cache_ram = args.cache_ram[0]
        if len(args.cache_ram) > 1:
            cache_ram_inactive = args.cache_ram[1]
    cache_type = execution.CacheType.RAM_PRESSURE
    if args.cache_classic:
        cache_type = execution.CacheType.CLASSIC
    elif args.cache_lru > 0:
        cache_type = execution.CacheType.LRU
    elif args.cache_none:
        cache_type = execution.CacheType.NONE
    return cache_type, {"lru": args.cache_lru, "ram": cache_ram, "ram_inactive": cache_ram_inactive}


@dataclass(frozen=True)
class PendingPrompt:
    """Placement facts of a waiting prompt: its models, and for an auto-placed one (which may still
    move to another worker) the GPUs of its pool."""
    models: frozenset
    movable: bool                             # auto-placed (True) or pinned (False)
    eligible: Optional[frozenset] = None      # GPUs of its pool (None: any)
    number: float = 0.0                       # its queue number


def _queue_order(head: tuple) -> tuple:
    return head[0], head[1]


def heap_in_order(heap: list) -> Iterator[tuple]:
    """A heap's items in queue order (number, then prompt id) without changing it: the smallest of
    a frontier of unvisited nodes each time, O(log k) for the k-th. The heap must not change while
    this runs (pool.mutex held)."""
    if not heap:
        return
    frontier = [(_queue_order(heap[0]), 0)]
    while frontier:
        _, i = heapq.heappop(frontier)
        yield heap[i]
        for child in (2 * i + 1, 2 * i + 2):
            if child < len(heap):
                heapq.heappush(frontier, (_queue_order(heap[child]), child))


class WorkerPool:
    def __init__(self, devices: Iterable[tuple[Any, str]], pools: Optional[Mapping[str, tuple]] = None,
                 weights: tuple = (), max_overtakes: int = 0):
        self.mutex = threading.RLock()
        self.workers = [GpuWorker(self, i, dev, label) for i, (dev, label) in enumerate(devices)]
        for w, weight in zip(self.workers, weights):
            w.weight = weight
        self.pools: dict[str, tuple] = dict(pools or {"all": tuple(range(len(self.workers)))})
        self.default_pool: Optional[str] = "default" if "default" in self.pools else None
        self.history: dict[str, dict] = {}
        self.pending: dict[str, PendingPrompt] = {}   # prompt id -> placement facts, while pending
        self.overtaken: dict[str, int] = {}        # pending prompt id -> later prompts started before it
        self.max_overtakes = max_overtakes         # ... at most this often, to spare a model load
        self.task_counter = 0
        self.server = None
        self._gc_cond = threading.Condition(threading.Lock())
        self._gc_wanted = False
        self._save_cond = threading.Condition(threading.Lock())
        self._save_owner: dict[tuple, GpuWorker] = {}
        self.socket_targets: dict[str, int] = {}   # WebSocket sid -> GPU it was opened for
        self.model_lock = threading.RLock()        # guards comfy.model_management.current_loaded_models
        self.start_hooks: list = []                # run once, in launch(), before workers start
        self.gc_runs = 0                           # housekeeping passes (GC + cache emptying) so far
        self.gc_freeze = True                      # freeze start-up objects out of the GC (heap.py)
        self.gc_frozen = 0                         # objects frozen at start
        self.gc_last_s = 0.0                       # how long the last pass held up the workers
        # reliability (set by activation from the settings)
        self.journal = None                        # journal.Journal, or None when switched off
        self.limits = Limits()
        self.draining = False                      # SIGTERM seen: start nothing new
        self.watchdog_s = 0.0
        self.drain_timeout_s = 600.0               # SIGTERM: how long running prompts get
        self.mean_run_s = 0.0                      # moving average of prompt run time (Retry-After)
        # shared model weights (set by activation; None = every worker loads its own copy)
        self.weights = None                        # weights.WeightStore
        self.metrics = None                        # metrics.Metrics (GET /metrics)
        self.board = Board()                       # dashboard: live progress, subscribers
        self.pin_counts = PinCounts()

    def __len__(self) -> int:
        return len(self.workers)

    # ---- life cycle ------------------------------------------------------------------------
    def new_executor(self, server):
        import execution
        import comfy.model_management
        from comfy.cli_args import args
        cache_type, cache_args = executor_cache_settings(args, comfy.model_management.total_ram)
        return execution.PromptExecutor(server, cache_type=cache_type, cache_args=cache_args)

    def launch(self, server) -> None:
        """Called from the thread ComfyUI starts for prompt_worker: hooks, then the workers."""
        if self.gc_freeze:
            # Before any worker exists: what a prompt creates must never be frozen (a model frozen
            # while it loads could not be freed by the collector again).
            self.gc_frozen, took = freeze_startup_objects()
            logger.info("comfy-multigpu: %d start-up objects frozen out of the garbage collector (%.0f ms; "
                        "COMFY_MULTIGPU_GC_FREEZE=0 turns this off)", self.gc_frozen, 1000 * took)
        for hook in self.start_hooks:
            hook(server)
        self.start(server)

    def start(self, server, timeout: float = 60.0) -> None:
        self.server = server
        for w in self.workers:
            w.start(server)
        if self.watchdog_s > 0:
            threading.Thread(target=self.run_watchdog, daemon=True, name="comfy-multigpu-watchdog").start()
        for w in self.workers:
            if not w.started.wait(timeout):
                logger.error("[GPU %s] Worker did not start within %.0f s", w.gpu_id, timeout)

    # ---- queue mechanics (placement policy lives in placement.py) -----------------------------
    def startable(self, worker: GpuWorker) -> list[placement.Waiting]:
        """What `worker` may start, the first placement.LOOKAHEAD in queue order: the first of its pinned
        prompts (pinned prompts keep their order, as in a stock queue, and never move), its own
        auto-placed ones, and those of its pool waiting in busy workers' queues (an idle worker starts
        its own queue itself). Costs O(workers x LOOKAHEAD) however long the queues are."""
        heads = [self._movable_head(owner, worker.gpu_id) for owner in self.workers
                 if owner is worker or owner.busy or owner.down]          # each in queue order
        first = itertools.islice(heapq.merge(*heads, key=_queue_order), placement.LOOKAHEAD)
        waiting = [placement.Waiting(pid, number, gpu, facts.models, facts.eligible, self.overtaken.get(pid, 0))
                   for number, pid, gpu, facts in first]
        pinned = self._first_pinned(worker)
        if pinned is not None:
            pid, facts = pinned
            waiting.append(placement.Waiting(pid, facts.number, worker.gpu_id, facts.models, None,
                                             self.overtaken.get(pid, 0), pinned=True))
        return waiting

    def _movable_head(self, owner: GpuWorker, gpu_id: int) -> list[tuple]:
        """The first LOOKAHEAD auto-placed prompts in `owner`'s queue that `gpu_id` may run, as
        (number, prompt id, owner, facts), read off the heap in order without changing it."""
        found = []
        for item in heap_in_order(owner.pending):
            facts = self.pending.get(item[1])
            if facts is None or not facts.movable or (facts.eligible is not None and gpu_id not in facts.eligible):
                continue
            found.append((item[0], item[1], owner.gpu_id, facts))
            if len(found) == placement.LOOKAHEAD:
                break
        return found

    def _first_pinned(self, worker: GpuWorker) -> Optional[tuple[str, PendingPrompt]]:
        """The earliest pinned prompt waiting in `worker`'s queue (its pinned heap; entries of prompts
        that started or were deleted are dropped here)."""
        heap = worker.pinned
        while heap:
            number, pid = heap[0]
            facts = self.pending.get(pid)
            if facts is not None and not facts.movable and facts.number == number:
                return pid, facts
            heapq.heappop(heap)
        return None

    def take_next(self, worker: GpuWorker) -> Optional[tuple[tuple, int]]:
        """The prompt `worker` starts now (placement.choose_next over pool.startable), or None."""
        with self.mutex:
            if self.draining:
                return None
            waiting = self.startable(worker)
            chosen = placement.choose_next(worker.gpu_id, worker.recent_models(), waiting, self.max_overtakes)
            if chosen is None:
                return None
            for prompt_id in placement.overtaken_by(worker.gpu_id, chosen, waiting):
                self.overtaken[prompt_id] = self.overtaken.get(prompt_id, 0) + 1
            owner = self.workers[chosen.owner]
            if owner.pending[0][1] == chosen.prompt_id:       # the earliest (most starts): O(log n)
                item = heapq.heappop(owner.pending)
            else:
                index = next(i for i, it in enumerate(owner.pending) if it[1] == chosen.prompt_id)
                item = owner.pending.pop(index)
                heapq.heapify(owner.pending)
            if owner is not worker:
                worker.log.info("Took over prompt %s waiting behind GPU %s", item[1], owner.gpu_id)
            self.forget_pending(item[1])
            item_id = self.task_counter
            self.task_counter += 1
            worker.running[item_id] = copy.deepcopy(item)
            worker.running_since = time.monotonic()
            self.wake_idle()          # this worker is busy now: its waiting auto prompts may move
        self._queue_updated()
        return item, item_id

    def forget_pending(self, prompt_id: str) -> None:
        """A prompt left the pending queues (started or deleted): drop its placement facts."""
        self.pending.pop(prompt_id, None)
        self.overtaken.pop(prompt_id, None)

    def task_done(self, worker: GpuWorker, item_id: int, history_result: dict, status,
                  run_s: float = 0.0) -> None:
        with self.mutex:
            prompt = worker.running.pop(item_id)
            prompt = prompt[:5] + prompt[6:]          # drop sensitive extra data, as main.py does
            if len(self.history) > MAXIMUM_HISTORY_SIZE:
                self.history.pop(next(iter(self.history)))
            entry = {"prompt": prompt, "outputs": {}, "status": copy.deepcopy(status._asdict())}
            entry.update(history_result)
            entry["gpu_id"] = worker.gpu_id
            self.history[prompt[1]] = entry
            self.mean_run_s = run_s if not self.mean_run_s else 0.9 * self.mean_run_s + 0.1 * run_s
        # Outside the pool's lock (other workers and POST /prompt wait on it): the journal accepted
        # this prompt before it was queued, so the order of the two writes holds without it.
        if self.journal is not None:
            try:
                self.journal.finished(prompt[1], worker.gpu_id, entry)
            except Exception:
                worker.log.exception("Journal: could not record that %s finished", prompt[1])
        self._queue_updated()

    def check_watchdog(self, now: float) -> None:
        """A prompt running longer than watchdog_s takes its GPU out of placement until it ends."""
        with self.mutex:
            for w in self.workers:
                late = w.busy and now - w.running_since > self.watchdog_s
                if late and not w.unhealthy:
                    w.unhealthy = f"a prompt has run for more than {self.watchdog_s:g} s"
                    w.log.error("Watchdog: %s; no new auto prompts go to this GPU until it ends", w.unhealthy)
                elif not late and w.unhealthy:
                    w.log.info("Watchdog: healthy again")
                    w.unhealthy = ""
                    self.wake_idle()

    def run_watchdog(self) -> None:
        while True:
            time.sleep(min(1.0, self.watchdog_s / 4))
            self.check_watchdog(time.monotonic())

    def busy_count(self) -> int:
        with self.mutex:
            return sum(1 for w in self.workers if w.busy)

    def locate(self, prompt_id: str) -> Optional[tuple[str, int, float]]:
        """(state "queued" | "running" | "done", GPU, queue number) of a prompt id the server knows."""
        with self.mutex:
            for w in self.workers:
                for item in w.running.values():
                    if item[1] == prompt_id:
                        return "running", w.gpu_id, item[0]
                if prompt_id in self.pending:
                    for item in w.pending:
                        if item[1] == prompt_id:
                            return "queued", w.gpu_id, item[0]
            entry = self.history.get(prompt_id)
            if entry is not None:
                return "done", entry.get("gpu_id", 0), entry["prompt"][0] if entry.get("prompt") else 0
        return None

    def _queue_updated(self) -> None:
        if self.server is not None:
            self.server.queue_updated()

    def wake_idle(self) -> None:
        """Let workers that are not running anything look for prompts to take over (pool.mutex held)."""
        for w in self.workers:
            if not w.busy:
                w.cond.notify()

    def find_running(self, prompt_id: str) -> Optional[GpuWorker]:
        with self.mutex:
            for w in self.workers:
                if any(item[1] == prompt_id for item in w.running.values()):
                    return w
        return None

    # ---- asset seeder and periodic GC (main.py:420-473, once for all workers) -----------------
    def prompt_started(self, worker: GpuWorker) -> None:
        from app.assets.seeder import asset_seeder
        asset_seeder.pause()

    def prompt_finished(self, worker: GpuWorker, history_result: dict, prompt_id: str) -> None:
        from app.assets.seeder import asset_seeder
        if not asset_seeder.is_disabled():
            import sys
            from app.assets.services import register_output_files
            collect = getattr(sys.modules.get("__main__"), "_collect_output_absolute_paths", None)
            if collect is not None:
                register_output_files(collect(history_result), job_id=prompt_id)
        self.request_gc()

    def request_gc(self) -> None:
        with self._gc_cond:
            self._gc_wanted = True
            self._gc_cond.notify()

    def run_housekeeping(self) -> None:
        """Runs in the thread ComfyUI starts for prompt_worker: GC and cache emptying, once for all."""
        import comfy.model_management
        import hook_breaker_ac10a0
        from app.assets.seeder import asset_seeder
        from comfy.cli_args import args
        last = 0.0
        while True:
            with self._gc_cond:
                while not self._gc_wanted:
                    self._gc_cond.wait()
            wait = GC_INTERVAL_S - (time.perf_counter() - last)
            if wait > 0:
                time.sleep(min(wait, GC_INTERVAL_S))
                continue
            with self._gc_cond:
                self._gc_wanted = False
            started = time.perf_counter()
            gc.collect()
            comfy.model_management.soft_empty_cache()
            if self.weights is not None:
                self.weights.evict()          # files whose last view the GC just freed
            release_free_heap()
            last = time.perf_counter()
            self.gc_last_s = last - started
            self.gc_runs += 1
            hook_breaker_ac10a0.restore_functions()
            with self.mutex:
                idle = not any(w.busy or w.pending for w in self.workers)
            if idle:
                if not asset_seeder.is_disabled():
                    asset_seeder.enqueue_enrich(roots=("output",), compute_hashes=args.enable_asset_hashing)
                asset_seeder.resume()

    # ---- output file numbering (folder_paths.get_save_image_path) -----------------------------
    def reserve_save_key(self, worker: GpuWorker, key: tuple) -> None:
        """Wait until no other worker is numbering files under `key`, then hold it until node end."""
        deadline = time.monotonic() + SAVE_WAIT_S
        with self._save_cond:
            while self._save_owner.get(key, worker) is not worker:
                left = deadline - time.monotonic()
                if left <= 0:
                    worker.log.warning("Waited %.0f s for output name %s; numbering without the lock",
                                       SAVE_WAIT_S, key)
                    return
                self._save_cond.wait(left)
            self._save_owner[key] = worker
            worker.save_keys.add(key)

    def release_save_keys(self, worker: GpuWorker) -> None:
        with self._save_cond:
            for key in worker.save_keys:
                if self._save_owner.get(key) is worker:
                    del self._save_owner[key]
            worker.save_keys.clear()
            self._save_cond.notify_all()

    # ---- loaded-model ownership --------------------------------------------------------------
    def request_preload(self, gpu_id: int, request) -> None:
        """/preload onto a device: the worker does it in its thread, after its running prompt."""
        worker = self.workers[gpu_id]
        with self.mutex:
            worker.flags.setdefault("preload", []).append(request)
            worker.cond.notify()

    def models_on_devices(self, entry) -> list[int]:
        """GPUs that have a view of a shared file loaded on their device (for GET /multigpu/models)."""
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
        # No pool.mutex here: this runs under model_lock, and weakref finalizers may take
        # model_lock in a thread that holds pool.mutex. Reading `running` is atomic in CPython.
        keep = []
        for other in self.workers:
            if other is worker or not other.busy or (device is not None and other.device != device):
                continue
            keep.extend(other.loaded_models())
        return keep
