"""Start a real ComfyUI (the pinned host) for tests, with or without comfy-multigpu, and talk to it.

Each server gets its own base directory (custom_nodes/, models/, input/, output/, user/) under the
test's temporary folder; the pinned ComfyUI tree itself is only read.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
NODE_PACK = REPO / "tests" / "node_pack"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpError(Exception):
    def __init__(self, status: int, body: bytes):
        self.status = status
        self.body = body
        super().__init__(f"HTTP {status}: {body[:300]!r}")

    def json(self):
        return json.loads(self.body)


class ComfyServer:
    def __init__(self, comfyui_dir: Path, base: Path, *, workers: Optional[int] = 2, extension: bool = True,
                 env: Optional[dict] = None, args: tuple = (), fixtures: Optional[Path] = None,
                 shape_changer: bool = False, cpu: bool = True, extra_nodes: tuple = ()):
        self.comfyui_dir = comfyui_dir
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.extension = extension
        self.extra_env = env or {}
        self.args = list(args)
        self.fixtures = fixtures
        self.shape_changer = shape_changer
        self.cpu = cpu                    # --cpu (the suite's CPU workers); False for a CUDA device
        self.extra_nodes = tuple(Path(d) for d in extra_nodes)   # more custom-node directories to link
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = base / "comfyui.log"

    @property
    def worker_mode(self) -> str:
        """COMFY_MULTIGPU_WORKER_MODE this server runs with: "thread" or "process"."""
        return self.extra_env.get("COMFY_MULTIGPU_WORKER_MODE", "thread")

    # ---- life cycle ------------------------------------------------------------------------
    def _prepare_base(self) -> None:
        custom = self.base / "custom_nodes"
        if custom.exists():
            return              # a restart on the same base directory
        custom.mkdir(parents=True, exist_ok=True)
        for d in ("input", "output", "user", "models/checkpoints", "models/loras", "models/diffusion_models"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        (custom / "comfy_multigpu_test_nodes").symlink_to(NODE_PACK, target_is_directory=True)
        if self.extension:
            (custom / "comfy-multigpu").symlink_to(REPO, target_is_directory=True)
        if self.shape_changer:
            (custom / "shape_changer").symlink_to(REPO / "tests" / "shape_changer", target_is_directory=True)
        for nodes in self.extra_nodes:
            (custom / nodes.name).symlink_to(nodes.resolve(), target_is_directory=True)
        if self.fixtures is not None:
            for f in self.fixtures.glob("*.safetensors"):
                folder = "loras" if "lora" in f.name else "diffusion_models" if "flux" in f.name else "checkpoints"
                (self.base / "models" / folder / f.name).symlink_to(f)

    def start(self, timeout: float = 120.0) -> "ComfyServer":
        self._prepare_base()
        env = dict(os.environ)
        for key in ("COMFY_NUM_GPUS", "COMFY_MULTIGPU_DEVICES", "COMFY_MULTI_GPU_SCHED",
                    "COMFY_MULTIGPU_DISABLE_PATCHES"):
            env.pop(key, None)
        if self.workers is not None:
            env["COMFY_NUM_GPUS"] = str(self.workers)
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "main.py", *(["--cpu"] if self.cpu else []), "--base-directory", str(self.base),
               "--listen", "127.0.0.1", "--port", str(self.port),
               "--database-url", f"sqlite:///{self.base / 'comfyui.db'}"] + self.args
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.log_file = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui_dir, env=env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                self.get("/system_stats")
                if not self.extension or self.workers is None or self._workers_up():
                    return self
            except (OSError, HttpError):
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"ComfyUI did not start in {timeout} s:\n{self.log()[-3000:]}")

    def _workers_up(self) -> bool:
        try:
            state = self.get("/queue/all", counts=1)
        except HttpError:
            return True         # extension refused: the server runs stock
        return all(q["up"] for q in state["queues"]) and \
            self.log()[self.log_offset:].count("Worker started") >= len(state["queues"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        if getattr(self, "log_file", None):
            self.log_file.close()

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing of ComfyUI's or the extension's shutdown runs."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(15)
        if getattr(self, "log_file", None):
            self.log_file.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ---- HTTP ------------------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, headers: Optional[dict] = None,
                raw: Optional[bytes] = None, content_type: str = "application/json", **query):
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                payload = resp.read()
                status = resp.status
        except urllib.error.HTTPError as ex:
            raise HttpError(ex.code, ex.read()) from None
        if not payload:
            return status
        try:
            return json.loads(payload)
        except ValueError:
            return payload

    def get(self, path: str, headers: Optional[dict] = None, **query):
        return self.request("GET", path, headers=headers, **query)

    def post(self, path: str, body=None, headers: Optional[dict] = None, **kw):
        return self.request("POST", path, body=body, headers=headers, **kw)

    # ---- prompts ---------------------------------------------------------------------------
    def submit(self, prompt: dict, gpu=None, client_id: Optional[str] = None, headers: Optional[dict] = None,
               **extra) -> dict:
        body = {"prompt": prompt, **extra}
        if client_id is not None:
            body["client_id"] = client_id
        headers = dict(headers or {})
        if gpu is not None:
            headers["X-TARGET-GPU"] = str(gpu)
        return self.post("/prompt", body, headers=headers)

    def wait(self, prompt_ids, timeout: float = 120.0) -> dict:
        """Wait until every prompt id is in /history; returns {id: history entry}."""
        ids = [prompt_ids] if isinstance(prompt_ids, str) else list(prompt_ids)
        deadline = time.time() + timeout
        while True:
            found = {}
            for pid in ids:
                entry = self.get(f"/history/{pid}")
                if pid in entry:
                    found[pid] = entry[pid]
            if len(found) == len(ids):
                return found
            if time.time() > deadline:
                missing = sorted(set(ids) - set(found))
                raise TimeoutError(f"{len(missing)} prompt(s) not finished: {missing[:5]}\n{self.log()[-2000:]}")
            time.sleep(0.1)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until nothing runs or waits on this server."""
        deadline = time.time() + timeout
        while self.get("/prompt")["exec_info"]["queue_remaining"]:
            if time.time() > deadline:
                raise TimeoutError(f"queue of {self.url} did not drain in {timeout} s")
            time.sleep(0.02)

    def wait_running(self, prompt_id: str, timeout: float = 30.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            running, _ = self.get("/queue")["queue_running"], None
            if any(item[1] == prompt_id for item in running):
                return
            time.sleep(0.02)
        raise TimeoutError(f"prompt {prompt_id} never ran")


def new_client_id() -> str:
    return uuid.uuid4().hex
