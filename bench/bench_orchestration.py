"""Orchestration benchmark, side by side in one run (real ComfyUI servers on this machine's CPU):

1. Throughput on a GIL-releasing node (MGSleep: sleeps in 10 ms slices, reports progress): stock
   ComfyUI vs comfy-multigpu with 1, 2 and 4 workers vs 4 stock processes fed round-robin.
2. POST /prompt and GET /queue/all latency (p50/p99) with 1,000 prompts pending, vs stock GET /queue;
   then the worker time each of those 1,000 queued no-op prompts costs (stock, 1 and 4 workers).

    scripts/run_bench.sh bench/bench_orchestration.py [--prompts 40] [--seconds 0.5] [--write]

--write replaces the "orchestration" section of docs/benchmarks.md with the results.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import workflows as wf  # noqa: E402
from helpers.comfy_server import ComfyServer  # noqa: E402
from shared import comfyui_dir, percentiles, timed, write_section  # noqa: E402




def wait_idle(servers, timeout=600.0):
    for server in servers:
        server.wait_idle(timeout)


def throughput(servers, prompts: int, seconds: float) -> float:
    """Prompts per second for `prompts` sleeps submitted at once (round-robin over `servers`)."""
    wait_idle(servers)
    start = time.perf_counter()
    for i in range(prompts):
        servers[i % len(servers)].submit(wf.sleep(seconds, i))
    wait_idle(servers)
    return prompts / (time.perf_counter() - start)


def latency(server, workers: int | None, pending: int = 1000):
    """Block every worker, queue `pending` prompts (timing each POST), then time the queue views."""
    blockers = [server.submit(wf.sleep(600, -1 - g), gpu=None if workers is None else g)["prompt_id"]
                for g in range(workers or 1)]
    for pid in blockers:
        server.wait_running(pid)
    post, ids = [], []
    for i in range(pending):
        t = time.perf_counter()
        ids.append(server.submit(wf.sleep(0.0, i))["prompt_id"])
        post.append(time.perf_counter() - t)
    out = {"post": percentiles(post), "queue": timed(lambda: server.get("/queue"), 50)}
    if workers is not None:
        out["all_counts"] = timed(lambda: server.get("/queue/all", counts=1), 200)
        out["all_full"] = timed(lambda: server.get("/queue/all"), 50)
    for pid in blockers:
        server.post("/interrupt", {"prompt_id": pid})
    history = server.wait(ids, timeout=600)
    # Draining the long queue of no-op prompts, from the first start to the last end: the fixed cost of
    # a prompt (queue mechanics, ComfyUI's executor, history, bookkeeping), all of it Python under one
    # GIL, so more workers do not run it faster.
    span = max(wf.ui(history[p], "1", "t1") for p in ids) - min(wf.ui(history[p], "1", "t0") for p in ids)
    out["drain"] = len(ids) / span
    wait_idle([server])
    return out


def start(name, base, **kw):
    return ComfyServer(comfyui_dir(), Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base)), **kw).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--write", action="store_true")
    opts = parser.parse_args()
    base = tempfile.mkdtemp(prefix="cmg-bench-")
    started = []
    try:
        stock = start("stock", base, workers=None, env={"COMFY_MULTI_GPU_SCHED": "0"})
        started.append(stock)
        results = {"stock": throughput([stock], opts.prompts, opts.seconds)}
        lat = {"stock": latency(stock, None)}
        stock.stop()
        for n in (1, 2, 4):
            server = start(f"multi{n}", base, workers=n, env={"COMFY_MULTI_GPU_SCHED": "1"})
            started.append(server)
            results[f"multi{n}"] = throughput([server], opts.prompts, opts.seconds)
            if n in (1, 4):
                lat[f"multi{n}"] = latency(server, n)
            server.stop()
        procs = [start(f"proc{i}", base, workers=None, env={"COMFY_MULTI_GPU_SCHED": "0"}) for i in range(4)]
        started += procs
        results["procs4"] = throughput(procs, opts.prompts, opts.seconds)
    finally:
        for s in started:
            s.stop()
    text = report(results, lat, opts)
    print(text)
    if opts.write:
        write_section("orchestration", text)


def report(results, lat, opts) -> str:
    ideal = 1 / opts.seconds
    rows = [("stock ComfyUI (1 process, 1 worker)", "stock"), ("comfy-multigpu, 1 worker", "multi1"),
            ("comfy-multigpu, 2 workers", "multi2"), ("comfy-multigpu, 4 workers", "multi4"),
            ("4 stock processes, round-robin", "procs4")]
    lines = [f"Run {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores ({platform.machine()}), "
             f"{opts.prompts} prompts of MGSleep({opts.seconds} s), all submitted at once.",
             "", "| setup | prompts/s | vs stock | vs ideal per worker |", "|---|---|---|---|"]
    for label, key in rows:
        workers = {"multi2": 2, "multi4": 4, "procs4": 4}.get(key, 1)
        lines.append(f"| {label} | {results[key]:.2f} | {results[key] / results['stock']:.2f}x | "
                     f"{results[key] / (ideal * workers):.1%} |")
    lines += ["", "Latency with 1,000 prompts pending (all workers busy), milliseconds:", "",
              "| request | stock p50 | stock p99 | comfy-multigpu (4 workers) p50 | p99 |", "|---|---|---|---|---|"]

    def cell(server, key):
        if key not in lat[server]:
            return "n/a | n/a"
        p50, p99 = lat[server][key]
        return f"{p50:.1f} | {p99:.1f}"
    for label, key in (("POST /prompt", "post"), ("GET /queue (everything)", "queue"),
                       ("GET /queue/all?counts=1", "all_counts"), ("GET /queue/all (full)", "all_full")):
        lines.append(f"| {label} | {cell('stock', key)} | {cell('multi4', key)} |")
    lines += ["", "Then the 1,000 queued no-op prompts (`MGSleep(0)`) run, first start to last end: the fixed cost of a "
              "prompt (queue mechanics, ComfyUI's executor, history, bookkeeping), Python under one GIL:", "",
              "| setup | no-op prompts/s | ms per prompt | vs stock |", "|---|---|---|---|"]
    for label, key in (("stock ComfyUI", "stock"), ("comfy-multigpu, 1 worker", "multi1"),
                       ("comfy-multigpu, 4 workers", "multi4")):
        rate = lat[key]["drain"]
        lines.append(f"| {label} | {rate:.0f} | {1000 / rate:.2f} | {rate / lat['stock']['drain']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
