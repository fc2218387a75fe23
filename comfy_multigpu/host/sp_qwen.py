"""Sequence-parallel Qwen-Image (issue 17): the FLUX engine's split and Ulysses exchange
(host/sp_flux.py) through Qwen-Image's own hooks, which are FLUX's:

- `patches["post_input"]` (qwen_image/model.py _forward, after img_in/txt_in, before RoPE is built from
  the ids): each rank keeps its contiguous share of the text and image tokens and of their ids;
- `optimized_attention_override` (every block's joint attention, `optimized_attention_masked` with
  transformer_options): head groups exchanged as for FLUX (q, k, v come as (B, H, L, D));
- `patches_replace["dit"][("double_block", last)]`: after the last block every rank gathers the image
  tokens, so norm_out, proj_out and the un-patchify see the whole image.

Qwen-Image, Qwen-Image-Edit (reference latents by index) and the Layered variant run split, with the
ControlNets ControlNetLoader loads (InstantX, Fun: their per-block additions cut per rank, sp_flux
_Rank.control); a text attention mask (padded prompts), index_timestep_zero references (2511: modulation
by token range), patches on the blocks (DiffSynth's blockwise ControlNet is one) and another attention
override fall back to one GPU.

Host objects touched: comfy.ldm.qwen_image.model.QwenImageTransformer2DModel (called, never changed);
transformer_options copied.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..policy.sequence_split import fallback_reason, token_patches
from ..runtime.rank_group import RankGroup
from .sp_flux import _Rank, run_forward


def qwen_fallback(model, x, context, transformer_options: dict, ranks: int, attention_mask=None, ref_latents=None,
                  **kwargs) -> Optional[str]:
    """Why this forward of `model` (a QwenImageTransformer2DModel) cannot be split over `ranks`."""
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
    if type(model) is not QwenImageTransformer2DModel:
        return f"{type(model).__name__} is a Qwen-Image variant that is not supported"
    patch = model.patch_size
    tokens = x.shape[2] if x.ndim == 5 else 1
    for size in x.shape[-2:]:
        tokens *= (size + patch // 2) // patch
    method = kwargs.get("ref_latents_method", model.default_ref_method)
    patched = token_patches(transformer_options, ("attn1_patch", "double_block"), ("double_block",))
    if patched:
        return patched
    return fallback_reason(
        ranks=ranks, heads=model.transformer_blocks[0].attn.heads, tokens=tokens, text_tokens=context.shape[1],
        attention_mask=attention_mask is not None,
        timestep_zero=bool(ref_latents) and method == "index_timestep_zero",
        foreign_override="optimized_attention_override" in transformer_options)


class _QwenRank(_Rank):
    def gather_after_last_block(self, args: dict, extra: dict) -> dict:
        out = extra["original_block"](args)
        return {"img": torch.cat(self.group.all_gather(self.rank, out["img"]), dim=1), "txt": out["txt"]}


def parallel_forward_qwen(models: Sequence[Any], devices: Sequence[Any], x, timestep, context, attention_mask=None,
                          ref_latents=None, additional_t_cond=None, transformer_options: Optional[dict] = None,
                          first=None, workers: Optional[Sequence[Any]] = None, **kwargs):
    """QwenImageTransformer2DModel._forward over len(models) ranks (see sp_flux.parallel_forward)."""
    last = len(models[0].transformer_blocks) - 1

    def hooks(group: RankGroup, rank: int):
        mine = _QwenRank(group, rank)
        return (mine.options(transformer_options or {}, ("double_block", last)),
                {"control": mine.control(kwargs.get("control"), ("input", last))})
    return run_forward(models, devices, (x, timestep, context, attention_mask, ref_latents, additional_t_cond),
                       kwargs, hooks, first=first, workers=workers)
