"""The Nginx config from nginx/ (comfy_multigpu.tools.nginx_conf) in front of a real comfy-multigpu server:
port first+i lands on GPU i for every stock endpoint (scripts/test_multi_gpu_endpoints.sh), a client
cannot override the port's GPU, WebSockets are upgraded and see their GPU's queue, uploads above
Nginx's 1 MB default pass, 429 past the burst, and the optional basic auth and allow-list work."""
import asyncio
import base64
import hashlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from comfy_multigpu.tools.nginx_conf import NginxSettings, main as nginx_conf_main, render
from helpers import workflows as wf
from helpers.nginx import Nginx, free_port_block

REPO = Path(__file__).resolve().parents[1]
GPUS = 4


@pytest.fixture(scope="module")
def fronted(multi4, tmp_path_factory):
    """Nginx with the generated config for 4 GPUs: (nginx, auto port, first GPU port)."""
    base = free_port_block(GPUS + 1)
    settings = NginxSettings(gpus=GPUS, upstream=multi4.url.removeprefix("http://"), listen="127.0.0.1",
                             first_port=base + 1, auto_port=base)
    nginx = Nginx(tmp_path_factory.mktemp("nginx"), render(settings)).start(settings.ports())
    yield nginx, base, base + 1
    nginx.stop()


def http(url, body=None, headers=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as ex:
        return ex.code, ex.read()


def test_committed_default_config_is_generated_and_valid(tmp_path):
    committed = (REPO / "nginx" / "comfyui-multi-gpu.conf").read_text()
    assert committed == render(NginxSettings(gpus=4), " --gpus 4"), \
        "nginx/comfyui-multi-gpu.conf is stale: python -m comfy_multigpu.tools.nginx_conf --gpus 4 > nginx/comfyui-multi-gpu.conf"
    check = Nginx(tmp_path, committed).check()
    assert check.returncode == 0, check.stderr


def test_every_endpoint_through_every_port_lands_on_its_gpu(fronted):
    _, auto, first = fronted
    proc = subprocess.run([str(REPO / "scripts/test_multi_gpu_endpoints.sh"), "--first-port", str(first),
                           "--gpus", str(GPUS), "--auto-port", str(auto)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "50 passed, 0 failed" in proc.stdout


@pytest.mark.parametrize("spoof", ["X-TARGET-GPU", "x-target-gpu", "X-Target-Gpu"])
def test_a_per_gpu_port_ignores_the_clients_gpu_header(fronted, spoof):
    _, _, first = fronted
    status, body = http(f"http://127.0.0.1:{first + 1}/prompt", {"prompt": wf.sleep(0.01, 7)}, {spoof: "3"})
    assert status == 200 and json.loads(body)["gpu_id"] == 1


def test_the_auto_port_passes_the_clients_header_through(fronted):
    _, auto, _ = fronted
    status, body = http(f"http://127.0.0.1:{auto}/prompt", {"prompt": wf.sleep(0.01, 8)}, {"X-TARGET-GPU": "2"})
    assert status == 200 and json.loads(body)["gpu_id"] == 2
    status, body = http(f"http://127.0.0.1:{auto}/prompt", {"prompt": wf.sleep(0.01, 8)}, {"X-TARGET-GPU": "9"})
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_target_gpu"


def test_websocket_through_a_port_sees_that_gpus_queue(fronted, multi4):
    _, _, first = fronted
    blocker = multi4.submit(wf.sleep(30, 9), gpu=2)["prompt_id"]
    multi4.wait_running(blocker)

    async def first_status(port):
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"ws://127.0.0.1:{port}/ws?clientId=ngx{port}") as ws:
                return json.loads((await ws.receive(timeout=10)).data)
    try:
        on_gpu2 = asyncio.run(first_status(first + 2))
        on_gpu3 = asyncio.run(first_status(first + 3))
    finally:
        multi4.post("/interrupt", {"prompt_id": blocker})
        multi4.wait(blocker)
    assert on_gpu2["data"]["status"]["exec_info"]["queue_remaining"] == 1
    assert on_gpu3["data"]["status"]["exec_info"]["queue_remaining"] == 0


def test_uploads_larger_than_nginx_default_pass(fronted):
    _, _, first = fronted
    boundary = "cmgboundary"
    payload = os.urandom(2 * 1024 * 1024)
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"http://127.0.0.1:{first}/upload/image", data=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200


def test_requests_past_the_burst_get_429(fronted):
    _, _, first = fronted
    port = first + 3
    time.sleep(2.5)                   # earlier tests used this port: let its bucket (burst 20 at 10 r/s) refill
    codes = [http(f"http://127.0.0.1:{port}/queue/all?counts=1")[0] for _ in range(40)]
    assert codes.count(429) >= 10 and 20 <= codes.count(200) <= 30, codes


def test_basic_auth_and_allow_list(tmp_path, multi4):
    port = free_port_block(2)
    sha = base64.b64encode(hashlib.sha1(b"s3cret").digest()).decode()
    (tmp_path / "htpasswd").write_text(f"alice:{{SHA}}{sha}\n")
    auth = NginxSettings(gpus=1, upstream=multi4.url.removeprefix("http://"), listen="127.0.0.1",
                         first_port=port, auto_port=0, auth_file=str(tmp_path / "htpasswd"))
    nginx = Nginx(tmp_path / "auth", render(auth)).start(auth.ports())
    try:
        assert http(f"http://127.0.0.1:{port}/queue")[0] == 401
        token = base64.b64encode(b"alice:s3cret").decode()
        status, body = http(f"http://127.0.0.1:{port}/queue", headers={"Authorization": f"Basic {token}"})
        assert status == 200 and json.loads(body)["gpu_id"] == 0
    finally:
        nginx.stop()
    allow = NginxSettings(gpus=1, upstream=multi4.url.removeprefix("http://"), listen="127.0.0.1",
                          first_port=port + 1, auto_port=0, allow=("127.0.0.2/32",))
    nginx = Nginx(tmp_path / "allow", render(allow)).start(allow.ports())
    try:
        assert http(f"http://127.0.0.1:{port + 1}/queue")[0] == 403
    finally:
        nginx.stop()


@pytest.mark.parametrize("argv, fragment", [(["--gpus", "0"], "at least 1"), (["--allow", "10.0.0.0/33"], "10.0.0.0/33"),
                                            (["--first-port", "65535", "--gpus", "2"], "out of range")])
def test_generator_refuses_bad_settings(argv, fragment, capsys):
    assert nginx_conf_main(argv) == 2
    assert fragment in capsys.readouterr().err


def test_install_script_writes_the_generated_config(tmp_path):
    dest = tmp_path / "comfyui.conf"
    proc = subprocess.run([str(REPO / "scripts/install_nginx_conf.sh"), "--dest", str(dest), "--gpus", "2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert dest.read_text() == render(NginxSettings(gpus=2), " --gpus 2")
