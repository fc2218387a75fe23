"""Balancer benchmark, side by side in one run: the placement benchmark's heterogeneous batch (no
pinned prompts: a GPU index means nothing across instances) over 2 comfy-multigpu instances x 2
workers, and over 4 stock ComfyUI processes (process per GPU), sent through

1. the comfy-multigpu balancer (queue-aware, per-GPU slots, its own view updated per submit);
2. real Nginx with `least_conn` over the two instances;
3. real Nginx round-robin over the two instances;

each on fresh instances. Reported: makespan, efficiency against max(total work / 4 GPUs), ratios, model
loads; and the latency the balancer adds to a request (GET /queue/all?counts=1 direct vs through it,
p50/p99).

    scripts/run_bench.sh bench/bench_balancer.py [--prompts 200] [--seed 1] [--write]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from bench_placement import make_jobs  # noqa: E402
from helpers import workflows as wf  # noqa: E402
from helpers.comfy_server import ComfyServer, free_port  # noqa: E402
from helpers.nginx import Nginx, free_port_block  # noqa: E402
from shared import comfyui_dir, timed, write_section  # noqa: E402

NGINX = """
upstream comfy {{ {method}
    {servers}
}}
server {{ listen 127.0.0.1:{port}; client_max_body_size 100m;
    location / {{ proxy_pass http://comfy; proxy_http_version 1.1; proxy_read_timeout 3600s; }}
}}
"""


def post(url: str, prompt: dict) -> dict:
    req = urllib.request.Request(url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def get(url: str):
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())


class Front:
    """Where the batch is sent: the balancer process or an Nginx."""

    def __init__(self, kind: str, instances: list[ComfyServer], base: Path):
        self.kind = kind
        self.proc = self.nginx = None
        if kind == "balancer":
            self.port = free_port()
            self.log = open(base / "balancer.log", "w")
            cmd = [sys.executable, "-m", "comfy_multigpu.balancer", "--listen", f"127.0.0.1:{self.port}",
                   *os.environ.get("BENCH_BALANCER_ARGS", "").split()]
            for s in instances:
                cmd += ["--backend", s.url]
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                                         stdout=self.log, stderr=subprocess.STDOUT)
        else:
            self.port = free_port_block(1)
            conf = NGINX.format(method="least_conn;" if kind == "least_conn" else "", port=self.port,
                                servers=" ".join(f"server {s.url.removeprefix('http://')};" for s in instances))
            self.nginx = Nginx(base / f"nginx-{kind}", conf)
            self.nginx.prefix.mkdir(parents=True, exist_ok=True)
            self.nginx.start([self.port])
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 30
        while True:
            try:
                get(self.url + ("/health" if kind == "balancer" else "/queue"))
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.nginx is not None:
            self.nginx.stop()


SCENARIOS = {   # name: (instances, workers per instance or None for stock ComfyUI)
    "multigpu": (2, 2),        # 2 machines x 2 GPUs, each running comfy-multigpu
    "stock": (4, None),        # process per GPU: 4 stock ComfyUI processes
}


def run(kind: str, jobs, opts, base: Path, scenario: str) -> dict:
    count, workers = SCENARIOS[scenario]
    env = {"COMFY_MULTI_GPU_SCHED": "1" if workers else "0"}
    instances = [ComfyServer(comfyui_dir(), Path(tempfile.mkdtemp(prefix=f"{kind}-{i}-", dir=base)), workers=workers,
                             env=env).start() for i in range(count)]
    front = None
    try:
        front = Front(kind, instances, base)
        started = time.time()
        ids = [post(front.url, wf.standin(j.model, j.seconds, j.index, opts.load, 3))["prompt_id"] for j in jobs]
        entries = {}
        deadline = time.time() + 1800
        while len(entries) < len(ids) and time.time() < deadline:
            for s in instances:
                for pid, entry in s.get("/history", max_items=100000).items():
                    entries[pid] = entry
            time.sleep(0.25)
        ends = [wf.ui(entries[p], "1", "t1") for p in ids]
        loads = sum(1 for p in ids if wf.ui(entries[p], "2", "loaded"))
        per_instance = [sum(1 for p in ids if p in s.get("/history", max_items=100000)) for s in instances]
        out = {"makespan": max(ends) - started, "loads": loads, "per_instance": per_instance}
        if kind == "balancer" and workers:
            direct = timed(lambda: get(instances[0].url + "/queue/all?counts=1"), 300)
            through = timed(lambda: get(front.url + "/queue/all?counts=1"), 300)   # proxied to the first backend
            out["latency"] = (direct, through)
        return out
    finally:
        if front is not None:
            front.stop()
        for s in instances:
            s.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--load", type=float, default=0.5)
    parser.add_argument("--only", action="append", choices=["balancer", "least_conn", "round_robin"])
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--write", action="store_true")
    opts = parser.parse_args()
    jobs = make_jobs(opts.prompts, opts.seed, 0.0)
    bound = (sum(j.seconds for j in jobs) + 3 * opts.load) / 4
    base = Path(tempfile.mkdtemp(prefix="cmg-bench-balancer-"))
    sections = []
    for scenario in opts.scenario or ["multigpu", "stock"]:
        results = {}
        for kind in ("balancer", "least_conn", "round_robin"):
            if opts.only and kind not in opts.only:
                continue
            results[kind] = run(kind, jobs, opts, base, scenario)
            r = results[kind]
            print(f"{scenario} {kind}: makespan {r['makespan']:.2f} s, efficiency {bound / r['makespan']:.3f}, "
                  f"loads {r['loads']}, per instance {r['per_instance']}", flush=True)
        sections.append(report(results, jobs, bound, opts, scenario))
    text = "\n".join(sections)
    print(text)
    if opts.write:
        write_section("balancer", text)


def report(results, jobs, bound, opts, scenario) -> str:
    labels = {"balancer": "comfy-multigpu balancer", "least_conn": "Nginx least_conn",
              "round_robin": "Nginx round-robin"}
    count, workers = SCENARIOS[scenario]
    setup = f"{count} comfy-multigpu instances x {workers} workers" if workers else \
        f"{count} stock ComfyUI processes (one per GPU)"
    lines = [f"Run {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores ({platform.machine()}): {setup}, "
             f"{len(jobs)} prompts (seed {opts.seed}, none pinned, total work "
             f"{sum(j.seconds for j in jobs):.1f} s, every model fits on every GPU, a load costs {opts.load:g} s), "
             f"all submitted at once. Lower bound {bound:.2f} s.", "",
             "| front | makespan (s) | efficiency | vs balancer | model loads | prompts per instance |",
             "|---|---|---|---|---|---|"]
    ours = results.get("balancer", {}).get("makespan")
    for kind, r in results.items():
        ratio = "-" if kind == "balancer" or not ours else f"{r['makespan'] / ours:.2f}x the makespan"
        lines.append(f"| {labels[kind]} | {r['makespan']:.2f} | {bound / r['makespan']:.3f} | {ratio} | {r['loads']} | "
                     f"{' / '.join(map(str, r['per_instance']))} |")
    if "latency" not in results.get("balancer", {}):
        return "\n".join(lines) + "\n"
    (d50, d99), (t50, t99) = results["balancer"]["latency"]
    lines += ["", f"Added latency of the balancer on a proxied request (GET /queue/all?counts=1, 300 sequential): "
              f"direct p50 {d50:.2f} ms / p99 {d99:.2f} ms, through the balancer p50 {t50:.2f} ms / p99 {t99:.2f} ms "
              f"(+{t50 - d50:.2f} ms at p50)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
