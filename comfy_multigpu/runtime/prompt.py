"""The typed records of a prompt's life: QueuedPrompt (what waits and runs), Lease (who runs it) and
ExecutionStatus (how it ended, in the shape of execution.PromptQueue.ExecutionStatus).

ComfyUI keeps a queued prompt as a 6-tuple (number, prompt_id, prompt, extra_data, outputs_to_execute,
sensitive) and its routes index it by position; `QueuedPrompt.stock()` is that tuple, so every view
handed to the host keeps the stock shape, while our code reads named fields and computes a prompt's
routing, priority and model keys once, at admission. Host objects touched: none.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from ..policy.placement import prompt_models
from ..policy.sequence_split import requested_elastic, requested_ranks, requested_strategy


class ExecutionStatus(NamedTuple):
    """Same fields and `_asdict()` as execution.PromptQueue.ExecutionStatus (history entries' "status")."""
    status_str: str
    completed: bool
    messages: list

    @property
    def outcome(self) -> str:
        """success | interrupted | error (the label of /metrics and the per-prompt log line)."""
        return outcome_of(self.status_str, self.messages)


def outcome_of(status_str: str, messages) -> str:
    """success | interrupted | error, from a prompt's history status."""
    if status_str == "success":
        return "success"
    if any(m and m[0] == "execution_interrupted" for m in messages or ()):
        return "interrupted"
    return "error"


@dataclass(frozen=True, eq=False)
class QueuedPrompt:
    number: float                       # queue number, priority band included (smaller runs first)
    prompt_id: str
    prompt: dict                        # API-format graph
    extra_data: dict
    outputs: list                       # outputs_to_execute
    sensitive: dict = field(default_factory=dict, repr=False)   # never journalled nor in history
    target: Optional[int] = None        # pinned GPU (None: placed automatically, may move)
    pool: Optional[str] = None          # GPU pool it may run in (None: any)
    eligible: Optional[frozenset] = None   # GPUs of that pool (None: any)
    priority: Optional[str] = None      # "high" | "normal" | "low" | None (stock order)
    models: frozenset = frozenset()     # "input:file" keys of the model files it loads
    gang: int = 1                       # GPUs it needs at once (a lease of that many workers)
    strategy: str = "least_loaded"      # how the gang's other GPUs are chosen (sequence_split.order_gang)
    elastic: bool = False               # starts on the free GPUs of its pool, up to `gang` (auto)

    @classmethod
    def from_stock(cls, item: tuple, **route) -> "QueuedPrompt":
        """From ComfyUI's 6-tuple (the 6th, sensitive, may be missing); model keys computed here, once."""
        number, prompt_id, prompt, extra_data, outputs = item[:5]
        sensitive = item[5] if len(item) > 5 else {}
        if "gang" not in route:
            route["gang"] = requested_ranks(prompt)
        route.setdefault("strategy", requested_strategy(prompt))
        route.setdefault("elastic", requested_elastic(prompt))
        return cls(number, prompt_id, prompt, extra_data, outputs, sensitive or {},
                   models=route.pop("models", None) or prompt_models(prompt), **route)

    def stock(self) -> tuple:
        """The 6-tuple ComfyUI's routes and views expect."""
        return (self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs, self.sensitive)

    def public(self) -> tuple:
        """The 5-tuple without sensitive data (history entries, /queue/all), as main.py stores it."""
        return (self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs)

    def renumbered(self, number: float) -> "QueuedPrompt":
        return dataclasses.replace(self, number=number)

    @property
    def movable(self) -> bool:
        """Auto-placed: may still move to another worker of its pool until it starts."""
        return self.target is None

    @property
    def order(self) -> tuple:
        return (self.number, self.prompt_id)

    @property
    def client_id(self) -> Optional[str]:
        return self.extra_data.get("client_id") if isinstance(self.extra_data, dict) else None

    def run_extra_data(self) -> dict:
        """extra_data with the sensitive part merged back, as main.py hands it to the executor."""
        merged = dict(self.extra_data)
        merged.update(self.sensitive)
        return merged


@dataclass(eq=False)
class Lease:
    """One prompt running on one or several workers. `gpu_ids[0]` (rank 0) runs the executor; the
    others are reserved for it (they start nothing else) until the lease ends. Leases of several
    workers are taken all or nothing, in ascending GPU order (one global order: no two leases can
    each hold a part of what the other waits for)."""
    lease_id: int
    prompt: QueuedPrompt
    gpu_ids: tuple
    started: float = field(default_factory=time.monotonic)      # monotonic
    started_wall: float = field(default_factory=time.time)
    ended: threading.Event = field(default_factory=threading.Event, repr=False)
    record: tuple = field(default=(), repr=False)   # the prompt as it was at the start (history)
    notes: dict = field(default_factory=dict, repr=False)   # extra history fields (sequence_parallel)
    scratch: dict = field(default_factory=dict, repr=False)  # what its ranks made (model copies), dropped at its end

    @property
    def gpu_id(self) -> int:
        return self.gpu_ids[0]

    @property
    def prompt_id(self) -> str:
        return self.prompt.prompt_id

    def rank_of(self, gpu_id: int) -> int:
        return self.gpu_ids.index(gpu_id)
