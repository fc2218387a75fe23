"""Nothing lost, nothing misrouted, on real servers and real signals: health and readiness, queue caps
(429 with Retry-After, nothing accepted dropped), a worker whose loop dies or whose prompt raises
outside ComfyUI's node handling (its prompt errors, it comes back, the others never notice),
idempotent client prompt ids, kill -9 at random points (every accepted prompt ends in history once),
and SIGTERM drain (503 at once, running prompts finish, waiting ones run after the restart, exit 0)."""
import concurrent.futures
import json
import random
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter

import pytest

from helpers import workflows as wf
from helpers.comfy_server import HttpError


@pytest.fixture
def multi2(multi2_modes):
    """Every test here on thread workers and on process workers (COMFY_MULTIGPU_WORKER_MODE)."""
    return multi2_modes


def post_prompt(server, prompt, prompt_id=None, headers=None):
    body = {"prompt": prompt}
    if prompt_id:
        body["prompt_id"] = prompt_id
    return server.post("/prompt", body, headers=headers or {})


def test_health_and_readiness_answer_per_gpu(multi2):
    assert multi2.get("/multigpu/health") == {"status": "ok", "workers": 2, "workers_up": 2}
    ready = multi2.get("/multigpu/ready")
    assert ready["ready"] is True and ready["draining"] is False
    assert [(g["gpu_id"], g["ready"], g["reason"]) for g in ready["gpus"]] == [(0, True, ""), (1, True, "")]
    assert multi2.get("/api/multigpu/health")["status"] == "ok"


def test_a_client_prompt_id_makes_retries_idempotent(multi2):
    pid = str(uuid.uuid4())
    first = post_prompt(multi2, wf.sleep(0.3, 1), pid)
    again = post_prompt(multi2, wf.sleep(0.3, 1), pid)                   # a retry while it runs or waits
    assert first["prompt_id"] == again["prompt_id"] == pid and "duplicate" not in first
    assert again["duplicate"] is True and again["gpu_id"] == first["gpu_id"]
    multi2.wait(pid)
    after = post_prompt(multi2, wf.sleep(0.3, 1), pid)                   # a retry after it finished
    assert after["state"] == "done" and after["gpu_id"] == first["gpu_id"]
    time.sleep(0.5)
    assert multi2.get("/queue/all", counts=1)["total_pending"] == 0


def test_a_burst_over_the_queue_cap_gets_429_and_loses_nothing_accepted(own_servers, worker_env):
    capped = own_servers("capped4", workers=4, env={"COMFY_MULTIGPU_MAX_QUEUE_PER_GPU": "8", **worker_env})
    ids = [str(uuid.uuid4()) for _ in range(200)]

    def send(pid):
        try:
            return pid, post_prompt(capped, wf.sleep(0.1, 1), pid), None
        except HttpError as ex:
            return pid, None, ex

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, ids))
    accepted = [pid for pid, answer, _ in results if answer]
    refused = [ex for _, answer, ex in results if not answer]
    assert refused and all(ex.status == 429 for ex in refused)
    body = refused[0].json()["error"]
    assert body["type"] == "queue_full" and "cap per GPU" in body["message"]
    assert len(accepted) >= 32                                      # 4 GPUs x 8 at least
    done = capped.wait(accepted, timeout=120)
    assert all(e["status"]["status_str"] == "success" for e in done.values())
    print(f"\nbackpressure: 200 submits, {len(accepted)} accepted (all finished), {len(refused)} refused with 429")


