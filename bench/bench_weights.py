"""Shared model weights, side by side in one run (real ComfyUI servers on this machine's CPU, the tiny
SD1.5-shaped checkpoint from tests/fixtures, a 64x64 4-step txt2img):

1. RSS (settled: idle, after the housekeeping pass) of one comfy-multigpu process after 1 and after 4
   workers ran the workflow, the same with the sharing off, and 4 stock ComfyUI processes each having
   run it once, against 1 stock process.
2. First-prompt latency: the time until a worker has the checkpoint on its device, for a cold load
   from disk (the file's pages dropped from the page cache first) on GPU 0, for the file already in
   the RAM cache on GPU 1, and on GPU 2 after POST /preload.

    scripts/run_bench.sh bench/bench_weights.py [--write]

--write replaces the "weights" section of docs/benchmarks.md with the results.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import workflows as wf  # noqa: E402
from helpers.comfy_server import ComfyServer  # noqa: E402
from shared import comfyui_dir, write_section  # noqa: E402

MIB = 2 ** 20


def fixtures() -> Path:
    """The tiny checkpoint, generated into the cache like the test suite does (same key)."""
    import hashlib
    script = REPO / "tests" / "fixtures" / "make_tiny_checkpoint.py"
    cache = Path(os.environ.get("COMFY_MULTIGPU_CACHE", Path.home() / ".cache" / "comfy-multigpu"))
    out = cache / "fixtures" / hashlib.sha256(script.read_bytes()).hexdigest()[:12]
    if not (out / wf.CHECKPOINT).exists():
        subprocess.run([sys.executable, str(script), str(comfyui_dir()), str(out)], check=True,
                       stdout=subprocess.DEVNULL)
    return out


def start(name, base, **kw):
    return ComfyServer(comfyui_dir(), Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base)),
                       fixtures=fixtures(), **kw).start()


def settled_rss(servers) -> int:
    for s in servers:
        s.wait_idle(600)
    samples = []
    for _ in range(12):           # the housekeeping pass (GC, heap trim) runs within 10 s of a prompt
        samples.append(sum(psutil.Process(s.proc.pid).memory_info().rss for s in servers))
        time.sleep(1.0)
    return min(samples)


def run(server, gpu=None, seed=1) -> float:
    """One txt2img; returns its run time in seconds (execution_start -> execution_success)."""
    pid = server.submit(wf.txt2img(seed, prefix="bench"), gpu=gpu)["prompt_id"]
    entry = server.wait(pid, timeout=600)[pid]
    assert entry["status"]["status_str"] == "success", entry["status"]
    messages = dict(entry["status"]["messages"])
    return (messages["execution_success"]["timestamp"] - messages["execution_start"]["timestamp"]) / 1000


def drop_page_cache(path: Path) -> None:
    fd = os.open(os.path.realpath(path), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def rss_rows(base) -> dict:
    out = {}
    for label, env in (("shared", {}), ("off", {"COMFY_MULTIGPU_RAM_CACHE": "off"})):
        server = start(f"rss-{label}", base, workers=4, env=env)
        try:
            run(server, 0)
            out[f"{label}1"] = settled_rss([server])
            for gpu in (1, 2, 3):
                run(server, gpu)
            out[f"{label}4"] = settled_rss([server])
        finally:
            server.stop()
    procs = [start(f"stock{i}", base, workers=None, env={"COMFY_MULTI_GPU_SCHED": "0"}) for i in range(4)]
    try:
        run(procs[0])
        out["stock1"] = settled_rss(procs[:1])
        for p in procs[1:]:
            run(p)
        out["stock4"] = settled_rss(procs)
    finally:
        for p in procs:
            p.stop()
    return out


def run_load(server, gpu) -> float:
    """CheckpointLoaderSimple -> onto the worker's device (MGHoldModel, 0 s): the load a first prompt waits for."""
    pid = server.submit(wf.hold_model(0.0), gpu=gpu)["prompt_id"]
    entry = server.wait(pid, timeout=600)[pid]
    assert entry["status"]["status_str"] == "success", entry["status"]
    messages = dict(entry["status"]["messages"])
    return (messages["execution_success"]["timestamp"] - messages["execution_start"]["timestamp"]) / 1000


