"""The systemd units pass `systemd-analyze verify` (with the install path pointing at this checkout,
as after `git clone` to /opt/comfy-multigpu), and keep the GPU devices reachable."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNITS = sorted((REPO / "systemd").glob("*.service"))


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if not found:
        subprocess.run(["apt-get", "install", "-y", "-q", "systemd"], check=True, capture_output=True, timeout=600)
        found = shutil.which("systemd-analyze")
    return found


def installed_copy(unit: Path, dest: Path, text=None) -> Path:
    target = dest / unit.name
    target.write_text((text or unit.read_text()).replace("/opt/comfy-multigpu", str(REPO)))
    return target


def verify(dest: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([systemd_analyze(), "verify", "--man=no", name], cwd=dest, capture_output=True,
                          text=True, timeout=120)


def test_the_units_we_ship():
    assert [u.name for u in UNITS] == ["comfyui-gpu@.service", "comfyui-multi-gpu.service",
                                       "comfyui-scheduler.service"]


@pytest.mark.parametrize("name", ["comfyui-multi-gpu.service", "comfyui-gpu@0.service", "comfyui-gpu@3.service",
                                  "comfyui-scheduler.service"])
def test_systemd_analyze_verify_is_clean(tmp_path, name):
    for unit in UNITS:
        installed_copy(unit, tmp_path)
    proc = verify(tmp_path, name)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


def test_verify_would_catch_a_broken_unit(tmp_path):
    unit = REPO / "systemd" / "comfyui-multi-gpu.service"
    broken = unit.read_text().replace("Restart=on-failure", "Restart=sometimes").replace(
        "/opt/comfy-multigpu/scripts/start_multi_gpu.sh", "/nonexistent/start.sh")
    installed_copy(unit, tmp_path, broken)
    assert verify(tmp_path, unit.name).returncode != 0


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_units_restart_stop_gracefully_and_never_hide_the_gpus(unit):
    settings = [l.strip() for l in unit.read_text().splitlines() if l.strip() and not l.startswith("#")]
    for line in ("Restart=on-failure", "KillSignal=SIGTERM", "TimeoutStopSec=10min", "NoNewPrivileges=yes"):
        assert line in settings
    assert not [l for l in settings if l.startswith(("PrivateDevices=", "DevicePolicy=", "DeviceAllow="))]
    text = unit.read_text()
    script = "start_balancer.sh" if unit.name == "comfyui-scheduler.service" else "start_multi_gpu.sh"
    assert f"/opt/comfy-multigpu/scripts/{script}" in text


def test_the_per_gpu_template_isolates_each_instance():
    text = (REPO / "systemd" / "comfyui-gpu@.service").read_text()
    assert "CUDA_VISIBLE_DEVICES=%i" in text and "COMFY_MULTI_GPU_SCHED=0" in text
    assert "--database-url sqlite:///%S/comfy-multigpu/gpu%i/comfyui.db" in text
    assert "--output-directory %S/comfy-multigpu/gpu%i/output" in text
