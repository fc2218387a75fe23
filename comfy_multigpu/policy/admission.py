"""Admission policy (pure): whether a prompt may be queued now, given queue caps and draining; the
refusal says why and when to retry (429 over a cap, 503 while draining)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from .errors import ApiError


@dataclass(frozen=True)
class Limits:
    per_gpu: int = 0         # most running + waiting prompts per GPU (0: no cap)
    total: int = 0           # most in the whole process (0: no cap)


def retry_after(mean_run_s: float) -> int:
    """Seconds until a slot is likely free: one prompt's mean run time, at least 1 s, at most 60 s
    (5 s before any prompt ran)."""
    if mean_run_s <= 0:
        return 5
    return max(1, min(60, math.ceil(mean_run_s)))


def draining_refusal(mean_run_s: float = 0.0) -> ApiError:
    return ApiError(503, "draining", "the server is shutting down and takes no new prompts",
                    "send it to another instance, or retry after the restart",
                    headers={"Retry-After": str(retry_after(mean_run_s))})


def admit(limits: Limits, counts: Sequence[int], target: Optional[int], eligible: Optional[frozenset],
          draining: bool, mean_run_s: float = 0.0) -> Optional[ApiError]:
    """None to accept; else the refusal. `counts` are running + waiting per GPU; a pinned prompt
    needs room on its GPU, an auto one on any GPU it may run on."""
    total = sum(counts)
    wait = retry_after(mean_run_s)
    if draining:
        return draining_refusal(mean_run_s)
    if limits.total and total >= limits.total:
        return ApiError(429, "queue_full", f"the queue is full: {total} prompts (cap {limits.total})",
                        f"retry after {wait} s", {"cap": limits.total, "queued": total},
                        headers={"Retry-After": str(wait)})
    if limits.per_gpu:
        gpus = [target] if target is not None else sorted(eligible if eligible is not None else range(len(counts)))
        if all(counts[g] >= limits.per_gpu for g in gpus):
            where = f"GPU {target}" if target is not None else f"every GPU it may run on ({', '.join(map(str, gpus))})"
            return ApiError(429, "queue_full", f"{where} has {limits.per_gpu} prompts queued (cap per GPU)",
                            f"retry after {wait} s", {"cap_per_gpu": limits.per_gpu, "gpus": gpus},
                            headers={"Retry-After": str(wait)})
    return None
