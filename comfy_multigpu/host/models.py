"""Loaded-model bookkeeping safe for concurrent workers (comfy/model_management.py:619, 863-1061).

One lock serialises every change to current_loaded_models; each worker records the LoadedModel
entries it loaded; freeing memory never unloads a model another busy worker uses on the same
device; unload_all_models inside a worker (/free, out-of-memory recovery, --disable-smart-memory)
unloads that worker's device only.
"""
from __future__ import annotations

import functools
import time

from ..runtime.context import current_worker
from .per_worker import per_worker


def make_load_models_gpu(original, pool):
    import comfy.model_management as mm

    @functools.wraps(original)
    def load_models_gpu(models, *args, **kwargs):
        with pool.model_lock:
            before = {id(loaded.model) for loaded in mm.current_loaded_models}
            started = time.perf_counter()
            result = original(models, *args, **kwargs)
            elapsed = time.perf_counter() - started
            worker = current_worker.get()
            if worker is not None:
                wanted = {id(m) for m in models}
                for loaded in mm.current_loaded_models:
                    if id(loaded.model) in wanted:
                        worker.note_loaded(loaded)
                new = sum(1 for m in models if id(m) not in before)
                if new:
                    pool.note_device_load(worker.gpu_id, elapsed, new)
            return result
    return load_models_gpu


def make_free_memory(original, pool):
    @functools.wraps(original)
    def free_memory(memory_required, device, keep_loaded=(), *args, **kwargs):
        with pool.model_lock:
            in_use = pool.models_in_use_by_others(current_worker.get(), device)
            keep = list(keep_loaded) + [m for m in in_use if m not in keep_loaded]
            return original(memory_required, device, keep, *args, **kwargs)
    return free_memory


def make_unload_all_models(original, pool):
    import comfy.model_management as mm

    # mm.free_memory is looked up at call time: the patched one, which spares busy workers' models.
    return per_worker(original, lambda worker: mm.free_memory(1e30, worker.device))


def make_locked(original, pool):
    """Any other reader or writer of current_loaded_models, run under the bookkeeping lock."""
    @functools.wraps(original)
    def locked(*args, **kwargs):
        with pool.model_lock:
            return original(*args, **kwargs)
    return locked


def make_cleanup_models(original, pool):
    """cleanup_models also runs from weakref.finalize in any thread: never block there, skip if busy."""
    @functools.wraps(original)
    def cleanup_models():
        if not pool.model_lock.acquire(blocking=False):
            return None      # the holder changes the list; the next call drops dead entries
        try:
            return original()
        finally:
            pool.model_lock.release()
    return cleanup_models
