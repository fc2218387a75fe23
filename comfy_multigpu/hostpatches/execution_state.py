"""Per-worker execution bookkeeping: progress registry, graph-expansion prefixes, RAM-cache release.

Host state made per worker: comfy_execution/progress.py global_progress_registry (321-348),
GraphBuilder's class-level default prefix (comfy_execution/graph_utils.py:13-43), and
comfy/memory_management.py's release callback + headroom (175-187).
"""
from __future__ import annotations

import functools

from ..context import current_worker


def make_get_progress_state(original, pool):
    @functools.wraps(original)
    def get_progress_state():
        worker = current_worker.get()
        if worker is None:
            return original()
        if worker.progress_registry is None:
            from comfy_execution.graph import DynamicPrompt
            from comfy_execution.progress import ProgressRegistry
            worker.progress_registry = ProgressRegistry(prompt_id="", dynprompt=DynamicPrompt({}))
        return worker.progress_registry
    return get_progress_state


def make_reset_progress_state(original, pool):
    @functools.wraps(original)
    def reset_progress_state(prompt_id, dynprompt):
        worker = current_worker.get()
        if worker is None:
            return original(prompt_id, dynprompt)
        from comfy_execution.progress import ProgressRegistry
        if worker.progress_registry is not None:
            worker.progress_registry.reset_handlers()
        worker.progress_registry = ProgressRegistry(prompt_id, dynprompt)
    return reset_progress_state


def make_set_default_prefix(original, pool):
    stock = original.__func__

    @functools.wraps(stock)
    def set_default_prefix(cls, prefix_root, call_index, graph_index=0):
        worker = current_worker.get()
        if worker is None:
            return stock(cls, prefix_root, call_index, graph_index)
        worker.graph_prefix[:] = [prefix_root, call_index, graph_index]
    return classmethod(set_default_prefix)


def make_alloc_prefix(original, pool):
    stock = original.__func__

    @functools.wraps(stock)
    def alloc_prefix(cls, root=None, call_index=None, graph_index=None):
        worker = current_worker.get()
        if worker is None:
            return stock(cls, root, call_index, graph_index)
        state = worker.graph_prefix
        root = state[0] if root is None else root
        call_index = state[1] if call_index is None else call_index
        graph_index = state[2] if graph_index is None else graph_index
        state[2] += 1          # stock increments the default graph index on every allocation
        return f"{root}.{call_index}.{graph_index}."
    return classmethod(alloc_prefix)


def make_set_ram_cache_release_state(original, pool):
    @functools.wraps(original)
    def set_ram_cache_release_state(callback, headroom):
        worker = current_worker.get()
        if worker is None:
            return original(callback, headroom)
        worker.ram_release_callback = callback
        worker.ram_headroom = max(0, int(headroom))
    return set_ram_cache_release_state


def make_extra_ram_release(original, pool):
    @functools.wraps(original)
    def extra_ram_release(target, free_active=False):
        worker = current_worker.get()
        if worker is None:
            return original(target, free_active=free_active)
        if worker.ram_release_callback is None:
            return 0
        # Both host callers pass the module's RAM_CACHE_HEADROOM, which inside a worker is its own.
        return worker.ram_release_callback(max(target, worker.ram_headroom), free_active=free_active)
    return extra_ram_release
