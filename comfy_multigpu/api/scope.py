"""Reading a request's routing scope: X-TARGET-GPU (every route), and for POST /prompt X-GPU-POOL,
X-PRIORITY and X-SEQUENCE-PARALLEL, checked before the body is read. Pure over the request's headers and the pool's state.
Host objects touched: none.
"""
from __future__ import annotations

from aiohttp import web

from ..policy import admission, fleet_lanes, routing
from ..runtime.context import RequestScope


def route_path(request: web.Request) -> str:
    """The route without ComfyUI's /api prefix (both forms reach the same handler)."""
    path = request.path
    return path[4:] if path.startswith("/api/") else path


def prompt_headers(request: web.Request, pools) -> dict:
    """X-GPU-POOL and X-PRIORITY of a POST /prompt, checked now so that a bad one is refused before
    the body is read; raises routing.RequestError."""
    names = (routing.POOL_HEADER, routing.PRIORITY_HEADER, routing.SEQUENCE_PARALLEL_HEADER)
    headers = {name: request.headers.get(name) for name in names}
    routing.parse_pool(headers[routing.POOL_HEADER], routing.POOL_HEADER, pools)
    routing.parse_priority(headers[routing.PRIORITY_HEADER], routing.PRIORITY_HEADER)
    routing.parse_sequence_parallel(headers[routing.SEQUENCE_PARALLEL_HEADER])
    return headers


def read_scope(request: web.Request, pool, placing: bool) -> RequestScope:
    """The request's RequestScope; raises routing.RequestError (400) for a bad header, ApiError (503)
    for a prompt sent while the server drains."""
    down = frozenset(w.gpu_id for w in pool.workers if w.down) if placing else frozenset()
    node, remote_gpu = (fleet_target(request, pool) if placing and pool.fleet is not None else (None, None))
    raw_gpu = request.headers.get(routing.HEADER)
    target = routing.parse_target(raw_gpu if node is None or node == pool.fleet.settings.node else None,
                                  len(pool), down)
    headers = prompt_headers(request, pool.pools) if placing else {}
    if placing and pool.fleet is not None:
        headers["Idempotency-Key"] = (request.headers.get("Idempotency-Key") or "").strip()[:200]
    if placing and pool.draining:
        raise admission.draining_refusal(pool.scheduler.mean_run_s)
    dashboard = route_path(request) == "/ws" and request.rel_url.query.get("multigpu") == "1"
    return RequestScope(target=target, headers=headers, dashboard=dashboard, node=node, remote_gpu=remote_gpu)


def fleet_target(request: web.Request, pool) -> tuple:
    """X-TARGET-NODE (and X-TARGET-GPU meaning a GPU of that machine, when it is another one) of a
    fleet member's POST /prompt; the GPU is checked against what that machine registered."""
    fleet = pool.fleet
    node = fleet_lanes.parse_target_node(request.headers.get(fleet_lanes.NODE_HEADER),
                                         fleet.known_machines())
    raw = request.headers.get(routing.HEADER)
    if node is None or node == fleet.settings.node or raw is None:
        return node, None
    gpus = fleet.known_machines().get(node, {}).get("gpus")
    count = len(gpus) if gpus is not None else 1 << 16
    gpu = routing.parse_target(raw, count)
    if gpus is not None and gpu is None:
        return node, None
    return node, gpu
