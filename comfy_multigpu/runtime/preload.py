"""POST /preload: a model file into the shared RAM cache and, for the GPUs named, onto their devices.

The file is loaded through ComfyUI's own loader nodes, with the arguments a workflow's loader node
uses by default, so the cache entry is the one a prompt's loader will ask for. On a GPU, the worker
does it between prompts in its own thread (its device, its model bookkeeping) and keeps the view for
its next loader call of that file, so the first prompt there does not load anything.

Host objects touched: nodes.CheckpointLoaderSimple / UNETLoader / CLIPLoader / VAELoader /
ControlNetLoader, comfy.utils.load_torch_file (LoRA), folder_paths, comfy.model_management.load_models_gpu.
"""
from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import dataclass, field

from . import weights
from ..policy.errors import ApiError, bad_request

logger = logging.getLogger("comfy_multigpu")

FOLDERS = {"checkpoint": "checkpoints", "unet": "diffusion_models", "clip": "text_encoders",
           "vae": "vae", "lora": "loras", "controlnet": "controlnet"}
# the loader input a prompt names the file with (placement.prompt_models keys)
PLACEMENT_KEYS = {"checkpoint": "ckpt_name", "unet": "unet_name", "clip": "clip_name", "vae": "vae_name",
                  "lora": "lora_name", "controlnet": "control_net_name"}
LIST_LIMIT = 50          # names shown in an "unknown file" error


@dataclass
class Request:
    kind: str
    name: str
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


def check_file(kind: str, name: str) -> str:
    """The full path of a file the loader for `kind` lists, or ApiError(400) naming what is valid."""
    import folder_paths
    folder = FOLDERS[kind]
    names = folder_paths.get_filename_list(folder)
    if name not in names:
        shown = names[:LIST_LIMIT]
        raise bad_request("unknown_model", f"/preload: {kind} {name!r} is not in the {folder} folder",
                          f"one of: {', '.join(shown) or '(none)'}"
                          + (f" (and {len(names) - len(shown)} more)" if len(names) > len(shown) else ""),
                          field="model", valid=shown)
    return folder_paths.get_full_path_or_raise(folder, name)


def check_gpus(gpus: list, pool) -> list[int]:
    wanted = sorted(set(gpus))
    count = len(pool.workers)
    bad = [g for g in wanted if not 0 <= g < count]
    if bad:
        raise bad_request("unknown_gpu", f"/preload: GPU {bad[0]} does not exist; this server has {count} "
                          f"worker(s), numbered 0..{count - 1}", f"gpus: a list of 0..{count - 1}",
                          field="gpus", valid=list(range(count)))
    down = [g for g in wanted if pool.workers[g].down]
    if down:
        raise ApiError(409, "gpu_down", f"/preload: GPU {down[0]} is down (restarting)",
                       "try again when /multigpu/ready shows it ready", {"field": "gpus"})
    return wanted


def load(kind: str, name: str):
    """A view of the file through the host's own loader (its cache key is the one prompts use), in
    inference mode as ComfyUI runs loader nodes."""
    import torch
    with torch.inference_mode():
        return _load(kind, name)


def _load(kind: str, name: str):
    import comfy.utils
    import folder_paths
    import nodes
    if kind == "checkpoint":
        return nodes.CheckpointLoaderSimple().load_checkpoint(name)
    if kind == "unet":
        return nodes.UNETLoader().load_unet(name, "default")
    if kind == "clip":
        return nodes.CLIPLoader().load_clip(name)
    if kind == "vae":
        return nodes.VAELoader().load_vae(name)
    if kind == "controlnet":
        return nodes.ControlNetLoader().load_controlnet(name)
    path = folder_paths.get_full_path_or_raise("loras", name)
    return comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)   # as LoraLoader does


def device_patchers(view) -> list:
    """The ModelPatchers in a loader's result (what load_models_gpu puts on a device)."""
    import comfy.model_patcher
    out = []
    for obj in (view if isinstance(view, tuple) else (view,)):
        for candidate in (obj, getattr(obj, "patcher", None), getattr(obj, "control_model_wrapped", None)):
            if isinstance(candidate, comfy.model_patcher.ModelPatcher) and candidate not in out:
                out.append(candidate)
    return out


def run_on_worker(worker, request: Request) -> None:
    """In the worker's thread, between prompts: view kept for its next loader call, put on its device."""
    import comfy.model_management
    token = weights.holding.set(True)
    try:
        view = load(request.kind, request.name)
        patchers = device_patchers(view)
        if patchers:
            comfy.model_management.load_models_gpu(patchers)
            # placement's model affinity: this GPU now has it, like after a prompt
            worker.remember_models([f"{PLACEMENT_KEYS[request.kind]}:{request.name}"])
        worker.log.info("Preloaded %s %s onto %s", request.kind, request.name, worker.label)
        request.done.set_result("on_device" if patchers else "in_ram")
    except Exception as ex:
        worker.log.exception("Preload of %s %s failed", request.kind, request.name)
        request.done.set_exception(ex)
    finally:
        weights.holding.reset(token)


PRELOAD_WAIT_S = 600.0     # longest POST /preload waits for busy GPUs (then it answers "queued")


async def preload(pool, kind: str, name: str, gpus: list, wait: bool = True) -> dict:
    """POST /preload: `name` into the shared RAM cache, then onto the devices of `gpus` (each worker
    between its prompts); with `wait`, until they did it or PRELOAD_WAIT_S passed. The answer's
    "gpus" says per GPU: on_device | in_ram | queued | failed: ... Raises ApiError (4xx)."""
    import asyncio
    import time
    if pool.weights is None:
        raise ApiError(409, "sharing_off", "/preload needs the shared RAM cache, which is off",
                       "unset COMFY_MULTIGPU_RAM_CACHE (or give it a size) and restart")
    check_file(kind, name)
    gpus = check_gpus(gpus, pool)
    started = time.perf_counter()
    try:
        await asyncio.to_thread(load, kind, name)
    except Exception as ex:
        logger.warning("/preload: %s %s could not be loaded", kind, name, exc_info=True)
        raise ApiError(422, "load_failed", f"/preload: {kind} {name!r} could not be loaded: "
                       f"{type(ex).__name__}: {ex}"[:500], "check the file (the server log has the details)") from None
    ram_s = time.perf_counter() - started
    requests = {g: Request(kind, name) for g in gpus}
    for gpu, req in requests.items():
        pool.request_preload(gpu, req)
    if requests and wait:
        await asyncio.wait([asyncio.wrap_future(r.done) for r in requests.values()], timeout=PRELOAD_WAIT_S)
    states = {}
    for gpu, req in requests.items():
        if not req.done.done():
            states[str(gpu)] = "queued"
        elif req.done.exception() is not None:
            ex = req.done.exception()
            states[str(gpu)] = f"failed: {type(ex).__name__}: {ex}"[:300]
        else:
            states[str(gpu)] = req.done.result()
    return {"model": name, "type": kind, "ram": "loaded", "ram_seconds": round(ram_s, 3),
            "gpus": states, "seconds": round(time.perf_counter() - started, 3)}
