"""Sequence-parallel FLUX (issue 17): one denoiser forward run as N ranks, rank r with 1/N of the tokens,
through ComfyUI's own hooks only (no copy of its block code):

- `patches["post_input"]` (flux/model.py:184-190, before RoPE is built from the ids): each rank keeps
  its contiguous share of [text; image] tokens and of their position ids, so RoPE is exact per token;
- `transformer_options["optimized_attention_override"]` (attention.py wrap_attn, reached from
  flux/math.py attention()): Ulysses: q/k/v head groups are exchanged so each rank attends over every
  token for H/N heads with the user's own attention function, and the outputs are exchanged back;
- `patches_replace["dit"][("single_block", last)]`: after the last block every rank gathers all image
  tokens, so final_layer and the un-patchify in Flux._forward see the whole image (rank 0's is returned).

Everything outside the model (sampler, conditioning, VAE) runs once, as on one GPU. What the engine
cannot do exactly falls back to one GPU (policy/sequence_split.fallback_reason).

Host objects touched: comfy.ldm.flux.model.Flux (its _forward, params, blocks: read and called, never
changed); transformer_options dicts are copied, never modified in place.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import torch

from ..policy.sequence_split import fallback_reason, head_groups, token_patches, token_ranges
from ..runtime.rank_group import RankGroup, run_ranks

logger = logging.getLogger("comfy_multigpu")


def flux_fallback(model, x, context, transformer_options: dict, ranks: int, ref_latents=None,
                  **kwargs) -> Optional[str]:
    """Why this forward of `model` (a comfy.ldm.flux.model.Flux) cannot be split over `ranks`."""
    patch = model.patch_size
    img_tokens = ((x.shape[-2] + patch // 2) // patch) * ((x.shape[-1] + patch // 2) // patch)
    method = kwargs.get("ref_latents_method", getattr(model.params, "default_ref_method", None))
    replaced = transformer_options.get("patches_replace", {}).get("dit", {})
    patched = token_patches(transformer_options, ("attn1_patch", "attn1_output_patch"))
    if patched:
        return patched
    return fallback_reason(
        ranks=ranks, heads=model.num_heads, tokens=img_tokens, text_tokens=context.shape[1],
        attention_mask=kwargs.get("attention_mask") is not None,
        timestep_zero=bool(ref_latents) and method == "index_timestep_zero",
        foreign_override="optimized_attention_override" in transformer_options,
        foreign_last_block=("single_block", len(model.single_blocks) - 1) in replaced,
        single_blocks=len(model.single_blocks))


class _Rank:
    """One rank's hooks; `ranges` is set by the split and read by the exchanges after it."""

    def __init__(self, group: RankGroup, rank: int):
        self.group = group
        self.rank = rank
        self.ranges = None

    def split(self, args: dict) -> dict:
        img, txt = args["img"], args["txt"]
        self.ranges = token_ranges(txt.shape[1], img.shape[1], self.group.size)
        (t0, t1), (i0, i1) = self.ranges[self.rank]
        return {"img": img[:, i0:i1], "txt": txt[:, t0:t1], "img_ids": args["img_ids"][:, i0:i1],
                "txt_ids": args["txt_ids"][:, t0:t1], "transformer_options": args["transformer_options"]}

    def lengths(self) -> list[int]:
        return [r.length for r in self.ranges]

    def attention(self, func, q, k, v, heads, *args, **kwargs):
        """Ulysses: all tokens for this rank's head group, the host's attention, the result sent back.
        q, k, v come as (B, H, L, D) (skip_reshape, FLUX) or (B, L, H*D) (Wan). Attention whose keys
        are not this rank's tokens (Wan's cross-attention to the text) needs no exchange: the split
        never gives a rank as many tokens as the context has, so the lengths tell them apart."""
        lengths = self.lengths()
        split = kwargs.get("skip_reshape", False)
        length = q.shape[2] if split else q.shape[1]
        if (k.shape[2] if split else k.shape[1]) != length:
            return func(q, k, v, heads, *args, **kwargs)
        if not split:                                                 # (B, L, H*D) -> (B, H, L, D)
            q, k, v = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        groups = head_groups(q.shape[1], self.group.size)
        qkv = torch.stack((q, k, v))                                  # (3, B, H, L_rank, D)
        received = self.group.all_to_all(self.rank, [qkv[:, :, a:b] for a, b in groups])
        full = torch.cat(received, dim=3)                             # (3, B, H_mine, L, D)
        a, b = groups[self.rank]
        if split:
            out = func(full[0], full[1], full[2], b - a, *args, **kwargs)
        else:
            mine = [t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1) for t in full]
            out = func(mine[0], mine[1], mine[2], b - a, *args, **kwargs)
        if kwargs.get("skip_output_reshape"):                         # (B, H_mine, L, D)
            back = self.group.all_to_all(self.rank, list(out.split(lengths, dim=2)))
            return torch.cat(back, dim=1)
        back = self.group.all_to_all(self.rank, list(out.split(lengths, dim=1)))   # (B, L_rank, H_j*D)
        return torch.cat(back, dim=2)

    def gather_after_last_block(self, args: dict, extra: dict) -> dict:
        out = extra["original_block"](args)
        seq = out["img"]
        txt_len = self.ranges[self.rank].txt[1] - self.ranges[self.rank].txt[0]
        images = self.group.all_gather(self.rank, seq[:, txt_len:])
        return {"img": torch.cat([seq[:, :txt_len]] + images, dim=1)}

    def options(self, transformer_options: dict, last_block: tuple) -> dict:
        """transformer_options with the split after the inputs (post_input), the exchange around every
        attention and the gather replacing `last_block` (a patches_replace["dit"] key)."""
        return self.hooked(transformer_options, {last_block: self.gather_after_last_block}, self.split)

    def hooked(self, transformer_options: dict, replaces: dict, post_input: Optional[Callable] = None) -> dict:
        """A copy of `transformer_options` with this rank's hooks: `replaces` (patches_replace["dit"] keys:
        functions), `post_input` (after the post_input patches already there) and the exchange around
        every attention (optimized_attention_override)."""
        opts = dict(transformer_options)
        if post_input is not None:
            patches = {k: list(v) for k, v in opts.get("patches", {}).items()}
            patches["post_input"] = patches.get("post_input", []) + [post_input]
            opts["patches"] = patches
        replace = {k: dict(v) for k, v in opts.get("patches_replace", {}).items()}
        replace.setdefault("dit", {}).update(replaces)
        opts["patches_replace"] = replace
        opts["optimized_attention_override"] = self.attention
        opts["sequence_parallel"] = {"rank": self.rank, "ranks": self.group.size}
        return opts

    def control(self, control: Optional[dict], whole: tuple) -> Optional[dict]:
        """A ControlNet's additions (`{"input": [one per double block], "output": [one per single block]}`,
        each (B, image tokens, hidden) or None) as this rank's blocks read them. A block adds a tensor at
        the start of the rank's own image tokens, so each comes cut to the rank's share of the image
        tokens (empty where the control is shorter: reference tokens get none) and on the rank's device;
        the block at `whole` ((key, index): the one that gathers the image) adds to every image token and
        gets it whole. Cut when a block asks (the split has set the ranges by then), once per tensor."""
        if control is None:
            return None
        home, device = self.group.devices[0], self.group.devices[self.rank]
        made = {}

        def cut(key: str):
            def one(add, index: int):
                if add is None:
                    return None
                full = (key, index) == whole
                if (id(add), full) not in made:
                    a, b = self.ranges[self.rank].img
                    made[id(add), full] = _move(add if full else add[:, a:b], home, device)
                return made[id(add), full]
            return one
        return {key: _Additions(value, cut(key)) if key in ("input", "output") and value is not None
                else _move(value, home, device) for key, value in control.items()}


