"""Routing policy as pure functions: reading X-TARGET-GPU, placing "auto" prompts, and choosing
which waiting auto prompt an idle worker takes over from a busy one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

HEADER = "X-TARGET-GPU"
AUTO = "auto"


class TargetError(ValueError):
    """X-TARGET-GPU names no usable GPU; carries the value seen and the values that are valid."""

    def __init__(self, value: str, valid: list, reason: str):
        self.value = value
        self.valid = valid
        self.reason = reason
        super().__init__(f"{HEADER} {value!r} {reason}")

    def as_json(self) -> dict:
        """Stock ComfyUI error shape (type/message/details/extra_info) plus node_errors, as /prompt uses."""
        valid_text = ", ".join(str(v) for v in self.valid)
        return {
            "error": {
                "type": "invalid_target_gpu",
                "message": str(self),
                "details": f"valid values: {valid_text}",
                "extra_info": {"header": HEADER, "value": self.value, "valid": self.valid},
            },
            "node_errors": {},
        }


@dataclass(frozen=True)
class WorkerLoad:
    """What placement needs to know of one worker at one moment."""
    gpu_id: int
    up: bool
    running: int
    pending: int
    models: frozenset = frozenset()     # model files its recent prompts loaded (see prompt_models)


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


def valid_targets(gpu_count: int, down: frozenset[int] = frozenset()) -> list:
    return [AUTO] + [i for i in range(gpu_count) if i not in down]


def parse_target(raw: str | None, gpu_count: int, down: frozenset[int] = frozenset()) -> int | None:
    """None for auto (header absent, empty or "auto"), else the GPU index; raises TargetError."""
    if raw is None:
        return None
    value = raw.strip()
    if value == "" or value.lower() == AUTO:
        return None
    if not value.isascii() or not value.isdigit():
        raise TargetError(raw, valid_targets(gpu_count, down), "is not a GPU index or 'auto'")
    index = int(value)
    if index >= gpu_count:
        raise TargetError(raw, valid_targets(gpu_count, down), f"is out of range: this server has {gpu_count} GPU(s)")
    if index in down:
        raise TargetError(raw, valid_targets(gpu_count, down), "names a GPU that is down")
    return index


def choose_least_loaded(loads: Sequence[WorkerLoad], models: frozenset = frozenset()) -> int | None:
    """The up worker with the fewest running + pending prompts; among equally loaded ones the one that
    already ran most of the prompt's `models`; then the lowest index."""
    candidates = [w for w in loads if w.up]
    if not candidates:
        return None
    best = min(candidates, key=lambda w: (w.running + w.pending, -len(models & w.models), w.gpu_id))
    return best.gpu_id


@dataclass(frozen=True)
class Waiting:
    """An auto-placed prompt waiting in a busy worker's queue: a candidate to be taken over."""
    prompt_id: str
    number: float           # queue order (lower first; "front" prompts are negative)
    owner: int              # the GPU whose queue holds it now
    models: frozenset = frozenset()


def choose_takeover(idle_models: frozenset, waiting: Sequence[Waiting]) -> Optional[Waiting]:
    """What an idle worker takes from busy workers' queues: the earliest-queued auto prompt, preferring
    one whose models it already ran (so that the takeover does not cost a model load)."""
    if not waiting:
        return None
    return min(waiting, key=lambda w: (-len(idle_models & w.models), w.number, w.prompt_id))
