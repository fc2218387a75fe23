"""The checks of the GPU check (bench/gpu_check.py, the driver): each takes the run's context and
returns table rows; the driver runs each in a child process with a timeout. Checks 1, 2 and 6 use one
real server; 3 and 4 run ComfyUI's classes in the child; 5 reuses bench_gil.py."""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))                                  # comfy_multigpu
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import workflows as wf  # noqa: E402
from helpers.comfy_server import ComfyServer  # noqa: E402
from shared import comfyui_dir  # noqa: E402

PASS, FAIL, SKIP = "PASS", "FAIL", "skipped: needs CUDA"
HOLD_S = 6.0        # how long GPU 1 holds its model while GPU 0 is freed (check 2)
SEED = 20261201


@dataclass
class Row:
    check: str
    result: str
    figure: str = "-"
    note: str = ""


# ---- checks 1, 2, 6: one real server --------------------------------------------------------------

def start_server(mode: str, base: Path, timeout: float) -> ComfyServer:
    from bench_weights import fixtures
    device = "cuda:0" if mode == "cuda" else "cpu"
    return ComfyServer(comfyui_dir(), base, workers=2, env={"COMFY_MULTIGPU_DEVICES": f"{device},{device}"},
                       fixtures=fixtures(), cpu=mode != "cuda").start(timeout)


def client(ctx) -> ComfyServer:
    """ComfyServer's HTTP helpers on the driver's running server."""
    server = ComfyServer(Path(ctx["comfyui_dir"]), Path(ctx["base"]))
    server.url = ctx["url"]
    return server


def wait_for(what: str, condition, timeout: float):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.05)
    return value


def run_on(server, prompt: dict, gpu: int, timeout: float = 120.0) -> dict:
    pid = server.submit(prompt, gpu=gpu)["prompt_id"]
    entry = server.wait(pid, timeout)[pid]
    if entry["status"]["status_str"] != "success" or entry.get("gpu_id") != gpu:
        raise RuntimeError(f"prompt on GPU {gpu}: {entry['status']['status_str']} on GPU {entry.get('gpu_id')}")
    return entry


def check_binding(ctx) -> list:
    server, device = client(ctx), ctx["device"]
    problems = []
    listed = [q["device"] for q in server.get("/queue/all", counts=1)["queues"]]
    if listed != [device, device]:
        problems.append(f"/queue/all lists {listed}, expected {[device, device]}")
    for gpu in (0, 1):
        entry = run_on(server, wf.probe(f"gpu-check-{gpu}"), gpu)
        for where in ("here", "helper"):
            facts = wf.ui(entry, "1", where)
            seen = (facts["gpu"], facts["device"], facts["all_devices"], facts["device_is_worker_device"])
            if seen != (gpu, device, [device], True):
                problems.append(f"GPU {gpu} {where}: worker, device, all devices, is the worker's = {seen}")
    return [Row(f"1. worker device binding ({device},{device})", FAIL if problems else PASS,
                f"/queue/all: {', '.join(listed)}; probes on GPU 0 and 1 saw {device}",
                "; ".join(problems) or "in the worker thread and in a helper thread")]


def check_freeing(ctx) -> list:
    server, cuda = client(ctx), ctx["mode"] == "cuda"

    def devices():
        return next((m["devices"] for m in server.get("/multigpu/models")["models"] if m["name"] == wf.CHECKPOINT), [])

    def free_after_a_prompt(gpu):       # a worker reads its device's free memory after each prompt
        run_on(server, wf.sleep(0.0), gpu)
        return server.get("/queue/all", counts=1)["queues"][gpu]["free_memory"]

    run_on(server, wf.hold_model(0.0), 0, timeout=300)
    held = server.submit(wf.hold_model(HOLD_S), gpu=1)["prompt_id"]
    wait_for("the checkpoint on both workers' devices", lambda: sorted(devices()) == [0, 1], 120)
    before = free_after_a_prompt(0)
    started = time.perf_counter()
    server.post("/free", {"unload_models": True}, headers={"X-TARGET-GPU": "0"})
    wait_for("GPU 0's copy unloaded", lambda: 0 not in devices(), 30)
    freed_s = time.perf_counter() - started
    left, still_holding = devices(), held not in server.get(f"/history/{held}")
    after = free_after_a_prompt(0)
    stayed = wf.ui(server.wait(held, 60)[held], "2", "stayed_loaded")
    problems = [] if still_holding else [f"GPU 1's {HOLD_S:g} s hold ended before /free was handled"]
    if left != [1] or stayed is not True:
        problems.append(f"after /free on GPU 0 the checkpoint is on {left}, GPU 1's copy stayed loaded: {stayed}")
    figure = f"GPU 0's copy unloaded {1000 * freed_s:.0f} ms after POST /free, GPU 1's kept"
    if cuda:
        figure += f"; {(after - before) / 2 ** 20:.0f} MiB of cuda:0 came free"
    return [Row("2. per-device freeing (POST /free for GPU 0 while GPU 1 holds its model)",
                FAIL if problems else PASS, figure, "; ".join(problems) or "tiny SD1.5 checkpoint, both workers")]


