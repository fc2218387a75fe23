"""Model files held once in CPU RAM for every worker: the shared store of templates, single-flight
loads, who uses which file, the RAM budget and eviction.

How it shares (docs/weights.md has the long form):
- A loader (checkpoint, diffusion model, text encoder, VAE, ControlNet; LoRA state dicts) runs once
  per file and set of options; its result is the *template* and is never handed out.
- Every caller gets a *view* (runtime/weight_views.py): new module skeletons and tensor objects over
  the template's storage, so one worker's patches and device moves never reach another's.
- Writes into shared storage (ComfyUI's copy_to_param / weight_inplace_update) become copy-on-write
  (host/sharing.py); a device that offloads points its tensors back at the shared CPU tensors.
- Single-flight: the first caller loads, concurrent callers for the same file wait for it.
- Budget: over COMFY_MULTIGPU_RAM_CACHE, the least recently used files no view uses are dropped.

Host objects touched: none directly (host/sharing.py calls in here).
"""
from __future__ import annotations

import collections
import contextvars
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional

from .context import current_worker
from .weight_views import (  # noqa: F401  (re-exported: callers use weights.<name>)
    PinCounts, Plan, make_view, plan_of, repoint_to_shared, shared_sources, shared_storages,
)
from ..policy.eviction import CachedFile, choose_evictions

logger = logging.getLogger("comfy_multigpu")

OUTSIDE = -1     # "user" id for views made outside any worker thread

# Set by /preload in a worker: the view made is kept for that worker's next prompt (see Entry.held).
holding: contextvars.ContextVar = contextvars.ContextVar("comfy_multigpu_hold", default=False)


class SharedStateDict(dict):
    """A view of a shared state dict (LoRA files): a dict that can be weakly referenced."""


# ---- the store -----------------------------------------------------------------------------------
@dataclass
class Entry:
    key: Hashable
    kind: str
    name: str
    path: str
    template: Any = None
    plan: Optional[Plan] = None
    nbytes: int = 0
    storages: dict = field(default_factory=dict)
    loads: int = 0                      # disk loads of this file (1 with sharing)
    views: int = 0                      # views handed out
    last_use: float = field(default_factory=time.monotonic)
    users: dict = field(default_factory=dict)      # gpu id -> live views
    pending: int = 0                    # callers between asking and holding their view: not evictable
    held: dict = field(default_factory=dict)       # gpu id -> preloaded view its next loader call gets
    ready: threading.Event = field(default_factory=threading.Event)
    error: Optional[BaseException] = None
    load_seconds: float = 0.0


def _weakly_referable(view: Any) -> Any:
    """Plain dicts in a view (a LoRA state dict, its metadata) become SharedStateDicts, so that the
    store can tell when the caller lets go of them."""
    def fix(obj):
        return SharedStateDict(obj) if type(obj) is dict else obj
    return tuple(fix(o) for o in view) if type(view) is tuple else fix(view)


