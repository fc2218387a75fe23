"""scripts/gpu_check.sh keeps working on machines without a GPU (issue 14): --dry-run runs every
check's CPU path (device binding, per-device freeing and the quick end-to-end test on one 2-worker
CPU server, a short host ceiling, process workers, sequence parallelism on CPU rank threads at a tiny
width) and reports the CUDA-only checks as skipped; a check that fails or
hangs becomes a FAIL row, within the run's budget, while the others still run; without --dry-run and
without CUDA the script refuses loudly instead of printing a table."""
import re
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
CUDA_ONLY = {"3", "4"}


def run(*args, timeout=300):
    started = time.monotonic()
    proc = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return proc, time.monotonic() - started


def table(text: str) -> dict:
    """{check number: [(check, result, figure, note), ...]} from the markdown table in `text`."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| check |"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows.setdefault(cells[0].split(".")[0], []).append(tuple(cells))
    return rows


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "table.md"
    proc, took = run("--dry-run", "--out", str(out))
    return proc, out, took


def test_a_dry_run_passes_every_check_it_can_run_on_the_cpu(dry_run):
    proc, _, took = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = table(proc.stdout)
    for number in ("1", "2", "5", "6", "7", "8"):
        assert rows[number] and all(row[1] == "PASS" for row in rows[number]), rows[number]
    assert "(cpu,cpu)" in rows["1"][0][0]
    assert "GPU 1's kept" in rows["2"][0][2]
    assert "threads 1/2" in rows["5"][0][2] and "processes 1/2" in rows["5"][0][2]
    assert "loaded once, mapped by both" in rows["7"][0][2]
    assert len(rows["8"]) == 7 and "local-only attention" in rows["8"][0][2] and "floor" in rows["8"][1][2]
    assert "tiles per rank" in rows["8"][-2][2]
    assert all(f"{name} N={n}" in rows["8"][-1][2] for name in ("FLUX.2", "Qwen-Image", "Wan 2.1", "HunyuanVideo")
               for n in (2, 4))
    assert took < 200, f"the dry run took {took:.0f} s; CI budgets about two minutes for it"


def test_the_table_lists_every_check_and_the_cuda_only_ones_say_skipped(dry_run):
    rows = table(dry_run[0].stdout)
    assert sorted(rows) == ["1", "2", "3", "4", "5", "6", "7", "8"]
    for number in CUDA_ONLY:
        assert [row[1] for row in rows[number]] == ["skipped: needs CUDA"]


def test_the_table_goes_to_stdout_and_to_the_out_file(dry_run):
    proc, out, _ = dry_run
    text = out.read_text()
    assert text.startswith("Run ") and "DRY RUN" in text.splitlines()[0]
    assert text in proc.stdout
    assert f"table in {out}" in proc.stderr


def test_a_failing_check_is_a_fail_row_with_its_error_and_the_others_still_run():
    proc, _ = run("--dry-run", "--only", "pinned,ceiling,vram", "--inject", "ceiling=raise")
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = table(proc.stdout)
    assert rows["5"][0][1] == "FAIL" and "RuntimeError: injected failure in ceiling" in rows["5"][0][3]
    assert rows["3"][0][1] == rows["4"][0][1] == "skipped: needs CUDA"


def test_a_hung_check_is_killed_when_the_budget_runs_out():
    proc, took = run("--dry-run", "--only", "ceiling", "--inject", "ceiling=hang", "--budget", "20")
    assert proc.returncode == 1, proc.stderr[-3000:]
    result, note = table(proc.stdout)["5"][0][1:4:2]
    assert result == "FAIL" and note.startswith("timed out after"), note
    assert took < 40


def test_without_dry_run_and_without_cuda_it_refuses_loudly():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the full check would run")
    proc, _ = run()
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "NO CUDA DEVICE" in proc.stderr and "--dry-run" in proc.stderr
