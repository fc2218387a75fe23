"""End-to-end check of a running server (stdlib only): every worker up, one prompt per GPU completes
on that GPU, /queue/all consistent. `python -m comfy_multigpu.tools.quick_check --url URL`; exit 1 on failure.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
import uuid


def http(url: str, body=None, headers=None, timeout=30):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def probe_prompt(tag: str) -> dict:
    """Stock nodes only: an 8x8 image previewed (a temp file), so nothing lands in output/."""
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                         "color": int(tag[:6], 16)}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}


def run_checks(base: str, timeout: float) -> list[tuple[str, bool, str]]:
    results = []
    try:
        state = http(f"{base}/queue/all?counts=1")
    except urllib.error.HTTPError as ex:
        return [("multi-GPU extension active (/queue/all)", False, f"HTTP {ex.code}: is the extension enabled?")]
    except OSError as ex:
        return [("server reachable", False, str(ex))]
    queues = state["queues"]
    down = [q["gpu_id"] for q in queues if not q["up"]]
    results.append((f"{len(queues)} workers up", not down, f"down: {down}" if down else ""))
    submitted = {}
    for q in queues:
        gpu = q["gpu_id"]
        answer = http(f"{base}/prompt", {"prompt": probe_prompt(uuid.uuid4().hex)}, {"X-TARGET-GPU": str(gpu)})
        submitted[answer["prompt_id"]] = gpu
        results.append((f"GPU {gpu}: prompt accepted for GPU {gpu}", answer.get("gpu_id") == gpu,
                        f"answered gpu_id={answer.get('gpu_id')}"))
    deadline = time.time() + timeout
    pending = dict(submitted)
    started = time.time()
    while pending and time.time() < deadline:
        for pid in list(pending):
            entry = http(f"{base}/history/{pid}").get(pid)
            if entry is not None:
                gpu = pending.pop(pid)
                ok = entry.get("gpu_id") == gpu and entry["status"]["status_str"] == "success"
                results.append((f"GPU {gpu}: prompt completed on GPU {gpu}", ok,
                                f"{time.time() - started:.2f} s, ran on {entry.get('gpu_id')}, "
                                f"{entry['status']['status_str']}"))
        time.sleep(0.05)
    for gpu in pending.values():
        results.append((f"GPU {gpu}: prompt completed", False, f"not in history after {timeout:.0f} s"))
    full, counts = http(f"{base}/queue/all"), http(f"{base}/queue/all?counts=1")
    consistent = all(len(q["queue_running"]) == q["running_count"] and len(q["queue_pending"]) == q["pending_count"]
                     for q in full["queues"])
    consistent &= full["total_running"] == sum(q["running_count"] for q in full["queues"])
    consistent &= full["total_pending"] == sum(q["pending_count"] for q in full["queues"])
    consistent &= [q["gpu_id"] for q in counts["queues"]] == list(range(len(queues)))
    results.append(("/queue/all consistent (lists, counts, totals)", consistent, ""))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8188")
    parser.add_argument("--timeout", type=float, default=120.0)
    opts = parser.parse_args(argv)
    results = run_checks(opts.url.rstrip("/"), opts.timeout)
    width = max(len(name) for name, _, _ in results)
    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name.ljust(width)}  {detail}")
    failed = sum(not ok for _, ok, _ in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
