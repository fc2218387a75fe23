"""Sequence parallelism (issue 17): one FLUX forward on 1 and N ranks, what the ranks exchange, how long
they wait for each other, and a cost model for FLUX.1-dev at 1024 px on real GPUs built from those
figures.

Part 1 (measured): ComfyUI's Flux class at FLUX.1-dev depth (19 double + 38 single blocks) and small
width (hidden 128 = 4 heads x 32), one forward per step as with cfg 1, on CPU ranks (threads) here,
or on GPUs where there are (`--devices cuda:0,cuda:1,...`, unchanged otherwise): per-forward time with
1 and N ranks (median over repetitions, interleaved), bytes each rank copies to the others and seconds
spent at the barriers per forward. CPU ranks share this machine's 2 cores: the N-rank times here show
the overhead of the exchanges, not a speedup.

Part 2 (model): per step of FLUX.1-dev 1024x1024 (4096 image + 512 text tokens, hidden 3072, 57
attentions, bf16) on N GPUs = GPU time / N + exchange bytes per rank / link bandwidth + barriers, and
the host side of N ranks in one process (one GIL) against the GPU time each rank has to hide it in.

    scripts/run_bench.sh bench/bench_sp.py [--ranks 2,4] [--tokens 256] [--repeat 5] [--devices ...] [--write]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))
from shared import comfyui_dir, write_section  # noqa: E402

HIDDEN, HEADS = 128, 4                  # 4 heads of 32: up to 4 ranks; the host side at real depth
# FLUX.1-dev 1024 px, bf16, per step (cfg 1: one forward)
DEV = {"tokens": 4096 + 512, "hidden": 3072, "attentions": 19 + 38, "bytes": 2}
# GPU time of one FLUX.1-dev 1024 px forward: 0.503 s on an L40 (diffusers benchmark CI, the figure
# bench_gil.py cites); an H100 SXM is taken as 2x faster (bf16 dense TFLOPs 990 vs 362, memory 3.35 vs
# 0.86 TB/s: about 2.5x, minus what does not scale).
GPU_STEP_S = {"H100 SXM (NVLink 4)": (0.25, 450e9), "H100 PCIe / L40S (PCIe 4 x16)": (0.45, 25e9)}
PUBLISHED = ("xDiT (xfuser) Ulysses-4 on 4xH100: 1.58x eager, 2.63x with torch.compile (FLUX.1-dev 1024 px, "
             "28 steps: 6.71 s -> 4.24 s / 1.63 s); raylight: 1.76x per step on 2 PCIe GPUs")


def _comfy():
    sys.path.append(str(comfyui_dir()))
    argv, sys.argv = sys.argv, ["main.py", "--cpu"]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.ops
        from comfy.ldm.flux.model import Flux
    finally:
        sys.argv = argv
    return comfy.ops, Flux


def build(tokens: int, device: str = "cpu"):
    import torch
    ops, Flux = _comfy()
    torch.manual_seed(0)
    model = Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
                 hidden_size=HIDDEN, mlp_ratio=4.0, num_heads=HEADS, depth=19, depth_single_blocks=38,
                 axes_dim=[4, 14, 14], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                 txt_ids_dims=[], dtype=torch.float32, operations=ops.disable_weight_init)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.02)
    side = int(round((tokens ** 0.5))) * 2              # latent side: (side/2)^2 image tokens
    inputs = dict(x=torch.randn(1, 16, side, side), timestep=torch.tensor([0.5]),
                  context=torch.randn(1, 64, 64), y=torch.randn(1, 32), guidance=torch.tensor([3.5]))
    return model.eval().requires_grad_(False).to(device), {k: v.to(device) for k, v in inputs.items()}


def one(model, inputs):
    import torch
    with torch.no_grad():
        model._forward(inputs["x"], inputs["timestep"], inputs["context"], inputs["y"], inputs["guidance"],
                       transformer_options={})


def ranked(models, devices, inputs):
    import torch
    from comfy_multigpu.host.sp_flux import parallel_forward
    with torch.no_grad():
        _, group = parallel_forward(models, devices, inputs["x"], inputs["timestep"], inputs["context"],
                                    inputs["y"], inputs["guidance"], transformer_options={})
    return group


def host_seconds(model, device: str, repeat: int) -> float:
    """One forward at 16 image + 4 text tokens: almost no arithmetic, so its time is the host side
    (Python and dispatch of the ~2,800 ops of a FLUX.1-dev-depth forward), as bench_gil.py measures."""
    import torch
    tiny = dict(x=torch.randn(1, 16, 8, 8), timestep=torch.tensor([0.5]), context=torch.randn(1, 4, 64),
                y=torch.randn(1, 32), guidance=torch.tensor([3.5]))
    tiny = {k: v.to(device) for k, v in tiny.items()}
    one(model, tiny)
    samples = []
    for _ in range(max(3, repeat)):
        t0 = time.perf_counter()
        one(model, tiny)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure(opts) -> dict:
    devices = opts.devices.split(",")
    model, inputs = build(opts.tokens, devices[0])
    host = host_seconds(model, devices[0], opts.repeat)
    models = {d: (model if d == devices[0] else build(opts.tokens, d)[0]) for d in set(devices)}
    one(model, inputs)                                  # warm-up
    times = {1: []}
    groups = {}
    for n in opts.ranks:
        times[n] = []
    for _ in range(opts.repeat):                        # interleaved: 1 rank, then each N
        t0 = time.perf_counter()
        one(model, inputs)
        times[1].append(time.perf_counter() - t0)
        for n in opts.ranks:
            ranks = [devices[r % len(devices)] for r in range(n)]
            t0 = time.perf_counter()
            groups[n] = ranked([models[d] for d in ranks], ranks, inputs)
            times[n].append(time.perf_counter() - t0)
    return {"times": times, "groups": groups, "host": host}


def cost_model(n: int, step_s: float, bandwidth: float, host_s: float, barrier_s: float) -> tuple:
    """(seconds per step on n GPUs, speedup, what bounds it) for FLUX.1-dev 1024 px."""
    per_rank = DEV["tokens"] / n * DEV["hidden"] * DEV["bytes"]
    exchanged = DEV["attentions"] * (3 + 1) * per_rank * (n - 1) / n     # q, k, v out and the result back
    exchange_s = exchanged / bandwidth + DEV["attentions"] * 2 * barrier_s
    gpu = step_s / n + exchange_s
    host = n * host_s                                    # n ranks' dispatch through one GIL
    step = max(gpu, host)
    return step, step_s / step, "host (one GIL)" if host > gpu else "GPU + exchanges"


def report(opts, result, command: str) -> str:
    import torch
    t = result["times"]
    base = statistics.median(t[1])
    lines = [f"Run {time.strftime('%Y-%m-%d')} on {platform.machine()} ({torch.get_num_threads()} threads), "
             f"Python {platform.python_version()}, torch {torch.__version__}, devices {opts.devices}, command "
             f"`{command}`: FLUX.1-dev depth, hidden {HIDDEN}, {opts.tokens} image + 64 text tokens, "
             f"{opts.repeat} repetitions interleaved, medians (min-max).", "",
             "| ranks | ms per forward | vs 1 rank | exchanges | MiB sent per rank | ms at barriers per rank |",
             "|---|---|---|---|---|---|",
             f"| 1 | {1000 * base:.0f} ({1000 * min(t[1]):.0f}-{1000 * max(t[1]):.0f}) | 1.00x | - | - | - |"]
    barrier_s = 0.0
    for n in opts.ranks:
        g = result["groups"][n]
        med = statistics.median(t[n])
        waited = statistics.mean(g.waited)
        barrier_s = max(barrier_s, waited / max(1, g.exchanges))
        lines.append(f"| {n} | {1000 * med:.0f} ({1000 * min(t[n]):.0f}-{1000 * max(t[n]):.0f}) | "
                     f"{base / med:.2f}x | {g.exchanges} | {statistics.mean(g.sent) / 2 ** 20:.1f} | "
                     f"{1000 * waited:.0f} |")
    host_s = result["host"]
    lines += ["", f"Cost model, FLUX.1-dev 1024 px per step (bf16; GPU time per forward as stated in the "
              f"script; host dispatch per forward per rank {1000 * host_s:.0f} ms as measured here at 16 image "
              f"tokens (almost no arithmetic), a server CPU about 2x faster: {500 * host_s:.0f} ms; barrier "
              f"{1e6 * barrier_s:.0f} us per exchange as measured above, an upper bound: it includes waiting "
              f"for the slowest rank):", "",
              "| GPUs | link | step s on 1 GPU | step s on N | speedup | bound by |", "|---|---|---|---|---|---|"]
    for name, (step_s, bandwidth) in GPU_STEP_S.items():
        for n in (2, 4):
            step, speedup, bound = cost_model(n, step_s, bandwidth, host_s / 2, barrier_s)
            lines.append(f"| {n} | {name} | {step_s:.2f} | {step:.3f} | {speedup:.2f}x | {bound} |")
    lines += ["", f"Published for comparison: {PUBLISHED}.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--devices", default="cpu")
    parser.add_argument("--write", action="store_true")
    opts = parser.parse_args()
    opts.ranks = [int(n) for n in opts.ranks.split(",")]
    result = measure(opts)
    command = "scripts/run_bench.sh bench/bench_sp.py " + " ".join(sys.argv[1:])
    text = report(opts, result, command.strip())
    print(text)
    if opts.write:
        write_section("sp", text)


if __name__ == "__main__":
    main()
