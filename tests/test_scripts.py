"""The README's commands and the scripts: start_multi_gpu.sh starts a real multi-worker server
(extra arguments reach main.py), quick_test.sh checks it, bootstrap fails with a clear message
when no ComfyUI can be found, stop_multi_gpu.sh stops only the server of $PORT (or every one with
--all) and never signals a process that is not that ComfyUI, and every shell script is clean under
shellcheck when it is present."""
import os
import shutil
import sys
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers.comfy_server import ComfyServer, free_port

REPO = Path(__file__).resolve().parents[1]


def test_start_script_runs_a_multi_worker_server_and_quick_test_passes(comfyui_dir, tmp_path):
    port = free_port()
    for d in ("out", "in", "user"):
        (tmp_path / d).mkdir()
    env = dict(os.environ, PORT=str(port), COMFY_NUM_GPUS="3", COMFYUI_DIR=str(comfyui_dir))
    env.pop("COMFY_MULTI_GPU_SCHED", None)
    args = ["--output-directory", str(tmp_path / "out"), "--input-directory", str(tmp_path / "in"),
            "--user-directory", str(tmp_path / "user"), "--temp-directory", str(tmp_path),
            "--database-url", f"sqlite:///{tmp_path / 'db.sqlite'}"]
    log = open(tmp_path / "start.log", "w")
    proc = subprocess.Popen([str(REPO / "scripts/start_multi_gpu.sh"), *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        probe = ComfyServer(comfyui_dir, tmp_path)
        probe.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if all(q["up"] for q in probe.get("/queue/all", counts=1)["queues"]):
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "start.log").read_text()[-3000:]
            time.sleep(0.5)
        text = (tmp_path / "start.log").read_text()
        assert "no CUDA device visible; starting ComfyUI with --cpu" in text
        for gpu in range(3):
            assert f"[GPU {gpu}] Worker started on cpu" in text
        assert "comfy-multigpu: ComfyUI 0.33.0, 3 workers on cpu, cpu, cpu" in text
        assert str(tmp_path / "out") in probe.get("/system_stats")["system"]["argv"]
        check = subprocess.run([str(REPO / "scripts/quick_test.sh"), probe.url], capture_output=True, text=True,
                               timeout=120)
        assert check.returncode == 0, check.stdout
        assert "8 passed, 0 failed" in check.stdout
        stop = subprocess.run([str(REPO / "scripts/stop_multi_gpu.sh"), str(port)], capture_output=True,
                              text=True, timeout=90)
        assert stop.returncode == 0 and f"port {port}: stopped pid {proc.pid}" in stop.stdout, stop.stderr
        proc.wait(30)                     # the start script exec'd ComfyUI: its pid is the server's
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()


def test_stop_script_never_signals_a_process_that_is_not_our_comfyui(tmp_path):
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / "comfyui-8799.pid").write_text(str(bystander.pid))
        env = dict(os.environ, COMFY_MULTIGPU_CACHE=str(tmp_path), PORT="8799")
        stop = subprocess.run([str(REPO / "scripts/stop_multi_gpu.sh")], env=env, capture_output=True, text=True,
                              timeout=30)
        assert stop.returncode == 0
        assert "not our ComfyUI" in stop.stderr
        assert bystander.poll() is None
        assert not (run_dir / "comfyui-8799.pid").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_quick_test_fails_when_no_server_answers():
    check = subprocess.run([str(REPO / "scripts/quick_test.sh"), f"http://127.0.0.1:{free_port()}"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 1
    assert "FAIL  server reachable" in check.stdout


def test_bootstrap_without_comfyui_says_what_to_set(tmp_path):
    env = dict(os.environ, COMFYUI_DIR=str(tmp_path / "nowhere"))
    proc = subprocess.run(["python3", str(REPO / "scripts/bootstrap.py")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "COMFYUI_DIR" in proc.stderr and "not a ComfyUI checkout" in proc.stderr
    env = dict(os.environ, COMFY_MULTIGPU_CACHE=str(tmp_path / "cache"), COMFYUI_REPO=str(tmp_path / "no-repo"))
    env.pop("COMFYUI_DIR", None)
    proc = subprocess.run(["python3", str(REPO / "scripts/bootstrap.py")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "Set COMFYUI_DIR" in proc.stderr and "COMFYUI_REPO" in proc.stderr


def test_start_script_help_lists_the_settings():
    out = subprocess.run([str(REPO / "scripts/start_multi_gpu.sh"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in ("PORT", "LISTEN", "COMFY_NUM_GPUS", "COMFY_MULTI_GPU_SCHED", "CUDA_VISIBLE_DEVICES", "COMFYUI_DIR"):
        assert name in out.stdout


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "scripts").glob("*.sh")))
def test_every_script_has_usage_text(script):
    out = subprocess.run([str(REPO / "scripts" / script), "--help"], capture_output=True, text=True, timeout=30)
    assert "Usage:" in out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is installed by .ci/run")
def test_shell_scripts_are_clean_under_shellcheck():
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "scripts").rglob("*.sh")) + [".ci/run"]
    assert "scripts/lib/managed_env.sh" in scripts
    proc = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_stop_script_kills_a_server_that_ignores_sigterm_after_the_timeout(tmp_path):
    fake = tmp_path / "main.py"
    fake.write_text("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                    "print('ready', flush=True)\ntime.sleep(120)\n")
    server = subprocess.Popen([sys.executable, str(fake), "--port", "8797", "--cpu"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "comfyui-8797.pid").write_text(str(server.pid))
        env = dict(os.environ, COMFY_MULTIGPU_CACHE=str(tmp_path), STOP_TIMEOUT="1")
        stop = subprocess.run([str(REPO / "scripts/stop_multi_gpu.sh"), "8797"], env=env, capture_output=True,
                              text=True, timeout=30)
        assert stop.returncode == 0
        assert "still running after 1 s; sending SIGKILL" in stop.stderr
        assert server.wait(10) == -signal.SIGKILL
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _fake_comfyui(tmp_path, port):
    """A process that looks like the ComfyUI start_multi_gpu.sh exec's (main.py --port PORT), and its
    pid file in tmp_path/run, as the start script writes it."""
    fake = tmp_path / "main.py"
    fake.write_text("import time\nprint('ready', flush=True)\ntime.sleep(120)\n")
    server = subprocess.Popen([sys.executable, str(fake), "--listen", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / f"comfyui-{port}.pid").write_text(f"{server.pid}\n")
    return server


def _stop(tmp_path, *args, port=None):
    """Run stop_multi_gpu.sh on tmp_path's pid files, with PORT=port (unset when None)."""
    env = {k: v for k, v in os.environ.items() if k != "PORT"}
    env.update(COMFY_MULTIGPU_CACHE=str(tmp_path), STOP_TIMEOUT="10", **({"PORT": port} if port else {}))
    return subprocess.run([str(REPO / "scripts/stop_multi_gpu.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=30)


def _end(*procs):
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_stop_script_with_PORT_stops_that_server_and_leaves_the_other_ports_alone(tmp_path):
    mine, other = _fake_comfyui(tmp_path, 8795), _fake_comfyui(tmp_path, 8796)
    try:
        stop = _stop(tmp_path, port="8795")
        assert stop.returncode == 0, stop.stderr
        assert f"port 8795: stopped pid {mine.pid}" in stop.stdout
        assert mine.wait(10) == -signal.SIGTERM
        assert not (tmp_path / "run" / "comfyui-8795.pid").exists()
        assert other.poll() is None
        assert (tmp_path / "run" / "comfyui-8796.pid").read_text().strip() == str(other.pid)
    finally:
        _end(mine, other)


def test_stop_script_without_PORT_stops_only_the_default_port_8188(tmp_path):
    other = _fake_comfyui(tmp_path, 8794)
    try:
        stop = _stop(tmp_path)
        assert stop.returncode == 0
        assert "comfyui-8188.pid" in stop.stderr
        assert other.poll() is None
        assert (tmp_path / "run" / "comfyui-8794.pid").exists()
    finally:
        _end(other)


def test_stop_script_never_signals_a_comfyui_of_another_port_named_by_a_stale_pid_file(tmp_path):
    other = _fake_comfyui(tmp_path, 8792)
    try:
        (tmp_path / "run" / "comfyui-8793.pid").write_text(str(other.pid))
        stop = _stop(tmp_path, "8793")
        assert stop.returncode == 0
        assert "not our ComfyUI" in stop.stderr and "nothing signalled" in stop.stderr
        assert other.poll() is None
        assert not (tmp_path / "run" / "comfyui-8793.pid").exists()
    finally:
        _end(other)


def test_stop_script_all_stops_every_server_and_only_removes_stale_pid_files(tmp_path):
    server = _fake_comfyui(tmp_path, 8791)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "run" / "comfyui-8790.pid").write_text(str(bystander.pid))
        stop = _stop(tmp_path, "--all", port="8188")
        assert stop.returncode == 0, stop.stderr
        assert f"port 8791: stopped pid {server.pid}" in stop.stdout
        assert server.wait(10) == -signal.SIGTERM
        assert "port 8790: pid" in stop.stderr and "not our ComfyUI" in stop.stderr
        assert bystander.poll() is None
        assert list((tmp_path / "run").iterdir()) == []
    finally:
        _end(server, bystander)


def test_stop_script_refuses_an_argument_that_is_not_a_port(tmp_path):
    stop = _stop(tmp_path, "all")
    assert stop.returncode == 2
    assert "'all' is not a port number" in stop.stderr and "--all" in stop.stderr


def test_the_device_kit_packs_the_host_without_its_tests_and_the_device_script_refuses_without_one(tmp_path):
    """scripts/device_kit.py's tree filter (in this process: packing the real kit downloads wheels) and
    scripts/device_check.sh run from a checkout with no .device/: exit 2, saying how to make it."""
    import tarfile
    sys.path.insert(0, str(REPO / "scripts"))
    import device_kit
    tree = tmp_path / "ComfyUI"
    for name in ("main.py", "comfy/ops.py", "comfy/ldm/flux/model.py", "tests/t.py", "models/checkpoints/x.bin",
                 "custom_nodes/ours/__init__.py", "comfy/__pycache__/ops.cpython-311.pyc", "blueprints/b.json"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("x")
    device_kit.pack_tree(tree, tmp_path / "comfyui.tgz")
    with tarfile.open(tmp_path / "comfyui.tgz") as tar:
        files = sorted(m.name for m in tar.getmembers() if m.isfile())
    assert files == ["comfyui/comfy/ldm/flux/model.py", "comfyui/comfy/ops.py", "comfyui/main.py"]
    checkout = tmp_path / "checkout" / "scripts"
    checkout.mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "device_check.sh", checkout)
    proc = subprocess.run([str(checkout / "device_check.sh"), "--only", "sp"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "scripts/device_kit.py" in proc.stderr and "carry" in proc.stderr
