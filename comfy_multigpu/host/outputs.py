"""Unique output file names across workers (folder_paths.get_save_image_path, folder_paths.py:520-566).

The host numbers files from a directory listing, so two workers saving at once get the same
counter. A worker now holds the (folder, name) it numbers until its node finishes writing
(execution.execute returns), and another worker asking for the same name waits for that. In a fleet,
the number also comes from a block reserved across machines (fleet/files.py FleetNames).
"""
from __future__ import annotations

import functools

from ..runtime.context import current_worker
from .per_worker import per_worker


def make_get_save_image_path(original, pool):
    def numbered(worker, filename_prefix, output_dir, image_width=0, image_height=0):
        folder, filename = original(filename_prefix, output_dir, image_width, image_height)[:2]
        floor = pool.save_names.reserve(worker.gpu_id, (folder, filename))
        # Counted again now that no other worker is writing files under this name.
        answer = original(filename_prefix, output_dir, image_width, image_height)
        if floor is not None and floor > answer[2]:    # a fleet: numbers no other machine uses
            answer = answer[:2] + (floor,) + tuple(answer[3:])
        return answer
    return per_worker(original, numbered)


def make_execute_node(original, pool):
    @functools.wraps(original)
    async def execute(*args, **kwargs):
        try:
            return await original(*args, **kwargs)
        finally:
            worker = current_worker.get()
            if worker is not None and pool.save_names.holds_any(worker.gpu_id):
                pool.save_names.release(worker.gpu_id)
    return execute
