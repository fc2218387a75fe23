"""HTTP layer: the X-TARGET-GPU / X-GPU-POOL / X-PRIORITY middleware, our own /interrupt and
/queue/all, gpu_id in answers.

Host objects touched: PromptServer.instance.app.middlewares (appended before the app freezes) and
PromptServer.instance.routes (routes added before add_routes() also get their /api twin).
Stock handlers still serve /prompt, /queue, /free, /history, /api/jobs*; the MultiQueue they call
reads the request's target from comfy_multigpu.context.current_request.
"""
from __future__ import annotations

import json
import logging

from aiohttp import web

from . import routing
from .context import RequestScope, current_request
from .multiqueue import MultiQueue

logger = logging.getLogger("comfy_multigpu")


def _route_path(request: web.Request) -> str:
    path = request.path
    return path[4:] if path.startswith("/api/") else path


def error_json(kind: str, message: str, details: str, status: int = 400) -> web.Response:
    return web.json_response({"error": {"type": kind, "message": message, "details": details,
                                        "extra_info": {}}}, status=status)


async def post_interrupt(request: web.Request, queue: MultiQueue) -> web.Response:
    """prompt_id: only that prompt, wherever it runs; else the header's GPU; else every GPU."""
    body = await request.read()
    data = {}
    if body.strip():
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            data = {}    # stock treats an unreadable body as "no prompt_id"
    if not isinstance(data, dict):
        return error_json("invalid_body", "the /interrupt body must be a JSON object",
                          'send {} or {"prompt_id": "<id>"}')
    prompt_id = data.get("prompt_id")
    if prompt_id:
        if not isinstance(prompt_id, str):
            return error_json("invalid_prompt_id", "prompt_id must be a string", f"got {prompt_id!r}")
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


def make_middleware(queue: MultiQueue):
    pool = queue.pool
    own_handlers = {("POST", "/interrupt"): post_interrupt}

    @web.middleware
    async def multigpu_middleware(request: web.Request, handler):
        method, path = request.method, _route_path(request)
        placing = (method, path) == ("POST", "/prompt")
        down = frozenset(w.gpu_id for w in pool.workers if w.down) if placing else frozenset()
        try:
            target = routing.parse_target(request.headers.get(routing.HEADER), len(pool), down)
            headers = _prompt_headers(request, pool.pools) if placing else {}
        except routing.RequestError as ex:
            return web.json_response(ex.as_json(), status=400)
        scope = RequestScope(target=target, headers=headers)
        token = current_request.set(scope)
        try:
            own = own_handlers.get((method, path))
            if own is not None:
                return await own(request, queue)
            try:
                response = await handler(request)
            except routing.RequestError as ex:      # from MultiQueue.put: extra_data or a conflict
                return web.json_response(ex.as_json(), status=400)
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
    @routes.get("/queue/all")
    async def get_queue_all(request: web.Request) -> web.Response:
        counts = request.rel_url.query.get("counts", "0").lower() in ("1", "true", "yes")
        return web.json_response(queue.all_queues(counts_only=counts))
