"""Output file numbering across workers: folder_paths.get_save_image_path counts existing files to
pick the next number, so two workers saving under one (folder, name) at once would pick the same one.
A worker reserves the (folder, name) until the node that numbers files ends. Host objects touched: none
(host/outputs.py calls in here).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

logger = logging.getLogger("comfy_multigpu")

SAVE_WAIT_S = 120.0               # longest wait for another worker's output-file numbering


class SaveNames:
    def __init__(self, wait_s: float = SAVE_WAIT_S):
        self.wait_s = wait_s
        self._cond = threading.Condition(threading.Lock())
        self._owner: dict[tuple, int] = {}          # (folder, name) -> GPU numbering files under it
        self._held: dict[int, set] = {}             # GPU -> keys it holds
        self._after: dict[int, list] = {}           # GPU -> callables to run at its release
        self.fleet = None                           # fleet.files.FleetNames of a fleet member
        self._fleet_starts: dict[tuple, int] = {}   # (GPU, key) -> start of the block it holds

    def reserve(self, gpu_id: int, key: tuple) -> Optional[int]:
        """Wait until no other worker is numbering files under `key`, then hold it until `release`.
        In a fleet, returns the number to save from (a block no other machine uses), else None."""
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while self._owner.get(key, gpu_id) != gpu_id:
                left = deadline - time.monotonic()
                if left <= 0:
                    logger.warning("[GPU %s] Waited %.0f s for output name %s; numbering without the lock",
                                   gpu_id, self.wait_s, key)
                    return
                self._cond.wait(left)
            self._owner[key] = gpu_id
            self._held.setdefault(gpu_id, set()).add(key)
        fleet = self.fleet
        if fleet is None:
            return None
        with self._cond:
            held = self._fleet_starts.get((gpu_id, key))
        if held is not None:
            return held                 # the same node asks again: its block still holds
        from ..fleet.files import local_next
        folder, filename = key
        start = fleet.reserve(folder, filename, local_next(folder, filename))
        with self._cond:
            self._fleet_starts[(gpu_id, key)] = start
        self.on_release(gpu_id, lambda: fleet.release(folder, filename))
        return start

    def holds_any(self, gpu_id: int) -> bool:
        return bool(self._held.get(gpu_id))

    def on_release(self, gpu_id: int, action) -> None:
        """Run `action` when `gpu_id` releases its names (before another worker may number them)."""
        with self._cond:
            self._after.setdefault(gpu_id, []).append(action)

    def release(self, gpu_id: int) -> None:
        with self._cond:
            actions = self._after.pop(gpu_id, [])
        for action in actions:
            try:
                action()
            except Exception:
                logger.exception("[GPU %s] Releasing output names failed", gpu_id)
        with self._cond:
            for key in self._held.pop(gpu_id, ()):
                self._fleet_starts.pop((gpu_id, key), None)
                if self._owner.get(key) == gpu_id:
                    del self._owner[key]
            self._cond.notify_all()
