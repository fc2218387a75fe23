"""Count how often a file is opened, by any process or thread, with Linux inotify (IN_OPEN).

Counts opens at the kernel, so it sees safetensors' Rust reader as well as Python's open(); it
does not depend on timing or on anything the server reports about itself.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct

IN_OPEN = 0x00000020
IN_NONBLOCK = 0o4000
_EVENT = struct.Struct("iIII")


class OpenCounter:
    def __init__(self, path: str):
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = self._libc.inotify_init1(IN_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        # watch the real file: a symlink in the models folder resolves to it on every open
        wd = self._libc.inotify_add_watch(self.fd, os.path.realpath(path).encode(), IN_OPEN)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch failed for {path}")
        self.opens = 0

    def poll(self) -> int:
        """Read the events that arrived; returns the total count of opens so far."""
        while select.select([self.fd], [], [], 0)[0]:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                _, mask, _, name_len = _EVENT.unpack_from(data, offset)
                if mask & IN_OPEN:
                    self.opens += 1
                offset += _EVENT.size + name_len
        return self.opens

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "OpenCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
