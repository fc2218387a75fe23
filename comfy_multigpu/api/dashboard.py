"""Live per-GPU state for the dashboard (/multigpu/) and the web-UI panel.

- snapshot(pool): one JSON-able dict: a card per GPU (state, running prompt and its progress, pending,
  models, memory, recent throughput), totals, and the 15-minute series and runs of the charts
  (runtime/timeline.py). Also served at GET /multigpu/state.
- Live updates ride on ComfyUI's own WebSocket: a client that opens `/ws?clientId=ID&multigpu=1`
  subscribes and gets `multigpu_state` messages, at most PUSH_INTERVAL_S apart, when something
  changed (a prompt started, progressed or ended, the queue changed) and once per chart bucket; a
  push carries only the last buckets and runs (tail). Other clients, the stock web UI included,
  never see them.
- The publisher also samples queue waiting and memory into the timeline (when something changed,
  and at least once per bucket), whether or not a dashboard is open.
Host objects touched: PromptServer.instance.sockets / send (through the pool's server).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from ..runtime.timeline import ALL

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


def _lease(queue) -> "dict | None":
    """The several-GPU lease this GPU serves (sequence parallelism): prompt, its GPUs, this GPU's rank."""
    for lease in queue.leases:
        if len(lease.gpu_ids) > 1:
            return {"prompt_id": lease.prompt_id, "gpus": list(lease.gpu_ids), "rank": lease.rank_of(queue.gpu_id)}
    return None


def snapshot(pool: "WorkerPool", tail: bool = False) -> dict:
    """The cards, totals and charts (tail: only the last buckets and runs, for a push)."""
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
                      "per_minute": round(board.per_minute(w.gpu_id), 2), "restarts": w.restarts,
                      "lease": _lease(q), "held_for": q.held_for or None})
    return {"gpus": cards, "pools": {k: list(v) for k, v in pool.pools.items()},
            "totals": {"running": sum(1 for c in cards if c["running"]), "pending": sum(c["pending"] for c in cards),
                       "per_minute": round(sum(c["per_minute"] for c in cards), 2),
                       "gpus_up": sum(1 for c in cards if c["state"] != "down")},
            "draining": snap.draining, "time": time.time(),
            **board.timeline.view([w.gpu_id for w in pool.workers], tail)}


def sample(pool: "WorkerPool") -> None:
    """Queue waiting and memory now into the timeline: device memory on CUDA workers, the shared RAM
    cache on CPU workers (which share the host's RAM) and for the whole server."""
    timeline = pool.board.timeline
    snap = pool.scheduler.snapshot()
    cache = pool.weights.totals() if pool.weights is not None else None
    ram = (cache["bytes"], cache["budget_bytes"], "ram_cache") if cache else (None, None, None)
    for w, q in zip(pool.workers, snap.gpus):
        device = w.device_memory()
        timeline.sample(w.gpu_id, q.pending_count, *(ram if device is None else (*device, "device")))
    timeline.sample(ALL, snap.pending_count, *ram)


def _memory(reading) -> dict | None:
    return None if reading is None else {"used": reading[0], "total": reading[1]}


async def publisher(pool: "WorkerPool") -> None:
    """Runs on ComfyUI's event loop: samples the timeline and pushes `multigpu_state` (tail) to
    subscribers when something changed, and at least once per chart bucket."""
    board = pool.board
    warned = False
    while True:
        await asyncio.sleep(PUSH_INTERVAL_S)
        if not board.dirty and not board.timeline.due():
            continue
        board.dirty = False
        try:
            sample(pool)
        except Exception:          # never end the publisher: the next round samples again
            if not warned:
                logger.warning("comfy-multigpu: dashboard sample failed (charts miss queue and memory "
                               "figures; logged once)", exc_info=True)
            warned = True
        server = pool.server
        if not board.subscribers or server is None:
            continue
        live = {sid for sid in board.subscribers if sid in server.sockets}
        board.subscribers.intersection_update(live)
        if not live:
            continue
        try:
            state = snapshot(pool, tail=True)
            for sid in live:
                await server.send_json("multigpu_state", state, sid)
        except Exception:          # a closing socket: the next round drops it
            logger.debug("comfy-multigpu: dashboard push failed", exc_info=True)
