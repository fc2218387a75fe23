#!/usr/bin/env python3
"""Pack what the GPU check needs on a lent GPU machine that reaches no network (stdlib only).

The lent machine (docs/development.md, "GPU check on a lent machine") has Python 3.12 with torch and
most of ComfyUI's requirements, but not ComfyUI, nor the host's own packages comfy-kitchen and
comfy-aimdo, and it cannot download anything. This writes, into .device/ of the checkout (ignored by
git, named in the device tool's `carry`):

- comfyui.tgz: the pinned ComfyUI tree (the cache's, as scripts/bootstrap.py finds it) without its tests,
  models and blueprints;
- site.tgz: the packages the machine lacks, from their manylinux cp312 wheels (pip download, here),
  unpacked; comfy-kitchen without its ROCm (HIP) backend, which a CUDA machine never loads, so that
  the whole working tree stays under the tool's 64 MiB.

scripts/device_check.sh unpacks both there and runs bench/gpu_check.py with the machine's python3.

    python3 scripts/device_kit.py            # then: run(command="scripts/device_check.sh", carry=[".device"])
"""
from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / ".device"
PACKAGES = ("comfy-kitchen", "comfy-aimdo")           # versions: ComfyUI's requirements.txt
LEFT_OUT_TREE = {".git", ".github", ".ci", "tests", "tests-unit", "custom_nodes", "models", "blueprints",
                 "output", "input", "temp", "user", "script_examples"}
LEFT_OUT_WHEEL = ("comfy_kitchen/backends/hip/",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64")
LIMIT = 60 * 2 ** 20                                   # the tool carries 64 MiB, the repo included


def comfyui() -> Path:
    """The pinned ComfyUI tree as scripts/bootstrap.py finds it ($COMFYUI_DIR, the cache, a clone)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bootstrap
    return bootstrap.find_comfyui(bootstrap.cache_dir())


def pinned_versions(tree: Path) -> list[str]:
    wanted = []
    for line in (tree / "requirements.txt").read_text().splitlines():
        name = re.split(r"[=<>~ ]", line.strip(), maxsplit=1)[0]
        if name in PACKAGES:
            wanted.append(line.strip())
    if len(wanted) != len(PACKAGES):
        sys.exit(f"device_kit: ComfyUI's requirements.txt does not pin all of {PACKAGES}: {wanted}")
    return wanted


def pack_tree(tree: Path, out: Path) -> None:
    def keep(info: tarfile.TarInfo):
        parts = Path(info.name).parts
        if len(parts) > 1 and parts[1] in LEFT_OUT_TREE or "__pycache__" in parts:
            return None
        return info
    with tarfile.open(out, "w:gz") as tar:
        tar.add(tree, arcname="comfyui", filter=keep)


def pack_site(requirements: list[str], out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "-d", tmp]
        for platform in PLATFORMS:
            args += ["--platform", platform]
        subprocess.run(args + requirements, check=True)
        with tarfile.open(out, "w:gz") as tar:
            for wheel in sorted(Path(tmp).glob("*.whl")):
                with zipfile.ZipFile(wheel) as z:
                    for member in z.infolist():
                        if member.is_dir() or member.filename.startswith(LEFT_OUT_WHEEL):
                            continue
                        info = tarfile.TarInfo(member.filename)
                        data = z.read(member)
                        info.size, info.mode = len(data), 0o755 if member.filename.endswith(".so") else 0o644
                        tar.addfile(info, io.BytesIO(data))


def main() -> None:
    tree = comfyui()
    requirements = pinned_versions(tree)
    shutil.rmtree(KIT, ignore_errors=True)
    KIT.mkdir()
    pack_tree(tree, KIT / "comfyui.tgz")
    pack_site(requirements, KIT / "site.tgz")
    (KIT / "README").write_text(f"Made by scripts/device_kit.py from {tree} and {', '.join(requirements)}.\n")
    size = sum(f.stat().st_size for f in KIT.iterdir())
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True).stdout.split(b"\0")
    repo = sum((ROOT / f.decode()).stat().st_size for f in tracked if f and (ROOT / f.decode()).is_file())
    print(f"device_kit: {KIT} holds {size / 2 ** 20:.1f} MiB (ComfyUI {tree.name}, {', '.join(requirements)}); "
          f"with the repository's {repo / 2 ** 20:.1f} MiB: {(size + repo) / 2 ** 20:.1f} MiB of the tool's 64")
    if size + repo > LIMIT:
        sys.exit("device_kit: too large for the device tool's carry limit")


if __name__ == "__main__":
    main()
