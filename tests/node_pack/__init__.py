"""Test nodes for comfy-multigpu's suite: timed sleeps that honour interrupts, probes of the worker's
device and thread, seeded noise, graph expansion, and per-prompt settings. They work on stock ComfyUI
too (the probes then report no worker), so the same workflows run against both.
"""
import asyncio
import hashlib
import threading
import time

import comfy.model_management
import comfy.utils
from comfy_execution.graph_utils import GraphBuilder

from .spin_work import spin


def _worker_id():
    try:
        from comfy_multigpu.runtime.context import worker
    except ImportError:
        return None
    w = worker()
    return None if w is None else w.gpu_id


def _device_facts():
    device = comfy.model_management.get_torch_device()
    facts = {"gpu": _worker_id(), "device": str(device), "thread": threading.current_thread().name,
             "all_devices": [str(d) for d in comfy.model_management.get_all_torch_devices()]}
    try:
        from comfy_multigpu.runtime.context import worker
        w = worker()
        facts["device_is_worker_device"] = w is not None and device is w.device
    except ImportError:
        facts["device_is_worker_device"] = None
    return facts


class TestNode:
    """An output node in the test category whose function is run(); subclasses set the rest."""
    CATEGORY = "comfy_multigpu_test"
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ()


class AlwaysRun(TestNode):
    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")


class MGSleep(AlwaysRun):
    """Sleeps `seconds` (to a deadline, in 10 ms slices) with a progress bar, raising on interrupt;
    reports timestamps."""
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seconds": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 600.0, "step": 0.01}),
                             "value": ("INT", {"default": 0, "min": -2**31, "max": 2**31})}}

    def run(self, seconds, value):
        t0 = time.time()
        deadline = t0 + seconds        # to a deadline, so that slice overhead does not lengthen it
        steps = max(1, int(seconds / 0.01))
        bar = comfy.utils.ProgressBar(steps)
        done = 0
        while True:
            comfy.model_management.throw_exception_if_processing_interrupted()
            left = deadline - time.time()
            if left <= 0:
                break
            time.sleep(min(0.01, left))
            reached = min(steps, int((time.time() - t0) / seconds * steps))
            if reached > done:
                bar.update_absolute(reached)
                done = reached
        if done < steps:
            bar.update_absolute(steps)
        facts = _device_facts()
        return {"ui": {"t0": [t0], "t1": [time.time()], "gpu": [facts["gpu"]], "value": [value]},
                "result": (value,)}


class MGProbe(AlwaysRun):
    """Async node: reports the device / worker seen here and in a helper thread (asyncio.to_thread)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tag": ("STRING", {"default": ""})}}

    async def run(self, tag):
        here = _device_facts()
        helper = await asyncio.to_thread(_device_facts)
        return {"ui": {"here": [here], "helper": [helper], "tag": [tag]}}


class MGNoise(AlwaysRun):
    """Draws ComfyUI's seeded noise `rounds` times; reports a hash of it. gap=0 calls
    comfy.sample.prepare_noise; gap>0 repeats its two calls (sample.py:27-29: seed the generator,
    then draw from the generator that returned) with `gap` seconds between them."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1}),
                             "rounds": ("INT", {"default": 10, "min": 1, "max": 10000}),
                             "gap": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001})}}

    def run(self, seed, rounds, gap):
        import torch
        import comfy.sample
        digest = hashlib.sha256()
        latent = torch.zeros((1, 4, 32, 32))
        for _ in range(rounds):
            if gap > 0:
                generator = torch.manual_seed(seed)
                time.sleep(gap)
                noise = torch.randn(latent.size(), dtype=latent.dtype, generator=generator, device="cpu")
            else:
                noise = comfy.sample.prepare_noise(latent, seed)
                time.sleep(0.001)
            digest.update(noise.numpy().tobytes())
        return {"ui": {"hash": [digest.hexdigest()], "seed": [seed]}}


class MGPreviewMethod(AlwaysRun):
    """Waits, then reports the preview method ComfyUI holds for the running prompt."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seconds": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 60.0})}}

    def run(self, seconds):
        from comfy.cli_args import args
        before = str(args.preview_method)
        time.sleep(seconds)
        return {"ui": {"before": [before], "after": [str(args.preview_method)]}}


class MGAdd(TestNode):
    RETURN_TYPES = ("INT",)
    OUTPUT_NODE = False

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": -2**31, "max": 2**31}),
                             "add": ("INT", {"default": 1, "min": -2**31, "max": 2**31})}}

    def run(self, value, add):
        return (value + add,)


class MGExpand(AlwaysRun):
    """Graph expansion: a chain of `count` MGAdd nodes after a delay; reports the prefix it was given."""
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": -2**31, "max": 2**31}),
                             "count": ("INT", {"default": 3, "min": 1, "max": 100}),
                             "delay": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 10.0})},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    def run(self, value, count, delay, unique_id):
        time.sleep(delay)     # widens the window in which another worker could move the default prefix
        graph = GraphBuilder()
        node = graph.node("MGAdd", value=value, add=1)
        for _ in range(count - 1):
            node = graph.node("MGAdd", value=node.out(0), add=1)
        return {"ui": {"prefix": [graph.prefix], "unique_id": [unique_id]},
                "result": (node.out(0),), "expand": graph.finalize()}


class MGShow(TestNode):

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"forceInput": True})}}

    def run(self, value):
        return {"ui": {"value": [value]}}


class MGHoldModel(AlwaysRun):
    """Loads a MODEL onto the worker's device and checks for `seconds` that it stays loaded."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",),
                             "seconds": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 60.0})}}

    def run(self, model, seconds):
        comfy.model_management.load_models_gpu([model])
        loaded_all_along = True
        deadline = time.time() + seconds
        while time.time() < deadline:
            if not any(m is model for m in comfy.model_management.loaded_models()):
                loaded_all_along = False
            time.sleep(0.01)
        return {"ui": {"stayed_loaded": [loaded_all_along]}}


