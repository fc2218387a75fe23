"""What a free worker may start: the first placement.LOOKAHEAD prompts of its pool in queue order,
read off the scheduler's heaps without changing them, and the GPUs a gang lease would take (pure
reads under the scheduler's lock).
Host objects touched: none.
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
from typing import Iterable, Optional

from ..policy import placement
from ..policy.sequence_split import order_gang
from .prompt import QueuedPrompt


def queue_order(head: tuple) -> tuple:
    return head[0], head[1]


def heap_in_order(heap: list) -> Iterable[tuple]:
    """A heap's items in queue order (number, then prompt id) without changing it: the smallest of
    a frontier of unvisited nodes each time, O(log k) for the k-th. The heap must not change while
    this runs (the scheduler's lock held)."""
    if not heap:
        return
    frontier = [(queue_order(heap[0]), 0)]
    while frontier:
        _, i = heapq.heappop(frontier)
        yield heap[i]
        for child in (2 * i + 1, 2 * i + 2):
            if child < len(heap):
                heapq.heappush(frontier, (queue_order(heap[child]), child))


def startable(gpu_id: int, slots, members, waiting_index: dict, overtaken: dict) -> list:
    """What `gpu_id` may start, the first placement.LOOKAHEAD in queue order: the first of its pinned
    prompts (pinned prompts keep their order and never move), its own auto-placed ones, and those of
    its pool waiting in busy or down workers' queues (an idle worker starts its own queue itself), or
    in an idle one's that holds a gang prompt it cannot start alone. Costs O(workers x LOOKAHEAD)
    however long the queues are."""
    heads = [movable_head(slots[owner].pending, owner, gpu_id) for owner in range(len(slots))
             if owner == gpu_id or slots[owner].lease is not None or members[owner].down or slots[owner].shows]
    first = itertools.islice(heapq.merge(*heads, key=queue_order), placement.LOOKAHEAD)
    waiting = [placement.Waiting(p.prompt_id, p.number, owner, p.models, p.eligible,
                                 overtaken.get(p.prompt_id, 0))
               for _, _, p, owner in first]
    pinned = first_pinned(slots[gpu_id].pinned, waiting_index)
    if pinned is not None:
        waiting.append(placement.Waiting(pinned.prompt_id, pinned.number, gpu_id, pinned.models, None,
                                         overtaken.get(pinned.prompt_id, 0), pinned=True))
    return waiting


def movable_head(pending: list, owner: int, gpu_id: int) -> list:
    """The first LOOKAHEAD auto-placed prompts in `owner`'s queue that `gpu_id` may run, as
    (number, prompt id, prompt, owner) in queue order, read off the heap without changing it."""
    found = []
    for entry in heap_in_order(pending):
        prompt = entry[2]
        if not prompt.movable or (prompt.eligible is not None and gpu_id not in prompt.eligible):
            continue
        found.append((entry[0], entry[1], prompt, owner))
        if len(found) == placement.LOOKAHEAD:
            break
    return found


def first_pinned(heap: list, waiting_index: dict) -> Optional[QueuedPrompt]:
    """The earliest pinned prompt waiting in a queue (its pinned `heap`; entries of prompts
    that started or were deleted are dropped here)."""
    while heap:
        number, prompt_id = heap[0]
        where = waiting_index.get(prompt_id)
        if where is not None and not where[1].movable and where[1].number == number:
            return where[1]
        heapq.heappop(heap)
    return None


def fit_gang(prompt: QueuedPrompt, limit: int) -> QueuedPrompt:
    """A prompt asking for more GPUs than its pool has (or than `limit`) gets what there is (its nodes
    then run on fewer and say so); one pinned to a GPU runs on that GPU alone."""
    if prompt.gang <= 1:
        return prompt
    size = min(len(prompt.eligible), limit) if prompt.eligible is not None else limit
    gang = 1 if prompt.target is not None else min(prompt.gang, size)
    return prompt if gang == prompt.gang else dataclasses.replace(prompt, gang=gang)


def gang_gpus(gpu_id: int, prompt: QueuedPrompt, free: list, loads: Optional[list] = None,
              turn: int = 0) -> Optional[tuple]:
    """The GPUs a lease of `prompt` started by `gpu_id` takes: itself, plus gang-1 other free GPUs of
    its pool in the order its strategy prefers (sequence_split.order_gang; `loads`: placement.WorkerLoad
    per GPU; without them, lowest index first); `free[g]` says whether GPU g is free. None if too few
    are free now; an elastic prompt takes those that are (itself at least)."""
    if prompt.gang <= 1:
        return (gpu_id,)
    others = [g for g, is_free in enumerate(free) if g != gpu_id and is_free
              and (prompt.eligible is None or g in prompt.eligible)]
    if len(others) < prompt.gang - 1 and not prompt.elastic:
        return None
    if loads is not None:
        others = order_gang(prompt.strategy, [loads[g] for g in others], len(free), turn)
    return (gpu_id,) + tuple(others[:prompt.gang - 1])
