"""Workflow (API format) builders used by the tests; node ids are parameters so that two prompts
running side by side can use disjoint ids (which makes cross-talk visible)."""
from __future__ import annotations

CHECKPOINT = "tiny-sd15.safetensors"
LORA = "tiny-sd15-lora.safetensors"


def sleep(seconds: float, value: int = 0, node: str = "1") -> dict:
    return {node: {"class_type": "MGSleep", "inputs": {"seconds": seconds, "value": value}}}


def save_batch(prefix: str, color: int, batch: int = 4, base: int = 1) -> dict:
    a, b = str(base), str(base + 1)
    return {a: {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": batch, "color": color}},
            b: {"class_type": "SaveImage", "inputs": {"images": [a, 0], "filename_prefix": prefix}}}


def save_numbered(prefix: str, color: int, count: int = 4, gap: float = 0.0, base: int = 1) -> dict:
    return {str(base + 1): {"class_type": "MGSaveNumbered",
                            "inputs": {"filename_prefix": prefix, "count": count, "gap": gap, "color": color}}}


def noise(seed: int, rounds: int = 10, node: str = "1", gap: float = 0.0) -> dict:
    return {node: {"class_type": "MGNoise", "inputs": {"seed": seed, "rounds": rounds, "gap": gap}}}


def probe(tag: str = "") -> dict:
    return {"1": {"class_type": "MGProbe", "inputs": {"tag": tag}}}


def preview_method(seconds: float) -> dict:
    return {"1": {"class_type": "MGPreviewMethod", "inputs": {"seconds": seconds}}}


def expand(value: int, count: int, delay: float, base: int = 1) -> dict:
    a, b = str(base), str(base + 1)
    return {a: {"class_type": "MGExpand", "inputs": {"value": value, "count": count, "delay": delay}},
            b: {"class_type": "MGShow", "inputs": {"value": [a, 0]}}}


def txt2img(seed: int, prefix: str = "t2i", steps: int = 4, size: int = 64, lora: float = 0.0,
            ckpt: str = CHECKPOINT) -> dict:
    wf = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
          "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["1", 1]}},
          "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
          "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
          "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                     "latent_image": ["4", 0], "seed": seed, "steps": steps,
                                                     "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                                                     "denoise": 1.0}},
          "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
          "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}}}
    if lora:
        wf["8"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": LORA,
                                                                   "strength_model": lora}}
        wf["5"]["inputs"]["model"] = ["8", 0]
    return wf


def standin(model: str, seconds: float, value: int = 0, load_seconds: float = 0.5, slots: int = 2) -> dict:
    """A "model" load (MGLoadStandIn, cheap if the worker holds it) then a timed job using it."""
    return {"2": {"class_type": "MGLoadStandIn", "inputs": {"model_name": model, "load_seconds": load_seconds,
                                                            "slots": slots}},
            "1": {"class_type": "MGUseStandIn", "inputs": {"seconds": seconds, "value": value, "model": ["2", 0]}}}


FLUX = "tiny-flux-dev.safetensors"


def flux(gpus: int, seed: int = 1, width: int = 64, height: int = 40, tokens: int = 7, steps: int = 3) -> dict:
    """The tiny FLUX model, SequenceParallel(gpus), conditioning from MGFluxCond (no text encoder), a
    stock KSampler, the latent's values reported (MGLatentValues, node "9")."""
    return {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX, "weight_dtype": "default"}},
            "2": {"class_type": "SequenceParallel", "inputs": {"model": ["1", 0], "gpus": gpus}},
            "3": {"class_type": "MGFluxCond", "inputs": {"seed": seed, "tokens": tokens, "width": 64, "pooled": 32,
                                                          "guidance": 3.5}},
            "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
            "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0],
                                                        "latent_image": ["4", 0], "seed": seed, "steps": steps,
                                                        "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                                                        "denoise": 1.0}},
            "9": {"class_type": "MGLatentValues", "inputs": {"samples": ["5", 0]}}}


