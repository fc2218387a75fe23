"""History: finished prompts' entries in finishing order, at most MAXIMUM_HISTORY_SIZE, read with the
contract of execution.PromptQueue.get_history. Kept by the scheduler, under its lock. Host objects
touched: none.
"""
from __future__ import annotations

import copy

MAXIMUM_HISTORY_SIZE = 10000      # execution.py MAXIMUM_HISTORY_SIZE


class History:
    def __init__(self, limit: int = MAXIMUM_HISTORY_SIZE):
        self.limit = limit
        self._entries: dict[str, dict] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, prompt_id: str) -> bool:
        return prompt_id in self._entries

    def add(self, prompt_id: str, entry: dict) -> None:
        if len(self._entries) > self.limit:
            self._entries.pop(next(iter(self._entries)))
        self._entries[prompt_id] = entry

    def entry(self, prompt_id: str):
        return self._entries.get(prompt_id)

    def pop(self, prompt_id: str):
        return self._entries.pop(prompt_id, None)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, prompt_id=None, max_items=None, offset=-1, map_function=None) -> dict:
        """execution.PromptQueue.get_history: one entry (a deep copy unless mapped), or a window of
        them (the last `max_items` by default), each through `map_function` if given."""
        history = self._entries
        if prompt_id is not None:
            if prompt_id not in history:
                return {}
            p = history[prompt_id]
            return {prompt_id: map_function(p) if map_function is not None else copy.deepcopy(p)}
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
