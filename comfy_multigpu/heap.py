"""The C heap under N worker threads (glibc malloc; elsewhere these do nothing).

glibc gives each thread that allocates its own arena (up to 8 per core) and keeps the pages of
freed blocks in it. ComfyUI with one worker thread hardly notices; N worker threads each keep what
their activations used: about 15 MiB per CPU worker measured with the tiny checkpoint, far more with
real images (docs/weights.md). Two remedies, both in the standard C library:
- cap_arenas (prestartup, before the worker threads exist): mallopt(M_ARENA_MAX, n);
- release_free_heap (the housekeeping pass after prompts): malloc_trim(0) hands freed pages back.
Host objects touched: none (libc only).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger("comfy_multigpu")

M_ARENA_MAX = -8          # glibc malloc.h


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_LIBC = _libc()


def cap_arenas(count: int) -> bool:
    """At most `count` malloc arenas for the whole process (0: leave glibc's default)."""
    if count <= 0 or _LIBC is None:
        return False
    return bool(_LIBC.mallopt(M_ARENA_MAX, count))


def release_free_heap() -> None:
    """Give freed heap pages back to the OS."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
