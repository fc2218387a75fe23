"""The HTTP contract with X-TARGET-GPU: /prompt, /queue, /queue/all, /interrupt, /free, /history,
/api/jobs*, and a clear 400 for a bad header. Real ComfyUI with the extension on 2 CPU workers."""
import time

import pytest

from helpers import workflows as wf
from helpers.comfy_server import HttpError


@pytest.fixture
def multi2(multi2_modes):
    """Every test here on thread workers and on process workers (COMFY_MULTIGPU_WORKER_MODE)."""
    return multi2_modes


def gpu_header(gpu):
    return {"X-TARGET-GPU": str(gpu)}


def drain(server, timeout=60.0):
    """Wait until no GPU runs or holds anything (tests share one server)."""
    deadline = time.time() + timeout
    while server.get("/queue/all", counts=1)["total_running"] + server.get("/queue/all", counts=1)["total_pending"]:
        if time.time() > deadline:
            raise TimeoutError("queues did not drain")
        time.sleep(0.05)


def block(server, gpu, seconds=30.0, value=0):
    """Occupy one GPU with an interruptible sleep; returns its prompt id once it runs."""
    pid = server.submit(wf.sleep(seconds, value), gpu=gpu)["prompt_id"]
    server.wait_running(pid)
    return pid


def unblock(server, *pids):
    for pid in pids:
        server.post("/interrupt", {"prompt_id": pid})
    server.wait(list(pids))


@pytest.mark.parametrize("gpu", [0, 1])
def test_prompt_pinned_by_header_runs_on_that_gpu(multi2, gpu):
    answer = multi2.submit(wf.sleep(0.05, 1), gpu=gpu)
    assert answer["gpu_id"] == gpu
    assert set(answer) == {"prompt_id", "number", "node_errors", "gpu_id"}
    entry = multi2.wait(answer["prompt_id"])[answer["prompt_id"]]
    assert entry["gpu_id"] == gpu
    assert wf.ui(entry, "1", "gpu") == gpu


@pytest.mark.parametrize("header", [None, "auto", "AUTO", ""])
def test_auto_placement_picks_an_idle_gpu(multi2, header):
    drain(multi2)
    busy = block(multi2, 0)
    try:
        headers = {} if header is None else {"X-TARGET-GPU": header}
        answer = multi2.post("/prompt", {"prompt": wf.sleep(0.05, 2)}, headers=headers)
        assert answer["gpu_id"] == 1
        assert multi2.wait(answer["prompt_id"])[answer["prompt_id"]]["gpu_id"] == 1
    finally:
        unblock(multi2, busy)


@pytest.mark.parametrize("path", ["/prompt", "/api/prompt"])
@pytest.mark.parametrize("value, fragment", [("2", "out of range"), ("7", "out of range"), ("-1", "not a GPU"),
                                             ("abc", "not a GPU"), ("1.5", "not a GPU"), ("0,1", "not a GPU")])
def test_invalid_header_is_a_400_naming_the_value_and_the_valid_ones(multi2, path, value, fragment):
    before = multi2.get("/queue/all", counts=1)
    with pytest.raises(HttpError) as info:
        multi2.post(path, {"prompt": wf.sleep(0.01)}, headers={"X-TARGET-GPU": value})
    assert info.value.status == 400
    error = info.value.json()["error"]
    assert error["type"] == "invalid_target_gpu" and fragment in error["message"]
    assert error["extra_info"] == {"header": "X-TARGET-GPU", "value": value, "valid": ["auto", 0, 1]}
    after = multi2.get("/queue/all", counts=1)
    assert after["total_pending"] + after["total_running"] <= before["total_pending"] + before["total_running"]


@pytest.mark.parametrize("method, path", [("GET", "/queue"), ("POST", "/interrupt"), ("POST", "/free"),
                                          ("GET", "/api/queue"), ("POST", "/queue")])
def test_invalid_header_is_refused_on_every_queue_route(multi2, method, path):
    with pytest.raises(HttpError) as info:
        multi2.request(method, path, body={} if method == "POST" else None, headers={"X-TARGET-GPU": "9"})
    assert info.value.status == 400