class MGSaveNumbered(AlwaysRun):
    """Numbers and writes `count` PNG files the way SaveImage does (folder_paths.get_save_image_path,
    then one file per image with counter + i), waiting `gap` seconds between numbering and writing."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"filename_prefix": ("STRING", {"default": "numbered"}),
                             "count": ("INT", {"default": 4, "min": 1, "max": 64}),
                             "gap": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 5.0, "step": 0.001}),
                             "color": ("INT", {"default": 0, "min": 0, "max": 255})}}

    def run(self, filename_prefix, count, gap, color):
        import os
        import folder_paths
        from PIL import Image
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), 8, 8)
        time.sleep(gap)
        images = []
        for i in range(count):
            name = f"{filename}_{counter + i:05}_.png"
            Image.new("RGB", (8, 8), (color, color, color)).save(os.path.join(folder, name))
            images.append({"filename": name, "subfolder": subfolder, "type": "output"})
        return {"ui": {"images": images}}


class MGLoadStandIn(AlwaysRun):
    """A model loader stand-in for placement benchmarks: each worker thread holds `slots` models
    (least recently used evicted); a model it does not hold costs `load_seconds` of sleep to "load".
    Reports whether it loaded. `model_name` is a loader input name, so placement sees the model."""
    RETURN_TYPES = ("MG_STANDIN",)
    held: dict = {}            # worker thread name -> model names, least recently used first
    held_lock = threading.Lock()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_name": ("STRING", {"default": "model-a"}),
                             "load_seconds": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 60.0, "step": 0.01}),
                             "slots": ("INT", {"default": 2, "min": 1, "max": 64})}}

    def run(self, model_name, load_seconds, slots):
        owner = threading.current_thread().name
        with self.held_lock:
            held = self.held.setdefault(owner, [])
            loaded = model_name not in held
            if not loaded:
                held.remove(model_name)
            held.append(model_name)
            del held[:-slots]
        if loaded:
            time.sleep(load_seconds)
        return {"ui": {"loaded": [loaded], "gpu": [_worker_id()]}, "result": (model_name,)}


class MGUseStandIn(MGSleep):
    """MGSleep that needs a model from MGLoadStandIn (so the loader runs first in the same prompt)."""

    @classmethod
    def INPUT_TYPES(cls):
        types = super().INPUT_TYPES()
        types["required"]["model"] = ("MG_STANDIN",)
        return types

    def run(self, seconds, value, model):
        return super().run(seconds, value)


class MGSpin(AlwaysRun):
    """Holds the GIL for a fixed amount of pure-Python work (`blocks` x 1000 additions), as a real
    model's host-side dispatch (thousands of small PyTorch calls made from Python) keeps one interpreter
    busy: two of them in one process take twice as long, in two processes no longer (on 2 cores)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"blocks": ("INT", {"default": 1000, "min": 0, "max": 10 ** 9}),
                             "value": ("INT", {"default": 0})}}

    def run(self, blocks, value):
        t0 = time.time()
        spin(blocks)
        return {"ui": {"t0": [t0], "t1": [time.time()], "gpu": [_worker_id()], "value": [value]}}


class MGFluxCond(TestNode):
    """FLUX conditioning without a text encoder: `tokens` random context vectors of the tiny FLUX
    model's width, a pooled vector and the guidance, from a seed."""
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "tokens": ("INT", {"default": 7, "min": 1}),
                             "width": ("INT", {"default": 64}), "pooled": ("INT", {"default": 32}),
                             "guidance": ("FLOAT", {"default": 3.5})}}

    def run(self, seed, tokens, width, pooled, guidance):
        import torch
        g = torch.Generator().manual_seed(seed)
        context = torch.randn(1, tokens, width, generator=g)
        return ([[context, {"pooled_output": torch.randn(1, pooled, generator=g), "guidance": guidance}]],)


class MGLatentValues(TestNode):
    """Reports a LATENT's values (for comparing runs exactly through the HTTP API)."""
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    def run(self, samples):
        latent = samples["samples"].float()
        return {"ui": {"values": latent.flatten().tolist(), "shape": list(latent.shape), "gpu": [_worker_id()]}}


