"""The balancer (python -m comfy_multigpu.balancer) as a real process in front of real ComfyUI servers,
one stock and one with the extension (2 workers): the seed API and the stock API through it, a burst
spread by its own view, WebSocket events bridged to the submitting client, uploads on every backend,
interrupts routed, a killed backend marked down and avoided, then back after its restart, and the
optional bearer token."""
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import pytest

from helpers import workflows as wf
from helpers.comfy_server import HttpError, free_port
from helpers import ws

from comfy_multigpu.balancer.policy import Slot, choose_slot, with_submitted
from comfy_multigpu.balancer.settings import SettingsError, resolve

REPO = Path(__file__).resolve().parents[1]


class BalancerProcess:
    def __init__(self, backends, tmp: Path, extra=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"balancer-{self.port}.log"
        cmd = [sys.executable, "-m", "comfy_multigpu.balancer", "--listen", f"127.0.0.1:{self.port}",
               "--poll-interval", "0.2", *extra]
        for b in backends:
            cmd += ["--backend", b]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONPATH=str(REPO)))
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                self.request("GET", "/health")
                return
            except HttpError:
                return                     # it answers (503 while no backend is healthy)
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(self.log_path.read_text())

    def request(self, method, path, body=None, headers=None, raw=None, content_type="application/json"):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=dict(headers or {}))
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as ex:
            raise HttpError(ex.code, ex.read()) from None
        return json.loads(payload) if payload else None

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def wait(self, prompt_ids, timeout=60):
        deadline = time.time() + timeout
        found = {}
        while time.time() < deadline:
            for pid in prompt_ids:
                if pid not in found:
                    entry = self.get(f"/history/{pid}")
                    if pid in entry:
                        found[pid] = entry[pid]
            if len(found) == len(prompt_ids):
                return found
            time.sleep(0.1)
        raise TimeoutError(sorted(set(prompt_ids) - set(found)))

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def wait_idle(*servers):
    """Until no prompt runs or waits on these backends (they are shared with other test files)."""
    for server in servers:
        server.wait_idle()


@pytest.fixture(scope="module")
def balancer(stock, multi2, tmp_path_factory):
    b = BalancerProcess([stock.url, multi2.url], tmp_path_factory.mktemp("balancer"))
    yield b
    b.stop()


def test_it_knows_both_kinds_of_backend(balancer, stock, multi2):
    assert balancer.get("/health") == {"status": "ok", "healthy": 2, "backends": 2}
    kinds = {i["url"]: (i["kind"], len(i["gpus"])) for i in balancer.get("/instances")}
    assert kinds == {stock.url: ("stock", 1), multi2.url: ("multigpu", 2)}
    status = balancer.get("/status")
    assert status["healthy"] == 2 and status["poll_interval"] == 0.2


def test_the_stock_api_through_the_balancer(balancer, multi2):
    answer = balancer.post("/prompt", {"prompt": wf.sleep(0.05, 7)})
    assert answer["instance"] in (balancer.get("/instances")[0]["url"], multi2.url)
    entry = balancer.wait([answer["prompt_id"]])[answer["prompt_id"]]
    assert entry["status"]["status_str"] == "success" and entry["instance"] == answer["instance"]
    assert answer["prompt_id"] in balancer.get("/history")
    assert balancer.get("/api/history/" + answer["prompt_id"])[answer["prompt_id"]]["instance"] == answer["instance"]
    assert "MGSleep" in balancer.get("/object_info")                     # anything else: proxied


def test_the_seed_api_waits_for_completion(balancer):
    result = balancer.post("/generate", {"workflow": wf.sleep(0.05, 3), "wait_for_completion": True, "timeout": 30})
    assert result["message"] == "completed" and result["status"]["status_str"] == "success"
    assert result["assigned_instance"] and "assigned_gpu" in result
    assert result["outputs"]["1"]["value"] == [3]
    with pytest.raises(HttpError) as bad:
        balancer.post("/generate", {"workflow": "nope"})
    assert bad.value.status == 400


def test_a_burst_between_two_polls_is_spread_over_every_slot(balancer, stock, multi2):
    wait_idle(stock, multi2)
    time.sleep(0.5)                                                         # a poll sees them idle
    answers = [balancer.post("/prompt", {"prompt": wf.sleep(1.0, i)}) for i in range(6)]
    spread = Counter((a["instance"], a.get("gpu_id")) for a in answers)
    assert len(spread) == 3 and set(spread.values()) == {2}                # stock 1 slot + 2 GPUs, 2 each
    merged = balancer.get("/queue")
    assert len(merged["queue_running"]) + len(merged["queue_pending"]) >= 3
    balancer.wait([a["prompt_id"] for a in answers], timeout=60)


def test_websocket_events_of_every_prompt_reach_the_submitting_client(balancer, stock, multi2):
    wait_idle(stock, multi2)
    time.sleep(0.5)
    client = ws.Client(uuid.uuid4().hex)
    (done,) = ws.run(balancer.url, [(client, [(0.0, wf.sleep(0.4, i)) for i in range(4)])], timeout=60)
    assert len(done.prompt_ids) == 4 and done.finished >= done.prompt_ids
    assert {e["data"]["prompt_id"] for e in done.of_type("executed")} == done.prompt_ids
    assert done.foreign() == []
    instances = {balancer.get(f"/history/{p}")[p]["instance"] for p in done.prompt_ids}
    assert len(instances) == 2                                         # events came from both backends


