"""The common shape of a host patch: inside a worker thread use the worker's state, elsewhere the original."""
from __future__ import annotations

import functools
from typing import Callable

from ..runtime.context import current_worker


def per_worker(original: Callable, in_worker: Callable) -> Callable:
    """A replacement for `original` that calls in_worker(worker, *args) when current code runs for a
    worker (its thread, or a task / helper thread that copied its context) and original(*args) elsewhere."""
    @functools.wraps(original)
    def replacement(*args, **kwargs):
        worker = current_worker.get()
        if worker is None:
            return original(*args, **kwargs)
        return in_worker(worker, *args, **kwargs)
    return replacement