class WorkerKiller(BaseException):
    """Not an Exception: nothing in ComfyUI's node handling catches it, so it ends the worker's loop."""


class MGFault(AlwaysRun):
    """Fault injection: `kill` ends the worker thread's loop (a BaseException no handler catches);
    `exit` raises SystemExit (outside ComfyUI's per-node handling, which only catches Exception);
    `oom` raises the out-of-memory error ComfyUI answers by unloading models."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mode": (["kill", "exit", "oom"],)}}

    def run(self, mode):
        if mode == "kill":
            raise WorkerKiller("injected worker death")
        if mode == "oom":
            import torch
            raise torch.cuda.OutOfMemoryError("injected out of memory")
        raise SystemExit("injected SystemExit")


class MGRecord(AlwaysRun):
    """Sleeps `seconds`, then appends `tag` to output/records.txt (counts how often a prompt ran)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tag": ("STRING", {"default": ""}),
                             "seconds": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 60.0, "step": 0.01})}}

    def run(self, tag, seconds):
        import os
        import folder_paths
        time.sleep(seconds)
        with open(os.path.join(folder_paths.get_output_directory(), "records.txt"), "a") as f:
            f.write(tag + "\n")
        return {"ui": {"tag": [tag]}}


class _Cycle:
    """A reference cycle: only Python's cyclic garbage collector frees it."""

    def __init__(self):
        self.me = self
        self.payload = bytearray(1 << 20)


CYCLES = {"made": 0, "freed": 0}
_CYCLES_LOCK = threading.Lock()


def _cycle_freed():
    with _CYCLES_LOCK:
        CYCLES["freed"] += 1


class MGMakeCycle(AlwaysRun):
    """Leaves a 1 MiB reference cycle behind as garbage (GET /mg_test/cycles: made, freed)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": -2**31, "max": 2**31})}}

    def run(self, value):
        import weakref
        weakref.finalize(_Cycle(), _cycle_freed)
        with _CYCLES_LOCK:
            CYCLES["made"] += 1
        return {"ui": {"value": [value]}}


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in
                       (MGSleep, MGProbe, MGNoise, MGPreviewMethod, MGAdd, MGExpand, MGShow, MGHoldModel,
                        MGSaveNumbered, MGLoadStandIn, MGUseStandIn, MGFault, MGRecord, MGMakeCycle,
                        MGSpin, MGFluxCond, MGLatentValues)}
NODE_DISPLAY_NAME_MAPPINGS = {}


# ---- how often the host reads each model file (safetensors.safe_open, which comfy.utils calls) ----
# Counted where ComfyUI opens the file, below anything comfy-multigpu changes; GET /mg_test/file_reads.
import collections
import os

import safetensors

FILE_READS = collections.Counter()
_FILE_READS_LOCK = threading.Lock()
_original_safe_open = safetensors.safe_open


def _counting_safe_open(filename, *args, **kwargs):
    with _FILE_READS_LOCK:
        FILE_READS[os.path.basename(str(filename))] += 1
    return _original_safe_open(filename, *args, **kwargs)


safetensors.safe_open = _counting_safe_open


# ---- a CUDA device's free-memory reading, faked at the edge (no GPU here) ---------------------------
# GpuWorker.measure_free_memory reads CUDA devices only; POST /mg_test/free_memory {"gpu", "bytes"} makes
# a CPU worker report `bytes` as if its device did (bytes null: back to no reading), so placement's
# free-memory rule runs through the real server.
FAKE_FREE_MEMORY: dict = {}


def _install_free_memory_fake():
    try:
        from comfy_multigpu.runtime.worker import GpuWorker
    except ImportError:
        return
    original = GpuWorker.measure_free_memory

    def measure_free_memory(self):
        if self.gpu_id in FAKE_FREE_MEMORY:
            self.free_memory = FAKE_FREE_MEMORY[self.gpu_id]
        else:
            original(self)

    GpuWorker.measure_free_memory = measure_free_memory


_install_free_memory_fake()


def _add_routes():
    from aiohttp import web
    from server import PromptServer

    @PromptServer.instance.routes.get("/mg_test/file_reads")
    async def file_reads(request):
        with _FILE_READS_LOCK:
            return web.json_response(dict(FILE_READS))

    @PromptServer.instance.routes.post("/mg_test/free_memory")
    async def free_memory(request):
        from comfy_multigpu.activation import EXTENSION_KEY
        body = await request.json()
        worker = request.app[EXTENSION_KEY].pool.workers[body["gpu"]]
        if body["bytes"] is None:
            FAKE_FREE_MEMORY.pop(worker.gpu_id, None)
            worker.free_memory = None
        else:
            FAKE_FREE_MEMORY[worker.gpu_id] = int(body["bytes"])
            worker.measure_free_memory()
        return web.json_response({"gpu": worker.gpu_id, "free_memory": worker.free_memory})

    @PromptServer.instance.routes.get("/mg_test/cycles")
    async def cycles(request):
        with _CYCLES_LOCK:
            return web.json_response(dict(CYCLES))


_add_routes()
