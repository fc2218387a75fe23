"""Live per-GPU state for the dashboard (/multigpu/) and the web-UI panel.

- snapshot(pool): one JSON-able dict: a card per GPU (state, running prompt and its progress, pending,
  models, memory, recent throughput) and totals. Also served at GET /multigpu/state.
- Live updates ride on ComfyUI's own WebSocket: a client that opens `/ws?clientId=ID&multigpu=1`
  subscribes and gets `multigpu_state` messages, at most PUSH_INTERVAL_S apart and only when
  something changed (a prompt started, progressed or ended, the queue changed). Other clients,
  the stock web UI included, never see them.
Host objects touched: PromptServer.instance.sockets / send (through the pool's server).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..runtime.pool import WorkerPool

logger = logging.getLogger("comfy_multigpu")

PUSH_INTERVAL_S = 0.25
THROUGHPUT_WINDOW_S = 60.0


class Board:
    """Subscribers, the dirty flag, recent completions and live progress of each GPU."""

    def __init__(self):
        self.subscribers: set[str] = set()
        self.dirty = True
        self.finished: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self.progress: dict[int, dict] = {}       # gpu -> {"prompt_id", "node", "value", "max"}

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

    def note_finished(self, gpu: int) -> None:
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


def card_state(up: bool, healthy: bool, running: int, pending: int, cap: int) -> str:
    """down | unhealthy | idle | busy | full (full: prompts wait behind the running one, or at the cap)."""
    if not up:
        return "down"
    if not healthy:
        return "unhealthy"
    if not running and not pending:
        return "idle"
    if pending and (cap == 0 or running + pending >= cap):
        return "full"
    return "busy"


def snapshot(pool: "WorkerPool") -> dict:
    board = pool.board
    cap = pool.limits.per_gpu
    with pool.mutex:
        rows = []
        for w in pool.workers:
            running = [item[1] for item in w.running.values()]
            graphs = [item[2] for item in w.running.values()]
            rows.append((w, running, graphs, len(w.pending), not w.down, not w.unhealthy, list(w.recent_models())))
    cards = []
    for w, running, graphs, pending, up, healthy, models in rows:
        progress = dict(board.progress.get(w.gpu_id, {})) or None
        if progress and graphs and isinstance(graphs[0], dict):
            node = graphs[0].get(str(progress.get("node")))
            progress["node_type"] = node.get("class_type") if isinstance(node, dict) else None
        cards.append({"gpu_id": w.gpu_id, "device": w.label,
                      "state": card_state(up, healthy, len(running), pending, cap),
                      "running": running[0] if running else None,
                      "progress": progress,
                      "pending": pending, "models": models[-4:], "memory": _memory(w.device_memory()),
                      "per_minute": round(board.per_minute(w.gpu_id), 2), "restarts": w.restarts})
    return {"gpus": cards, "pools": {k: list(v) for k, v in pool.pools.items()},
            "totals": {"running": sum(1 for c in cards if c["running"]), "pending": sum(c["pending"] for c in cards),
                       "per_minute": round(sum(c["per_minute"] for c in cards), 2),
                       "gpus_up": sum(1 for c in cards if c["state"] != "down")},
            "draining": pool.draining, "time": time.time()}


def _memory(reading) -> dict | None:
    return None if reading is None else {"used": reading[0], "total": reading[1]}


async def publisher(pool: "WorkerPool") -> None:
    """Runs on ComfyUI's event loop: pushes `multigpu_state` to subscribers when something changed."""
    board = pool.board
    while True:
        await asyncio.sleep(PUSH_INTERVAL_S)
        if not board.dirty or not board.subscribers:
            continue
        board.dirty = False
        server = pool.server
        live = {sid for sid in board.subscribers if sid in server.sockets}
        board.subscribers.intersection_update(live)
        if not live:
            continue
        try:
            state = snapshot(pool)
            for sid in live:
                await server.send_json("multigpu_state", state, sid)
        except Exception:          # a closing socket: the next round drops it
            logger.debug("comfy-multigpu: dashboard push failed", exc_info=True)
