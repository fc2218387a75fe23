"""The one-GIL ceiling (issue 14): how many model forwards per second one Python process can drive, on
ComfyUI's own model classes built at real depth and tiny width, side by side with separate processes.

At tiny width a forward costs almost no arithmetic, so its time is the host side: Python module code,
PyTorch dispatch, one aten op after another. That part holds the GIL (PyTorch releases it only inside
each op), so N worker threads in one process share it, while N processes do not. Per model:

1. aten ops per forward (counted with a TorchDispatchMode, so after autograd and after composite ops
   are decomposed: what reaches the kernels, views included) and host ms per forward on one thread;
2. aggregate forwards per second with 1, 2, 4 worker threads in this process, each thread with its
   own copy of the model (as each GPU worker holds its own), against 1, 2, 4 spawned processes doing
   the same; interleaved, several repetitions, median and min-max.

    scripts/run_bench.sh bench/bench_gil.py [--models sd15,sdxl,flux,wan] [--seconds 3] [--repeat 3]
                                           [--workers 1,2,4] [--write]

--write replaces the "gil" section of docs/benchmarks.md with the results.
"""
from __future__ import annotations

import argparse
import copy
import functools
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared import comfyui_dir, write_section  # noqa: E402

LATENT = 8          # latent side for the image models (64 px); the host cost barely depends on it
TOKENS = 8          # text tokens in the context
HOST_SAMPLES = 20   # forwards timed one by one for "host ms per forward"


@dataclass(frozen=True)
class Published:
    """A published GPU time per sampling step (one forward in ComfyUI, cond and uncond batched)."""
    seconds: float
    where: str


@dataclass(frozen=True)
class Spec:
    label: str
    layout: str
    published: Published | None


SPECS = {
    "sd15": Spec("SD1.5 UNet", "`openaimodel.UNetModel`, SD15 layout (channel_mult 1,2,4,4, 2 res blocks, "
                 "transformer depth 1 at the first three levels and the middle), model_channels 32, 8 heads, "
                 "context_dim 64; batch 2 (cond + uncond)",
                 Published(1 / 40.5, "40.5 it/s: RTX 4090, fp16, 512x512, batch 1 with CFG, PyTorch 2.0 SDPA "
                           "without compile (diffusers docs, `docs/source/en/optimization/torch2.0.md`, "
                           "\"RTX 4090 (batch size: 1)\", SD - txt2img)")),
    "sdxl": Spec("SDXL UNet", "`openaimodel.UNetModel`, SDXL layout (channel_mult 1,2,4, transformer depth "
                 "0,0,2,2,10,10, middle 10, linear projections, adm 2816), model_channels 32, 16 channels "
                 "per head, context_dim 64; batch 2 (cond + uncond)",
                 Published(0.071, "0.071 s: one UNet forward, 1024x1024, batch 1 (no CFG), bf16, the "
                           "diffusers benchmark CI on an L40 (`huggingface.co/datasets/diffusers/benchmarks`, "
                           "`collated_results.csv` at 7b8aaac, `stabilityai/stable-diffusion-xl-base-1.0-bf16`)")),
    "flux": Spec("FLUX.1 transformer", "`flux.model.Flux`, 19 double + 38 single blocks, hidden_size 64, "
                 "2 heads, axes_dim 4,14,14, guidance embedding (dev); batch 1 (FLUX.1-dev runs without CFG)",
                 Published(0.503, "0.503 s: one transformer forward, 1024x1024, 512 text tokens, bf16, the "
                           "same diffusers CI run (`black-forest-labs/FLUX.1-dev-bf16`)")),
    "wan": Spec("Wan 2.1 transformer", "`wan.model.WanModel`, t2v, 30 blocks (the T2V-1.3B count), dim 64, "
                "ffn 256, 2 heads; 3 latent frames of 8x8; batch 2 (cond + uncond)",
                Published(4.8, "about 4.8 s: T2V-1.3B makes a 5 s 480P video on an RTX 4090 \"in about 4 "
                          "minutes\" (Wan2.1 README) in 50 steps (`generate.py` default for t2v); whole run "
                          "with text encoder and VAE, so an upper bound per step")),
}


