"""The link between the main process and one worker's child process: pickled messages over a Unix
stream socket, framed by length, with file descriptors (shared weight segments) passed alongside
(SCM_RIGHTS). Sends from several threads are serialised; one thread on each side receives.
Host objects touched: none.
"""
from __future__ import annotations

import os
import pickle
import socket
import struct
import threading
from typing import Any

_HEADER = struct.Struct("!QI")        # payload length, number of file descriptors
MAX_FDS = 16


class LinkClosed(EOFError):
    """The other side closed the socket or died."""


class Link:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._send_lock = threading.Lock()

    @classmethod
    def from_fd(cls, fd: int) -> "Link":
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: Any, fds: tuple = ()) -> None:
        """Send one message (picklable), with `fds` (duplicated into the receiver) if any."""
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        header = _HEADER.pack(len(payload), len(fds))
        try:
            with self._send_lock:
                if fds:
                    socket.send_fds(self.sock, [header], list(fds))
                else:
                    self.sock.sendall(header)
                self.sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError, OSError) as ex:
            raise LinkClosed(f"link closed: {ex}") from ex

    def recv(self) -> tuple[Any, list[int]]:
        """The next message and the file descriptors sent with it (the caller owns and closes them)."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, _HEADER.size, MAX_FDS)
        except OSError as ex:              # reset by a child that was killed
            raise LinkClosed(f"link closed: {ex}") from ex
        if not data:
            raise LinkClosed("link closed by the other side")
        header = data + self._exactly(_HEADER.size - len(data))
        length, count = _HEADER.unpack(header)
        if len(fds) != count:
            for fd in fds:
                os.close(fd)
            raise LinkClosed(f"expected {count} file descriptors, got {len(fds)}")
        return pickle.loads(self._exactly(length)), list(fds)

    def _exactly(self, count: int) -> bytes:
        chunks, left = [], count
        while left:
            try:
                chunk = self.sock.recv(min(left, 1 << 20))
            except OSError as ex:
                raise LinkClosed(f"link closed: {ex}") from ex
            if not chunk:
                raise LinkClosed("link closed in the middle of a message")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def pair() -> tuple[Link, socket.socket]:
    """(the main process's end, the socket to hand to the child, inheritable)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.set_inheritable(True)
    return Link(ours), theirs
