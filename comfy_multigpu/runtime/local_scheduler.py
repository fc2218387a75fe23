"""LocalScheduler: the in-process Scheduler. One lock guards every GPU's pending heap, the leases and
the history; each worker waits on its own condition of that lock. Placement choices come from the
pure functions of policy/placement.py and policy/admission.py. Host objects touched: none.
"""
from __future__ import annotations

import copy
import heapq
import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ..policy import admission, placement
from ..policy.admission import Limits
from ..policy.errors import ApiError
from .history import History
from .prompt import ExecutionStatus, Lease, QueuedPrompt
from .scheduler import DuplicatePrompt, GpuQueue, Member, QueueSnapshot, Scheduler
from .startable import fit_gang, gang_gpus, queue_order, startable

logger = logging.getLogger("comfy_multigpu")

@dataclass
class _Slot:
    """One GPU's queue state (the scheduler's lock guards it)."""
    cond: threading.Condition
    pending: list = field(default_factory=list)   # heap of (number, prompt id, QueuedPrompt)
    pinned: list = field(default_factory=list)    # heap of (number, prompt id) of its pinned prompts
    lease: Optional[Lease] = None                 # the lease it runs (rank 0) or is reserved for
    held_for: str = ""                            # held free for this due gang prompt (starts nothing later)
    shows: bool = False                           # idle with a gang it could not start: others see its queue
    unhealthy: str = ""                           # why the watchdog holds it out ("" = fine)
    mailbox: dict = field(default_factory=dict)


