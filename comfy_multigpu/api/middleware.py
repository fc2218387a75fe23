"""The HTTP middleware: every request gets its routing scope (api/scope.py) in the context variable
the queue reads; bodies of the routes we check are checked first (policy/errors.py); the overrides
api/routes.py declares replace a stock handler; POST /prompt answers say where the prompt went.

Host objects touched: PromptServer.instance.app.middlewares (appended by activation before the app
freezes). Stock handlers still serve /prompt, /queue, /free, /history, /api/jobs*; the MultiQueue they
call reads the request's target from runtime.context.current_request.
"""
from __future__ import annotations

import json
import logging
from typing import Awaitable, Callable, Mapping

from aiohttp import web

from ..policy import errors, routing
from ..policy.errors import ApiError
from ..runtime.context import current_request
from ..runtime.scheduler import DuplicatePrompt
from . import fleet_http
from .scope import read_scope, route_path

logger = logging.getLogger("comfy_multigpu")

# Malformed input the stock handlers would answer with 500 (a TypeError deep in a handler); on the
# routes whose bodies we check, what still slips through is the client's mistake, answered 400.
CLIENT_FAULTS = (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError)

Override = Callable[[web.Request, object, dict], Awaitable[web.StreamResponse]]


def error_response(err: ApiError, route: str = "") -> web.Response:
    return web.json_response(err.body(route), status=err.status, headers=err.headers)


def amended(response: web.StreamResponse, **fields) -> web.StreamResponse:
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


async def checked_body(request: web.Request, path: str, pool) -> tuple[dict, dict | None]:
    """The JSON body of a route whose body we check (else {}), and for a POST /prompt whose prompt_id
    is already known, the answer to give instead (an idempotent retry). Raises ApiError."""
    check = errors.BODY_CHECKS.get(path) if request.method == "POST" else None
    if check is None:
        return {}, None
    checker, empty_ok = check
    data = errors.parse_json_object(await request.read(), path, empty_ok)
    checker(data)
    if path == "/prompt" and isinstance(data.get("prompt_id"), str):
        known = pool.scheduler.locate(data["prompt_id"])
        if known is not None:
            return data, DuplicatePrompt(data["prompt_id"], *known).answer()
    return data, None


def make_middleware(queue, overrides: Mapping[tuple, Override]):
    """`overrides`: (method, path) -> handler(request, queue, checked body) used instead of ComfyUI's."""
    pool = queue.pool

    @web.middleware
    async def multigpu_middleware(request: web.Request, handler):
        method, path = request.method, route_path(request)
        placing = (method, path) == ("POST", "/prompt")
        try:
            scope = read_scope(request, pool, placing)
            data, duplicate = await checked_body(request, path, pool)
        except routing.RequestError as ex:
            return web.json_response(ex.as_json(), status=400)
        except ApiError as ex:
            return error_response(ex, path)
        if duplicate is not None:
            return web.json_response(duplicate)
        scope.body = data
        token = current_request.set(scope)
        try:
            override = overrides.get((method, path))
            if override is not None:
                return await override(request, queue, data)
            if pool.fleet is not None:
                instead = await fleet_http.before_stock(request, path, data, pool.fleet)
                if instead is not None:
                    return instead
            response = await _stock(request, handler, method, path)
            if pool.fleet is not None:
                response = await fleet_http.after_stock(request, path, response, pool.fleet)
            if placing and (scope.placed_gpu is not None or scope.placed_fleet is not None):
                return amended(response, gpu_id=scope.placed_gpu, number=scope.placed_number,
                               gpu_pool=scope.placed_pool, fleet=scope.placed_fleet)
            if (method, path) == ("GET", "/queue") and scope.target is not None:
                return amended(response, gpu_id=scope.target)
            return response
        finally:
            current_request.reset(token)

    return multigpu_middleware


async def _stock(request: web.Request, handler, method: str, path: str) -> web.StreamResponse:
    """ComfyUI's own handler, with what our queue raises through it answered as JSON errors."""
    try:
        return await handler(request)
    except routing.RequestError as ex:      # from MultiQueue.put: extra_data or a conflict
        return web.json_response(ex.as_json(), status=400)
    except ApiError as ex:                  # from MultiQueue.put: over a cap, draining, journal
        return error_response(ex, path)
    except DuplicatePrompt as ex:           # the same prompt_id sent twice at once
        return web.json_response(ex.answer())
    except CLIENT_FAULTS as ex:
        if method != "POST" or path not in errors.BODY_CHECKS:
            raise
        logger.warning("%s %s: malformed input made the handler fail (%s: %s)", method, path,
                       type(ex).__name__, ex, exc_info=True)
        return error_response(errors.bad_request(
            "invalid_request", f"{path}: the request could not be processed: {type(ex).__name__}",
            "check the body against the API documentation (docs/api.md)"), path)
