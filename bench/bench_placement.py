"""Placement benchmark, side by side in one run (real ComfyUI with comfy-multigpu, 4 CPU workers):

A batch of prompts with heavy-tailed durations (lognormal, clipped to 50 ms .. 3 s; sleep-based, so
the CPU count does not limit it), a share of them pinned to a GPU, each using one of 3 "models"
(MGLoadStandIn: a worker holds `--slots` models, loading another costs `--load` seconds), is sent
all at once through:

1. comfy-multigpu's own placement (no header; pinned prompts with X-TARGET-GPU);
2. round-robin over per-GPU ports (real Nginx, the seed's ports 8181-8184 layout);
3. the seed's polling balancer: least running+pending per GPU as of its last poll (every 0.5 s),
   round-robin on ties, each prompt pinned where it chose.

Reported per strategy: makespan, efficiency = lower bound / makespan (lower bound = max(total work /
GPUs, longest pinned chain), both including the fewest model loads possible), model loads vs that
minimum, and misrouted pinned prompts (must be 0). A fresh server per strategy, same batch.

    scripts/run_bench.sh bench/bench_placement.py [--prompts 200] [--seed 1] [--repeat 5] [--write]
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from comfy_multigpu.tools.nginx_conf import NginxSettings, render  # noqa: E402
from helpers import workflows as wf  # noqa: E402
from helpers.comfy_server import ComfyServer  # noqa: E402
from shared import comfyui_dir, write_section  # noqa: E402
from helpers.nginx import Nginx, free_port_block  # noqa: E402

GPUS = 4
MODELS = ("model-a", "model-b", "model-c")
POPULARITY = (0.5, 0.3, 0.2)
POLL_S = 0.5


@dataclass(frozen=True)
class Job:
    index: int
    seconds: float
    model: str
    pinned: Optional[int]


def make_jobs(count: int, seed: int, pinned_share: float) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for i in range(count):
        seconds = min(3.0, max(0.05, rng.lognormvariate(math.log(0.3), 0.9)))
        model = rng.choices(MODELS, POPULARITY)[0]
        pinned = rng.randrange(GPUS) if rng.random() < pinned_share else None
        jobs.append(Job(i, round(seconds, 3), model, pinned))
    return jobs


def lower_bound(jobs: list[Job], load_s: float) -> tuple[float, int]:
    """(makespan lower bound, fewest model loads): every (GPU, model) a pinned prompt needs is loaded
    at least once there, and every model used at all is loaded at least once somewhere."""
    pinned_pairs = {(j.pinned, j.model) for j in jobs if j.pinned is not None}
    unpinned_models = {j.model for j in jobs} - {m for _, m in pinned_pairs}
    min_loads = len(pinned_pairs) + len(unpinned_models)
    total = sum(j.seconds for j in jobs) + min_loads * load_s
    chains = [sum(j.seconds for j in jobs if j.pinned == g) + load_s * len({m for p, m in pinned_pairs if p == g})
              for g in range(GPUS)]
    return max(total / GPUS, max(chains)), min_loads


def ideal_fifo(jobs: list[Job], load_s: float, slots: int) -> float:
    """Makespan of first-come-first-served list scheduling with no overhead at all (a free GPU starts
    the earliest prompt it may run; models held LRU in `slots`): what an ideal scheduler that, like
    every real one, does not know durations in advance reaches on this batch."""
    free = [0.0] * GPUS
    held: list[list[str]] = [[] for _ in range(GPUS)]
    waiting = list(jobs)
    done = [False] * GPUS
    while waiting and not all(done):
        g = min((i for i in range(GPUS) if not done[i]), key=lambda i: free[i])
        job = next((j for j in waiting if j.pinned in (None, g)), None)
        if job is None:
            done[g] = True
            continue
        waiting.remove(job)
        load = job.model not in held[g]
        if not load:
            held[g].remove(job.model)
        held[g].append(job.model)
        del held[g][:-slots]
        free[g] += job.seconds + (load_s if load else 0.0)
    return max(free)



# ---- strategies: each returns a function job -> (server-relative URL base, headers) ------------------
def ours(server: ComfyServer, _ports) -> Callable[[Job], tuple[str, dict]]:
    return lambda job: (server.url, {} if job.pinned is None else {"X-TARGET-GPU": str(job.pinned)})


def round_robin(server: ComfyServer, ports) -> Callable[[Job], tuple[str, dict]]:
    turn = itertools.cycle(range(GPUS))
    return lambda job: (f"http://127.0.0.1:{ports[job.pinned if job.pinned is not None else next(turn)]}", {})


class PollingBalancer:
    """The seed's balancer: least running+pending as of the last poll, round-robin among ties."""

    def __init__(self, server: ComfyServer):
        self.server = server
        self.counts = [0] * GPUS
        self.turn = 0
        self.stop = threading.Event()
        self.polls = 0
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.is_set():
            queues = self.server.get("/queue/all", counts=1)["queues"]
            self.counts = [q["running_count"] + q["pending_count"] for q in queues]
            self.polls += 1
            self.stop.wait(POLL_S)

    def __call__(self, job: Job) -> tuple[str, dict]:
        if job.pinned is not None:
            gpu = job.pinned
        else:
            low = min(self.counts)
            ties = [g for g in range(GPUS) if self.counts[g] == low]
            gpu = ties[self.turn % len(ties)]
            self.turn += 1
        return self.server.url, {"X-TARGET-GPU": str(gpu)}


