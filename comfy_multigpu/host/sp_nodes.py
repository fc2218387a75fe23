"""The SequenceParallel node (issue 17): a model patch that runs each FLUX, Qwen-Image, Wan or HunyuanVideo
denoiser forward on the GPUs the prompt leased (host/sp_flux.py, sp_qwen.py, sp_wan.py, sp_hunyuan.py), or
on one GPU with the reason logged and kept in history.

A prompt holding this node asks the scheduler for `gpus` workers at once (QueuedPrompt.gang, read from
the graph by policy/sequence_split.requested_ranks); its rank 0 runs the executor, the others lend their
devices. It works with the stock loaders and samplers (KSampler, SamplerCustomAdvanced): the patch is a
DIFFUSION_MODEL wrapper on a clone of the model, ComfyUI's own extension point.

Host objects touched: comfy.model_patcher.ModelPatcher (clone, add_wrapper_with_key),
comfy.patcher_extension.WrappersMP, the Flux, QwenImageTransformer2DModel, WanModel and HunyuanVideo classes
(type checks), nodes' registry (through the custom node's NODE_CLASS_MAPPINGS).
"""
from __future__ import annotations

import logging
from typing import Optional

from ..policy.sequence_split import MAX_RANKS, fallback_reason
from ..runtime.context import current_worker
from .rank_copies import on_devices, uncopyable
from .sp_flux import flux_fallback, parallel_forward
from .sp_hunyuan import hunyuan_fallback, parallel_forward_hunyuan
from .sp_qwen import parallel_forward_qwen, qwen_fallback
from .sp_wan import parallel_forward_wan, wan_fallback

logger = logging.getLogger("comfy_multigpu")

WRAPPER_KEY = "comfy_multigpu.sequence_parallel"


def leased_workers() -> list:
    """The GPU workers of the calling worker's lease, rank 0 first ([the worker] outside a lease, []
    outside any worker): where a sequence-parallel forward or VAE decode may run."""
    worker = current_worker.get()
    lease = getattr(worker, "lease", None)
    pool = getattr(worker, "pool", None)
    if lease is None or pool is None:
        return [worker] if worker is not None else []
    return [pool.workers[g] for g in lease.gpu_ids]


