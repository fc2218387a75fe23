"""Fifteen minutes of per-GPU history for the dashboard's charts, in memory only: per 5-second bucket
the busy seconds (exact, from lease start and end), prompts finished, queue waiting and memory
(sampled maxima), and the prompts each GPU ran (its timeline strip). Bounded: a fixed ring of buckets
per GPU and at most MAX_RUNS runs per GPU. Host objects touched: none.
"""
from __future__ import annotations

import collections
import itertools
import math
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Optional

BUCKET_S = 5.0
BUCKETS = 180                 # 15 minutes
MAX_RUNS = 300                # per GPU
ALL = "all"                   # the row of the whole server (queue waiting, RAM cache)
TAIL_BUCKETS = 2              # what a push carries: the bucket that just ended and the current one


@dataclass(eq=False)
class Run:
    """One prompt on one or more GPUs (a lease; rank 0 first): a block on each of their strips."""
    id: int
    prompt_id: str
    gpus: tuple
    start: float                       # timeline seconds (epoch-aligned, monotonic underneath)
    model: Optional[str]
    end: Optional[float] = None        # None: still running
    outcome: Optional[str] = None      # success | error | interrupted | lost

    def public(self) -> dict:
        return {"id": self.id, "prompt_id": self.prompt_id, "gpus": list(self.gpus),
                "start": round(self.start, 3), "end": None if self.end is None else round(self.end, 3),
                "outcome": self.outcome, "model": self.model}


class Row:
    """One ring of BUCKETS buckets; a slot belongs to bucket `stamp[i]` and is cleared on reuse."""

    def __init__(self, size: int):
        self.size = size
        self.stamp = [-1] * size
        self.busy = [0.0] * size
        self.finished = [0] * size
        self.waiting: list = [None] * size
        self.memory: list = [None] * size
        self.memory_max: Optional[int] = None
        self.memory_kind: Optional[str] = None

    def slot(self, k: int) -> int:
        i = k % self.size
        if self.stamp[i] != k:
            self.stamp[i], self.busy[i], self.finished[i], self.waiting[i], self.memory[i] = k, 0.0, 0, None, None
        return i

    def get(self, field: str, k: int, default=None):
        i = k % self.size
        return getattr(self, field)[i] if self.stamp[i] == k else default


def _raise(values: list, i: int, value) -> None:
    if value is not None and (values[i] is None or value > values[i]):
        values[i] = value


