"""Each worker sees its own device: get_torch_device / get_all_torch_devices (model_management.py:194-244).

Upstream's own multi-GPU nodes and unload_all_models enumerate get_all_torch_devices(); inside a
worker that list is the worker's device alone, so they cannot reach another worker's GPU.
"""
from __future__ import annotations

from .per_worker import per_worker


def make_get_torch_device(original, pool):
    return per_worker(original, lambda worker: worker.device)


def make_get_all_torch_devices(original, pool):
    def own_device(worker, exclude_current=False):
        return [] if exclude_current else [worker.device]
    return per_worker(original, own_device)
