"""The scheduler seam: the one interface through which prompts are admitted, leased to workers, ended
and viewed. Only a scheduler edits queue state (pending queues, leases, history); workers, the HTTP
layer, metrics and the dashboard call these methods and read the snapshots they return.

`LocalScheduler` (local_scheduler.py) is the in-process implementation. The interface is written for
the ones to come: process workers (a worker hands its lease to a child process), gang leases (one
prompt on several GPUs: `Lease.gpu_ids`, taken all or nothing in ascending GPU order) and a fleet
queue shared by several machines (admission durable before it returns; `requeue` for a lease lost).
Host objects touched: none.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Protocol, Sequence

from .prompt import ExecutionStatus, Lease, QueuedPrompt


class Member(Protocol):
    """What a scheduler reads of a worker to place prompts (GpuWorker has these)."""
    gpu_id: int
    weight: float
    free_memory: Optional[int]

    @property
    def down(self) -> bool: ...

    def recent_models(self) -> tuple: ...


class DuplicatePrompt(Exception):
    """The prompt id is already queued, running or done: an idempotent retry, answered with where it is."""

    def __init__(self, prompt_id: str, state: str, gpu_id: int, number: float):
        super().__init__(prompt_id)
        self.prompt_id, self.state, self.gpu_id, self.number = prompt_id, state, gpu_id, number

    def answer(self) -> dict:
        return {"prompt_id": self.prompt_id, "number": self.number, "node_errors": {}, "gpu_id": self.gpu_id,
                "duplicate": True, "state": self.state}


@dataclass(frozen=True)
class GpuQueue:
    """One GPU's part of a snapshot. `leases` holds the lease it runs or is reserved for (rank > 0)."""
    gpu_id: int
    leases: tuple                   # Lease, at most one today
    pending_count: int
    pending: tuple = ()             # QueuedPrompt in queue order, only in detailed snapshots
    unhealthy: str = ""             # why the watchdog holds it out of placement ("": fine)
    held_for: str = ""              # idle, held free for this gang prompt until enough GPUs are free

    @property
    def running(self) -> tuple:
        """Prompts this GPU runs as rank 0 (the stock view of "running")."""
        return tuple(lease.prompt for lease in self.leases if lease.gpu_id == self.gpu_id)

    @property
    def busy(self) -> bool:
        return bool(self.leases)


@dataclass(frozen=True)
class QueueSnapshot:
    """Queue state at one moment, consistent across GPUs (taken under the scheduler's lock)."""
    gpus: tuple                     # GpuQueue per GPU, by gpu_id
    draining: bool
    history_size: int

    @property
    def running_count(self) -> int:
        return sum(len(q.running) for q in self.gpus)

    @property
    def pending_count(self) -> int:
        return sum(q.pending_count for q in self.gpus)


