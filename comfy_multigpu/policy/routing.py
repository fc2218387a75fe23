"""Request routing rules as pure functions: reading X-TARGET-GPU, X-GPU-POOL and X-PRIORITY (or their
extra_data twins) into where a prompt may run and in which priority band, with 400-ready errors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .placement import PRIORITIES

HEADER = "X-TARGET-GPU"
POOL_HEADER = "X-GPU-POOL"
PRIORITY_HEADER = "X-PRIORITY"
SEQUENCE_PARALLEL_HEADER = "X-SEQUENCE-PARALLEL"
SEQUENCE_PARALLEL_VALUES = [str(n) for n in range(1, 9)] + ["auto"]
POOL_KEY = "gpu_pool"          # extra_data keys with the same meaning as the headers
PRIORITY_KEY = "priority"
AUTO = "auto"


class RequestError(ValueError):
    """A routing value names nothing usable; carries where it came from, the value and the valid ones."""
    kind = "invalid_request"

    def __init__(self, source: str, value: Any, valid: list, reason: str, kind: Optional[str] = None):
        self.source = source
        self.value = value
        self.valid = valid
        self.reason = reason
        if kind is not None:
            self.kind = kind
        super().__init__(f"{source} {value!r} {reason}")

    def as_json(self) -> dict:
        """Stock ComfyUI error shape (type/message/details/extra_info) plus node_errors, as /prompt uses."""
        valid_text = ", ".join(str(v) for v in self.valid)
        return {
            "error": {
                "type": self.kind,
                "message": str(self),
                "details": f"valid values: {valid_text}",
                "extra_info": {"header" if self.source.startswith("X-") else "field": self.source,
                               "value": self.value, "valid": self.valid},
            },
            "node_errors": {},
        }


class TargetError(RequestError):
    """X-TARGET-GPU names no usable GPU."""
    kind = "invalid_target_gpu"

    def __init__(self, value: str, valid: list, reason: str):
        super().__init__(HEADER, value, valid, reason)


def valid_targets(gpu_count: int, down: frozenset[int] = frozenset()) -> list:
    return [AUTO] + [i for i in range(gpu_count) if i not in down]


def parse_target(raw: str | None, gpu_count: int, down: frozenset[int] = frozenset()) -> int | None:
    """None for auto (header absent, empty or "auto"), else the GPU index; raises TargetError."""
    if raw is None:
        return None
    value = raw.strip()
    if value == "" or value.lower() == AUTO:
        return None
    if not value.isascii() or not value.isdigit():
        raise TargetError(raw, valid_targets(gpu_count, down), "is not a GPU index or 'auto'")
    index = int(value)
    if index >= gpu_count:
        raise TargetError(raw, valid_targets(gpu_count, down), f"is out of range: this server has {gpu_count} GPU(s)")
    if index in down:
        raise TargetError(raw, valid_targets(gpu_count, down), "names a GPU that is down")
    return index


def parse_pool(raw: Any, source: str, pools: Mapping[str, tuple]) -> Optional[str]:
    """The configured pool a header or extra_data value names (case-insensitive); None when absent."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise RequestError(source, raw, sorted(pools), "is not a pool name (a string)", "invalid_gpu_pool")
    name = raw.strip().lower()
    if name == "":
        return None
    if name not in pools:
        raise RequestError(source, raw, sorted(pools), "is not a configured GPU pool (COMFY_MULTIGPU_POOLS)",
                           "invalid_gpu_pool")
    return name


def parse_priority(raw: Any, source: str) -> Optional[str]:
    """high | normal | low (case-insensitive); None when absent."""
    if raw is None:
        return None
    if not isinstance(raw, str) or raw.strip().lower() not in PRIORITIES:
        raise RequestError(source, raw, list(PRIORITIES), "is not a priority", "invalid_priority")
    return raw.strip().lower()


def parse_sequence_parallel(raw: Any, source: str = SEQUENCE_PARALLEL_HEADER):
    """1-8 GPUs per image, or "auto" (every GPU of the pool); None when absent."""
    if raw is None:
        return None
    text = raw.strip().lower() if isinstance(raw, str) else raw
    if text not in SEQUENCE_PARALLEL_VALUES:
        raise RequestError(source, raw, SEQUENCE_PARALLEL_VALUES, "is not a number of GPUs per image",
                           "invalid_sequence_parallel")
    return text if text == "auto" else int(text)


@dataclass(frozen=True)
class Routing:
    """Where one prompt may run: pinned GPU (None: auto), pool and its GPUs (None: any), priority."""
    target: Optional[int]
    pool: Optional[str]
    eligible: Optional[frozenset]
    priority: Optional[str]


def _one_of(header_value: Optional[str], body_value: Optional[str], header: str, key: str, valid: list,
            kind: str) -> Optional[str]:
    if header_value is not None and body_value is not None and header_value != body_value:
        raise RequestError(header, header_value, valid, f"disagrees with extra_data.{key} {body_value!r}; "
                           f"send one of them", kind)
    return header_value if header_value is not None else body_value


def resolve(target: Optional[int], headers: Mapping[str, Optional[str]], extra_data: Any,
            pools: Mapping[str, tuple], default_pool: Optional[str] = None) -> Routing:
    """Combine the parsed X-TARGET-GPU with the pool and priority from headers and extra_data.

    A pinned prompt must lie inside the pool it names; a prompt that names no pool goes to
    `default_pool` if one is configured (a pinned prompt is then not restricted by it)."""
    extra = extra_data if isinstance(extra_data, Mapping) else {}
    pool = _one_of(parse_pool(headers.get(POOL_HEADER), POOL_HEADER, pools),
                   parse_pool(extra.get(POOL_KEY), f"extra_data.{POOL_KEY}", pools),
                   POOL_HEADER, POOL_KEY, sorted(pools), "invalid_gpu_pool")
    priority = _one_of(parse_priority(headers.get(PRIORITY_HEADER), PRIORITY_HEADER),
                       parse_priority(extra.get(PRIORITY_KEY), f"extra_data.{PRIORITY_KEY}"),
                       PRIORITY_HEADER, PRIORITY_KEY, list(PRIORITIES), "invalid_priority")
    if pool is not None and target is not None and target not in pools[pool]:
        raise RequestError(HEADER, str(target), list(pools[pool]),
                           f"is not in GPU pool {pool!r}; pin a GPU of the pool or drop one of the two",
                           "invalid_target_gpu")
    if pool is None and target is None and default_pool is not None:
        pool = default_pool
    eligible = frozenset(pools[pool]) if pool is not None else None
    return Routing(target, pool, eligible, priority)
