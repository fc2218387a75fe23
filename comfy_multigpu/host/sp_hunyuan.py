"""Sequence-parallel HunyuanVideo (issue 17): the FLUX engine's split and Ulysses exchange
(host/sp_flux.py) on ComfyUI's HunyuanVideo class, which runs HunyuanVideo 1.0 (text and image to
video), 1.5 and HunyuanImage 2.1. Its forward has no hook between the embeddings and the blocks, so the
blocks' replace patches do it (hunyuan_video/model.py forward_orig, `patches_replace["dit"]`):

- the first double block's cuts each rank's contiguous share of the text and video tokens and of their
  RoPE frequencies (built for [text; video] before the blocks); every block gets the rank's frequencies;
- attention exchanges head groups through `optimized_attention_override` (the text refiner, which runs
  before the split, attends as it is);
- the last single block's gathers the video tokens, so the final layer and the un-patchify see them all.

A text attention mask (padded prompts), the image-to-video token replace (`guiding_frame_index`:
modulation by token range), other patches on the blocks or their attention (attn1_patch,
attn1_output_patch) and another attention override fall back.

Host objects touched: comfy.ldm.hunyuan_video.model.HunyuanVideo (called, never changed);
transformer_options copied.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..policy.sequence_split import fallback_reason, token_patches, token_ranges
from ..runtime.rank_group import RankGroup
from .sp_flux import _Rank, run_forward


def hunyuan_fallback(model, x, context, transformer_options: dict, ranks: int, attention_mask=None,
                     guiding_frame_index=None, **kwargs) -> Optional[str]:
    """Why this forward of `model` (a HunyuanVideo) cannot be split over `ranks` (None: it can)."""
    from comfy.ldm.hunyuan_video.model import HunyuanVideo
    if type(model) is not HunyuanVideo:
        return f"{type(model).__name__} is a HunyuanVideo variant that is not supported"
    tokens = 1
    for size, step in zip(x.shape[2:], model.patch_size):
        tokens *= (size + step // 2) // step
    if guiding_frame_index is not None:
        return "the image-to-video token replace (guiding_frame_index) modulates token ranges"
    patched = token_patches(transformer_options, ("attn1_patch", "attn1_output_patch"),
                            ("double_block", "single_block"))
    if patched:
        return patched
    if not model.double_blocks or not model.single_blocks:
        return "the model has no double or no single blocks to split and gather at"
    return fallback_reason(ranks=ranks, heads=model.num_heads, tokens=tokens, text_tokens=context.shape[1],
                           attention_mask=attention_mask is not None,
                           foreign_override="optimized_attention_override" in transformer_options)


class _HunyuanRank(_Rank):
    def __init__(self, group: RankGroup, rank: int, doubles: int, singles: int):
        super().__init__(group, rank)
        self.doubles, self.singles = doubles, singles
        self.pe = None

    def attention(self, func, q, k, v, heads, *args, **kwargs):
        if self.pe is None:                              # the text refiner, before the split
            return func(q, k, v, heads, *args, **kwargs)
        return super().attention(func, q, k, v, heads, *args, **kwargs)

    def double(self, index: int):
        def run(args: dict, extra: dict) -> dict:
            if index == 0:
                txt, img, pe = args["txt"], args["img"], args["pe"]
                self.ranges = token_ranges(txt.shape[1], img.shape[1], self.group.size)
                (t0, t1), (i0, i1) = self.ranges[self.rank]
                text = txt.shape[1]
                self.pe = torch.cat((pe[:, :, t0:t1], pe[:, :, text + i0:text + i1]), dim=2)
                args = {**args, "img": img[:, i0:i1], "txt": txt[:, t0:t1]}
            return extra["original_block"]({**args, "pe": self.pe})
        return run

    def single(self, index: int):
        def run(args: dict, extra: dict) -> dict:
            args = {**args, "pe": self.pe}
            if index == self.singles - 1:
                return self.gather_after_last_block(args, extra)
            return extra["original_block"](args)
        return run

    def hunyuan_options(self, transformer_options: dict) -> dict:
        return self.hooked(transformer_options, {**{("double_block", i): self.double(i) for i in range(self.doubles)},
                                                 **{("single_block", i): self.single(i) for i in range(self.singles)}})


def parallel_forward_hunyuan(models: Sequence[Any], devices: Sequence[Any], x, timestep, context, y=None,
                             txt_byt5=None, clip_fea=None, guidance=None, attention_mask=None,
                             guiding_frame_index=None, ref_latent=None, disable_time_r=False, control=None,
                             transformer_options: Optional[dict] = None, first=None,
                             workers: Optional[Sequence[Any]] = None, **kwargs):
    """HunyuanVideo._forward over len(models) ranks (see sp_flux.parallel_forward)."""
    doubles, singles = len(models[0].double_blocks), len(models[0].single_blocks)

    def hooks(group: RankGroup, rank: int):
        mine = _HunyuanRank(group, rank, doubles, singles)
        return mine.hunyuan_options(transformer_options or {}), {11: mine.control(control, ("output", singles - 1))}
    return run_forward(models, devices, (x, timestep, context, y, txt_byt5, clip_fea, guidance, attention_mask,
                                         guiding_frame_index, ref_latent, disable_time_r, control),
                       kwargs, hooks, first=first, workers=workers)
