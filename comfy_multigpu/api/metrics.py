"""Prometheus metrics for GET /metrics (prometheus-client, a registry of our own).

Events (prompt finished, device load) are counted as they happen; state (queues, workers, RAM cache,
device memory) is read from the pool when Prometheus scrapes, so nothing is kept twice.
Host objects touched: none directly (CUDA memory is read through GpuWorker.device_memory at scrape time).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from ..runtime.pool import WorkerPool

logger = logging.getLogger("comfy_multigpu")

PREFIX = "comfy_multigpu"
OUTCOMES = ("success", "error", "interrupted")
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class PoolCollector:
    """Gauges read from the pool at scrape time."""

    def __init__(self, pool: "WorkerPool"):
        self.pool = pool

    def collect(self):
        pool = self.pool
        depth = GaugeMetricFamily(f"{PREFIX}_queue_pending", "prompts waiting for a GPU", labels=["gpu"])
        running = GaugeMetricFamily(f"{PREFIX}_running", "prompts running on a GPU", labels=["gpu"])
        up = GaugeMetricFamily(f"{PREFIX}_worker_up", "1 while the GPU's worker thread runs", labels=["gpu"])
        healthy = GaugeMetricFamily(f"{PREFIX}_worker_healthy", "0 while the watchdog holds the GPU out",
                                    labels=["gpu"])
        restarts = CounterMetricFamily(f"{PREFIX}_worker_restarts", "times a worker loop died and restarted",
                                       labels=["gpu"])
        lease_gpus = GaugeMetricFamily(f"{PREFIX}_lease_gpus", "GPUs of the lease this GPU serves (0: idle; "
                                       "more than 1: one prompt on several GPUs)", labels=["gpu"])
        lease_rank = GaugeMetricFamily(f"{PREFIX}_lease_rank", "this GPU's rank in its lease (-1: idle)",
                                       labels=["gpu"])
        snap = pool.scheduler.snapshot()
        for q in snap.gpus:
            lease = q.leases[0] if q.leases else None
            lease_gpus.add_metric([str(q.gpu_id)], len(lease.gpu_ids) if lease else 0)
            lease_rank.add_metric([str(q.gpu_id)], lease.rank_of(q.gpu_id) if lease else -1)
        rows = [(str(w.gpu_id), q.pending_count, len(q.running), not w.down, not q.unhealthy, w.restarts, w)
                for w, q in zip(pool.workers, snap.gpus)]
        for gpu, pending, run, is_up, is_healthy, restart_count, _ in rows:
            depth.add_metric([gpu], pending)
            running.add_metric([gpu], run)
            up.add_metric([gpu], 1 if is_up else 0)
            healthy.add_metric([gpu], 1 if is_healthy else 0)
            restarts.add_metric([gpu], restart_count)
        yield from (depth, running, up, healthy, restarts, lease_gpus, lease_rank)
        yield from self._device_memory(rows)
        yield from self._ram_cache()
        yield from self._housekeeping()
        if pool.fleet is not None:
            yield from self._fleet(pool.fleet)

    def _fleet(self, fleet):
        """The fleet's view (from Redis at scrape time) and this machine's part in it."""
        status = fleet.status()
        g = GaugeMetricFamily(f"{PREFIX}_fleet_redis_reachable", "1 while this machine reaches the fleet's Redis")
        g.add_metric([], 1 if status["reachable"] and "error" not in status else 0)
        yield g
        for name, text, value in (("taken", "prompts this machine's GPUs took from the fleet", status["taken_here"]),
                                  ("bell_wakeups", "blocking reads of idle GPUs that returned", status["bell_wakeups"]),
                                  ("completions_fenced", "results of this machine refused (lease lost)",
                                   status["completions_fenced_here"])):
            c = CounterMetricFamily(f"{PREFIX}_fleet_{name}", text)
            c.add_metric([], value)
            yield c
        if "error" in status:
            return
        machines = GaugeMetricFamily(f"{PREFIX}_fleet_machines", "machines registered in the fleet")
        machines.add_metric([], len(status["machines"]))
        gpus = GaugeMetricFamily(f"{PREFIX}_fleet_gpus", "GPUs of the fleet by machine and state",
                                 labels=["machine", "state"])
        for name, info in sorted(status["machines"].items()):
            states = {"idle": 0, "busy": 0, "down": 0}
            for gpu in info.get("gpus", []):
                states["down" if gpu.get("down") else "idle" if gpu.get("idle") else "busy"] += 1
            for state, count in states.items():
                gpus.add_metric([name, state], count)
        waiting = GaugeMetricFamily(f"{PREFIX}_fleet_lane_waiting", "prompts waiting in a lane", labels=["lane"])
        leased = GaugeMetricFamily(f"{PREFIX}_fleet_lane_leased", "prompts of a lane running under a lease",
                                   labels=["lane"])
        for lane, counts in sorted(status["lanes"].items()):
            waiting.add_metric([lane], counts["waiting"])
            leased.add_metric([lane], counts["leased"])
        active = GaugeMetricFamily(f"{PREFIX}_fleet_active", "prompts waiting or running anywhere in the fleet")
        active.add_metric([], status["active"])
        events = CounterMetricFamily(f"{PREFIX}_fleet_prompts", "fleet queue events: completed, failed (after "
                                     "the attempts or pinned to an absent machine), redelivered (a lease "
                                     "expired), fenced (a stale result refused)", labels=["event"])
        for event in ("completed", "failed", "redelivered", "fenced"):
            events.add_metric([event], status["stats"].get(event, 0))
        yield from (machines, gpus, waiting, leased, active, events)

    def _housekeeping(self):
        c = CounterMetricFamily(f"{PREFIX}_housekeeping_passes", "garbage collection + cache emptying passes")
        c.add_metric([], self.pool.gc_runs)
        yield c
        g = GaugeMetricFamily(f"{PREFIX}_housekeeping_last_pass_seconds",
                              "how long the last pass held up the workers (GIL)")
        g.add_metric([], self.pool.gc_last_s)
        yield g

    def _device_memory(self, rows):
        used = GaugeMetricFamily(f"{PREFIX}_device_memory_used_bytes", "device memory in use (CUDA devices)",
                                 labels=["gpu", "device"])
        total = GaugeMetricFamily(f"{PREFIX}_device_memory_total_bytes", "device memory (CUDA devices)",
                                  labels=["gpu", "device"])
        for gpu, *_, worker in rows:
            reading = worker.device_memory()   # None on CPU workers: see process_resident_memory_bytes
            if reading is not None:
                used.add_metric([gpu, worker.label], reading[0])
                total.add_metric([gpu, worker.label], reading[1])
        yield from (used, total)

    def _ram_cache(self):
        store = self.pool.weights
        if store is None:
            return
        totals = store.totals()
        for name, text in (("bytes", "model weights held in the shared RAM cache"),
                           ("budget_bytes", "COMFY_MULTIGPU_RAM_CACHE"),
                           ("files", "model files in the shared RAM cache")):
            g = GaugeMetricFamily(f"{PREFIX}_ram_cache_{name}", text)
            g.add_metric([], totals[name])
            yield g
        for name, text in (("hits", "loader calls served from the RAM cache"),
                           ("misses", "loader calls that read the file"),
                           ("evictions", "files dropped from the RAM cache")):
            c = CounterMetricFamily(f"{PREFIX}_ram_cache_{name}", text)
            c.add_metric([], totals[name])
            yield c


class Metrics:
    """One per extension: the registry behind GET /metrics."""

    def __init__(self, pool: "WorkerPool"):
        self.registry = CollectorRegistry(auto_describe=True)
        self.finished = Counter(f"{PREFIX}_prompts_finished", "prompts finished, by GPU and outcome",
                                ["gpu", "outcome"], registry=self.registry)
        self.duration = Histogram(f"{PREFIX}_prompt_duration_seconds", "prompt run time", ["gpu"],
                                  buckets=DURATION_BUCKETS, registry=self.registry)
        self.wait = Histogram(f"{PREFIX}_prompt_queue_wait_seconds", "time from POST /prompt to its start",
                              ["gpu"], buckets=WAIT_BUCKETS, registry=self.registry)
        self.loads = Counter(f"{PREFIX}_model_loads", "models loaded onto a GPU's device (load_models_gpu calls "
                             "that moved weights)", ["gpu"], registry=self.registry)
        self.load_seconds = Counter(f"{PREFIX}_model_load_seconds", "time spent loading models onto a device",
                                    ["gpu"], registry=self.registry)
        self.file_loads = Counter(f"{PREFIX}_model_file_loads", "model files read from disk into the RAM cache",
                                  ["type"], registry=self.registry)
        self.file_load_seconds = Counter(f"{PREFIX}_model_file_load_seconds", "time spent reading model files",
                                         ["type"], registry=self.registry)
        for w in pool.workers:                # every GPU's series exist from the start (at 0)
            for outcome in OUTCOMES:
                self.finished.labels(str(w.gpu_id), outcome)
            self.loads.labels(str(w.gpu_id))
            self.load_seconds.labels(str(w.gpu_id))
        self.registry.register(PoolCollector(pool))
        from prometheus_client import ProcessCollector
        ProcessCollector(registry=self.registry)

    def prompt_finished(self, gpu: int, outcome: str, run_s: float, wait_s) -> None:
        self.finished.labels(str(gpu), outcome).inc()
        self.duration.labels(str(gpu)).observe(run_s)
        if wait_s is not None:
            self.wait.labels(str(gpu)).observe(wait_s)

    def device_load(self, gpu: int, seconds: float, count: int = 1) -> None:
        self.loads.labels(str(gpu)).inc(count)
        self.load_seconds.labels(str(gpu)).inc(seconds)

    def file_load(self, kind: str, seconds: float) -> None:
        self.file_loads.labels(kind).inc()
        self.file_load_seconds.labels(kind).inc(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
