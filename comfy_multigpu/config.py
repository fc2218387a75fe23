"""Multi-GPU settings from the environment, resolved into a device list (pure functions, no torch).

Rules (docs/configuration.md repeats them for users):
- COMFY_MULTI_GPU_SCHED: "0"/"off" leaves ComfyUI stock, "1"/"on" forces the extension on,
  unset/"auto" turns it on when more than one device would be used.
- COMFY_MULTIGPU_DEVICES lists devices explicitly ("cuda:0,cuda:1", "cpu,cpu", "cuda:0,cuda:0").
- Otherwise COMFY_NUM_GPUS=N asks for N workers: cuda:0..N-1, or N CPU workers when CUDA is
  absent or ComfyUI runs with --cpu. Default: every visible CUDA device (one CPU worker without CUDA).
- --cuda-device hides GPUs before anything is counted (ComfyUI sets CUDA_VISIBLE_DEVICES from it),
  so "--cuda-device 1" means one visible GPU, called cuda:0 inside the process.
- --cpu with CUDA present: every worker runs on the CPU; naming a CUDA device then is an error.
- Asking for more CUDA devices than are visible is an error, never a silent smaller count.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

ENV_SCHED = "COMFY_MULTI_GPU_SCHED"
ENV_NUM_GPUS = "COMFY_NUM_GPUS"
ENV_DEVICES = "COMFY_MULTIGPU_DEVICES"

_ON = {"1", "on", "true", "yes"}
_OFF = {"0", "off", "false", "no"}
_DEVICE_RE = re.compile(r"^(cpu|cuda(?::(\d+))?)$")


class ConfigError(ValueError):
    """A setting has a value we cannot use; the message names the variable, the value and the fix."""


@dataclass(frozen=True)
class Settings:
    enabled: bool
    devices: tuple[str, ...]
    reason: str


def _parse_sched(env: Mapping[str, str]) -> str:
    raw = env.get(ENV_SCHED, "").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in _ON:
        return "on"
    if raw in _OFF:
        return "off"
    raise ConfigError(f"{ENV_SCHED}={env[ENV_SCHED]!r} is not understood; use 1 (on), 0 (off) or auto")


def _parse_count(env: Mapping[str, str]) -> int | None:
    raw = env.get(ENV_NUM_GPUS, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{ENV_NUM_GPUS}={raw!r} must be a whole number of workers, 1 or more")
    return int(raw)


def _parse_devices(raw: str, cuda_count: int, cpu_only: bool) -> tuple[str, ...]:
    devices = []
    for part in (p.strip().lower() for p in raw.split(",")):
        match = _DEVICE_RE.match(part)
        if not match:
            raise ConfigError(f"{ENV_DEVICES}: {part!r} is not a device; use cpu or cuda:N, comma-separated")
        if match.group(1) == "cpu":
            devices.append("cpu")
            continue
        index = int(match.group(2) or 0)
        if cpu_only:
            raise ConfigError(f"{ENV_DEVICES} names {part} but ComfyUI runs with --cpu (or no CUDA "
                              f"device is visible); list cpu entries or drop --cpu")
        if index >= cuda_count:
            raise ConfigError(f"{ENV_DEVICES} names {part} but only {cuda_count} CUDA device(s) are "
                              f"visible (CUDA_VISIBLE_DEVICES / --cuda-device hide the others)")
        devices.append(f"cuda:{index}")
    return tuple(devices)


def resolve_settings(env: Mapping[str, str], cuda_count: int, cpu_flag: bool) -> Settings:
    """Turn the environment plus what the machine has into the worker devices; raises ConfigError."""
    sched = _parse_sched(env)
    if sched == "off":
        return Settings(False, (), f"{ENV_SCHED}=0")
    count = _parse_count(env)
    cpu_only = cpu_flag or cuda_count == 0
    if env.get(ENV_DEVICES, "").strip():
        devices = _parse_devices(env[ENV_DEVICES], cuda_count, cpu_only)
        if count is not None and count != len(devices):
            raise ConfigError(f"{ENV_NUM_GPUS}={count} disagrees with {ENV_DEVICES} "
                              f"({len(devices)} devices); set one of them")
    elif cpu_only:
        devices = ("cpu",) * (count or 1)
    else:
        wanted = count or cuda_count
        if wanted > cuda_count:
            raise ConfigError(f"{ENV_NUM_GPUS}={wanted} but only {cuda_count} CUDA device(s) are visible "
                              f"(CUDA_VISIBLE_DEVICES / --cuda-device hide the others); lower "
                              f"{ENV_NUM_GPUS} or set {ENV_DEVICES}=cuda:0,cuda:0 to share a GPU")
        devices = tuple(f"cuda:{i}" for i in range(wanted))
    if sched == "on":
        return Settings(True, devices, f"{ENV_SCHED}=1")
    if len(devices) > 1:
        return Settings(True, devices, f"{len(devices)} devices")
    return Settings(False, devices, "one device and COMFY_MULTI_GPU_SCHED unset")


def cuda_count_without_torch(env: Mapping[str, str] = os.environ, proc_root: str = "/proc") -> int:
    """Count visible NVIDIA GPUs before torch is imported (prestartup), from the driver's /proc tree."""
    gpus_dir = os.path.join(proc_root, "driver", "nvidia", "gpus")
    present = len(os.listdir(gpus_dir)) if os.path.isdir(gpus_dir) else 0
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return present
    entries = [v for v in visible.split(",") if v.strip()]
    count = 0
    for entry in entries:
        if entry.strip().lstrip("-").isdigit() and int(entry) < 0:
            break  # CUDA stops enumerating at the first invalid index
        count += 1
    return min(count, present)