class Timeline:
    """Busy time, finished prompts, sampled queue and memory per GPU bucket, and the recent runs."""

    def __init__(self, bucket_s: float = BUCKET_S, buckets: int = BUCKETS, max_runs: int = MAX_RUNS,
                 clock=time.monotonic, wall=time.time):
        self.bucket_s, self.buckets, self.max_runs = bucket_s, buckets, max_runs
        self.clock = clock
        self.offset = wall() - clock()     # timeline seconds = monotonic + offset (epoch at creation)
        self.began = self.now()
        self.lock = threading.Lock()
        self.rows: dict = {}               # gpu id or ALL -> Row
        self.runs = collections.defaultdict(lambda: collections.deque(maxlen=max_runs))  # gpu -> Runs, oldest 1st
        self.open: dict = {}               # rank-0 gpu id -> its running Run
        self.ids = itertools.count(1)
        self.sampled_k = -1                # bucket of the last sample

    def now(self) -> float:
        return self.clock() + self.offset

    def at(self, monotonic: float) -> float:
        return monotonic + self.offset

    def bucket(self, t: float) -> int:
        return math.floor(t / self.bucket_s)

    def _row(self, key) -> Row:
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = Row(self.buckets)
        return row

    # ---- writers (worker threads, the event loop) --------------------------------------------
    def started(self, gpu_ids: Iterable[int], prompt_id: str, model: Optional[str] = None,
                start: Optional[float] = None) -> Run:
        """A lease began (start: its monotonic start, default now) on gpu_ids, rank 0 first."""
        gpus = tuple(gpu_ids)
        t = self.now() if start is None else self.at(start)
        with self.lock:
            stale = self.open.pop(gpus[0], None)
            if stale is not None:           # never finished (a lease given back): ends here
                self._close(stale, t, "lost")
            run = Run(next(self.ids), prompt_id, gpus, t, model)
            self.open[gpus[0]] = run
            for g in gpus:
                self.runs[g].append(run)
        return run

    def finished(self, gpu_id: int, outcome: str, run_s: float = 0.0, prompt_id: str = "") -> None:
        """The lease run by `gpu_id` (rank 0) ended; one without a start ran the last `run_s`."""
        t = self.now()
        with self.lock:
            run = self.open.pop(gpu_id, None)
            if run is None:
                run = Run(next(self.ids), prompt_id, (gpu_id,), t - max(0.0, run_s), None)
                self.runs[gpu_id].append(run)
            self._close(run, t, outcome)

    def _close(self, run: Run, t: float, outcome: str) -> None:
        run.end, run.outcome = max(t, run.start), outcome
        first = self.bucket(t) - self.buckets + 1
        for g in run.gpus:
            row = self._row(g)
            for k, seconds in self._overlaps(run.start, run.end, first):
                row.busy[row.slot(k)] += seconds
        row = self._row(run.gpus[0])
        row.finished[row.slot(self.bucket(run.end))] += 1

    def _overlaps(self, start: float, end: float, first: int):
        """(bucket, seconds of [start, end] in it) for the buckets from `first` on."""
        for k in range(max(self.bucket(start), first), self.bucket(end) + 1):
            seconds = min(end, (k + 1) * self.bucket_s) - max(start, k * self.bucket_s)
            if seconds > 0:
                yield k, seconds

    def sample(self, key, waiting: Optional[int] = None, memory: Optional[int] = None,
               memory_max: Optional[int] = None, memory_kind: Optional[str] = None) -> None:
        """Queue waiting and memory of a GPU (or ALL) now; a bucket keeps the highest it saw."""
        k = self.bucket(self.now())
        with self.lock:
            row = self._row(key)
            i = row.slot(k)
            _raise(row.waiting, i, waiting)
            _raise(row.memory, i, memory)
            row.memory_max, row.memory_kind = memory_max, memory_kind
            self.sampled_k = k

    def due(self) -> bool:
        """No sample yet in the current bucket (the publisher samples at least once per bucket)."""
        return self.bucket(self.now()) != self.sampled_k

    # ---- reader (the event loop) ---------------------------------------------------------------
    def view(self, gpu_ids: Iterable[int], tail: bool = False) -> dict:
        """{"series", "runs"}: every bucket of the window (tail: the last TAIL_BUCKETS) and the runs
        still visible (tail: those running or ended within those buckets). Shape: docs/monitoring.md."""
        gpu_ids = list(gpu_ids)
        now = self.now()
        last = self.bucket(now)
        count = TAIL_BUCKETS if tail else self.buckets
        ks = range(last - count + 1, last + 1)
        with self.lock:
            rows = [self._series(g, ks, now) for g in gpu_ids]
            total = self._series(ALL, ks, now)
            total["busy"] = [_mean([r["busy"][j] for r in rows]) for j in range(count)]
            total["finished"] = [sum(r["finished"][j] for r in rows) for j in range(count)]
            since = ks[0] * self.bucket_s
            seen, runs = set(), []
            for g in gpu_ids:
                for run in self.runs.get(g, ()):
                    if run.id not in seen and (run.end is None or run.end >= since):
                        seen.add(run.id)
                        runs.append(run.public())
        runs.sort(key=lambda r: (r["start"], r["id"]))
        for g, row in zip(gpu_ids, rows):
            row["gpu_id"] = g
        return {"series": {"bucket_s": self.bucket_s, "start": ks[0] * self.bucket_s, "count": count,
                           "now": round(now, 3), "tail": tail, "gpus": rows, "all": total},
                "runs": runs}

    def _series(self, key, ks: range, now: float) -> dict:
        row = self.rows.get(key) or Row(self.buckets)
        busy = [row.get("busy", k, 0.0) for k in ks]
        for run in self.open.values():          # running leases count up to now
            if key in run.gpus:
                for k, seconds in self._overlaps(run.start, now, ks[0]):
                    busy[k - ks[0]] += seconds
        shares = []
        for k, seconds in zip(ks, busy):
            span = min(now, (k + 1) * self.bucket_s) - max(self.began, k * self.bucket_s)
            shares.append(None if span <= 0 else round(min(1.0, seconds / span), 3))
        return {"busy": shares, "finished": [row.get("finished", k, 0) for k in ks],
                "waiting": [row.get("waiting", k) for k in ks], "memory": [row.get("memory", k) for k in ks],
                "memory_max": row.memory_max, "memory_kind": row.memory_kind}


def _mean(values: list) -> Optional[float]:
    known = [v for v in values if v is not None]
    return round(sum(known) / len(known), 3) if known else None
