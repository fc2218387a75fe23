"""VAE decode of a sequence-parallel prompt on its leased GPUs (issue 17): the tiles of the host's own
tiled decode are decoded on every leased GPU at once (one thread per rank), and the host's own code
places and blends them, so the image equals the host's tiled decode with the same tile settings.

No host tiling code is copied. The host's VAE.decode_tiled (comfy/sd.py: decode_tiled_ for images,
three passes of comfy.utils.tiled_scale; decode_tiled_3d for video, tiled_scale_multidim) runs twice
on a shallow copy of the VAE whose first_stage_model is a stand-in (_Tiles):

1. record: the stand-in keeps every tile the host cuts, in the host's order, and answers a 1x1
   placeholder (that pass's blend is thrown away; it costs the host's output buffers, no decoding);
2. decode: rank r decodes tiles r, r+N, r+2N, ... with the decoder on its device (the lease's copy of
   it there, host/rank_copies.py, dropped when the prompt ends; where the device is rank 0's, e.g. CPU
   workers, the one module);
3. replay: decode_tiled runs again and the stand-in hands back the decoded tiles in order (each input
   checked against the tile recorded; one it did not record is decoded on the spot), so the host's code
   does the placing, the overlap feathering, the three-pass average and process_output.

What stays the host's own decode on rank 0 (the reason goes to the prompt's history note
`sequence_parallel.vae`): a plain VAEDecode (the whole latent at once: the one-GPU image) unless the VAE
comes from XDiTVAELoader with decode_tile_size set (then it is that tiled decode, on any number of
GPUs); VAEs that tile themselves (handles_tiling), 1-D (audio) VAEs, a VAE on another device than rank
0's (--cpu-vae), one GPU leased, process workers (the patches are not applied in their children).
The progress bar of an image's tiled decode runs twice, at the record and at the replay.

Host objects touched: comfy.sd.VAE.decode and .decode_tiled (wrapped by the manifest's entries
vae-decode-whole and vae-decode-tiles; the originals are called, on the VAE or a shallow copy of it),
first_stage_model.decode (called), nodes.VAEDecodeTiled.decode (called for an opted-in plain decode),
comfy.model_management.throw_exception_if_processing_interrupted (called between tiles).
"""
from __future__ import annotations

import copy
import functools
import logging
from typing import Any, Optional, Sequence

from ..runtime.context import current_worker
from ..runtime.rank_group import RankAborted, RankGroup, run_ranks
from .rank_copies import on_devices
from .sp_nodes import leased_workers

logger = logging.getLogger("comfy_multigpu")

# XDiTVAELoader's opt-in: the VAE it returns decodes (VAEDecode) as VAEDecodeTiled with these settings.
TILED_DECODE_ATTR = "comfy_multigpu_tiled_decode"      # set by with_tiled_decode
WHOLE_DECODE = ("VAEDecode decodes the whole latent at once on the first GPU (the one-GPU image); "
                "VAEDecodeTiled, or XDiTVAELoader's decode_tile_size, spreads tiles over the GPUs")


def with_tiled_decode(vae, tile_size: int, overlap: int = 64, temporal_size: int = 64, temporal_overlap: int = 8):
    """A shallow copy of `vae` (same decoder, same patcher) whose plain decode is the host's tiled
    decode with these settings (VAEDecodeTiled's inputs), spread over the prompt's GPUs."""
    out = copy.copy(vae)
    out.comfy_multigpu_tiled_decode = {"tile_size": tile_size, "overlap": overlap, "temporal_size": temporal_size,
                                    "temporal_overlap": temporal_overlap}
    return out


class _Tiles:
    """The first_stage_model of the VAE copy the host's decode_tiled runs on: records, then replays."""

    def __init__(self, decoder):
        self.decoder = decoder          # the real one, for a tile the replay did not record
        self.inputs: list = []
        self.outputs: Optional[list] = None
        self.replayed = 0
        self.missed = 0

    def decode(self, z):
        if self.outputs is None:
            self.inputs.append(z)
            return z.new_zeros((z.shape[0], 1) + (1,) * (z.ndim - 2))
        index, self.replayed = self.replayed, self.replayed + 1
        if index < len(self.inputs) and self.inputs[index].shape == z.shape and bool((self.inputs[index] == z).all()):
            return self.output_for(index)
        self.missed += 1
        return self.decoder.decode(z)

    def output_for(self, index: int):
        return self.outputs[index]


class DecodeResult:
    """What one spread decode did: tiles per rank (and how many the replay had to decode again)."""

    def __init__(self, per_rank: list, missed: int):
        self.per_rank = per_rank
        self.missed = missed

    @property
    def tiles(self) -> int:
        return sum(self.per_rank)


