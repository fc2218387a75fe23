"""Worker modes side by side (real ComfyUI servers on this machine's CPU, `--cpu`): comfy-multigpu with
thread workers (COMFY_MULTIGPU_WORKER_MODE=thread, one interpreter), with process workers (=process,
a child process per worker running ComfyUI's executor), and N stock ComfyUI processes fed round-robin.

1. GIL-holding node: prompts/s of MGSpin prompts sized to --seconds alone in a stock server, 4 x N
   submitted at once per window (until all are in history), with 2 and 4 workers.
2. Real model code: aggregate forwards/s of MGBenchForward (bench/node_pack: ComfyUI's model classes
   as bench_gil.py builds them, real depth, tiny width, one copy per worker) with 1, 2, 4 workers;
   every worker warmed (model built) first, the rate taken over the nodes' own forward timestamps.
3. Fixed cost of a no-op prompt (MGSleep(0)), one at a time, interleaved: submit-to-history latency
   (until the `executing` event with node None, sent after the history entry) with 2 workers.
4. Memory: PSS (/proc/<pid>/smaps_rollup) summed over a server's process tree after every worker ran
   the tiny txt2img: 1 and 4 workers per mode, 1 and 4 stock processes; each setup measured alone.

    scripts/run_bench.sh bench/bench_workers.py [--parts gil,model,noop,memory] [--repeat 3]
                                               [--models sd15,sdxl,flux,wan] [--seconds 0.5] [--write]

About 13 minutes on 2 cores with the defaults. Before each repetition it waits while other ComfyUI
servers or pytest runs are on the machine, and takes a repetition again if one started during it.

--write replaces the "workers" section of docs/benchmarks.md with the results.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from bench_weights import fixtures  # noqa: E402
from helpers import workflows as wf  # noqa: E402
from helpers.comfy_server import ComfyServer  # noqa: E402
from shared import comfyui_dir, write_section  # noqa: E402

MODES = ("thread", "process", "stock")
BENCH_NODES = REPO / "bench" / "node_pack"
ATTENTION = ("--use-pytorch-cross-attention",)   # SDPA, as bench_gil.py (and ComfyUI on NVIDIA) uses
MODEL_PROMPTS_PER_WORKER = 2
MODEL_PROMPT_S = 0.75     # forwards per prompt: about this long on one core
NOOP_ROUNDS = 40
MIB = 2 ** 20


def others() -> list[str]:
    """ComfyUI servers and pytest runs on this machine that this script did not start."""
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    found = subprocess.run(["pgrep", "-af", "main.py|pytest"], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if int(line.split()[0]) not in mine]


WAITED: list[float] = []   # seconds spent in wait_quiet, for the run time this script reports


def wait_quiet() -> None:
    """Until no other ComfyUI server or pytest run uses this machine's 2 cores (polled every 30 s)."""
    started = time.monotonic()
    if found := others():
        print(f"waiting for {len(found)} other process(es) to end, e.g. {found[0][:160]}", file=sys.stderr)
    while others():
        time.sleep(30)
    WAITED.append(time.monotonic() - started)


def repeated(repeat: int, one) -> list:
    """`repeat` results of one(), each taken while nothing else ran (one that overlapped another run
    is thrown away and taken again)."""
    results = []
    while len(results) < repeat:
        wait_quiet()
        result = one()
        if others():
            print("another run started during a repetition: taking it again", file=sys.stderr)
            continue
        results.append(result)
    return results


async def _post(session, server, gpu, prompt: dict, client: str) -> str:
    headers = {} if gpu is None else {"X-TARGET-GPU": str(gpu)}
    async with session.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": client},
                            headers=headers) as answer:
        return (await answer.json())["prompt_id"]


async def _closed(ws, ids) -> float:
    """Reads ws until the closing `executing` event (node None; a server sends it once the prompt's
    history entry is written) of every prompt id in ids has come; the time then."""
    left = set(ids)
    while left:
        msg = await asyncio.wait_for(ws.receive(), 600)
        event = msg.json() if msg.type == aiohttp.WSMsgType.TEXT else {}
        if event.get("type") == "executing" and event["data"].get("node") is None:
            left.discard(event["data"].get("prompt_id"))
    return time.perf_counter()


