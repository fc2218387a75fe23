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
attentions, bf16) on N GPUs = the larger of the GPU side (GPU time / N + exchange bytes per rank / link
bandwidth) and the host side (N ranks' dispatch in one process, one GIL, + the barriers), and the same
with every barrier also stalling the GPUs (lockstep, the pessimistic bound).

Part 3 (model, by family): the same for FLUX.1-dev, FLUX.2-dev, Qwen-Image, Wan 2.1 14B and HunyuanVideo
at typical sizes (TYPICAL), their GPU time per step scaled from FLUX.1-dev's by arithmetic, their host
side measured here (ComfyUI's class at its real depth, width 96).

    scripts/run_bench.sh bench/bench_sp.py [--ranks 2,4] [--tokens 256] [--repeat 5] [--devices ...] [--write]
    scripts/run_bench.sh bench/bench_sp.py --shape dev --devices cuda:0,cuda:1 --ranks 2   # FLUX.1-dev on 2 GPUs
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

HIDDEN, HEADS = 128, 4                  # --shape tiny: 4 heads of 32, up to 4 ranks; the host side at real depth
# FLUX.1-dev as comfy/model_detection.py reads it (--shape dev, and GPU check 8): 11.9 B parameters.
FLUX_DEV = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
                theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
# FLUX.1-dev 1024 px, bf16, per step (cfg 1: one forward)
DEV = {"tokens": 4096 + 512, "hidden": 3072, "attentions": 19 + 38, "bytes": 2}
# GPU time of one FLUX.1-dev 1024 px forward: 0.503 s on an L40 (diffusers benchmark CI, the figure
# bench_gil.py cites); an H100 SXM is taken as 2x faster (bf16 dense TFLOPs 990 vs 362, memory 3.35 vs
# 0.86 TB/s: about 2.5x, minus what does not scale).
GPU_STEP_S = {"H100 SXM (NVLink 4)": (0.25, 450e9), "H100 PCIe / L40S (PCIe 4 x16)": (0.45, 25e9)}
# Part 3: each family at a typical size, per step (cfg 1: one forward), bf16. params: the diffusion
# model's; tokens: those every self-attention sees (image or video + joint text); attentions: the
# self-attentions, each two exchanges (Wan's cross-attention to the text stays local); depth: the real
# depth at which the host side is measured (width 96).
TYPICAL = {
    "FLUX.1-dev 1024 px": dict(params=11.9e9, tokens=4096 + 512, hidden=3072, attentions=19 + 38),
    "FLUX.2-dev 1024 px": dict(family="FLUX.2", params=32e9, tokens=4096 + 512, hidden=6144, attentions=8 + 48,
                               depth=dict(depth=8, depth_single_blocks=48)),
    "Qwen-Image 1328 px": dict(family="Qwen-Image", params=20e9, tokens=83 * 83 + 128, hidden=3072, attentions=60,
                               depth=dict(num_layers=60)),
    "Wan 2.1 14B 1280x720, 81 frames": dict(family="Wan 2.1", params=14e9, tokens=21 * 45 * 80, hidden=5120,
                                            attentions=40, depth=dict(num_layers=40)),
    "HunyuanVideo 960x544, 129 frames": dict(family="HunyuanVideo", params=13e9, tokens=33 * 34 * 60 + 256,
                                             hidden=3072, attentions=20 + 40,
                                             depth=dict(depth=20, depth_single_blocks=40)),
}
PUBLISHED = ("xDiT (xfuser) Ulysses-4 on 4xH100: 1.58x eager, 2.63x with torch.compile (FLUX.1-dev 1024 px, "
             "28 steps: 6.71 s -> 4.24 s / 1.63 s); raylight: 1.76x per step on 2 PCIe GPUs")


# ---- the model families (also GPU check 8's part 5) -----------------------------------------------

def random_small(torch, cls, config: dict, device, seed: int = 0):
    """A ComfyUI model class at a small config in fp32 with the tests' random weights (matrices
    1/sqrt(fan in), biases 0.02, norm scales 1: attention as sharp as a trained model's), on `device`."""
    import comfy.ops
    g = torch.Generator().manual_seed(seed)
    model = cls(**config, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1
                    else torch.randn(p.shape, generator=g) * 0.02)
            if "norm" in name:
                p.fill_(1.0)
    return model.eval().requires_grad_(False).to(device)


# The tests' small shapes (tests/test_sequence_parallel.py): 6 heads (uneven over 4), uneven tokens.
FAMILIES = {
    "FLUX.2": ("comfy.ldm.flux.model", "Flux", dict(
        image_model="flux2", in_channels=32, out_channels=32, vec_in_dim=None, context_in_dim=64, hidden_size=96,
        mlp_ratio=3.0, num_heads=6, depth=2, depth_single_blocks=2, axes_dim=[4, 4, 4, 4], theta=2000,
        patch_size=1, qkv_bias=False, guidance_embed=True, global_modulation=True, mlp_silu_act=True,
        ops_bias=False, default_ref_method="index", ref_index_scale=10.0, txt_ids_dims=[3])),
    "Qwen-Image": ("comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=3, attention_head_dim=16, num_attention_heads=6,
        joint_attention_dim=48, axes_dims_rope=(4, 6, 6))),
    "Wan 2.1": ("comfy.ldm.wan.model", "WanModel", dict(
        model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=96, ffn_dim=128, freq_dim=256, text_dim=48,
        out_dim=16, num_heads=6, num_layers=3, qk_norm=True, cross_attn_norm=True, eps=1e-6)),
    "HunyuanVideo": ("comfy.ldm.hunyuan_video.model", "HunyuanVideo", dict(
        in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48, hidden_size=96, mlp_ratio=4.0,
        num_heads=6, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6], theta=256, patch_size=[1, 2, 2],
        qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False, use_cond_type_embedding=False,
        vision_in_dim=None, meanflow_sum=False)),
}


