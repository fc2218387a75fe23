"""Run a real Nginx (Debian's package) with a generated comfy-multigpu config under a temporary prefix."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

WRAPPER = """{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{}}
http {{
    client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy; fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
    access_log {prefix}/access.log;
    include {snippet};
}}
"""


def nginx_binary() -> str:
    """Nginx from Debian's packages, installed when missing (the suite runs as root in CI)."""
    found = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx")
    if found:
        return found
    subprocess.run(["apt-get", "install", "-y", "-q", "nginx-light"], check=True, capture_output=True, timeout=600)
    return shutil.which("nginx") or "/usr/sbin/nginx"


def free_port_block(count: int) -> int:
    """The first of `count` consecutive free loopback ports."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + count >= 65000:
            continue
        socks = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports")


class Nginx:
    def __init__(self, prefix: Path, snippet: str):
        self.prefix = prefix
        self.binary = nginx_binary()
        for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / d).mkdir(parents=True, exist_ok=True)
        (prefix / "snippet.conf").write_text(snippet)
        user = "user root root;\n" if os.geteuid() == 0 else ""
        (prefix / "nginx.conf").write_text(WRAPPER.format(user=user, prefix=prefix, snippet=prefix / "snippet.conf"))

    def command(self, *extra) -> list[str]:
        return [self.binary, "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf"), *extra]

    def check(self) -> subprocess.CompletedProcess:
        return subprocess.run(self.command("-t"), capture_output=True, text=True)

    def start(self, ports) -> "Nginx":
        subprocess.run(self.command(), check=True, capture_output=True, text=True)
        deadline = time.time() + 10
        for port in ports:
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        raise RuntimeError((self.prefix / "error.log").read_text()) from None
                    time.sleep(0.05)
        return self

    def stop(self) -> None:
        subprocess.run(self.command("-s", "stop"), capture_output=True)