def _referable(obj: Any) -> bool:
    if obj is None:
        return False
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def file_identity(path: str) -> tuple:
    """What makes two paths the same file content: real path, size, modification time."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        return (real, st.st_size, st.st_mtime_ns)
    except OSError:
        return (real, None, None)


class WeightStore:
    """Shared templates by (kind, file, options); one lock; loads single-flight; LRU within a budget."""

    def __init__(self, budget: int):
        self.budget = budget
        self.lock = threading.Lock()
        self.entries: dict[Hashable, Entry] = {}
        self._shared_ptrs: dict[int, Hashable] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._released: collections.deque = collections.deque()   # (entry, gpu) from finalizers
        self.load_listeners: list[Callable[[str, float], None]] = []   # (kind, seconds) per disk load

    # -- loading -----------------------------------------------------------------------------
    def get(self, kind: str, path: str, options: Hashable, build: Callable[[], Any]) -> Any:
        """A view of the file's template, loading it first if nobody has (single-flight)."""
        key = (kind, file_identity(path), options)
        with self.lock:
            entry = self.entries.get(key)
            leader = entry is None
            if leader:
                entry = Entry(key, kind, os.path.basename(path), os.path.realpath(path))
                self.entries[key] = entry
                self.misses += 1
            else:
                self.hits += 1
            entry.pending += 1
        try:
            if leader:
                self._load(entry, build)
            else:
                entry.ready.wait()
                if entry.error is not None:
                    raise entry.error
            return self._held_or_new_view(entry)
        finally:
            with self.lock:
                entry.pending -= 1

    def _load(self, entry: Entry, build: Callable[[], Any]) -> None:
        started = time.perf_counter()
        try:
            template = build()
        except BaseException as ex:
            with self.lock:
                if self.entries.get(entry.key) is entry:
                    del self.entries[entry.key]      # the next caller tries again
            entry.error = ex
            entry.ready.set()
            raise
        plan = plan_of(template)
        storages = plan.storages()
        with self.lock:
            entry.template = template
            entry.plan = plan
            entry.storages = storages
            entry.nbytes = sum(storages.values())
            entry.loads += 1
            entry.load_seconds = time.perf_counter() - started
            for ptr in storages:
                self._shared_ptrs[ptr] = entry.key
        entry.ready.set()
        for listener in self.load_listeners:
            listener(entry.kind, entry.load_seconds)
        logger.info("comfy-multigpu: %s %s loaded once into the shared RAM cache (%.1f MiB, %.2f s)",
                    entry.kind, entry.name, entry.nbytes / 2 ** 20, entry.load_seconds)
        self.evict()

    def _held_or_new_view(self, entry: Entry) -> Any:
        """A worker's first loader call after /preload gets the preloaded view (already on its device)."""
        worker = current_worker.get()
        gpu = worker.gpu_id if worker is not None else OUTSIDE
        if holding.get():
            view = self._view(entry, gpu)
            with self.lock:
                entry.held[gpu] = view
            return view
        with self.lock:
            view = entry.held.pop(gpu, None)
            if view is not None:
                entry.last_use = time.monotonic()
        return view if view is not None else self._view(entry, gpu)

    def release_held(self, gpu: int) -> int:
        """Drop the views /preload kept for `gpu` (its /free); returns how many."""
        with self.lock:
            dropped = [e.held.pop(gpu) for e in self.entries.values() if gpu in e.held]
        return len(dropped)

    def _view(self, entry: Entry, gpu: int) -> Any:
        with self.lock:
            template, plan = entry.template, entry.plan
        view = _weakly_referable(make_view(template, plan))
        anchors = [a for a in (view if isinstance(view, tuple) else (view,)) if _referable(a)]
        remaining = [len(anchors)]
        with self.lock:
            entry.views += 1
            entry.last_use = time.monotonic()
            entry.users[gpu] = entry.users.get(gpu, 0) + 1
        for anchor in anchors:
            weakref.finalize(anchor, self._anchor_gone, entry, gpu, remaining)
        return view

    def _anchor_gone(self, entry: Entry, gpu: int, remaining: list) -> None:
        """A weakref finalizer: runs inside garbage collection, in whatever thread allocates, maybe
        one holding self.lock. So it only records the release (deque.append is atomic); the next
        store call or housekeeping pass applies it."""
        remaining[0] -= 1
        if remaining[0] <= 0:
            self._released.append((entry, gpu))

    def _apply_releases(self) -> None:
        """Apply recorded releases (self.lock held by the caller)."""
        while self._released:
            entry, gpu = self._released.popleft()
            count = entry.users.get(gpu, 0) - 1
            if count > 0:
                entry.users[gpu] = count
            else:
                entry.users.pop(gpu, None)
            entry.last_use = time.monotonic()

    # -- budget ------------------------------------------------------------------------------
    def evict(self) -> list:
        """Apply releases, then drop what is over budget (also called by the housekeeping pass)."""
        with self.lock:
            self._apply_releases()
            files = [CachedFile(e.key, e.nbytes, bool(e.users) or e.pending > 0, e.last_use)
                     for e in self._loaded()]
            gone = [self.entries.pop(k) for k in choose_evictions(files, self.budget)]
            for e in gone:
                for ptr in e.storages:
                    self._shared_ptrs.pop(ptr, None)
                e.template = e.plan = None
            self.evictions += len(gone)
        for e in gone:
            logger.info("comfy-multigpu: evicted %s %s from the shared RAM cache (%.1f MiB; budget %.1f MiB)",
                        e.kind, e.name, e.nbytes / 2 ** 20, self.budget / 2 ** 20)
        return gone

    # -- questions -----------------------------------------------------------------------------
    def is_shared(self, tensor) -> bool:
        """Does `tensor` live in a storage some template holds (so writing it would reach others)?"""
        try:
            ptr = tensor.untyped_storage().data_ptr()
        except Exception:
            return False
        return ptr in self._shared_ptrs

    def _loaded(self) -> list[Entry]:
        """Entries whose file is in RAM (not loading, not failed); self.lock held by the caller."""
        return [e for e in self.entries.values() if e.ready.is_set() and e.error is None]

    def _totals(self, entries: list[Entry]) -> dict:
        return {"bytes": sum(e.nbytes for e in entries), "budget_bytes": self.budget, "files": len(entries),
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}

    def totals(self) -> dict:
        """Bytes and files in RAM, the budget, and the hit / miss / eviction counters (GET /metrics)."""
        with self.lock:
            return self._totals(self._loaded())

    def listing(self, devices_of: Callable[[Entry], list]) -> dict:
        """For GET /multigpu/models: every file in RAM, its size, users, last use, devices."""
        now = time.monotonic()
        with self.lock:
            self._apply_releases()
            entries = self._loaded()
            files = [{"name": e.name, "type": e.kind, "path": e.path, "bytes": e.nbytes,
                      "users": sorted(g for g in e.users if g != OUTSIDE),
                      "views": sum(e.users.values()), "loads": e.loads, "views_made": e.views,
                      "load_seconds": round(e.load_seconds, 3),
                      "idle_seconds": round(now - e.last_use, 3), "preloaded_for": sorted(e.held),
                      "_entry": e} for e in entries]
            totals = self._totals(entries)
        for f in files:
            f["devices"] = devices_of(f.pop("_entry"))
        return {"sharing": True, "ram_cache": totals, "models": files}


def entry_of_module(store: WeightStore, module) -> Optional[Entry]:
    """The store entry a view's module was built from (None if not a view)."""
    sources = shared_sources(module)
    if not sources:
        return None
    first = next(iter(sources.values()))
    key = store._shared_ptrs.get(first.untyped_storage().data_ptr())
    return store.entries.get(key) if key is not None else None
