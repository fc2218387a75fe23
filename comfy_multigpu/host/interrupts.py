"""Per-worker interrupt flag (comfy/model_management.py:2098-2122 keeps one for the process).

Inside a worker thread the flag is that worker's; outside any worker (an HTTP handler, a custom
route) setting it reaches every worker, which is the stock meaning of a bare /interrupt.
"""
from __future__ import annotations

import functools

from ..runtime.context import current_worker
from .per_worker import per_worker


def make_interrupt_current_processing(original, pool):
    @functools.wraps(original)
    def interrupt_current_processing(value=True):
        worker = current_worker.get()
        if worker is not None:
            worker.set_interrupt(value)
            return
        for each in pool.workers:
            each.set_interrupt(value)
    return interrupt_current_processing


def make_processing_interrupted(original, pool):
    @functools.wraps(original)
    def processing_interrupted():
        worker = current_worker.get()
        if worker is None:
            return any(each.interrupted for each in pool.workers)
        return worker.interrupted
    return processing_interrupted


def make_throw_exception_if_processing_interrupted(original, pool):
    import comfy.model_management
    interrupt_exception = comfy.model_management.InterruptProcessingException

    def throw(worker):
        if worker.take_interrupt():
            raise interrupt_exception()
    return per_worker(original, throw)
