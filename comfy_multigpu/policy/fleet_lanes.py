"""Fleet queue lanes as pure functions: which lane a prompt waits in, the order in which a GPU reads
lanes, X-TARGET-NODE and node names. A lane is one Redis stream per (band x target); see
fleet/store.py for the keys and docs/fleet.md for the design. Host objects touched: none.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

from .routing import RequestError

NODE_HEADER = "X-TARGET-NODE"
LANE_PREFIX = "cmg:lane:"
BANDS = ("front", "high", "normal", "low")       # read in this order: stock "front" first
_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# Loader inputs whose file decides where a prompt runs best (the big weights), in order of weight.
AFFINITY_INPUTS = ("ckpt_name", "unet_name", "model_name")


def valid_node_name(name: str) -> bool:
    return bool(_NODE_RE.match(name or ""))


def node_name_problem(name: str) -> Optional[str]:
    """Why `name` cannot name a machine (COMFY_MULTIGPU_NODE_NAME), or None."""
    if valid_node_name(name):
        return None
    return (f"{name!r} is not a machine name: 1-63 letters, digits, '_', '.', '-', starting with a letter "
            f"or digit")


def parse_target_node(raw: Optional[str], known: Iterable[str]) -> Optional[str]:
    """X-TARGET-NODE: None when absent or empty; a well-formed name (a machine that is not up yet is
    allowed: the prompt waits for it and fails after a timeout); raises RequestError otherwise."""
    if raw is None or raw.strip() == "":
        return None
    name = raw.strip()
    if not valid_node_name(name):
        raise RequestError(NODE_HEADER, raw, sorted(known),
                           "is not a machine name (1-63 letters, digits, '_', '.', '-')", "invalid_target_node")
    return name


def band_of(priority: Optional[str], front: bool) -> str:
    if front:
        return "front"
    return priority if priority in ("high", "low") else "normal"


def affinity_model(models: Iterable[str]) -> Optional[str]:
    """The model key that places a prompt (its checkpoint or diffusion model), or None."""
    keys = sorted(models)
    for name in AFFINITY_INPUTS:
        for key in keys:
            if key.startswith(name + ":"):
                return key
    return None


def lane_target(node: Optional[str], gpu: Optional[int], pool: Optional[str], model: Optional[str]) -> str:
    """Where a prompt may run, as a lane suffix: a GPU of a machine, a machine, a pool, a model's
    holders (others after a delay), or anywhere. (A client's home lane "h:<machine>:<gpu>" is chosen
    in Redis at admission, where the home is known.)"""
    if node is not None and gpu is not None:
        return f"g:{node}:{gpu}"
    if node is not None:
        return f"n:{node}"
    if pool is not None:
        return f"p:{pool}"
    if model is not None:
        return f"m:{model}"
    return "any"


def lane(band: str, target: str) -> str:
    return f"{LANE_PREFIX}{band}:{target}"


def split_lane(name: str) -> tuple[str, str]:
    """(band, target) of a lane's key."""
    band, _, target = name[len(LANE_PREFIX):].partition(":")
    return band, target


def gpu_lanes(node: str, gpu: int, pools: Iterable[str], warm: Iterable[str]) -> list[str]:
    """The lanes GPU `gpu` of machine `node` reads, best first: per band, pinned to it, to its machine,
    its home lane (clients whose last prompt it ran), its pools, models it holds, anything."""
    targets = [f"g:{node}:{gpu}", f"n:{node}", f"h:{node}:{gpu}"] + [f"p:{p}" for p in sorted(pools)] + \
              [f"m:{m}" for m in warm] + ["any"]
    return [lane(band, target) for band in BANDS for target in targets]


def steal_lanes(all_lanes: Iterable[str], own: Iterable[str]) -> list[str]:
    """Model lanes of models this GPU does not hold, and other GPUs' home lanes, by band: taken from
    once their oldest prompt has waited the steal delay, or at once when no GPU they prefer is idle."""
    own = set(own)
    found = [name for name in all_lanes if name not in own and split_lane(name)[1][:2] in ("m:", "h:")]
    return sorted(found, key=lambda name: (BANDS.index(split_lane(name)[0]) if split_lane(name)[0] in BANDS
                                           else len(BANDS), name))


def pinned_node(lane_name: str) -> Optional[str]:
    """The machine a lane is pinned to (g: and n: lanes), else None."""
    target = split_lane(lane_name)[1]
    if target.startswith("n:"):
        return target[2:]
    if target.startswith("g:"):
        return target[2:].rpartition(":")[0]
    return None


def read_order(own: list, steal: list, prefer: dict) -> list:
    """(lane, GPUs it prefers) in the order a GPU reads them: band by band, its own lanes (prefer None)
    then the lanes it may steal from (`prefer[lane]`: the consumers that lane waits for while idle)."""
    order = []
    for band in BANDS:
        order += [(name, None) for name in own if split_lane(name)[0] == band]
        order += [(name, prefer.get(name, [])) for name in steal if split_lane(name)[0] == band]
    return order
