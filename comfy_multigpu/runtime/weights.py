"""Model files held once in CPU RAM for every worker: the shared store, per-worker views, offload
back to the shared tensors, copy-on-write.

How it shares (docs/weights.md has the long form):
- A loader (checkpoint, diffusion model, text encoder, VAE, ControlNet; LoRA state dicts) runs once
  per file and set of options; its result is the *template* and is never handed out.
- Every caller gets a *view*: a deep copy of the template whose torch modules are new skeleton objects
  and whose every Parameter / buffer is a new tensor object over the template's storage. A worker's
  LoRA patches, hooks and device moves replace its own tensor objects and never touch another's.
- Writes into shared storage (ComfyUI's copy_to_param / weight_inplace_update) become copy-on-write
  (host/sharing.py); a device that offloads points its tensors back at the shared CPU tensors.
- Single-flight: the first caller loads, concurrent callers for the same file wait for it.
- Budget: over COMFY_MULTIGPU_RAM_CACHE, the least recently used files no view uses are dropped.

Host objects touched: none directly (host/sharing.py calls in here).
"""
from __future__ import annotations

import collections
import contextvars
import copy
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Optional

from .context import current_worker
from ..policy.eviction import CachedFile, choose_evictions

logger = logging.getLogger("comfy_multigpu")

OUTSIDE = -1     # "user" id for views made outside any worker thread

# Set by /preload in a worker: the view made is kept for that worker's next prompt (see Entry.held).
holding: contextvars.ContextVar = contextvars.ContextVar("comfy_multigpu_hold", default=False)

# module -> {parameter/buffer name: the shared CPU tensor it was built from}
_SHARED_SOURCES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class SharedStateDict(dict):
    """A view of a shared state dict (LoRA files): a dict that can be weakly referenced."""


# ---- finding the tensors of a loader's result ---------------------------------------------------
def _modules_and_tensors(obj: Any, depth: int = 5, seen: Optional[set] = None):
    """torch modules and loose tensors reachable from a loader's result (objects, dicts, lists)."""
    import torch
    seen = set() if seen is None else seen
    if obj is None or id(obj) in seen or depth < 0:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        yield "module", obj
        return
    if isinstance(obj, torch.Tensor):
        yield "tensor", obj
        return
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        children = [v for k, v in vars(obj).items() if k != "tokenizer"]
    else:
        return
    if len(children) > 64 and not any(isinstance(c, (torch.Tensor, torch.nn.Module)) for c in children[:64]):
        return           # vocabularies and other big tables hold no weights
    for child in children:
        yield from _modules_and_tensors(child, depth - 1, seen)


def _module_tensors(module) -> Iterable[tuple[str, Any]]:
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for name, t in list(sub._parameters.items()) + list(sub._buffers.items()):
            if t is not None:
                yield (f"{prefix}.{name}" if prefix else name), t


def _alias(t):
    """A new tensor object over the same storage (a new Parameter for a Parameter)."""
    import torch
    if type(t) is torch.nn.Parameter:
        return torch.nn.Parameter(t.data, requires_grad=t.requires_grad)
    if type(t) is torch.Tensor:
        return t.detach()
    return t          # tensor subclasses (quantized weights): shared object, documented in docs/weights.md


def shared_storages(template: Any) -> dict[int, int]:
    """data_ptr -> bytes of every CPU storage in a template (each counted once)."""
    return plan_of(template).storages()


def _tokenizers(template: Any) -> list:
    """Text tokenizers, shared by every view: built once from the file, read-only afterwards. ComfyUI
    calls them the same way every time (SDTokenizer: `tokenizer(word)`), so the Rust-backed ones never
    change their truncation state after the first call and are safe in several threads; copying
    one costs 130 ms and 15 MiB per view (CLIP-L, measured), more than the rest of a view."""
    return [obj.tokenizer for obj in (template if isinstance(template, tuple) else (template,))
            if obj is not None and getattr(obj, "tokenizer", None) is not None]


def _skeleton(module, memo: dict):
    """A new module object of the same class: own __dict__, own parameter/buffer/child dicts, own
    hook dicts and lists; tensors aliased (same storage), submodules recursively, other attributes
    shared (read-only configuration: model_config, latent_format, dtypes). 5-10x faster than
    copy.deepcopy of the module tree, which dominated a view's cost."""
    import torch
    done = memo.get(id(module))
    if done is not None:
        return done
    new = module.__class__.__new__(module.__class__)
    memo[id(module)] = new
    state = {}
    for name, value in module.__dict__.items():
        if name == "_modules":
            value = {k: (_skeleton(m, memo) if m is not None else None) for k, m in value.items()}
        elif name in ("_parameters", "_buffers"):
            value = {k: (_aliased(t, memo) if t is not None else None) for k, t in value.items()}
        elif isinstance(value, torch.Tensor):
            value = _aliased(value, memo)
        elif isinstance(value, torch.nn.Module):
            value = _skeleton(value, memo)
        elif isinstance(value, (dict, list, set)):
            value = value.copy()            # hook dicts, weight_function lists: per view
        state[name] = value
    new.__dict__.update(state)
    return new