class SequenceParallelWrapper:
    """WrappersMP.DIFFUSION_MODEL wrapper: the forward on the lease's GPUs, or one with a reason."""

    def __init__(self, gpus: int, auto: bool = False):
        self.gpus = gpus
        self.auto = auto                  # on the GPUs that were free; as many as the model allows

    def __call__(self, executor, *args, **kwargs):
        model = executor.class_obj
        workers = self._leased_workers()
        ranks = min(self.gpus, len(workers))
        family, adapter = model_family(model)
        if family is None:
            reason = (f"{type(model).__name__} is not a supported model "
                      "(FLUX.1, FLUX.2, Qwen-Image, Wan 2.x, HunyuanVideo)")
        else:
            why, run = adapter(model, args, dict(kwargs))
            if ranks < 2:
                reason = self._why_one(workers)
            else:
                reason = why(ranks)
                if reason is not None and self.auto:     # auto: as many as the model's heads and tokens allow
                    fits = next((n for n in range(ranks - 1, 1, -1) if why(n) is None), None)
                    if fits is not None:
                        ranks, reason = fits, None
                if reason is None and any(w.device != workers[0].device for w in workers[1:ranks]):
                    reason = uncopyable(model)
        self._note(workers, ranks, reason, family or "")
        if reason is not None or self.gpus < 2:
            return executor(*args, **kwargs)
        workers = workers[:ranks]
        devices = [w.device for w in workers]
        out, group = run(on_devices(model, devices, workers), devices, executor, workers)
        self._count(group)
        return out

    @staticmethod
    def _count(group) -> None:
        """The prompt's history note counts forwards and exchanges (every exchange is a meeting of all
        ranks at one barrier: proof that they ran at the same time)."""
        lease = getattr(current_worker.get(), "lease", None)
        note = lease.notes.get("sequence_parallel") if lease is not None else None
        if note is not None:
            note["forwards"] = note.get("forwards", 0) + 1
            note["exchanges"] = note.get("exchanges", 0) + group.exchanges

    @staticmethod
    def _leased_workers() -> list:
        return leased_workers()

    def _why_one(self, workers: list) -> Optional[str]:
        if self.gpus < 2:
            return None
        worker = current_worker.get()
        if worker is None:
            return "comfy-multigpu is not active in this process"
        if getattr(worker, "process_child", False):
            return "process workers own one GPU each (COMFY_MULTIGPU_WORKER_MODE=thread runs it on several)"
        return (f"only {len(workers)} GPU leased for this prompt (it is pinned to one GPU, or its pool "
                f"has fewer than {self.gpus})")

    def _note(self, workers: list, ranks: int, reason: Optional[str], family: str = "") -> None:
        """Once per prompt: a log line and the prompt's history field `sequence_parallel`."""
        worker = current_worker.get()
        lease = getattr(worker, "lease", None)
        note = {"gpus_asked": self.gpus, "gpus": 1 if reason else max(1, ranks),
                "gpu_ids": [w.gpu_id for w in workers[:1 if reason else ranks]], "fallback": reason}
        if self.auto:
            note["auto"] = True
        if lease is not None:
            known = lease.notes.get("sequence_parallel")
            if known is not None and all(known.get(k) == v for k, v in note.items()):
                return
            if known is not None and "vae" in known:          # a decode before this forward (sp_vae)
                note["vae"] = known["vae"]
            lease.notes["sequence_parallel"] = note
        if reason is not None:
            logger.warning("[GPU %s] SequenceParallel(gpus=%d): running on one GPU: %s",
                           getattr(worker, "gpu_id", "?"), self.gpus, reason)
        elif ranks >= 2:
            logger.info("[GPU %s] SequenceParallel: each %s forward on GPUs %s", getattr(worker, "gpu_id", "?"),
                        family, note["gpu_ids"])


FLUX_ARGS = ("x", "timestep", "context", "y", "guidance", "ref_latents", "control", "transformer_options")
WAN_ARGS = ("x", "timestep", "context", "clip_fea", "time_dim_concat", "transformer_options")
QWEN_ARGS = ("x", "timestep", "context", "attention_mask", "ref_latents", "additional_t_cond", "transformer_options")
HUNYUAN_ARGS = ("x", "timestep", "context", "y", "txt_byt5", "clip_fea", "guidance", "attention_mask",
                "guiding_frame_index", "ref_latent", "disable_time_r", "control", "transformer_options")


def _flux(model, args: tuple, extra: dict):
    """comfy.ldm.flux.model.Flux (FLUX.1, FLUX.2 and the other models built on it): (why(n): the reason
    this forward cannot run on n ranks or None, run(models, devices, first, workers))."""
    x, timestep, context, y, guidance, ref_latents, control, options = _positional(args, extra, FLUX_ARGS)

    def why(n):
        return flux_fallback(model, x, context, options, n, ref_latents=ref_latents, **extra)

    def run(models, devices, first, workers):
        return parallel_forward(models, devices, x, timestep, context, y, guidance, ref_latents, control, options,
                                first=first, workers=workers, **extra)
    return why, run


def _wan(model, args: tuple, extra: dict):
    """comfy.ldm.wan.model.WanModel and its variants (those but text and image to video fall back)."""
    x, timestep, context, clip_fea, time_dim_concat, options = _positional(args, extra, WAN_ARGS)

    def why(n):
        return wan_fallback(model, x, timestep, context, options, n, time_dim_concat=time_dim_concat, **extra)

    def run(models, devices, first, workers):
        return parallel_forward_wan(models, devices, x, timestep, context, clip_fea, time_dim_concat, options,
                                    first=first, workers=workers, **extra)
    return why, run


