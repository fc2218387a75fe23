"""The balancer's HTTP and WebSocket handlers: the seed API (/generate, /status, /health, /instances) and the
stock ComfyUI API passed through (prompts placed by queue, history/view/interrupt routed to the backend
that ran the prompt, queues merged, uploads copied to every backend, /ws bridged to every backend)."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque

import aiohttp
from aiohttp import web

from ..policy.errors import ApiError, parse_json_object
from .dispatch import Balancer

logger = logging.getLogger("comfy_multigpu.balancer")

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length", "authorization"}


def error(status: int, kind: str, message: str, details: str = "") -> web.Response:
    return web.json_response(ApiError(status, kind, message, details).body(), status=status)


class Routes:
    """The request handlers; all state is the Balancer's."""

    def __init__(self, balancer: Balancer):
        self.balancer = balancer

    async def post_prompt(self, request: web.Request) -> web.Response:
        try:
            body = parse_json_object(await request.read(), "/prompt")
        except ApiError as ex:
            return web.json_response(ex.body("/prompt"), status=ex.status)
        status, answer = await self.balancer.submit(body)
        return web.json_response(answer, status=status)

    async def post_generate(self, request: web.Request) -> web.Response:
        """Seed API: {"workflow", "client_id", "wait_for_completion", "timeout"}."""
        try:
            body = parse_json_object(await request.read(), "/generate")
        except ApiError as ex:
            return web.json_response(ex.body(), status=ex.status)
        if not isinstance(body.get("workflow"), dict):
            return error(400, "invalid_workflow", "'workflow' (an API-format workflow object) is required")
        prompt_body = {"prompt": body["workflow"]}
        for key in ("client_id", "prompt_id", "extra_data"):
            if key in body:
                prompt_body[key] = body[key]
        status, answer = await self.balancer.submit(prompt_body)
        if status != 200:
            return web.json_response(answer, status=status)
        result = {"prompt_id": answer["prompt_id"], "assigned_instance": answer["instance"],
                  "assigned_gpu": answer.get("gpu_id"),
                  "message": "held until a GPU is free" if answer.get("held") else "queued"}
        if body.get("wait_for_completion"):
            timeout = float(body.get("timeout", 300))
            entry = await self.balancer.wait_history(answer["prompt_id"], timeout)
            if entry is None:
                result["message"] = f"not finished within {timeout:g} s"
                return web.json_response(result, status=504)
            result.update(message="completed", status=entry.get("status"), outputs=entry.get("outputs"),
                          assigned_instance=self.balancer.owners.get(answer["prompt_id"]))
        return web.json_response(result)

    async def get_health(self, request: web.Request) -> web.Response:
        healthy = len(self.balancer.healthy())
        return web.json_response({"status": "ok" if healthy else "down", "healthy": healthy,
                                  "backends": len(self.balancer.backends)}, status=200 if healthy else 503)

    async def get_status(self, request: web.Request) -> web.Response:
        balancer = self.balancer
        slots = balancer.slots()
        return web.json_response({
            "backends": [b.describe() for b in balancer.backends], "poll_interval": balancer.settings.poll_interval,
            "healthy": len(balancer.healthy()), "uptime_s": round(time.time() - balancer.started, 1),
            "held": len(balancer.held), "depth": balancer.settings.depth,
            "total_running": sum(s.running for s in slots), "total_pending": sum(s.pending for s in slots)})

    async def get_instances(self, request: web.Request) -> web.Response:
        return web.json_response([b.describe() for b in self.balancer.backends])

    async def get_queue(self, request: web.Request) -> web.Response:
        running, pending = [], []
        for _backend, result in await self.balancer.fan_out("GET", "/queue"):
            if isinstance(result, tuple) and result[0] == 200:
                data = json.loads(result[2])
                running += data.get("queue_running", [])
                pending += data.get("queue_pending", [])
        pending.sort(key=lambda item: (item[0], item[1]) if isinstance(item, list) and len(item) > 1 else (0, ""))
        pending += [[h.number, h.prompt_id, h.body.get("prompt"), h.body.get("extra_data", {}), []]
                    for h in self.balancer.held]
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def post_to_all(self, request: web.Request) -> web.Response:
        """/queue (clear/delete), /history (clear/delete), /free: every backend (and the held prompts)."""
        body = await request.read()
        path = request.path[4:] if request.path.startswith("/api/") else request.path
        if path == "/queue":
            try:
                data = json.loads(body) if body.strip() else {}
            except ValueError:
                return error(400, "invalid_json", "the /queue body must be a JSON object")
            if isinstance(data, dict) and data.get("clear"):
                self.balancer.held.clear()
            if isinstance(data, dict) and isinstance(data.get("delete"), list):
                gone = set(data["delete"])
                self.balancer.held = deque(h for h in self.balancer.held if h.prompt_id not in gone)
        await self.balancer.fan_out("POST", path, data=body, headers={"Content-Type": "application/json"})
        return web.Response(status=200)

    async def post_interrupt(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            prompt_id = parse_json_object(body, "/interrupt", empty_ok=True).get("prompt_id")
        except ApiError as ex:
            return web.json_response(ex.body(), status=ex.status)
        backend = self.balancer.owner(prompt_id) if isinstance(prompt_id, str) else None
        headers = {"Content-Type": "application/json"}
        if backend is not None:
            await self.balancer.call(backend, "POST", "/interrupt", data=body, headers=headers)
        else:
            await self.balancer.fan_out("POST", "/interrupt", data=body, headers=headers)
        return web.Response(status=200)

    async def get_history(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info.get("prompt_id")
        if prompt_id in self.balancer.failed:
            return web.json_response({prompt_id: self.balancer.failed[prompt_id]})
        if prompt_id:
            backend = self.balancer.owner(prompt_id)
            candidates = [backend] if backend is not None else self.balancer.healthy()
            for b in candidates:
                try:
                    status, _, raw = await self.balancer.call(b, "GET", f"/history/{prompt_id}")
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    continue
                data = json.loads(raw) if status == 200 else {}
                if prompt_id in data:
                    data[prompt_id]["instance"] = b.name
                    self.balancer.remember_outputs(data[prompt_id].get("outputs"), b)
                    return web.json_response(data)
            return web.json_response({})
        merged = {}
        for backend, result in await self.balancer.fan_out("GET", "/history" + (f"?{request.query_string}"
                                                                                  if request.query_string else "")):
            if isinstance(result, tuple) and result[0] == 200:
                for pid, entry in json.loads(result[2]).items():
                    entry["instance"] = backend.name
                    self.balancer.remember_outputs(entry.get("outputs"), backend)
                    merged[pid] = entry
        return web.json_response(merged)

    async def get_view(self, request: web.Request) -> web.StreamResponse:
        """Output files live on the backend that made them: the one that reported the file (in an
        `executed` event or a history entry), else the first backend that has it."""
        path = "/view?" + request.query_string
        q = request.query
        known = self.balancer.by_name.get(self.balancer.files.get((q.get("type", "output"), q.get("subfolder", ""),
                                                                   q.get("filename", ""))), None)
        ordered = ([known] if known is not None and known.healthy else []) + \
            [b for b in self.balancer.healthy() if b is not known]
        for backend in ordered:
            try:
                status, headers, raw = await self.balancer.call(backend, "GET", path)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                continue
            if status == 200:
                return web.Response(body=raw, status=200, content_type=headers.get("Content-Type",
                                                                                      "application/octet-stream"))
        return error(404, "not_found", "no backend has that file", request.query_string)

    async def post_upload(self, request: web.Request) -> web.Response:
        """Uploads go to every healthy backend (whichever runs the prompt finds the file)."""
        body = await request.read()
        path = request.path[4:] if request.path.startswith("/api/") else request.path
        headers = {"Content-Type": request.headers.get("Content-Type", "")}
        results = await self.balancer.fan_out("POST", path, data=body, headers=headers)
        good = [r for _, r in results if isinstance(r, tuple) and r[0] == 200]
        if not good:
            bad = next((r for _, r in results if isinstance(r, tuple)), None)
            if bad is not None:
                return web.Response(body=bad[2], status=bad[0], content_type="application/json")
            return error(503, "no_backend", "no healthy backend took the upload")
        return web.Response(body=good[0][2], status=200, content_type="application/json")

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        """One client socket, one socket per healthy backend with the same clientId; events relayed."""
        client_id = request.query.get("clientId") or uuid.uuid4().hex
        ws = web.WebSocketResponse(heartbeat=30)
        await ws.prepare(request)
        upstreams = []
        for b in self.balancer.healthy():
            try:
                upstreams.append((b, await self.balancer.session.ws_connect(b.url(f"/ws?clientId={client_id}"),
                                                                            headers=b.headers, heartbeat=30)))
            except (aiohttp.ClientError, asyncio.TimeoutError) as ex:
                logger.warning("WebSocket bridge: %s unreachable (%s)", b.name, ex)

        async def relay(backend, up):
            async for msg in up:
                if ws.closed:
                    break
                if msg.type == aiohttp.WSMsgType.TEXT:
                    if '"executed"' in msg.data:
                        try:
                            event = json.loads(msg.data)
                            output = (event.get("data") or {}).get("output") or {}
                            self.balancer.remember_outputs({"n": output}, backend)
                        except ValueError:
                            pass
                    await ws.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)

        tasks = [asyncio.ensure_future(relay(b, up)) for b, up in upstreams]
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    for _, up in upstreams:
                        if not up.closed:
                            await up.send_str(msg.data)
        finally:
            for t in tasks:
                t.cancel()
            for _, up in upstreams:
                await up.close()
        return ws

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        """Anything else (the web UI's files, /object_info, /system_stats, ...): the first healthy backend."""
        backends = self.balancer.healthy()
        if not backends:
            return error(503, "no_backend", "no healthy ComfyUI backend")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read()
        try:
            status, rheaders, raw = await self.balancer.call(backends[0], request.method, request.path_qs,
                                                             data=body or None, headers=headers)
        except (aiohttp.ClientError, asyncio.TimeoutError) as ex:
            return error(502, "backend_unreachable", f"{backends[0].name}: {ex}")
        out = {k: v for k, v in rheaders.items() if k.lower() not in HOP_BY_HOP | {"content-encoding"}}
        return web.Response(body=raw, status=status, headers=out)
