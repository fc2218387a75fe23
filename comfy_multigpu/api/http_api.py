"""HTTP layer: the X-TARGET-GPU / X-GPU-POOL / X-PRIORITY middleware, our own /interrupt and
/queue/all, gpu_id in answers.

Host objects touched: PromptServer.instance.app.middlewares (appended before the app freezes) and
PromptServer.instance.routes (routes added before add_routes() also get their /api twin).
Stock handlers still serve /prompt, /queue, /free, /history, /api/jobs*; the MultiQueue they call
reads the request's target from comfy_multigpu.runtime.context.current_request.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ..policy import admission, errors, routing
from . import dashboard
from ..runtime import preload
from ..runtime.context import RequestScope, current_request
from ..policy.errors import ApiError
from ..host.prompt_queue import DuplicatePrompt, MultiQueue

logger = logging.getLogger("comfy_multigpu")


def _route_path(request: web.Request) -> str:
    path = request.path
    return path[4:] if path.startswith("/api/") else path


def error_response(err: ApiError, route: str = "") -> web.Response:
    return web.json_response(err.body(route), status=err.status, headers=err.headers)


async def post_interrupt(request: web.Request, queue: MultiQueue, data: dict) -> web.Response:
    """prompt_id: only that prompt, wherever it runs; else the header's GPU; else every GPU."""
    prompt_id = data.get("prompt_id")
    if prompt_id:
        hit = queue.interrupt_if_running(prompt_id)
        logger.info("Interrupt %s: %s", prompt_id, "sent" if hit else "not running, skipped")
    else:
        gpus = queue.interrupt_scope()
        logger.info("Interrupt of GPU(s) %s", gpus)
    return web.Response(status=200)


def _amended(response: web.StreamResponse, **fields) -> web.StreamResponse:
    """A 200 JSON object answer with `fields` added (None values left out)."""
    if not isinstance(response, web.Response) or response.body is None or response.status != 200:
        return response
    try:
        data = json.loads(response.body)
    except ValueError:
        return response
    if not isinstance(data, dict):
        return response
    data.update({k: v for k, v in fields.items() if v is not None})
    return web.json_response(data, status=response.status)


def _prompt_headers(request: web.Request, pools) -> dict:
    """X-GPU-POOL and X-PRIORITY of a POST /prompt, checked now so that a bad one is refused before
    the body is read; raises routing.RequestError."""
    headers = {name: request.headers.get(name) for name in (routing.POOL_HEADER, routing.PRIORITY_HEADER)}
    routing.parse_pool(headers[routing.POOL_HEADER], routing.POOL_HEADER, pools)
    routing.parse_priority(headers[routing.PRIORITY_HEADER], routing.PRIORITY_HEADER)
    return headers


# Malformed input the stock handlers would answer with 500 (a TypeError deep in a handler); on the
# routes whose bodies we check, what still slips through is the client's mistake, answered 400.
DASHBOARD_HTML = Path(__file__).resolve().parent / "web" / "dashboard.html"
PRELOAD_WAIT_S = 600.0     # longest POST /preload waits for busy GPUs (then it answers "queued")

CLIENT_FAULTS = (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError)