class _Additions:
    """A read-only list whose items come through `cut(item, index)` as they are read (by index, negative
    too, or by slice: a list), so a wrapper further down the chain may read it as a list."""

    def __init__(self, items, cut: Callable):
        self._items, self._cut = items, cut

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(len(self._items))[index]]
        index = range(len(self._items))[index]                       # IndexError as a list's
        return self._cut(self._items[index], index)

    def __iter__(self):
        return (self[i] for i in range(len(self._items)))


def parallel_forward(models: Sequence[Any], devices: Sequence[Any], x, timestep, context, y=None,
                     guidance=None, ref_latents=None, control=None, transformer_options: Optional[dict] = None,
                     first=None, workers: Optional[Sequence[Any]] = None, **kwargs):
    """Flux._forward over len(models) ranks: models[r] (the same weights) on devices[r]. `first`,
    if given, runs rank 0 instead of models[0]._forward (the rest of a wrapper chain); `workers[r]`,
    if given, is the GPU worker rank r runs for (its thread sees that worker's device). Returns (rank
    0's output on rank 0's device, the RankGroup, which counted the exchanges)."""
    last = len(models[0].single_blocks) - 1

    def hooks(group: RankGroup, rank: int):
        mine = _Rank(group, rank)
        return (mine.options(transformer_options or {}, ("single_block", last)),
                {6: mine.control(control, ("output", last))})
    return run_forward(models, devices, (x, timestep, context, y, guidance, ref_latents, control), kwargs, hooks,
                       first=first, workers=workers)


def run_forward(models: Sequence[Any], devices: Sequence[Any], args: tuple, kwargs: dict,
                hooks: Callable[[RankGroup, int], tuple], first=None, workers: Optional[Sequence[Any]] = None):
    """The rank launch of every model family: on rank r, with (options, own) = hooks(group, r),
    models[r]._forward(*args, options, **kwargs) with its tensors (and lists of them) on devices[r]
    (rank 0: `first` instead, if given); `own` holds the rank's own arguments, by position (int) or name,
    used as they are. Returns (rank 0's output, the RankGroup)."""
    group = RankGroup(devices)

    def work(rank: int):
        home, device = group.devices[0], group.devices[rank]
        call = first if rank == 0 and first is not None else models[rank]._forward
        options, own = hooks(group, rank)
        opts = {k: _move(v, home, device) for k, v in options.items()}    # e.g. "sigmas"
        return call(*(own[i] if i in own else _move(a, home, device) for i, a in enumerate(args)), opts,
                    **{k: own[k] if k in own else _move(v, home, device) for k, v in kwargs.items()})
    return run_ranks(group, work, workers), group


def _move(value, home, device):
    """Tensors on rank 0's device (`home`), also in lists and tuples, onto the rank's `device`;
    anything else (tensors kept elsewhere on purpose, e.g. on the CPU) as it is."""
    if home == device:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device) if value.device == home else value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_move(v, home, device) for v in value)
    return value
