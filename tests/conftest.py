"""Session fixtures: the pinned ComfyUI (fails loudly when absent), the generated tiny checkpoint,
and real ComfyUI servers (stock, and with the extension on 2 and 4 CPU workers)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers.comfy_server import ComfyServer  # noqa: E402

from comfy_multigpu.host.patching import load_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PINNED_COMMIT = tomllib.loads((REPO / "patches" / "manifest.toml").read_text(encoding="utf-8"))["host"]["commit"]

# Patches whose absence the isolation tests must be able to see (`isolation = true` in the manifest).
ISOLATION_PATCHES = ",".join(s.id for s in load_manifest()[1] if s.isolation)


def cache_dir() -> Path:
    base = os.environ.get("COMFY_MULTIGPU_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "comfy-multigpu"


def find_comfyui() -> Path:
    given = os.environ.get("COMFYUI_DIR")
    path = Path(given) if given else cache_dir() / f"comfyui-{PINNED_COMMIT}"
    if not (path / "main.py").is_file():
        pytest.exit(f"The pinned ComfyUI was not found at {path}. Run scripts/run_tests.sh (it prepares "
                    f"it), or set COMFYUI_DIR to a ComfyUI checkout at commit {PINNED_COMMIT}.", returncode=3)
    return path


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    return find_comfyui()


@pytest.fixture(scope="session")
def fixtures_dir(comfyui_dir) -> Path:
    """The tiny SD1.5-shaped checkpoint and LoRA, generated once per script version into the cache."""
    script = REPO / "tests" / "fixtures" / "make_tiny_checkpoint.py"
    key = hashlib.sha256(script.read_bytes()).hexdigest()[:12]
    out = cache_dir() / "fixtures" / key
    made = ("tiny-sd15.safetensors", "tiny-flux-dev.safetensors", "tiny-flux2-dev.safetensors",
            "tiny-wan21-t2v-flux.safetensors", "tiny-hunyuan-video-flux.safetensors")
    if not all((out / name).exists() for name in made):
        subprocess.run([sys.executable, str(script), str(comfyui_dir), str(out)], check=True,
                       stdout=subprocess.DEVNULL)
    return out


class Servers:
    def __init__(self, comfyui_dir: Path, fixtures: Path, tmp_factory):
        self.comfyui_dir = comfyui_dir
        self.fixtures = fixtures
        self.tmp_factory = tmp_factory
        self.started: list[ComfyServer] = []

    def start(self, name: str, **kw) -> ComfyServer:
        server = ComfyServer(self.comfyui_dir, self.tmp_factory.mktemp(name), fixtures=self.fixtures, **kw)
        self.started.append(server)
        return server.start()

    def stop_all(self) -> None:
        for s in self.started:
            s.stop()


@pytest.fixture(scope="session")
def servers(comfyui_dir, fixtures_dir, tmp_path_factory):
    registry = Servers(comfyui_dir, fixtures_dir, tmp_path_factory)
    yield registry
    registry.stop_all()


@pytest.fixture
def own_servers(servers):
    """Start servers for one test only: stopped when it ends (the suite's RAM holds only what is shared)."""
    started = []

    def start(name: str, **kw) -> ComfyServer:
        server = servers.start(name, **kw)
        started.append(server)
        return server
    yield start
    for server in started:
        server.stop()


# COMFY_MULTIGPU_WORKER_MODE: suites that must hold in both modes take `multi2_modes` (or `worker_env`).
WORKER_MODES = ("thread", "process")
PROCESS_MODE = {"COMFY_MULTIGPU_WORKER_MODE": "process"}


@pytest.fixture(scope="session")
def multi2_thread(servers) -> ComfyServer:
    return servers.start("multi2", workers=2)


@pytest.fixture(scope="session")
def multi2(multi2_thread) -> ComfyServer:
    return multi2_thread


@pytest.fixture(scope="session")
def multi2_process(servers) -> ComfyServer:
    """Two process workers: each GPU's prompts run in a child process of its own."""
    return servers.start("multi2p", workers=2, env=PROCESS_MODE)


@pytest.fixture(scope="session", params=WORKER_MODES)
def multi2_modes(request) -> ComfyServer:
    """The 2-worker server of each worker mode in turn (a module overrides `multi2` with it)."""
    return request.getfixturevalue(f"multi2_{request.param}")


@pytest.fixture(params=WORKER_MODES)
def worker_env(request) -> dict:
    """The environment a test's own server adds for each worker mode in turn."""
    return dict(PROCESS_MODE) if request.param == "process" else {}


@pytest.fixture(scope="session")
def multi4(servers) -> ComfyServer:
    return servers.start("multi4", workers=4)


@pytest.fixture(scope="session")
def stock(servers) -> ComfyServer:
    """Stock ComfyUI: the extension is installed but switched off (it must change nothing)."""
    return servers.start("stock", workers=None, env={"COMFY_MULTI_GPU_SCHED": "0"})


@pytest.fixture(scope="session")
def unpatched2(servers) -> ComfyServer:
    """Two workers with every isolation patch left out: what the isolation tests guard against."""
    return servers.start("unpatched2", workers=2, env={"COMFY_MULTIGPU_DISABLE_PATCHES": ISOLATION_PATCHES})
