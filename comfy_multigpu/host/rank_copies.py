"""Copies of a sequence-parallel prompt's model (and VAE decoder) on the other GPUs of its lease
(issue 17): made in each rank's own thread, after room was made on its device, kept for the lease and
dropped when it ends.

- A copy is made from rank 0's module as it runs (LoRA and other weight patches already applied): a
  view of its tensors (weight_views.make_view: no memory), then moved to the rank's device. It is
  remade whenever rank 0's module holds other tensor objects than those it was made from (ComfyUI's
  ModelPatcher puts a new Parameter in place of every weight it patches, and back when unpatching), so
  a different LoRA later in the same prompt never meets a stale copy.
- Before a copy is made, ComfyUI's free_memory (patched: it spares busy workers' models) makes room
  for it on the rank's device, in the thread of the rank's worker: its own idle models are unloaded
  if need be, never the models of a worker that runs a prompt.
- A model whose weights are tensor subclasses its layers do not move themselves (GGUF-style
  quantized tensors) cannot be copied without moving rank 0's weights too: `uncopyable` says why and
  the prompt runs on one GPU. ComfyUI's own quantized layers move their weights themselves.

Host objects touched: comfy.model_management.free_memory (called). The copies are not known to
ComfyUI's model management: they live as long as the lease (Lease.scratch), then the GPU's cache is
emptied by the worker's housekeeping.
"""
from __future__ import annotations

import logging
import threading
import weakref
from typing import Any, Optional

logger = logging.getLogger("comfy_multigpu")

RESERVE_FRACTION = 0.25          # room made beyond a copy's weights: the rank's activations
SCRATCH_KEY = "rank_copies"


class RankCopies:
    """One lease's copies, one per device: the copy and what it was made from (weak references to the
    source's modules, tensors and on-the-fly weight patches: a copy never keeps rank 0's replaced
    weights alive, and a source that changed in any of them is copied again)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict = {}            # device -> (source's signature, copy)

    def on(self, source, device) -> Any:
        """`source` (a torch module on rank 0's device) on `device`; call it in the rank's thread, one
        rank per device at a time."""
        import torch
        device = torch.device(device)
        parts = _signature(source)
        with self._lock:
            entry = self._entries.get(str(device))
            if entry is not None and len(entry[0]) == len(parts) and all(ref() is p for ref, p in zip(entry[0], parts)):
                return entry[1]
            # another model (Wan 2.2's second expert), or this one's weights changed: the old copy's
            # memory is needed first
            self._entries.pop(str(device), None)
        copy = make_copy(source, device)
        with self._lock:
            self._entries[str(device)] = ([weakref.ref(p) for p in parts], copy)
        return copy

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def copies_of(lease) -> RankCopies:
    """The lease's RankCopies (made by rank 0 before its ranks start)."""
    copies = lease.scratch.get(SCRATCH_KEY)
    if copies is None:
        copies = lease.scratch[SCRATCH_KEY] = RankCopies()
    return copies


def on_devices(module, devices: list, workers: Optional[list] = None) -> list:
    """`module` for each rank: the same module where the rank's device is rank 0's (CPU workers, two
    workers on one GPU), else the calling worker's lease's copy on that device (outside a lease, a
    copy for this call only), made in the rank's own thread (so the room for it is made among that
    worker's models, and the copies to several GPUs are made at once), once per device."""
    import torch
    from ..runtime.context import current_worker
    from ..runtime.rank_group import RankGroup, run_ranks
    devices = [torch.device(d) for d in devices]
    out = [module] * len(devices)
    if all(d == devices[0] for d in devices):
        return out
    lease = getattr(current_worker.get(), "lease", None)
    copies = copies_of(lease) if lease is not None else RankCopies()
    first = {}                                    # device -> the rank that makes its copy
    for rank, device in enumerate(devices):
        first.setdefault(device, rank)

    def place(rank: int) -> bool:
        if devices[rank] != devices[0] and first[devices[rank]] == rank:
            out[rank] = copies.on(module, devices[rank])
        return True
    run_ranks(RankGroup(devices), place, workers)
    return [out[first[d]] for d in devices]


def _tensors(module) -> list:
    return [t for m in module.modules() for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]


def _signature(module) -> list:
    """What a copy of `module` depends on: its modules, their tensors, and the weight patches ComfyUI
    applies on the fly in low-VRAM mode (comfy.ops' weight_function / bias_function lists)."""
    parts = []
    for m in module.modules():
        parts.append(m)
        parts.extend(t for t in (*m._parameters.values(), *m._buffers.values()) if t is not None)
        for name in ("weight_function", "bias_function"):
            parts.extend(f for f in getattr(m, name, None) or () if _weakrefable(f))
    return parts


def _weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def make_copy(source, device):
    """A copy of `source` on `device`, room made for it there first."""
    import torch
    from ..runtime import weight_views
    tensors = _tensors(source)
    size = sum(t.nbytes for t in tensors if t.device != device)
    if device.type == "cuda":
        import comfy.model_management as mm
        mm.free_memory(size * (1 + RESERVE_FRACTION), device)
    view = weight_views.make_view(source)
    weight_views.forget_shared(view)        # not offloaded by ComfyUI: no way back to rank 0's tensors
    with torch.inference_mode(any(t.is_inference() for t in tensors[:1])):
        return view.to(device)


def uncopyable(module) -> Optional[str]:
    """Why `module` cannot be copied to another device without moving its own weights (None: it can):
    a weight that is a tensor subclass of a layer that does not move its weights itself is shared,
    not aliased, by a view, and Module.to would move that shared object."""
    import torch
    plain = (torch.Tensor, torch.nn.Parameter)
    for m in module.modules():
        if type(m)._apply is not torch.nn.Module._apply:
            continue
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None and type(t) not in plain:
                return (f"its weights are {type(t).__name__} tensors (a tensor subclass), which cannot be copied "
                        f"to another GPU without moving the first GPU's")
    return None