def test_validation_errors_are_exactly_stock(multi2, stock):
    bad = {"1": {"class_type": "MGSleep", "inputs": {"seconds": "x", "value": 0}}}
    answers = []
    for server, headers in ((stock, {}), (multi2, {}), (multi2, gpu_header(1))):
        with pytest.raises(HttpError) as info:
            server.post("/prompt", {"prompt": bad}, headers=headers)
        answers.append((info.value.status, info.value.json()))
    assert answers[0] == answers[1] == answers[2]
    for server in (stock, multi2):
        with pytest.raises(HttpError) as info:
            server.post("/prompt", {"nothing": 1})
        assert info.value.status == 400 and info.value.json()["error"]["type"] == "no_prompt"


def test_number_and_front_order_the_target_queue(multi2):
    drain(multi2)
    busy = block(multi2, 1)
    try:
        ids = {}
        for number in (5, 3, 4):
            ids[number] = multi2.submit(wf.sleep(0.01, number), gpu=1, number=number)["prompt_id"]
        front = multi2.submit(wf.sleep(0.01, 99), gpu=1, front=True)["prompt_id"]
        pending = multi2.get("/queue", headers=gpu_header(1))["queue_pending"]
        assert [item[1] for item in pending] == [front, ids[3], ids[4], ids[5]]
        assert multi2.get("/queue", headers=gpu_header(0))["queue_pending"] == []
    finally:
        unblock(multi2, busy)
    multi2.wait([front] + list(ids.values()))


def test_queue_with_header_is_that_gpu_and_without_it_everything(multi2):
    drain(multi2)
    busy0, busy1 = block(multi2, 0), block(multi2, 1)
    try:
        waiting = multi2.submit(wf.sleep(0.01, 7), gpu=1)["prompt_id"]
        q1 = multi2.get("/queue", headers=gpu_header(1))
        assert q1["gpu_id"] == 1
        assert [i[1] for i in q1["queue_running"]] == [busy1]
        assert [i[1] for i in q1["queue_pending"]] == [waiting]
        q0 = multi2.get("/api/queue", headers=gpu_header(0))
        assert q0["gpu_id"] == 0 and [i[1] for i in q0["queue_running"]] == [busy0] and q0["queue_pending"] == []
        merged = multi2.get("/queue")
        assert set(merged) == {"queue_running", "queue_pending"}             # stock shape, no gpu_id
        assert {i[1] for i in merged["queue_running"]} == {busy0, busy1}
        assert all(len(i) == 5 for i in merged["queue_running"] + merged["queue_pending"])  # no sensitive data
        everything = multi2.get("/queue/all")
        assert [q["gpu_id"] for q in everything["queues"]] == [0, 1]
        assert everything["total_running"] == 2 and everything["total_pending"] == 1
        assert everything["queues"][1]["pending_count"] == 1
        assert [i[1] for i in everything["queues"][1]["queue_pending"]] == [waiting]
        counts = multi2.get("/queue/all", counts=1)
        assert "queue_pending" not in counts["queues"][0]
        assert counts["queues"][1]["running_count"] == 1 and counts["total_pending"] == 1
        assert multi2.get("/api/queue/all", counts=1)["total_running"] == 2
        assert multi2.get("/prompt", headers=gpu_header(1))["exec_info"]["queue_remaining"] == 2
        assert multi2.get("/prompt")["exec_info"]["queue_remaining"] == 3
    finally:
        unblock(multi2, busy0, busy1)
    multi2.wait(waiting)


def test_clear_with_header_clears_only_that_gpu_and_delete_finds_any_queue(multi2):
    drain(multi2)
    busy0, busy1 = block(multi2, 0), block(multi2, 1)
    try:
        w0 = [multi2.submit(wf.sleep(0.01, i), gpu=0)["prompt_id"] for i in range(2)]
        w1 = [multi2.submit(wf.sleep(0.01, i), gpu=1)["prompt_id"] for i in range(2)]
        multi2.post("/queue", {"clear": True}, headers=gpu_header(0))
        assert multi2.get("/queue", headers=gpu_header(0))["queue_pending"] == []
        assert [i[1] for i in multi2.get("/queue", headers=gpu_header(1))["queue_pending"]] == w1
        multi2.post("/queue", {"delete": [w1[1]]}, headers=gpu_header(0))   # id lives on GPU 1
        assert [i[1] for i in multi2.get("/queue", headers=gpu_header(1))["queue_pending"]] == [w1[0]]
        multi2.post("/queue", {"clear": True})
        assert multi2.get("/queue/all", counts=1)["total_pending"] == 0
    finally:
        unblock(multi2, busy0, busy1)
    for pid in w0 + w1:
        assert multi2.get(f"/history/{pid}") == {}


