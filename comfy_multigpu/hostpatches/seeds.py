"""Seeded noise that no other worker can disturb (torch.manual_seed in comfy/sample.py:27 and others).

ComfyUI seeds torch's one global CPU generator and draws from the generator it returns. Inside a
worker, torch.manual_seed still seeds the global generator (for code that draws from it) but
returns a private generator seeded the same way: the identical stream, untouched by other threads.
"""
from __future__ import annotations

import functools

from ..context import current_worker


def make_manual_seed(original, pool):
    import torch

    @functools.wraps(original)
    def manual_seed(seed):
        generator = original(seed)
        if current_worker.get() is None:
            return generator
        return torch.Generator().manual_seed(int(seed))
    return manual_seed