def spread_decode_tiled(decode_tiled, vae, samples, devices: Sequence[Any], workers: Optional[Sequence[Any]] = None,
                        decoders: Optional[Sequence[Any]] = None, **tile_args):
    """`decode_tiled` (the host's VAE.decode_tiled) of `samples` with its tiles decoded by len(devices)
    ranks, rank r on devices[r] with decoders[r] (default: the VAE's decoder, copied per other device);
    `workers[r]`, if given, is the GPU worker rank r runs for. Returns (images, DecodeResult)."""
    import torch
    tiles = _Tiles(vae.first_stage_model)
    stand_in = copy.copy(vae)
    stand_in.first_stage_model = tiles
    decode_tiled(stand_in, samples, **tile_args)                       # 1. record (loads the VAE on rank 0)
    group = RankGroup(devices)
    if decoders is None:
        decoders = on_devices(vae.first_stage_model, group.devices, workers)
    per_rank = [0] * group.size
    outputs: list = [None] * len(tiles.inputs)

    def work(rank: int) -> list:                                       # 2. decode, tile i on rank i % N
        import comfy.model_management
        device = group.devices[rank]
        with torch.inference_mode():
            for index in range(rank, len(outputs), group.size):
                if group.aborted:
                    raise RankAborted("another GPU of this VAE decode failed")
                if rank == 0:
                    comfy.model_management.throw_exception_if_processing_interrupted()
                outputs[index] = decoders[rank].decode(tiles.inputs[index].to(device)).to(vae.output_device)
                per_rank[rank] += 1
        return per_rank
    run_ranks(group, work, workers)
    tiles.outputs = outputs
    images = decode_tiled(stand_in, samples, **tile_args)              # 3. replay: the host places them
    return images, DecodeResult(per_rank, tiles.missed)


def why_one_gpu(vae, samples, workers: list) -> Optional[str]:
    """Why a tiled decode of `samples` stays the host's own on one GPU (None: it is spread)."""
    import torch
    if len(workers) < 2:
        worker = current_worker.get()
        if worker is None:
            return "comfy-multigpu is not active in this process"
        if getattr(worker, "process_child", False):
            return "process workers own one GPU each"
        return "only one GPU leased for this prompt"
    if getattr(vae, "handles_tiling", False):
        return f"{type(vae.first_stage_model).__name__} tiles itself (its own decode_tiled is not spread)"
    if getattr(vae, "extra_1d_channel", None) is not None or samples.ndim - 2 not in (2, 3):
        return "1-D (audio) VAEs are not spread"
    if torch.device(vae.device) != torch.device(workers[0].device):
        return f"the VAE runs on {vae.device}, not on the first leased GPU ({workers[0].device})"
    return None


def _note(workers: list, entry: dict) -> None:
    """The prompt's history note `sequence_parallel.vae` (the last decode's, with a count) and a log
    line, in a prompt that leased several GPUs or asked for them; nothing in any other prompt."""
    worker = current_worker.get()
    lease = getattr(worker, "lease", None)
    if lease is None:
        return
    note = lease.notes.get("sequence_parallel")
    if note is None and len(lease.gpu_ids) < 2:
        return
    if note is None:
        note = lease.notes["sequence_parallel"] = {}
    entry["decodes"] = (note.get("vae") or {}).get("decodes", 0) + 1
    note["vae"] = entry
    if entry.get("fallback"):
        logger.info("[GPU %s] VAE decode on this GPU only: %s", worker.gpu_id, entry["fallback"])
    else:
        logger.info("[GPU %s] VAE decode: %d tiles on GPUs %s (%s per GPU)", worker.gpu_id, entry["tiles"],
                    entry["gpus"], entry["tiles_per_gpu"])


def make_vae_decode_tiled(original, pool):
    """comfy.sd.VAE.decode_tiled: in a prompt holding several GPUs, its tiles decoded on all of them."""
    @functools.wraps(original)
    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        args = {"tile_x": tile_x, "tile_y": tile_y, "overlap": overlap, "tile_t": tile_t, "overlap_t": overlap_t}
        workers = leased_workers()
        reason = why_one_gpu(self, samples, workers)
        if reason is not None:
            _note(workers, {"gpus": [w.gpu_id for w in workers[:1]], "fallback": reason})
            return original(self, samples, **args)
        images, result = spread_decode_tiled(original, self, samples, [w.device for w in workers], workers, **args)
        _note(workers, {"tiles": result.tiles, "gpus": [w.gpu_id for w in workers],
                        "tiles_per_gpu": result.per_rank, "fallback": None})
        return images
    return decode_tiled


def make_vae_decode(original, pool):
    """comfy.sd.VAE.decode: the host's whole-latent decode (noted in a sequence-parallel prompt), or,
    for a VAE from XDiTVAELoader with decode_tile_size set, VAEDecodeTiled's decode with its settings."""
    @functools.wraps(original)
    def decode(self, samples_in, vae_options={}):               # noqa: B006 - the host's signature
        settings = getattr(self, TILED_DECODE_ATTR, None)
        if settings is None or vae_options or (getattr(self, "latent_dim", None) == 2 and samples_in.ndim == 5):
            workers = leased_workers()
            if len(workers) > 1:
                _note(workers, {"gpus": [workers[0].gpu_id], "fallback": WHOLE_DECODE})
            return original(self, samples_in, vae_options)
        import nodes
        images = nodes.VAEDecodeTiled().decode(self, {"samples": samples_in}, **settings)[0]
        if samples_in.ndim == 5:                          # the node folds a video's frames into the batch
            images = images.reshape((samples_in.shape[0], -1) + tuple(images.shape[1:]))
        return images
    return decode
