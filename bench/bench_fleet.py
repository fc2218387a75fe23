"""Fleet benchmark, side by side in one run, on loopback with a real redis-server (append-only file,
fsync always):

1. Hand-off: a prompt posted at machine a for machine b (X-TARGET-NODE), one at a time, from POST to
   its first node starting on b's idle GPU (the node's own wall clock; one host), p50/p99; the same on
   one machine without a fleet (the in-process queue) for reference; Redis commands per prompt by
   kind (INFO commandstats), to show that idle GPUs block on the queue rather than poll it.
2. The placement benchmark's batch (bench_placement.make_jobs: stand-in models, a load costs
   --load s) over 2 machines x 2 workers: fleet mode (every prompt posted at machine a) vs the
   comfy-multigpu balancer vs Nginx least_conn over the same two comfy-multigpu instances: makespan,
   efficiency against max(total work / 4 GPUs), model loads. Then the same with machine b killed
   (SIGKILL) once a third of the batch has finished: prompts lost (answered 200 but never finished).

    scripts/run_bench.sh bench/bench_fleet.py [--prompts 200] [--handoffs 100] [--seed 1] [--write]
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
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from bench_balancer import Front, post  # noqa: E402
from bench_placement import make_jobs  # noqa: E402
from helpers import workflows as wf  # noqa: E402
from helpers.comfy_server import ComfyServer, HttpError  # noqa: E402
from helpers.redis_server import RedisServer  # noqa: E402
from shared import comfyui_dir, percentiles, write_section  # noqa: E402

FLEET_ENV = {"COMFY_MULTIGPU_FLEET_LEASE": "5", "COMFY_MULTIGPU_FLEET_STEAL_DELAY": "0.5"}


def machines(base: Path, redis: RedisServer | None, count: int = 2, workers: int = 2) -> list[ComfyServer]:
    out = []
    for i in range(count):
        env = {"COMFY_MULTI_GPU_SCHED": "1"}
        if redis is not None:
            env.update(FLEET_ENV, COMFY_MULTIGPU_FLEET=redis.url, COMFY_MULTIGPU_NODE_NAME="ab"[i])
        out.append(ComfyServer(comfyui_dir(), Path(tempfile.mkdtemp(prefix=f"m{i}-", dir=base)), workers=workers,
                               env=env).start())
    return out


def commandstats(client) -> dict:
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in client.info("commandstats").items()}


def handoff(base: Path, count: int) -> dict:
    """POST at one door -> start on another machine's idle GPU, sequentially; and on one machine."""
    out = {}
    redis = RedisServer(base / "redis-handoff").start()
    fleet = machines(base, redis)
    try:
        a, _b = fleet
        for i in range(5):                         # warm-up: imports, first prompt of each worker
            pid = a.submit(wf.sleep(0, i), headers={"X-TARGET-NODE": "b"})["prompt_id"]
            a.wait(pid)
        time.sleep(1.0)
        client = redis.client()
        calls_before = sum(m.get("/multigpu/fleet")["redis_calls"] for m in fleet)
        before, t_before = commandstats(client), time.time()
        samples = []
        for i in range(count):
            sent = time.time()
            pid = a.submit(wf.sleep(0, 100 + i), headers={"X-TARGET-NODE": "b"})["prompt_id"]
            entry = a.wait(pid)[pid]
            samples.append(wf.ui(entry, "1", "t0") - sent)
        after, elapsed = commandstats(client), time.time() - t_before
        round_trips = sum(m.get("/multigpu/fleet")["redis_calls"] for m in fleet) - calls_before
        calls = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        out["fleet"] = percentiles(samples)
        out["round_trips"] = round_trips / count
        out["calls"] = {k: v / count for k, v in sorted(calls.items()) if v}
        out["seconds"] = elapsed
        # idle: what 4 idle GPUs and 2 machines send in 10 s with nothing to do
        before = commandstats(client)
        time.sleep(10)
        after = commandstats(client)
        out["idle_10s"] = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
    finally:
        for m in fleet:
            m.stop()
        redis.stop()
    single = machines(base, None, count=1)[0]
    try:
        for i in range(5):
            single.wait(single.submit(wf.sleep(0, i), gpu=1)["prompt_id"])
        samples = []
        for i in range(count):
            sent = time.time()
            pid = single.submit(wf.sleep(0, 100 + i), gpu=1)["prompt_id"]
            samples.append(wf.ui(single.wait(pid)[pid], "1", "t0") - sent)
        out["local"] = percentiles(samples)
    finally:
        single.stop()
    return out


