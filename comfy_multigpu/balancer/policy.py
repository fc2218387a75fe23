"""Balancer policy (pure): the backend slots (one per GPU of a comfy-multigpu instance, one per stock
instance) and which one a prompt goes to; the same rules as in-process placement
(comfy_multigpu.policy.placement.choose_least_loaded): healthy only, idle first, then the slot that has the
prompt's models, then the least weighted load."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

from ..policy.placement import WorkerLoad, choose_least_loaded


@dataclass(frozen=True)
class Slot:
    backend: str                   # backend name (its URL)
    gpu: Optional[int]             # GPU index on a comfy-multigpu backend, None for a stock instance
    healthy: bool
    running: int
    pending: int
    weight: float = 1.0
    models: tuple = ()             # model keys it ran lately, oldest first (comfy-multigpu backends)


def choose_slot(slots: Sequence[Slot], models: frozenset = frozenset(),
                exclude: frozenset = frozenset(), depth: int = 0) -> Optional[Slot]:
    """The slot a prompt goes to, never one of a backend in `exclude` (failed this time) nor, with
    depth > 0, one that already has `depth` prompts (running + queued); None if no slot can take it
    now (the balancer then holds the prompt until one can)."""
    loads = [WorkerLoad(i, s.healthy and s.backend not in exclude and (depth <= 0 or s.running + s.pending < depth),
                        s.running, s.pending, s.models, s.weight)
             for i, s in enumerate(slots)]
    index = choose_least_loaded(loads, models)
    return None if index is None else slots[index]


def with_submitted(slots: Sequence[Slot], chosen: Slot, count: int = 1) -> list[Slot]:
    """The view after sending one prompt to `chosen` (count=-1: it did not go after all), until the
    next poll says better."""
    return [replace(s, pending=max(0, s.pending + count))
            if (s.backend, s.gpu) == (chosen.backend, chosen.gpu) else s for s in slots]
