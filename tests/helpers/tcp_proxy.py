"""A TCP proxy between a fleet member and Redis that can pass traffic, drop it (a blackhole: bytes are
read and discarded, nothing is answered, as a partition looks) or reset every connection."""
from __future__ import annotations

import selectors
import socket
import threading


class TcpProxy:
    def __init__(self, target_port: int, port: int = 0):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.mode = "pass"                 # pass | drop | reset
        self._reset_wanted = False
        self._reset_done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "TcpProxy":
        self._thread.start()
        return self

    def set_mode(self, mode: str) -> None:
        """pass | drop | reset (every open connection is reset now, and new ones while in this mode)."""
        assert mode in ("pass", "drop", "reset")
        if mode == "reset":
            self._reset_done.clear()
            self._reset_wanted = True
            self._reset_done.wait(5)
        self.mode = mode

    def stop(self) -> None:
        self._stop.set()
        self.listener.close()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, None)
        peers: dict = {}
        while not self._stop.is_set():
            try:
                events = sel.select(0.2)
            except (OSError, ValueError):
                return
            if self._reset_wanted:
                for s in list(peers):
                    try:
                        sel.unregister(s)
                    except (KeyError, ValueError):
                        pass
                    try:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                        s.close()
                    except OSError:
                        pass
                peers.clear()
                self._reset_wanted = False
                self._reset_done.set()
                continue
            for key, _ in events:
                sock = key.fileobj
                if sock is self.listener:
                    try:
                        client, _addr = self.listener.accept()
                    except OSError:
                        continue
                    if self.mode == "reset":
                        client.close()
                        continue
                    try:
                        upstream = socket.create_connection(self.target, timeout=2)
                    except OSError:
                        client.close()
                        continue
                    for s in (client, upstream):
                        s.setblocking(False)
                    peers[client], peers[upstream] = upstream, client
                    sel.register(client, selectors.EVENT_READ, None)
                    sel.register(upstream, selectors.EVENT_READ, None)
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                other = peers.get(sock)
                if not data or other is None or other.fileno() < 0:
                    for s in (sock, other):
                        if s is not None:
                            try:
                                sel.unregister(s)
                            except (KeyError, ValueError):
                                pass
                            peers.pop(s, None)
                            s.close()
                    continue
                if self.mode == "pass":
                    try:
                        other.sendall(data)
                    except OSError:
                        pass
                # drop: read and discarded, as a partition that loses packets