async def _window(targets, prompts) -> tuple[float, list]:
    """Prompt i to targets[i % len(targets)] ((server, X-TARGET-GPU)), all at once; (seconds until the
    last of them closed, [(server, prompt id)]). Listening on a WebSocket instead of polling leaves the
    servers' event loops, and so their GIL, alone during a window."""
    servers = list(dict.fromkeys(server for server, _ in targets))
    client = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        sockets = [await session.ws_connect(f"{s.url}/ws?clientId={client}") for s in servers]
        start = time.perf_counter()
        ids = []
        for i, prompt in enumerate(prompts):
            server, gpu = targets[i % len(targets)]
            ids.append((server, await _post(session, server, gpu, prompt, client)))
        ends = await asyncio.gather(*(_closed(ws, [pid for s, pid in ids if s is server])
                                      for ws, server in zip(sockets, servers)))
        for ws in sockets:
            await ws.close()
    return max(ends) - start, ids


def run_prompts(targets, prompts) -> tuple[float, list]:
    """_window once the servers are idle; (seconds, history entries), all of them successes. Each
    server first runs two no-op prompts one after the other, so that stock ComfyUI's gc.collect (due
    after a prompt once 10 s have passed since the last; about 0.3 s here) runs before the window."""
    for server in dict.fromkeys(server for server, _ in targets):
        server.wait_idle(600)
        for _ in range(2):
            server.submit(wf.sleep(0.0))
            server.wait_idle(600)
    seconds, ids = asyncio.run(_window(targets, prompts))
    entries = [server.wait(pid, timeout=600)[pid] for server, pid in ids]
    bad = [e["status"] for e in entries if e["status"]["status_str"] != "success"]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(ids)} prompts failed, the first: {bad[0]}")
    return seconds, entries


class Setup:
    """One way to run N workers: one server with the extension (thread or process mode), or N stock
    servers that get prompts round-robin."""

    def __init__(self, mode: str, n: int, base: str, fixtures_dir=None, args: tuple = ()):
        self.mode, self.n = mode, n
        stock = mode == "stock"
        env = {"COMFY_MULTI_GPU_SCHED": "0"} if stock else {"COMFY_MULTI_GPU_SCHED": "1",
                                                             "COMFY_MULTIGPU_WORKER_MODE": mode}
        self.servers = [ComfyServer(comfyui_dir(), Path(tempfile.mkdtemp(prefix=f"{mode}{n}-", dir=base)),
                                    workers=None if stock else n, env=env, extra_nodes=(BENCH_NODES,),
                                    fixtures=fixtures_dir, args=args) for _ in range(n if stock else 1)]

    def workers(self) -> list:
        """(server, X-TARGET-GPU) for each worker."""
        if self.mode == "stock":
            return [(s, None) for s in self.servers]
        return [(self.servers[0], g) for g in range(self.n)]

    def run(self, prompts, pinned: bool = False) -> tuple[float, list]:
        """run_prompts: stock round-robin; ours placed by the extension, or prompt i on worker i (pinned)."""
        pinned = pinned or self.mode == "stock"
        return run_prompts(self.workers() if pinned else [(self.servers[0], None)], prompts)


def start_all(servers) -> None:
    """Start servers side by side (each waits until its workers are up)."""
    with ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(lambda s: s.start(600), servers))


def stop_all(setups) -> None:
    for server in (s for setup in setups for s in setup.servers):
        server.stop()


def forward(key: str, forwards: int, value: int = 0) -> dict:
    return {"1": {"class_type": "MGBenchForward", "inputs": {"model": key, "forwards": forwards, "value": value}}}


def warm(setups, key: str) -> float:
    """Build `key` in every worker of every setup; then its forwards/s alone on one stock worker."""
    for setup in setups:
        _, entries = setup.run([forward(key, 1, i) for i in range(setup.n)], pinned=True)
        if setup.mode == "thread" and len({wf.ui(e, "1", "thread") for e in entries}) != setup.n:
            raise RuntimeError(f"thread-mode warm-up did not run on {setup.n} threads: {entries}")
    _, (entry,) = setups[MODES.index("stock")].run([forward(key, 10)])
    return wf.ui(entry, "1", "rate")


def model_rate(setup, key: str, forwards: int) -> float:
    """Aggregate forwards/s: all forwards over the span of the nodes' own timestamps."""
    _, entries = setup.run([forward(key, forwards, i) for i in range(MODEL_PROMPTS_PER_WORKER * setup.n)])
    if any(wf.ui(e, "1", "build_s") for e in entries):
        raise RuntimeError(f"a {setup.mode} worker built {key} inside a measured window: warm-up missed it")
    span = max(wf.ui(e, "1", "t1") for e in entries) - min(wf.ui(e, "1", "t0") for e in entries)
    return sum(wf.ui(e, "1", "forwards") for e in entries) / span


