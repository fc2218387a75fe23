"""EventRelay: WebSocket events across machines, and interrupts by prompt id. An event for a client
whose socket is not on this machine is published on cmg:events (JSON events and binary previews, in
the order they were sent); every machine subscribes and delivers those whose client is connected to
it, in order. cmg:control carries interrupts of prompts that run elsewhere. Pub/Sub is at-most-once,
as a WebSocket is: the terminal state of every prompt is in the fleet's history.
Host objects touched: PromptServer.instance (sockets, loop, send_sync).
"""
from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
from typing import Callable, Optional

import redis

from .store import CONTROL, ERRORS, EVENTS, FleetStore

logger = logging.getLogger("comfy_multigpu")


def encode(node: str, event, data, sid: str) -> bytes:
    binary = isinstance(data, (bytes, bytearray))
    head = json.dumps({"o": node, "s": sid, "e": event, "b": binary}).encode()
    body = bytes(data) if binary else json.dumps(data).encode()
    return head + b"\n" + body


def decode(payload: bytes) -> tuple[str, object, object, str]:
    head, _, body = payload.partition(b"\n")
    meta = json.loads(head)
    data = body if meta["b"] else json.loads(body)
    return meta["o"], meta["e"], data, meta["s"]


class EventRelay:
    def __init__(self, store: FleetStore, server, interrupt_local: Callable[[str], bool]):
        self.store = store
        self.node = store.node
        self.server = server
        self.interrupt_local = interrupt_local
        self.published = 0
        self.delivered = 0
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._inbox: Optional[asyncio.Queue] = None

    def start(self) -> None:
        loop = self.server.loop
        self._inbox = asyncio.Queue()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._deliver()))
        for target, name in ((self._publisher, "publisher"), (self._subscriber, "subscriber")):
            threading.Thread(target=target, name=f"comfy-multigpu-fleet-{name}", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._out.put(None)

    # ---- out -----------------------------------------------------------------------------------
    def outgoing(self, event, data, sid: str) -> None:
        """An event for a client that is not connected here (called on the event loop: never blocks)."""
        self._out.put((EVENTS, encode(self.node, event, data, sid)))

    def interrupt(self, prompt_id: str) -> None:
        self._out.put((CONTROL, json.dumps({"o": self.node, "interrupt": prompt_id}).encode()))

    def _publisher(self) -> None:
        while True:
            item = self._out.get()
            if item is None or self._stop.is_set():
                return
            channel, payload = item
            for attempt in range(3):
                try:
                    self.store.publish(channel, payload)
                    self.published += 1
                    break
                except ERRORS as ex:
                    if attempt == 2:
                        logger.warning("Fleet: an event for a client on another machine was lost (%s)", ex)
                    self._stop.wait(0.2 * (attempt + 1))

    # ---- in ------------------------------------------------------------------------------------
    def _subscriber(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            pubsub = self.store.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(EVENTS, CONTROL)
                delay = 0.5
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    try:
                        self._received(message["channel"], message["data"])
                    except Exception:           # one bad message (another version?) stops nothing
                        logger.exception("Fleet: a relayed message could not be handled")
            except (ERRORS + (redis.exceptions.RedisError,)) as ex:
                logger.debug("Fleet: event subscription lost (%s); resubscribing", ex)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
            finally:
                try:
                    pubsub.close()
                except Exception:
                    pass

    def _received(self, channel, payload: bytes) -> None:
        channel = channel.decode() if isinstance(channel, bytes) else channel
        if channel == CONTROL:
            message = json.loads(payload)
            if message.get("o") != self.node and message.get("interrupt"):
                if self.interrupt_local(message["interrupt"]):
                    logger.info("Interrupt %s (asked at machine %s): sent", message["interrupt"], message["o"])
            return
        origin, event, data, sid = decode(payload)
        if origin == self.node or sid not in self.server.sockets:
            return
        self.server.loop.call_soon_threadsafe(self._inbox.put_nowait, (event, data, sid))

    async def _deliver(self) -> None:
        """One task delivers every relayed event, in the order received."""
        while True:
            event, data, sid = await self._inbox.get()
            try:
                await self.server.send(event, data, sid)
                self.delivered += 1
            except Exception:
                logger.exception("Fleet: could not deliver a relayed %s event", event)


