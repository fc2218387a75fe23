"""Prometheus metrics, the per-prompt log line, the dashboard's state (cards, 15-minute series and
runs) and its WebSocket pushes (only to subscribed sockets, throttled, carrying only the last buckets),
against a real ComfyUI with 2 CPU workers."""
import asyncio
import json
import re
import time
import uuid

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import workflows as wf
from helpers.comfy_server import HttpError


@pytest.fixture(scope="module")
def mon2(servers):
    server = servers.start("mon2", workers=2)
    yield server
    server.stop()


def scrape(server) -> dict:
    """{(name, frozenset(labels.items())): value} of every sample in GET /metrics."""
    raw = server.request("GET", "/metrics").decode()
    out = {}
    for family in text_string_to_metric_families(raw):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples, name, **labels) -> float:
    return samples.get((name, frozenset({k: str(v) for k, v in labels.items()}.items())), 0.0)


def test_metrics_move_with_the_prompts_sent_per_gpu_and_outcome(mon2):
    before = scrape(mon2)
    ok = [mon2.submit(wf.sleep(0.05, i), gpu=i % 2)["prompt_id"] for i in range(6)]
    failed = mon2.submit(wf.fault("oom"), gpu=1)["prompt_id"]
    long = mon2.submit(wf.sleep(30, 99), gpu=0)["prompt_id"]
    waiting = [mon2.submit(wf.sleep(0.05, 100 + i), gpu=0)["prompt_id"] for i in range(3)]
    mon2.wait_running(long)
    during = scrape(mon2)
    assert value(during, "comfy_multigpu_running", gpu=0) == 1
    assert value(during, "comfy_multigpu_queue_pending", gpu=0) == 3
    assert value(during, "comfy_multigpu_worker_up", gpu=0) == value(during, "comfy_multigpu_worker_up", gpu=1) == 1
    mon2.post("/interrupt", {"prompt_id": long})
    mon2.wait(ok + [failed, long] + waiting)
    after = scrape(mon2)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)
    assert delta("comfy_multigpu_prompts_finished_total", gpu=0, outcome="success") == 3 + 3
    assert delta("comfy_multigpu_prompts_finished_total", gpu=1, outcome="success") == 3
    assert delta("comfy_multigpu_prompts_finished_total", gpu=1, outcome="error") == 1
    assert delta("comfy_multigpu_prompts_finished_total", gpu=0, outcome="interrupted") == 1
    assert delta("comfy_multigpu_prompt_duration_seconds_count", gpu=0) == 7
    assert delta("comfy_multigpu_prompt_duration_seconds_count", gpu=1) == 4
    assert delta("comfy_multigpu_prompt_queue_wait_seconds_count", gpu=0) == 7
    assert delta("comfy_multigpu_prompt_duration_seconds_sum", gpu=0) >= 0.3   # the interrupted sleep ran a while
    assert value(after, "comfy_multigpu_queue_pending", gpu=0) == 0


def test_model_loads_and_the_ram_cache_are_counted(mon2):
    before = scrape(mon2)
    pid = mon2.submit(wf.txt2img(3, prefix="metrics"), gpu=1)["prompt_id"]
    assert mon2.wait(pid, timeout=300)[pid]["status"]["status_str"] == "success"
    after = scrape(mon2)
    assert value(after, "comfy_multigpu_model_loads_total", gpu=1) > value(before, "comfy_multigpu_model_loads_total", gpu=1)
    assert value(after, "comfy_multigpu_model_load_seconds_total", gpu=1) > 0
    assert value(after, "comfy_multigpu_model_file_loads_total", type="checkpoint") == 1
    assert value(after, "comfy_multigpu_ram_cache_bytes") > 400 * 2 ** 20
    assert value(after, "comfy_multigpu_ram_cache_misses_total") >= 1
    assert value(after, "process_resident_memory_bytes") > 0


def test_one_greppable_log_line_per_prompt(mon2):
    pid = mon2.submit(wf.sleep(0.05, 7), gpu=1)["prompt_id"]
    mon2.wait(pid)
    deadline = time.time() + 10
    pattern = re.compile(rf"prompt_done gpu=1 prompt_id={pid} outcome=success queue_wait_s=(\d+\.\d+) run_s=(\d+\.\d+)")
    while not pattern.search(mon2.log()) and time.time() < deadline:
        time.sleep(0.1)
    match = pattern.search(mon2.log())
    assert match, "no prompt_done line"
    assert float(match.group(2)) >= 0.05