def polling(server: ComfyServer, _ports) -> PollingBalancer:
    return PollingBalancer(server)


STRATEGIES = [("comfy-multigpu placement", "ours", ours),
              ("round-robin over per-GPU ports (Nginx)", "rr", round_robin),
              ("polling least-pending balancer (0.5 s)", "poll", polling)]


# ---- one run ----------------------------------------------------------------------------------------
def run_batch(base: Path, make_router, jobs: list[Job], opts) -> dict:
    # The baselines pin every prompt: each GPU's queue is then first come, first served, as in the seed.
    server = ComfyServer(comfyui_dir(), Path(tempfile.mkdtemp(prefix="placement-", dir=base)), workers=GPUS,
                         env={"COMFY_MULTI_GPU_SCHED": "1"}).start()
    nginx = None
    try:
        first = free_port_block(GPUS)
        settings = NginxSettings(gpus=GPUS, upstream=server.url.removeprefix("http://"), listen="127.0.0.1",
                                 first_port=first, auto_port=0, rate="10000r/s", burst=10000)
        nginx = Nginx(Path(tempfile.mkdtemp(prefix="nginx-", dir=base)), render(settings)).start(settings.ports())
        router = make_router(server, [first + g for g in range(GPUS)])
        ids = {}
        started = time.time()
        for job in jobs:
            url, headers = router(job)
            prompt = wf.standin(job.model, job.seconds, job.index, opts.load, opts.slots_now)
            answer = _post(url, prompt, headers)
            ids[answer["prompt_id"]] = job
        submitted = time.time() - started
        history = wait_all(server, set(ids))
        if isinstance(router, PollingBalancer):
            router.stop.set()
        ends = [wf.ui(history[pid], "1", "t1") for pid in ids]
        loads = sum(1 for pid in ids if wf.ui(history[pid], "2", "loaded"))
        misrouted = sum(1 for pid, job in ids.items() if job.pinned is not None and history[pid]["gpu_id"] != job.pinned)
        per_gpu = [sum(1 for pid in ids if history[pid]["gpu_id"] == g) for g in range(GPUS)]
        errors = sum(1 for pid in ids if history[pid]["status"]["status_str"] != "success")
        return {"makespan": max(ends) - started, "loads": loads, "misrouted": misrouted, "per_gpu": per_gpu,
                "errors": errors, "submitted": submitted, **timeline(history, ids, started, opts.load)}
    finally:
        if nginx is not None:
            nginx.stop()
        server.stop()


def timeline(history: dict, ids: dict, started: float, load_s: float) -> dict:
    """Where the time went: per-GPU finish spread (the tail), and the mean gap between one prompt's
    end and the next one's start on the same GPU, model loads left out (scheduling + ComfyUI overhead)."""
    runs = {g: [] for g in range(GPUS)}
    for pid in ids:
        e = history[pid]
        runs[e["gpu_id"]].append((wf.ui(e, "1", "t0"), wf.ui(e, "1", "t1"), wf.ui(e, "2", "loaded")))
    gaps, lasts, firsts = [], [], []
    for g, spans in runs.items():
        spans.sort()
        if not spans:
            continue
        firsts.append(spans[0][0] - started)
        lasts.append(spans[-1][1])
        gaps += [b[0] - a[1] - (load_s if b[2] else 0.0) for a, b in zip(spans, spans[1:])]
    return {"tail": max(lasts) - min(lasts), "gap_ms": 1000 * sum(gaps) / max(1, len(gaps)),
            "first_start": max(firsts)}


