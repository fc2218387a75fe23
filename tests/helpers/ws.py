"""WebSocket clients that submit prompts and record every event they receive (aiohttp)."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Client:
    client_id: str
    gpu: object = None                   # X-TARGET-GPU for its requests (None: auto)
    events: list = field(default_factory=list)
    prompt_ids: set = field(default_factory=set)
    finished: set = field(default_factory=set)
    closed: set = field(default_factory=set)    # prompts whose final `executing` (node None) arrived

    def foreign(self) -> list:
        """Events about prompts this client did not submit."""
        return [e for e in self.events if isinstance(e.get("data"), dict)
                and e["data"].get("prompt_id") not in (None, *self.prompt_ids)]

    def of_type(self, kind: str) -> list:
        return [e for e in self.events if e.get("type") == kind]


async def _listen(session, base_url, client: Client, ready: asyncio.Event, headers: dict):
    async with session.ws_connect(f"{base_url}/ws?clientId={client.client_id}", headers=headers) as ws:
        ready.set()
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                event = json.loads(msg.data)
                client.events.append(event)
                data = event.get("data") or {}
                if event["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    client.finished.add(data.get("prompt_id"))
                if event["type"] == "executing" and data.get("node") is None:
                    client.closed.add(data.get("prompt_id"))
            elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                break


async def run_clients(base_url: str, plan, timeout: float = 120.0, ws_headers=None) -> list[Client]:
    """plan: list of (Client, [(delay_s, prompt), ...]). Submits each prompt for its client after the
    delay, then waits until every client saw the end of each of its prompts."""
    async with aiohttp.ClientSession() as session:
        listeners, readies = [], []
        for client, _ in plan:
            ready = asyncio.Event()
            headers = {} if client.gpu is None else {"X-TARGET-GPU": str(client.gpu)}
            listeners.append(asyncio.create_task(_listen(session, base_url, client, ready, headers)))
            readies.append(ready)
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 30)

        async def submit(client: Client, delay: float, prompt: dict):
            await asyncio.sleep(delay)
            headers = {} if client.gpu is None else {"X-TARGET-GPU": str(client.gpu)}
            async with session.post(f"{base_url}/prompt", json={"prompt": prompt, "client_id": client.client_id},
                                    headers=headers) as resp:
                answer = await resp.json()
                assert resp.status == 200, answer
                client.prompt_ids.add(answer["prompt_id"])

        await asyncio.gather(*(submit(c, d, p) for c, items in plan for d, p in items))
        deadline = time.time() + timeout
        while any(c.finished < c.prompt_ids for c, _ in plan) and time.time() < deadline:
            await asyncio.sleep(0.05)
        # ComfyUI's worker sends `executing` with node None after the prompt's history is written,
        # which on 2 busy cores can come well after execution_success: wait for it too (bounded).
        closing = time.time() + 10
        while any(c.closed < c.finished for c, _ in plan) and time.time() < closing:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)          # late stragglers would show up as foreign events
        for task in listeners:
            task.cancel()
        return [c for c, _ in plan]


def run(base_url: str, plan, **kw) -> list[Client]:
    return asyncio.run(run_clients(base_url, plan, **kw))
