"""Seeded noise that no other worker can disturb (torch.manual_seed in comfy/sample.py:27 and others).

ComfyUI seeds torch's one global CPU generator and draws from the generator it returns. Inside a
worker, torch.manual_seed still seeds the global generator (for code that draws from it) but
returns a private generator seeded the same way: the identical stream, untouched by other threads.
"""
from __future__ import annotations

from .per_worker import per_worker


def make_manual_seed(original, pool):
    import torch

    def private_generator(worker, seed):
        original(seed)
        return torch.Generator().manual_seed(int(seed))
    return per_worker(original, private_generator)
