"""Balancer settings from flags, a TOML config file and environment variables (pure parsing).

Flags win over the environment, which wins over the config file. Environment: COMFY_BALANCER_BACKENDS
("URL[=weight],URL..."), COMFY_BALANCER_LISTEN, COMFY_BALANCER_POLL_INTERVAL, COMFY_BALANCER_TOKEN,
COMFY_BALANCER_DEPTH, COMFY_BALANCER_CONFIG. Config file:

    listen = "0.0.0.0:9999"
    poll_interval = 0.5
    token = "secret-for-clients"          # optional bearer token clients must send
    [[backend]]
    url = "http://10.0.0.2:8188"
    weight = 2
    token = "secret-of-that-backend"      # optional, sent as Authorization: Bearer
"""
from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, field
from typing import Mapping, Optional
from urllib.parse import urlparse


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class BackendSpec:
    url: str
    weight: float = 1.0
    token: str = ""


@dataclass(frozen=True)
class BalancerSettings:
    backends: tuple[BackendSpec, ...]
    host: str = "127.0.0.1"
    port: int = 9999
    poll_interval: float = 0.5
    token: str = ""
    down_after: int = 3                   # failed polls before a backend is marked down
    depth: int = 2                        # prompts per GPU slot (running + queued); more wait here
    pin_gpu: str = "idle"                 # X-TARGET-GPU to a comfy-multigpu backend: always | idle | never
    extra: dict = field(default_factory=dict)


def parse_backend(text: str, token: str = "") -> BackendSpec:
    """ "http://host:8188" or "http://host:8188=2" (weight)."""
    url, sep, weight_text = text.strip().rpartition("=") if "=" in text else (text.strip(), "", "")
    weight = 1.0
    if sep:
        try:
            weight = float(weight_text)
        except ValueError:
            raise SettingsError(f"backend {text!r}: weight {weight_text!r} is not a number") from None
        if not 0 < weight < 1e6:
            raise SettingsError(f"backend {text!r}: weight must be above 0")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise SettingsError(f"backend {text!r} is not an http(s)://host:port URL")
    return BackendSpec(url.rstrip("/"), weight, token)


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"listen {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _poll(text) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise SettingsError(f"poll interval {text!r} is not a number of seconds") from None
    if not 0.05 <= value <= 60:
        raise SettingsError(f"poll interval {value} must be between 0.05 and 60 seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m comfy_multigpu.balancer",
                                description="Queue-aware balancer across ComfyUI instances.")
    p.add_argument("--backend", action="append", default=[], metavar="URL[=weight]",
                   help="a ComfyUI instance (repeatable)")
    p.add_argument("--config", help="TOML file with listen, poll_interval, token and [[backend]] tables")
    p.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:9999)")
    p.add_argument("--poll-interval", help="seconds between queue polls of each backend (default 0.5)")
    p.add_argument("--token", help="bearer token clients must send (default: none)")
    p.add_argument("--pin-gpu", choices=["always", "idle", "never"],
                   help="send X-TARGET-GPU for the chosen GPU of a comfy-multigpu backend: always, only when "
                        "that GPU is idle (default: a prompt that must queue is left to the backend's own "
                        "placement, which can still move it to whichever of its GPUs frees first), or never")
    p.add_argument("--depth", help="prompts per GPU slot, running + queued, before the balancer holds "
                                   "further ones until a slot frees (default 2; 0 = send everything at once)")
    return p


def resolve(argv: Optional[list] = None, env: Mapping[str, str] = os.environ) -> BalancerSettings:
    args = build_parser().parse_args(argv)
    config: dict = {}
    path = args.config or env.get("COMFY_BALANCER_CONFIG", "")
    if path:
        try:
            with open(path, "rb") as f:
                config = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as ex:
            raise SettingsError(f"config {path}: {ex}") from None
    backends = [parse_backend(b) for b in args.backend]
    if not backends and env.get("COMFY_BALANCER_BACKENDS", "").strip():
        backends = [parse_backend(b) for b in env["COMFY_BALANCER_BACKENDS"].split(",") if b.strip()]
    if not backends:
        for entry in config.get("backend", []):
            if not isinstance(entry, dict) or "url" not in entry:
                raise SettingsError(f"config {path}: every [[backend]] needs url = \"http://host:port\"")
            spec = parse_backend(str(entry["url"]), str(entry.get("token", "")))
            backends.append(BackendSpec(spec.url, float(entry.get("weight", 1.0)), spec.token))
    if not backends:
        raise SettingsError("no backend: pass --backend URL (repeatable), COMFY_BALANCER_BACKENDS or --config")
    if len({b.url for b in backends}) != len(backends):
        raise SettingsError("a backend is listed twice")
    listen = args.listen or env.get("COMFY_BALANCER_LISTEN") or config.get("listen") or "127.0.0.1:9999"
    host, port = parse_listen(str(listen))
    poll = _poll(args.poll_interval or env.get("COMFY_BALANCER_POLL_INTERVAL") or config.get("poll_interval", 0.5))
    token = args.token or env.get("COMFY_BALANCER_TOKEN") or str(config.get("token", ""))
    depth_text = str(args.depth or env.get("COMFY_BALANCER_DEPTH") or config.get("depth", 2))
    if not depth_text.isdigit():
        raise SettingsError(f"depth {depth_text!r} must be a whole number, 0 or more")
    pin = str(args.pin_gpu or env.get("COMFY_BALANCER_PIN_GPU") or config.get("pin_gpu", "idle"))
    if pin not in ("always", "idle", "never"):
        raise SettingsError(f"pin_gpu {pin!r} must be always, idle or never")
    return BalancerSettings(tuple(backends), host, port, poll, token, depth=int(depth_text), pin_gpu=pin)
