"""The balancer's HTTP and WebSocket face: the seed API (/generate, /status, /health, /instances) and the
stock ComfyUI API passed through (prompts placed by queue, history/view/interrupt routed to the backend
that ran the prompt, queues merged, uploads copied to every backend, /ws bridged to every backend)."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Optional

import aiohttp
from aiohttp import web

from ..policy.errors import ApiError, parse_json_object
from ..policy.placement import prompt_models
from .backends import Backend, poll_forever, watch_queue_events
from .policy import choose_slot
from .settings import BalancerSettings

logger = logging.getLogger("comfy_multigpu.balancer")

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length", "authorization"}
OWNERS_KEPT = 100_000


def error(status: int, kind: str, message: str, details: str = "") -> web.Response:
    return web.json_response(ApiError(status, kind, message, details).body(), status=status)


@dataclass
class Held:
    """A prompt accepted by the balancer and not yet sent: every slot had `depth` prompts."""
    prompt_id: str
    body: dict
    models: frozenset
    number: int


class Balancer:
    def __init__(self, settings: BalancerSettings):
        self.settings = settings
        self.backends = [Backend(spec, settings.down_after) for spec in settings.backends]
        self.by_name = {b.name: b for b in self.backends}
        self.owners: OrderedDict[str, str] = OrderedDict()     # prompt id -> backend that has it
        self.files: OrderedDict[tuple, str] = OrderedDict()    # (type, subfolder, filename) -> backend
        self.session: Optional[aiohttp.ClientSession] = None
        self.started = time.time()
        self.held: deque[Held] = deque()                      # waiting here for a free slot, in order
        self.failed: OrderedDict[str, dict] = OrderedDict()    # held prompts a backend then refused
        self.kick = asyncio.Event()
        self.number = 0

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

    def remember_outputs(self, outputs, backend: Backend) -> None:
        """Output files a backend reported (history entries, `executed` events): /view asks it first,
        since two backends may both have e.g. ComfyUI_00001_.png."""
        if not isinstance(outputs, dict):
            return
        for node_output in outputs.values():
            if not isinstance(node_output, dict):
                continue
            for files in node_output.values():
                for f in files if isinstance(files, list) else ():
                    if isinstance(f, dict) and isinstance(f.get("filename"), str):
                        key = (f.get("type", "output"), f.get("subfolder", ""), f["filename"])
                        self.files[key] = backend.name
                        self.files.move_to_end(key)
        while len(self.files) > OWNERS_KEPT:
            self.files.popitem(last=False)

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
        """Place one /prompt body: sent now to the best slot with room, or held (in order) until one
        frees up, so that work goes to whichever GPU is free first, whatever the durations."""
        prompt = body.get("prompt")
        if not isinstance(prompt, dict):
            return 400, ApiError(400, "no_prompt", "a 'prompt' object (API-format workflow) is required").body("/prompt")
        body = dict(body)
        if not body.get("prompt_id"):
            body["prompt_id"] = str(uuid.uuid4())            # retries stay idempotent
        models = prompt_models(prompt)
        if not self.healthy():
            return 503, self._no_backend([])
        depth = self.settings.depth
        if self.held or choose_slot(self.slots(), models, depth=depth) is None:
            self.number += 1
            self.held.append(Held(body["prompt_id"], body, models, self.number))
            self.kick.set()
            return 200, {"prompt_id": body["prompt_id"], "number": self.number, "node_errors": {},
                         "held": True, "instance": None, "gpu_id": None}
        return await self.send(body, models)

    def _no_backend(self, tried) -> dict:
        return ApiError(503, "no_backend", "no healthy ComfyUI backend can take the prompt",
                        f"tried: {sorted(tried) or 'none healthy'}").body("/prompt")

    async def send(self, body: dict, models: frozenset) -> tuple[int, dict]:
        """Send to the best slot with room; a backend that cannot be reached is marked down and the
        next one tried with the same prompt id (never queued twice)."""
        tried: set = set()
        while True:
            slot = choose_slot(self.slots(), models, frozenset(tried), self.settings.depth) or \
                choose_slot(self.slots(), models, frozenset(tried))
            if slot is None:
                return 503, self._no_backend(tried)
            backend = self.by_name[slot.backend]
            pin = self.settings.pin_gpu == "always" or (self.settings.pin_gpu == "idle" and
                                                         slot.running + slot.pending == 0)
            headers = {"X-TARGET-GPU": str(slot.gpu)} if slot.gpu is not None and pin else {}
            submission = backend.note_submitted(slot)      # before awaiting: a concurrent submit sees it
            try:
                status, _, raw = await self.call(backend, "POST", "/prompt", json_body=body, headers=headers)
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as ex:
                backend.note_answered(submission, queued=False)
                logger.warning("submit to %s failed (%s); trying another backend", backend.name, ex)
                backend.mark_failed(f"submit: {ex}", now=True)
                tried.add(backend.name)
                continue
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = ApiError(status, "bad_backend_answer", raw[:200].decode("utf-8", "replace"),
                                  backend.name).body()
            queued = status == 200 and isinstance(answer, dict)
            backend.note_answered(submission, queued)
            if queued:
                self.remember(answer.get("prompt_id", body["prompt_id"]), backend)
                answer["instance"] = backend.name
                answer.setdefault("gpu_id", slot.gpu)
            return status, answer

    async def dispatch_forever(self) -> None:
        """Send held prompts, oldest first, as soon as a slot has room (woken by backends' queue events,
        by new prompts, and at least every poll interval)."""
        while True:
            try:
                await asyncio.wait_for(self.kick.wait(), self.settings.poll_interval)
            except asyncio.TimeoutError:
                pass
            self.kick.clear()
            while self.held:
                head = self.held[0]
                if choose_slot(self.slots(), head.models, depth=self.settings.depth) is None:
                    break
                self.held.popleft()
                status, answer = await self.send(head.body, head.models)
                if status == 503:                         # nothing healthy: keep it, first in line
                    self.held.appendleft(head)
                    break
                if status != 200:
                    self._record_refusal(head, answer)

    def _record_refusal(self, held: Held, answer: dict) -> None:
        """A held prompt the backend refused (e.g. validation): its history entry says why."""
        error = answer.get("error") if isinstance(answer, dict) else None
        message = error.get("message") if isinstance(error, dict) else str(answer)[:300]
        self.failed[held.prompt_id] = {
            "prompt": [held.number, held.prompt_id, held.body.get("prompt"), held.body.get("extra_data", {}), []],
            "outputs": {}, "instance": None,
            "status": {"status_str": "error", "completed": False, "messages": [[
                "execution_error", {"prompt_id": held.prompt_id, "exception_message": message,
                                    "exception_type": "prompt_refused", "node_errors": answer.get("node_errors", {})
                                    if isinstance(answer, dict) else {}}]]}}
        while len(self.failed) > 10_000:
            self.failed.popitem(last=False)

    async def on_backend_change(self, backend: Backend) -> None:
        await backend.poll(self.session, 5.0)
        self.kick.set()

    # ---- routes --------------------------------------------------------------------------
    async def post_prompt(self, request: web.Request) -> web.Response:
        try:
            body = parse_json_object(await request.read(), "/prompt")
        except ApiError as ex:
            return web.json_response(ex.body("/prompt"), status=ex.status)
        status, answer = await self.submit(body)
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
        status, answer = await self.submit(prompt_body)
        if status != 200:
            return web.json_response(answer, status=status)
        result = {"prompt_id": answer["prompt_id"], "assigned_instance": answer["instance"],
                  "assigned_gpu": answer.get("gpu_id"),
                  "message": "held until a GPU is free" if answer.get("held") else "queued"}
        if body.get("wait_for_completion"):
            timeout = float(body.get("timeout", 300))
            entry = await self.wait_history(answer["prompt_id"], timeout)
            if entry is None:
                result["message"] = f"not finished within {timeout:g} s"
                return web.json_response(result, status=504)
            result.update(message="completed", status=entry.get("status"), outputs=entry.get("outputs"),
                          assigned_instance=self.owners.get(answer["prompt_id"]))
        return web.json_response(result)

    async def wait_history(self, prompt_id: str, timeout: float) -> Optional[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if prompt_id in self.failed:
                return self.failed[prompt_id]
            backend = self.owner(prompt_id)
            if backend is None:                       # still held here
                await asyncio.sleep(0.2)
                continue
            try:
                status, _, raw = await self.call(backend, "GET", f"/history/{prompt_id}")
                if status == 200:
                    data = json.loads(raw)
                    if prompt_id in data:
                        self.remember_outputs(data[prompt_id].get("outputs"), backend)
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
            "held": len(self.held), "depth": self.settings.depth,
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
        pending += [[h.number, h.prompt_id, h.body.get("prompt"), h.body.get("extra_data", {}), []] for h in self.held]
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
                self.held.clear()
            if isinstance(data, dict) and isinstance(data.get("delete"), list):
                gone = set(data["delete"])
                self.held = deque(h for h in self.held if h.prompt_id not in gone)
        await self.fan_out("POST", path, data=body, headers={"Content-Type": "application/json"})
        return web.Response(status=200)

    async def post_interrupt(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            prompt_id = parse_json_object(body, "/interrupt", empty_ok=True).get("prompt_id")
        except ApiError as ex:
            return web.json_response(ex.body(), status=ex.status)
        backend = self.owner(prompt_id) if isinstance(prompt_id, str) else None
        if backend is not None:
            await self.call(backend, "POST", "/interrupt", data=body, headers={"Content-Type": "application/json"})
        else:
            await self.fan_out("POST", "/interrupt", data=body, headers={"Content-Type": "application/json"})
        return web.Response(status=200)

    async def get_history(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info.get("prompt_id")
        if prompt_id in self.failed:
            return web.json_response({prompt_id: self.failed[prompt_id]})
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
                    self.remember_outputs(data[prompt_id].get("outputs"), b)
                    return web.json_response(data)
            return web.json_response({})
        merged = {}
        for backend, result in await self.fan_out("GET", "/history" + (f"?{request.query_string}"
                                                                         if request.query_string else "")):
            if isinstance(result, tuple) and result[0] == 200:
                for pid, entry in json.loads(result[2]).items():
                    entry["instance"] = backend.name
                    self.remember_outputs(entry.get("outputs"), backend)
                    merged[pid] = entry
        return web.json_response(merged)

    async def get_view(self, request: web.Request) -> web.StreamResponse:
        """Output files live on the backend that made them: the one that reported the file (in an
        `executed` event or a history entry), else the first backend that has it."""
        path = "/view?" + request.query_string
        q = request.query
        known = self.by_name.get(self.files.get((q.get("type", "output"), q.get("subfolder", ""),
                                                 q.get("filename", ""))), None)
        ordered = ([known] if known is not None and known.healthy else []) + \
            [b for b in self.healthy() if b is not known]
        for backend in ordered:
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
                upstreams.append((b, await self.session.ws_connect(b.url(f"/ws?clientId={client_id}"),
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
                            self.remember_outputs({"n": (event.get("data") or {}).get("output") or {}}, backend)
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
        tasks = [asyncio.ensure_future(poll_forever(self.backends, self.session, self.settings.poll_interval)),
                 asyncio.ensure_future(self.dispatch_forever())]
        tasks += [asyncio.ensure_future(watch_queue_events(b, self.session, self.on_backend_change))
                  for b in self.backends]
        logger.info("balancer: %d backend(s), %d healthy: %s", len(self.backends), len(self.healthy()),
                    ", ".join(f"{b.name} ({b.kind or 'unreachable'})" for b in self.backends))
        yield
        for task in tasks:
            task.cancel()
        await self.session.close()
