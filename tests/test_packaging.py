"""Installing the package puts only comfy_multigpu into site-packages: no generic top-level module
(patches, scripts, tests) and no copy of ComfyUI. pyproject.toml carries the [tool.comfy] table."""
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_only_the_comfy_multigpu_package(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("comfy_multigpu-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"comfy_multigpu"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "comfy_multigpu/host/per_worker.py" in names


def test_pyproject_has_the_comfy_registry_table():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    comfy = data["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "comfy-multigpu"
    assert data["project"]["license"]["text"].startswith("GPL-3.0")
