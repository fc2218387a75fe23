"""Per-worker execution bookkeeping: progress registry, graph-expansion prefixes, RAM-cache release.

Host state made per worker: comfy_execution/progress.py global_progress_registry (321-348),
GraphBuilder's class-level default prefix (comfy_execution/graph_utils.py:13-43), and
comfy/memory_management.py's release callback + headroom (175-187).
"""
from __future__ import annotations

from .per_worker import per_worker


def make_get_progress_state(original, pool):
    def registry(worker):
        if worker.host_state.progress_registry is None:
            from comfy_execution.graph import DynamicPrompt
            from comfy_execution.progress import ProgressRegistry
            worker.host_state.progress_registry = ProgressRegistry(prompt_id="", dynprompt=DynamicPrompt({}))
        return worker.host_state.progress_registry
    return per_worker(original, registry)


def make_reset_progress_state(original, pool):
    def reset(worker, prompt_id, dynprompt):
        from comfy_execution.progress import ProgressRegistry
        if worker.host_state.progress_registry is not None:
            worker.host_state.progress_registry.reset_handlers()
        worker.host_state.progress_registry = ProgressRegistry(prompt_id, dynprompt)
    return per_worker(original, reset)


def make_set_default_prefix(original, pool):
    def set_prefix(worker, cls, prefix_root, call_index, graph_index=0):
        worker.host_state.graph_prefix[:] = [prefix_root, call_index, graph_index]
    return classmethod(per_worker(original.__func__, set_prefix))


def make_alloc_prefix(original, pool):
    def alloc(worker, cls, root=None, call_index=None, graph_index=None):
        state = worker.host_state.graph_prefix
        root = state[0] if root is None else root
        call_index = state[1] if call_index is None else call_index
        graph_index = state[2] if graph_index is None else graph_index
        state[2] += 1          # stock increments the default graph index on every allocation
        return f"{root}.{call_index}.{graph_index}."
    return classmethod(per_worker(original.__func__, alloc))


def make_set_ram_cache_release_state(original, pool):
    def set_state(worker, callback, headroom):
        worker.host_state.ram_release_callback = callback
        worker.host_state.ram_headroom = max(0, int(headroom))
    return per_worker(original, set_state)


def make_extra_ram_release(original, pool):
    def release(worker, target, free_active=False):
        if worker.host_state.ram_release_callback is None:
            return 0
        # Both host callers pass the module's RAM_CACHE_HEADROOM, which inside a worker is its own.
        return worker.host_state.ram_release_callback(max(target, worker.host_state.ram_headroom), free_active=free_active)
    return per_worker(original, release)
