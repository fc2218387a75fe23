"""Check 8 of the GPU check (bench/gpu_check.py): sequence parallelism (issue 17) as N rank threads on
one device (cuda:0 N times; the dry run: cpu), with ComfyUI's classes in this process.

1. fp32: a small ComfyUI Flux (random weights, q/k norm scales 1) as N = 2, 3, 4 ranks (uneven token
   and head splits) gives the one-rank output to 1e-4, TF32 off; attention over each rank's own tokens
   only, for contrast, must miss by over 100x that, so the row can fail;
2. bf16: the same model in bf16 as N = 2, 4 ranks, within 2x bf16's own noise floor (its one-rank
   output against the fp32 one-rank output);
3. one forward of FLUX.1-dev's real shape (bf16, random weights, about 24 GB; 1024 px = 4096 image +
   512 text tokens) with 1, 2 and 4 ranks: time on the device, time until the call returns (the host's
   dispatch), the exchanges; the dry run runs the same code at a tiny width and a few tokens;
4. VAE: an SD VAE (full width on CUDA) decoded by the host's own VAE.decode_tiled with VAEDecodeTiled's
   default tiles, against spread_decode_tiled over [device, device];
5. fp32: the other families at the tests' small shapes (FLUX.2 with a reference latent, Qwen-Image with
   a ControlNet's additions, Wan 2.1 text to video, HunyuanVideo) as N = 2, 4 ranks through the node's
   adapters (host/sp_nodes.model_family) give the one-rank output to 1e-4, TF32 off: their RoPE,
   norms and attention on the device's kernels.

A part that raises is a FAIL row with its error; the other parts still run.

Host objects touched: comfy.ldm.flux.model.Flux and comfy.sd.VAE (built and called, never changed);
comfy_multigpu.host.sp_flux._Rank.attention (replaced for the contrast run of part 1, then restored);
torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 (off for parts 1 and 2's
fp32 reference, then restored).
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

from bench_sp import FAMILIES, FLUX_DEV, build_on_device, family_call, family_class, random_small  # noqa: E501
from gpu_checks import FAIL, PASS, SEED, Row, comfy_host

TOLERANCE = 1e-4                    # fp32: N ranks against one (tests/test_sequence_parallel.py)
BF16_FACTOR, BF16_EPSILON = 2.0, 1e-6
# The test fixture's Flux: 6 heads of 16 (over 4 ranks: 1, 2, 1, 2), 2 double and 2 single blocks.
SMALL_FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
                  hidden_size=96, mlp_ratio=4.0, num_heads=6, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6],
                  theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
# (latent height, width, text tokens): 10 x 6 latent = 5 x 3 = 15 image tokens + 7 text tokens (uneven
# over 3 and 4 ranks); on CUDA also 32 x 32 = 256 image + 77 text tokens (longer attention kernels).
SMALL_INPUTS = {"cpu": [(10, 6, 7)], "cuda": [(10, 6, 7), (32, 32, 77)]}
# Part 3: 1024 px = 128 x 128 latent (8x VAE) = 64 x 64 = 4096 image tokens + 512 T5 tokens (FLUX.1-dev's
# maximum); the dry run: 4 heads of 32, a few double and single blocks, 16 image + 8 text tokens.
TIMED = {"cuda": dict(flux=FLUX_DEV, latent=(128, 128), text=512, repeat=5, label="FLUX.1-dev 1024 px"),
         "cpu": dict(flux=dict(FLUX_DEV, vec_in_dim=32, context_in_dim=64, hidden_size=128, num_heads=4, depth=2,
                               depth_single_blocks=4, axes_dim=[4, 14, 14]),
                     latent=(8, 8), text=8, repeat=3, label="tiny FLUX (dry run)")}
TIMED_RANKS = (1, 2, 4)
# Part 4: the SD VAE's real config (tests/fixtures/make_tiny_checkpoint.VAE_DDCONFIG) on CUDA, the
# test's small one in the dry run; VAEDecodeTiled's defaults (512 px tiles, 64 px overlap) on CUDA.
TINY_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
VAE_CASE = {"cuda": dict(latent=(128, 128), tile_size=512, overlap=64),
            "cpu": dict(latent=(16, 12), tile_size=64, overlap=16)}


def check_sp(ctx) -> list:
    comfy_host(ctx)
    import torch
    if ctx["mode"] != "cuda":
        torch.set_num_threads(1)      # N rank threads on 2 shared cores: no OpenMP teams spinning against them
    state = {"device": ctx["device"], "cuda": ctx["mode"] == "cuda", "torch": torch}
    parts = [("8. sequence parallel, fp32: N ranks = one rank", part_fp32),
             ("8. sequence parallel, bf16: N ranks within bf16's noise floor", part_bf16),
             ("8. sequence parallel: one forward timed with 1, 2, 4 ranks", part_timing),
             ("8. sequence parallel: VAE tiles spread over 2 ranks = the host's tiled decode", part_vae),
             ("8. sequence parallel, fp32: FLUX.2, Qwen-Image, Wan, HunyuanVideo", part_families)]
    rows = []
    for title, part in parts:
        started = time.perf_counter()
        try:
            got = part(state)
        except Exception as ex:                    # this part's FAIL row; the others still run
            traceback.print_exc()
            got = [Row(title, FAIL, "-", f"{type(ex).__name__}: {str(ex).strip()[:400]}")]
        if state["cuda"]:
            torch.cuda.empty_cache()
        print(f"gpu_check_sp: {title}: {', '.join(r.result for r in got)} ({time.perf_counter() - started:.1f} s)",
              flush=True)
        rows += got
    return rows


# ---- the small model of parts 1 and 2 --------------------------------------------------------------

def small_flux(state):
    """The test fixture's Flux on the device in fp32, its fp32 one-rank outputs (TF32 off) and inputs."""
    if "small" in state:
        return state["small"]
    torch = state["torch"]
    from comfy.ldm.flux.model import Flux
    model = random_small(torch, Flux, SMALL_FLUX, state["device"], SEED)
    cases = [inputs(torch, state["device"], h, w, t, seed=i) for i, (h, w, t) in
             enumerate(SMALL_INPUTS["cuda" if state["cuda"] else "cpu"])]
    with tf32_off(torch, state["cuda"]) as tf32:
        expected = [one_rank(torch, model, args) for args in cases]
    state["small"] = (model, cases, expected, tf32)
    return state["small"]