def test_interrupt_by_prompt_id_stops_only_that_prompt_from_any_port(multi2):
    drain(multi2)
    a, b = block(multi2, 0), block(multi2, 1)
    multi2.post("/interrupt", {"prompt_id": b}, headers=gpu_header(0))     # sent "through GPU 0's port"
    entry_b = multi2.wait(b)[b]
    assert entry_b["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry_b["status"]["messages"])
    assert [i[1] for i in multi2.get("/queue", headers=gpu_header(0))["queue_running"]] == [a]
    unblock(multi2, a)


def test_interrupt_with_header_stops_that_gpu_and_without_anything_stops_all(multi2):
    drain(multi2)
    a, b = block(multi2, 0), block(multi2, 1)
    multi2.post("/interrupt", headers=gpu_header(1))
    assert multi2.wait(b)[b]["status"]["status_str"] == "error"
    assert [i[1] for i in multi2.get("/queue")["queue_running"]] == [a]
    c = block(multi2, 1)
    multi2.post("/interrupt")
    done = multi2.wait([a, c])
    assert {done[a]["status"]["status_str"], done[c]["status"]["status_str"]} == {"error"}


def test_free_with_header_resets_only_that_gpus_cache(multi2):
    """/free {"free_memory": true} through GPU 0 drops GPU 0's node cache; GPU 1 keeps its own."""
    drain(multi2)
    prompt = {"3": {"class_type": "MGAdd", "inputs": {"value": 1000, "add": 5}},
              "2": {"class_type": "MGShow", "inputs": {"value": ["3", 0]}}}
    for gpu in (0, 1):
        multi2.wait(multi2.submit(prompt, gpu=gpu)["prompt_id"])
    multi2.post("/free", {"free_memory": True, "unload_models": True}, headers=gpu_header(0))
    time.sleep(0.5)          # the worker applies /free between prompts
    cached = {}
    for gpu in (0, 1):
        pid = multi2.submit(prompt, gpu=gpu)["prompt_id"]
        entry = multi2.wait(pid)[pid]
        cached[gpu] = set(next(m[1]["nodes"] for m in entry["status"]["messages"] if m[0] == "execution_cached"))
    assert cached == {0: set(), 1: {"2", "3"}}


def test_history_entries_name_the_gpu_that_ran_them(multi2):
    ids = {gpu: multi2.submit(wf.sleep(0.01, 40 + gpu), gpu=gpu)["prompt_id"] for gpu in (0, 1)}
    multi2.wait(list(ids.values()))
    history = multi2.get("/history")
    for gpu, pid in ids.items():
        assert history[pid]["gpu_id"] == gpu
        assert set(history[pid]) >= {"prompt", "outputs", "status", "meta", "gpu_id"}
        assert len(history[pid]["prompt"]) == 5
    assert multi2.get("/history", max_items=1)
    assert multi2.get(f"/api/history/{ids[1]}")[ids[1]]["gpu_id"] == 1


def test_jobs_api_lists_every_gpu_and_cancel_stops_only_its_job(multi2):
    drain(multi2)
    a, b = block(multi2, 0), block(multi2, 1)
    jobs = multi2.get("/api/jobs", status="in_progress")["jobs"]
    assert {j["id"] for j in jobs} == {a, b}
    assert multi2.get(f"/api/jobs/{b}")["status"] == "in_progress"
    assert multi2.post(f"/api/jobs/{b}/cancel") == {"cancelled": True}
    assert multi2.wait(b)[b]["status"]["status_str"] == "error"
    assert multi2.get(f"/api/jobs/{a}")["status"] == "in_progress"
    waiting = multi2.submit(wf.sleep(0.01), gpu=0)["prompt_id"]
    assert multi2.post("/api/jobs/cancel", {"job_ids": [waiting]}) == {"cancelled": True}
    assert multi2.get("/queue/all", counts=1)["total_pending"] == 0
    unblock(multi2, a)
    cancelled = {j["id"] for j in multi2.get("/api/jobs", status="cancelled", limit=50)["jobs"]}
    assert {a, b} <= cancelled
