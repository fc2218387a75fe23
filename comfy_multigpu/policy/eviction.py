"""RAM-cache policy for shared model files (pure functions, no torch, no threads).

- parse_ram_budget: COMFY_MULTIGPU_RAM_CACHE -> bytes (None = sharing off).
- choose_evictions: over budget, the least recently used files that no worker uses go first.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

DEFAULT_RAM_CACHE = "70%"          # of total RAM: leaves room for the OS, activations and node caches
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib|t|tb|tib)?$")
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2, "mb": 1024 ** 2,
          "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1024 ** 3, "gib": 1024 ** 3, "t": 1024 ** 4,
          "tb": 1024 ** 4, "tib": 1024 ** 4}


class BudgetError(ValueError):
    """The RAM-cache setting is not understood; the message says what is valid."""


def parse_ram_budget(raw: str, total_ram: int, name: str = "COMFY_MULTIGPU_RAM_CACHE") -> Optional[int]:
    """ "off" -> None (every worker loads its own copy, stock behaviour); "24GB" / "24 GiB" / "512m"
    / "25769803776" -> bytes (units are powers of 1024); "70%" -> that share of total RAM.
    Empty -> DEFAULT_RAM_CACHE."""
    text = (raw or "").strip().lower() or DEFAULT_RAM_CACHE
    if text in ("off", "no", "false", "none"):
        return None
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            percent = -1.0
        if not (0 < percent <= 100):
            raise BudgetError(f"{name}={raw!r}: a percentage must be above 0 and at most 100 (e.g. 70%)")
        return int(total_ram * percent / 100)
    match = _SIZE_RE.match(text)
    if not match:
        raise BudgetError(f"{name}={raw!r} is not understood; use off, a size (e.g. 24GB, 512MB, "
                          f"bytes) or a share of RAM (e.g. 70%)")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


@dataclass(frozen=True)
class CachedFile:
    key: Hashable
    nbytes: int
    in_use: bool           # some worker still holds a copy built from it: never evicted
    last_use: float        # monotonic time it was last handed out or let go


def choose_evictions(files: Sequence[CachedFile], budget: int) -> list:
    """Keys to drop, least recently used first, until the rest fits the budget. Files in use are
    skipped (their memory could not be freed anyway); if only they remain, the cache stays over."""
    total = sum(f.nbytes for f in files)
    out = []
    for f in sorted(files, key=lambda f: f.last_use):
        if total <= budget:
            break
        if f.in_use:
            continue
        out.append(f.key)
        total -= f.nbytes
    return out