async def _noop_rounds(servers: dict) -> dict:
    client = uuid.uuid4().hex
    out = {mode: [] for mode in servers}
    async with aiohttp.ClientSession() as session:
        sockets = {mode: await session.ws_connect(f"{s.url}/ws?clientId={client}") for mode, s in servers.items()}
        for i in range(NOOP_ROUNDS + 2):
            for mode, server in servers.items():
                start = time.perf_counter()
                pid = await _post(session, server, None, wf.sleep(0.0, i), client)
                seconds = await _closed(sockets[mode], [pid]) - start
                out[mode] += [seconds] if i >= 2 else []
        for ws in sockets.values():
            await ws.close()
    return out


def noop_latency(setups) -> dict:
    """{mode: [seconds]}: a no-op prompt (MGSleep(0)) submitted alone until its closing `executing`
    event, NOOP_ROUNDS times per setup, the setups taking turns (2 unmeasured rounds first)."""
    for setup in setups:
        setup.servers[0].wait_idle(600)
    return asyncio.run(_noop_rounds({setup.mode: setup.servers[0] for setup in setups}))


def spin_alone(server, blocks: int) -> float:
    """Seconds MGSpin(blocks) takes alone in `server`: the fastest of 3 prompts."""
    _, entries = run_prompts([(server, None)], [wf.spin(blocks, i) for i in range(3)])
    return min(wf.ui(e, "1", "t1") - wf.ui(e, "1", "t0") for e in entries)


def pss(pid: int) -> tuple[int, int]:
    """(Pss, Pss_Shmem) of one process from /proc/<pid>/smaps_rollup, bytes; (0, 0) once it is gone."""
    try:
        rows = [line.split() for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()]
    except (FileNotFoundError, ProcessLookupError):
        return 0, 0
    fields = {row[0]: int(row[1]) * 1024 for row in rows if row[0] in ("Pss:", "Pss_Shmem:")}
    return fields.get("Pss:", 0), fields.get("Pss_Shmem:", 0)


def footprint(servers) -> dict:
    """PSS of the servers' main processes, of all their descendants (and how many), and the part of
    both that is shared memory (the process workers' weight segments in /dev/shm)."""
    out = dict(main=0, children=0, count=0, shmem=0)
    for server in servers:
        main = pss(server.proc.pid)
        kids = [pss(c.pid) for c in psutil.Process(server.proc.pid).children(recursive=True)]
        out["main"] += main[0]
        out["children"] += sum(k[0] for k in kids)
        out["count"] += len(kids)
        out["shmem"] += main[1] + sum(k[1] for k in kids)
    return out


def settled(servers) -> dict:
    """The smallest footprint of 8 samples 1 s apart, once idle (housekeeping runs after a prompt)."""
    for s in servers:
        s.wait_idle(600)
    samples = []
    for _ in range(8):
        samples.append(footprint(servers))
        time.sleep(1.0)
    return min(samples, key=lambda f: f["main"] + f["children"])


def memory(base: str) -> dict:
    """Per setup measured alone: PSS after every worker ran txt2img, and the shared checkpoint bytes."""
    out = {}
    for mode, n in (("thread", 1), ("thread", 4), ("process", 1), ("process", 4), ("stock", 4)):
        wait_quiet()
        setup = Setup(mode, n, base, fixtures_dir=fixtures())
        try:
            if mode == "stock":           # one stock process alone first, then the other three
                setup.servers[0].start(600)
                run_prompts(setup.workers()[:1], [wf.txt2img(1, "bench")])
                out[("stock", 1)] = settled(setup.servers[:1])
                start_all(setup.servers[1:])
                run_prompts(setup.workers()[1:], [wf.txt2img(2 + i, "bench") for i in range(n - 1)])
            else:
                start_all(setup.servers)
                setup.run([wf.txt2img(1 + i, "bench") for i in range(n)], pinned=True)
            out[(mode, n)] = settled(setup.servers)
            if mode != "stock":
                out[(mode, n)]["cached"] = setup.servers[0].get("/multigpu/models")["ram_cache"]["bytes"]
        finally:
            stop_all([setup])
    return out


