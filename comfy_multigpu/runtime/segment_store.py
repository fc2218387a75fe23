"""Model files held once in RAM for process workers: the main process's register of shared segments.

In process mode each GPU's child builds ComfyUI's objects itself, but a file is loaded by one child
only (single-flight, coordinated here): that child publishes the result into one shared-memory
segment (runtime/shared_segments.py), hands the main process a file descriptor of it (the file is
already unlinked from /dev/shm, so a crash leaves nothing behind), and every other child maps the
same pages (copy-on-write: nobody can change another's weights). This store holds those descriptors,
who uses which segment, the RAM budget and LRU eviction; an evicted segment's memory returns to
the system when the last child lets go of it. Same questions as runtime/weights.py (totals,
listing) so /metrics, /multigpu/models and /preload read either.

Host objects touched: none (runtime/process_executor.py and host/sharing.py call in here).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional

from ..policy.eviction import CachedFile, choose_evictions
from . import shared_segments
from .weights import OUTSIDE, file_identity, holding

logger = logging.getLogger("comfy_multigpu")

LOAD_WAIT_S = 1800.0           # longest a caller waits for another worker's load of the same file


@dataclass
class Segment:
    key: Hashable
    kind: str
    name: str
    path: str
    fd: Optional[int] = None            # the main process's handle; closed on eviction
    segment: str = ""                   # its /dev/shm name while the loader writes it
    blob: bytes = b""                   # the pickled object around the tensors
    nbytes: int = 0
    loads: int = 0
    views: int = 0
    loader: Optional[int] = None        # GPU loading it now
    last_use: float = field(default_factory=time.monotonic)
    users: dict = field(default_factory=dict)      # gpu id -> live views
    pending: int = 0
    ready: threading.Event = field(default_factory=threading.Event)
    error: Optional[str] = None
    private: Optional[str] = None       # why this file cannot be shared (each child loads its own)
    load_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class Grant:
    """What a child does for one loader call: "attach" (blob + fd), "load" (it is the loader and
    publishes to `segment`), or "private" (load its own copy; `reason` says why)."""
    action: str
    key: Hashable
    blob: bytes = b""
    fd: Optional[int] = None
    segment: str = ""
    reason: str = ""


class SegmentStore:
    def __init__(self, budget: int, owner_pid: Optional[int] = None):
        self.budget = budget
        self.owner_pid = owner_pid or os.getpid()
        self.lock = threading.Lock()
        self.entries: dict[Hashable, Segment] = {}
        self.hits = self.misses = self.evictions = 0
        self._serial = 0
        self.load_listeners: list[Callable[[str, float], None]] = []
        self.closed = False

    # -- the protocol the children speak (through their worker's link) ------------------------
    def acquire(self, user: int, kind: str, path: str, options: Hashable) -> Grant:
        key = (kind, file_identity(path), options)
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                self._serial += 1
                segment = shared_segments.segment_path(self.owner_pid, f"{self._serial}-{kind}")
                entry = Segment(key, kind, os.path.basename(path), os.path.realpath(path), loader=user,
                                segment=segment)
                self.entries[key] = entry
                self.misses += 1
                entry.pending += 1
                return Grant("load", key, segment=segment)
            self.hits += 1
            entry.pending += 1
        if not entry.ready.wait(LOAD_WAIT_S):
            with self.lock:
                entry.pending -= 1
            raise RuntimeError(f"{kind} {entry.name}: another worker has been loading it for over "
                               f"{LOAD_WAIT_S:.0f} s")
        with self.lock:
            entry.pending -= 1
            if entry.private is not None:
                return Grant("private", key, reason=entry.private)
            if entry.error is not None or entry.fd is None:
                raise RuntimeError(f"{kind} {entry.name} could not be loaded by another worker: "
                                   f"{entry.error or 'evicted'}")
            self._use(entry, user)
            return Grant("attach", key, blob=entry.blob, fd=entry.fd)

    def published(self, user: int, key: Hashable, blob: bytes, nbytes: int, fd: int) -> None:
        """The loader child published the file: its descriptor (now ours), the pickled object."""
        with self.lock:
            entry = self.entries.get(key)
            if entry is None or entry.ready.is_set():
                os.close(fd)
                return
            entry.fd, entry.blob, entry.nbytes = fd, blob, nbytes
            entry.loads += 1
            entry.loader = None
            entry.pending -= 1
            entry.load_seconds = time.perf_counter() - entry.started
            self._use(entry, user)
            entry.ready.set()
        for listener in self.load_listeners:
            listener(entry.kind, entry.load_seconds)
        logger.info("comfy-multigpu: %s %s loaded once into shared memory for every process worker "
                    "(%.1f MiB, %.2f s, by GPU %s)", entry.kind, entry.name, nbytes / 2 ** 20,
                    entry.load_seconds, user)
        self.evict()

    def failed(self, user: int, key: Hashable, error: str, shareable: bool = True) -> None:
        """The loader child could not load (the next caller tries again) or publish (`shareable`
        False: the file stays private to each child, said once)."""
        with self.lock:
            entry = self.entries.get(key)
            if entry is None or entry.ready.is_set():
                return
            entry.pending -= 1
            entry.loader = None
            if shareable:
                entry.error = error
                del self.entries[key]
            else:
                entry.private = error
            entry.ready.set()
        if not shareable:
            logger.warning("comfy-multigpu: %s %s cannot be shared between process workers (%s); each "
                           "GPU's process loads its own copy", entry.kind, entry.name, error)

    def released(self, user: int, key: Hashable) -> None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                return
            count = entry.users.get(user, 0) - 1
            if count > 0:
                entry.users[user] = count
            else:
                entry.users.pop(user, None)
            entry.last_use = time.monotonic()

    def abandon(self, user: int) -> None:
        """A child died: its views are gone, and a load it was doing will not finish."""
        with self.lock:
            for entry in list(self.entries.values()):
                entry.users.pop(user, None)
                if entry.loader == user and not entry.ready.is_set():
                    entry.error = f"the process of GPU {user} died while loading it"
                    entry.loader = None
                    del self.entries[entry.key]
                    shared_segments.remove(entry.segment)      # if it died half-way through writing it
                    entry.ready.set()

    def _use(self, entry: Segment, user: int) -> None:
        entry.views += 1
        entry.last_use = time.monotonic()
        entry.users[user] = entry.users.get(user, 0) + 1

    # -- the main process's own loader calls (POST /preload into RAM) --------------------------
    def get(self, kind: str, path: str, options: Hashable, build: Callable[[], Any]) -> Any:
        grant = self.acquire(OUTSIDE, kind, path, options)
        if grant.action == "private":
            return build()
        if grant.action == "attach":
            view = shared_segments.attach(grant.blob, f"/proc/self/fd/{grant.fd}")
            self.released(OUTSIDE, grant.key)        # the main process keeps no view
            return view
        try:
            template = build()
        except BaseException as ex:
            self.failed(OUTSIDE, grant.key, f"{type(ex).__name__}: {ex}")
            raise
        try:
            published = shared_segments.publish(template, grant.segment)
        except shared_segments.SegmentError as ex:
            self.failed(OUTSIDE, grant.key, str(ex), shareable=False)
            return template
        fd = os.open(grant.segment, os.O_RDONLY)
        shared_segments.remove(grant.segment)
        self.published(OUTSIDE, grant.key, published.blob, published.nbytes, fd)
        self.released(OUTSIDE, grant.key)
        return template

    def release_held(self, gpu: int) -> int:
        return 0                 # views /preload keeps live in the children

    def is_shared(self, tensor) -> bool:
        return False             # the main process runs no prompts; children map copy-on-write

    # -- budget ----------------------------------------------------------------------------------
    def evict(self) -> list:
        with self.lock:
            files = [CachedFile(e.key, e.nbytes, bool(e.users) or e.pending > 0, e.last_use)
                     for e in self._loaded()]
            gone = [self.entries.pop(k) for k in choose_evictions(files, self.budget)]
            for e in gone:
                os.close(e.fd)
                e.fd, e.blob = None, b""
            self.evictions += len(gone)
        for e in gone:
            logger.info("comfy-multigpu: evicted %s %s from shared memory (%.1f MiB; budget %.1f MiB)",
                        e.kind, e.name, e.nbytes / 2 ** 20, self.budget / 2 ** 20)
        return gone

    def close(self) -> None:
        """Clean stop: drop every segment (memory returns once the children have exited)."""
        with self.lock:
            self.closed = True
            for e in self.entries.values():
                if e.fd is not None:
                    os.close(e.fd)
                    e.fd = None
            self.entries.clear()
        shared_segments.remove_owned(self.owner_pid)

    # -- questions -------------------------------------------------------------------------------
    def _loaded(self) -> list[Segment]:
        return [e for e in self.entries.values() if e.ready.is_set() and e.fd is not None]

    def _totals(self, entries: list[Segment]) -> dict:
        return {"bytes": sum(e.nbytes for e in entries), "budget_bytes": self.budget, "files": len(entries),
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}

    def totals(self) -> dict:
        with self.lock:
            return self._totals(self._loaded())

    def listing(self, devices_of: Callable[[Segment], list]) -> dict:
        now = time.monotonic()
        with self.lock:
            entries = self._loaded()
            files = [{"name": e.name, "type": e.kind, "path": e.path, "bytes": e.nbytes,
                      "users": sorted(g for g in e.users if g != OUTSIDE),
                      "views": sum(e.users.values()), "loads": e.loads, "views_made": e.views,
                      "load_seconds": round(e.load_seconds, 3),
                      "idle_seconds": round(now - e.last_use, 3), "preloaded_for": [],
                      "shared_memory": True} for e in entries]
            totals = self._totals(entries)
        for f in files:
            f["devices"] = f["users"]
        return {"sharing": True, "mode": "process", "ram_cache": totals, "models": files}


__all__ = ["Grant", "Segment", "SegmentStore", "holding"]
