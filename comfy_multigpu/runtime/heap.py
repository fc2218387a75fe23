"""The heaps under N worker threads: Python's cyclic garbage collector and the C heap (glibc malloc;
elsewhere the C part does nothing).

Python: a full gc.collect() holds the GIL for as long as it scans every tracked object, and one process
holds torch, ComfyUI and its nodes: about 635,000 objects, 325 ms a pass on the 2 cores here. Stock
ComfyUI's worker pays that between its own prompts; in one process for N GPUs every worker waits for it.
- freeze_startup_objects (once, before the workers start): gc.collect() then gc.freeze() moves what
  start-up left alive out of all later collections (1-2 ms a pass afterwards). What is created later
  (models, views, prompt state) is collected as before.

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
import gc
import logging
import time

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


def freeze_startup_objects() -> tuple[int, float]:
    """Collect, then exclude every object still alive from later collections: (objects frozen, seconds)."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count(), time.perf_counter() - started