def make_middleware(queue: MultiQueue):
    pool = queue.pool
    own_handlers = {("POST", "/interrupt"): post_interrupt}

    @web.middleware
    async def multigpu_middleware(request: web.Request, handler):
        method, path = request.method, _route_path(request)
        placing = (method, path) == ("POST", "/prompt")
        check = errors.BODY_CHECKS.get(path) if method == "POST" else None
        data: dict = {}
        try:
            down = frozenset(w.gpu_id for w in pool.workers if w.down) if placing else frozenset()
            target = routing.parse_target(request.headers.get(routing.HEADER), len(pool), down)
            headers = _prompt_headers(request, pool.pools) if placing else {}
            if placing and pool.draining:
                raise admission.draining_refusal(pool.mean_run_s)
            if check is not None:
                checker, empty_ok = check
                data = errors.parse_json_object(await request.read(), path, empty_ok)
                checker(data)
                if placing and isinstance(data.get("prompt_id"), str):
                    known = pool.locate(data["prompt_id"])
                    if known is not None:
                        return web.json_response(DuplicatePrompt(data["prompt_id"], *known).answer())
        except routing.RequestError as ex:
            return web.json_response(ex.as_json(), status=400)
        except ApiError as ex:
            return error_response(ex, path)
        scope = RequestScope(target=target, headers=headers,
                             dashboard=path == "/ws" and request.rel_url.query.get("multigpu") == "1")
        token = current_request.set(scope)
        try:
            own = own_handlers.get((method, path))
            if own is not None:
                return await own(request, queue, data)
            try:
                response = await handler(request)
            except routing.RequestError as ex:      # from MultiQueue.put: extra_data or a conflict
                return web.json_response(ex.as_json(), status=400)
            except ApiError as ex:                  # from MultiQueue.put: over a cap, draining, journal
                return error_response(ex, path)
            except DuplicatePrompt as ex:           # the same prompt_id sent twice at once
                return web.json_response(ex.answer())
            except CLIENT_FAULTS as ex:
                if check is None:
                    raise
                logger.warning("%s %s: malformed input made the handler fail (%s: %s)", method, path,
                               type(ex).__name__, ex, exc_info=True)
                return error_response(errors.bad_request(
                    "invalid_request", f"{path}: the request could not be processed: {type(ex).__name__}",
                    "check the body against the API documentation (docs/api.md)"), path)
            if placing and scope.placed_gpu is not None:
                return _amended(response, gpu_id=scope.placed_gpu, number=scope.placed_number,
                                gpu_pool=scope.placed_pool)
            if (method, path) == ("GET", "/queue") and target is not None:
                return _amended(response, gpu_id=target)
            return response
        finally:
            current_request.reset(token)

    return multigpu_middleware


def add_routes(routes: web.RouteTableDef, queue: MultiQueue) -> None:
    pool = queue.pool

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
        return web.json_response({"status": "draining" if pool.draining else "ok",
                                  "workers": len(pool), "workers_up": sum(1 for w in pool.workers if not w.down)})

    @routes.get("/multigpu/ready")
    async def get_ready(request: web.Request) -> web.Response:
        """Readiness: 200 if some GPU can take work, else 503 (also while draining); per-GPU detail."""
        with pool.mutex:
            gpus = [{"gpu_id": w.gpu_id, "up": not w.down, "healthy": not w.unhealthy,
                     "ready": (not w.down and not w.unhealthy and not pool.draining),
                     "reason": ("draining" if pool.draining else "down" if w.down else w.unhealthy or ""),
                     "running": len(w.running), "pending": len(w.pending), "restarts": w.restarts}
                    for w in pool.workers]
        ready = any(g["ready"] for g in gpus)
        return web.json_response({"ready": ready, "draining": pool.draining, "gpus": gpus},
                                 status=200 if ready else 503)

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
        kind, name = data.get("type", "checkpoint"), data["model"]
        try:
            if pool.weights is None:
                raise errors.ApiError(409, "sharing_off", "/preload needs the shared RAM cache, which is off",
                                      "unset COMFY_MULTIGPU_RAM_CACHE (or give it a size) and restart")
            preload.check_file(kind, name)
            gpus = preload.check_gpus(data.get("gpus", []), pool)
        except errors.ApiError as ex:
            return error_response(ex, "/preload")
        started = time.perf_counter()
        try:
            await asyncio.to_thread(preload.load, kind, name)
        except Exception as ex:
            logger.warning("/preload: %s %s could not be loaded", kind, name, exc_info=True)
            return error_response(errors.ApiError(422, "load_failed", f"/preload: {kind} {name!r} could not be "
                                                  f"loaded: {type(ex).__name__}: {ex}"[:500],
                                                  "check the file (the server log has the details)"), "/preload")
        ram_s = time.perf_counter() - started
        requests = {g: preload.Request(kind, name) for g in gpus}
        for gpu, req in requests.items():
            pool.request_preload(gpu, req)
        if requests and data.get("wait", True):
            await asyncio.wait([asyncio.wrap_future(r.done) for r in requests.values()], timeout=PRELOAD_WAIT_S)
        states = {}
        for gpu, req in requests.items():
            if not req.done.done():
                states[str(gpu)] = "queued"
            elif req.done.exception() is not None:
                ex = req.done.exception()
                states[str(gpu)] = f"failed: {type(ex).__name__}: {ex}"[:300]
            else:
                states[str(gpu)] = req.done.result()
        return web.json_response({"model": name, "type": kind, "ram": "loaded", "ram_seconds": round(ram_s, 3),
                                  "gpus": states, "seconds": round(time.perf_counter() - started, 3)})
