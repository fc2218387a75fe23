"""Fleet mode (COMFY_MULTIGPU_FLEET): several comfy-multigpu servers share one durable queue in a real
redis-server started here (append-only file, fsync always), all on loopback. Machine c reaches Redis
through a TCP proxy that can drop traffic (a partition). The oracle everywhere: every prompt answered
200 ends with exactly one terminal history entry, no prompt succeeds twice, every output can be
fetched from every machine. Machine c runs its GPU's prompts in a process worker."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import time
import uuid

import aiohttp
import pytest

from helpers import workflows as wf
from helpers.comfy_server import ComfyServer, HttpError
from helpers.redis_server import RedisServer
from helpers.tcp_proxy import TcpProxy

from comfy_multigpu.policy.config import ConfigError, resolve_settings


LEASE_S = 3.0
ABSENT_S = 4.0
PROCESS_MODE = {"COMFY_MULTIGPU_WORKER_MODE": "process"}


class Fleet:
    def __init__(self, redis: RedisServer, proxy: TcpProxy, machines: dict):
        self.redis, self.proxy, self.machines = redis, proxy, machines
        self.client = redis.client()

    def __getitem__(self, name) -> ComfyServer:
        return self.machines[name]

    def active(self) -> int:
        return int(self.client.zcard("cmg:active"))

    def settle(self, timeout: float = 60.0) -> None:
        """Until nothing waits or runs anywhere in the fleet."""
        deadline = time.time() + timeout
        while self.active():
            assert time.time() < deadline, f"{self.active()} prompt(s) still active"
            time.sleep(0.05)

    def history_entries(self, prompt_id: str) -> int:
        return int(self.client.exists(f"cmg:hist:{prompt_id}"))


def machine_env(redis_url: str, name: str) -> dict:
    return {"COMFY_MULTIGPU_FLEET": redis_url, "COMFY_MULTIGPU_NODE_NAME": name,
            "COMFY_MULTIGPU_FLEET_LEASE": str(LEASE_S), "COMFY_MULTIGPU_FLEET_STEAL_DELAY": "0.5",
            "COMFY_MULTIGPU_FLEET_ABSENT_TIMEOUT": str(ABSENT_S)}


@pytest.fixture(scope="module")
def fleet(comfyui_dir, fixtures_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("fleet")
    redis = RedisServer(base / "redis").start()
    proxy = TcpProxy(redis.port).start()
    machines = {}
    try:
        # c: one GPU with a process worker (fleet mode with COMFY_MULTIGPU_WORKER_MODE=process)
        pools = {"COMFY_MULTIGPU_POOLS": "fast=1"}          # GPU 1 of a and of b form pool "fast"
        for name, workers, url, mode in (("a", 2, redis.url, pools), ("b", 2, redis.url, pools),
                                         ("c", 1, f"redis://127.0.0.1:{proxy.port}/0", PROCESS_MODE)):
            machines[name] = ComfyServer(comfyui_dir, base / name, workers=workers,
                                         env={**machine_env(url, name), **mode}, fixtures=fixtures_dir).start()
        yield Fleet(redis, proxy, machines)
    finally:
        for server in machines.values():
            if server.proc is not None and server.proc.poll() is None:
                os.killpg(server.proc.pid, signal.SIGCONT)
            server.stop()
        proxy.stop()
        redis.stop()


def ran_on(entry: dict) -> tuple:
    return entry["node"], entry["gpu_id"]


def assert_one_terminal_entry_each(fleet: Fleet, ids, door: ComfyServer) -> dict:
    entries = door.wait(ids, timeout=90)
    for pid in ids:
        assert fleet.history_entries(pid) == 1
        assert entries[pid]["status"]["completed"] in (True, False)
    return entries


# ---- the switch -------------------------------------------------------------------------------------
def test_without_the_setting_there_is_no_fleet_and_no_connection(multi2):
    assert resolve_settings({"COMFY_NUM_GPUS": "2"}, 0, True).fleet is None
    health = multi2.get("/multigpu/health")
    assert "fleet" not in health
    with pytest.raises(HttpError) as err:
        multi2.get("/multigpu/fleet")
    assert err.value.status == 404
    assert "FLEET member" not in multi2.log() and "fleet member" not in multi2.log()


@pytest.mark.parametrize("env, fragment", [
    ({"COMFY_MULTIGPU_FLEET": "http://127.0.0.1:6379"}, "is not a Redis URL"),
    ({"COMFY_MULTIGPU_FLEET": "redis://h:1/0", "COMFY_MULTIGPU_NODE_NAME": "no spaces"}, "is not a machine name"),
    ({"COMFY_MULTIGPU_FLEET": "redis://h:1/0", "COMFY_MULTIGPU_FLEET_ATTEMPTS": "0"}, "must be 1 or more"),
    ({"COMFY_MULTIGPU_FLEET": "redis://h:1/0", "COMFY_MULTIGPU_FLEET_LEASE": "0.5"}, "at least 1 second"),
    ({"COMFY_MULTIGPU_FLEET": "redis://h:1/0", "COMFY_MULTIGPU_NODE_URL": "host:80"}, "is not a base URL"),
])
def test_bad_fleet_settings_are_refused_with_the_fix(env, fragment):
    with pytest.raises(ConfigError, match=fragment):
        resolve_settings({"COMFY_NUM_GPUS": "2", **env}, 0, True)


# ---- admission, placement, history ----------------------------------------------------------------
def test_prompts_sent_to_one_machine_run_on_every_machine_and_history_is_fleet_wide(fleet):
    a, b = fleet["a"], fleet["b"]
    answers = [a.submit(wf.sleep(0.6, i)) for i in range(8)]
    assert all(ans["fleet"]["runs_on"] == "any GPU of the fleet" for ans in answers)
    numbers = [ans["number"] for ans in answers]
    assert numbers == sorted(numbers) and len(set(numbers)) == 8
    ids = [ans["prompt_id"] for ans in answers]
    entries = assert_one_terminal_entry_each(fleet, ids, b)         # asked at the other machine
    assert all(e["status"]["status_str"] == "success" for e in entries.values())
    machines = {ran_on(e)[0] for e in entries.values()}
    assert {"a", "b"} <= machines, machines
    assert set(b.get("/history", max_items=8)) == set(ids)
    assert set(a.get("/history", max_items=8)) == set(ids)
    job = b.get(f"/api/jobs/{ids[0]}")
    assert job["id"] == ids[0] and job["status"] == "completed"
    status = a.get("/multigpu/fleet")
    assert set(status["machines"]) == {"a", "b", "c"} and status["reachable"]


def test_a_prompt_id_or_idempotency_key_sent_twice_is_queued_once(fleet):
    a, b = fleet["a"], fleet["b"]
    pid = str(uuid.uuid4())
    first = a.post("/prompt", {"prompt": wf.sleep(0.3, 1), "prompt_id": pid})
    again = b.post("/prompt", {"prompt": wf.sleep(0.3, 1), "prompt_id": pid})
    assert again["prompt_id"] == pid and again.get("duplicate") is True
    key = {"Idempotency-Key": uuid.uuid4().hex}
    one = a.submit(wf.sleep(0.3, 2), headers=key)
    two = b.submit(wf.sleep(0.3, 2), headers=key)
    assert two["prompt_id"] == one["prompt_id"] and two.get("duplicate") is True
    assert_one_terminal_entry_each(fleet, [first["prompt_id"], one["prompt_id"]], a)
    later = a.submit(wf.sleep(0.1, 2), headers=key)
    assert later["prompt_id"] == one["prompt_id"] and later["state"] == "done"


def test_pins_to_a_machine_and_to_a_gpu_of_it_hold(fleet):
    a, b = fleet["a"], fleet["b"]
    to_b = [a.submit(wf.sleep(0.2, i), headers={"X-TARGET-NODE": "b"})["prompt_id"] for i in range(4)]
    to_b1 = [a.submit(wf.sleep(0.2, i), headers={"X-TARGET-NODE": "b", "X-TARGET-GPU": "1"})["prompt_id"]
             for i in range(3)]
    here1 = [b.submit(wf.sleep(0.2, i), gpu=1)["prompt_id"] for i in range(3)]
    entries = assert_one_terminal_entry_each(fleet, to_b + to_b1 + here1, a)
    assert {ran_on(entries[p])[0] for p in to_b} == {"b"}
    assert {ran_on(entries[p]) for p in to_b1} == {("b", 1)}
    assert {ran_on(entries[p]) for p in here1} == {("b", 1)}


def test_pools_one_image_on_several_gpus_and_preload_keep_working_in_a_fleet(fleet):
    a = fleet["a"]
    fleet.settle()
    pooled = [a.submit(wf.sleep(0.3, i), headers={"X-GPU-POOL": "fast"})["prompt_id"] for i in range(4)]
    gang = a.submit(wf.flux(2), headers={"X-TARGET-NODE": "b"})["prompt_id"]
    auto = a.submit(wf.flux(1), headers={"X-TARGET-NODE": "a", "X-SEQUENCE-PARALLEL": "2"})["prompt_id"]
    entries = assert_one_terminal_entry_each(fleet, pooled + [gang, auto], a)
    assert {ran_on(entries[p]) for p in pooled} <= {("a", 1), ("b", 1)}, [ran_on(entries[p]) for p in pooled]
    for pid, node in ((gang, "b"), (auto, "a")):
        assert entries[pid]["status"]["status_str"] == "success" and entries[pid]["node"] == node
        assert sorted(entries[pid]["gpu_ids"]) == [0, 1]
    answer = a.post("/preload", {"model": wf.CHECKPOINT, "type": "checkpoint", "gpus": [0]})
    assert answer["gpus"] == {"0": "on_device"}, answer


def test_bad_targets_are_400_naming_the_valid_values(fleet):
    a = fleet["a"]
    with pytest.raises(HttpError) as err:
        a.submit(wf.sleep(0.1), headers={"X-TARGET-NODE": "not a name!"})
    assert err.value.status == 400
    body = err.value.json()["error"]
    assert body["type"] == "invalid_target_node" and {"a", "b", "c"} <= set(body["extra_info"]["valid"])
    with pytest.raises(HttpError) as err:
        a.submit(wf.sleep(0.1), headers={"X-TARGET-NODE": "b", "X-TARGET-GPU": "7"})
    assert err.value.status == 400 and err.value.json()["error"]["extra_info"]["valid"] == ["auto", 0, 1]


def test_a_prompt_pinned_to_an_absent_machine_fails_explicitly_after_the_timeout(fleet):
    a = fleet["a"]
    started = time.time()
    pid = a.submit(wf.sleep(0.1), headers={"X-TARGET-NODE": "ghost"})["prompt_id"]
    entry = a.wait(pid, timeout=ABSENT_S + 20)[pid]
    assert time.time() - started >= ABSENT_S - 0.5
    assert entry["status"]["status_str"] == "error"
    message = entry["status"]["messages"][0][1]["exception_message"]
    assert "ghost" in message and "not up" in message


def test_priorities_and_front_run_in_their_order_on_a_busy_gpu(fleet):
    a, b = fleet["a"], fleet["b"]
    pin = {"X-TARGET-NODE": "b", "X-TARGET-GPU": "0"}
    blocker = a.submit(wf.sleep(1.5, 0), headers=pin)["prompt_id"]
    b.wait_running(blocker, timeout=20)
    order = [("low", {"X-PRIORITY": "low"}, {}), ("normal", {}, {}), ("high", {"X-PRIORITY": "high"}, {}),
             ("front", {}, {"front": True})]
    ids = {}
    for tag, headers, extra in order:
        ids[tag] = a.submit(wf.sleep(0.05, len(ids)), headers={**pin, **headers}, **extra)["prompt_id"]
    entries = assert_one_terminal_entry_each(fleet, [blocker, *ids.values()], a)
    started = sorted(ids, key=lambda tag: wf.ui(entries[ids[tag]], "1", "t0"))
    assert started == ["front", "high", "normal", "low"]


def test_model_affinity_holds_across_machines(fleet):
    a = fleet["a"]
    fleet.settle()
    warm = a.submit(wf.standin("fleet-affinity", 0.05, load_seconds=0.3),
                    headers={"X-TARGET-NODE": "b", "X-TARGET-GPU": "1"})["prompt_id"]
    a.wait(warm, timeout=30)
    time.sleep(1.5)                       # b registers what its GPU 1 holds
    holders, cold = {("b", 1)}, 0
    for i in range(20):
        pid = a.submit(wf.standin("fleet-affinity", 0.05, value=i, load_seconds=0.3))["prompt_id"]
        where = ran_on(a.wait(pid, timeout=30)[pid])
        cold += where not in holders      # a load on a GPU that did not hold the model
        holders.add(where)
    assert cold <= 1, (cold, holders)


def test_idle_gpus_block_on_redis_instead_of_polling(fleet):
    fleet.settle()
    time.sleep(1.0)
    machines = [fleet[name] for name in ("a", "b", "c")]

    def counts():
        status = [m.get("/multigpu/fleet") for m in machines]
        return sum(s["take_calls"] for s in status), fleet.client.info("commandstats").get("cmdstat_xread", {})

    takes_before, xread_before = counts()
    time.sleep(3.0)
    takes_after, xread_after = counts()
    # 5 idle GPUs, each blocking up to 5 s per read: at most a couple of reads each in 3 s
    assert takes_after - takes_before <= 5 * 2
    assert xread_after.get("calls", 0) - xread_before.get("calls", 0) <= 5 * 2


# ---- the stock API across machines ---------------------------------------------------------------
async def _listen(url: str, client_id: str, events: list, binary: list, done: asyncio.Event, prompt_ids: set):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
            done.set()
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    event = json.loads(msg.data)
                    events.append(event)
                    data = event.get("data") or {}
                    if event["type"] == "executing" and data.get("node") is None and data.get("prompt_id") in prompt_ids:
                        return
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    binary.append(struct.unpack(">I", msg.data[:4])[0])
                else:
                    return


def test_websocket_events_of_a_prompt_on_another_machine_reach_the_client_in_stock_order(fleet):
    a, b = fleet["a"], fleet["b"]
    client_id = uuid.uuid4().hex
    events, binary = [], []

    async def scenario():
        connected = asyncio.Event()
        ids: set = set()
        listener = asyncio.create_task(_listen(b.url, client_id, events, binary, connected, ids))
        await asyncio.wait_for(connected.wait(), 20)
        answer = await asyncio.to_thread(a.post, "/prompt", {
            "prompt": wf.txt2img(3, prefix="fleetws", steps=3), "client_id": client_id,
            "extra_data": {"preview_method": "latent2rgb"}}, {"X-TARGET-NODE": "a"})
        ids.add(answer["prompt_id"])
        await asyncio.wait_for(listener, 90)
        return answer["prompt_id"]

    pid = asyncio.run(scenario())
    mine = [e for e in events if isinstance(e.get("data"), dict) and e["data"].get("prompt_id") == pid]
    kinds = [e["type"] for e in mine]
    assert kinds[0] == "execution_start" and "execution_cached" in kinds[:3], kinds
    assert kinds.index("execution_success") < len(kinds) - 1 and kinds[-1] == "executing", kinds
    assert any(k == "progress" for k in kinds) and any(k == "executed" for k in kinds), kinds
    steps = [e["data"]["value"] for e in mine if e["type"] == "progress" and e["data"].get("node") == "5"]
    assert steps == sorted(steps) and steps[-1] == 3, steps
    assert binary and set(binary) <= {1, 4}, binary            # previews (PREVIEW_IMAGE) crossed too
    entry = b.get(f"/history/{pid}")[pid]
    assert entry["node"] == "a"


def test_view_queue_interrupt_delete_and_upload_work_across_machines(fleet):
    a, b = fleet["a"], fleet["b"]
    # outputs: numbered uniquely across machines, every file served by every machine, byte-identical
    made = [a.submit(wf.save_batch("fleetview", 60 * i, batch=2), headers={"X-TARGET-NODE": node})["prompt_id"]
            for i, node in enumerate(("a", "b", "a", "b"))]
    entries = assert_one_terminal_entry_each(fleet, made, b)
    names = [img["filename"] for e in entries.values() for img in e["outputs"]["2"]["images"]]
    assert len(set(names)) == len(names) == 8, names
    for name in names:
        assert a.get("/view", filename=name, type="output") == b.get("/view", filename=name, type="output")
    # /queue is fleet-wide; interrupt by prompt id wherever it runs; delete of a waiting prompt
    pin = {"X-TARGET-NODE": "a", "X-TARGET-GPU": "0"}
    long = b.submit(wf.sleep(30, 1), headers=pin)["prompt_id"]
    waiting = b.submit(wf.sleep(0.1, 2), headers=pin)["prompt_id"]
    b.wait_running(long, timeout=20)
    queue = b.get("/queue")
    assert long in [item[1] for item in queue["queue_running"]]
    assert waiting in [item[1] for item in queue["queue_pending"]]
    b.post("/queue", {"delete": [waiting]})
    b.post("/interrupt", {"prompt_id": long})
    entry = b.wait(long, timeout=20)[long]
    assert entry["status"]["status_str"] == "error" and entry["node"] == "a"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    fleet.settle()
    assert b.get(f"/history/{waiting}") == {}
    # an image uploaded at b: loaded by a prompt sent at b that runs on a (a fetches it to run it), and
    # by one sent at a (a fetches it before validating the prompt)
    for door, runs_on in ((b, "a"), (a, None)):
        uploaded = upload_png(b, f"fleet-up-{door.port}.png")
        prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": uploaded["name"]}},
                  "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "fleetup"}}}
        pid = door.submit(prompt, headers={"X-TARGET-NODE": runs_on} if runs_on else {})["prompt_id"]
        entry = door.wait(pid, timeout=30)[pid]
        assert entry["status"]["status_str"] == "success", entry["status"]
        assert runs_on is None or entry["node"] == runs_on


def upload_png(server: ComfyServer, name: str) -> dict:
    import io
    from PIL import Image
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(png, format="PNG")
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    return server.request("POST", "/upload/image", raw=body, content_type=f"multipart/form-data; boundary={boundary}")


# ---- faults ------------------------------------------------------------------------------------
def test_a_partition_between_a_machine_and_redis_moves_its_prompt_and_loses_nothing(fleet):
    a, c = fleet["a"], fleet["c"]
    fleet.settle()
    pid = a.submit(wf.sleep(LEASE_S + 3, 7), headers={"X-TARGET-NODE": "c"})["prompt_id"]
    c.wait_running(pid, timeout=20)
    fleet.proxy.set_mode("drop")
    # c cannot renew: after the lease the prompt waits again in c's lane, and fails nowhere meanwhile
    time.sleep(LEASE_S + 1.5)
    fleet.proxy.set_mode("reset")
    fleet.proxy.set_mode("pass")
    entry = a.wait(pid, timeout=60)[pid]
    assert fleet.history_entries(pid) == 1 and entry["status"]["status_str"] == "success"
    assert int(fleet.client.hget("cmg:stats", "redelivered") or 0) >= 1
    fleet.settle()
    ok = a.submit(wf.sleep(0.1, 8), headers={"X-TARGET-NODE": "c"})["prompt_id"]
    assert a.wait(ok, timeout=30)[ok]["node"] == "c"             # c is back in the fleet


def test_a_machine_stopped_past_its_lease_cannot_complete_what_ran_elsewhere(fleet):
    a = fleet["a"]
    fleet.settle()
    fenced = int(fleet.client.hget("cmg:stats", "fenced") or 0)
    pid = a.submit(wf.sleep(2.0, 9))["prompt_id"]
    deadline = time.time() + 20
    while ran_where(fleet, pid) is None and time.time() < deadline:
        time.sleep(0.02)
    where = ran_where(fleet, pid)
    victim = fleet[where[0]]
    os.killpg(victim.proc.pid, signal.SIGSTOP)
    try:
        entry = a.wait(pid, timeout=60)[pid] if where[0] != "a" else fleet["b"].wait(pid, timeout=60)[pid]
    finally:
        os.killpg(victim.proc.pid, signal.SIGCONT)
    assert entry["node"] != where[0] and entry["status"]["status_str"] == "success"
    time.sleep(LEASE_S)                         # the zombie wakes up, finishes, and is refused
    assert fleet.history_entries(pid) == 1
    assert json.loads(fleet.client.get(f"cmg:hist:{pid}"))["node"] == entry["node"]
    assert int(fleet.client.hget("cmg:stats", "fenced") or 0) >= fenced   # refused, or stopped by its renewal
    fleet.settle()


def ran_where(fleet: Fleet, prompt_id: str):
    job = fleet.client.hgetall(f"cmg:job:{prompt_id}")
    if job.get(b"state") == b"running":
        return job[b"node"].decode(), int(job[b"gpu"])
    return None


def test_redis_killed_and_restarted_under_load_loses_nothing_it_accepted(fleet):
    a, b = fleet["a"], fleet["b"]
    fleet.settle()
    accepted = [a.submit(wf.sleep(0.4, i))["prompt_id"] for i in range(8)]
    fleet.redis.kill()
    refused = 0
    for i in range(3):
        try:
            accepted.append(b.submit(wf.sleep(0.1, 100 + i))["prompt_id"])
        except HttpError as ex:
            assert ex.status == 503 and ex.json()["error"]["type"] == "fleet_unavailable"
            refused += 1
    assert refused == 3
    fleet.redis.start()
    entries = assert_one_terminal_entry_each(fleet, accepted, b)
    assert all(e["status"]["status_str"] == "success" for e in entries.values())
    ready = a.get("/multigpu/ready")
    assert ready["fleet"]["redis_reachable"]


def test_a_machine_killed_mid_prompt_has_its_prompts_finish_elsewhere(fleet):
    a, c = fleet["a"], fleet["c"]
    fleet.settle()
    ids = [a.submit(wf.sleep(2.5, i))["prompt_id"] for i in range(5)]      # 5 GPUs: one lands on c
    deadline = time.time() + 20
    while not any((ran_where(fleet, p) or ("",))[0] == "c" for p in ids) and time.time() < deadline:
        time.sleep(0.02)
    assert any((ran_where(fleet, p) or ("",))[0] == "c" for p in ids), "no prompt started on c"
    c.kill()
    entries = assert_one_terminal_entry_each(fleet, ids, a)
    assert all(e["status"]["status_str"] == "success" and e["node"] in ("a", "b") for e in entries.values())


def test_a_machine_started_while_redis_is_unreachable_serves_reads_refuses_prompts_then_joins(fleet):
    a, c = fleet["a"], fleet["c"]
    fleet.proxy.set_mode("reset")                   # c's way to Redis refuses every connection
    c.start()
    health = c.get("/multigpu/health")
    assert health["status"] == "ok" and health["fleet"] == {"node": "c", "redis_reachable": False}
    with pytest.raises(HttpError) as err:
        c.get("/multigpu/ready")
    assert err.value.status == 503 and err.value.json()["fleet"]["redis_reachable"] is False
    with pytest.raises(HttpError) as err:
        c.submit(wf.sleep(0.1))
    assert err.value.status == 503 and err.value.json()["error"]["type"] == "fleet_unavailable"
    assert c.get("/queue/all", counts=1)["total_running"] == 0          # its own view still answers
    fleet.proxy.set_mode("pass")
    deadline = time.time() + 20
    while not c.get("/multigpu/health")["fleet"]["redis_reachable"]:
        assert time.time() < deadline, "c did not reconnect"
        time.sleep(0.2)
    pid = c.submit(wf.sleep(0.1, 3), headers={"X-TARGET-NODE": "c"})["prompt_id"]
    assert a.wait(pid, timeout=30)[pid]["node"] == "c"
    metrics = c.get("/metrics").decode()
    assert "comfy_multigpu_fleet_redis_reachable 1.0" in metrics
    assert 'comfy_multigpu_fleet_gpus{machine="c",state="idle"}' in metrics