def _aliased(t, memo: dict):
    done = memo.get(id(t))
    if done is None:
        done = memo[id(t)] = _alias(t)
    return done


@dataclass
class Plan:
    """What make_view needs to know about a template, found once per template."""
    modules: list            # (module, {name: tensor})
    tensors: list            # loose tensors (state dicts)
    tokenizers: list

    def storages(self) -> dict[int, int]:
        """data_ptr -> bytes of every CPU storage the template's tensors use (each counted once)."""
        out = {}
        tensors = [t for _, sources in self.modules for t in sources.values()] + self.tensors
        for t in tensors:
            if t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            if storage.data_ptr():
                out[storage.data_ptr()] = storage.nbytes()
        return out


def plan_of(template: Any) -> Plan:
    modules, tensors = [], []
    for kind, obj in _modules_and_tensors(template):
        if kind == "tensor":
            tensors.append(obj)
        else:
            modules.append((obj, dict(_module_tensors(obj))))
    return Plan(modules, tensors, _tokenizers(template))


def _inference(plan: Plan) -> bool:
    for t in plan.tensors:
        return t.is_inference()
    for _, sources in plan.modules:
        for t in sources.values():
            return t.is_inference()
    return False


def make_view(template: Any, plan: Optional[Plan] = None) -> Any:
    """A copy of `template` that shares every tensor's storage; modules are new skeletons, the
    objects around them (ModelPatcher, CLIP, VAE, ...) deep copies."""
    import torch
    plan = plan or plan_of(template)
    memo: dict[int, Any] = {}
    # A template loaded inside a prompt holds inference tensors (ComfyUI runs nodes under
    # torch.inference_mode); new Parameters over them can only be made in that mode too.
    with torch.inference_mode(_inference(plan)):
        for t in plan.tensors:
            _aliased(t, memo)
        for module, _ in plan.modules:
            _skeleton(module, memo)
        for obj in plan.tokenizers:
            memo[id(obj)] = obj
        view = copy.deepcopy(template, memo)
    for module, sources in plan.modules:
        _SHARED_SOURCES[memo[id(module)]] = sources
    return view


def shared_sources(module) -> Optional[dict]:
    return _SHARED_SOURCES.get(module)


def repoint_to_shared(module, skip: Iterable[str] = (), only_on: Optional[str] = None) -> int:
    """Point `module`'s tensors back at the shared CPU tensors they were built from (after, or instead
    of, copying them to the CPU). `skip`: names whose current value must stay (patched weights);
    `only_on`: touch only tensors now on this device type ("cpu": what an offload just copied).
    Returns how many tensors now share again."""
    sources = _SHARED_SOURCES.get(module)
    if not sources:
        return 0
    skip = set(skip)
    count = 0
    for name, t in _module_tensors(module):
        src = sources.get(name)
        if src is None or name in skip or t.data_ptr() == src.data_ptr():
            continue
        if only_on is not None and t.device.type != only_on:
            continue
        if t.shape != src.shape or t.dtype != src.dtype:
            continue             # cast to another dtype on purpose: not ours to undo
        t.data = src
        count += 1
    return count


class PinCounts:
    """How many holders pinned each host address. The host pins by data_ptr in one global dict; with
    shared storage two devices pin the same address, and the first unpin must not unregister it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts: dict[int, int] = {}

    def pin(self, tensor, original, already_pinned) -> bool:
        ptr = tensor.data_ptr()
        with self.lock:
            if self.counts.get(ptr, 0) > 0 and already_pinned(ptr, tensor):
                self.counts[ptr] += 1
                return True
            ok = original(tensor)
            if ok:
                self.counts[ptr] = 1
            return ok

    def unpin(self, tensor, original) -> bool:
        ptr = tensor.data_ptr()
        with self.lock:
            count = self.counts.get(ptr, 0)
            if count > 1:
                self.counts[ptr] = count - 1
                return True
            self.counts.pop(ptr, None)
            return original(tensor)


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
        self.on_load: Optional[Callable[[str, float], None]] = None  # (kind, seconds) per disk load

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
        if self.on_load is not None:
            self.on_load(entry.kind, entry.load_seconds)
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
    sources = _SHARED_SOURCES.get(module)
    if not sources:
        return None
    first = next(iter(sources.values()))
    key = store._shared_ptrs.get(first.untyped_storage().data_ptr())
    return store.entries.get(key) if key is not None else None
