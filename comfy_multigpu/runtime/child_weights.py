"""Inside a process worker's child: the loader wrappers' store (host/sharing.py calls `get`) and the
output-name reservations, both answered by the main process over the link.

`ChildWeights.get` asks the main process's SegmentStore for the file: either it maps the segment
another child published (no disk read, no copy) or it is the one that loads, publishes the result
into a new segment and maps that too, so even the loader keeps no private copy. Views report when
the caller lets go of them, so the main process knows which segments are in use.

Host objects touched: none (host/child_hooks.py installs the wrappers that call in here).
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import weakref
from typing import Any, Callable, Hashable

from . import shared_segments, weight_views
from .weights import _referable, _weakly_referable, file_identity, holding

logger = logging.getLogger("comfy_multigpu")


class Notes:
    """Messages without an answer, sent by a thread of their own: weakref finalizers put them here
    (SimpleQueue.put is safe inside garbage collection, the link's send lock is not)."""

    def __init__(self, send: Callable[[tuple], None]):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._send = send
        threading.Thread(target=self._run, daemon=True, name="comfy-multigpu-notes").start()

    def put(self, *note) -> None:
        self._queue.put(note)

    def _run(self) -> None:
        while True:
            note = self._queue.get()
            try:
                self._send(("note",) + note)
            except Exception:
                return


class ChildWeights:
    def __init__(self, call: Callable, notes: Notes):
        self.call = call                 # Child.call(name, *args, fds=()) -> (value, fds)
        self.notes = notes
        self.held: dict[Hashable, Any] = {}     # /preload: the view the next loader call gets

    def get(self, kind: str, path: str, options: Hashable, build: Callable[[], Any]) -> Any:
        local = (kind, file_identity(path), options)
        if not holding.get():
            view = self.held.pop(local, None)
            if view is not None:
                return view
        grant, fds = self.call("weights_acquire", kind, path, options)
        try:
            if grant["action"] == "private":
                view = build()
            elif grant["action"] == "attach":
                view = self._attach(grant, fds[0])
            else:
                view = self._load_and_publish(grant, build)
        finally:
            for fd in fds:
                os.close(fd)
        if holding.get():
            self.held[local] = view
        return view

    def _attach(self, grant: dict, fd: int) -> Any:
        view = _weakly_referable(shared_segments.attach(grant["blob"], f"/proc/self/fd/{fd}"))
        self._watch(view, grant["key"])
        return view

    def _load_and_publish(self, grant: dict, build: Callable[[], Any]) -> Any:
        key, segment = grant["key"], grant["segment"]
        try:
            template = build()
        except BaseException as ex:
            self.call("weights_failed", key, f"{type(ex).__name__}: {ex}", True)
            raise
        try:
            published = shared_segments.publish(template, segment)
        except Exception as ex:      # SegmentError, or /dev/shm full (Docker's default is 64 MiB)
            self.call("weights_failed", key, f"{type(ex).__name__}: {ex}", False)
            return template
        fd = os.open(segment, os.O_RDONLY)
        try:
            shared_segments.remove(segment)      # from now on only descriptors keep it
            self.call("weights_published", key, published.blob, published.nbytes, fds=(fd,))
            del template                         # the private copy goes; the mapped one stays
            view = _weakly_referable(shared_segments.attach(published.blob, f"/proc/self/fd/{fd}"))
        finally:
            os.close(fd)
        self._watch(view, key)
        return view

    def _watch(self, view: Any, key: Hashable) -> None:
        """The offload wrappers point tensors back at the mapped ones; the main process hears when
        every anchor of the view is gone."""
        weight_views.register_shared(view)
        anchors = [a for a in (view if isinstance(view, tuple) else (view,)) if _referable(a)]
        remaining = [len(anchors)]

        def gone():
            remaining[0] -= 1
            if remaining[0] <= 0:
                self.notes.put("weights_released", key)
        for anchor in anchors:
            weakref.finalize(anchor, gone)
        if not anchors:
            self.notes.put("weights_released", key)

    def release_held(self) -> int:
        count = len(self.held)
        self.held.clear()
        return count

    def is_shared(self, tensor) -> bool:
        return False          # mapped copy-on-write: a write makes a private page, never reaches others


class ChildSaveNames:
    """pool.save_names in a child: the main process holds the reservations of every worker. A release
    is sent at once, on the link, so it always reaches the main process before the next reservation."""

    def __init__(self, call: Callable, send: Callable[[tuple], None]):
        self.call = call
        self.send = send
        self._holding = False

    def reserve(self, gpu_id: int, key: tuple):
        floor, _fds = self.call("names_reserve", key)
        self._holding = True
        return floor

    def holds_any(self, gpu_id: int) -> bool:
        return self._holding

    def release(self, gpu_id: int) -> None:
        self._holding = False
        self.send(("note", "names_release"))

