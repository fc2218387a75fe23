"""The GPU check (issue 14): every check that needs CUDA in one run of under 8 minutes on one GPU, its
figures as a markdown table. --dry-run runs the same code paths on the CPU, the CUDA-only checks
skipped, so CI keeps it working.

    scripts/gpu_check.sh [--dry-run] [--out FILE] [--budget 480] [--only binding,...] [--write]

1. binding: a real server with COMFY_MULTIGPU_DEVICES=cuda:0,cuda:0 (dry run: cpu,cpu); /queue/all
   lists both workers on that device and a probe prompt on each sees it, in its worker thread and in a
   helper thread (the node pack's MGProbe).
2. freeing: both workers load the tiny checkpoint; while GPU 1 holds its copy, POST /free for GPU 0
   unloads GPU 0's copy only (GET /multigpu/models, MGHoldModel's stayed_loaded); on CUDA also the
   device memory that came free (the worker's free-memory reading).
3. pinned (CUDA only): with ComfyUI's classes in this process, two views of the tiny checkpoint share
   host storage; pinning it through both (the weights-pin/unpin patches) registers it once and only the
   last unpin unregisters it; the stock functions, for contrast.
4. vram (CUDA only): an SD1.5-size random checkpoint (about 2.1 GB, fp16) loaded from RAM onto
   cuda:0 by ComfyUI's load_models_gpu, through a view as a worker gets it, against a plain tensor
   host-to-device copy of the same size (pageable and pinned), GB/s each.
5. ceiling: bench_gil.py's real model classes at small resolution on cuda:0, N = 1, 2, 4 threads in one
   process vs N processes (dry run: SD1.5 only, N = 1, 2, half-second windows on the CPU).
6. quick: comfy_multigpu.tools.quick_check (scripts/quick_test.sh) against the server of check 1.
7. process: a second server with COMFY_MULTIGPU_WORKER_MODE=process, two workers on the device: each
   child reports that device, the tiny checkpoint is loaded once and mapped by both, txt2img on each.
8. sp (gpu_check_sp.py): sequence parallelism (issue 17) as N rank threads on one device (cuda:0 N
   times), ComfyUI's classes in this process: a small Flux on N = 2, 3, 4 ranks equals one rank in fp32
   (TF32 off; a broken variant must fail), and in bf16 stays within bf16's own noise floor; one forward
   of FLUX.1-dev's real shape (bf16, about 24 GB, 1024 px) timed with 1, 2, 4 ranks, device time and host
   (dispatch) time, the exchanges; an SD VAE's tiled decode spread over 2 ranks equals the host's own;
   FLUX.2, Qwen-Image, Wan and HunyuanVideo at small width on N = 2, 4 ranks equal one rank in fp32
   (dry run: the same at a tiny width).

Each check runs in a child process with a timeout (its own cap, and never past the run's budget), so a
hung check cannot eat the run; a failing one is a FAIL row with its error and the others still run.
Exit 1 if any check failed; 2 without CUDA unless --dry-run. The table goes to stdout and to --out
(default: a file under the cache, with the checks' logs beside it). --write puts it in the "gpu"
section of docs/benchmarks.md (a full run on a GPU only). `--inject STEP=raise|hang` makes a check
fail or hang on purpose: how tests/test_gpu_check.py sees the FAIL and timeout paths.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))                                  # comfy_multigpu
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared import comfyui_dir, write_section  # noqa: E402
from gpu_checks import (  # noqa: E402
    FAIL, SKIP, Row, check_binding, check_ceiling, check_freeing, check_pinned, check_process, check_quick,
    check_vram,
    start_server,
)
from gpu_check_sp import check_sp  # noqa: E402


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    needs_cuda: bool
    server: bool            # runs against the one server of checks 1, 2 and 6
    cap_s: float            # timeout on a GPU
    cap_dry_s: float        # timeout under --dry-run
    run: Callable[[dict], list]


STEPS = [
    Step("binding", "1. worker device binding", False, True, 90, 60, check_binding),
    Step("freeing", "2. per-device freeing", False, True, 150, 90, check_freeing),
    Step("sp", "8. sequence parallel, N rank threads on one device", False, False, 200, 60, check_sp),
    Step("pinned", "3. pinned host memory shared by views", True, False, 120, 0, check_pinned),
    Step("vram", "4. RAM -> VRAM vs host-to-device copy", True, False, 180, 0, check_vram),
    Step("ceiling", "5. host ceiling, threads vs processes", False, False, 300, 90, check_ceiling),
    Step("quick", "6. quick end-to-end test", False, True, 90, 60, check_quick),
    Step("process", "7. process workers", False, False, 300, 200, check_process),
]   # run in this order, the server's checks first (check 8 before the long 3-5 and 7); the table by number
SERVER_START_S = {"cuda": 180, "cpu": 120}
CEILING_MODELS = ("sd15", "sdxl", "flux", "wan")


# ---- the driver --------------------------------------------------------------------------------

def probe_cuda() -> dict:
    code = ("import json, torch; ok = torch.cuda.is_available(); "
            "p = torch.cuda.get_device_properties(0) if ok else None; "
            "print(json.dumps({'ok': ok, 'torch': torch.__version__, 'cuda': torch.version.cuda, "
            "'name': p and p.name, 'memory': p and p.total_memory}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        error = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "torch": f"? (importing it failed: {error})", "cuda": None}
    return json.loads(out.stdout.strip().splitlines()[-1])


def last_error(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def run_child(step: Step, ctx: dict, work: Path, timeout: float) -> list:
    """One check in a child process of its own session, killed with everything it started (the host
    ceiling's worker processes) when `timeout` runs out."""
    log, result, ctx_file = work / f"{step.name}.log", work / f"{step.name}.json", work / f"{step.name}.context.json"
    ctx_file.write_text(json.dumps(ctx))
    logs = f"log: {log}" + (f", server log: {Path(ctx['base']) / 'comfyui.log'}" if step.server else "")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--step", step.name, "--context", str(ctx_file),
                                 "--result", str(result)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return [Row(step.title, FAIL, "-", f"timed out after {timeout:.0f} s ({logs})")]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if rc != 0 or not result.exists():
        return [Row(step.title, FAIL, "-", f"{last_error(log)} (exit {rc}; {logs})")]
    return [Row(**r) for r in json.loads(result.read_text())]


def run_all(opts, mode: str, work: Path, deadline: float) -> dict:
    """The chosen checks, the server's first (it stops before the others run), as {name: rows}."""
    ctx = {"mode": mode, "device": "cuda:0" if mode == "cuda" else "cpu", "comfyui_dir": str(comfyui_dir()),
           "base": str(work / "server"), "url": None, "inject": opts.inject,
           "ceiling": {"models": opts.ceiling_models or (list(CEILING_MODELS) if mode == "cuda" else ["sd15"]),
                       "workers": [1, 2, 4] if mode == "cuda" else [1, 2],
                       "seconds": opts.ceiling_seconds or (2.0 if mode == "cuda" else 0.5), "repeat": 1}}
    steps = sorted((s for s in STEPS if opts.only is None or s.name in opts.only), key=lambda s: not s.server)
    rows, server, server_error = {}, None, None
    try:
        for step in steps:
            started = time.monotonic()
            if not step.server and server is not None:
                server.stop()
                server = None
            if step.needs_cuda and mode != "cuda":
                rows[step.name] = [Row(step.title, SKIP, "-", "--dry-run")]
            else:
                if step.server and server is None and server_error is None and deadline - time.monotonic() > 5:
                    try:
                        timeout = min(SERVER_START_S[mode], deadline - time.monotonic())
                        server = start_server(mode, work / "server", timeout)
                        ctx["url"] = server.url
                    except Exception as ex:    # every check on the server fails with this
                        server_error = f"server did not start: {str(ex).splitlines()[0]}"
                left = deadline - time.monotonic()
                if left <= 5:
                    rows[step.name] = [Row(step.title, FAIL, "-", f"not run: the {opts.budget:g} s budget was spent")]
                elif step.server and server is None:
                    rows[step.name] = [Row(step.title, FAIL, "-", server_error)]
                else:
                    cap = step.cap_s if mode == "cuda" else step.cap_dry_s
                    rows[step.name] = run_child(step, ctx, work, min(cap, left))
            print(f"gpu_check: {step.title}: {', '.join(r.result for r in rows[step.name])} "
                  f"({time.monotonic() - started:.1f} s)", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()
    return {s.name: rows[s.name] for s in sorted(STEPS, key=lambda s: int(s.title.split(".")[0])) if s.name in rows}


def table(rows: dict, header: str) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")
    lines = [header, "", "| check | result | figure | note |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(cell(v) for v in asdict(r).values())} |" for group in rows.values() for r in group]
    return "\n".join(lines) + "\n"


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU only: CUDA-only checks skipped")
    parser.add_argument("--out", type=Path, help="also write the table here (default: under the cache)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    parser.add_argument("--only", type=lambda v: v.split(","), help="comma-separated checks: "
                        + ",".join(s.name for s in STEPS))
    parser.add_argument("--ceiling-models", type=lambda v: v.split(","), help="bench_gil models for check 5")
    parser.add_argument("--ceiling-seconds", type=float, help="window per rate in check 5")
    parser.add_argument("--write", action="store_true", help='the table into docs/benchmarks.md ("gpu")')
    parser.add_argument("--inject", action="append", default=[], help=argparse.SUPPRESS)
    for name in ("--step", "--context", "--result"):                  # a child process: one check
        parser.add_argument(name, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    unknown = sorted(set(opts.only or ()) - {s.name for s in STEPS})
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}; expected some of {','.join(s.name for s in STEPS)}")
    if opts.write and (opts.dry_run or opts.only):
        parser.error("--write records a full run on a GPU: not with --dry-run or --only")
    opts.inject = dict(item.split("=", 1) for item in opts.inject)
    return opts


def child(opts) -> int:
    ctx = json.loads(Path(opts.context).read_text())
    fault = ctx["inject"].get(opts.step)
    if fault == "hang":
        time.sleep(10 ** 6)
    if fault == "raise":
        raise RuntimeError(f"injected failure in {opts.step}")
    rows = next(s for s in STEPS if s.name == opts.step).run(ctx)
    Path(opts.result).write_text(json.dumps([asdict(r) for r in rows]))
    return 0


def main(argv=None) -> int:
    opts = parse(argv)
    if opts.step:
        return child(opts)
    started = time.monotonic()
    cuda = probe_cuda()
    if not cuda["ok"] and not opts.dry_run:
        print(f"gpu_check: NO CUDA DEVICE: torch {cuda['torch']} (CUDA build {cuda['cuda']}) sees no GPU here, and "
              f"these checks need one. Run it on a GPU machine, or with --dry-run to run the checks' code paths "
              f"on the CPU (CUDA-only checks skipped).", file=sys.stderr)
        return 2
    mode = "cuda" if not opts.dry_run else "cpu"
    cache = Path(os.environ.get("COMFY_MULTIGPU_CACHE", Path.home() / ".cache" / "comfy-multigpu"))
    (cache / "gpu-check").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=cache / "gpu-check"))
    rows = run_all(opts, mode, work, started + opts.budget)
    where = (f"{cuda['name']} ({cuda['memory'] / 2 ** 30:.0f} GiB)" if mode == "cuda"
             else "the CPU, DRY RUN (--dry-run: CUDA-only checks skipped, figures are the CPU's)")
    command = " ".join(["scripts/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])])
    header = (f"Run {time.strftime('%Y-%m-%d')} on {where}, {os.cpu_count()} CPU cores ({platform.machine()}), "
              f"Python {platform.python_version()}, torch {cuda['torch']}, command `{command}`: "
              f"{time.monotonic() - started:.0f} s of the {opts.budget:g} s budget.")
    text = table(rows, header)
    out = opts.out or work / "gpu_check.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"gpu_check: table in {out}, logs in {work}", file=sys.stderr)
    if opts.write:
        write_section("gpu", text)
    return 1 if any(r.result == FAIL for group in rows.values() for r in group) else 0


if __name__ == "__main__":
    sys.exit(main())
