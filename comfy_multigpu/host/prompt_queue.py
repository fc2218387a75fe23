"""MultiQueue: the object that replaces PromptServer.instance.prompt_queue (execution.PromptQueue).

It offers the methods ComfyUI's routes call (server.py /prompt, /queue, /history, /free,
/api/jobs*) over one pending heap per worker and one shared history. A method called inside an
HTTP request that carries X-TARGET-GPU acts on that GPU; without it, on all GPUs (merged views).
"""
from __future__ import annotations

import copy
from typing import Callable

from ..policy import admission, placement, routing
from ..runtime.context import current_request, request_target
from ..policy.errors import ApiError
from ..runtime.pool import PendingPrompt, WorkerPool


class DuplicatePrompt(Exception):
    """The prompt id is already queued, running or done: an idempotent retry, answered with where it is."""

    def __init__(self, prompt_id: str, state: str, gpu_id: int, number: float):
        super().__init__(prompt_id)
        self.prompt_id, self.state, self.gpu_id, self.number = prompt_id, state, gpu_id, number

    def answer(self) -> dict:
        return {"prompt_id": self.prompt_id, "number": self.number, "node_errors": {}, "gpu_id": self.gpu_id,
                "duplicate": True, "state": self.state}


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
            return [placement.WorkerLoad(w.gpu_id, not w.down and not w.unhealthy, len(w.running), len(w.pending),
                                         w.recent_models(), w.weight, w.free_memory)
                    for w in self.pool.workers]

    def put(self, item: tuple) -> int:
        """Queue a stock 6-tuple on the request's target GPU (pinned: never moves), or place it in its
        pool with placement.choose_least_loaded (auto: an idle worker of the pool may take it over
        later), in the priority band X-PRIORITY / extra_data.priority asks for; returns the GPU.
        Raises routing.RequestError (400), ApiError (429 over a cap, 503 while draining) or
        DuplicatePrompt before anything is queued; the journal has it before this returns."""
        scope = current_request.get()
        where = routing.resolve(scope.target if scope is not None else None,
                                scope.headers if scope is not None else {}, item[3],
                                self.pool.pools, self.pool.default_pool)
        number = placement.queue_number(item[0], where.priority)
        if number != item[0]:
            item = (number,) + tuple(item[1:])
        gpu = self.enqueue(item, where.target, where.pool, where.eligible)
        if scope is not None:
            scope.placed_gpu, scope.placed_pool, scope.placed_number = gpu, where.pool, number
        return gpu

    def enqueue(self, item: tuple, target, pool_name, eligible, restoring: bool = False) -> int:
        pool = self.pool
        models = placement.prompt_models(item[2])
        with self.mutex:
            if not restoring:
                known = pool.locate(item[1])
                if known is not None:
                    raise DuplicatePrompt(item[1], *known)
                refusal = admission.admit(pool.limits, [len(w.running) + len(w.pending) for w in pool.workers],
                                          target, eligible, pool.draining, pool.mean_run_s)
                if refusal is not None:
                    raise refusal
            gpu = target
            if gpu is None:
                gpu = placement.choose_least_loaded(self.loads(), models, eligible)
                if gpu is None:   # no worker of the pool is up: it waits for the first one that comes up
                    gpu = min(eligible) if eligible else 0
            if pool.journal is not None and not restoring:
                try:
                    pool.journal.accepted(item, target, pool_name)
                except Exception as ex:
                    raise ApiError(503, "journal_unavailable", f"the prompt journal could not record it: {ex}",
                                   "nothing was queued; retry, and check the disk under ComfyUI's user directory",
                                   headers={"Retry-After": "5"}) from None
            pool.pending[item[1]] = PendingPrompt(models, target is None, eligible, item[0])
            pool.workers[gpu].push(item, pinned=target is not None)
            pool.wake_idle()
        self.server.queue_updated()
        return gpu

    def restore(self, journal) -> tuple[int, int]:
        """Start-up: finished prompts back into history, unfinished ones back into the queues (pinned
        ones to their GPU if it still exists, the rest placed anew); returns (history, requeued)."""
        pool = self.pool
        with self.mutex:
            for prompt_id, entry in journal.history():
                pool.history[prompt_id] = entry
        requeued = 0
        highest = -1.0
        for u in journal.unfinished():
            target = u.target if u.target is not None and u.target < len(pool.workers) else None
            name = u.pool if u.pool in pool.pools else None
            eligible = frozenset(pool.pools[name]) if name is not None else None
            if target is not None and eligible is not None and target not in eligible:
                target = None
            item = (u.number, u.prompt_id, u.prompt, u.extra_data, u.outputs, {})
            self.enqueue(item, target, name, eligible, restoring=True)
            requeued += 1
            highest = max(highest, abs(u.number) % placement.PRIORITY_SPAN)
        if requeued and self.server is not None:      # new prompts queue after the restored ones
            self.server.number = max(getattr(self.server, "number", 0), int(highest) + 1)
        return len(pool.history), requeued

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
            removed = []
            for w in self._scope_workers():
                for item in w.pending:
                    self.pool.forget_pending(item[1])
                    removed.append(item[1])
                w.pending.clear()
                w.pinned.clear()
            if self.pool.journal is not None:
                self.pool.journal.forget(removed)
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
            prompt_id = worker.pending.pop(index)[1]
            self.pool.forget_pending(prompt_id)
            heapq.heapify(worker.pending)
            if self.pool.journal is not None:
                self.pool.journal.forget([prompt_id])
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
            if self.pool.journal is not None:
                self.pool.journal.forget_history()

    def delete_history_item(self, id_to_delete) -> None:
        with self.mutex:
            if self.pool.history.pop(id_to_delete, None) is not None and self.pool.journal is not None:
                self.pool.journal.forget([id_to_delete])

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
                "housekeeping": {"gc_runs": self.pool.gc_runs, "gc_frozen_objects": self.pool.gc_frozen,
                                 "last_pass_ms": round(1000 * self.pool.gc_last_s, 1)}}


def make_multiqueue(original, pool):
    """Factory for the manifest: replaces the stock PromptQueue (which must still be empty)."""
    if original.get_tasks_remaining():
        raise RuntimeError("the stock prompt queue already holds prompts; cannot swap it")
    return MultiQueue(pool, original.server)
