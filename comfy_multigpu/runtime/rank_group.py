"""N ranks of one sequence-parallel forward in one process (issue 17): their exchanges and their threads.

The "collectives" are copies onto the receiving rank's device, ordered by one barrier per exchange
(two tables used in turn, so a fast rank never overwrites what a slow one still reads): no NCCL, no
Ray, and the same code on CPU threads (tests) and on GPUs. A rank that raises breaks the barrier, so
every other rank raises RankAborted at its next exchange instead of waiting forever.

Host objects touched: none.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional, Sequence

EXCHANGE_TIMEOUT_S = 300.0


class RankAborted(RuntimeError):
    """Another rank of the same forward failed (or an exchange timed out)."""


class RankGroup:
    def __init__(self, devices: Sequence[Any], timeout: float = EXCHANGE_TIMEOUT_S):
        self.devices = list(devices)
        self.size = len(self.devices)
        self._barrier = threading.Barrier(self.size, timeout=timeout)
        self._tables = [[[None] * self.size for _ in range(self.size)] for _ in range(2)]
        self._count = [0] * self.size
        self.exchanges = 0                     # rank 0's count, for logs and tests
        self.sent = [0] * self.size            # bytes each rank copied to other ranks
        self.waited = [0.0] * self.size        # seconds each rank spent at the barriers

    def all_to_all(self, rank: int, send: Sequence) -> list:
        """send[j] goes to rank j; returns what every rank i sent to this one, in rank order."""
        table = self._tables[self._count[rank] % 2]
        self._count[rank] += 1
        for j, tensor in enumerate(send):
            table[rank][j] = _onto(tensor, self.devices[j])
            if j != rank:
                self.sent[rank] += tensor.nbytes
        started = time.perf_counter()
        self._wait()
        self.waited[rank] += time.perf_counter() - started
        if rank == 0:
            self.exchanges += 1
        return [table[i][rank] for i in range(self.size)]

    def all_gather(self, rank: int, tensor) -> list:
        return self.all_to_all(rank, [tensor] * self.size)

    def abort(self) -> None:
        self._barrier.abort()

    @property
    def aborted(self) -> bool:
        """A rank failed: work that does not meet at a barrier (VAE tiles) checks this between pieces."""
        return self._barrier.broken

    def _wait(self) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise RankAborted("another GPU of this sequence-parallel forward failed") from None


def _onto(tensor, device):
    return tensor if tensor.device == device else tensor.to(device)


def run_ranks(group: RankGroup, work: Callable[[int], Any], workers: Optional[Sequence[Any]] = None) -> Any:
    """work(rank) on every rank at once (rank 0 in the calling thread, so its context, e.g. the
    worker, stays); returns rank 0's result. `workers[r]`, if given, is the GPU worker rank r runs
    for (its thread's current_worker, so it sees that worker's device). The first error aborts the
    group and is raised."""
    results: list = [None] * group.size
    errors: list = []

    def run(rank: int) -> None:
        try:
            if workers is not None and rank > 0:
                from .context import current_worker
                current_worker.set(workers[rank])
            results[rank] = work(rank)
        except BaseException as ex:          # noqa: B036 - every rank must learn of it
            if not isinstance(ex, RankAborted):
                errors.append(ex)
            group.abort()

    import contextvars
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(run, r), daemon=True,
                                name=f"comfy-multigpu-rank{r}") for r in range(1, group.size)]
    for t in threads:
        t.start()
    run(0)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    if results[0] is None:
        raise RankAborted("the sequence-parallel forward was aborted")
    return results[0]