def inputs(torch, device, height, width, tokens, seed=0, dtype=None, flux=SMALL_FLUX) -> dict:
    g = torch.Generator().manual_seed(SEED + seed)
    args = dict(x=torch.randn(1, flux["in_channels"], height, width, generator=g),
                context=torch.randn(1, tokens, flux["context_in_dim"], generator=g),
                y=torch.randn(1, flux["vec_in_dim"], generator=g))
    args = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in args.items()}
    return dict(args, timestep=torch.tensor([0.7], device=device), guidance=torch.tensor([3.5], device=device))


def tokens_of(args) -> str:
    return f"{(args['x'].shape[-2] // 2) * (args['x'].shape[-1] // 2)} image + {args['context'].shape[1]} text tokens"


def one_rank(torch, model, args, options=None):
    with torch.inference_mode():                   # as ComfyUI runs nodes
        return model._forward(args["x"], args["timestep"], args["context"], args["y"], args["guidance"],
                              transformer_options=options or {})


def n_ranks(torch, model, args, n, device, options=None):
    """(rank 0's output, the RankGroup) of parallel_forward with `model` N times on `device`."""
    from comfy_multigpu.host.sp_flux import parallel_forward
    with torch.inference_mode():
        return parallel_forward([model] * n, [device] * n, args["x"], args["timestep"], args["context"], args["y"],
                                args["guidance"], transformer_options=options or {})