def check_quick(ctx) -> list:
    from comfy_multigpu.tools.quick_check import run_checks
    started = time.perf_counter()
    results = run_checks(ctx["url"], 60.0)
    failed = [f"{name}: {detail}" for name, ok, detail in results if not ok]
    return [Row("6. quick end-to-end test (scripts/quick_test.sh)", FAIL if failed else PASS,
                f"{len(results) - len(failed)} passed, {len(failed)} failed in {time.perf_counter() - started:.1f} s",
                "; ".join(failed))]


def check_process(ctx) -> list:
    """7. Process workers on the device: a server with COMFY_MULTIGPU_WORKER_MODE=process and two
    workers on one device; each child owns it (CUDA_VISIBLE_DEVICES), the checkpoint is loaded once
    and mapped by both children, and a txt2img runs on each."""
    from bench_weights import fixtures
    cuda = ctx["mode"] == "cuda"
    device = ctx["device"]
    env = {"COMFY_MULTIGPU_DEVICES": f"{device},{device}", "COMFY_MULTIGPU_WORKER_MODE": "process"}
    server = ComfyServer(comfyui_dir(), Path(ctx["base"]).parent / "process-server", workers=2, env=env,
                         fixtures=fixtures(), cpu=not cuda)
    started = time.perf_counter()
    server.start(240 if cuda else 150)
    try:
        up_s = time.perf_counter() - started
        children = [q["process"]["device"] for q in server.get("/queue/all", counts=1)["queues"]]
        took = []
        for gpu in (0, 1):
            t0 = time.perf_counter()
            run_on(server, wf.txt2img(SEED + gpu, prefix=f"gpu-check-process{gpu}"), gpu, timeout=300)
            took.append(time.perf_counter() - t0)
        listed = [m for m in server.get("/multigpu/models")["models"] if m["name"] == wf.CHECKPOINT]
    finally:
        server.stop()
    problems = []
    if children != [device, device]:
        problems.append(f"children report devices {children}, expected {[device, device]}")
    if len(listed) != 1 or listed[0]["loads"] != 1 or listed[0]["users"] != [0, 1]:
        problems.append(f"checkpoint not loaded once and mapped by both children: {listed}")
    size = listed[0]["bytes"] / 2 ** 20 if listed else 0
    return [Row("7. process workers (two children on one device)", FAIL if problems else PASS,
                f"up in {up_s:.0f} s; children on {', '.join(children)}; checkpoint {size:.0f} MiB loaded once, "
                f"mapped by both; txt2img {took[0]:.1f} s (loads it) / {took[1]:.1f} s (maps it)",
                "; ".join(problems) or "COMFY_MULTIGPU_WORKER_MODE=process")]


# ---- checks 3, 4: ComfyUI's classes in this process -----------------------------------------------