def latency_rows(base, rounds: int = 3) -> dict:
    """Per round a fresh 4-worker server: every worker warmed with a model-free prompt, then the
    checkpoint loaded cold on GPU 0 (page cache dropped), from the RAM cache on GPU 1, after
    /preload on GPU 2, and again on GPU 0 (the worker's own node cache: the floor)."""
    out = {"cold": [], "ram": [], "preload": [], "cached": [], "preload_call": []}
    for r in range(rounds):
        server = start(f"latency{r}", base, workers=4)
        try:
            server.wait([server.submit(wf.sleep(0.01, g), gpu=g)["prompt_id"] for g in range(4)])
            drop_page_cache(server.base / "models" / "checkpoints" / wf.CHECKPOINT)
            out["cold"].append(run_load(server, 0))
            out["ram"].append(run_load(server, 1))
            t = time.perf_counter()
            server.post("/preload", {"model": wf.CHECKPOINT, "type": "checkpoint", "gpus": [2]})
            out["preload_call"].append(time.perf_counter() - t)
            out["preload"].append(run_load(server, 2))
            out["cached"].append(run_load(server, 0))
        finally:
            server.stop()
    return {k: statistics.median(v) for k, v in out.items()}


def report(rss: dict, lat: dict) -> str:
    size = (fixtures() / wf.CHECKPOINT).stat().st_size
    lines = [f"Run {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores ({platform.machine()}), "
             f"{psutil.virtual_memory().total / 2 ** 30:.0f} GiB RAM; tiny SD1.5-shaped checkpoint "
             f"({size / MIB:.0f} MiB file, fp16; fp32 once loaded on the CPU), 64x64 txt2img, 4 steps.",
             "", "RSS after the workflow ran (settled), MiB:", "",
             "| setup | after 1 ran | after 4 ran | 4 / 1 |", "|---|---|---|---|"]
    for label, key in (("comfy-multigpu, 4 workers, weights shared", "shared"),
                       ("comfy-multigpu, 4 workers, COMFY_MULTIGPU_RAM_CACHE=off", "off"),
                       ("stock ComfyUI processes (1, then 4 processes summed)", "stock")):
        one, four = rss[f"{key}1"], rss[f"{key}4"]
        lines.append(f"| {label} | {one / MIB:.0f} | {four / MIB:.0f} | {four / one:.2f} |")
    lines += ["", f"Shared: 4 workers cost {(rss['shared4'] - rss['shared1']) / MIB:.0f} MiB more than 1 "
              f"({(rss['shared4'] - rss['shared1']) / size:.0%} of the file; goal: ratio <= 1.10). 4 stock "
              f"processes use {rss['stock4'] / rss['shared4']:.2f}x the RSS of one process with 4 workers.",
              "", "Time until a worker has the checkpoint loaded on its device (a prompt of CheckpointLoaderSimple ->"
              " MGHoldModel(0 s), run time; median of 3 fresh servers, workers warmed with a model-free prompt):",
              "", "| on | seconds | vs cold load |", "|---|---|---|"]
    for label, key in (("GPU 0, cold load from disk (page cache dropped)", "cold"),
                       ("GPU 1, file already in the RAM cache", "ram"),
                       ("GPU 2, after POST /preload", "preload"),
                       ("GPU 0 again (its own node cache: the floor)", "cached")):
        lines.append(f"| {label} | {lat[key]:.3f} | {lat[key] / lat['cold']:.1%} |")
    lines += ["", f"From the RAM cache the load takes {lat['ram'] / lat['cold']:.1%} of a cold load (goal <= 5%); "
              f"POST /preload itself took {lat['preload_call']:.3f} s. No GPU was lent for this run: the "
              f"RAM -> VRAM figures (SD-size checkpoint, GB/s vs measured host-to-device bandwidth) are still "
              f"to be measured."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    opts = parser.parse_args()
    base = tempfile.mkdtemp(prefix="cmg-bench-weights-")
    lat = latency_rows(base)
    rss = rss_rows(base)
    text = report(rss, lat)
    print(text)
    if opts.write:
        write_section("weights", text)


if __name__ == "__main__":
    main()
