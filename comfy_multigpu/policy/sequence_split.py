"""How a sequence-parallel forward divides its work (issue 17), pure: which tokens each rank holds
and which attention heads each rank computes. Uneven splits are exact in one process (no padding)."""
from __future__ import annotations

from typing import NamedTuple


class TokenRange(NamedTuple):
    """One rank's share of a [text tokens; image tokens] sequence: half-open ranges of each part."""
    txt: tuple[int, int]
    img: tuple[int, int]

    @property
    def length(self) -> int:
        return (self.txt[1] - self.txt[0]) + (self.img[1] - self.img[0])


def _even(count: int, ranks: int) -> list[tuple[int, int]]:
    bounds = [count * r // ranks for r in range(ranks + 1)]
    return list(zip(bounds, bounds[1:]))


def token_ranges(txt: int, img: int, ranks: int) -> list[TokenRange]:
    """Each rank's contiguous share of the text tokens and of the image tokens, both split as evenly
    as they go (FLUX's blocks reshape each stream by heads, so no rank may hold none of either)."""
    if ranks < 1 or txt < ranks or img < ranks:
        raise ValueError(f"{txt} text and {img} image tokens cannot be split over {ranks} ranks")
    return [TokenRange(t, i) for t, i in zip(_even(txt, ranks), _even(img, ranks))]


def split_avoiding(count: int, ranks: int, avoid: set) -> list[tuple[int, int]]:
    """`count` tokens in `ranks` contiguous shares as even as they go, none of a length in `avoid`
    (Wan: a share as long as a context the cross-attention reads would be taken for self-attention).
    A share that would be is traded a token with another share that stays clear of `avoid`."""
    lengths = [b - a for a, b in _even(count, ranks)]
    for i in range(ranks):
        if lengths[i] not in avoid:
            continue
        for delta in (1, -1, 2, -2, 3, -3, 4, -4):
            others = sorted((j for j in range(ranks) if j != i), key=lambda j: -lengths[j] * (1 if delta > 0 else -1))
            j = next((j for j in others if lengths[j] - delta >= 1 and lengths[j] - delta not in avoid
                      and lengths[i] + delta not in avoid), None)
            if j is not None:
                lengths[i], lengths[j] = lengths[i] + delta, lengths[j] - delta
                break
        else:
            raise ValueError(f"{count} tokens cannot be split over {ranks} ranks avoiding lengths {sorted(avoid)}")
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    return list(zip(bounds, bounds[1:]))


def head_groups(heads: int, ranks: int) -> list[tuple[int, int]]:
    """Attention heads computed by each rank after the exchange (uneven groups allowed)."""
    if not 1 <= ranks <= heads:
        raise ValueError(f"{heads} heads cannot be spread over {ranks} ranks")
    bounds = [heads * r // ranks for r in range(ranks + 1)]
    return list(zip(bounds, bounds[1:]))


# Node types that ask for a sequence-parallel run, and the input that says on how many GPUs.
SEQUENCE_PARALLEL_NODES = {"SequenceParallel": "gpus", "XDiTCheckpointLoader": "gpus", "XDiTUNetLoader": "gpus",
                           "XDiTKSampler": "gpus"}
MAX_RANKS = 8


def requested_ranks(prompt) -> int:
    """How many GPUs a prompt asks for at once (its gang): the largest `gpus` of its sequence-parallel
    nodes, 1 if none (a value that is not a whole number 1-8 counts as 1: validation reports it)."""
    wanted = 1
    for node in (prompt or {}).values() if isinstance(prompt, dict) else ():
        if not isinstance(node, dict):
            continue
        key = SEQUENCE_PARALLEL_NODES.get(node.get("class_type"))
        value = (node.get("inputs") or {}).get(key) if key else None
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_RANKS:
            wanted = max(wanted, value)
    return wanted


def requested_elastic(prompt) -> bool:
    """Whether a SequenceParallel node of the prompt has `auto` on (X-SEQUENCE-PARALLEL: auto sets
    it): the prompt then starts at once on the GPUs of its pool that are free, up to its `gpus`,
    instead of waiting until that many are."""
    return any(isinstance(node, dict) and node.get("class_type") == "SequenceParallel"
               and (node.get("inputs") or {}).get("auto") is True
               for node in ((prompt or {}).values() if isinstance(prompt, dict) else ()))


STRATEGIES = ("least_loaded", "round_robin", "weighted_round_robin", "adaptive")


def requested_strategy(prompt) -> str:
    """The `strategy` input of the prompt's first sequence-parallel node that has one (the seed's
    XDiT nodes), else least_loaded."""
    for node in (prompt or {}).values() if isinstance(prompt, dict) else ():
        if isinstance(node, dict) and node.get("class_type") in SEQUENCE_PARALLEL_NODES:
            value = (node.get("inputs") or {}).get("strategy")
            if value in STRATEGIES:
                return value
    return STRATEGIES[0]


def order_gang(strategy: str, candidates: list, workers: int, turn: int) -> list[int]:
    """The other free GPUs a gang lease prefers, best first. `candidates`: placement.WorkerLoad of each
    free GPU of the pool but rank 0's; `turn` counts the gang leases granted so far.
    least_loaded: fewest prompts waiting for it; round_robin: the next GPUs after the last lease's;
    weighted_round_robin: faster GPUs first (COMFY_MULTIGPU_GPU_WEIGHTS), then round robin; adaptive:
    most free device memory first (where known), then least loaded."""
    def rotation(w):
        return (w.gpu_id - turn) % max(1, workers)
    keys = {"least_loaded": lambda w: (w.pending, w.gpu_id),
            "round_robin": lambda w: (rotation(w),),
            "weighted_round_robin": lambda w: (-w.weight, rotation(w)),
            "adaptive": lambda w: (-(w.free_memory or 0), w.pending, w.gpu_id)}
    return [w.gpu_id for w in sorted(candidates, key=keys.get(strategy, keys["least_loaded"]))]


# Loaders whose output 0 is the MODEL a sampler takes: where X-SEQUENCE-PARALLEL inserts the node.
MODEL_LOADERS = ("UNETLoader", "CheckpointLoaderSimple", "CheckpointLoader", "UnetLoaderGGUF")


def with_sequence_parallel(prompt: dict, gpus: int, auto: bool = False) -> dict:
    """X-SEQUENCE-PARALLEL on an unchanged workflow: a SequenceParallel(gpus, auto) node after each
    model loader, its consumers rewired to it (a copy; the caller's dict is untouched). Explicit
    sequence-parallel nodes already in the graph stay as they are (the header adds nothing then)."""
    if requested_ranks(prompt) > 1 or gpus < 2:
        return prompt
    out = {node_id: dict(node, inputs=dict(node.get("inputs") or {})) for node_id, node in prompt.items()}
    added = {}
    for node_id, node in prompt.items():
        if isinstance(node, dict) and node.get("class_type") in MODEL_LOADERS:
            new_id = f"{node_id}.sequence_parallel"
            added[node_id] = new_id
            inputs = {"model": [node_id, 0], "gpus": gpus, **({"auto": True} if auto else {})}
            out[new_id] = {"class_type": "SequenceParallel", "inputs": inputs,
                           "_meta": {"title": f"Sequence Parallel (X-SEQUENCE-PARALLEL: {'auto' if auto else gpus})"}}
    for node_id, node in out.items():
        if node_id in added.values():
            continue
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] in added and value[1] == 0:
                node["inputs"][name] = [added[value[0]], 0]
    return out


def token_patches(transformer_options: dict, kinds: tuple, replaced: tuple = ()) -> str | None:
    """Why other patches make a split inexact (None: none do): a patch of one of `kinds` (e.g.
    attn1_patch: it sees one rank's q, k, v, not every token's) or a replace of a block of one of the
    `replaced` types (("double_block",): every one) in transformer_options."""
    patches = (transformer_options or {}).get("patches", {})
    found = [kind for kind in kinds if patches.get(kind)]
    dit = (transformer_options or {}).get("patches_replace", {}).get("dit", {})
    found += sorted({f"a replace of a {key[0]}" for key in dit if isinstance(key, tuple) and key[0] in replaced})
    return f"another patch works on the blocks' tokens ({', '.join(found)})" if found else None


def fallback_reason(*, ranks: int, heads: int, tokens: int, text_tokens: int = 1 << 30, attention_mask: bool = False,
                    timestep_zero: bool = False, foreign_override: bool = False,
                    foreign_last_block: bool = False, single_blocks: int = 1) -> str | None:
    """Why a forward cannot run exactly on `ranks` ranks (then it runs on one GPU), or None."""
    if ranks < 2:
        return None
    if heads < ranks:
        return f"the model has {heads} attention heads, fewer than {ranks} GPUs"
    if tokens < ranks:
        return f"{tokens} image tokens cannot be split over {ranks} GPUs"
    if text_tokens < ranks:
        return f"{text_tokens} text tokens cannot be split over {ranks} GPUs"
    if attention_mask:
        return "an attention mask is set (masked attention is not split)"
    if timestep_zero:
        return "reference latents with index_timestep_zero modulate token ranges"
    if foreign_override:
        return "another attention override is installed (optimized_attention_override)"
    if foreign_last_block:
        return "another patch replaces the last single block"
    if single_blocks < 1:
        return "the model has no single blocks to gather after"
    return None
