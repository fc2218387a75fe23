#!/usr/bin/env python3
"""Prepare everything comfy-multigpu needs on a fresh machine (stdlib only; run with python3 >= 3.10).

1. ComfyUI: $COMFYUI_DIR if set (an existing checkout, never modified except for the link in
   custom_nodes/), else the cache's pinned copy, else a clone of $COMFYUI_REPO at the pinned commit.
2. A virtualenv in the cache with torch 2.11.0 / torchvision 0.26.0 / torchaudio 2.11.0, the host's
   requirements.txt and ours (plus test requirements with --with-tests); rebuilt only when inputs change.
3. The extension linked into ComfyUI's custom_nodes/ as comfy-multigpu.
Prints shell assignments (COMFYUI_DIR, VENV_PYTHON, CACHE_DIR) for scripts to eval.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import NoReturn

DEFAULT_REPO = "https://github.com/comfyanonymous/ComfyUI"
TORCH_PINS = ["torch==2.11.0", "torchvision==0.26.0", "torchaudio==2.11.0"]
ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "patches" / "manifest.toml"
LINK_NAME = "comfy-multigpu"


def fail(message: str) -> NoReturn:
    print(f"comfy-multigpu setup: {message}", file=sys.stderr)
    sys.exit(2)


def log(message: str) -> None:
    print(f"comfy-multigpu setup: {message}", file=sys.stderr)


def pinned_commit(manifest: Path = MANIFEST) -> str:
    """The ComfyUI commit of the manifest's [host] table, the one place it is written (tomllib on
    Python >= 3.11; on 3.10 a regex reads the table's `commit = "..."` line)."""
    text = manifest.read_text(encoding="utf-8")
    try:
        import tomllib
    except ModuleNotFoundError:
        found = re.search(r'^\[host\][ \t]*\n(?:(?!\[).*\n)*?commit\s*=\s*"(\w+)"', text, re.M)
        if not found:
            fail(f'no commit = "..." line in the [host] table of {manifest}')
        return found.group(1)
    return tomllib.loads(text)["host"]["commit"]


def cache_dir() -> Path:
    base = os.environ.get("COMFY_MULTIGPU_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "comfy-multigpu"


def is_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfyui_version.py").is_file()


def find_comfyui(cache: Path) -> Path:
    given = os.environ.get("COMFYUI_DIR")
    if given:
        path = Path(given).expanduser().resolve()
        if not is_comfyui(path):
            fail(f"COMFYUI_DIR={given} is not a ComfyUI checkout (no main.py / comfyui_version.py)")
        return path
    pinned = pinned_commit()
    cached = cache / f"comfyui-{pinned}"
    if is_comfyui(cached):
        return cached
    repo = os.environ.get("COMFYUI_REPO", DEFAULT_REPO)
    log(f"cloning ComfyUI {pinned[:7]} from {repo} into {cached}")
    tmp = cached.with_name(cached.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        subprocess.run(["git", "init", "-q", str(tmp)], check=True)
        subprocess.run(["git", "-C", str(tmp), "fetch", "-q", "--depth", "1", repo, pinned],
                       check=True, timeout=900)
        subprocess.run(["git", "-C", str(tmp), "checkout", "-q", "FETCH_HEAD"], check=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, FileNotFoundError) as ex:
        shutil.rmtree(tmp, ignore_errors=True)
        fail(f"no ComfyUI found and cloning {repo} failed ({ex}).\n"
             f"  Set COMFYUI_DIR to an existing ComfyUI checkout, or COMFYUI_REPO to a reachable clone\n"
             f"  URL, or place the pinned tree (commit {pinned}) at {cached}\n"
             f"  (docs/development.md: how to bring it onto a machine without GitHub access).")
    tmp.rename(cached)
    return cached


def _digest(parts: list[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:16]


def _install_layer(python: Path, stamp: Path, key: str, args_per_run: list[list[str]], what: str) -> None:
    """pip-install one layer unless its stamp already records `key`."""
    if stamp.exists() and stamp.read_text().strip() == key:
        return
    log(f"installing {what} into {python.parent.parent} (a few minutes the first time)")
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    for args in args_per_run:
        subprocess.run(pip + args, check=True)
    stamp.write_text(key + "\n")


def ensure_venv(cache: Path, comfyui: Path, with_tests: bool) -> Path:
    """The cached virtualenv: a runtime layer (torch pins, ComfyUI's and our requirements) and,
    with --with-tests, a test layer; each is reinstalled only when its inputs change."""
    env_dir = cache / f"venv-py{sys.version_info.major}{sys.version_info.minor}"
    python = env_dir / "bin" / "python"
    if not python.exists():
        venv.EnvBuilder(with_pip=True).create(env_dir)
    runtime = [comfyui / "requirements.txt", ROOT / "requirements.txt"]
    runtime_key = _digest([" ".join(TORCH_PINS).encode(), sys.version.encode()] + [f.read_bytes() for f in runtime])
    # The torch pins are repeated so that the host's unpinned "torch" cannot pull a newer build.
    _install_layer(python, env_dir / ".stamp-runtime", runtime_key,
                   [TORCH_PINS] + [["-r", str(f)] + TORCH_PINS for f in runtime],
                   f"torch {TORCH_PINS[0].split('==')[1]} and ComfyUI's requirements")
    if with_tests:
        tests = ROOT / "requirements-test.txt"
        _install_layer(python, env_dir / ".stamp-tests", _digest([runtime_key.encode(), tests.read_bytes()]),
                       [["-r", str(tests)] + TORCH_PINS], "the test requirements")
    return python


def link_extension(comfyui: Path) -> None:
    custom = comfyui / "custom_nodes"
    custom.mkdir(exist_ok=True)
    link = custom / LINK_NAME
    if link.is_symlink():
        if link.resolve() == ROOT:
            return
        link.unlink()
    elif link.exists():
        fail(f"{link} exists and is not our link; move it away or set COMFYUI_DIR to another checkout")
    link.symlink_to(ROOT, target_is_directory=True)
    log(f"linked {link} -> {ROOT}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--with-tests", action="store_true", help="also install test requirements")
    parser.add_argument("--no-link", action="store_true", help="do not link into custom_nodes/")
    opts = parser.parse_args()
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    comfyui = find_comfyui(cache)
    python = ensure_venv(cache, comfyui, opts.with_tests)
    if not opts.no_link:
        link_extension(comfyui)
    print(f"COMFYUI_DIR='{comfyui}'")
    print(f"VENV_PYTHON='{python}'")
    print(f"CACHE_DIR='{cache}'")


if __name__ == "__main__":
    main()
