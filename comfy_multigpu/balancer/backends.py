"""Backends of the balancer: one object per ComfyUI instance with everything known about it (kind,
health, its slots as of the last poll plus what was sent since), and the poller that refreshes them.

A comfy-multigpu backend answers `/queue/all?counts=1` (one slot per GPU, with its recent models);
a stock one answers 404 there and is read from `/queue` (one slot).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Optional

import aiohttp

from .policy import Slot, with_submitted
from .settings import BackendSpec

logger = logging.getLogger("comfy_multigpu.balancer")


@dataclass(eq=False)
class Submission:
    """A prompt sent to a slot: counted in the view until a poll started after its answer shows it."""
    slot: Slot
    answered_at: Optional[float] = None      # time.monotonic() of the backend's 200


class Backend:
    def __init__(self, spec: BackendSpec, down_after: int = 3):
        self.spec = spec
        self.name = spec.url
        self.down_after = down_after
        self.kind: Optional[str] = None          # "multigpu" | "stock", learnt on the first good poll
        self.healthy = False
        self.failures = 0
        self.slots: list[Slot] = []
        self.last_poll = 0.0
        self.last_error = ""
        self.submitted = 0
        self.in_flight: list[Submission] = []    # sent and maybe not yet in what a poll returned

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.spec.token}"} if self.spec.token else {}

    def url(self, path: str) -> str:
        return self.spec.url + path

    # ---- state ---------------------------------------------------------------------------
    def mark_failed(self, why: str, now: bool = False) -> None:
        """A failed poll (down after `down_after` in a row), or with `now` a submit that could not
        connect (down at once: a prompt was about to be lost there)."""
        self.failures += 1
        self.last_error = why
        if self.healthy and (now or self.failures >= self.down_after):
            self.healthy = False
            logger.warning("backend %s marked DOWN after %d failure(s): %s", self.name, self.failures, why)
            self.slots = [replace(s, healthy=False) for s in self.slots]

    def mark_ok(self) -> None:
        if not self.healthy:
            logger.info("backend %s is UP (%s)", self.name, self.kind)
        self.healthy = True
        self.failures = 0
        self.last_error = ""

    def note_submitted(self, slot: Slot) -> Submission:
        """One more prompt goes to `slot`. Called when the slot is chosen, before the request, so
        concurrent submits see it; `note_answered` follows."""
        submission = Submission(slot)
        self.in_flight.append(submission)
        self.submitted += 1
        self.slots = with_submitted(self.slots, slot)
        return submission

    def note_answered(self, submission: Submission, queued: bool) -> None:
        """The backend answered: queued (kept in the view until a later poll includes it), or not."""
        if queued:
            submission.answered_at = time.monotonic()
            return
        self.in_flight.remove(submission)
        self.submitted -= 1
        self.slots = with_submitted(self.slots, submission.slot, -1)

    def describe(self) -> dict:
        return {"url": self.name, "kind": self.kind, "healthy": self.healthy, "weight": self.spec.weight,
                "failures": self.failures, "last_error": self.last_error, "submitted": self.submitted,
                "last_poll_age_s": round(time.monotonic() - self.last_poll, 3) if self.last_poll else None,
                "gpus": [{"gpu": s.gpu, "running": s.running, "pending": s.pending, "models": list(s.models)}
                         for s in self.slots]}

    # ---- polling -------------------------------------------------------------------------
    async def poll(self, session: aiohttp.ClientSession, timeout: float) -> None:
        started = time.monotonic()
        try:
            slots = await self._read_slots(session, timeout)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as ex:
            self.mark_failed(f"{type(ex).__name__}: {ex}")
            return
        # A prompt answered before this poll started is in what the backend returned; one still in
        # flight (or answered since) may not be, so it stays counted: a stale poll never frees a slot
        # that a concurrent submit just filled (at worst a slot looks full until the next poll).
        self.in_flight = [f for f in self.in_flight if f.answered_at is None or f.answered_at >= started]
        for f in self.in_flight:
            slots = with_submitted(slots, f.slot)
        self.slots = slots
        self.last_poll = time.monotonic()
        self.mark_ok()

    async def _read_slots(self, session: aiohttp.ClientSession, timeout: float) -> list[Slot]:
        t = aiohttp.ClientTimeout(total=timeout)
        if self.kind in (None, "multigpu"):
            async with session.get(self.url("/queue/all?counts=1"), headers=self.headers, timeout=t) as resp:
                if resp.status == 200:
                    data = await resp.json()
                    self.kind = "multigpu"
                    return [Slot(self.name, q["gpu_id"], bool(q.get("up", True)) and q.get("healthy", True),
                                 q["running_count"], q["pending_count"],
                                 self.spec.weight * float(q.get("weight", 1.0)), tuple(q.get("models", ())))
                            for q in data["queues"]]
                if resp.status != 404:
                    raise ValueError(f"/queue/all answered {resp.status}")
        async with session.get(self.url("/queue"), headers=self.headers, timeout=t) as resp:
            if resp.status != 200:
                raise ValueError(f"/queue answered {resp.status}")
            data = await resp.json()
        self.kind = "stock"
        return [Slot(self.name, None, True, len(data["queue_running"]), len(data["queue_pending"]),
                     self.spec.weight)]


async def poll_forever(backends: list[Backend], session: aiohttp.ClientSession, interval: float) -> None:
    while True:
        started = time.monotonic()
        await asyncio.gather(*(b.poll(session, max(1.0, interval * 4)) for b in backends))
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))


async def watch_queue_events(backend: Backend, session: aiohttp.ClientSession, on_change) -> None:
    """One WebSocket per backend: ComfyUI broadcasts a `status` message whenever its queue changes,
    so the balancer re-reads that backend at once instead of waiting for the next poll."""
    import uuid
    client_id = f"balancer-{uuid.uuid4().hex[:12]}"
    while True:
        try:
            async with session.ws_connect(backend.url(f"/ws?clientId={client_id}"), headers=backend.headers,
                                          heartbeat=30) as ws:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT and '"status"' in msg.data:
                        await on_change(backend)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass
        await asyncio.sleep(1.0)