def family_call(torch, name: str, device, seed: int = 0) -> tuple:
    """(positional arguments, keyword arguments) of one forward of family `name`: 15 image tokens (30 for
    video) and 7 text tokens; FLUX.2 with an edit's reference latent, Qwen-Image with a ControlNet's
    per-block additions."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)
    t = torch.tensor([0.7], device=device)
    if name == "FLUX.2":
        return (rand(1, 32, 5, 3), t, rand(1, 7, 64), None, torch.tensor([3.5], device=device),
                [rand(1, 32, 4, 3)]), {}
    if name == "Qwen-Image":
        return (rand(1, 16, 1, 10, 6), t, rand(1, 7, 48)), {"control": {"input": [rand(1, 15, 96), None,
                                                                                  rand(1, 15, 96)]}}
    if name == "Wan 2.1":
        return (rand(1, 16, 2, 10, 6), torch.tensor([600.0], device=device), rand(1, 7, 48)), {}
    return (rand(1, 16, 2, 10, 6), t, rand(1, 7, 48), rand(1, 32), None, None,
            torch.tensor([6.0], device=device)), {}


def family_class(module: str, name: str):
    import importlib
    return getattr(importlib.import_module(module), name)


def _comfy(cuda: bool):
    """ComfyUI's modules as main.py configures them: on the GPU (DynamicVRAM off, as the extension
    runs it; its attention choice is then the GPU's), or with --cpu."""
    sys.path.append(str(comfyui_dir()))
    argv, sys.argv = sys.argv, ["main.py", "--disable-dynamic-vram"] if cuda else ["main.py", "--cpu"]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.ops
        from comfy.ldm.flux.model import Flux
    finally:
        sys.argv = argv
    return comfy.ops, Flux


def build(tokens: int, device: str = "cpu"):
    """--shape tiny: ComfyUI's Flux at FLUX.1-dev depth and width HIDDEN, fp32, and its inputs."""
    import torch
    ops, Flux = _comfy(torch.device(device).type == "cuda")
    torch.manual_seed(0)
    model = Flux(**dict(FLUX_DEV, vec_in_dim=32, context_in_dim=64, hidden_size=HIDDEN, num_heads=HEADS,
                        axes_dim=[4, 14, 14]), dtype=torch.float32, operations=ops.disable_weight_init)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.02)
    side = int(round((tokens ** 0.5))) * 2              # latent side: (side/2)^2 image tokens
    inputs = dict(x=torch.randn(1, 16, side, side), timestep=torch.tensor([0.5]),
                  context=torch.randn(1, 64, 64), y=torch.randn(1, 32), guidance=torch.tensor([3.5]))
    return model.eval().requires_grad_(False).to(device), {k: v.to(device) for k, v in inputs.items()}