class Scheduler(abc.ABC):
    """Admit, cancel, take the next lease for a worker, lease a set of workers, requeue, finish, view."""

    pools: dict                     # pool name -> GPUs
    default_pool: Optional[str]
    limits: object                  # policy.admission.Limits (queue caps)
    mean_run_s: float               # moving average of run time (Retry-After)

    # ---- admission -------------------------------------------------------------------------
    @abc.abstractmethod
    def admit(self, prompt: QueuedPrompt) -> int:
        """Queue `prompt` (pinned to prompt.target, else placed in its pool); returns the GPU whose
        queue holds it. Durable before it returns. Raises DuplicatePrompt or policy.errors.ApiError
        (429 over a cap, 503 draining or not durable) before anything is queued."""

    @abc.abstractmethod
    def stock_number(self, number: float, front: bool = False) -> float:
        """The queue number of a prompt ComfyUI numbered with its own counter (server.number; negated
        for "front"): moved past prompts this scheduler put back after a restart."""

    @abc.abstractmethod
    def restore(self, journal) -> tuple[int, int]:
        """Start-up: history and unfinished prompts back from `journal`; returns (history, requeued)."""

    @abc.abstractmethod
    def cancel(self, match: Callable[[QueuedPrompt], bool], gpus: Optional[Iterable[int]] = None,
               first_only: bool = False) -> list:
        """Remove waiting prompts `match` accepts (on `gpus`, None: all); returns their ids."""

    # ---- leases ----------------------------------------------------------------------------
    @abc.abstractmethod
    def take_next(self, gpu_id: int) -> Optional[Lease]:
        """The lease worker `gpu_id` runs now, or None (non-blocking)."""

    @abc.abstractmethod
    def wait_next(self, gpu_id: int) -> tuple[Optional[Lease], dict]:
        """Block until worker `gpu_id` has a lease to run or messages (posted with `post`); returns
        (lease or None, messages). (None, {}) once the scheduler is closed."""

    @abc.abstractmethod
    def lease_workers(self, prompt: QueuedPrompt, gpu_ids: Sequence[int]) -> Optional[Lease]:
        """Lease the idle workers `gpu_ids` for `prompt` (not waiting in any queue), all or nothing,
        taken in ascending GPU order; None if any of them is not idle, or while draining. Raises
        DuplicatePrompt for a prompt id the scheduler already knows."""

    @abc.abstractmethod
    def requeue(self, lease: Lease) -> None:
        """End `lease` without a result: its prompt waits again with the same number, a pinned one on
        its GPU, an auto one in rank 0's queue (from where any free worker of its pool may take it)."""

    @abc.abstractmethod
    def finish(self, lease: Lease, result: dict, status: ExecutionStatus, run_s: float = 0.0) -> dict:
        """End `lease` with its history entry (returned); the entry carries gpu_id (rank 0) and, for a
        lease of several workers, gpu_ids."""

    @abc.abstractmethod
    def post(self, gpu_ids: Iterable[int], name: str, value, append: bool = False) -> None:
        """A message for workers to act on between prompts (/free flags, /preload requests)."""

    # ---- state -----------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def draining(self) -> bool:
        """Nothing new starts (SIGTERM)."""

    @abc.abstractmethod
    def start_draining(self) -> bool:
        """Start nothing new from now on; False if it was already draining."""

    @abc.abstractmethod
    def close(self) -> None:
        """Shutdown: every wait_next returns (None, {}); idempotent."""

    @abc.abstractmethod
    def check_health(self, now: float, limit_s: float) -> None:
        """Watchdog: a lease older than `limit_s` (monotonic seconds) takes its GPUs out of placement."""

    @abc.abstractmethod
    def wake(self) -> None:
        """A worker's placement facts changed (up/down, models): idle workers look again."""

    # ---- views -----------------------------------------------------------------------------
    @abc.abstractmethod
    def snapshot(self, detail: bool = False) -> QueueSnapshot:
        """Every GPU's leases and pending count (with `detail`, the pending prompts in order)."""

    @abc.abstractmethod
    def locate(self, prompt_id: str) -> Optional[tuple[str, int, float]]:
        """("queued" | "running" | "done", GPU, number) of a prompt id, or None."""

    @abc.abstractmethod
    def queue_items(self, gpus: Optional[Iterable[int]] = None) -> tuple[list, list]:
        """(running Leases, pending QueuedPrompts) of `gpus` (None: all), pending in queue order."""

    @abc.abstractmethod
    def tasks_remaining(self, gpus: Optional[Iterable[int]] = None) -> int:
        """Running + waiting prompts of `gpus` (None: all)."""

    @abc.abstractmethod
    def history(self, prompt_id=None, max_items=None, offset=-1, map_function=None) -> dict:
        """Same contract as execution.PromptQueue.get_history; entries carry gpu_id."""

    @abc.abstractmethod
    def forget_history(self, prompt_id: str) -> None:
        """Delete one history entry (an unknown id: nothing)."""

    @abc.abstractmethod
    def clear_history(self) -> None:
        """Delete every history entry."""
