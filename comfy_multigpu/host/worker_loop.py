"""The replacement for main.py's prompt_worker: the thread ComfyUI starts for it launches the pool.

main.py:587 looks `prompt_worker` up in __main__ when it starts the thread, after custom nodes
have loaded, so replacing __main__.prompt_worker at custom-node import is in time.
"""
from __future__ import annotations

import functools


def make_prompt_worker(original, pool):
    @functools.wraps(original)
    def prompt_worker(q, server_instance):
        pool.launch(server_instance)      # start-up hooks, one thread per worker
        pool.run_housekeeping()           # this thread: periodic GC for all workers
    return prompt_worker