def interleaved(setups, repeat: int, window) -> dict:
    """{mode: [window(setup) per repetition]}, the setups taking turns within each repetition."""
    runs = repeated(repeat, lambda: {setup.mode: window(setup) for setup in setups})
    return {m: [r[m] for r in runs] for m in MODES}


def measure(opts, base: str) -> dict:
    res = {"gil": {}, "model": {}, "noop": {}, "memory": {}, "forwards": {}}
    sizes = sorted({*((2, 4) if "gil" in opts.parts else ()), *((1, 2, 4) if "model" in opts.parts else ()),
                    *((2,) if "noop" in opts.parts else ())})
    for n in sizes:
        wait_quiet()
        setups = [Setup(mode, n, base, args=ATTENTION) for mode in MODES]
        try:
            start_all([s for setup in setups for s in setup.servers])
            if "gil" in opts.parts and n > 1:
                if "spin_s" not in res:       # size MGSpin to --seconds in a stock server
                    stock = setups[MODES.index("stock")].servers[0]
                    opts.blocks = round(opts.blocks * opts.seconds / spin_alone(stock, opts.blocks))
                    res["spin_s"] = spin_alone(stock, opts.blocks)
                res["gil"][n] = interleaved(setups, opts.repeat, lambda setup: 4 * n / setup.run(
                    [wf.spin(opts.blocks, i) for i in range(4 * n)])[0])
                _progress(f"gil n={n}", res["gil"][n])
            for key in opts.models if "model" in opts.parts else ():
                alone = warm(setups, key)     # forwards per prompt: sized once, in the first group
                forwards = res["forwards"].setdefault(key, max(1, round(MODEL_PROMPT_S * alone)))
                rates = res["model"][(key, n)] = interleaved(setups, opts.repeat,
                                                              lambda setup: model_rate(setup, key, forwards))
                _progress(f"model {key} n={n} ({forwards} forwards/prompt)", rates)
            if "noop" in opts.parts and n == 2:
                wait_quiet()
                res["noop"] = noop_latency(setups[:2])
                _progress("noop ms", {m: [v * 1000 for v in res["noop"][m]] for m in MODES[:2]})
        finally:
            stop_all(setups)
    if "memory" in opts.parts:
        res["memory"] = memory(base)
    return res


def _progress(label: str, values: dict) -> None:
    medians = {m: round(statistics.median(v), 2) for m, v in values.items()}
    print(f"{time.strftime('%H:%M:%S')} {label}: {medians}", file=sys.stderr)