class LocalScheduler(Scheduler):
    def __init__(self, members: Sequence[Member], pools: Optional[dict] = None, max_overtakes: int = 0,
                 limits: Limits = Limits(), journal=None, on_change: Optional[Callable[[], None]] = None,
                 max_gang: int = 0):
        self._lock = threading.RLock()
        self._members = list(members)
        self._slots = [_Slot(threading.Condition(self._lock)) for _ in self._members]
        self.pools: dict = dict(pools or {"all": tuple(range(len(self._members)))})
        self.default_pool: Optional[str] = "default" if "default" in self.pools else None
        self.max_overtakes = max_overtakes
        self._gang_turn = 0                     # gang leases granted (round-robin strategies)
        self.max_gang = max_gang                # most GPUs one prompt may lease (0: its pool's size)
        self.limits = limits
        self.journal = journal                 # runtime.journal.Journal or None
        self.on_change = on_change             # called outside the lock after every change
        self._waiting: dict[str, tuple[int, QueuedPrompt]] = {}   # prompt id -> (queue's GPU, prompt)
        self._overtaken: dict[str, int] = {}   # waiting id -> later prompts started before it
        self._history = History()
        self._lease_ids = itertools.count()
        self._draining = False
        self._closed = False
        self.mean_run_s = 0.0                  # moving average of run time (Retry-After)
        self.number_floor = 0                  # stock numbers start after the restored prompts'

    # ---- admission -------------------------------------------------------------------------
    def stock_number(self, number: float, front: bool = False) -> float:
        """A number from stock's counter (server.number, negated for "front") moved past the restored
        prompts, so that new prompts queue after them; ComfyUI's counter itself is left alone."""
        return number - self.number_floor if front or number < 0 else number + self.number_floor

    def admit(self, prompt: QueuedPrompt, restoring: bool = False) -> int:
        with self._lock:
            if not restoring:
                known = self.locate(prompt.prompt_id)
                if known is not None:
                    raise DuplicatePrompt(prompt.prompt_id, *known)
                refusal = admission.admit(self.limits, self._counts(), prompt.target, prompt.eligible,
                                          self._draining, self.mean_run_s)
                if refusal is not None:
                    raise refusal
            prompt = fit_gang(prompt, self.max_gang or len(self._members))
            gpu = prompt.target
            if gpu is None:
                gpu = placement.choose_least_loaded(self._loads(), prompt.models, prompt.eligible)
                if gpu is None:   # no worker of the pool is up: it waits for the first that comes up
                    gpu = min(prompt.eligible) if prompt.eligible else 0
            if self.journal is not None and not restoring:
                try:
                    self.journal.accepted(prompt)
                except Exception as ex:
                    raise ApiError(503, "journal_unavailable", f"the prompt journal could not record it: {ex}",
                                   "nothing was queued; retry, and check the disk under ComfyUI's user directory",
                                   headers={"Retry-After": "5"}) from None
            self._push(gpu, prompt)
        self._changed()
        return gpu

    def restore(self, journal) -> tuple[int, int]:
        """Start-up: finished prompts back into history, unfinished ones back into the queues (pinned
        ones to their GPU if it still exists, the rest placed anew); returns (history, requeued)."""
        with self._lock:
            for prompt_id, entry in journal.history():
                self._history.add(prompt_id, entry)
        requeued, highest = 0, -1.0
        for u in journal.unfinished():
            target = u.target if u.target is not None and u.target < len(self._members) else None
            name = u.pool if u.pool in self.pools else None
            eligible = frozenset(self.pools[name]) if name is not None else None
            if target is not None and eligible is not None and target not in eligible:
                target = None
            self.admit(QueuedPrompt.from_stock((u.number, u.prompt_id, u.prompt, u.extra_data, u.outputs),
                                               target=target, pool=name, eligible=eligible), restoring=True)
            requeued += 1
            highest = max(highest, placement.base_number(u.number))
        if requeued:       # new prompts queue after the restored ones
            self.number_floor = max(self.number_floor, int(highest) + 1)
        return len(self._history), requeued

    def cancel(self, match, gpus=None, first_only=False) -> list:
        removed = []
        with self._lock:
            for gpu in self._gpus(gpus):
                slot = self._slots[gpu]
                hits = [entry for entry in slot.pending if match(entry[2])]
                if first_only:
                    hits = hits[:1]
                if not hits:
                    continue
                ids = {entry[1] for entry in hits}
                slot.pending[:] = [entry for entry in slot.pending if entry[1] not in ids]
                heapq.heapify(slot.pending)
                for prompt_id in ids:
                    self._forget_waiting(prompt_id)
                removed.extend(sorted(ids))
                if first_only:
                    break
            if removed:
                if self.journal is not None:
                    self.journal.forget(removed)
                self.wake()              # a worker held for a deleted gang prompt takes other work
        if removed:
            self._changed()
        return removed

    # ---- leases ----------------------------------------------------------------------------
    def take_next(self, gpu_id: int) -> Optional[Lease]:
        with self._lock:
            lease = self._take(gpu_id)
        if lease is not None:
            self._changed()
        return lease

    def wait_next(self, gpu_id: int) -> tuple[Optional[Lease], dict]:
        """Messages first (a /free or /preload sent while a prompt ran is done right after it), then
        the next lease; notifications go out after the lock is released."""
        slot = self._slots[gpu_id]
        with self._lock:
            while True:
                if self._closed:
                    return None, {}
                if slot.mailbox:
                    messages, slot.mailbox = slot.mailbox, {}
                    return None, messages
                lease = self._take(gpu_id)
                if lease is not None:
                    break
                slot.cond.wait()
        self._changed()
        return lease, {}

    def _take(self, gpu_id: int) -> Optional[Lease]:
        """take_next inside the lock, without notifying.

        A gang prompt that cannot start (too few free GPUs of its pool) is passed over, and counts
        as overtaken by what starts instead; once overtaken max_overtakes times (at once with 0) it is
        due: a free worker of its pool then starts nothing later than it and holds itself free
        (`held_for`) until enough are free, so a stream of single-GPU prompts cannot starve it. An
        idle worker passing one over shows its queue to the others, which may start it."""
        slot = self._slots[gpu_id]
        slot.held_for, slot.shows = "", False
        if self._draining or self._closed or slot.lease is not None:
            return None
        waiting = self._startable(gpu_id)
        passed: list = []                                         # gangs too few free GPUs could start
        while True:
            chosen = placement.choose_next(gpu_id, self._members[gpu_id].recent_models(), waiting,
                                           self.max_overtakes)
            if chosen is None:
                slot.shows = bool(passed)
                return None
            prompt = self._waiting[chosen.prompt_id][1]
            gpus = gang_gpus(gpu_id, prompt, self._free_for(prompt), self._loads(), self._gang_turn)
            if gpus is not None:
                break
            if chosen.overtaken >= self.max_overtakes and self._can_gather(prompt):
                slot.held_for, slot.shows = prompt.prompt_id, True
                return None
            passed.append(chosen)
            waiting = [w for w in waiting if w is not chosen]     # not enough free GPUs yet
        for prompt_id in placement.overtaken_by(gpu_id, chosen, waiting):
            self._overtaken[prompt_id] = self._overtaken.get(prompt_id, 0) + 1
        for w in passed:                   # also when what starts instead is of a lower band
            self._overtaken[w.prompt_id] = self._overtaken.get(w.prompt_id, 0) + 1
        self._unqueue(chosen.owner, prompt)
        if chosen.owner != gpu_id:
            logger.info("[GPU %s] Took over prompt %s waiting behind GPU %s", gpu_id, prompt.prompt_id,
                        chosen.owner)
        self._gang_turn += len(gpus) > 1
        return self._grant(prompt, gpus)

    def lease_workers(self, prompt: QueuedPrompt, gpu_ids: Sequence[int]) -> Optional[Lease]:
        gpus = tuple(sorted(set(gpu_ids)))
        with self._lock:
            known = self.locate(prompt.prompt_id)
            if known is not None:
                raise DuplicatePrompt(prompt.prompt_id, *known)
            if not gpus or self._closed or self._draining or any(not self._is_free(g) for g in gpus):
                return None
            lease = self._grant(prompt, gpus)
        self._changed()
        return lease

    def requeue(self, lease: Lease) -> None:
        lease.scratch.clear()              # the ranks' model copies, before their GPUs take other work
        with self._lock:
            self._release(lease)
            prompt = lease.prompt
            self._push(prompt.target if prompt.target is not None else lease.gpu_id, prompt)
        self._changed()

    def finish(self, lease: Lease, result: dict, status: ExecutionStatus, run_s: float = 0.0) -> dict:
        prompt = lease.prompt
        entry = {"prompt": lease.record[:5], "outputs": {}, "status": copy.deepcopy(status._asdict())}
        entry.update(result)
        entry["gpu_id"] = lease.gpu_id
        if len(lease.gpu_ids) > 1:
            entry["gpu_ids"] = list(lease.gpu_ids)
        entry.update(lease.notes)
        lease.scratch.clear()              # the ranks' model copies, before their GPUs take other work
        with self._lock:
            self._release(lease)
            self._history.add(prompt.prompt_id, entry)
            self.mean_run_s = run_s if not self.mean_run_s else 0.9 * self.mean_run_s + 0.1 * run_s
        # Outside the lock (workers and POST /prompt wait on it): the journal accepted this prompt
        # before it was queued, so the order of the two writes holds without it.
        if self.journal is not None:
            try:
                self.journal.finished(prompt.prompt_id, lease.gpu_id, entry)
            except Exception:
                logger.exception("[GPU %s] Journal: could not record that %s finished", lease.gpu_id,
                                 prompt.prompt_id)
        self._changed()
        return entry

    def post(self, gpu_ids, name, value, append=False) -> None:
        with self._lock:
            for gpu in self._gpus(gpu_ids):
                slot = self._slots[gpu]
                if append:
                    slot.mailbox.setdefault(name, []).append(value)
                else:
                    slot.mailbox[name] = value
                slot.cond.notify()

    # ---- state -----------------------------------------------------------------------------
    @property
    def draining(self) -> bool:
        return self._draining

    def start_draining(self) -> bool:
        with self._lock:
            was, self._draining = self._draining, True
            self.wake()                    # held workers let go (nothing starts while draining)
        return not was

    def stop_draining(self) -> None:
        with self._lock:
            self._draining = False
            self.wake()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for slot in self._slots:
                slot.cond.notify_all()

    def wake(self) -> None:
        with self._lock:
            for gpu, slot in enumerate(self._slots):
                if slot.lease is None:
                    slot.cond.notify()

    def check_health(self, now: float, limit_s: float) -> None:
        """Watchdog: a lease older than `limit_s` takes its GPUs out of placement until it ends."""
        with self._lock:
            for gpu, slot in enumerate(self._slots):
                late = slot.lease is not None and now - slot.lease.started > limit_s
                if late and not slot.unhealthy:
                    slot.unhealthy = f"a prompt has run for more than {limit_s:g} s"
                    logger.error("[GPU %s] Watchdog: %s; no new auto prompts go to this GPU until it ends",
                                 gpu, slot.unhealthy)
                    self.wake()        # GPUs held for a gang that needs this one take other work
                elif not late and slot.unhealthy:
                    logger.info("[GPU %s] Watchdog: healthy again", gpu)
                    slot.unhealthy = ""
                    self.wake()

    # ---- views -----------------------------------------------------------------------------
    def snapshot(self, detail: bool = False) -> QueueSnapshot:
        with self._lock:
            gpus = tuple(GpuQueue(gpu, (slot.lease,) if slot.lease is not None else (), len(slot.pending),
                                  tuple(e[2] for e in sorted(slot.pending, key=queue_order)) if detail else (),
                                  slot.unhealthy, slot.held_for if slot.lease is None and not m.down
                                  and slot.held_for in self._waiting else "")
                         for gpu, (slot, m) in enumerate(zip(self._slots, self._members)))
            return QueueSnapshot(gpus, self._draining, len(self._history))

    def locate(self, prompt_id: str) -> Optional[tuple[str, int, float]]:
        with self._lock:
            for gpu, slot in enumerate(self._slots):
                if slot.lease is not None and slot.lease.gpu_id == gpu and slot.lease.prompt_id == prompt_id:
                    return "running", gpu, slot.lease.prompt.number
            where = self._waiting.get(prompt_id)
            if where is not None:
                return "queued", where[0], where[1].number
            entry = self._history.entry(prompt_id)
            if entry is not None:
                return "done", entry.get("gpu_id", 0), entry["prompt"][0] if entry.get("prompt") else 0
        return None

    def queue_items(self, gpus=None) -> tuple[list, list]:
        with self._lock:
            running, pending = [], []
            for gpu in self._gpus(gpus):
                slot = self._slots[gpu]
                if slot.lease is not None and slot.lease.gpu_id == gpu:
                    running.append(slot.lease)
                pending.extend(entry[2] for entry in slot.pending)
        pending.sort(key=lambda p: p.order)
        return running, pending

    def tasks_remaining(self, gpus=None) -> int:
        with self._lock:
            return sum(self._count(g) for g in self._gpus(gpus))

    def history(self, prompt_id=None, max_items=None, offset=-1, map_function=None) -> dict:
        with self._lock:
            return self._history.get(prompt_id, max_items, offset, map_function)

    def forget_history(self, prompt_id) -> None:
        with self._lock:
            if self._history.pop(prompt_id) is not None and self.journal is not None:
                self.journal.forget([prompt_id])

    def clear_history(self) -> None:
        with self._lock:
            self._history.clear()
            if self.journal is not None:
                self.journal.forget_history()

    # ---- inside the lock ---------------------------------------------------------------------
    def _gpus(self, gpus) -> list:
        return list(range(len(self._slots))) if gpus is None else list(gpus)

    def _count(self, gpu: int) -> int:
        """Prompts waiting in `gpu`'s queue plus the one it runs as rank 0."""
        slot = self._slots[gpu]
        runs = slot.lease is not None and slot.lease.gpu_id == gpu
        return len(slot.pending) + runs

    def _counts(self) -> list:
        return [self._count(g) for g in range(len(self._slots))]

    def _loads(self) -> list:
        return [placement.WorkerLoad(m.gpu_id, not m.down and not s.unhealthy, 1 if s.lease else 0,
                                     len(s.pending), m.recent_models(), m.weight, m.free_memory)
                for m, s in zip(self._members, self._slots)]

    def _free_for(self, prompt: QueuedPrompt) -> list:
        """Which GPUs a lease of `prompt` may take: free ones, but not one held for an earlier gang
        (a hold is a reservation for the prompt that is due, not for any gang)."""
        free = [self._is_free(g) for g in range(len(self._slots))]
        if prompt.gang > 1:
            for g, slot in enumerate(self._slots):
                held = self._waiting.get(slot.held_for) if slot.held_for else None
                if free[g] and held is not None and held[1] is not prompt and held[1].order < prompt.order:
                    free[g] = False
        return free

    def _can_gather(self, prompt: QueuedPrompt) -> bool:
        """Enough workers of the gang's pool are up and healthy for it to start once they are free
        (holding workers for a gang that cannot start, or that waits for a prompt the watchdog
        thinks stuck, would stop its pool)."""
        pool = prompt.eligible if prompt.eligible is not None else range(len(self._members))
        return sum(1 for g in pool if not self._members[g].down and not self._slots[g].unhealthy) >= prompt.gang

    def _is_free(self, gpu: int) -> bool:
        slot = self._slots[gpu]
        return slot.lease is None and not slot.unhealthy and not self._members[gpu].down

    def _push(self, gpu: int, prompt: QueuedPrompt) -> None:
        slot = self._slots[gpu]
        self._waiting[prompt.prompt_id] = (gpu, prompt)
        heapq.heappush(slot.pending, (prompt.number, prompt.prompt_id, prompt))
        if not prompt.movable:     # found again by _first_pinned; started/deleted ones are dropped there
            heapq.heappush(slot.pinned, prompt.order)
        slot.cond.notify()
        self.wake()                # an idle worker of its pool may take it over

    def _forget_waiting(self, prompt_id: str) -> None:
        self._waiting.pop(prompt_id, None)
        self._overtaken.pop(prompt_id, None)

    def _unqueue(self, owner: int, prompt: QueuedPrompt) -> None:
        pending = self._slots[owner].pending
        if pending[0][1] == prompt.prompt_id:        # the earliest (most starts): O(log n)
            heapq.heappop(pending)
        else:
            index = next(i for i, entry in enumerate(pending) if entry[1] == prompt.prompt_id)
            pending.pop(index)
            heapq.heapify(pending)
        self._forget_waiting(prompt.prompt_id)

    def _grant(self, prompt: QueuedPrompt, gpus: tuple) -> Lease:
        # As stock's PromptQueue.get: history records a copy made before the executor ran the prompt.
        lease = Lease(next(self._lease_ids), prompt, gpus, record=copy.deepcopy(prompt.stock()))
        for gpu in gpus:                   # ascending: the one global order
            self._slots[gpu].lease = lease
            self._slots[gpu].held_for, self._slots[gpu].shows = "", False
        self.wake()                        # these workers are busy now: their auto prompts may move
        return lease

    def _release(self, lease: Lease) -> None:
        for gpu in lease.gpu_ids:
            slot = self._slots[gpu]
            if slot.lease is lease:
                slot.lease = None
        lease.ended.set()
        self.wake()

    def _startable(self, gpu_id: int) -> list:
        return startable(gpu_id, self._slots, self._members, self._waiting, self._overtaken)

    def _changed(self) -> None:
        """Tell listeners the queues changed (outside the lock); a listener's failure is logged, never
        raised into the caller that changed the queues."""
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                logger.warning("comfy-multigpu: queue-change notification failed", exc_info=True)
