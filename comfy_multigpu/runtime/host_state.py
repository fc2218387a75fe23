"""HostState: the per-prompt state ComfyUI keeps in process globals, held once per worker. Only the
host patches (host/worker_attrs.py, host/execution_state.py) write it, always the calling worker's own
(runtime.context.current_worker); worker_attrs also reads other workers' (a reconnecting client's
current node). Host objects touched: none.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass
class HostState:
    # PromptServer.instance.client_id / last_node_id / last_prompt_id as this worker sees them
    attrs: dict = field(default_factory=lambda: {"client_id": None, "last_node_id": None, "last_prompt_id": None})
    progress_registry: Any = None                 # comfy_execution.progress.ProgressRegistry
    graph_prefix: list = field(default_factory=lambda: ["", 0, 0])   # GraphBuilder root, call, graph index
    ram_release_callback: Optional[Callable] = None   # comfy.memory_management release state
    ram_headroom: int = 0