def max_rel_error(got, expected) -> float:
    got, expected = got.float(), expected.float()
    if got.shape != expected.shape:
        raise RuntimeError(f"output shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    return ((got - expected).abs().max() / expected.abs().max()).item()


@contextlib.contextmanager
def tf32_off(torch, cuda: bool):
    """TF32 off for fp32 matmuls and convolutions on CUDA, restored after; yields what was set."""
    if not cuda:
        yield "no TF32 on the CPU"
        return
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield f"TF32 off, then restored (ComfyUI had matmul.allow_tf32 {before[0]}, cudnn.allow_tf32 {before[1]})"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def thread_modes(torch):
    """A post_input patch (it runs on every rank, before the split) that records each rank thread's
    inference mode, and the record."""
    seen = {}

    def probe(args):
        seen[threading.current_thread().name] = (torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        return args
    return {"patches": {"post_input": [probe]}}, seen


def judged(check: str, problems: list, figure: str, note: str) -> Row:
    """A row that passes without `problems`, and fails with them, listed before its note."""
    return Row(check, FAIL if problems else PASS, figure, "; ".join(problems + [note]))


def part_fp32(state) -> list:
    torch, device = state["torch"], state["device"]
    from comfy.ldm.modules import attention
    from comfy_multigpu.host import sp_flux
    model, cases, expected, _ = small_flux(state)
    errors, modes = {}, {}
    with tf32_off(torch, state["cuda"]) as tf32:
        for n in (2, 3, 4):
            options, seen = thread_modes(torch)
            errors[n] = max(max_rel_error(n_ranks(torch, model, args, n, device, options)[0], want)
                            for args, want in zip(cases, expected))
            modes.update(seen)
        original = sp_flux._Rank.__dict__["attention"]

        def local_only(self, func, q, k, v, heads, *args, **kwargs):    # each rank attends to its own tokens
            return func(q, k, v, heads, *args, **kwargs)
        sp_flux._Rank.attention = local_only
        try:
            broken = max_rel_error(n_ranks(torch, model, cases[0], 2, device)[0], expected[0])
        finally:
            sp_flux._Rank.attention = original
    problems = [f"N = {n}: {e:.1e} >= {TOLERANCE:g}" for n, e in errors.items() if not e < TOLERANCE]
    if not broken > 100 * TOLERANCE:
        problems.append(f"attention over local tokens only passed the check ({broken:.1e}): the check cannot fail")
    inference = sorted(name for name, (inf, _) in modes.items() if inf)
    grad = sorted(name for name, (_, on) in modes.items() if on)
    return [judged(f"8. sequence parallel, fp32: N ranks on {device} = one rank", problems,
                   "max rel error " + ", ".join(f"N={n} {e:.1e}" for n, e in errors.items())
                   + f" (< {TOLERANCE:g}); local-only attention, N=2: {broken:.1e} (must be > {100 * TOLERANCE:g})",
                   f"ComfyUI Flux, hidden 96, 6 heads, 2 double + 2 single blocks, random weights, q/k norm "
                   f"scales 1, fp32; {' and '.join(tokens_of(a) for a in cases)} (tokens and heads uneven over 3 "
                   f"and 4); parallel_forward over [{device}] x N against the one-rank Flux._forward; {tf32}; "
                   f"attention {attention.optimized_attention.__name__}; called in inference mode, as ComfyUI runs "
                   f"nodes: inference mode on in {', '.join(inference) or 'no rank thread'}, grad mode on in "
                   f"{', '.join(grad) or 'no rank thread'}")]


def part_bf16(state) -> list:
    torch, device = state["torch"], state["device"]
    model, cases, expected, tf32 = small_flux(state)
    half = copy.deepcopy(model).to(torch.bfloat16)
    problems, figures, notes = [], [], []
    for args, reference in zip(cases, expected):
        args = {k: v.to(torch.bfloat16) if k in ("x", "context", "y") else v for k, v in args.items()}
        single = one_rank(torch, half, args)
        floor = max_rel_error(single, reference)
        sp = {n: n_ranks(torch, half, args, n, device)[0] for n in (2, 4)}
        error = {n: max_rel_error(out, reference) for n, out in sp.items()}
        within = {n: max_rel_error(out, single) for n, out in sp.items()}
        bound = BF16_FACTOR * floor + BF16_EPSILON
        problems += [f"{tokens_of(args)}, N = {n}: {e:.1e} > {bound:.1e}" for n, e in error.items() if e > bound]
        figures.append(f"{tokens_of(args)}: floor {floor:.1e}; " + ", ".join(f"N={n} {e:.1e}" for n, e in error.items()))
        notes.append(f"{tokens_of(args)}: " + ", ".join(f"N={n} {e:.1e}" for n, e in within.items()))
    return [judged(f"8. sequence parallel, bf16: N ranks on {device} within 2x bf16's noise floor",
                   problems, "max rel error vs fp32: " + "; ".join(figures),
                   f"the model of the row above cast to bf16 (inputs too); noise floor = bf16 one rank vs the "
                   f"fp32 one-rank output ({tf32}); pass: N ranks <= {BF16_FACTOR:g}x floor + {BF16_EPSILON:g}; bf16 "
                   f"N ranks vs bf16 one rank: " + "; ".join(notes))]


# ---- part 3: one forward timed ---------------------------------------------------------------------

def time_forwards(torch, model, args, device: str, repeat: int, cuda: bool) -> dict:
    """{N: ([(host s, total s, RankGroup or None) per run], the last output)} for each N of TIMED_RANKS,
    a warm-up first; host = until the call returns, total = until the device is done."""
    def sync():
        if cuda:
            torch.cuda.synchronize(device)
    measured = {}
    for n in TIMED_RANKS:
        def call():
            return (one_rank(torch, model, args), None) if n == 1 else n_ranks(torch, model, args, n, device)
        call()                                                    # warm-up (kernel choice, allocator)
        runs = []
        for _ in range(repeat):
            sync()
            started = time.perf_counter()
            out, group = call()
            host = time.perf_counter() - started                  # dispatched: the call has returned
            sync()
            runs.append((host, time.perf_counter() - started, group))
        measured[n] = (runs, out)
    return measured


def part_timing(state) -> list:
    torch, device, cuda = state["torch"], state["device"], state["cuda"]
    case = TIMED["cuda" if cuda else "cpu"]
    config, label = case["flux"], case["label"]
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model = build_on_device(config, device, SEED)
    try:
        size = sum(p.nbytes for p in model.parameters())
        args = inputs(torch, device, *case["latent"], case["text"], dtype=torch.bfloat16, flux=config)
        measured = time_forwards(torch, model, args, device, case["repeat"], cuda)
        peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    finally:
        del model                                                 # about 24 GB on CUDA
        if cuda:
            torch.cuda.empty_cache()
    shape = (f"bf16, hidden {config['hidden_size']}, {config['num_heads']} heads, {config['depth']} double + "
             f"{config['depth_single_blocks']} single blocks ({size / 2 ** 30:.2f} GiB of random weights built on "
             f"{device}), latent 1x{config['in_channels']}x{'x'.join(map(str, case['latent']))} = {tokens_of(args)}; "
             f"median of {case['repeat']} after a warm-up; host = until the call returns, before synchronising (the "
             f"dispatch; it waits on the device only when the launch queue is full)")
    one = measured[1][1]
    rows = []
    for n, (runs, out) in measured.items():
        total, host = (statistics.median(r[i] for r in runs) for i in (1, 0))
        note = [shape] if n == 1 else ["the model, tokens and timing of the 1-rank row"]
        if n > 1:
            groups = [r[2] for r in runs]
            sent = statistics.mean(groups[-1].sent) / 2 ** 20
            waited = statistics.median(statistics.mean(g.waited) for g in groups)
            note += [f"{groups[-1].exchanges} exchanges, {sent:.1f} MiB sent per rank (what separate GPUs would "
                     f"copy; on one device nothing is copied), {1000 * waited:.1f} ms at the barriers per rank",
                     f"max rel error vs 1 rank {max_rel_error(out, one):.1e} (bf16)",
                     f"{n} ranks share one {'GPU' if cuda else 'CPU'}: the device time does not shrink; this row "
                     f"measures the host side and the exchanges' overhead"]
        if cuda:
            note.append(f"peak allocated {peak / 2 ** 30:.1f} GiB (all three)")
        rows.append(Row(f"8. sequence parallel: {label} forward, {n} rank{'s' if n > 1 else ''} on {device}", PASS,
                        f"{1000 * total:.0f} ms per forward; host {1000 * host:.0f} ms", "; ".join(note)))
    return rows


# ---- part 4: VAE decode spread over the ranks ------------------------------------------------------

def node_tiles(vae, tile_size: int, overlap: int) -> dict:
    """decode_tiled's arguments as nodes.VAEDecodeTiled.decode computes them for an image VAE."""
    if tile_size < overlap * 4:
        overlap = tile_size // 4
    compression = vae.spacial_compression_decode()
    return {"tile_x": tile_size // compression, "tile_y": tile_size // compression, "overlap": overlap // compression}


def random_vae(torch, ddconfig: dict):
    """A comfy.sd.VAE as the host builds one from a checkpoint, its device and dtype the host's choice,
    with random weights (the test's: matrices 1/sqrt(fan in), biases 0.02, norm scales 1)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    with torch.device("meta"):
        shapes = AutoencoderKL(ddconfig=ddconfig, embed_dim=4).state_dict()
    g = torch.Generator().manual_seed(SEED)
    weights = {name: torch.randn(t.shape, generator=g) * 0.02 if name.endswith("bias") else
               torch.ones(t.shape) if t.ndim == 1 else torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5
               for name, t in shapes.items()}
    return comfy.sd.VAE(sd=weights, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})


def part_vae(state) -> list:
    torch, device, cuda = state["torch"], state["device"], state["cuda"]
    import comfy.sd
    from comfy_multigpu.host.sp_vae import spread_decode_tiled
    case = VAE_CASE["cuda" if cuda else "cpu"]
    if cuda:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
        from make_tiny_checkpoint import VAE_DDCONFIG as ddconfig
    else:
        ddconfig = TINY_VAE
    vae = random_vae(torch, ddconfig)
    tiles = node_tiles(vae, case["tile_size"], case["overlap"])
    latent = torch.randn(1, 4, *case["latent"], generator=torch.Generator().manual_seed(SEED))

    def timed(call):
        started = time.perf_counter()
        with torch.inference_mode():                              # as ComfyUI runs nodes
            out = call()
        if cuda:
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - started
    timed(lambda: vae.decode_tiled(latent, **tiles))              # warm-up: loads the VAE onto its device
    expected, host_s = timed(lambda: vae.decode_tiled(latent, **tiles))
    (got, result), spread_s = timed(lambda: spread_decode_tiled(comfy.sd.VAE.decode_tiled, vae, latent,
                                                                [device, device], **tiles))
    on = sorted({str(p.device) for p in vae.first_stage_model.parameters()})
    problems = []
    if on != [str(torch.device(device))] or str(torch.device(vae.device)) != str(torch.device(device)):
        problems.append(f"the VAE ran on {vae.device} with its weights on {on}, expected {device}")
    if got.shape != expected.shape:
        problems.append(f"images of shape {tuple(got.shape)}, the host's {tuple(expected.shape)}")
        diff = rel = float("inf")
    else:
        diff = (got.float() - expected.float()).abs().max().item()
        rel = diff / max(expected.float().abs().max().item(), 1e-30)
    if rel > 1e-6:
        problems.append(f"max abs difference {diff:.1e} ({rel:.1e} relative) > 1e-6 relative")
    if result.missed or len(result.per_rank) != 2 or min(result.per_rank) == 0:
        problems.append(f"tiles per rank {result.per_rank}, {result.missed} decoded again at the replay")
    equal = "bit-identical" if diff == 0 else \
        f"max abs difference {diff:.1e} ({rel:.1e} relative, {'within' if rel <= 1e-6 else 'over'} 1e-6)"
    width = f"ch {ddconfig['ch']}, ch_mult {ddconfig['ch_mult']}, {ddconfig['num_res_blocks']} res blocks"
    return [judged(f"8. sequence parallel: VAE decode, tiles over [{device}, {device}] = the host's decode_tiled",
                   problems,
                   f"{equal}; host {1000 * host_s:.0f} ms, spread {1000 * spread_s:.0f} ms; tiles per rank "
                   f"{'/'.join(map(str, result.per_rank))}",
                   f"SD VAE ({width}), random weights, on {vae.device} in {str(vae.vae_dtype).replace('torch.', '')} "
                   f"(ComfyUI's choice); latent {'x'.join(map(str, latent.shape))} -> images "
                   f"{'x'.join(map(str, expected.shape))}; comfy.sd.VAE.decode_tiled with VAEDecodeTiled's arithmetic "
                   f"for tile_size {case['tile_size']}, overlap {case['overlap']} px (tile_x/tile_y {tiles['tile_x']}, "
                   f"overlap {tiles['overlap']}) against spread_decode_tiled over 2 ranks on one device (it runs the "
                   f"host's tiling code twice, to record and to replay; ranks sharing one GPU decode no faster than "
                   f"one); the host's decode timed after a warm-up")]


# ---- part 5: the other model families --------------------------------------------------------------

def part_families(state) -> list:
    torch, device = state["torch"], state["device"]
    from comfy_multigpu.host.sp_nodes import model_family
    errors, problems = {}, []
    with tf32_off(torch, state["cuda"]) as tf32:
        for name, (module, cls, config) in FAMILIES.items():
            model = random_small(torch, family_class(module, cls), config, device, SEED)
            args, kwargs = family_call(torch, name, device, SEED)
            with torch.inference_mode():
                expected = model._forward(*args, transformer_options={}, **kwargs)
                for n in (2, 4):
                    why, run = model_family(model)[1](model, args, dict(kwargs))
                    if why(n) is not None:
                        problems.append(f"{name}, N = {n}: falls back: {why(n)}")
                        continue
                    errors[name, n] = max_rel_error(run([model] * n, [device] * n, None, None)[0], expected)
    problems += [f"{name}, N = {n}: {e:.1e} >= {TOLERANCE:g}" for (name, n), e in errors.items() if not e < TOLERANCE]
    return [judged(f"8. sequence parallel, fp32: FLUX.2, Qwen-Image, Wan, HunyuanVideo as N ranks on {device} = "
                   "one rank", problems,
                   "max rel error " + ", ".join(f"{name} N={n} {e:.1e}" for (name, n), e in errors.items())
                   + f" (< {TOLERANCE:g})",
                   "ComfyUI's classes at the tests' small shapes (6 heads, uneven token and head splits), random "
                   f"weights, fp32, through the SequenceParallel node's adapters; FLUX.2 with a reference latent, "
                   f"Qwen-Image with ControlNet additions; {tf32}")]