def comfy_host(ctx) -> None:
    """ComfyUI's modules configured as main.py configures them: on the GPU with DynamicVRAM off, as the
    extension runs it."""
    sys.path.insert(0, ctx["comfyui_dir"])
    os.chdir(ctx["comfyui_dir"])
    sys.argv = ["main.py", "--disable-dynamic-vram"] if ctx["mode"] == "cuda" else ["main.py", "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()


def template_in_ram(mm, template) -> str:
    """ComfyUI builds a diffusion model straight on the GPU when the GPU has more free memory than the
    host (model_management.unet_inital_load_device, sd.py "loaded diffusion model directly to GPU"); a
    template measured here must be in RAM, as the RAM cache means it. Says so when it had to move it."""
    def on_gpu():
        return any(t.device.type != "cpu" for t in template[0].model.parameters())
    if not on_gpu():
        return ""
    mm.unload_all_models()
    if on_gpu():
        raise RuntimeError("the template's UNet is still on the GPU after unload_all_models")
    return "ComfyUI built the UNet template on the GPU (more free VRAM than RAM) and it was unloaded to RAM first; "


def check_pinned(ctx) -> list:
    comfy_host(ctx)
    import torch
    import comfy.model_management as mm
    import comfy.sd
    from comfy_multigpu.host import patching
    from comfy_multigpu.runtime import weight_views
    from comfy_multigpu.runtime.pool import WorkerPool
    title, device = "3. pinned host memory shared by views", ctx["device"]
    if mm.MAX_PINNED_MEMORY <= 0:
        return [Row(title, FAIL, "-", f"ComfyUI pins nothing here (MAX_PINNED_MEMORY {mm.MAX_PINNED_MEMORY})")]
    from bench_weights import fixtures
    template = comfy.sd.load_checkpoint_guess_config(str(fixtures() / wf.CHECKPOINT), output_vae=True,
                                                     output_clip=True, embedding_directory=[])
    moved = template_in_ram(mm, template)
    a, b = (dict(weight_views.make_view(template)[0].model.named_parameters()) for _ in range(2))
    names, ptrs = [], set()
    for name, t in sorted(a.items(), key=lambda kv: -kv[1].nbytes):
        if t.data_ptr() == b[name].data_ptr() and t.is_contiguous() and t.data_ptr() not in ptrs:
            names.append(name)
            ptrs.add(t.data_ptr())
        if len(names) == 16:
            break
    size = sum(a[n].nbytes for n in names)
    _, specs = patching.load_manifest()
    pool = WorkerPool([(torch.device(device), device)] * 2)
    patches = patching.PatchSet([s for s in specs if s.id in ("weights-pin", "weights-unpin")], pool)
    registered = len(mm.PINNED_MEMORY)
    patches.apply()
    try:
        facts = {"pinned through view a": all(mm.pin_memory(a[n]) for n in names),
                 "view b sees its pages pinned": all(b[n].is_pinned() for n in names),
                 "pinned through view b": all(mm.pin_memory(b[n]) for n in names),
                 "one registration per tensor": len(mm.PINNED_MEMORY) - registered == len(names)
                 and all(pool.pin_counts.counts.get(p) == 2 for p in ptrs)}
        copied = [b[n].to(device, non_blocking=True) for n in names]
        torch.cuda.synchronize(device)
        facts["copies from the pinned pages are exact"] = all(torch.equal(c.cpu(), b[n]) for c, n in zip(copied, names))
        facts["a unpins"] = all(mm.unpin_memory(a[n]) for n in names)
        facts["b still pinned after a unpins"] = all(b[n].is_pinned() for n in names)
        facts["b unpins"] = all(mm.unpin_memory(b[n]) for n in names)
        facts["unregistered after the last unpin"] = not any(b[n].is_pinned() for n in names) \
            and len(mm.PINNED_MEMORY) == registered
    finally:
        patches.revert()
    # ComfyUI's own functions, for contrast: the second pin is refused, the first unpin unregisters.
    n = names[0]
    stock = (mm.pin_memory(a[n]), mm.pin_memory(b[n]), mm.unpin_memory(a[n]), b[n].is_pinned())
    wrong = [k for k, v in facts.items() if not v]
    return [Row(title, FAIL if wrong else PASS,
                f"{len(names)} tensors ({size / 2 ** 20:.0f} MiB) pinned through 2 views: "
                f"{len(names)} registrations",
                ("not true: " + ", ".join(wrong) + "; " if wrong else "") + moved + "stock functions: pin a "
                f"{stock[0]}, pin b {stock[1]}, unpin a {stock[2]}, b pinned after {stock[3]}")]


SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], num_heads=8, context_dim=768,
                 use_spatial_transformer=True, use_linear_in_transformer=False, legacy=False, adm_in_channels=None,
                 use_checkpoint=False, use_temporal_attention=False, use_temporal_resblock=False)


def sd15_state_dict(draw_on: str) -> dict:
    """A random SD1.5 checkpoint in RAM as the loader reads one: fp16, the real shapes (UNet 860M
    parameters, CLIP-L, VAE; about 2.1 GB), checkpoint keys; the values drawn on `draw_on`."""
    import torch
    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    sys.path.insert(0, str(REPO / "tests" / "fixtures"))
    from make_tiny_checkpoint import VAE_DDCONFIG
    with torch.device("meta"):
        parts = {"model.diffusion_model.": UNetModel(**SD15_UNET, operations=comfy.ops.disable_weight_init),
                 "first_stage_model.": AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4),
                 "cond_stage_model.": comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)}
    generator = torch.Generator(draw_on).manual_seed(SEED)
    return {prefix + name: (torch.randn(t.shape, generator=generator, device=draw_on, dtype=torch.float16) * 0.02).cpu()
            for prefix, module in parts.items() for name, t in module.state_dict().items()
            if t.is_floating_point() and "position_ids" not in name}


