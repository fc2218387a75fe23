"""Context variables: which GPU worker the current code runs for, and which GPU an HTTP request targets.

`current_worker` is set once at the start of each worker thread; asyncio tasks, `asyncio.to_thread`
and ComfyUI's async_to_sync pool copy the context, so nodes' helper threads see the same worker.
`current_request` is set by the HTTP middleware for the duration of one request.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .worker import GpuWorker

current_worker: contextvars.ContextVar[Optional["GpuWorker"]] = contextvars.ContextVar(
    "comfy_multigpu_worker", default=None)


@dataclass
class RequestScope:
    """Routing facts of one HTTP request: the GPU it targets (None = auto), its X-GPU-POOL / X-PRIORITY
    header values, and where a prompt went (GPU, pool, queue number)."""
    target: Optional[int] = None
    headers: dict = field(default_factory=dict)
    placed_gpu: Optional[int] = None
    placed_pool: Optional[str] = None
    placed_number: Optional[float] = None
    dashboard: bool = False            # GET /ws?multigpu=1: the socket subscribes to multigpu_state
    body: dict = field(default_factory=dict)   # the checked JSON body (POST /prompt: "number", "front")
    node: Optional[str] = None         # fleet: X-TARGET-NODE, the machine a prompt is pinned to
    remote_gpu: Optional[int] = None   # fleet: X-TARGET-GPU of that machine (when it is not this one)
    placed_fleet: Optional[dict] = None   # fleet: where an admitted prompt may run


current_request: contextvars.ContextVar[Optional[RequestScope]] = contextvars.ContextVar(
    "comfy_multigpu_request", default=None)


def worker() -> Optional["GpuWorker"]:
    return current_worker.get()


def request_target() -> Optional[int]:
    scope = current_request.get()
    return None if scope is None else scope.target
