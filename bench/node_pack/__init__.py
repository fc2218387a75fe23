"""Bench nodes for bench/bench_workers.py: MGBenchForward runs forwards of ComfyUI's real model classes
(built by bench/bench_gil.py at real depth and tiny width) in whatever worker runs it, so the host side
of a sampling step (Python module code, PyTorch dispatch, under the GIL) is measured through a server.

Each worker thread builds and keeps its own copy of a model, as each GPU worker holds its own; a
process worker's child or a stock ComfyUI process is one such thread of its own process. Nothing
happens at import except loading bench_gil.py (by path) and declaring the node.
"""
import importlib.util
import os
import sys
import threading
import time
from pathlib import Path


def _load_bench_gil():
    path = Path(__file__).resolve().parents[1] / "bench_gil.py"
    spec = importlib.util.spec_from_file_location("comfy_multigpu_bench_gil", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module     # its dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


_bench_gil = _load_bench_gil()
_models: dict = {}              # (thread name, model key) -> (model, inputs): one copy per worker thread
_models_lock = threading.Lock()


def _model(key: str):
    """This thread's copy of `key`, built on first use: (model, inputs, seconds the build took now)."""
    slot = (threading.current_thread().name, key)
    with _models_lock:
        found = _models.get(slot)
    if found is not None:
        return found[0], found[1], 0.0
    t0 = time.perf_counter()
    model, inputs = _bench_gil.build(key)
    with _models_lock:
        _models[slot] = (model, inputs)
    return model, inputs, time.perf_counter() - t0


class MGBenchForward:
    """Runs `forwards` forwards of this worker's `model` on bench_gil's inputs; reports forwards/s, the
    wall-clock start and end of the forwards (not of the build), the thread and process it ran in."""
    CATEGORY = "comfy_multigpu_bench"
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": (sorted(_bench_gil.SPECS),),
                             "forwards": ("INT", {"default": 10, "min": 1, "max": 100000}),
                             "value": ("INT", {"default": 0, "min": -2**31, "max": 2**31})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")            # never served from ComfyUI's cache

    def run(self, model, forwards, value):
        import torch
        torch.set_num_threads(1)       # as bench_gil's workers: intra-op threads would blur the GIL effect
        net, inputs, build_s = _model(model)
        with torch.inference_mode():
            t0 = time.time()
            for _ in range(forwards):
                net(**inputs)
            t1 = time.time()
        return {"ui": {"rate": [forwards / (t1 - t0)], "t0": [t0], "t1": [t1], "forwards": [forwards],
                       "build_s": [build_s], "thread": [threading.current_thread().name],
                       "pid": [os.getpid()], "value": [value]}}


NODE_CLASS_MAPPINGS = {"MGBenchForward": MGBenchForward}
NODE_DISPLAY_NAME_MAPPINGS = {"MGBenchForward": "MG Bench Forward"}