FLUX2 = "tiny-flux2-dev.safetensors"


def flux2(gpus: int, seed: int = 1, width: int = 80, height: int = 48, steps: int = 2) -> dict:
    """The tiny FLUX.2 model (its text padded to 512 tokens by the host), SequenceParallel(gpus), a
    FLUX.2 latent (128 channels, 1/16 of the size: 5 x 3 tokens), the latent's values (node "9")."""
    prompt = flux(gpus, seed=seed, steps=steps)
    prompt["1"]["inputs"]["unet_name"] = FLUX2
    prompt["4"] = {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}}
    return prompt


HUNYUAN = "tiny-hunyuan-video-flux.safetensors"


def hunyuan(gpus: int, seed: int = 1, width: int = 48, height: int = 32, length: int = 5, steps: int = 2) -> dict:
    """The tiny HunyuanVideo model, SequenceParallel(gpus), conditioning from MGFluxCond (CLIP-L's pooled
    width), a video latent (2 x 4 x 6 -> 2 x 2 x 3 tokens: the host does not pad odd sizes), the latent's
    values (node "9")."""
    return video(gpus, HUNYUAN, {"pooled": 768, "tokens": 5}, seed, width, height, length, steps)


def video(gpus: int, unet: str, cond: dict, seed: int, width: int, height: int, length: int, steps: int) -> dict:
    """flux()'s graph on the video model `unet`, its conditioning's inputs updated with `cond`, an empty
    video latent (EmptyHunyuanLatentVideo)."""
    prompt = flux(gpus, seed=seed, steps=steps)
    prompt["1"]["inputs"]["unet_name"] = unet
    prompt["3"]["inputs"].update(cond)
    prompt["4"] = {"class_type": "EmptyHunyuanLatentVideo",
                   "inputs": {"width": width, "height": height, "length": length, "batch_size": 1}}
    return prompt


WAN = "tiny-wan21-t2v-flux.safetensors"


def wan(gpus: int, seed: int = 1, width: int = 48, height: int = 40, length: int = 5, steps: int = 2) -> dict:
    """The tiny Wan 2.1 text-to-video model, SequenceParallel(gpus), umT5-wide conditioning from
    MGFluxCond, a stock KSampler on a video latent, the latent's values reported (node "9")."""
    return video(gpus, WAN, {"width": 4096, "tokens": 5}, seed, width, height, length, steps)


def spin(blocks: int, value: int = 0) -> dict:
    """Holds the GIL for `blocks` x 1000 pure-Python additions (spin_blocks() sizes it in seconds)."""
    return {"1": {"class_type": "MGSpin", "inputs": {"blocks": blocks, "value": value}}}


def spin_blocks(seconds: float) -> int:
    """How many MGSpin blocks take `seconds` on one core of this machine (its code, timed here)."""
    import importlib.util
    import time
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "node_pack" / "spin_work.py"
    spec = importlib.util.spec_from_file_location("mg_spin_work", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        module.spin(200)
        best = min(best, time.perf_counter() - t0)
    return max(1, int(seconds / best * 200))


def fault(mode: str) -> dict:
    return {"1": {"class_type": "MGFault", "inputs": {"mode": mode}}}


def make_cycle(value: int = 0) -> dict:
    return {"1": {"class_type": "MGMakeCycle", "inputs": {"value": value}}}


def record(tag: str, seconds: float = 0.2) -> dict:
    return {"1": {"class_type": "MGRecord", "inputs": {"tag": tag, "seconds": seconds}}}


def hold_model(seconds: float) -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
            "2": {"class_type": "MGHoldModel", "inputs": {"model": ["1", 0], "seconds": seconds}}}


def ui(entry: dict, node: str, key: str):
    """The first value a node reported under `key` in a history entry."""
    return entry["outputs"][node][key][0]
