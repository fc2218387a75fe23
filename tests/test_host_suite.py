"""ComfyUI's own execution suites (tests/execution in the pinned tree) pass against servers running
the extension with 2 workers: once with default routing, once with process workers
(COMFY_MULTIGPU_WORKER_MODE=process: each GPU's prompts in a child process) and every request pinned
to GPU 1 (one run for both, to keep the suite's time), and once through machine "a" of a two-machine
fleet (COMFY_MULTIGPU_FLEET, a real redis-server).
The host's tests start their own servers (python main.py ... --cpu); COMFY_NUM_GPUS=2 in their
environment and the extension linked into the host's custom_nodes/ make those servers ours."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.comfy_server import free_port
from helpers.redis_server import RedisServer

HERE = Path(__file__).resolve().parent
SUITES = ["tests/execution/test_execution.py", "tests/execution/test_async_nodes.py",
          "tests/execution/test_progress_isolation.py", "tests/execution/test_public_api.py"]


@pytest.mark.parametrize("pin, mode", [(None, "thread"), ("1", "process")],
                         ids=["default-routing", "process-workers-pinned-gpu1"])
def test_comfyui_execution_suites_pass_with_two_workers(comfyui_dir, tmp_path, pin, mode):
    link = comfyui_dir / "custom_nodes" / "comfy-multigpu"
    assert link.resolve() == HERE.parent, f"{link} must link to this checkout (scripts/bootstrap.py does it)"
    report = tmp_path / "placements.json"
    # COMFY_MULTIGPU_JOURNAL=off: the host's suite kills and restarts its servers and expects each to
    # start with an empty history, as stock (memory only) does; the journal deliberately keeps history
    # and unfinished prompts across restarts (tests/test_reliability.py covers it).
    env = dict(os.environ, COMFY_NUM_GPUS="2", PYTHONPATH=str(HERE / "helpers"),
               COMFY_MULTIGPU_TEST_REPORT=str(report), COMFY_MULTIGPU_JOURNAL="off",
               COMFY_MULTIGPU_WORKER_MODE=mode,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("COMFY_MULTI_GPU_SCHED", None)
    env.pop("COMFY_MULTIGPU_TEST_PIN", None)
    if pin is not None:
        env["COMFY_MULTIGPU_TEST_PIN"] = pin
    cmd = [sys.executable, "-m", "pytest", *SUITES, "-q", "-p", "pin_gpu_plugin", "-p", "no:cacheprovider",
           "--port", str(free_port()), "--output_dir", str(tmp_path / "out"), "-o", "addopts="]
    proc = subprocess.run(cmd, cwd=comfyui_dir, env=env, capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-4000:]
    assert proc.returncode == 0, tail
    summary = [l for l in proc.stdout.splitlines() if " passed" in l][-1]
    assert "195 passed" in summary and "failed" not in summary, summary
    placements = json.loads(report.read_text())
    counts = {gpu: placements.count(gpu) for gpu in set(placements)}
    assert len(placements) > 100, counts
    if pin is None:
        # The host's tests mostly queue one prompt and wait for it: the least loaded GPU is then
        # GPU 0 each time (ties go to the lowest index); overlapping prompts spread to GPU 1.
        assert set(counts) <= {0, 1}, counts
    else:
        assert set(counts) == {1}, counts


def test_comfyui_execution_suites_pass_through_one_machine_of_a_two_machine_fleet(comfyui_dir, tmp_path):
    """Every server the host's tests start is machine "a" of a fleet and gets a twin, machine "b", with
    the same arguments (tests/helpers/pin_gpu_plugin.py): prompts go through Redis and run on either."""
    redis = RedisServer(tmp_path / "redis").start()
    second = tmp_path / "second"
    second.mkdir()
    env = dict(os.environ, COMFY_NUM_GPUS="2", PYTHONPATH=str(HERE / "helpers"), COMFY_MULTIGPU_JOURNAL="off",
               COMFY_MULTIGPU_FLEET=redis.url, COMFY_MULTIGPU_NODE_NAME="a",
               COMFY_MULTIGPU_TEST_SECOND_MACHINE=str(second),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for key in ("COMFY_MULTI_GPU_SCHED", "COMFY_MULTIGPU_TEST_PIN", "COMFY_MULTIGPU_WORKER_MODE"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "pytest", *SUITES, "-q", "-p", "pin_gpu_plugin", "-p", "no:cacheprovider",
           "--port", str(free_port()), "--output_dir", str(tmp_path / "out"), "-o", "addopts="]
    try:
        proc = subprocess.run(cmd, cwd=comfyui_dir, env=env, capture_output=True, text=True, timeout=900)
        nodes = json.loads((second / "nodes.json").read_text())
    finally:
        redis.stop()
    tail = proc.stdout[-4000:]
    assert proc.returncode == 0, tail
    summary = [line for line in proc.stdout.splitlines() if " passed" in line][-1]
    assert "195 passed" in summary and "failed" not in summary, summary
    assert sum(nodes.values()) > 100 and set(nodes) <= {"a", "b"}, nodes
    print("prompts per machine:", nodes)
