"""MultiQueue: the object that replaces PromptServer.instance.prompt_queue (execution.PromptQueue).

It offers the methods ComfyUI's routes call (server.py /prompt, /queue, /history, /free,
/api/jobs*) over one pending heap per worker and one shared history. A method called inside an
HTTP request that carries X-TARGET-GPU acts on that GPU; without it, on all GPUs (merged views).
"""
from __future__ import annotations

import copy
from typing import Callable

from . import placement, routing
from .context import current_request, request_target
from .pool import PendingPrompt, WorkerPool


class MultiQueue:
    def __init__(self, pool: WorkerPool, server):
        self.pool = pool
        self.server = server
        self.mutex = pool.mutex

    def _scope_workers(self):
        target = request_target()
        if target is None:
            return self.pool.workers
        return [self.pool.workers[target]]

    # ---- placement -------------------------------------------------------------------------
    def loads(self) -> list[placement.WorkerLoad]:
        with self.mutex:
            return [placement.WorkerLoad(w.gpu_id, not w.down, len(w.running), len(w.pending),
                                         w.recent_models(), w.weight, w.free_memory)
                    for w in self.pool.workers]

    def put(self, item: tuple) -> int:
        """Queue a stock 6-tuple on the request's target GPU (pinned: never moves), or place it in its
        pool with placement.choose_least_loaded (auto: an idle worker of the pool may take it over
        later), in the priority band X-PRIORITY / extra_data.priority asks for; returns the GPU.
        Raises routing.RequestError (answered 400 by the middleware) before anything is queued."""
        scope = current_request.get()
        pool = self.pool
        where = routing.resolve(scope.target if scope is not None else None,
                                scope.headers if scope is not None else {}, item[3],
                                pool.pools, pool.default_pool)
        number = placement.queue_number(item[0], where.priority)
        if number != item[0]:
            item = (number,) + tuple(item[1:])
        models = placement.prompt_models(item[2])
        with self.mutex:
            gpu = where.target
            if gpu is None:
                gpu = placement.choose_least_loaded(self.loads(), models, where.eligible)
                if gpu is None:   # no worker of the pool is up: it waits for the first one that comes up
                    gpu = min(where.eligible) if where.eligible else 0
            pool.pending[item[1]] = PendingPrompt(models, where.target is None, where.eligible)
            pool.workers[gpu].push(item)
            pool.wake_idle()
            if scope is not None:
                scope.placed_gpu, scope.placed_pool, scope.placed_number = gpu, where.pool, number
        self.server.queue_updated()
        return gpu

    # ---- views -----------------------------------------------------------------------------
    def get_current_queue(self):
        with self.mutex:
            running, pending = self.get_current_queue_volatile()
            return running, copy.deepcopy(pending)

    def get_current_queue_volatile(self):
        with self.mutex:
            running, pending = [], []
            for w in self._scope_workers():
                running.extend(w.running.values())
                pending.extend(w.pending)
            pending.sort(key=lambda item: (item[0], item[1]))
            return running, pending

    def get_tasks_remaining(self) -> int:
        with self.mutex:
            return sum(len(w.pending) + len(w.running) for w in self._scope_workers())

    def tasks_remaining_of(self, gpu_id: int) -> int:
        with self.mutex:
            w = self.pool.workers[gpu_id]
            return len(w.pending) + len(w.running)

    # ---- changes ---------------------------------------------------------------------------
    def wipe_queue(self) -> None:
        with self.mutex:
            for w in self._scope_workers():
                for item in w.pending:
                    self.pool.forget_pending(item[1])
                w.pending.clear()
        self.server.queue_updated()

    def delete_queue_item(self, function: Callable[[tuple], bool]) -> bool:
        """Delete the first pending item `function` accepts, in whichever GPU's queue holds it."""
        import heapq
        with self.mutex:
            hit = next(((w, i) for w in self.pool.workers for i, item in enumerate(w.pending)
                        if function(item)), None)
            if hit is None:
                return False
            worker, index = hit
            self.pool.forget_pending(worker.pending.pop(index)[1])
            heapq.heapify(worker.pending)
        self.server.queue_updated()
        return True

    def interrupt_if_running(self, prompt_id: str) -> bool:
        """Interrupt only the worker running `prompt_id`, atomically with respect to task_done."""
        with self.mutex:
            worker = self.pool.find_running(prompt_id)
            if worker is None:
                return False
            worker.set_interrupt(True)
            return True

    def interrupt_scope(self) -> list[int]:
        """Interrupt the request's GPU, or every busy GPU; returns the GPUs interrupted."""
        with self.mutex:
            hit = [w for w in self._scope_workers() if w.busy]
            for w in hit:
                w.set_interrupt(True)
            return [w.gpu_id for w in hit]

    def set_flag(self, name: str, data) -> None:
        with self.mutex:
            for w in self._scope_workers():
                w.flags[name] = data
                w.cond.notify()

    # ---- history (global) -----------------------------------------------------------------
    def get_history(self, prompt_id=None, max_items=None, offset=-1, map_function=None):
        """Same contract as execution.PromptQueue.get_history; entries carry "gpu_id"."""
        history = self.pool.history
        with self.mutex:
            if prompt_id is None:
                out = {}
                if offset < 0 and max_items is not None:
                    offset = len(history) - max_items
                for i, k in enumerate(history):
                    if i >= offset:
                        p = history[k]
                        out[k] = map_function(p) if map_function is not None else p
                        if max_items is not None and len(out) >= max_items:
                            break
                return out
            if prompt_id in history:
                p = history[prompt_id]
                return {prompt_id: map_function(p) if map_function is not None else copy.deepcopy(p)}
            return {}

    def wipe_history(self) -> None:
        with self.mutex:
            self.pool.history.clear()

    def delete_history_item(self, id_to_delete) -> None:
        with self.mutex:
            self.pool.history.pop(id_to_delete, None)

    # ---- /queue/all ------------------------------------------------------------------------
    def all_queues(self, counts_only: bool) -> dict:
        with self.mutex:
            queues = []
            for w in self.pool.workers:
                entry = w.snapshot()
                if not counts_only:
                    entry["queue_running"] = [item[:5] for item in w.running.values()]
                    entry["queue_pending"] = [item[:5] for item in sorted(w.pending)]
                queues.append(entry)
        return {"queues": queues,
                "pools": {name: list(gpus) for name, gpus in self.pool.pools.items()},
                "default_pool": self.pool.default_pool,
                "total_running": sum(q["running_count"] for q in queues),
                "total_pending": sum(q["pending_count"] for q in queues),
                "housekeeping": {"gc_runs": self.pool.gc_runs}}


def make_multiqueue(original, pool):
    """Factory for the manifest: replaces the stock PromptQueue (which must still be empty)."""
    if original.get_tasks_remaining():
        raise RuntimeError("the stock prompt queue already holds prompts; cannot swap it")
    return MultiQueue(pool, original.server)
