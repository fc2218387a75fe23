"""The balancer's HTTP and WebSocket face: the seed API (/generate, /status, /health, /instances) and the
stock ComfyUI API passed through (prompts placed by queue, history/view/interrupt routed to the backend
that ran the prompt, queues merged, uploads copied to every backend, /ws bridged to every backend)."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict
from typing import Optional

import aiohttp
from aiohttp import web

from ..placement import prompt_models
from .backends import Backend, poll_forever
from .policy import choose_slot
from .settings import BalancerSettings

logger = logging.getLogger("comfy_multigpu.balancer")

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length", "authorization"}
OWNERS_KEPT = 100_000


def error(status: int, kind: str, message: str, details: str = "") -> web.Response:
    return web.json_response({"error": {"type": kind, "message": message, "details": details, "extra_info": {}}},
                             status=status)


class Balancer:
    def __init__(self, settings: BalancerSettings):
        self.settings = settings
        self.backends = [Backend(spec, settings.down_after) for spec in settings.backends]
        self.by_name = {b.name: b for b in self.backends}
        self.owners: OrderedDict[str, str] = OrderedDict()     # prompt id -> backend that has it
        self.session: Optional[aiohttp.ClientSession] = None
        self.started = time.time()

    # ---- helpers -------------------------------------------------------------------------
    def healthy(self) -> list[Backend]:
        return [b for b in self.backends if b.healthy]

    def slots(self):
        return [s for b in self.backends for s in b.slots]

    def remember(self, prompt_id: str, backend: Backend) -> None:
        self.owners[prompt_id] = backend.name
        self.owners.move_to_end(prompt_id)
        while len(self.owners) > OWNERS_KEPT:
            self.owners.popitem(last=False)

    def owner(self, prompt_id: str) -> Optional[Backend]:
        name = self.owners.get(prompt_id)
        return self.by_name.get(name) if name else None

    async def call(self, backend: Backend, method: str, path: str, *, json_body=None, data=None,
                   headers: Optional[dict] = None, timeout: float = 60.0):
        """(status, headers, body bytes) of one request to a backend."""
        hdrs = {**(headers or {}), **backend.headers}
        async with self.session.request(method, backend.url(path), json=json_body, data=data, headers=hdrs,
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return resp.status, resp.headers, await resp.read()

    async def fan_out(self, method: str, path: str, **kw) -> list:
        async def one(b):
            try:
                return b, await self.call(b, method, path, **kw)
            except (aiohttp.ClientError, asyncio.TimeoutError) as ex:
                return b, ex
        return await asyncio.gather(*(one(b) for b in self.healthy()))

    # ---- placement -----------------------------------------------------------------------
    async def submit(self, body: dict) -> tuple[int, dict]:
        """Place one /prompt body; retried on another backend when one cannot be reached."""
        prompt = body.get("prompt")
        if not isinstance(prompt, dict):
            return 400, {"error": {"type": "no_prompt", "message": "a 'prompt' object (API-format workflow) is "
                                   "required", "details": "", "extra_info": {}}, "node_errors": {}}
        body = dict(body)
        body.setdefault("prompt_id", str(uuid.uuid4()))     # retries stay idempotent
        if body["prompt_id"] is None:
            body["prompt_id"] = str(uuid.uuid4())
        models = prompt_models(prompt)
        tried: set = set()
        while True:
            slot = choose_slot(self.slots(), models, frozenset(tried))
            if slot is None:
                return 503, {"error": {"type": "no_backend", "message": "no healthy ComfyUI backend can take the "
                                       "prompt", "details": f"tried: {sorted(tried) or 'none healthy'}",
                                       "extra_info": {}}, "node_errors": {}}
            backend = self.by_name[slot.backend]
            headers = {"X-TARGET-GPU": str(slot.gpu)} if slot.gpu is not None else {}
            backend.note_submitted(slot.gpu)          # before awaiting: a concurrent submit sees it
            try:
                status, _, raw = await self.call(backend, "POST", "/prompt", json_body=body, headers=headers)
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as ex:
                backend.note_submitted(slot.gpu, -1)
                logger.warning("submit to %s failed (%s); trying another backend", backend.name, ex)
                backend.mark_failed(f"submit: {ex}", now=True)
                tried.add(backend.name)
                continue
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = {"error": {"type": "bad_backend_answer", "message": raw[:200].decode("utf-8", "replace"),
                                    "details": backend.name, "extra_info": {}}}
            if status == 200 and isinstance(answer, dict):
                self.remember(answer.get("prompt_id", body["prompt_id"]), backend)
                answer["instance"] = backend.name
                answer.setdefault("gpu_id", slot.gpu)
            else:
                backend.note_submitted(slot.gpu, -1)
            return status, answer

    # ---- routes --------------------------------------------------------------------------
    async def post_prompt(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return error(400, "invalid_json", "the body is not a JSON object", "send {\"prompt\": {...}}")
        if not isinstance(body, dict):
            return error(400, "invalid_json", "the body must be a JSON object")
        status, answer = await self.submit(body)
        return web.json_response(answer, status=status)

    async def post_generate(self, request: web.Request) -> web.Response:
        """Seed API: {"workflow", "client_id", "wait_for_completion", "timeout"}."""
        try:
            body = await request.json()
        except ValueError:
            return error(400, "invalid_json", "the body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("workflow"), dict):
            return error(400, "invalid_workflow", "'workflow' (an API-format workflow object) is required")
        prompt_body = {"prompt": body["workflow"]}
        for key in ("client_id", "prompt_id", "extra_data"):
            if key in body:
                prompt_body[key] = body[key]
        status, answer = await self.submit(prompt_body)
        if status != 200:
            return web.json_response(answer, status=status)
        result = {"prompt_id": answer["prompt_id"], "assigned_instance": answer["instance"],
                  "assigned_gpu": answer.get("gpu_id"), "message": "queued"}
        if body.get("wait_for_completion"):
            timeout = float(body.get("timeout", 300))
            entry = await self.wait_history(answer["prompt_id"], timeout)
            if entry is None:
                result["message"] = f"not finished within {timeout:g} s"
                return web.json_response(result, status=504)
            result.update(message="completed", status=entry.get("status"), outputs=entry.get("outputs"))
        return web.json_response(result)

    async def wait_history(self, prompt_id: str, timeout: float) -> Optional[dict]:
        deadline = time.monotonic() + timeout
        backend = self.owner(prompt_id)
        while time.monotonic() < deadline:
            try:
                status, _, raw = await self.call(backend, "GET", f"/history/{prompt_id}")
                if status == 200:
                    data = json.loads(raw)
                    if prompt_id in data:
                        return data[prompt_id]
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                pass
            await asyncio.sleep(0.2)
        return None

    async def get_health(self, request: web.Request) -> web.Response:
        healthy = len(self.healthy())
        return web.json_response({"status": "ok" if healthy else "down", "healthy": healthy,
                                  "backends": len(self.backends)}, status=200 if healthy else 503)

    async def get_status(self, request: web.Request) -> web.Response:
        slots = self.slots()
        return web.json_response({
            "backends": [b.describe() for b in self.backends], "poll_interval": self.settings.poll_interval,
            "healthy": len(self.healthy()), "uptime_s": round(time.time() - self.started, 1),
            "total_running": sum(s.running for s in slots), "total_pending": sum(s.pending for s in slots)})

    async def get_instances(self, request: web.Request) -> web.Response:
        return web.json_response([b.describe() for b in self.backends])

    async def get_queue(self, request: web.Request) -> web.Response:
        running, pending = [], []
        for _backend, result in await self.fan_out("GET", "/queue"):
            if isinstance(result, tuple) and result[0] == 200:
                data = json.loads(result[2])
                running += data.get("queue_running", [])
                pending += data.get("queue_pending", [])
        pending.sort(key=lambda item: (item[0], item[1]) if isinstance(item, list) and len(item) > 1 else (0, ""))
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def post_to_all(self, request: web.Request) -> web.Response:
        """/queue (clear/delete), /history (clear/delete), /free: every backend."""
        body = await request.read()
        path = request.path[4:] if request.path.startswith("/api/") else request.path
        await self.fan_out("POST", path, data=body, headers={"Content-Type": "application/json"})
        return web.Response(status=200)

    async def post_interrupt(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            prompt_id = json.loads(body).get("prompt_id") if body.strip() else None
        except (ValueError, AttributeError):
            return error(400, "invalid_json", "the /interrupt body must be a JSON object")
        backend = self.owner(prompt_id) if isinstance(prompt_id, str) else None
        if backend is not None:
            await self.call(backend, "POST", "/interrupt", data=body, headers={"Content-Type": "application/json"})
        else:
            await self.fan_out("POST", "/interrupt", data=body, headers={"Content-Type": "application/json"})
        return web.Response(status=200)

    async def get_history(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info.get("prompt_id")
        if prompt_id:
            backend = self.owner(prompt_id)
            candidates = [backend] if backend is not None else self.healthy()
            for b in candidates:
                try:
                    status, _, raw = await self.call(b, "GET", f"/history/{prompt_id}")
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    continue
                data = json.loads(raw) if status == 200 else {}
                if prompt_id in data:
                    data[prompt_id]["instance"] = b.name
                    return web.json_response(data)
            return web.json_response({})
        merged = {}
        for backend, result in await self.fan_out("GET", "/history" + (f"?{request.query_string}"
                                                                         if request.query_string else "")):
            if isinstance(result, tuple) and result[0] == 200:
                for pid, entry in json.loads(result[2]).items():
                    entry["instance"] = backend.name
                    merged[pid] = entry
        return web.json_response(merged)

    async def get_view(self, request: web.Request) -> web.StreamResponse:
        """Output files live on the backend that made them: the first backend that has the file."""
        path = "/view?" + request.query_string
        for backend in self.healthy():
            try:
                status, headers, raw = await self.call(backend, "GET", path)
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
        results = await self.fan_out("POST", path, data=body, headers=headers)
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
        for b in self.healthy():
            try:
                upstreams.append(await self.session.ws_connect(b.url(f"/ws?clientId={client_id}"),
                                                               headers=b.headers, heartbeat=30))
            except (aiohttp.ClientError, asyncio.TimeoutError) as ex:
                logger.warning("WebSocket bridge: %s unreachable (%s)", b.name, ex)

        async def relay(up):
            async for msg in up:
                if ws.closed:
                    break
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await ws.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)

        tasks = [asyncio.ensure_future(relay(up)) for up in upstreams]
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    for up in upstreams:
                        if not up.closed:
                            await up.send_str(msg.data)
        finally:
            for t in tasks:
                t.cancel()
            for up in upstreams:
                await up.close()
        return ws

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        """Anything else (the web UI's files, /object_info, /system_stats, ...): the first healthy backend."""
        backends = self.healthy()
        if not backends:
            return error(503, "no_backend", "no healthy ComfyUI backend")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read()
        try:
            status, rheaders, raw = await self.call(backends[0], request.method, request.path_qs,
                                                    data=body or None, headers=headers)
        except (aiohttp.ClientError, asyncio.TimeoutError) as ex:
            return error(502, "backend_unreachable", f"{backends[0].name}: {ex}")
        out = {k: v for k, v in rheaders.items() if k.lower() not in HOP_BY_HOP | {"content-encoding"}}
        return web.Response(body=raw, status=status, headers=out)

    # ---- app -----------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        token = self.settings.token

        @web.middleware
        async def auth(request, handler):
            if token and request.path not in ("/health",) and \
                    request.headers.get("Authorization", "") != f"Bearer {token}" and \
                    request.query.get("token") != token:
                return error(401, "unauthorized", "send Authorization: Bearer <token>")
            return await handler(request)

        app = web.Application(middlewares=[auth], client_max_size=1024 ** 3)
        for prefix in ("", "/api"):
            app.router.add_post(prefix + "/prompt", self.post_prompt)
            app.router.add_get(prefix + "/queue", self.get_queue)
            app.router.add_post(prefix + "/queue", self.post_to_all)
            app.router.add_post(prefix + "/free", self.post_to_all)
            app.router.add_post(prefix + "/history", self.post_to_all)
            app.router.add_post(prefix + "/interrupt", self.post_interrupt)
            app.router.add_get(prefix + "/history", self.get_history)
            app.router.add_get(prefix + "/history/{prompt_id}", self.get_history)
            app.router.add_get(prefix + "/view", self.get_view)
            app.router.add_post(prefix + "/upload/image", self.post_upload)
            app.router.add_post(prefix + "/upload/mask", self.post_upload)
        app.router.add_get("/ws", self.websocket)
        app.router.add_post("/generate", self.post_generate)
        app.router.add_get("/status", self.get_status)
        app.router.add_get("/health", self.get_health)
        app.router.add_get("/instances", self.get_instances)
        app.router.add_route("*", "/{tail:.*}", self.proxy)
        app.cleanup_ctx.append(self._lifetime)
        return app

    async def _lifetime(self, app: web.Application):
        self.session = aiohttp.ClientSession()
        await asyncio.gather(*(b.poll(self.session, 5.0) for b in self.backends))
        poller = asyncio.ensure_future(poll_forever(self.backends, self.session, self.settings.poll_interval))
        logger.info("balancer: %d backend(s), %d healthy: %s", len(self.backends), len(self.healthy()),
                    ", ".join(f"{b.name} ({b.kind or 'unreachable'})" for b in self.backends))
        yield
        poller.cancel()
        await self.session.close()