@functools.cache
def _comfy():
    """Import ComfyUI's model classes from the pinned checkout, as a CUDA install would configure them:
    CPU device (no GPU here) but PyTorch SDPA attention, which ComfyUI picks on NVIDIA with torch >= 2
    (comfy/model_management.py, ENABLE_PYTORCH_ATTENTION). Option values, the same as passing
    `--cpu --use-pytorch-cross-attention`; they must be set before comfy.model_management is imported."""
    sys.path.insert(0, str(comfyui_dir()))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.ops
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.ldm.wan.model import WanModel
    return comfy.ops, UNetModel, Flux, WanModel


def build(key: str, device: str = "cpu"):
    """(model, inputs) for `key`: ComfyUI's class with the layout above, fp32, weights filled with small
    random values (disable_weight_init leaves them uninitialised), eval, no grad; built on the CPU, then
    moved with its inputs to `device` (bench/gpu_check.py runs them on cuda:0)."""
    import torch
    ops_mod, UNetModel, Flux, WanModel = _comfy()
    # What model_base.BaseModel gets from comfy.ops.pick_operations when weight and compute dtype match.
    ops = ops_mod.disable_weight_init
    torch.manual_seed(0)
    unet = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, use_spatial_transformer=True,
                legacy=False, use_checkpoint=False, use_temporal_attention=False, use_temporal_resblock=False,
                context_dim=64, dtype=torch.float32, operations=ops)
    if key == "sd15":
        model = UNetModel(**unet, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                          transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                          transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], num_heads=8,
                          use_linear_in_transformer=False, adm_in_channels=None)
        inputs = dict(x=torch.randn(2, 4, LATENT, LATENT), timesteps=torch.full((2,), 500.0),
                      context=torch.randn(2, TOKENS, 64))
    elif key == "sdxl":
        model = UNetModel(**unet, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
                          transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                          transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], num_head_channels=16,
                          use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=2816)
        inputs = dict(x=torch.randn(2, 4, LATENT, LATENT), timesteps=torch.full((2,), 500.0),
                      context=torch.randn(2, TOKENS, 64), y=torch.randn(2, 2816))
    elif key == "flux":
        model = Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=64, context_in_dim=64,
                     hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=19, depth_single_blocks=38,
                     axes_dim=[4, 14, 14], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                     txt_ids_dims=[], dtype=torch.float32, operations=ops)
        inputs = dict(x=torch.randn(1, 16, LATENT, LATENT), timestep=torch.tensor([0.5]),
                      context=torch.randn(1, TOKENS, 64), y=torch.randn(1, 64), guidance=torch.tensor([3.5]))
    elif key == "wan":
        model = WanModel(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=64, ffn_dim=256, freq_dim=256,
                         text_dim=64, out_dim=16, num_heads=2, num_layers=30, qk_norm=True, cross_attn_norm=True,
                         eps=1e-6, dtype=torch.float32, operations=ops)
        inputs = dict(x=torch.randn(2, 16, 3, LATENT, LATENT), timestep=torch.full((2,), 500.0),
                      context=torch.randn(2, TOKENS, 64))
    else:
        raise ValueError(f"unknown model {key!r}; expected one of {', '.join(SPECS)}")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.02)
    model = model.eval().requires_grad_(False)
    if device != "cpu":
        model = model.to(device)
        inputs = {k: v.to(device) for k, v in inputs.items()}
    return model, inputs


def device_sync(device: str):
    """What waits for `device`'s queued kernels: None on the CPU (ops finish before they return)."""
    if device == "cpu":
        return None
    import torch
    return functools.partial(torch.cuda.synchronize, device)


