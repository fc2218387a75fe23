"""The balancer's state and queue mechanics: the backends, which backend has which prompt and output
file, requests to backends, and placing prompts (sent now to a slot with room, or held here in order
and dispatched as slots free up); its lifetime starts the pollers and the dispatcher."""
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

from ..policy.errors import ApiError
from ..policy.placement import prompt_models
from .backends import Backend, poll_forever, watch_queue_events
from .policy import choose_slot
from .settings import BalancerSettings

logger = logging.getLogger("comfy_multigpu.balancer")

OWNERS_KEPT = 100_000


@dataclass
class Held:
    """A prompt accepted by the balancer and not yet sent: every slot had `depth` prompts."""
    prompt_id: str
    body: dict
    models: frozenset
    number: int


class Balancer:
    """Everything the balancer knows and does, apart from parsing requests (routes.py)."""

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
            return 400, ApiError(400, "no_prompt",
                                 "a 'prompt' object (API-format workflow) is required").body("/prompt")
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

    async def wait_history(self, prompt_id: str, timeout: float) -> Optional[dict]:
        """The history entry of a prompt once it has one (a refusal of a held prompt counts), else None
        after `timeout` seconds."""
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

    # ---- lifetime ------------------------------------------------------------------------
    async def lifetime(self, app: web.Application):
        """aiohttp cleanup context: the client session, the pollers and the dispatcher."""
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
