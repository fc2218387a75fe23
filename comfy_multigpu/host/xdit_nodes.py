"""The seed's six drop-in nodes (issue 17): the same inputs and outputs as the stock node each replaces,
plus `gpus` and `strategy` where they apply, so a FLUX workflow switches to several GPUs per image by
swapping node types and nothing else. The model is patched with SequenceParallel (host/sp_nodes.py);
`gpus` makes the prompt lease that many workers (policy/sequence_split.requested_ranks) and `strategy`
how the others are chosen (order_gang). The VAE and text-encoder loaders are the stock loaders under
the seed's names (the text encoders run once per prompt; the VAE on rank 0).

Host objects touched: nodes.CheckpointLoaderSimple / UNETLoader / KSampler / VAELoader / CLIPLoader /
DualCLIPLoader (their INPUT_TYPES and functions, called, never changed), nodes.common_ksampler.
"""
from __future__ import annotations

from ..policy.sequence_split import MAX_RANKS, STRATEGIES
from .sp_nodes import SequenceParallel

GPUS = ("INT", {"default": 2, "min": 1, "max": MAX_RANKS, "tooltip": "GPUs per image (1: one GPU)"})
STRATEGY = (list(STRATEGIES), {"default": STRATEGIES[0],
                               "tooltip": "how the other GPUs are chosen among the free ones of the pool"})


def _stock(name: str):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[name]


def _with_parallel_inputs(name: str) -> dict:
    types = _stock(name).INPUT_TYPES()
    required = dict(types.get("required", {}))
    required["gpus"] = GPUS
    required["strategy"] = STRATEGY
    return {**types, "required": required}


class _DropIn:
    CATEGORY = "multigpu/xdit"
    STOCK = ""

    @classmethod
    def stock(cls):
        return _stock(cls.STOCK)


class XDiTCheckpointLoader(_DropIn):
    """CheckpointLoaderSimple whose MODEL runs each forward on `gpus` GPUs."""
    STOCK = "CheckpointLoaderSimple"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load_checkpoint"

    @classmethod
    def INPUT_TYPES(cls):
        return _with_parallel_inputs(cls.STOCK)

    def load_checkpoint(self, ckpt_name, gpus=2, strategy=STRATEGIES[0]):
        model, clip, vae = self.stock()().load_checkpoint(ckpt_name)[:3]
        return SequenceParallel().patch(model, gpus)[0], clip, vae


class XDiTUNetLoader(_DropIn):
    """UNETLoader (diffusion models) whose MODEL runs each forward on `gpus` GPUs."""
    STOCK = "UNETLoader"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"

    @classmethod
    def INPUT_TYPES(cls):
        return _with_parallel_inputs(cls.STOCK)

    def load_unet(self, unet_name, weight_dtype, gpus=2, strategy=STRATEGIES[0]):
        model = self.stock()().load_unet(unet_name, weight_dtype)[0]
        return SequenceParallel().patch(model, gpus)


class XDiTKSampler(_DropIn):
    """KSampler that runs each denoiser forward on `gpus` GPUs."""
    STOCK = "KSampler"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return _with_parallel_inputs(cls.STOCK)

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
               denoise=1.0, gpus=2, strategy=STRATEGIES[0]):
        import nodes
        patched = SequenceParallel().patch(model, gpus)[0]
        return nodes.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                     latent_image, denoise=denoise)


class XDiTVAELoader(_DropIn):
    STOCK = "VAELoader"
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load_vae"

    @classmethod
    def INPUT_TYPES(cls):
        return cls.stock().INPUT_TYPES()

    def load_vae(self, **kwargs):
        return self.stock()().load_vae(**kwargs)


class XDiTCLIPLoader(_DropIn):
    STOCK = "CLIPLoader"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"

    @classmethod
    def INPUT_TYPES(cls):
        return cls.stock().INPUT_TYPES()

    def load_clip(self, **kwargs):
        return self.stock()().load_clip(**kwargs)


class XDiTDualCLIPLoader(_DropIn):
    STOCK = "DualCLIPLoader"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"

    @classmethod
    def INPUT_TYPES(cls):
        return cls.stock().INPUT_TYPES()

    def load_clip(self, **kwargs):
        return self.stock()().load_clip(**kwargs)


NODES = (XDiTCheckpointLoader, XDiTUNetLoader, XDiTKSampler, XDiTVAELoader, XDiTCLIPLoader, XDiTDualCLIPLoader)
NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: cls.__name__.replace("XDiT", "XDiT ") for cls in NODES}
