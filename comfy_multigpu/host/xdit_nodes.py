"""The seed's six drop-in nodes (issue 17): the same inputs and outputs as the stock node each replaces,
plus `gpus` and `strategy` where they apply, so a FLUX workflow switches to several GPUs per image by
swapping node types and nothing else. The model is patched with SequenceParallel (host/sp_nodes.py);
`gpus` makes the prompt lease that many workers (policy/sequence_split.requested_ranks) and `strategy`
how the others are chosen (order_gang). The VAE and text-encoder loaders are the stock loaders under
the seed's names (the text encoders run once per prompt); the VAE loader's optional decode_tile_size
makes VAEDecode a tiled decode spread over the prompt's GPUs (host/sp_vae.py).

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


def _renamed_stock(name: str, stock: str, function: str, returns: tuple, doc: str) -> type:
    """A drop-in that is the stock node `stock` under the seed's name: its inputs, its function."""
    def load(self, **kwargs):
        return getattr(self.stock()(), function)(**kwargs)
    return type(name, (_DropIn,), {"__doc__": doc, "__module__": __name__, "STOCK": stock, "RETURN_TYPES": returns,
                                   "FUNCTION": function, function: load,
                                   "INPUT_TYPES": classmethod(lambda cls: cls.stock().INPUT_TYPES())})


XDiTCLIPLoader = _renamed_stock("XDiTCLIPLoader", "CLIPLoader", "load_clip", ("CLIP",),
                                "CLIPLoader (text encoders run once per prompt, on rank 0).")
XDiTDualCLIPLoader = _renamed_stock("XDiTDualCLIPLoader", "DualCLIPLoader", "load_clip", ("CLIP",),
                                    "DualCLIPLoader (text encoders run once per prompt, on rank 0).")

DECODE_TILES = {
    "decode_tile_size": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 32, "advanced": True,
                                 "tooltip": "0: VAEDecode decodes the whole image on the first GPU, as stock. "
                                            "More: VAEDecode decodes as VAEDecodeTiled with these tile settings, "
                                            "its tiles spread over the prompt's GPUs (VAEDecodeTiled always is)"}),
    "decode_overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32, "advanced": True}),
    "decode_temporal_size": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 4, "advanced": True}),
    "decode_temporal_overlap": ("INT", {"default": 8, "min": 4, "max": 4096, "step": 4, "advanced": True}),
}


class XDiTVAELoader(_renamed_stock("XDiTVAELoaderBase", "VAELoader", "load_vae", ("VAE",), "")):
    """VAELoader; with decode_tile_size set, its VAE's plain decode is the tiled decode over the
    prompt's GPUs (host/sp_vae.py), so the seed's workflows (XDiTVAELoader -> VAEDecode) opt in here."""

    @classmethod
    def INPUT_TYPES(cls):
        types = super().INPUT_TYPES()
        return {**types, "optional": {**types.get("optional", {}), **DECODE_TILES}}

    def load_vae(self, decode_tile_size=0, decode_overlap=64, decode_temporal_size=64, decode_temporal_overlap=8,
                 **kwargs):
        vae = super().load_vae(**kwargs)[0]
        if decode_tile_size <= 0:
            return (vae,)
        from .sp_vae import with_tiled_decode
        return (with_tiled_decode(vae, decode_tile_size, decode_overlap, decode_temporal_size, decode_temporal_overlap),)


NODES = (XDiTCheckpointLoader, XDiTUNetLoader, XDiTKSampler, XDiTVAELoader, XDiTCLIPLoader, XDiTDualCLIPLoader)
NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: cls.__name__.replace("XDiT", "XDiT ") for cls in NODES}
