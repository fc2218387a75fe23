"""The host patches a process worker's child needs, and its /preload.

A child owns its ComfyUI process, so the isolation patches are not needed there; it applies the
manifest's entries marked `process_child = true` (shared weights through the main process's segment
store, output-file numbering reserved across all workers) through the same PatchSet, with the same
guards, against a small pool-like object whose stores ask the main process.

Host objects touched: those manifest entries' targets; nodes' loaders (preload),
comfy.model_management.load_models_gpu.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from ..runtime.child_weights import ChildSaveNames, ChildWeights, Notes
from ..runtime.weight_views import PinCounts
from . import patching

logger = logging.getLogger("comfy_multigpu")


@dataclass
class ChildPool:
    """What the child's patches read where the main process's read the WorkerPool."""
    weights: Optional[ChildWeights]
    save_names: ChildSaveNames
    pin_counts: PinCounts = field(default_factory=PinCounts)


@dataclass
class ChildLease:
    """What a prompt's nodes note for its history entry in a child (sent back with its result)."""
    notes: dict = field(default_factory=dict)


@dataclass
class ChildWorker:
    """current_worker in the child: its GPU id (the patches key reservations by it), its device, and
    the running prompt's notes."""
    gpu_id: int
    device: Any = None
    label: str = ""
    lease: ChildLease = field(default_factory=ChildLease)
    process_child: bool = True


_state: dict[str, Any] = {}


def install(child, sharing: bool) -> list[str]:
    """Apply the child's patches and make the calling thread the worker's; returns the applied ids."""
    from ..runtime.context import current_worker
    notes = Notes(child.link.send)
    pool = ChildPool(ChildWeights(child.call, notes) if sharing else None, ChildSaveNames(child.call, child.link.send))
    _host, specs = patching.load_manifest()
    patchset = patching.PatchSet([s for s in specs if s.process_child], pool)
    problems = patchset.problems()
    if problems:
        raise RuntimeError("process worker patches do not fit this ComfyUI: " + "; ".join(problems))
    applied = patchset.apply()
    import comfy.model_management
    device = comfy.model_management.get_torch_device()
    current_worker.set(ChildWorker(child.gpu_id, device, str(device)))
    _state.update(pool=pool, patches=patchset)
    return applied


def take_notes() -> dict:
    """The running prompt's notes so far, and a fresh notebook for the next one."""
    from ..runtime.context import current_worker
    worker = current_worker.get()
    if not isinstance(worker, ChildWorker):
        return {}
    notes, worker.lease = worker.lease.notes, ChildLease()
    return notes


def release_held() -> int:
    pool = _state.get("pool")
    return pool.weights.release_held() if pool is not None and pool.weights is not None else 0


def preload(kind: str, name: str, onto_device: bool) -> str:
    """The file into shared memory (and, `onto_device`, onto this child's GPU), the view kept for the
    next loader call of that file; "on_device" or "in_ram"."""
    import comfy.model_management
    from ..runtime import preload as preloading
    from ..runtime import weights
    token = weights.holding.set(True)
    try:
        view = preloading.load(kind, name)
        patchers = preloading.device_patchers(view) if onto_device else []
        if patchers:
            comfy.model_management.load_models_gpu(patchers)
        return "on_device" if patchers else "in_ram"
    finally:
        weights.holding.reset(token)
