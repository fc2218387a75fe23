"""Pools, priorities and weights on the real server (4 CPU workers): a prompt runs only on its pool's
GPUs (also when idle workers take prompts over), prompts naming no pool go to the "default" pool, a
high-priority prompt runs ahead of normal work (even from another worker's queue), unequal weights
steer placement when all GPUs are busy, and bad values get a 400 that queues nothing."""
import pytest

from helpers import workflows as wf
from helpers.comfy_server import HttpError

POOLS = "fast=0,1;slow=2,3;vip=3;default=0,1,2"


@pytest.fixture(scope="module")
def pools4(servers):
    server = servers.start("pools4", workers=4, env={"COMFY_MULTIGPU_POOLS": POOLS,
                                                     "COMFY_MULTIGPU_GPU_WEIGHTS": "0:2"})
    yield server
    server.stop()


def submit(server, prompt, gpu=None, pool=None, priority=None, **extra):
    headers = {}
    if gpu is not None:
        headers["X-TARGET-GPU"] = str(gpu)
    if pool is not None:
        headers["X-GPU-POOL"] = pool
    if priority is not None:
        headers["X-PRIORITY"] = priority
    return server.post("/prompt", {"prompt": prompt, **extra}, headers=headers)


def started_at(entry) -> float:
    return wf.ui(entry, "1", "t0")


def test_queue_all_shows_pools_and_weights(pools4):
    state = pools4.get("/queue/all", counts=1)
    assert state["pools"] == {"fast": [0, 1], "slow": [2, 3], "vip": [3], "default": [0, 1, 2], "all": [0, 1, 2, 3]}
    assert state["default_pool"] == "default"
    assert [q["weight"] for q in state["queues"]] == [2.0, 1.0, 1.0, 1.0]
    assert "pools fast=0,1; slow=2,3; vip=3; default=0,1,2; all=0,1,2,3 (default: default); weights 0:2, 1:1" \
        in pools4.log()


def test_a_pooled_prompt_runs_only_on_its_pool_even_while_other_gpus_idle(pools4):
    answers = [submit(pools4, wf.sleep(0.6, i), pool="slow") for i in range(5)]
    answers.append(submit(pools4, wf.sleep(0.6, 9), extra_data={"gpu_pool": "vip"}))
    assert {a["gpu_id"] for a in answers[:5]} <= {2, 3} and answers[5]["gpu_id"] == 3
    assert all(a["gpu_pool"] == p for a, p in zip(answers, ["slow"] * 5 + ["vip"]))
    done = pools4.wait([a["prompt_id"] for a in answers], timeout=60)
    ran = [done[a["prompt_id"]]["gpu_id"] for a in answers]
    assert set(ran[:5]) == {2, 3} and ran[5] == 3            # GPUs 0 and 1 idled and took none over


def test_prompts_naming_no_pool_stay_in_the_default_pool(pools4):
    answers = [submit(pools4, wf.sleep(0.4, i)) for i in range(8)]
    assert all(a["gpu_pool"] == "default" for a in answers)
    done = pools4.wait([a["prompt_id"] for a in answers], timeout=60)
    assert {e["gpu_id"] for e in done.values()} == {0, 1, 2}                 # GPU 3 is kept for vip/slow
    pinned = submit(pools4, wf.sleep(0.01, 1), gpu=3)                        # a pin is not limited by it
    assert pinned["gpu_id"] == 3 and "gpu_pool" not in pinned
    assert pools4.wait(pinned["prompt_id"])[pinned["prompt_id"]]["gpu_id"] == 3


def test_a_high_priority_prompt_runs_ahead_of_normal_work_in_its_pool(pools4):
    blocker = submit(pools4, wf.sleep(1.5, 0), gpu=3)["prompt_id"]
    pools4.wait_running(blocker)
    normal = [submit(pools4, wf.sleep(0.05, i), pool="vip")["prompt_id"] for i in range(1, 4)]
    high = submit(pools4, wf.sleep(0.05, 7), pool="vip", priority="high")
    front = submit(pools4, wf.sleep(0.05, 8), pool="vip", front=True)       # stock's way, same band
    assert high["number"] < 0 and front["number"] <= 0
    done = pools4.wait(normal + [high["prompt_id"], front["prompt_id"], blocker], timeout=60)
    first_normal = min(started_at(done[p]) for p in normal)
    assert started_at(done[high["prompt_id"]]) < first_normal
    assert started_at(done[front["prompt_id"]]) < first_normal
    assert sorted(normal, key=lambda p: started_at(done[p])) == normal       # normal work stays in order