def _qwen(model, args: tuple, extra: dict):
    """comfy.ldm.qwen_image.model.QwenImageTransformer2DModel (Qwen-Image, -Edit, -Layered)."""
    x, timestep, context, attention_mask, ref_latents, t_cond, options = _positional(args, extra, QWEN_ARGS)

    def why(n):
        return qwen_fallback(model, x, context, options, n, attention_mask=attention_mask, ref_latents=ref_latents,
                             **extra)

    def run(models, devices, first, workers):
        return parallel_forward_qwen(models, devices, x, timestep, context, attention_mask, ref_latents, t_cond,
                                     options, first=first, workers=workers, **extra)
    return why, run


def _hunyuan(model, args: tuple, extra: dict):
    """comfy.ldm.hunyuan_video.model.HunyuanVideo (HunyuanVideo 1.0 and 1.5, HunyuanImage 2.1)."""
    values = _positional(args, extra, HUNYUAN_ARGS)
    named = dict(zip(HUNYUAN_ARGS, values))
    options = named.pop("transformer_options")

    def why(n):
        return hunyuan_fallback(model, named["x"], named["context"], options, n,
                                attention_mask=named["attention_mask"],
                                guiding_frame_index=named["guiding_frame_index"], **extra)

    def run(models, devices, first, workers):
        return parallel_forward_hunyuan(models, devices, *values[:-1], options, first=first, workers=workers,
                                        **extra)
    return why, run


def model_family(model) -> tuple:
    """(the family's name, its adapter) of a diffusion model the engine splits; (None, None) otherwise."""
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.hunyuan_video.model import HunyuanVideo
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
    from comfy.ldm.wan.model import WanModel
    for cls, name, adapter in ((Flux, "FLUX", _flux), (WanModel, "Wan", _wan),
                               (QwenImageTransformer2DModel, "Qwen-Image", _qwen),
                               (HunyuanVideo, "HunyuanVideo", _hunyuan)):
        if isinstance(model, cls):
            return name, adapter
    return None, None


def _positional(args: tuple, kwargs: dict, names: tuple) -> tuple:
    """The model's forward arguments by position (those given by keyword are taken out of `kwargs`);
    transformer_options last, {} when absent."""
    count = len(names)
    values = list(args[:count]) + [kwargs.pop(n, None) for n in names[len(args[:count]):]]
    values[-1] = values[-1] or {}
    return tuple(values)


class SequenceParallel:
    """MODEL -> MODEL: each denoiser forward runs on `gpus` GPUs at once (FLUX.1, FLUX.2, Qwen-Image, Wan 2.x,
    HunyuanVideo; others on one)."""
    CATEGORY = "advanced/model"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    DESCRIPTION = ("Runs each FLUX, Qwen-Image, Wan or HunyuanVideo denoiser step on several GPUs at once "
                   "(sequence parallelism): the prompt waits until that many GPUs of its pool are free. Falls back "
                   "to one GPU, with the reason in the log and in the prompt's history, when the model or the "
                   "patches do not allow it.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",),
                             "gpus": ("INT", {"default": 2, "min": 1, "max": MAX_RANKS,
                                              "tooltip": "GPUs to run each forward on (1: off)"})},
                "optional": {"auto": ("BOOLEAN", {"default": False, "tooltip":
                             "Start at once on the GPUs of the pool that are free (up to `gpus`, as many as "
                             "the model allows) instead of waiting until `gpus` are free"})}}

    def patch(self, model, gpus, auto=False):
        import comfy.patcher_extension
        patched = model.clone()
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                     SequenceParallelWrapper(int(gpus), bool(auto)))
        return (patched,)


NODE_CLASS_MAPPINGS = {"SequenceParallel": SequenceParallel}
NODE_DISPLAY_NAME_MAPPINGS = {"SequenceParallel": "Sequence Parallel (several GPUs per image)"}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "SequenceParallelWrapper", "fallback_reason"]