def count_ops(model, inputs) -> tuple[int, int]:
    """(aten ops, of which views) in one forward, as seen by a TorchDispatchMode."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        ops = views = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            self.views += func.is_view
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), Counter() as counter:
        model(**inputs)
    return counter.ops, counter.views


def host_ms(model, inputs) -> list[float]:
    """HOST_SAMPLES single-forward times (ms) on this thread, after two warm-up forwards."""
    import torch
    samples = []
    with torch.inference_mode():
        for i in range(HOST_SAMPLES + 2):
            t = time.perf_counter()
            model(**inputs)
            if i >= 2:
                samples.append((time.perf_counter() - t) * 1000)
    return samples


def forward_loop(model, inputs, seconds: float, ready=None, sync=None) -> float:
    """Forwards per second of one worker: one warm-up forward, wait at `ready`, then forwards until
    `seconds` have passed; the rate counts the last forward whole (count / time to its end). With
    `sync` (a GPU: kernels run after the host queued them), the window ends when the device has run
    every forward queued in it, and the warm-up is finished before the window starts."""
    import torch
    torch.set_num_threads(1)  # per thread: intra-op threads would blur the GIL effect
    with torch.inference_mode():
        model(**inputs)
        if sync is not None:
            sync()
        if ready is not None:
            ready.wait()
        start = time.monotonic()
        count = 0
        while True:
            model(**inputs)
            count += 1
            elapsed = time.monotonic() - start
            if elapsed >= seconds:
                if sync is not None:
                    sync()
                    elapsed = time.monotonic() - start
                return count / elapsed


def run_threads(models, inputs, seconds: float, sync=None) -> float:
    """Aggregate forwards/s of len(models) threads in this process, one model copy each."""
    rates = [0.0] * len(models)
    ready = threading.Barrier(len(models))

    def work(i):
        rates[i] = forward_loop(models[i], inputs, seconds, ready, sync)
    threads = [threading.Thread(target=work, args=(i,), name=f"gil-bench-{i}") for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 120)
        if t.is_alive():
            raise RuntimeError(f"{t.name} still running {seconds + 120:.0f} s after its window began")
    return sum(rates)


def _process_main(conn) -> None:
    """A spawned worker: ("build", key, device) builds and warms a model; ("run", seconds) answers its rate."""
    import torch
    torch.set_num_threads(1)
    model = inputs = sync = None
    while (msg := conn.recv()) is not None:
        if msg[0] == "build":
            model, inputs = build(msg[1], msg[2])
            sync = device_sync(msg[2])
            conn.send("ready")
        else:
            conn.send(forward_loop(model, inputs, msg[1], sync=sync))


class ProcessPool:
    """`size` spawned processes, started once and reused for every model (spawn start-up costs seconds)."""

    def __init__(self, size: int):
        ctx = multiprocessing.get_context("spawn")
        self._conns, self._procs = [], []
        for i in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_process_main, args=(child,), name=f"gil-bench-proc-{i}", daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)

    def build(self, key: str, device: str = "cpu") -> None:
        for conn in self._conns:
            conn.send(("build", key, device))
        for conn in self._conns:
            if conn.recv() != "ready":
                raise RuntimeError(f"a worker process failed to build {key}")

    def run(self, n: int, seconds: float) -> float:
        """Aggregate forwards/s of the first n processes, started together (each warms up first)."""
        for conn in self._conns[:n]:
            conn.send(("run", seconds))
        return sum(conn.recv() for conn in self._conns[:n])

    def close(self) -> None:
        for conn in self._conns:
            conn.send(None)
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def measure(keys, workers, seconds, repeat, device: str = "cpu") -> dict:
    """Per model: aten ops, host ms per forward, and the thread and process rates for each worker
    count, every model and worker on `device` (on a GPU, "host ms" is the time to queue a forward)."""
    import torch
    torch.set_num_threads(1)
    sync = device_sync(device)
    pool = ProcessPool(max(workers))
    results = {}
    try:
        for key in keys:
            model, inputs = build(key, device)
            ops, views = count_ops(model, inputs)
            host = host_ms(model, inputs)
            copies = [model] + [copy.deepcopy(model) for _ in range(max(workers) - 1)]
            pool.build(key, device)
            threads = {n: [] for n in workers}
            procs = {n: [] for n in workers}
            for _ in range(repeat):  # interleaved, so drift on the machine hits both modes alike
                for n in workers:
                    threads[n].append(run_threads(copies[:n], inputs, seconds, sync))
                    procs[n].append(pool.run(n, seconds))
            results[key] = dict(ops=ops, views=views, host=host, threads=threads, procs=procs)
            print(f"{key}: {ops} ops, {statistics.median(host):.1f} ms, threads "
                  f"{ {n: round(statistics.median(v), 1) for n, v in threads.items()} }, processes "
                  f"{ {n: round(statistics.median(v), 1) for n, v in procs.items()} }", file=sys.stderr)
    finally:
        pool.close()
    return results


def _spread(values) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def report(results, opts, command: str) -> str:
    import torch
    workers = opts.workers
    ceiling = {k: max(statistics.median(r["threads"][n]) for n in workers) for k, r in results.items()}
    lines = [f"Run {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores ({platform.machine()}), "
             f"Python {platform.python_version()}, torch {torch.__version__} (CPU), command `{command}`: "
             f"{opts.seconds:g} s per window, {opts.repeat} repetitions interleaved (threads, then processes, "
             f"for each worker count), median (min-max) of the aggregate forwards/s. fp32 on the CPU, "
             f"`torch.set_num_threads(1)` in every worker, `comfy.ops.disable_weight_init`, PyTorch SDPA "
             f"attention; the forward is the diffusion model's own `forward` (no sampler, no CFG "
             f"arithmetic). Threads: one model copy per thread. Processes: spawned once, one model each.", "",
             "| model | aten ops/forward | host ms/forward | forwards/s, threads in one process ("
             + "/".join(map(str, workers)) + ") | forwards/s, processes (" + "/".join(map(str, workers))
             + ") | one-process ceiling, forwards/s | published GPU time per forward | GPUs one process can "
             "keep busy |", "|---" * 8 + "|"]
    for key, r in results.items():
        spec = SPECS[key]
        thr = " / ".join(f"{statistics.median(r['threads'][n]):.1f}" for n in workers)
        prc = " / ".join(f"{statistics.median(r['procs'][n]):.1f}" for n in workers)
        pub, busy = "not found", "-"
        if spec.published is not None:
            pub = f"{spec.published.seconds * 1000:.0f} ms"
            busy = f"{ceiling[key] * spec.published.seconds:.1f}"
        lines.append(f"| {spec.label} | {r['ops']} | {statistics.median(r['host']):.1f} | {thr} | {prc} | "
                     f"{ceiling[key]:.1f} | {pub} | {busy} |")
    lines += ["", "One-process ceiling: the best median of the thread rows. GPUs one process can keep busy: "
              "that ceiling times the published GPU time per forward below (a GPU is busy while its "
              "forward runs; the host work of the next one has to fit in that time). Published figures:", ""]
    lines += [f"- {SPECS[k].label}: {SPECS[k].published.where}." for k in results if SPECS[k].published]
    for key, r in results.items():
        spec = SPECS[key]
        lines += ["", f"{spec.label}: {spec.layout}. {r['ops']} aten ops per forward ({r['views']} of them "
                  f"views), host time per forward on one thread {_spread(r['host'])} ms over "
                  f"{HOST_SAMPLES} forwards.", "",
                  "| workers | threads in one process, forwards/s | processes, forwards/s | threads / processes |",
                  "|---|---|---|---|"]
        for n in workers:
            t, p = statistics.median(r["threads"][n]), statistics.median(r["procs"][n])
            lines.append(f"| {n} | {_spread(r['threads'][n])} | {_spread(r['procs'][n])} | {t / p:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl,flux,wan")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--write", action="store_true")
    opts = parser.parse_args()
    keys = [k.strip() for k in opts.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SPECS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; expected some of {','.join(SPECS)}")
    opts.workers = sorted({int(n) for n in opts.workers.split(",")})
    command = "scripts/run_bench.sh bench/bench_gil.py " + " ".join(sys.argv[1:])
    results = measure(keys, opts.workers, opts.seconds, opts.repeat)
    text = report(results, opts, command.strip())
    print(text)
    if opts.write:
        write_section("gil", text)


if __name__ == "__main__":
    main()
