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
- COMFY_MULTIGPU_POOLS="fast=0,1;slow=2,3;vip=3" names pools of GPU indices (a pool called "default"
  takes the prompts that name none); COMFY_MULTIGPU_GPU_WEIGHTS="0:2,1:1" gives unequal GPUs their
  relative speed (unlisted GPUs weigh 1).
- COMFY_MULTIGPU_MAX_OVERTAKES=K: a free worker may start a later prompt whose models it has before
  an earlier one that would cost a model load, but a prompt is overtaken at most K times; a prompt
  needing several GPUs at once is passed over at most K times while too few are free, then free
  GPUs of its pool wait for it (0 = first come, first served; default OVERTAKES_PER_WORKER per worker).
- Reliability: COMFY_MULTIGPU_MAX_QUEUE_PER_GPU / COMFY_MULTIGPU_MAX_QUEUE cap running + waiting
  prompts (0 = no cap; past it POST /prompt answers 429); COMFY_MULTIGPU_DRAIN_TIMEOUT (seconds running
  prompts get to finish after SIGTERM); COMFY_MULTIGPU_WATCHDOG (seconds after which a still-running
  prompt marks its GPU unhealthy; 0 = off); COMFY_MULTIGPU_JOURNAL ("off", or a file path; default
  the user directory's comfy-multigpu/journal.sqlite3).
- COMFY_MULTIGPU_RAM_CACHE: budget of the shared model-weight cache ("24GB", "70%" of total RAM, bytes;
  default 70%), or "off" to let every worker load its own copy (stock behaviour).
- COMFY_MULTIGPU_MALLOC_ARENAS: glibc malloc arenas for the process (default MALLOC_ARENAS; 0 = glibc's
  default of 8 per core, each worker thread then keeps its own freed pages).
- COMFY_MULTIGPU_GC_FREEZE: "1"/"on" (default) freezes what start-up allocated out of Python's cyclic
  garbage collector (gc.freeze), so the periodic full collection every worker waits on scans only
  newer objects; "0"/"off" keeps stock's full scans.
- COMFY_MULTIGPU_FLEET=redis://[user:password@]host:port/db (or rediss://) makes this server a member of
  a fleet sharing one durable queue (docs/fleet.md); unset: no fleet, no connection. Its companions:
  COMFY_MULTIGPU_NODE_NAME (this machine's name, default the host name), COMFY_MULTIGPU_NODE_URL (where
  the others reach it), COMFY_MULTIGPU_FLEET_ATTEMPTS (starts before a prompt fails, 3),
  COMFY_MULTIGPU_FLEET_LEASE (seconds without renewal before a running prompt runs elsewhere, 30),
  COMFY_MULTIGPU_FLEET_STEAL_DELAY (seconds a model's prompts wait for a GPU holding it, 2) and
  COMFY_MULTIGPU_FLEET_ABSENT_TIMEOUT (seconds a prompt pinned to an absent machine waits, 120).
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from typing import Mapping, Optional

from . import fleet_lanes
from .eviction import BudgetError, parse_ram_budget

ENV_SCHED = "COMFY_MULTI_GPU_SCHED"
ENV_NUM_GPUS = "COMFY_NUM_GPUS"
ENV_DEVICES = "COMFY_MULTIGPU_DEVICES"
ENV_POOLS = "COMFY_MULTIGPU_POOLS"
ENV_WEIGHTS = "COMFY_MULTIGPU_GPU_WEIGHTS"
ENV_OVERTAKES = "COMFY_MULTIGPU_MAX_OVERTAKES"
ENV_QUEUE_PER_GPU = "COMFY_MULTIGPU_MAX_QUEUE_PER_GPU"
ENV_QUEUE_TOTAL = "COMFY_MULTIGPU_MAX_QUEUE"
ENV_DRAIN_TIMEOUT = "COMFY_MULTIGPU_DRAIN_TIMEOUT"
ENV_WATCHDOG = "COMFY_MULTIGPU_WATCHDOG"
ENV_JOURNAL = "COMFY_MULTIGPU_JOURNAL"
ENV_RAM_CACHE = "COMFY_MULTIGPU_RAM_CACHE"
ENV_MALLOC_ARENAS = "COMFY_MULTIGPU_MALLOC_ARENAS"
ENV_GC_FREEZE = "COMFY_MULTIGPU_GC_FREEZE"
ENV_WORKER_MODE = "COMFY_MULTIGPU_WORKER_MODE"
ENV_FLEET = "COMFY_MULTIGPU_FLEET"                 # redis://[user:password@]host:port/db: a fleet member
ENV_NODE_NAME = "COMFY_MULTIGPU_NODE_NAME"         # this machine's name in the fleet (default: host name)
ENV_NODE_URL = "COMFY_MULTIGPU_NODE_URL"           # where other machines reach this one (default: its listen address)
ENV_FLEET_ATTEMPTS = "COMFY_MULTIGPU_FLEET_ATTEMPTS"
ENV_FLEET_LEASE = "COMFY_MULTIGPU_FLEET_LEASE"
ENV_FLEET_STEAL = "COMFY_MULTIGPU_FLEET_STEAL_DELAY"
ENV_FLEET_ABSENT = "COMFY_MULTIGPU_FLEET_ABSENT_TIMEOUT"
ENV_CHILD = "COMFY_MULTIGPU_CHILD_GPU"   # set by the main process in a process worker's child: its GPU id
MALLOC_ARENAS = 2

_ON = {"1", "on", "true", "yes"}
_OFF = {"0", "off", "false", "no"}
_DEVICE_RE = re.compile(r"^(cpu|cuda(?::(\d+))?)$")
_POOL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
ALL_POOL = "all"          # implicit pool of every GPU (unless configured otherwise)
DEFAULT_POOL = "default"  # if configured: where prompts that name no pool go
OVERTAKES_PER_WORKER = 4


class ConfigError(ValueError):
    """A setting has a value we cannot use; the message names the variable, the value and the fix."""


@dataclass(frozen=True)
class Settings:
    enabled: bool
    devices: tuple[str, ...]
    reason: str
    pools: Mapping[str, tuple[int, ...]] = field(default_factory=dict)   # name -> GPU indices
    weights: tuple[float, ...] = ()                                       # one per device
    max_overtakes: int = 0
    max_queue_per_gpu: int = 0
    max_queue: int = 0
    drain_timeout: float = 600.0
    watchdog: float = 0.0
    journal: str = ""                  # "" = default path, "off" = none
    ram_cache: str = ""                # COMFY_MULTIGPU_RAM_CACHE as given ("" = default, "off")
    malloc_arenas: int = MALLOC_ARENAS
    gc_freeze: bool = True
    worker_mode: str = "thread"        # thread: workers are threads; process: each runs a child process
    fleet: Optional["FleetSettings"] = None   # a member of a fleet (COMFY_MULTIGPU_FLEET), else None


@dataclass(frozen=True)
class FleetSettings:
    url: str                           # redis:// or rediss:// URL of the fleet's queue
    node: str                          # this machine's name
    node_url: str = ""                 # base URL other machines reach it at ("": from ComfyUI's listen/port)
    attempts: int = 3                  # starts of one prompt before it fails
    lease_s: float = 30.0              # a running prompt not renewed for this long runs elsewhere
    steal_s: float = 2.0               # a model's prompts wait this long for a GPU that holds the model
    absent_s: float = 120.0            # a prompt pinned to a machine that is not up fails after this

    @property
    def safe_url(self) -> str:
        """The URL without its password (for logs)."""
        return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", self.url)


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


def _gpu_index(text: str, gpu_count: int, where: str) -> int:
    text = text.strip()
    if not text.isascii() or not text.isdigit():
        raise ConfigError(f"{where}: {text!r} is not a GPU index (0..{gpu_count - 1})")
    index = int(text)
    if index >= gpu_count:
        raise ConfigError(f"{where}: GPU {index} does not exist; this server has {gpu_count} "
                          f"worker(s), numbered 0..{gpu_count - 1}")
    return index


def parse_pools(raw: str, gpu_count: int) -> dict[str, tuple[int, ...]]:
    """ "fast=0,1;slow=2,3" -> {"fast": (0, 1), "slow": (2, 3), "all": (0..N-1)}; names are lower-cased."""
    pools: dict[str, tuple[int, ...]] = {}
    for part in (p.strip() for p in raw.split(";")):
        if not part:
            continue
        name, sep, members = part.partition("=")
        name = name.strip().lower()
        if not sep or not _POOL_NAME_RE.match(name):
            raise ConfigError(f"{ENV_POOLS}: {part!r} is not name=GPU,GPU (names: letters, digits, _ . -); "
                              f'example: "fast=0,1;slow=2,3"')
        if name in pools:
            raise ConfigError(f"{ENV_POOLS}: pool {name!r} is defined twice")
        indices = [_gpu_index(m, gpu_count, f"{ENV_POOLS} pool {name!r}") for m in members.split(",") if m.strip()]
        if not indices:
            raise ConfigError(f"{ENV_POOLS}: pool {name!r} lists no GPU")
        pools[name] = tuple(sorted(set(indices)))
    pools.setdefault(ALL_POOL, tuple(range(gpu_count)))
    return pools


def parse_weights(raw: str, gpu_count: int) -> tuple[float, ...]:
    """ "0:2,1:1" -> (2.0, 1.0, 1.0, ...): each GPU's relative speed; unlisted GPUs weigh 1."""
    weights = [1.0] * gpu_count
    seen = set()
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        index_text, sep, value = part.partition(":")
        if not sep:
            raise ConfigError(f"{ENV_WEIGHTS}: {part!r} is not GPU:weight; example: \"0:2,1:1\"")
        index = _gpu_index(index_text, gpu_count, ENV_WEIGHTS)
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not (0 < weight < 1e6):      # also refuses nan and inf
            raise ConfigError(f"{ENV_WEIGHTS}: weight {value.strip()!r} of GPU {index} must be a number above 0")
        if index in seen:
            raise ConfigError(f"{ENV_WEIGHTS}: GPU {index} is listed twice")
        seen.add(index)
        weights[index] = weight
    return tuple(weights)


def _whole(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isascii() or not raw.isdigit():
        raise ConfigError(f"{name}={raw!r} must be a whole number, 0 or more")
    return int(raw)


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (0 <= value < 1e7):
        raise ConfigError(f"{name}={raw!r} must be a number of seconds, 0 or more")
    return value


def _switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _ON or raw in _OFF:
        return raw in _ON
    raise ConfigError(f"{name}={env[name]!r} is not understood; use 1 (on) or 0 (off)")


def _ram_cache(env: Mapping[str, str]) -> str:
    raw = env.get(ENV_RAM_CACHE, "").strip()
    try:
        parse_ram_budget(raw, 1 << 40, ENV_RAM_CACHE)      # the syntax; bytes come at activation
    except BudgetError as ex:
        raise ConfigError(str(ex)) from None
    return raw


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
    pools = parse_pools(env.get(ENV_POOLS, ""), len(devices))
    weights = parse_weights(env.get(ENV_WEIGHTS, ""), len(devices))
    overtakes = _whole(env, ENV_OVERTAKES, OVERTAKES_PER_WORKER * len(devices))
    options = {"pools": pools, "weights": weights, "max_overtakes": overtakes,
                 "max_queue_per_gpu": _whole(env, ENV_QUEUE_PER_GPU, 0), "max_queue": _whole(env, ENV_QUEUE_TOTAL, 0),
                 "drain_timeout": _seconds(env, ENV_DRAIN_TIMEOUT, 600.0),
                 "watchdog": _seconds(env, ENV_WATCHDOG, 0.0), "journal": env.get(ENV_JOURNAL, "").strip(),
                 "ram_cache": _ram_cache(env), "malloc_arenas": _whole(env, ENV_MALLOC_ARENAS, MALLOC_ARENAS),
                 "gc_freeze": _switch(env, ENV_GC_FREEZE, True), "worker_mode": _worker_mode(env),
                 "fleet": _fleet(env)}
    if sched == "on":
        return Settings(True, devices, f"{ENV_SCHED}=1", **options)
    if len(devices) > 1:
        return Settings(True, devices, f"{len(devices)} devices", **options)
    if options["fleet"] is not None:
        return Settings(True, devices, f"{ENV_FLEET} is set (a fleet member, one device)", **options)
    return Settings(False, devices, "one device and COMFY_MULTI_GPU_SCHED unset", **options)


def _worker_mode(env: Mapping[str, str]) -> str:
    raw = env.get(ENV_WORKER_MODE, "").strip().lower()
    if raw in ("", "thread"):
        return "thread"
    if raw == "process":
        return "process"
    raise ConfigError(f"{ENV_WORKER_MODE}={env[ENV_WORKER_MODE]!r} is not a worker mode; use thread (one "
                      f"process, the default) or process (a child process per GPU)")


def _fleet(env: Mapping[str, str]) -> Optional[FleetSettings]:
    """COMFY_MULTIGPU_FLEET and its companions; None (no fleet, no connection) when unset."""
    url = env.get(ENV_FLEET, "").strip()
    if not url:
        return None
    if not re.match(r"^rediss?://[^/\s]*(/\d+)?$", url) or re.match(r"^rediss?:///?$", url):
        raise ConfigError(f"{ENV_FLEET}={url!r} is not a Redis URL; use redis://[user:password@]host:port/db "
                          f"(or rediss:// for TLS)")
    node = env.get(ENV_NODE_NAME, "").strip() or socket.gethostname().split(".")[0]
    problem = fleet_lanes.node_name_problem(node)
    if problem:
        raise ConfigError(f"{ENV_NODE_NAME}: {problem}")
    node_url = env.get(ENV_NODE_URL, "").strip().rstrip("/")
    if node_url and not re.match(r"^https?://[^/\s]+$", node_url):
        raise ConfigError(f"{ENV_NODE_URL}={node_url!r} is not a base URL; use http://host:port")
    attempts = _whole(env, ENV_FLEET_ATTEMPTS, 3)
    if attempts < 1:
        raise ConfigError(f"{ENV_FLEET_ATTEMPTS}={attempts} must be 1 or more (starts of one prompt)")
    lease = _seconds(env, ENV_FLEET_LEASE, 30.0)
    if lease < 1.0:
        raise ConfigError(f"{ENV_FLEET_LEASE}={lease} must be at least 1 second")
    return FleetSettings(url, node, node_url, attempts, lease, _seconds(env, ENV_FLEET_STEAL, 2.0),
                         _seconds(env, ENV_FLEET_ABSENT, 120.0))


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