def _post(url: str, prompt: dict, headers: dict) -> dict:
    import json
    import urllib.request
    req = urllib.request.Request(url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                 headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def wait_all(server: ComfyServer, ids: set, timeout: float = 1800.0) -> dict:
    """Every prompt was queued before this is called, so an empty queue means all have finished. Polls
    the cheap counts (0.5 ms a call) rather than the whole history (7 ms at 200 entries, time the
    workers would wait for the GIL), then reads the history once."""
    deadline = time.time() + timeout
    history: dict = {}
    while time.time() < deadline:
        counts = server.get("/queue/all", counts=1)
        if counts["total_running"] + counts["total_pending"] == 0:
            history = server.get("/history", max_items=100000)
            if ids <= set(history):
                return history
        time.sleep(0.25)
    raise TimeoutError(f"{len(ids - set(history))} prompts did not finish")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--pinned", type=float, default=0.2, help="share of prompts pinned to a GPU")
    parser.add_argument("--load", type=float, default=0.5, help="seconds to load a model a worker lacks")
    parser.add_argument("--slots", default="3,2",
                        help="models one worker holds at once; a comma-separated list runs one scenario each")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5,
                        help="runs of comfy-multigpu's placement per scenario (the table shows the median run); "
                             "end-of-batch timing makes single runs vary")
    parser.add_argument("--only", choices=[key for _, key, _ in STRATEGIES], action="append")
    parser.add_argument("--write", action="store_true")
    opts = parser.parse_args()
    jobs = make_jobs(opts.prompts, opts.seed, opts.pinned)
    bound, min_loads = lower_bound(jobs, opts.load)
    base = Path(tempfile.mkdtemp(prefix="cmg-bench-placement-"))
    sections = [header(jobs, bound, min_loads, opts)]
    for slots in (int(x) for x in opts.slots.split(",")):
        opts.slots_now = slots
        results, runs = {}, {}
        for label, key, make in STRATEGIES:
            if opts.only and key not in opts.only:
                continue
            for _ in range(opts.repeat if key == "ours" else 1):
                r = run_batch(base, make, jobs, opts)
                runs.setdefault(key, []).append(r)
                print(f"slots {slots}, {label}: makespan {r['makespan']:.2f} s, efficiency {bound / r['makespan']:.3f}, "
                      f"loads {r['loads']} (min {min_loads}), misrouted {r['misrouted']}, per GPU {r['per_gpu']}, "
                      f"tail {r['tail']:.2f} s, mean gap {r['gap_ms']:.0f} ms, submitted in {r['submitted']:.2f} s",
                      flush=True)
            results[key] = sorted(runs[key], key=lambda r: r["makespan"])[len(runs[key]) // 2]   # the median run
        sections.append(report(results, runs, bound, min_loads, slots, ideal_fifo(jobs, opts.load, slots)))
    text = "\n".join(sections)
    print(text)
    if opts.write:
        write_section("placement", text)


def header(jobs: list[Job], bound: float, min_loads: int, opts) -> str:
    work = sum(j.seconds for j in jobs)
    pinned = sum(1 for j in jobs if j.pinned is not None)
    durations = sorted(j.seconds for j in jobs)
    return (f"Run {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores ({platform.machine()}), {GPUS} "
            f"workers, command `scripts/run_bench.sh bench/bench_placement.py --write` (prompts {len(jobs)}, "
            f"seed {opts.seed}, pinned share {opts.pinned:g}, load {opts.load:g} s, slots {opts.slots}, repeat {opts.repeat}). "
            f"Durations lognormal, 50 ms .. 3 s (median {durations[len(durations) // 2]:.2f} s, max "
            f"{durations[-1]:.2f} s, total {work:.1f} s); {pinned} prompts pinned; 3 models used by 50/30/20 % "
            f"of the prompts; a model a worker does not hold costs {opts.load:g} s to load. Lower bound "
            f"{bound:.2f} s; fewest loads possible {min_loads}. All prompts submitted at once.\n")


def report(results: dict, runs: dict, bound: float, min_loads: int, slots: int, ideal: float) -> str:
    lines = [f"A worker holds {slots} of the 3 models. Reference: ideal first-come-first-served list "
             f"scheduling with zero overhead (simulated, same batch) has makespan {ideal:.2f} s, efficiency "
             f"{bound / ideal:.3f}."]
    if len(runs.get("ours", ())) > 1:
        effs = [bound / r["makespan"] for r in runs["ours"]]
        lines[0] += (f" comfy-multigpu's placement ran {len(effs)} times: efficiency "
                     f"{', '.join(f'{e:.3f}' for e in effs)} (mean {sum(effs) / len(effs):.3f}, lowest "
                     f"{min(effs):.3f}); its row is the median run.")
    lines += ["",
             f"| strategy | makespan (s) | efficiency | vs comfy-multigpu | model loads (min {min_loads}) | "
             "misrouted pinned | prompts per GPU | finish spread (s) |", "|---|---|---|---|---|---|---|---|"]
    ours_makespan = results.get("ours", {}).get("makespan")
    for label, key, _ in STRATEGIES:
        if key not in results:
            continue
        r = results[key]
        ratio = f"{r['makespan'] / ours_makespan:.2f}x the makespan" if ours_makespan and key != "ours" else "-"
        lines.append(f"| {label} | {r['makespan']:.2f} | {bound / r['makespan']:.3f} | {ratio} | {r['loads']} | "
                     f"{r['misrouted']} | {' / '.join(map(str, r['per_gpu']))} | {r['tail']:.2f} |")
    failed = {key: r["errors"] for key, r in results.items() if r["errors"]}
    if failed:
        lines.append(f"\nPrompts that ended in error: {failed}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