def test_uploads_reach_every_backend(balancer, stock, multi2):
    name = f"up-{uuid.uuid4().hex[:8]}.png"
    boundary = "b0undary"
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 32
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    answer = balancer.request("POST", "/upload/image", raw=body, content_type=f"multipart/form-data; boundary={boundary}")
    assert answer["name"] == name
    assert (stock.base / "input" / name).read_bytes() == png
    assert (multi2.base / "input" / name).read_bytes() == png


def test_view_serves_the_file_from_the_backend_that_made_it(balancer, stock, multi2):
    """Both backends have a file of that name; the balancer knows which one reported it. The file is
    made on multi2 (listed second), so asking the backends in order would return stock's decoy."""
    wait_idle(multi2)
    deadline = time.time() + 30
    blocker = stock.submit(wf.sleep(3.0, 0))["prompt_id"]                  # stock busy, as the balancer sees
    stock.wait_running(blocker)
    while time.time() < deadline and not next(i for i in balancer.get("/instances") if i["url"] == stock.url)["gpus"][0]["running"]:
        time.sleep(0.05)
    prefix = f"view-{uuid.uuid4().hex[:8]}"
    made = balancer.post("/prompt", {"prompt": wf.save_batch(prefix, 200, batch=1)})
    assert made["instance"] == multi2.url
    entry = balancer.wait([made["prompt_id"]])[made["prompt_id"]]
    image = entry["outputs"]["2"]["images"][0]
    real = (multi2.base / "output" / image["subfolder"] / image["filename"]).read_bytes()
    decoy = stock.base / "output" / image["subfolder"] / image["filename"]
    decoy.write_bytes(b"not the image")
    query = f"/view?filename={image['filename']}&subfolder={image['subfolder']}&type=output"
    req = urllib.request.urlopen(balancer.url + query, timeout=30)
    assert req.read() == real
    stock.wait(blocker)


def test_interrupt_by_prompt_id_reaches_the_backend_that_runs_it(balancer):
    answer = balancer.post("/prompt", {"prompt": wf.sleep(20, 1)})
    deadline = time.time() + 20
    while time.time() < deadline and not any(i[1] == answer["prompt_id"] for i in balancer.get("/queue")["queue_running"]):
        time.sleep(0.05)
    balancer.post("/interrupt", {"prompt_id": answer["prompt_id"]})
    entry = balancer.wait([answer["prompt_id"]], timeout=15)[answer["prompt_id"]]
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in dict(entry["status"]["messages"])


def test_a_backend_killed_mid_run_is_marked_down_avoided_and_rejoins(own_servers, multi2, tmp_path):
    extra = own_servers("balanced-extra", workers=1, env={"COMFY_MULTI_GPU_SCHED": "1"})
    b = BalancerProcess([extra.url, multi2.url], tmp_path)
    try:
        assert b.get("/health")["healthy"] == 2
        running = b.post("/prompt", {"prompt": wf.sleep(3.0, 1)})          # first idle slot: extra
        assert running["instance"] == extra.url
        extra.wait_running(running["prompt_id"])
        extra.kill()                                                         # mid-run
        deadline = time.time() + 10
        while time.time() < deadline and b.get("/health")["healthy"] != 1:
            time.sleep(0.1)
        assert {i["url"]: i["healthy"] for i in b.get("/instances")} == {multi2.url: True, extra.url: False}
        answers = [b.post("/prompt", {"prompt": wf.sleep(0.05, i)}) for i in range(4)]
        assert {a["instance"] for a in answers} == {multi2.url}
        extra.start()
        deadline = time.time() + 15
        while time.time() < deadline and b.get("/health")["healthy"] != 2:
            time.sleep(0.1)
        assert b.get("/health")["healthy"] == 2
        log = b.log_path.read_text()
        assert "marked DOWN" in log and "is UP" in log
        # the prompt that was running when it died is in that backend's journal: it runs again there
        entry = b.wait([running["prompt_id"]], timeout=30)[running["prompt_id"]]
        assert entry["status"]["status_str"] == "success" and entry["instance"] == extra.url
    finally:
        b.stop()


def test_a_submit_that_cannot_connect_is_retried_elsewhere_with_the_same_id(own_servers, multi2, tmp_path):
    gone = own_servers("balanced-gone", workers=1, env={"COMFY_MULTI_GPU_SCHED": "1"})
    b = BalancerProcess([gone.url, multi2.url], tmp_path, extra=("--poll-interval", "30"))
    try:
        assert b.get("/health")["healthy"] == 2
        gone.kill()                                   # the balancer's view still says healthy and idle
        pid = str(uuid.uuid4())
        answer = b.post("/prompt", {"prompt": wf.sleep(0.05, 1), "prompt_id": pid})
        assert answer["prompt_id"] == pid and answer["instance"] == multi2.url
        assert {i["url"]: i["healthy"] for i in b.get("/instances")} == {gone.url: False, multi2.url: True}
        assert b.wait([pid])[pid]["status"]["status_str"] == "success"
        assert "trying another backend" in b.log_path.read_text()
    finally:
        b.stop()