def build_on_device(config: dict, device: str, seed: int = 0):
    """ComfyUI's Flux of `config` built straight on `device` in bf16, its weights drawn there in place
    (1/sqrt(fan in) for matrices, 0.02 for biases, norm scales 1): FLUX.1-dev's shape takes about
    24 GB and no time in RAM."""
    import torch
    ops, Flux = _comfy(torch.device(device).type == "cuda")
    model = Flux(**config, device=device, dtype=torch.bfloat16, operations=ops.disable_weight_init)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 1 / p.shape[-1] ** 0.5 if p.ndim > 1 else 0.02, generator=g)
    return model.eval().requires_grad_(False)


def dev_inputs(tokens: int, device: str, text: int = 512) -> dict:
    """--shape dev: a FLUX.1-dev latent of `tokens` image tokens (4096: 1024 px) and `text` T5 tokens, bf16."""
    import torch
    side = int(round((tokens ** 0.5))) * 2
    g = torch.Generator().manual_seed(1)
    args = dict(x=torch.randn(1, 16, side, side, generator=g), context=torch.randn(1, text, 4096, generator=g),
                y=torch.randn(1, 768, generator=g))
    args = {k: v.to(device=device, dtype=torch.bfloat16) for k, v in args.items()}
    return dict(args, timestep=torch.tensor([0.5], device=device), guidance=torch.tensor([3.5], device=device))


def sync(devices) -> None:
    import torch
    for d in set(map(str, devices)):
        if torch.device(d).type == "cuda":
            torch.cuda.synchronize(d)


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
    dtype = next(model.parameters()).dtype
    width = model.txt_in.in_features
    tiny = dict(x=torch.randn(1, 16, 8, 8), timestep=torch.tensor([0.5]), context=torch.randn(1, 4, width),
                y=torch.randn(1, model.vector_in.in_layer.in_features), guidance=torch.tensor([3.5]))
    tiny = {k: v.to(device=device, dtype=dtype if k in ("x", "context", "y") else None) for k, v in tiny.items()}
    return call_seconds(lambda: one(model, tiny), device, repeat)


def call_seconds(call, device: str, repeat: int) -> float:
    """Median seconds until `call()` returns (at least 3 runs, after a warm-up; the device idle at each
    start): with almost no arithmetic, the host side of a forward."""
    call()
    samples = []
    for _ in range(max(3, repeat)):
        sync([device])
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def family_host_seconds(name: str, depth: dict, device: str, repeat: int) -> float:
    """One forward of family `name` at its real depth and width 96 with 15 to 30 image and 7 text tokens:
    the host side of its forward (as host_seconds for FLUX.1-dev)."""
    import torch
    module, cls, config = FAMILIES[name]
    model = random_small(torch, family_class(module, cls), {**config, **depth}, device)
    args, _ = family_call(torch, name, device)

    def call():
        with torch.no_grad():
            model._forward(*args, transformer_options={})
    return call_seconds(call, device, repeat)


