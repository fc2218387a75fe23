"""MultiQueue: the object that replaces PromptServer.instance.prompt_queue (execution.PromptQueue).

It offers the methods ComfyUI's routes call (server.py /prompt, /queue, /history, /free,
/api/jobs*) and translates them into scheduler calls: stock 6-tuples in, typed prompts inside,
6-tuples out. A method called inside an HTTP request that carries X-TARGET-GPU acts on that GPU;
without it, on all GPUs (merged views). It holds no queue state of its own.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable

from ..policy import placement, routing, sequence_split
from ..runtime.context import current_request, request_target
from ..runtime.pool import WorkerPool
from ..runtime.prompt import QueuedPrompt


class MultiQueue:
    def __init__(self, pool: WorkerPool, server):
        self.pool = pool
        self.scheduler = pool.scheduler
        self.server = server

    def _scope(self):
        """The GPUs a request acts on: its X-TARGET-GPU, else all (None)."""
        target = request_target()
        return None if target is None else [target]

    # ---- admission -------------------------------------------------------------------------
    def put(self, item: tuple) -> int:
        """Queue a stock 6-tuple on the request's target GPU (pinned: never moves), or place it in its
        pool (auto: an idle worker of the pool may take it over later), in the priority band
        X-PRIORITY / extra_data.priority asks for; returns the GPU. Raises routing.RequestError (400),
        ApiError (429 over a cap, 503 while draining) or DuplicatePrompt before anything is queued;
        the journal has it before this returns."""
        scope = current_request.get()
        where = routing.resolve(scope.target if scope is not None else None,
                                scope.headers if scope is not None else {}, item[3],
                                self.scheduler.pools, self.scheduler.default_pool)
        body = scope.body if scope is not None else {}
        item = self._with_sequence_parallel(item, scope, where)
        number = item[0] if "number" in body else self.scheduler.stock_number(item[0], bool(body.get("front")))
        number = placement.queue_number(number, where.priority)
        prompt = QueuedPrompt.from_stock((number,) + tuple(item[1:]), target=where.target, pool=where.pool,
                                         eligible=where.eligible, priority=where.priority)
        if self.pool.fleet is not None:
            return self._put_fleet(prompt, scope, where, body)
        gpu = self.scheduler.admit(prompt)
        if scope is not None:
            scope.placed_gpu, scope.placed_pool, scope.placed_number = gpu, where.pool, number
        return gpu

    def _put_fleet(self, prompt: QueuedPrompt, scope, where, body: dict) -> int:
        """Into the fleet's queue: X-TARGET-GPU means a GPU of this machine, X-TARGET-NODE a machine."""
        headers = scope.headers if scope is not None else {}
        node = scope.node if scope is not None else None
        if node is not None and node != self.pool.fleet.settings.node:
            prompt = dataclasses.replace(prompt, target=scope.remote_gpu, pool=None, eligible=None)
        placed = self.scheduler.admit(prompt, node=node, front=bool(body.get("front")),
                                      idempotency_key=headers.get("Idempotency-Key", ""))
        if scope is not None:
            scope.placed_gpu, scope.placed_pool, scope.placed_number = placed.gpu, where.pool, placed.number
            scope.placed_fleet = placed.where()
        return placed.gpu if placed.gpu is not None else -1

    def _with_sequence_parallel(self, item: tuple, scope, where) -> tuple:
        """X-SEQUENCE-PARALLEL: N GPUs per image, or auto: the GPUs of the prompt's pool that are free
        when it starts (up to every one that is up; the model's head and token counts may use fewer)."""
        raw = scope.headers.get(routing.SEQUENCE_PARALLEL_HEADER) if scope is not None else None
        gpus = routing.parse_sequence_parallel(raw)
        if gpus is None:
            return item
        auto = gpus == "auto"
        if auto:
            members = where.eligible if where.eligible is not None else range(len(self.pool.workers))
            gpus = max(1, sum(1 for g in members if not self.pool.workers[g].down))
        graph = sequence_split.with_sequence_parallel(item[2], gpus, auto=auto)
        return (item[0], item[1], graph) + tuple(item[3:])

    # ---- views -----------------------------------------------------------------------------
    def get_current_queue(self):
        running, pending = self.get_current_queue_volatile()
        return running, copy.deepcopy(pending)

    def get_current_queue_volatile(self):
        running, pending = self.scheduler.queue_items(self._scope())
        return [lease.record for lease in running], [p.stock() for p in pending]

    def get_tasks_remaining(self) -> int:
        return self.scheduler.tasks_remaining(self._scope())

    def tasks_remaining_of(self, gpu_id: int) -> int:
        return self.scheduler.tasks_remaining([gpu_id])

    # ---- changes ---------------------------------------------------------------------------
    def wipe_queue(self) -> None:
        self.scheduler.cancel(lambda prompt: True, self._scope())

    def delete_queue_item(self, function: Callable[[tuple], bool]) -> bool:
        """Delete the first pending item `function` accepts, in whichever GPU's queue holds it."""
        return bool(self.scheduler.cancel(lambda prompt: function(prompt.stock()), first_only=True))

    def interrupt_if_running(self, prompt_id: str) -> bool:
        """Interrupt only the worker running `prompt_id` (by its lease: a prompt that already ended
        is not interrupted, and neither is the next one on that GPU); in a fleet, wherever it runs."""
        if self.interrupt_here(prompt_id):
            return True
        fleet = self.pool.fleet
        if fleet is not None and fleet.relay is not None:
            known = self.scheduler.locate(prompt_id)
            if known is not None and known[0] == "running":
                fleet.relay.interrupt(prompt_id)
                return True
        return False

    def interrupt_here(self, prompt_id: str) -> bool:
        """Interrupt `prompt_id` if one of this machine's workers runs it."""
        for worker in self.pool.workers:
            lease = worker.lease
            if lease is not None and lease.prompt_id == prompt_id and not lease.ended.is_set():
                return worker.interrupt_lease(lease)
        return False

    def interrupt_scope(self) -> list[int]:
        """Interrupt the request's GPU, or every busy GPU; returns the GPUs interrupted."""
        scope = self._scope()
        hit = [w for w in self.pool.workers if (scope is None or w.gpu_id in scope) and w.busy]
        for w in hit:
            w.set_interrupt(True)
        return [w.gpu_id for w in hit]

    def set_flag(self, name: str, data) -> None:
        self.scheduler.post(self._scope(), name, data)

    # ---- history (global) -----------------------------------------------------------------
    def get_history(self, prompt_id=None, max_items=None, offset=-1, map_function=None):
        """Same contract as execution.PromptQueue.get_history; entries carry "gpu_id"."""
        return self.scheduler.history(prompt_id, max_items, offset, map_function)

    def wipe_history(self) -> None:
        self.scheduler.clear_history()

    def delete_history_item(self, id_to_delete) -> None:
        self.scheduler.forget_history(id_to_delete)      # an unknown id (None included): nothing

    # ---- /queue/all ------------------------------------------------------------------------
    def all_queues(self, counts_only: bool) -> dict:
        snap = self.scheduler.snapshot(detail=not counts_only)
        queues = []
        for worker, q in zip(self.pool.workers, snap.gpus):
            entry = worker.info()
            entry.update({"healthy": not q.unhealthy, "running_count": len(q.running),
                          "pending_count": q.pending_count})
            if len(q.leases) and q.leases[0].gpu_ids != (worker.gpu_id,):
                lease = q.leases[0]
                entry["lease"] = {"prompt_id": lease.prompt_id, "gpus": list(lease.gpu_ids),
                                  "rank": lease.rank_of(worker.gpu_id)}
            if q.held_for:            # idle, kept free for a prompt of several GPUs until enough are free
                entry["held_for"] = q.held_for
            if not counts_only:
                entry["queue_running"] = [lease.record[:5] for lease in q.leases if lease.gpu_id == worker.gpu_id]
                entry["queue_pending"] = [p.public() for p in q.pending]
            queues.append(entry)
        pool = self.pool
        return {"queues": queues,
                "pools": {name: list(gpus) for name, gpus in self.scheduler.pools.items()},
                "default_pool": self.scheduler.default_pool,
                "total_running": sum(q["running_count"] for q in queues),
                "total_pending": sum(q["pending_count"] for q in queues),
                "housekeeping": {"gc_runs": pool.gc_runs, "gc_frozen_objects": pool.gc_frozen,
                                 "last_pass_ms": round(1000 * pool.gc_last_s, 1)}}


def make_multiqueue(original, pool):
    """Factory for the manifest: replaces the stock PromptQueue (which must still be empty)."""
    if original.get_tasks_remaining():
        raise RuntimeError("the stock prompt queue already holds prompts; cannot swap it")
    return MultiQueue(pool, original.server)
