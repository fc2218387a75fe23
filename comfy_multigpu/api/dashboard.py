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
import logging
import time
from typing import TYPE_CHECKING



if TYPE_CHECKING:
    from ..runtime.pool import WorkerPool

logger = logging.getLogger("comfy_multigpu")

PUSH_INTERVAL_S = 0.25


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
    cap = pool.scheduler.limits.per_gpu
    snap = pool.scheduler.snapshot()
    cards = []
    for w, q in zip(pool.workers, snap.gpus):
        running = q.running
        progress = dict(board.progress.get(w.gpu_id, {})) or None
        if progress and running and isinstance(running[0].prompt, dict):
            node = running[0].prompt.get(str(progress.get("node")))
            progress["node_type"] = node.get("class_type") if isinstance(node, dict) else None
        cards.append({"gpu_id": w.gpu_id, "device": w.label,
                      "state": card_state(not w.down, not q.unhealthy, len(running), q.pending_count, cap),
                      "running": running[0].prompt_id if running else None,
                      "progress": progress,
                      "pending": q.pending_count, "models": list(w.recent_models())[-4:],
                      "memory": _memory(w.device_memory()),
                      "per_minute": round(board.per_minute(w.gpu_id), 2), "restarts": w.restarts})
    return {"gpus": cards, "pools": {k: list(v) for k, v in pool.pools.items()},
            "totals": {"running": sum(1 for c in cards if c["running"]), "pending": sum(c["pending"] for c in cards),
                       "per_minute": round(sum(c["per_minute"] for c in cards), 2),
                       "gpus_up": sum(1 for c in cards if c["state"] != "down")},
            "draining": snap.draining, "time": time.time()}


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