def test_retry_after_is_sent_with_429(own_servers):
    capped = own_servers("capped1", workers=2, env={"COMFY_MULTIGPU_MAX_QUEUE": "2"})
    blockers = [post_prompt(capped, wf.sleep(3.0, i))["prompt_id"] for i in range(2)]
    req = urllib.request.Request(capped.url + "/prompt", data=json.dumps({"prompt": wf.sleep(0.1)}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 429 and int(info.value.headers["Retry-After"]) >= 1
    for pid in blockers:
        capped.post("/interrupt", {"prompt_id": pid})


def test_a_dying_worker_fails_only_its_prompt_and_comes_back(multi4):
    work = [post_prompt(multi4, wf.sleep(0.2, i))["prompt_id"] for i in range(40)]
    killed = post_prompt(multi4, wf.fault("kill"), headers={"X-TARGET-GPU": "1"})["prompt_id"]
    exited = post_prompt(multi4, wf.fault("exit"), headers={"X-TARGET-GPU": "1"})["prompt_id"]
    after = post_prompt(multi4, wf.sleep(0.05, 99), headers={"X-TARGET-GPU": "1"})["prompt_id"]
    done = multi4.wait(work + [killed, exited, after], timeout=120)
    assert done[killed]["status"]["status_str"] == "error"
    error = dict(done[killed]["status"]["messages"])["execution_error"]
    assert "worker died: WorkerKiller: injected worker death" == error["exception_message"]
    assert done[exited]["status"]["status_str"] == "error"
    assert "SystemExit" in dict(done[exited]["status"]["messages"])["execution_error"]["exception_message"]
    assert done[after]["status"]["status_str"] == "success" and done[after]["gpu_id"] == 1
    assert all(done[p]["status"]["status_str"] == "success" for p in work)
    state = multi4.get("/queue/all", counts=1)
    assert state["queues"][1]["restarts"] == 1 and all(q["up"] for q in state["queues"])
    assert [q["restarts"] for i, q in enumerate(state["queues"]) if i != 1] == [0, 0, 0]
    assert "[GPU 1] Worker died (WorkerKiller" in multi4.log()


def test_out_of_memory_on_one_gpu_frees_only_its_models_and_the_next_prompt_runs(multi2):
    holder = multi2.submit(wf.hold_model(4.0), gpu=1)["prompt_id"]
    multi2.wait_running(holder)
    time.sleep(1.5)                                          # GPU 1 has loaded and holds the checkpoint
    oom = multi2.submit(wf.fault("oom"), gpu=0)["prompt_id"]
    after = multi2.submit(wf.sleep(0.05, 5), gpu=0)["prompt_id"]
    done = multi2.wait([holder, oom, after], timeout=60)
    assert done[oom]["status"]["status_str"] == "error"
    assert "Got an OOM, unloading all loaded models." in multi2.log()
    assert wf.ui(done[holder], "2", "stayed_loaded") is True      # GPU 1's model was never unloaded
    assert done[after]["status"]["status_str"] == "success"


def test_a_prompt_past_the_watchdog_marks_its_gpu_unhealthy_until_it_ends(own_servers):
    server = own_servers("watchdog2", workers=2, env={"COMFY_MULTIGPU_WATCHDOG": "1"})
    hung = server.submit(wf.sleep(3.0, 1), gpu=0)["prompt_id"]
    server.wait_running(hung)
    time.sleep(1.8)
    ready = server.get("/multigpu/ready")
    assert ready["ready"] is True                                # GPU 1 still takes work
    assert ready["gpus"][0]["healthy"] is False and "more than 1 s" in ready["gpus"][0]["reason"]
    assert [server.submit(wf.sleep(0.05, i))["gpu_id"] for i in range(3)] == [1, 1, 1]
    server.wait(hung)
    time.sleep(1.0)
    assert server.get("/multigpu/ready")["gpus"][0]["healthy"] is True
    assert "Watchdog: a prompt has run for more than 1 s" in server.log()


def test_kill_9_at_random_points_loses_no_accepted_prompt(own_servers, worker_env):
    """Three kill -9 (two with process workers, whose restarts take longer) during a 50-prompt run,
    restarting each time on the same directory: every prompt (resent after each restart with its own
    id, as a client retrying would) ends in history once."""
    server = own_servers("durable", workers=2, env=worker_env)
    kills = 2 if worker_env else 3
    rng = random.Random(7)
    ids = [str(uuid.uuid4()) for _ in range(50)]
    accepted = set()
    for round_ in range(kills + 1):
        for pid in ids:
            if pid not in accepted:
                try:
                    # 0.3 s each: 7.5 s of work on 2 workers outlasts the three run windows (sleeps of
                    # at most 4.5 s in all, plus start-ups), so every kill finds prompts still to do
                    answer = post_prompt(server, wf.record(pid, 0.3), pid)
                except (HttpError, OSError):
                    break
                accepted.add(answer["prompt_id"])
        if round_ == kills:
            break
        time.sleep(rng.uniform(0.2, 1.5))
        server.kill()
        server.start()
    assert accepted == set(ids)
    done = server.wait(ids, timeout=120)
    assert all(e["status"]["status_str"] == "success" for e in done.values())
    runs = Counter((server.base / "output" / "records.txt").read_text().split())
    assert set(runs) == set(ids)
    assert sum(runs.values()) - len(ids) <= kills * 2      # only prompts running at a kill may run twice
    requeued = [line.split("journal: ")[1].split(" prompt")[0] for line in server.log().splitlines()
                if "had not finished; queued again" in line]
    assert len(requeued) == kills
    print(f"\nkill -9: {kills} kills, unfinished prompts queued again at each restart: {requeued}; "
          f"lost 0; ran twice: {sum(runs.values()) - len(ids)}")


def test_sigterm_drains_running_prompts_keeps_waiting_ones_and_exits_0(own_servers, worker_env):
    server = own_servers("drain", workers=2, env={"COMFY_MULTIGPU_DRAIN_TIMEOUT": "30", **worker_env})
    running = [post_prompt(server, wf.record(f"run{g}", 2.0), headers={"X-TARGET-GPU": str(g)})["prompt_id"]
               for g in (0, 1)]
    for pid in running:
        server.wait_running(pid)
    waiting = [post_prompt(server, wf.record(f"wait{i}", 0.05))["prompt_id"] for i in range(4)]
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(HttpError) as ready:
        server.get("/multigpu/ready")
    assert ready.value.status == 503 and ready.value.json()["draining"] is True
    with pytest.raises(HttpError) as refused:
        post_prompt(server, wf.sleep(0.1))
    assert refused.value.status == 503 and refused.value.json()["error"]["type"] == "draining"
    assert server.proc.wait(30) == 0
    records = (server.base / "output" / "records.txt").read_text().split()
    assert sorted(records) == ["run0", "run1"]                      # running ones finished, nothing else
    server.start()
    done = server.wait(running + waiting, timeout=60)
    assert all(e["status"]["status_str"] == "success" for e in done.values())
    assert sorted((server.base / "output" / "records.txt").read_text().split()) == \
        ["run0", "run1", "wait0", "wait1", "wait2", "wait3"]