def test_the_dashboard_state_and_page(mon2):
    state = mon2.get("/multigpu/state")
    assert [g["gpu_id"] for g in state["gpus"]] == [0, 1]
    assert {"state", "running", "progress", "pending", "models", "memory", "per_minute", "device"} <= set(state["gpus"][0])
    assert set(state["totals"]) == {"running", "pending", "per_minute", "gpus_up"}
    window = state["series"]
    assert window["count"] == 180 and window["bucket_s"] == 5 and not window["tail"]
    assert [r["gpu_id"] for r in window["gpus"]] == [0, 1]
    for row in window["gpus"] + [window["all"]]:
        assert all(len(row[f]) == 180 for f in ("busy", "finished", "waiting", "memory"))
    assert window["gpus"][0]["memory_kind"] == window["all"]["memory_kind"] == "ram_cache"   # CPU workers
    assert window["start"] <= state["time"] < window["start"] + 180 * 5
    assert isinstance(state["runs"], list)
    page = mon2.request("GET", "/multigpu/").decode()
    assert "<title>comfy-multigpu</title>" in page and "multigpu=1" in page


async def _listen(url, plan):
    """Two sockets (one subscribed with multigpu=1, one not); run plan(); collect what each got."""
    got = {"sub": [], "plain": []}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url}/ws?clientId={uuid.uuid4().hex}&multigpu=1") as sub, \
                session.ws_connect(f"{url}/ws?clientId={uuid.uuid4().hex}") as plain:
            async def read(ws, key):
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        got[key].append(json.loads(msg.data))
            readers = [asyncio.create_task(read(sub, "sub")), asyncio.create_task(read(plain, "plain"))]
            await asyncio.to_thread(plan)
            await asyncio.sleep(0.6)
            for r in readers:
                r.cancel()
    return got


def test_only_subscribed_sockets_get_live_state_with_progress(mon2):
    def plan():
        sent.append(mon2.submit(wf.sleep(1.5, 5), gpu=1)["prompt_id"])
        mon2.wait(sent[0])
    sent = []
    got = asyncio.run(_listen(mon2.url, plan))
    pid = sent[0]
    states = [m["data"] for m in got["sub"] if m["type"] == "multigpu_state"]
    assert not [m for m in got["plain"] if m["type"] == "multigpu_state"]
    busy = [s["gpus"][1] for s in states if s["gpus"][1]["state"] != "idle"]
    assert busy, "no push while GPU 1 was busy"
    assert any(c["progress"] and c["progress"]["max"] > 0 for c in busy), "no live progress pushed"
    assert states[-1]["gpus"][1]["state"] == "idle"
    assert all(s["series"]["tail"] and len(s["series"]["gpus"][1]["busy"]) == 2 for s in states)   # small pushes
    assert any(r["prompt_id"] == pid and r["gpus"] == [1] and r["end"] is None for s in states for r in s["runs"])
    (done,) = [r for r in states[-1]["runs"] if r["prompt_id"] == pid]
    assert done["outcome"] == "success" and done["end"] - done["start"] >= 1.5
    assert sum(states[-1]["series"]["gpus"][1]["finished"]) >= 1
    gaps = [b["time"] - a["time"] for a, b in zip(states, states[1:])]
    assert all(g >= 0.2 for g in gaps), f"pushes closer than the throttle: {gaps}"


def test_metrics_route_does_not_exist_on_stock(stock):
    with pytest.raises(HttpError) as caught:
        stock.request("GET", "/multigpu/state")
    assert caught.value.status == 404


def test_the_grafana_dashboard_uses_only_series_the_server_exports(mon2):
    import pathlib
    dashboard = json.loads((pathlib.Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json").read_text())
    raw = mon2.request("GET", "/metrics").decode()
    exported = set()
    for family in text_string_to_metric_families(raw):    # families without samples yet count too
        exported |= {family.name, family.name + "_total"} | {sample.name for sample in family.samples}
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\b(comfy_multigpu_[a-z_]+|process_[a-z_]+)", target["expr"]))
    assert used and used <= exported, sorted(used - exported)