def measure(opts) -> dict:
    devices = opts.devices.split(",")
    if opts.shape == "dev":
        models = {d: build_on_device(FLUX_DEV, d) for d in dict.fromkeys(devices)}
        model, inputs = models[devices[0]], dev_inputs(opts.tokens, devices[0])
    else:
        model, inputs = build(opts.tokens, devices[0])
        models = {d: (model if d == devices[0] else build(opts.tokens, d)[0]) for d in set(devices)}
    host = host_seconds(model, devices[0], opts.repeat)
    one(model, inputs)                                  # warm-up
    for n in opts.ranks:
        ranked([models[devices[r % len(devices)]] for r in range(n)], [devices[r % len(devices)] for r in range(n)],
               inputs)
    times = {1: []}
    groups = {}
    for n in opts.ranks:
        times[n] = []
    for _ in range(opts.repeat):                        # interleaved: 1 rank, then each N
        sync(devices)
        t0 = time.perf_counter()
        one(model, inputs)
        sync(devices)
        times[1].append(time.perf_counter() - t0)
        for n in opts.ranks:
            ranks = [devices[r % len(devices)] for r in range(n)]
            t0 = time.perf_counter()
            groups[n] = ranked([models[d] for d in ranks], ranks, inputs)
            sync(devices)
            times[n].append(time.perf_counter() - t0)
    families = {name: family_host_seconds(shape["family"], shape["depth"], devices[0], opts.repeat)
                for name, shape in TYPICAL.items() if "family" in shape}
    return {"times": times, "groups": groups, "host": host, "families": families}


def step_flops(shape: dict) -> float:
    """One forward's arithmetic: 2 x parameters x tokens (the linear layers) + 4 x tokens^2 x hidden per
    self-attention (the scores and the weighted sum)."""
    return 2 * shape["params"] * shape["tokens"] + 4 * shape["tokens"] ** 2 * shape["hidden"] * shape["attentions"]


def cost_model(n: int, step_s: float, bandwidth: float, host_s: float, barrier_s: float, shape: dict = DEV) -> dict:
    """Seconds per step of `shape` (FLUX.1-dev 1024 px) on n GPUs, two ways, and what bounds the first.

    Ahead (what CUDA allows): a barrier orders the ranks' host threads only; the copies are ordered on
    the GPUs by torch's cross-device stream events, so while the host dispatches ahead of the GPUs a
    step costs max(GPU, host): GPU = its share of the work + the exchanged bytes over the link, host =
    n ranks' dispatch through one GIL + the barriers. Lockstep (pessimistic): every barrier also
    stalls the GPUs, as if the host waited for them at each exchange."""
    per_rank = shape["tokens"] / n * shape["hidden"] * DEV["bytes"]
    exchanged = shape["attentions"] * (3 + 1) * per_rank * (n - 1) / n     # q, k, v out and the result back
    barriers = shape["attentions"] * 2 * barrier_s
    gpu = step_s / n + exchanged / bandwidth
    host = n * host_s + barriers                          # n ranks' dispatch through one GIL
    ahead = max(gpu, host)
    lockstep = max(gpu + barriers, host)
    return {"ahead": ahead, "speedup": step_s / ahead, "bound": "host (one GIL)" if host > gpu else "GPU + exchanges",
            "lockstep": lockstep, "lockstep_speedup": step_s / lockstep}