def test_an_idle_worker_takes_a_high_priority_prompt_before_its_own_normal_queue(pools4):
    long_job = submit(pools4, wf.sleep(4.0, 0), gpu=0)["prompt_id"]
    short_job = submit(pools4, wf.sleep(0.8, 1), gpu=1)["prompt_id"]
    pools4.wait_running(long_job)
    pools4.wait_running(short_job)
    own = [submit(pools4, wf.sleep(0.05, i), gpu=1)["prompt_id"] for i in (2, 3)]
    high = submit(pools4, wf.sleep(0.05, 4), pool="fast", priority="high")
    assert high["gpu_id"] == 0           # both busy: GPU 0 (weight 2, 1 queued) drains first
    done = pools4.wait([high["prompt_id"]] + own, timeout=3)                # long before the 4 s job ends
    assert done[high["prompt_id"]]["gpu_id"] == 1
    assert started_at(done[high["prompt_id"]]) < min(started_at(done[p]) for p in own)
    pools4.post("/interrupt", {"prompt_id": long_job})


def test_weights_steer_placement_when_every_gpu_of_the_pool_is_busy(pools4):
    blockers = [submit(pools4, wf.sleep(2.0, g), gpu=g)["prompt_id"] for g in (0, 1)]
    for pid in blockers:
        pools4.wait_running(pid)
    queued = [submit(pools4, wf.sleep(0.01, i), pool="fast") for i in range(4)]
    # GPU 0 weighs 2: (1 running + k queued + 1) / 2 vs (1 + 0 + 1) / 1 -> 0, 0, 0 (tie, lower index), 1
    assert [q["gpu_id"] for q in queued] == [0, 0, 0, 1]
    for pid in blockers:
        pools4.post("/interrupt", {"prompt_id": pid})
    pools4.wait(blockers + [q["prompt_id"] for q in queued])     # the next test starts from an idle server


@pytest.mark.parametrize("headers, body_extra, kind, valid", [
    ({"X-GPU-POOL": "gpu"}, {}, "invalid_gpu_pool", ["all", "default", "fast", "slow", "vip"]),
    ({}, {"extra_data": {"gpu_pool": "nope"}}, "invalid_gpu_pool", ["all", "default", "fast", "slow", "vip"]),
    ({"X-GPU-POOL": "fast"}, {"extra_data": {"gpu_pool": "slow"}}, "invalid_gpu_pool", None),
    ({"X-GPU-POOL": "vip", "X-TARGET-GPU": "0"}, {}, "invalid_target_gpu", [3]),
    ({"X-PRIORITY": "urgent"}, {}, "invalid_priority", ["high", "normal", "low"]),
    ({}, {"extra_data": {"priority": ["high"]}}, "invalid_priority", ["high", "normal", "low"]),
])
def test_bad_pool_or_priority_is_a_400_that_queues_nothing(pools4, headers, body_extra, kind, valid):
    before = pools4.get("/queue/all", counts=1)["total_pending"]
    with pytest.raises(HttpError) as info:
        pools4.post("/prompt", {"prompt": wf.sleep(30, 0), **body_extra}, headers=headers)
    assert info.value.status == 400
    error = info.value.json()["error"]
    assert error["type"] == kind and error["message"]
    if valid is not None:
        assert error["extra_info"]["valid"] == valid
    assert pools4.get("/queue/all", counts=1)["total_pending"] == before
    assert pools4.get("/queue/all", counts=1)["total_running"] == 0


def test_a_free_gpu_runs_waiting_auto_prompts_whose_model_it_has_first_but_pinned_ones_in_order(pools4):
    warm = submit(pools4, wf.standin("bench-a", 0.01, 0, load_seconds=0.0), pool="vip")["prompt_id"]
    pools4.wait(warm)                                         # GPU 3 (the vip pool) last used bench-a
    blocker = submit(pools4, wf.sleep(1.0, 0), gpu=3)["prompt_id"]
    pools4.wait_running(blocker)
    auto = [submit(pools4, wf.standin(m, 0.01, i, load_seconds=0.0), pool="vip")["prompt_id"]
            for i, m in enumerate(["bench-c", "bench-a", "bench-c", "bench-a"])]
    pinned = [submit(pools4, wf.standin(m, 0.01, 10 + i, load_seconds=0.0), gpu=3)["prompt_id"]
              for i, m in enumerate(["bench-c", "bench-b", "bench-a"])]
    done = pools4.wait(auto + pinned + [blocker], timeout=60)
    order = sorted(auto, key=lambda p: started_at(done[p]))
    assert order == [auto[1], auto[3], auto[0], auto[2]]     # bench-a ones first: no model load
    assert sorted(pinned, key=lambda p: started_at(done[p])) == pinned   # stock order, whatever the models