def _spread(values, digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _row(first: str, rates: dict, digits: int) -> str:
    """A table row: the setups' median (min-max), then process / thread and process / stock."""
    thread, proc, stock = (statistics.median(rates[m]) for m in MODES)
    cells = " | ".join(_spread(rates[m], digits) for m in MODES)
    return f"| {first} | {cells} | {proc / thread:.2f} | {proc / stock:.2f} |"


HEAD = "thread mode | process mode | N stock processes | process / thread | process / stock |"


def gil_table(res, opts) -> list[str]:
    return ["", f"GIL-holding node: `MGSpin` ({opts.blocks} blocks, sized to {opts.seconds:g} s on one core; "
            f"{res['spin_s']:.2f} s alone in a stock server), 4 x N prompts submitted at once per window, prompts/s "
            f"until all are in history (ceiling of {os.cpu_count()} cores: {os.cpu_count() / res['spin_s']:.2f}/s):",
            "", f"| workers | {HEAD}", "|---" * 6 + "|"] + [_row(str(n), r, 2) for n, r in res["gil"].items()]


def model_table(res, opts) -> list[str]:
    rows = sorted(res["model"].items(), key=lambda kv: (opts.models.index(kv[0][0]), kv[0][1]))
    return ["", f"Real model code: `MGBenchForward`, {MODEL_PROMPTS_PER_WORKER} x N prompts per window, each "
            f"about {MODEL_PROMPT_S:g} s of forwards on one core; aggregate forwards/s over the nodes' own "
            "timestamps, the model built and warmed in every worker first:", "",
            f"| model | workers | forwards/prompt | {HEAD}", "|---" * 8 + "|"] + \
        [_row(f"{key} | {n} | {res['forwards'][key]}", r, 1) for (key, n), r in rows]


def noop_table(res) -> list[str]:
    ms = {m: sorted(v * 1000 for v in res["noop"][m]) for m in MODES[:2]}
    p90 = {m: v[int(round(0.9 * (len(v) - 1)))] for m, v in ms.items()}
    median = {m: statistics.median(v) for m, v in ms.items()}
    return ["", f"Fixed cost of a no-op prompt (`MGSleep(0)`, 2 workers): {NOOP_ROUNDS} prompts per mode sent one "
            "at a time, alternating, milliseconds from POST /prompt to its closing `executing` event:", "",
            "| mode | median | p90 | min-max |", "|---|---|---|---|"] + \
        [f"| {m} | {median[m]:.1f} | {p90[m]:.1f} | {ms[m][0]:.1f}-{ms[m][-1]:.1f} |" for m in ms] + \
        ["", f"The hop to a child process adds {median['process'] - median['thread']:.1f} ms per prompt "
         f"(median; {p90['process'] - p90['thread']:.1f} ms at p90)."]


def memory_table(res) -> list[str]:
    mem = res["memory"]
    total = {key: (f["main"] + f["children"]) / MIB for key, f in mem.items()}
    lines = ["", "Memory: PSS summed over the server's main process and all its descendants after every worker "
             "ran `txt2img` on the tiny checkpoint (settled; each setup measured alone), MiB:", "",
             "| setup | PSS, total | main process | child processes | of the total, shared memory (`Pss_Shmem`) "
             "| checkpoint in the RAM cache (`ram_cache.bytes`) |", "|---" * 6 + "|"]
    for (mode, n), f in mem.items():
        label = f"{mode} mode, {n} worker{'s' * (n > 1)}" if mode != "stock" else \
            f"{n} stock process{'es (sum)' * (n > 1)}"
        cached = f"{f['cached'] / MIB:.0f}" if "cached" in f else "-"
        lines.append(f"| {label} | {total[(mode, n)]:.0f} | {f['main'] / MIB:.0f} | {f['children'] / MIB:.0f} "
                     f"({f['count']}) | {f['shmem'] / MIB:.0f} | {cached} |")
    grow = {m: total[(m, 4)] - total[(m, 1)] for m in MODES}
    kids = mem[("process", 4)]
    return lines + ["", f"From 1 to 4 workers: thread mode +{grow['thread']:.0f} MiB, process mode "
                    f"+{grow['process']:.0f} MiB ({grow['process'] / 3:.0f} per extra child; with 4, a child holds "
                    f"{(kids['children'] - kids['shmem']) / kids['count'] / MIB:.0f} MiB besides shared memory), stock "
                    f"+{grow['stock']:.0f} MiB ({grow['stock'] / 3:.0f} per extra process). With 4 workers, "
                    f"process / thread {total[('process', 4)] / total[('thread', 4)]:.2f}, process / stock "
                    f"{total[('process', 4)] / total[('stock', 4)]:.2f}."]


def report(res, opts, command: str) -> str:
    lines = [f"Run {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores ({platform.machine()}), Python "
             f"{platform.python_version()}, torch {importlib.metadata.version('torch')} (CPU, `--cpu`), command "
             f"`{command}`: {opts.repeat} repetitions interleaved (thread, process, stock for each worker count), "
             "median (min-max). Stock: N ComfyUI processes (`COMFY_MULTI_GPU_SCHED=0`) fed round-robin."]
    for part, table in (("gil", gil_table), ("model", model_table)):
        if res[part]:
            lines += table(res, opts)
    for part, table in (("noop", noop_table), ("memory", memory_table)):
        if res[part]:
            lines += table(res)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="gil,model,noop,memory")
    parser.add_argument("--models", default="sd15,sdxl,flux,wan")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--write", action="store_true")
    opts = parser.parse_args()
    opts.parts = {p.strip() for p in opts.parts.split(",") if p.strip()}
    opts.models = [k.strip() for k in opts.models.split(",") if k.strip()]
    command = "scripts/run_bench.sh bench/bench_workers.py " + " ".join(sys.argv[1:])
    started = time.monotonic()
    wait_quiet()
    opts.blocks = wf.spin_blocks(opts.seconds)
    with tempfile.TemporaryDirectory(prefix="cmg-bench-workers-") as base:
        res = measure(opts, base)
    text = report(res, opts, command.strip())
    print(text)
    print(f"total {time.monotonic() - started:.0f} s, of which {sum(WAITED):.0f} s waiting for other runs",
          file=sys.stderr)
    if opts.write:
        write_section("workers", text)


if __name__ == "__main__":
    main()
