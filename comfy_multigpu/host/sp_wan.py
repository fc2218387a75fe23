"""Sequence-parallel Wan 2.x (issue 17): the same Ulysses exchange as FLUX (host/sp_flux.py), through
Wan's hooks: its blocks' replace patches (wan/model.py forward_orig, `patches_replace["dit"]
[("double_block", i)]`) hand each rank its share of the video tokens and of the RoPE frequencies at
the first block, every block gets its rank's frequencies, and the last one gathers the tokens so the
head and un-patchify see the whole video; self-attention exchanges head groups through
`optimized_attention_override`, cross-attention to the text and image context stays local (keys are
the same on every rank). Text to video and image to video (WanModel); the VACE, camera, audio and
other variants, per-frame timesteps (Wan 2.2 TI2V) and reference or in-context latents fall back.

Host objects touched: comfy.ldm.wan.model.WanModel (called, never changed); transformer_options copied.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..policy.sequence_split import fallback_reason, split_avoiding, token_patches
from ..runtime.rank_group import RankGroup
from .sp_flux import _Rank, run_forward

EXTRA_INPUTS = ("reference_latent", "context_latents", "audio_embed", "vace_context", "camera_conditions")


def wan_fallback(model, x, timestep, context, transformer_options: dict, ranks: int, time_dim_concat=None,
                 **kwargs) -> Optional[str]:
    """Why this forward of `model` cannot be split over `ranks` (None: it can)."""
    from comfy.ldm.wan.model import WanModel
    if type(model) is not WanModel:
        return f"{type(model).__name__} is a Wan variant that is not supported (text and image to video are)"
    patch = model.patch_size
    tokens = 1
    for size, step in zip(x.shape[2:], patch):
        tokens *= (size + step // 2) // step
    if timestep.ndim > 1 and timestep.shape[-1] > 1:
        return "per-frame timesteps (Wan 2.2 TI2V) modulate token ranges"
    if time_dim_concat is not None or any(kwargs.get(k) is not None for k in EXTRA_INPUTS):
        return "reference, in-context or other extra latents are not split"
    patched = token_patches(transformer_options, ("attn1_patch", "attn2_patch", "double_block"), ("double_block",))
    if patched:
        return patched
    return fallback_reason(ranks=ranks, heads=model.num_heads, tokens=tokens,
                           foreign_override="optimized_attention_override" in transformer_options)


class _WanRank(_Rank):
    def __init__(self, group: RankGroup, rank: int, blocks: int, image_tokens: int = 257):
        super().__init__(group, rank)
        self.blocks = blocks
        self.image_tokens = image_tokens      # CLIP image tokens in the context (257; 514 first-last frame)
        self.bounds = None

    def lengths(self) -> list[int]:
        return [b - a for a, b in self.bounds]

    def block(self, index: int):
        def run(args: dict, extra: dict) -> dict:
            x, freqs = args["img"], args["pe"]
            if index == 0:
                context = args["txt"].shape[1]
                self.bounds = split_avoiding(x.shape[1], self.group.size,
                                             {context, self.image_tokens, context - self.image_tokens})
            a, b = self.bounds[self.rank]
            if index == 0:
                x = x[:, a:b]
            out = extra["original_block"]({**args, "img": x, "pe": freqs[:, a:b]})
            if index == self.blocks - 1:
                out = {"img": torch.cat(self.group.all_gather(self.rank, out["img"]), dim=1)}
            return out
        return run

    def wan_options(self, transformer_options: dict) -> dict:
        return self.hooked(transformer_options, {("double_block", i): self.block(i) for i in range(self.blocks)})


def parallel_forward_wan(models: Sequence[Any], devices: Sequence[Any], x, timestep, context, clip_fea=None,
                         time_dim_concat=None, transformer_options: Optional[dict] = None, first=None,
                         workers: Optional[Sequence[Any]] = None, **kwargs):
    """WanModel._forward over len(models) ranks (see sp_flux.parallel_forward)."""
    blocks = len(models[0].blocks)
    image_tokens = clip_fea.shape[-2] if clip_fea is not None else 257
    return run_forward(models, devices, (x, timestep, context, clip_fea, time_dim_concat), kwargs,
                       lambda group, rank: (_WanRank(group, rank, blocks, image_tokens).wan_options(
                           transformer_options or {}), {}),
                       first=first, workers=workers)
