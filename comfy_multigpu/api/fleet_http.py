"""The HTTP side of a fleet member: /view of a file another machine holds (streamed from it, byte for
byte), uploads noted so that any machine can fetch them (the door before it validates a prompt, the
machine that runs it before it runs), and /multigpu/fleet (machines, lanes, leases, counters). Host objects touched: none (stock handlers answer first; see middleware.py).
"""
from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
from aiohttp import web

from ..fleet.files import view_owner
from ..fleet.store import ERRORS

logger = logging.getLogger("comfy_multigpu")

PROXIED_HEADERS = ("Content-Type", "Content-Disposition", "Content-Length", "Cache-Control")


async def before_stock(request: web.Request, path: str, data: dict, fleet):
    """Before the stock handler: GET /view of a file the fleet's index says another machine made is
    streamed from it (this machine may hold an older file of the same name); POST /prompt fetches the
    inputs uploaded at another machine, since the stock handler validates that each file exists here.
    Returns the answer to give instead of the stock one, or None."""
    if request.method == "GET" and path == "/view":
        return await proxy_view(request, fleet)
    if request.method != "POST" or path != "/prompt" or not isinstance(data.get("prompt"), dict):
        return None
    try:
        await asyncio.to_thread(fleet.inputs.fetch_for, data["prompt"])
    except Exception as ex:          # validation then names the missing file, as stock does
        logger.warning("Fleet: could not fetch the inputs of a prompt before validating it: %s", ex)
    return None


async def after_stock(request: web.Request, path: str, response: web.StreamResponse, fleet) -> web.StreamResponse:
    """What a fleet adds to a stock answer: an upload noted."""
    if request.method == "POST" and path in ("/upload/image", "/upload/mask") and response.status == 200:
        try:
            answer = json.loads(response.body)
            await asyncio.to_thread(fleet.inputs.note_upload, answer)
        except (ValueError, TypeError, AttributeError):
            pass
        except ERRORS as ex:
            logger.warning("Fleet: upload kept on this machine only, not noted in Redis (%s)", ex)
    return response


async def proxy_view(request: web.Request, fleet):
    """The file from the machine the fleet's index names, or None."""
    try:
        owner = await asyncio.to_thread(view_owner, fleet.store, request.rel_url.query)
        url = (await asyncio.to_thread(fleet.store.machines)).get(owner, {}).get("url") if owner else None
    except ERRORS:
        return None
    if not url:
        return None
    target = f"{url}/view?{request.rel_url.query_string}"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(target, headers={"X-Fleet-Proxy": fleet.settings.node}) as upstream:
                if upstream.status != 200:
                    return None
                response = web.StreamResponse(status=200, headers={
                    h: upstream.headers[h] for h in PROXIED_HEADERS if h in upstream.headers})
                response.headers["X-Fleet-Node"] = owner
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(1 << 16):
                    await response.write(chunk)
                await response.write_eof()
                return response
    except (aiohttp.ClientError, asyncio.TimeoutError) as ex:
        logger.warning("Fleet: /view of %s from machine %s failed: %s", request.rel_url.query.get("filename"),
                       owner, ex)
        return None


def add_routes(routes: web.RouteTableDef, pool) -> None:
    @routes.get("/multigpu/fleet")
    async def get_fleet(request: web.Request) -> web.Response:
        """The fleet: machines and their GPUs, lane backlogs, leases, counters; 404 outside a fleet."""
        if pool.fleet is None:
            return web.json_response({"error": {"type": "not_a_fleet", "message": "this server is not a fleet "
                                                "member", "details": "set COMFY_MULTIGPU_FLEET (docs/fleet.md)"}},
                                     status=404)
        return web.json_response(await asyncio.to_thread(pool.fleet.status))
