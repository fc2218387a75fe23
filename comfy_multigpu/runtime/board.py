"""Live per-GPU facts for the dashboard: subscribed sockets, a dirty flag, recent completions, each
GPU's current progress (fed by the WebSocket events workers send) and the 15-minute timeline of its
charts (timeline.py). Host objects touched: none.
"""
from __future__ import annotations

import collections
import time

from .timeline import Timeline

THROUGHPUT_WINDOW_S = 60.0


class Board:
    """Subscribers, the dirty flag, recent completions and live progress of each GPU."""

    def __init__(self):
        self.subscribers: set[str] = set()
        self.dirty = True
        self.finished: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self.progress: dict[int, dict] = {}       # gpu -> {"prompt_id", "node", "value", "max"}
        self.timeline = Timeline()                # charts and strips: busy, finished, waiting, memory, runs

    def touch(self) -> None:
        self.dirty = True                         # plain store: safe from any thread

    def note_event(self, gpu: int, event: str, data) -> None:
        """A worker's WebSocket event (progress / executing): keep what the cards show."""
        if not isinstance(data, dict):
            return
        if event == "executing":
            if data.get("node") is None:
                self.progress.pop(gpu, None)
            else:
                self.progress[gpu] = {"prompt_id": data.get("prompt_id"), "node": data.get("node"),
                                      "value": 0, "max": 0}
        elif event == "progress":
            self.progress[gpu] = {"prompt_id": data.get("prompt_id"), "node": data.get("node"),
                                  "value": data.get("value", 0), "max": data.get("max", 0)}
        self.touch()

    def note_started(self, lease) -> None:
        """A lease (runtime/prompt.py) began on its GPUs: a block on their strips from lease.started."""
        models = sorted(lease.prompt.models)
        self.timeline.started(lease.gpu_ids, lease.prompt_id, models[0] if models else None, lease.started)
        self.touch()

    def note_finished(self, gpu: int, outcome: str = "success", run_s: float = 0.0) -> None:
        """The lease `gpu` ran (as rank 0) ended: per-minute count, its block on the strips closes."""
        self.timeline.finished(gpu, outcome, run_s)
        now = time.monotonic()
        done = self.finished[gpu]
        done.append(now)
        while done and now - done[0] > THROUGHPUT_WINDOW_S:
            done.popleft()
        self.progress.pop(gpu, None)
        self.touch()

    def per_minute(self, gpu: int) -> float:
        now = time.monotonic()
        done = self.finished.get(gpu, ())
        return sum(1 for t in done if now - t <= THROUGHPUT_WINDOW_S) * 60.0 / THROUGHPUT_WINDOW_S