def report(opts, result, command: str) -> str:
    import torch
    t = result["times"]
    base = statistics.median(t[1])
    shape = (f"FLUX.1-dev (bf16, random weights built on each device), {opts.tokens} image + 512 text tokens"
             if opts.shape == "dev" else f"FLUX.1-dev depth, hidden {HIDDEN}, fp32, {opts.tokens} image + 64 text tokens")
    cuda = all(torch.device(d).type == "cuda" for d in opts.devices.split(","))
    lines = [f"Run {time.strftime('%Y-%m-%d')} on {platform.machine()} ({torch.get_num_threads()} threads), "
             f"Python {platform.python_version()}, torch {torch.__version__}, devices {opts.devices}, command "
             f"`{command}`: {shape}, {opts.repeat} repetitions interleaved, medians (min-max).", "",
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
    server_host_s = host_s if cuda else host_s / 2          # measured on this (GPU) server, or a CPU's guess
    where = ("as measured here" if cuda else f"as measured here, a server CPU about 2x faster: "
             f"{1000 * server_host_s:.0f} ms")
    lines += ["", f"Cost model, FLUX.1-dev 1024 px per step (bf16; GPU time per forward as stated in the "
              f"script; host dispatch per forward per rank {1000 * host_s:.0f} ms at 16 image tokens (almost no "
              f"arithmetic), {where}; barrier "
              f"{1e6 * barrier_s:.0f} us per exchange as measured above, an upper bound: it includes waiting "
              f"for the slowest rank). \"Step s on N\": the host dispatches ahead of the GPUs (a barrier orders "
              f"host threads, the copies are ordered on the GPUs by stream events), so a step costs max(GPU share + "
              f"exchanged bytes / link, N x dispatch + barriers); \"lockstep\": as if every barrier also stalled "
              f"the GPUs (pessimistic). GPU check 8 measures the dispatch of N ranks with real kernels:", "",
              "| GPUs | link | step s on 1 GPU | step s on N | speedup | bound by | lockstep: step s | lockstep: speedup |",
              "|---|---|---|---|---|---|---|---|"]
    for name, (step_s, bandwidth) in GPU_STEP_S.items():
        for n in (2, 4):
            m = cost_model(n, step_s, bandwidth, server_host_s, barrier_s)
            lines.append(f"| {n} | {name} | {step_s:.2f} | {m['ahead']:.3f} | {m['speedup']:.2f}x | {m['bound']} | "
                         f"{m['lockstep']:.3f} | {m['lockstep_speedup']:.2f}x |")
    lines += ["", f"Published for comparison: {PUBLISHED}.", ""]
    lines += family_table(result, server_host_s, barrier_s, 1.0 if cuda else 0.5)
    return "\n".join(lines) + "\n"


def family_table(result: dict, flux_host_s: float, barrier_s: float, host_scale: float) -> list[str]:
    """The cost model for each family's typical size: its GPU time per step scaled from FLUX.1-dev's by
    arithmetic (step_flops), its host side measured at its real depth (scaled as FLUX.1-dev's)."""
    base = step_flops(TYPICAL["FLUX.1-dev 1024 px"])
    links = [(n, name, step_s, bandwidth) for name, (step_s, bandwidth) in GPU_STEP_S.items() for n in (2, 4)]
    lines = [f"Cost model by model family, per step (bf16, cfg 1): GPU time scaled from FLUX.1-dev's by arithmetic "
             f"(2 x parameters x tokens + 4 x tokens^2 x hidden per self-attention; an estimate: attention-heavy "
             f"video runs at another efficiency than FLUX's linear layers), host side measured here for each "
             f"class at its real depth{'' if host_scale == 1 else ' (halved for a server CPU, as above)'}, "
             f"exchanges and barriers as above; speedup vs one GPU, (host) where the host side bounds it:", "",
             "| model | tokens | GPU s per step on 1 H100 SXM | host ms per forward | "
             + " | ".join(f"{n} x {name.split(' (')[0]}" for n, name, _, _ in links) + " |",
             "|---|---|---|---|" + "---|" * len(links)]
    for label, shape in TYPICAL.items():
        host_s = result["families"][label] * host_scale if "family" in shape else flux_host_s
        scale = step_flops(shape) / base
        cells = []
        for n, _, step_s, bandwidth in links:
            m = cost_model(n, step_s * scale, bandwidth, host_s, barrier_s, shape)
            cells.append(f"{m['speedup']:.2f}x{' (host)' if m['bound'].startswith('host') else ''}")
        lines.append(f"| {label} | {shape['tokens']:,} | {GPU_STEP_S['H100 SXM (NVLink 4)'][0] * scale:.2f} "
                     f"| {1000 * host_s:.0f} | " + " | ".join(cells) + " |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--shape", choices=("tiny", "dev"), default="tiny",
                        help="tiny: FLUX.1-dev depth at width 128, fp32 (CPU); dev: FLUX.1-dev itself, bf16, "
                             "built on each GPU (about 24 GB each)")
    parser.add_argument("--tokens", type=int, help="image tokens (default 256 tiny, 4096 dev: 1024 px)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--devices", default="cpu")
    parser.add_argument("--write", action="store_true")
    opts = parser.parse_args()
    opts.ranks = [int(n) for n in opts.ranks.split(",")]
    opts.tokens = opts.tokens or (4096 if opts.shape == "dev" else 256)
    result = measure(opts)
    command = "scripts/run_bench.sh bench/bench_sp.py " + " ".join(sys.argv[1:])
    text = report(opts, result, command.strip())
    print(text)
    if opts.write:
        write_section("sp", text)


if __name__ == "__main__":
    main()
