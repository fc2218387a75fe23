"""Per-worker views of a shared model template, and what keeps them sharing: tensor aliasing,
offload back to the shared CPU tensors, pin counts for shared host addresses.

A view is a deep copy of the template whose torch modules are new skeleton objects and whose every
Parameter / buffer is a new tensor object over the template's storage, so a worker's LoRA patches,
hooks and device moves replace its own tensor objects and never touch another's. The store that
hands views out is in runtime/weights.py; docs/weights.md has the long form.

Host objects touched: none directly (host/sharing.py and the pool call in here).
"""
from __future__ import annotations

import copy
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Optional

# module -> {parameter/buffer name: the shared CPU tensor it was built from}
_SHARED_SOURCES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


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


def register_shared(obj: Any) -> None:
    """`obj`'s modules now hold shared tensors (a segment mapped by a process worker's child): the
    offload wrappers point them back there, as they do for views."""
    for module, sources in plan_of(obj).modules:
        _SHARED_SOURCES[module] = sources


def forget_shared(obj) -> None:
    """The torch module `obj`'s modules no longer point back at the tensors they were viewed from (a copy moved to
    another device, which nothing offloads: the back references would only keep those alive)."""
    for module in obj.modules():
        _SHARED_SOURCES.pop(module, None)


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