def batch(kind: str, jobs, opts, base: Path, kill: bool) -> dict:
    redis = RedisServer(base / f"redis-{kind}-{int(kill)}").start() if kind == "fleet" else None
    instances = machines(base, redis)
    front = None
    try:
        url = instances[0].url if kind == "fleet" else None
        if url is None:
            front = Front(kind, instances, base)
            url = front.url
        started = time.time()
        ids = [post(url, wf.standin(j.model, j.seconds, j.index, opts.load, 3))["prompt_id"] for j in jobs]
        entries, killed_at, last_progress = {}, None, time.time()
        while len(entries) < len(ids):
            alive = [s for s in instances if s.proc.poll() is None]
            found = 0
            for s in alive:
                try:
                    for pid, entry in s.get("/history", max_items=100000).items():
                        if pid not in entries:
                            entries[pid] = entry
                            found += 1
                except (OSError, HttpError):
                    pass
            if found:
                last_progress = time.time()
            if kill and killed_at is None and len(entries) >= len(ids) // 3:
                instances[1].kill()
                killed_at = time.time() - started
            if time.time() - last_progress > 30 or time.time() - started > 1800:
                break                               # what is left was lost with the killed machine
            time.sleep(0.25)
        done = [p for p in ids if p in entries and entries[p]["status"]["status_str"] == "success"]
        ends = [wf.ui(entries[p], "1", "t1") for p in done]
        loads = sum(1 for p in done if wf.ui(entries[p], "2", "loaded"))
        return {"makespan": max(ends) - started, "loads": loads, "finished": len(done), "lost": len(ids) - len(done),
                "killed_at": killed_at}
    finally:
        if front is not None:
            front.stop()
        for s in instances:
            s.stop()
        if redis is not None:
            redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--handoffs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--load", type=float, default=0.5)
    parser.add_argument("--skip-handoff", action="store_true")
    parser.add_argument("--write", action="store_true")
    opts = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="cmg-bench-fleet-"))
    jobs = make_jobs(opts.prompts, opts.seed, 0.0)
    bound = (sum(j.seconds for j in jobs) + 3 * opts.load) / 4
    hand = None if opts.skip_handoff else handoff(base, opts.handoffs)
    if hand:
        print("hand-off", hand, flush=True)
    results = {}
    for kill in (False, True):
        for kind in ("fleet", "balancer", "least_conn"):
            r = batch(kind, jobs, opts, base, kill)
            results[(kind, kill)] = r
            print(f"{kind} kill={kill}: {r}", flush=True)
    text = report(hand, results, jobs, bound, opts)
    print(text)
    if opts.write:
        write_section("fleet", text)


def report(hand, results, jobs, bound, opts) -> str:
    labels = {"fleet": "fleet mode (Redis), all posted at machine a", "balancer": "comfy-multigpu balancer",
              "least_conn": "Nginx least_conn"}
    lines = [f"Run {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores ({platform.machine()}), every "
             f"process on this one host (loopback), redis-server with appendfsync always.", ""]
    if hand:
        (f50, f99), (l50, l99) = hand["fleet"], hand["local"]
        calls = ", ".join(f"{k} {v:.1f}" for k, v in hand["calls"].items())
        executed = sum(hand["calls"].values())
        idle = ", ".join(f"{k} {v}" for k, v in sorted(hand["idle_10s"].items()))
        lines += [f"Hand-off, {opts.handoffs} prompts one at a time (an MGSleep(0) node; POST to its start, on the "
                  f"node's clock): posted at machine a for an idle GPU of machine b (X-TARGET-NODE) p50 {f50:.1f} ms "
                  f"/ p99 {f99:.1f} ms; on one machine without a fleet (in-process queue, X-TARGET-GPU) p50 "
                  f"{l50:.1f} ms / p99 {l99:.1f} ms.", "",
                  f"Per prompt during the hand-off run (2 machines x 2 GPUs, each machine's upkeep every "
                  f"lease/3 included): {hand['round_trips']:.1f} round trips to Redis from the machines "
                  f"(FCALL {hand['calls'].get('fcall', 0):.1f}: enqueue, take, renew, complete, reap; XREAD "
                  f"{hand['calls'].get('xread', 0):.1f}: an idle GPU's blocking read returning), and "
                  f"{executed:.0f} commands executed by Redis, those inside the functions included: {calls}.",
                  "", f"With nothing to do for 10 s the whole fleet (4 idle GPUs) made Redis execute: {idle} "
                  f"(XREAD is the blocking read of idle GPUs, up to 5 s each; FCALL the takes and each machine's "
                  f"reaping pass).", ""]
    lines += [f"Batch: {len(jobs)} prompts (seed {opts.seed}, none pinned, total work {sum(j.seconds for j in jobs):.1f} s, "
              f"a model load costs {opts.load:g} s), all submitted at once to 2 comfy-multigpu machines x 2 "
              f"workers. Lower bound {bound:.2f} s. Killed: machine b got SIGKILL once a third of the prompts had "
              f"finished.", "",
              "| front | makespan (s) | efficiency | model loads | killed mid-batch: finished / lost | "
              "killed: makespan of what finished (s) |",
              "|---|---|---|---|---|---|"]
    for kind in ("fleet", "balancer", "least_conn"):
        r, k = results[(kind, False)], results[(kind, True)]
        lines.append(f"| {labels[kind]} | {r['makespan']:.2f} | {bound / r['makespan']:.3f} | {r['loads']} | "
                     f"{k['finished']} / {k['lost']} | {k['makespan']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
