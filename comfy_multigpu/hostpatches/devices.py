"""Each worker sees its own device: get_torch_device / get_all_torch_devices (model_management.py:194-244).

Upstream's own multi-GPU nodes and unload_all_models enumerate get_all_torch_devices(); inside a
worker that list is the worker's device alone, so they cannot reach another worker's GPU.
"""
from __future__ import annotations

import functools

from ..context import current_worker


def make_get_torch_device(original, pool):
    @functools.wraps(original)
    def get_torch_device():
        worker = current_worker.get()
        return original() if worker is None else worker.device
    return get_torch_device


def make_get_all_torch_devices(original, pool):
    @functools.wraps(original)
    def get_all_torch_devices(exclude_current=False):
        worker = current_worker.get()
        if worker is None:
            return original(exclude_current)
        return [] if exclude_current else [worker.device]
    return get_all_torch_devices
