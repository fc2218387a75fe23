"""Our HTTP routes: /queue/all, health and readiness, /metrics, the dashboard page and its state,
/multigpu/models, POST /preload, and OVERRIDES, the stock routes we answer ourselves (POST /interrupt:
one prompt by id, one GPU, or all). Host objects touched: PromptServer.instance.routes (routes added
before its add_routes() also get their /api twin, through activation).
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ..policy import errors
from ..runtime import preload
from . import dashboard, fleet_http
from .middleware import error_response

if TYPE_CHECKING:
    from ..host.prompt_queue import MultiQueue

logger = logging.getLogger("comfy_multigpu")

DASHBOARD_HTML = Path(__file__).resolve().parent.parent / "web" / "dashboard.html"


async def post_interrupt(request: web.Request, queue, data: dict) -> web.Response:
    """prompt_id: only that prompt, wherever it runs; else the header's GPU; else every GPU."""
    prompt_id = data.get("prompt_id")
    if prompt_id:
        hit = queue.interrupt_if_running(prompt_id)
        logger.info("Interrupt %s: %s", prompt_id, "sent" if hit else "not running, skipped")
    else:
        gpus = queue.interrupt_scope()
        logger.info("Interrupt of GPU(s) %s", gpus)
    return web.Response(status=200)


# Stock routes whose answer is ours: (method, path without /api) -> handler(request, queue, checked body).
OVERRIDES = {("POST", "/interrupt"): post_interrupt}


def add_routes(routes: web.RouteTableDef, queue: MultiQueue) -> None:
    pool = queue.pool
    fleet_http.add_routes(routes, pool)

    @routes.get("/queue/all")
    async def get_queue_all(request: web.Request) -> web.Response:
        raw = request.rel_url.query.get("counts", "0").lower()
        if raw not in ("0", "1", "true", "false", "yes", "no", ""):
            return error_response(errors.bad_request("invalid_query", f"counts={raw!r} is not a boolean",
                                                     "counts=1 (counts only) or counts=0"))
        return web.json_response(queue.all_queues(counts_only=raw in ("1", "true", "yes")))

    @routes.get("/multigpu/health")
    async def get_health(request: web.Request) -> web.Response:
        """Liveness: the process and its event loop answer."""
        answer = {"status": "draining" if pool.draining else "ok",
                  "workers": len(pool), "workers_up": sum(1 for w in pool.workers if not w.down)}
        if pool.fleet is not None:
            answer["fleet"] = {"node": pool.fleet.settings.node, "redis_reachable": pool.fleet.reachable}
        return web.json_response(answer)

    @routes.get("/multigpu/ready")
    async def get_ready(request: web.Request) -> web.Response:
        """Readiness: 200 if some GPU can take work, else 503 (also while draining); per-GPU detail."""
        snap = pool.scheduler.snapshot()
        gpus = [{"gpu_id": w.gpu_id, "up": not w.down, "healthy": not q.unhealthy,
                 "ready": (not w.down and not q.unhealthy and not snap.draining),
                 "reason": ("draining" if snap.draining else "down" if w.down else q.unhealthy or ""),
                 "running": len(q.running), "pending": q.pending_count, "restarts": w.restarts}
                for w, q in zip(pool.workers, snap.gpus)]
        ready = any(g["ready"] for g in gpus)
        answer = {"ready": ready, "draining": snap.draining, "gpus": gpus}
        if pool.fleet is not None:      # a member that cannot reach the queue can take no work
            reachable = await asyncio.to_thread(pool.fleet.store.ping)
            answer["fleet"] = {"node": pool.fleet.settings.node, "redis_reachable": reachable}
            if not reachable:
                answer["ready"] = ready = False
                answer["reason"] = "the fleet queue (Redis) cannot be reached"
        return web.json_response(answer, status=200 if ready else 503)

    @routes.get("/metrics")
    async def get_metrics(request: web.Request) -> web.Response:
        """Prometheus text format (docs/monitoring.md lists every series)."""
        body = await asyncio.to_thread(pool.metrics.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    @routes.get("/multigpu/state")
    async def get_state(request: web.Request) -> web.Response:
        """The dashboard's per-GPU cards as JSON (the same object `multigpu_state` pushes carry)."""
        return web.json_response(dashboard.snapshot(pool))

    @routes.get("/multigpu")
    async def get_dashboard_redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/multigpu/")

    @routes.get("/multigpu/")
    async def get_dashboard(request: web.Request) -> web.Response:
        """The live dashboard: a card per GPU, updated over the WebSocket."""
        return web.FileResponse(DASHBOARD_HTML, headers={"Cache-Control": "no-cache"})

    @routes.get("/multigpu/models")
    async def get_models(request: web.Request) -> web.Response:
        """The shared RAM cache: every file in it (bytes, users, last use) and the GPUs that have it loaded."""
        if pool.weights is None:
            return web.json_response({"sharing": False, "ram_cache": None, "models": []})
        return web.json_response(await asyncio.to_thread(pool.weights.listing, pool.models_on_devices))

    @routes.post("/preload")
    async def post_preload(request: web.Request) -> web.Response:
        """{"model", "type", "gpus", "wait"}: into the RAM cache, then onto the listed GPUs' devices."""
        data = errors.parse_json_object(await request.read(), "/preload")     # checked by the middleware
        try:
            answer = await preload.preload(pool, data.get("type", "checkpoint"), data["model"],
                                           data.get("gpus", []), data.get("wait", True))
        except errors.ApiError as ex:
            return error_response(ex, "/preload")
        return web.json_response(answer)
