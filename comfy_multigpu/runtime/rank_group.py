"""N ranks of one sequence-parallel forward in one process (issue 17): their exchanges and their threads.

The "collectives" are copies onto the receiving rank's device, ordered by one barrier per exchange
(two tables used in turn, so a fast rank never overwrites what a slow one still reads): no NCCL, no
Ray, and the same code on CPU threads (tests) and on GPUs. A rank that raises breaks the barrier, so
every other rank raises RankAborted at its next exchange instead of waiting forever.

On CUDA the barrier orders the host threads only: a copy runs on the sender's current stream and
torch makes the receiver's current stream wait for it (its cross-device copy), so the receiver's
later kernels follow the copy without a host synchronisation. Every rank uses its device's default
stream (nothing here or in the host's Flux/Wan code sets another), so the caching allocator also
reuses a received tensor's memory only after the kernels that read it.

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
        import torch
        self.devices = [torch.device(d) for d in devices]
        self.size = len(self.devices)
        self.timeout = timeout
        self._barrier = threading.Barrier(self.size, timeout=timeout)
        self._tables = [[[None] * self.size for _ in range(self.size)] for _ in range(2)]
        self._count = [0] * self.size
        self.exchanges = 0                     # rank 0's count, for logs and tests
        self.sent = [0] * self.size            # bytes each rank sent to other ranks (copied where on other devices)
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
        started = time.monotonic()
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            if time.monotonic() - started >= self.timeout:
                raise RankAborted(f"no exchange of this sequence-parallel forward completed within "
                                  f"{self.timeout:g} s: a GPU of {self.devices} stopped answering") from None
            raise RankAborted("another GPU of this sequence-parallel forward failed") from None


def _onto(tensor, device):
    return tensor if tensor.device == device else tensor.to(device)


def run_ranks(group: RankGroup, work: Callable[[int], Any], workers: Optional[Sequence[Any]] = None) -> Any:
    """work(rank) on every rank at once (rank 0 in the calling thread, so its context, e.g. the
    worker, stays); returns rank 0's result. `workers[r]`, if given, is the GPU worker rank r runs
    for (its thread's current_worker, so it sees that worker's device). A rank thread also gets its
    device as the current CUDA device (custom kernels launch there: comfy_kitchen's RoPE, Triton,
    sage) and the caller's inference and grad modes (thread-local in torch). The first error aborts
    the group and is raised; after a failure, a rank that does not stop within the group's timeout is
    reported, not waited for forever."""
    import torch
    results: list = [None] * group.size
    errors: list = []
    aborted: list = []                       # RankAborted (a timeout says so), if nothing else failed
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(rank: int) -> None:
        try:
            if rank > 0:
                if workers is not None:
                    from .context import current_worker
                    current_worker.set(workers[rank])
                device = torch.device(group.devices[rank])
                if device.type == "cuda":
                    torch.cuda.set_device(device)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                results[rank] = work(rank)
        except BaseException as ex:          # noqa: B036 - every rank must learn of it
            (aborted if isinstance(ex, RankAborted) else errors).append(ex)
            group.abort()

    import contextvars
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(run, r), daemon=True,
                                name=f"comfy-multigpu-rank{r}") for r in range(1, group.size)]
    for t in threads:
        t.start()
    run(0)
    for rank, t in enumerate(threads, start=1):
        failed = errors or aborted or group.aborted
        t.join(group.timeout if failed else None)    # after a failure: the others stop, or are stuck
        if t.is_alive():
            if errors:
                raise errors[0]
            raise RankAborted(f"rank {rank} on {group.devices[rank]} did not stop within {group.timeout:g} s "
                              f"after the others failed (stuck in a device call?)")
    if errors:
        raise errors[0]
    if results[0] is None:
        raise aborted[0] if aborted else RankAborted("the sequence-parallel forward was aborted")
    return results[0]
