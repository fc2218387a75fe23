"""What the benchmark scripts share: where the pinned ComfyUI is, timing a call (p50/p99), and writing a
result section into docs/benchmarks.md between its `<!-- name:begin -->` / `<!-- name:end -->` markers."""
from __future__ import annotations

import os
import statistics
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pinned_commit() -> str:
    """The ComfyUI commit of patches/manifest.toml's [host] table, the one place it is written."""
    return tomllib.loads((REPO / "patches" / "manifest.toml").read_text(encoding="utf-8"))["host"]["commit"]


def comfyui_dir() -> Path:
    cache = Path(os.environ.get("COMFY_MULTIGPU_CACHE", Path.home() / ".cache" / "comfy-multigpu"))
    return Path(os.environ.get("COMFYUI_DIR", cache / f"comfyui-{pinned_commit()}"))


def write_section(name: str, text: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc = REPO / "docs" / "benchmarks.md"
    head, rest = doc.read_text().split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{text}{end}{tail}")


def percentiles(samples) -> tuple[float, float]:
    """(p50, p99) in milliseconds of samples in seconds."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return statistics.median(ordered) * 1000, p99 * 1000


def timed(fn, n: int) -> tuple[float, float]:
    """(p50, p99) in milliseconds of `n` sequential calls of fn()."""
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return percentiles(samples)