def test_prompts_wait_in_the_balancer_until_a_gpu_is_free(multi2, tmp_path):
    """With depth 1 each GPU slot gets one prompt at a time; the rest are held in order and sent the
    moment a slot frees (late binding: whichever GPU is free first gets the next prompt)."""
    wait_idle(multi2)
    b = BalancerProcess([multi2.url], tmp_path, extra=("--depth", "1"))
    try:
        answers = [b.post("/prompt", {"prompt": wf.sleep(0.6, i)}) for i in range(5)]
        assert [a.get("held", False) for a in answers] == [False, False, True, True, True]
        bad = b.post("/prompt", {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}})
        assert bad["held"] is True                       # accepted here; the backend refuses it later
        queue = b.get("/queue")
        assert len(queue["queue_running"]) + len(queue["queue_pending"]) == 6
        done = b.wait([a["prompt_id"] for a in answers] + [bad["prompt_id"]], timeout=60)
        assert all(done[a["prompt_id"]]["status"]["status_str"] == "success" for a in answers)
        starts = sorted(wf.ui(done[a["prompt_id"]], "1", "t0") for a in answers)
        assert starts[2] - starts[0] < 1.2                 # the third started as soon as a GPU was free
        refused = done[bad["prompt_id"]]["status"]
        assert refused["status_str"] == "error" and "NoSuchNode" in json.dumps(refused)
        assert b.get("/status")["held"] == 0
    finally:
        b.stop()


def test_the_bearer_token_guards_everything_but_health(multi2, tmp_path):
    b = BalancerProcess([multi2.url], tmp_path, extra=("--token", "s3cret"))
    try:
        assert b.get("/health")["status"] == "ok"
        with pytest.raises(HttpError) as denied:
            b.get("/status")
        assert denied.value.status == 401 and denied.value.json()["error"]["type"] == "unauthorized"
        assert b.get("/status", headers={"Authorization": "Bearer s3cret"})["healthy"] == 1
    finally:
        b.stop()


# ---- pure parts ----------------------------------------------------------------------------------
def test_policy_idle_first_then_models_then_weighted_load():
    slots = [Slot("a", None, True, 1, 0), Slot("b", 0, True, 0, 0, models=("ckpt_name:x",)), Slot("b", 1, True, 0, 0)]
    assert choose_slot(slots, frozenset({"ckpt_name:x"})) is slots[1]
    assert choose_slot(slots) is slots[1]                                  # ties: first listed
    assert choose_slot(slots, exclude=frozenset({"b"})) is slots[0]
    view = with_submitted(slots, slots[1])
    assert choose_slot(view) is view[2]                                   # the burst moves on
    assert choose_slot([Slot("a", None, False, 0, 0)]) is None


def test_settings_from_flags_environment_and_config(tmp_path):
    s = resolve(["--backend", "http://h1:8188=2", "--backend", "http://h2:8188/", "--listen", "0.0.0.0:9000"], env={})
    assert [(b.url, b.weight) for b in s.backends] == [("http://h1:8188", 2.0), ("http://h2:8188", 1.0)]
    assert (s.host, s.port, s.poll_interval) == ("0.0.0.0", 9000, 0.5)
    env = {"COMFY_BALANCER_BACKENDS": "http://e:1=3", "COMFY_BALANCER_POLL_INTERVAL": "1", "COMFY_BALANCER_TOKEN": "t"}
    s = resolve([], env=env)
    assert (s.backends[0].weight, s.poll_interval, s.token) == (3.0, 1.0, "t")
    config = tmp_path / "b.toml"
    config.write_text('listen = "127.0.0.1:7000"\n[[backend]]\nurl = "http://c:8188"\nweight = 2\ntoken = "k"\n')
    s = resolve(["--config", str(config)], env={})
    assert (s.port, s.backends[0].token, s.backends[0].weight) == (7000, "k", 2.0)
    assert (s.depth, s.pin_gpu) == (2, "idle")
    s = resolve(["--backend", "http://x:1", "--depth", "0", "--pin-gpu", "always"], env={})
    assert (s.depth, s.pin_gpu) == (0, "always")
    assert resolve(["--backend", "http://x:1"], env={"COMFY_BALANCER_PIN_GPU": "never"}).pin_gpu == "never"
    for argv, fragment in ([[], "no backend"], [["--backend", "ftp://x"], "not an http"],
                           [["--backend", "http://x:1=zero"], "not a number"],
                           [["--backend", "http://x:1", "--poll-interval", "0"], "between"],
                           [["--backend", "http://x:1", "--backend", "http://x:1"], "twice"],
                           [["--backend", "http://x:1", "--depth", "-1"], "whole number"]):
        with pytest.raises(SettingsError, match=fragment):
            resolve(argv, env={})
