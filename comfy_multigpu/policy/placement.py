"""Placement policy as pure functions over a snapshot of worker state: where an auto prompt is queued,
which waiting prompt an idle worker takes over, the models a prompt loads, and priority ranks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional, Sequence

PRIORITIES = ("high", "normal", "low")
LOOKAHEAD = 64          # a free worker chooses among the first LOOKAHEAD prompts it may run (queue order)
PRIORITY_SPAN = 1e9     # queue numbers: high < 0 <= normal < PRIORITY_SPAN <= low
GIB = 1 << 30


def queue_number(number: float, priority: Optional[str]) -> float:
    """The heap number that puts a prompt in its priority band (None: keep stock's number, where
    "front": true already made it negative). Within a band, earlier prompts go first."""
    if priority is None:
        return number
    base = abs(number)
    return {"high": base - PRIORITY_SPAN, "normal": base, "low": base + PRIORITY_SPAN}[priority]


def base_number(number: float) -> float:
    """The counter value a queue number was made from (queue_number's inverse): high-priority numbers
    lie in [-PRIORITY_SPAN, -PRIORITY_SPAN/2), stock "front" ones (-counter) above that, low ones at or
    past PRIORITY_SPAN."""
    if number < -PRIORITY_SPAN / 2:
        return number + PRIORITY_SPAN
    if number < 0:
        return -number
    return number - PRIORITY_SPAN if number >= PRIORITY_SPAN else number


def priority_rank(number: float) -> int:
    """0 high (also stock's "front"), 1 normal, 2 low."""
    return 0 if number < 0 else (2 if number >= PRIORITY_SPAN else 1)


# Loader inputs that name a model file (CheckpointLoaderSimple, UNETLoader, CLIPLoader, DualCLIPLoader,
# VAELoader, LoraLoader, ControlNetLoader, UpscaleModelLoader, ...).
MODEL_INPUTS = ("ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "clip_name3",
                "vae_name", "lora_name", "control_net_name", "model_name", "style_model_name")


def prompt_models(prompt: Mapping) -> frozenset:
    """The model files an API-format prompt loads, as "input:filename" keys (from its loader nodes)."""
    keys = set()
    for node in prompt.values() if isinstance(prompt, Mapping) else ():
        inputs = node.get("inputs") if isinstance(node, Mapping) else None
        if not isinstance(inputs, Mapping):
            continue
        for name in MODEL_INPUTS:
            value = inputs.get(name)
            if isinstance(value, str) and value:
                keys.add(f"{name}:{value}")
    return frozenset(keys)


@dataclass(frozen=True)
class WorkerLoad:
    """What placement needs to know of one worker at one moment."""
    gpu_id: int
    up: bool
    running: int
    pending: int
    models: tuple = ()                     # model keys its recent prompts loaded, oldest first
    weight: float = 1.0                    # relative speed (COMFY_MULTIGPU_GPU_WEIGHTS)
    free_memory: Optional[int] = None      # bytes free on its device after its last prompt (None: CPU)

    @property
    def idle(self) -> bool:
        return self.running + self.pending == 0


def recency(recent: Sequence[str]) -> dict[str, int]:
    """Model key -> how many other models the worker used since (0 = used last); `recent` oldest first."""
    return {key: len(recent) - 1 - i for i, key in enumerate(recent)}


def affinity(age: Mapping[str, int], models: frozenset) -> tuple[int, int]:
    """How well a worker (its models' `recency`) suits a prompt, smaller is better: how many of the
    prompt's models it has not used lately, then how stale the stalest one it has is (the fresher,
    the likelier it is still loaded)."""
    missing = 0
    stale = 0
    for key in models:
        a = age.get(key)
        if a is None:
            missing += 1
        elif a > stale:
            stale = a
    return missing, stale


def _load_cost(w: WorkerLoad, models: frozenset) -> tuple:
    """Smaller is cheaper: the worker's affinity to the prompt's models, then, if it must load any,
    more free device memory (whole GiB, so that noise does not decide) to load into without evicting."""
    missing, stale = affinity(recency(w.models), models)
    free = (w.free_memory or 0) // GIB if missing else 0
    return (missing, stale, -free)


def choose_least_loaded(loads: Sequence[WorkerLoad], models: frozenset = frozenset(),
                        eligible: Optional[frozenset] = None) -> Optional[int]:
    """Where an auto prompt is queued, among up workers in `eligible` (None: all).

    An idle worker if there is one: the one that already has the prompt's models, then the one where
    loading them is cheapest, then the fastest (weight), then the lowest index. If all are busy: the
    one whose queue (running + pending + this prompt) drains first at its weight, then by models and
    index. Either way an idle worker may take the prompt over later (choose_takeover)."""
    candidates = [w for w in loads if w.up and (eligible is None or w.gpu_id in eligible)]
    if not candidates:
        return None
    idle = [w for w in candidates if w.idle]
    if idle:
        best = min(idle, key=lambda w: (_load_cost(w, models), -w.weight, w.gpu_id))
    else:
        best = min(candidates, key=lambda w: ((w.running + w.pending + 1) / w.weight,
                                              _load_cost(w, models), w.gpu_id))
    return best.gpu_id


class Waiting(NamedTuple):
    """A prompt a free worker may start: one of its own pending prompts, or an auto-placed one waiting
    in a busy worker's queue. (A NamedTuple: up to LOOKAHEAD are made per start.)"""
    prompt_id: str
    number: float           # queue order (lower first; high priority and "front" prompts are negative)
    owner: int              # the GPU whose queue holds it now
    models: frozenset = frozenset()
    eligible: Optional[frozenset] = None   # GPUs of its pool (None: any)
    overtaken: int = 0                     # later prompts started before it to spare a model load
    pinned: bool = False                   # X-TARGET-GPU: only its owner may run it


def choose_next(gpu_id: int, recent: Sequence[str], waiting: Sequence[Waiting],
                max_overtakes: int = 0) -> Optional[Waiting]:
    """What free worker `gpu_id` (recent models `recent`, oldest first) starts next.

    Only prompts its pool allows, and only the highest priority band among them. In that band, a
    prompt already overtaken `max_overtakes` times goes first (oldest first); otherwise the one whose
    models the worker ran lately (no model load), then the earliest queued. max_overtakes=0 is plain
    first-come-first-served per band."""
    allowed = [w for w in waiting if w.eligible is None or gpu_id in w.eligible]
    if not allowed:
        return None
    band = min(priority_rank(w.number) for w in allowed)
    allowed = [w for w in allowed if priority_rank(w.number) == band]
    overdue = [w for w in allowed if w.pinned or w.overtaken >= max_overtakes]
    if overdue:
        return min(overdue, key=lambda w: (w.number, w.prompt_id))
    age = recency(recent)
    return min(allowed, key=lambda w: (affinity(age, w.models), w.number, w.prompt_id))


def overtaken_by(gpu_id: int, chosen: Waiting, waiting: Sequence[Waiting]) -> list[str]:
    """The prompts worker `gpu_id` could have started instead of `chosen`: same band, queued before it
    (their overtaken counts grow)."""
    rank = priority_rank(chosen.number)
    return [w.prompt_id for w in waiting if w.number < chosen.number and priority_rank(w.number) == rank
            and (w.eligible is None or gpu_id in w.eligible)]
