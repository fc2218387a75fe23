"""Model files read once and held once in CPU RAM for every worker (comfy_multigpu/runtime/weights.py).

- Loaders (checkpoint, diffusion model, text encoders, VAE, ControlNet) hand out views of one shared
  template per file and options; LoRA files read through comfy.utils.load_torch_file are shared
  state dicts (LoRA weights are only ever read: patches are computed into new tensors).
- copy_to_param (weight_inplace_update, hook patches) becomes copy-on-write on shared storage.
- A ModelPatcher that offloads to the CPU points its tensors back at the shared CPU tensors.
- Pinned host memory is reference-counted per address, so one device's unpin cannot unregister a
  shared storage another device still copies from.
With the sharing off (COMFY_MULTIGPU_RAM_CACHE=off, pool.weights None) every wrapper calls the original.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os

from ..runtime import weight_views, weights

logger = logging.getLogger("comfy_multigpu")


def _shared_loader(kind: str, original, pool, key_of):
    """Wrap a loader so that it hands out views of one template per file and options.

    The call's arguments are bound to the loader's signature (defaults applied), so a file asked
    for positionally or by keyword is one cache entry. key_of(arguments) -> (path, extra) names the
    file and anything else the key needs beyond the arguments, or (None, None) when this call is
    not shared (the host then runs it as stock, raising its own errors)."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def loader(*args, **kwargs):
        store = pool.weights
        if store is None:
            return original(*args, **kwargs)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)
        bound.apply_defaults()
        arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
        path, extra = key_of(arguments)
        if not isinstance(path, str) or not os.path.isfile(path):
            return original(*args, **kwargs)
        options = repr((sorted(arguments.items()), extra))
        return store.get(kind, path, options, lambda: original(*args, **kwargs))
    return loader


def _argument(name: str):
    return lambda arguments: (arguments.get(name), None)


def make_checkpoint_loader(original, pool):
    return _shared_loader("checkpoint", original, pool, _argument("ckpt_path"))


def make_unet_loader(original, pool):
    return _shared_loader("unet", original, pool, _argument("unet_path"))


def make_clip_loader(original, pool):
    def key_of(arguments):
        paths = list(arguments.get("ckpt_paths") or ())
        # several files make one text encoder: the first names it, the others' contents are in the key
        return (paths[0] if paths else None), [weights.file_identity(p) for p in paths[1:]]
    return _shared_loader("clip", original, pool, key_of)


def make_controlnet_loader(original, pool):
    def key_of(arguments):      # a ControlNet built against a given model depends on that object
        return (arguments.get("ckpt_path"), None) if arguments.get("model") is None else (None, None)
    return _shared_loader("controlnet", original, pool, key_of)


def make_vae_loader(original, pool):
    """nodes.VAELoader.load_vae(self, vae_name): the VAE file by name (pixel_space and the TAESD
    pairs, built from several small files, are not shared)."""
    return _shared_loader("vae", original, pool, lambda arguments: (_vae_path(arguments.get("vae_name")), None))


def _vae_path(name):
    import folder_paths
    if not isinstance(name, str):
        return None
    for folder in ("vae", "vae_approx"):
        try:
            path = folder_paths.get_full_path(folder, name)
        except Exception:
            path = None
        if path and os.path.isfile(path):
            return path
    return None


def make_lora_file_loader(original, pool):
    """comfy.utils.load_torch_file: files under a `loras` folder are shared read-only state dicts."""
    def key_of(arguments):
        path, device = arguments.get("ckpt"), arguments.get("device")
        if _is_lora(path) and (device is None or _is_cpu(device)):
            return path, None
        return None, None
    return _shared_loader("lora", original, pool, key_of)


def _is_lora(path) -> bool:
    import folder_paths
    if not isinstance(path, str):
        return False
    real = os.path.realpath(path)
    try:
        folders = folder_paths.get_folder_paths("loras")
    except Exception:
        return False
    for folder in folders:
        for base in {os.path.abspath(folder), os.path.realpath(folder)}:
            if os.path.abspath(path).startswith(base + os.sep) or real.startswith(base + os.sep):
                return True
    return False


def make_copy_to_param(original, pool):
    """Copy-on-write: an in-place update of a tensor whose storage is shared gives this module its
    own copy instead (the other workers' weights stay as they are)."""
    @functools.wraps(original)
    def copy_to_param(obj, attr, value):
        store = pool.weights
        if store is not None:
            import comfy.utils
            target = comfy.utils.get_attr(obj, attr)
            if store.is_shared(target):
                target.data = value.to(device=target.device, dtype=target.dtype, copy=True)
                return None
        return original(obj, attr, value)
    return copy_to_param


def _is_cpu(device) -> bool:
    import torch
    return device is not None and torch.device(device).type == "cpu"


def make_unpatch_model(original, pool):
    """Offloading to the CPU points the module back at the shared CPU tensors: unpatched weights
    before the host's model.to(cpu) (which then copies nothing), the restored ones right after."""
    @functools.wraps(original)
    def unpatch_model(self, device_to=None, unpatch_weights=True):
        sharing = pool.weights is not None and unpatch_weights and _is_cpu(device_to) \
            and weight_views.shared_sources(self.model) is not None
        if sharing and not getattr(self.model, "model_lowvram", False):
            weight_views.repoint_to_shared(self.model, skip=set(self.backup))
        result = original(self, device_to, unpatch_weights)
        if sharing:
            weight_views.repoint_to_shared(self.model, only_on="cpu")
        return result
    return unpatch_model


def make_partially_unload(original, pool):
    """A partial offload to the CPU: the modules it moved point back at the shared CPU tensors."""
    @functools.wraps(original)
    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        result = original(self, device_to, memory_to_free, force_patch_weights)
        if pool.weights is not None and _is_cpu(device_to) and weight_views.shared_sources(self.model) is not None:
            weight_views.repoint_to_shared(self.model, skip=set(self.backup), only_on="cpu")
        return result
    return partially_unload


def make_pin_memory(original, pool):
    import comfy.model_management as mm

    def already_pinned(ptr, tensor):
        return mm.PINNED_MEMORY.get(ptr) == tensor.nbytes

    @functools.wraps(original)
    def pin_memory(tensor):
        return pool.pin_counts.pin(tensor, original, already_pinned)
    return pin_memory


def make_unpin_memory(original, pool):
    @functools.wraps(original)
    def unpin_memory(tensor):
        return pool.pin_counts.unpin(tensor, original)
    return unpin_memory
