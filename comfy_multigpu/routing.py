"""Routing policy as pure functions: reading X-TARGET-GPU and choosing a worker for "auto" prompts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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


def choose_least_loaded(loads: Sequence[WorkerLoad]) -> int | None:
    """The up worker with the fewest running + pending prompts; ties go to the lowest index."""
    candidates = [w for w in loads if w.up]
    if not candidates:
        return None
    best = min(candidates, key=lambda w: (w.running + w.pending, w.gpu_id))
    return best.gpu_id