def copy_rate(nbytes: int, device: str, pinned: bool) -> float:
    """GB/s of a plain host-to-device copy of one `nbytes` tensor, best of 3."""
    import torch
    host = torch.ones(nbytes, dtype=torch.uint8)
    host = host.pin_memory() if pinned else host
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        dev.copy_(host, non_blocking=pinned)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return nbytes / best / 1e9


def check_vram(ctx) -> list:
    comfy_host(ctx)
    import torch
    import comfy.model_management as mm
    import comfy.sd
    from comfy_multigpu.runtime import weight_views
    device = ctx["device"]
    torch.ones(1, device=device)                          # CUDA initialised before anything is timed
    template = comfy.sd.load_state_dict_guess_config(sd15_state_dict(device), output_vae=True, output_clip=True,
                                                     embedding_directory=None)
    moved = template_in_ram(mm, template)
    view = weight_views.make_view(template)               # what a worker gets from the RAM cache
    patchers = [view[0], view[1].patcher, view[2].patcher]
    parts = {label: [t for t in (*p.model.parameters(), *p.model.buffers())] for label, p in
             zip(("UNet", "CLIP-L", "VAE"), patchers)}
    nbytes = sum(t.nbytes for ts in parts.values() for t in ts if t.device.type == "cpu")
    where = "; ".join(f"{label} {ts[0].dtype} {sum(t.nbytes for t in ts) / 1e9:.2f} GB".replace("torch.", "")
                      + ("" if all(t.device.type == "cpu" for t in ts) else " (partly on the GPU: its RAM part counted)")
                      for label, ts in parts.items())
    if not nbytes:
        raise RuntimeError(f"nothing of the view was in RAM to move: {where}")
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    mm.load_models_gpu(patchers)
    torch.cuda.synchronize(device)
    load_s = time.perf_counter() - started
    tensors = [t for p in patchers for t in (*p.model.parameters(), *p.model.buffers())]
    problems = [what for what, ok in (
        ("not every tensor reached the device", all(t.device.type == "cuda" for t in tensors)),
        ("the template left RAM", all(t.device.type == "cpu" for t in template[0].model.parameters()))) if not ok]
    pageable, pinned = copy_rate(nbytes, device, False), copy_rate(nbytes, device, True)
    load = nbytes / load_s / 1e9
    size = f"{nbytes / 1e9:.2f} GB"
    return [Row("4. RAM -> VRAM: SD1.5-size random checkpoint, a view of the RAM template, load_models_gpu",
                FAIL if problems else PASS, f"{size} in {load_s:.2f} s: {load:.1f} GB/s",
                "; ".join(problems + [f"{100 * load / pageable:.0f}% of the pageable copy, {100 * load / pinned:.0f}% "
                                      f"of the pinned one; {moved}{where}"])),
            Row("4. host-to-device plain tensor copy, pageable", PASS, f"{pageable:.1f} GB/s", f"{size}, best of 3"),
            Row("4. host-to-device plain tensor copy, pinned", PASS, f"{pinned:.1f} GB/s", f"{size}, best of 3")]


# ---- check 5: the host ceiling ---------------------------------------------------------------------

def check_ceiling(ctx) -> list:
    import bench_gil
    c, device = ctx["ceiling"], ctx["device"]
    results = bench_gil.measure(c["models"], c["workers"], c["seconds"], c["repeat"], device)
    counts, top = "/".join(map(str, c["workers"])), max(c["workers"])
    rows = []

    def rates(runs):
        return " / ".join(f"{statistics.median(runs[n]):.1f}" for n in c["workers"])
    for key, r in results.items():
        ratio = statistics.median(r["threads"][top]) / statistics.median(r["procs"][top])
        host = "ms to queue a forward" if device != "cpu" else "host ms per forward"
        rows.append(Row(f"5. host ceiling: {bench_gil.SPECS[key].label} on {device}", PASS,
                        f"forwards/s, threads {counts}: {rates(r['threads'])}; processes {counts}: {rates(r['procs'])}",
                        f"{r['ops']} aten ops, {statistics.median(r['host']):.1f} {host}; {top} threads / {top} "
                        f"processes {ratio:.2f}; {c['seconds']:g} s windows x {c['repeat']}"))
    return rows


