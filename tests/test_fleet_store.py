"""The fleet queue's function library (fleet/library.lua) through FleetStore, against a real
redis-server, without ComfyUI: leases that expire are requeued and fail after the attempts with a
stock-shaped history entry, fencing refuses a stale completion, a restarted machine hands back what it
held, cancels, idempotency, band order (a cold model's high prompt before normal work), the steal
delay and idle set, home lanes (not to a machine that is gone), output-number blocks; and the
FleetScheduler over a real LocalScheduler when a machine retakes its own lost prompt."""
from __future__ import annotations

import time

import pytest

from helpers.redis_server import RedisServer

from comfy_multigpu.fleet.store import FleetStore
from comfy_multigpu.policy import fleet_lanes as fl

ANY = fl.lane("normal", "any")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-store")).start()
    yield server
    server.stop()


@pytest.fixture
def store(redis_server):
    redis_server.client().flushall()
    s = FleetStore(redis_server.url, "m1")
    s.load_library()
    return s


def record(pid: str) -> list:
    return [pid, {"1": {"class_type": "MGSleep", "inputs": {}}}, {"client_id": "c"}, ["1"]]


def enqueue(store, pid: str, lane: str = ANY, **kw) -> tuple:
    return store.enqueue(lane, pid, kw.pop("idem", ""), kw.pop("front", False), {"door": "m1"}, record(pid),
                         {"api_key": "secret"}, **kw)


def lanes_of(gpu: int, node: str = "m1", warm=()) -> list:
    return fl.gpu_lanes(node, gpu, [], list(warm))


def take(store, gpu: int, node: str = "m1", warm=(), steal=(), prefer=None, steal_s: float = 1.0, lanes=None):
    """What GPU `gpu` of machine `node` takes: (Taken or None, seconds until a steal is due)."""
    order = fl.read_order(lanes if lanes is not None else lanes_of(gpu, node, warm), list(steal), prefer or {})
    return store.take(order, f"{node}:{gpu}", gpu, steal_s)


def test_a_lease_not_renewed_is_requeued_then_fails_after_the_attempts_with_a_stock_shaped_entry(store):
    assert enqueue(store, "p1")[0] == "ok"
    first, _ = take(store, 0)
    assert first.prompt_id == "p1" and first.attempts == 1 and first.sensitive == {"api_key": "secret"}
    assert store.reap(60, 2) == []                      # fresh lease: nothing to do
    time.sleep(0.15)
    assert store.renew(first)                            # renewed: not idle any more
    assert store.reap(0.1, 2) == []
    time.sleep(0.15)
    assert store.reap(0.1, 2) == [("p1", "requeued")]
    assert not store.renew(first)                        # the lease is gone
    second, _ = take(store, 1)
    assert second.prompt_id == "p1" and second.attempts == 2 and second.token != first.token
    time.sleep(0.15)
    assert store.reap(0.1, 2) == [("p1", "failed")]
    entry = store.history_entry("p1")
    assert entry["prompt"] == [1, "p1", record("p1")[1], {"client_id": "c"}, ["1"]]   # no sensitive part
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    kind, message = entry["status"]["messages"][0]
    assert kind == "execution_error" and "started 2 time(s)" in message["exception_message"]
    assert entry["gpu_id"] == 1 and entry["node"] == "m1" and store.active_count() == 0
    assert not store.complete(second, {"late": True}, [])     # fenced: the failure stands
    assert store.history_entry("p1")["status"]["status_str"] == "error"
    assert store.stats() == {"redelivered": 1, "failed": 1, "fenced": 1}


def test_a_zombie_cannot_complete_what_another_attempt_owns(store):
    enqueue(store, "z")
    zombie, _ = take(store, 0)
    time.sleep(0.12)
    store.reap(0.1, 3)
    other = FleetStore(store.url, "m2")
    fresh, _ = take(other, 0, "m2")
    assert fresh.prompt_id == "z"
    assert not store.complete(zombie, {"who": "zombie"}, ["output//z.png"])
    assert other.complete(fresh, {"who": "m2", "prompt": [1, "z", {}, {}, []]}, ["output//z.png"])
    assert store.history_entry("z")["who"] == "m2" and store.file_owner("files", "output//z.png") == "m2"


def test_a_restarted_machine_hands_back_what_it_held_at_once(store):
    enqueue(store, "r1")
    enqueue(store, "r2")
    held = [take(store, 0)[0], take(store, 1)[0]]
    assert {t.prompt_id for t in held} == {"r1", "r2"}
    other = FleetStore(store.url, "m2")
    assert other.reap(0, 3, consumer_prefix="m2:") == []          # only its own consumers
    assert sorted(store.reap(0, 3, consumer_prefix="m1:")) == [("r1", "requeued"), ("r2", "requeued")]
    again, _ = take(other, 0, "m2")
    assert again.prompt_id == "r1" and again.attempts == 2


def test_handing_back_an_unstarted_prompt_costs_no_attempt(store):
    enqueue(store, "h")
    taken, _ = take(store, 0)
    assert store.hand_back(taken)
    again, _ = take(store, 0)
    assert again.attempts == 1


def test_duplicates_by_id_and_idempotency_key_and_cancel(store):
    assert enqueue(store, "d1", idem="k")[0] == "ok"
    assert enqueue(store, "d1") == ("dup", ["d1", "waiting", "1", "", ""])
    assert enqueue(store, "d2", idem="k") == ("dup", ["d1", "waiting", "1", "", ""])
    assert store.cancel("d1") and not store.cancel("d1")
    assert take(store, 0)[0] is None     # a cancelled prompt is not work
    assert store.active_count() == 0


def test_lanes_are_read_in_band_order_and_front_first(store):
    for pid, band in (("low", "low"), ("normal", "normal"), ("high", "high"), ("front", "front")):
        store.enqueue(fl.lane(band, "any"), pid, "", band == "front", {}, record(pid), {})
    order = [take(store, 0)[0].prompt_id for _ in range(4)]
    assert order == ["front", "high", "normal", "low"]


def test_a_model_lane_waits_for_an_idle_holder_then_anyone_takes_it_after_the_delay(store):
    model = fl.lane("normal", "m:ckpt_name:a.safetensors")
    assert take(store, 0, warm=["ckpt_name:a.safetensors"], steal_s=0.3) == (None, -1.0)   # the holder idles
    enqueue(store, "m", lane=model)
    steal = fl.steal_lanes(store.lanes(), lanes_of(1))
    assert steal == [model]
    taken, due = take(store, 1, steal=steal, prefer={model: ["m1:0"]}, steal_s=0.3)
    assert taken is None and 0 < due <= 0.3                                   # wait for the idle holder
    time.sleep(due + 0.02)
    taken, _ = take(store, 1, steal=steal, prefer={model: ["m1:0"]}, steal_s=0.3)
    assert taken.prompt_id == "m"                                             # its delay passed
    enqueue(store, "m2", lane=model)
    store.not_idle("m1:0")                                                    # the holder got busy
    taken, _ = take(store, 1, steal=steal, prefer={model: ["m1:0"]}, steal_s=0.3)
    assert taken.prompt_id == "m2"                                            # no idle holder: at once


def test_a_high_prompt_of_a_cold_model_goes_before_normal_work_of_this_gpu(store):
    model = fl.lane("high", "m:ckpt_name:b.safetensors")
    enqueue(store, "normal-any")
    enqueue(store, "high-cold", lane=model)
    steal = fl.steal_lanes(store.lanes(), lanes_of(1))
    taken, _ = take(store, 1, steal=steal, prefer={model: []}, steal_s=5.0)  # nobody holds b: at once
    assert taken.prompt_id == "high-cold"


def test_a_clients_next_prompt_waits_in_the_home_lane_of_the_gpu_that_ran_its_last(store):
    store.register({"url": "http://127.0.0.1:1", "gpus": [{"gpu": 0}, {"gpu": 1}]})
    _, reply = store.enqueue(ANY, "c1", "", False, {}, record("c1"), {}, "normal", "client-x")
    assert reply[1] == ANY                                                    # no home yet
    taken, _ = take(store, 1)
    assert store.complete(taken, {"prompt": [1, "c1", {}, {}, []]}, [], "client-x", free=True)
    _, reply = store.enqueue(ANY, "c2", "", False, {}, record("c2"), {}, "normal", "client-x")
    assert reply[1] == fl.lane("normal", "h:m1:1")
    assert take(store, 0, steal=fl.steal_lanes(store.lanes(), lanes_of(0)), prefer={
        fl.lane("normal", "h:m1:1"): ["m1:1"]}, steal_s=5.0)[0] is None    # not for another GPU: m1:1 is idle
    assert take(store, 1, steal_s=5.0)[0].prompt_id == "c2"
    store.unregister()                                                        # its machine is gone
    _, reply = store.enqueue(ANY, "c3", "", False, {}, record("c3"), {}, "normal", "client-x")
    assert reply[1] == ANY


def test_output_number_blocks_are_unique_and_continue_without_gaps_when_alone(store):
    start = store.name_reserve("output//img", 1, 1000)
    assert start == 1
    other = store.name_reserve("output//img", 1, 1000)
    assert other == 1001                                                      # overlapping saves: apart
    store.name_release("output//img", 1001, 3)                                # not the latest block: kept
    store.name_release("output//img", 2001, 1003)
    assert store.name_reserve("output//img", 4, 1000) == 1003                 # alone: no gap


def machine(store):
    """Machine m1 of two CPU workers (not started: leases taken by hand): its pool and the
    FleetScheduler over its real LocalScheduler."""
    from helpers.fake_host import FakeHost
    from comfy_multigpu.fleet.scheduler import FleetScheduler
    from comfy_multigpu.policy.config import FleetSettings
    from comfy_multigpu.runtime.pool import PoolOptions, WorkerPool
    pool = WorkerPool([("cpu", "cpu")] * 2, PoolOptions(), host=FakeHost())
    return pool, FleetScheduler(pool.scheduler, store, FleetSettings(store.url, "m1"), pool.workers)


def test_a_machine_that_retakes_its_own_lost_prompt_runs_it_once_more_and_only_that_result_counts(store):
    """FleetScheduler over a real LocalScheduler (not started; leases taken by hand): the earlier run's
    result is dropped, the newer attempt waits for it to end, then runs and completes."""
    from comfy_multigpu.runtime.prompt import ExecutionStatus
    pool, fleet = machine(store)
    enqueue(store, "again")
    first, _ = take(store, 0)
    fleet.hold(first)
    fleet.run_locally(first, 0)
    old_run = pool.scheduler.take_next(0)
    assert old_run.prompt_id == "again"
    store.reap(0, 3)                                 # its lease lapsed (say, a partition)
    second, _ = take(store, 1)
    fleet.hold(second)
    fleet.run_locally(second, 1)                     # the earlier run still holds it here: parked
    assert pool.scheduler.take_next(1) is None
    assert [t.token for t in fleet.running_here()] == [second.token]
    done = ExecutionStatus("success", True, [])
    fleet.finish(old_run, {"outputs": {"1": {"who": ["old"]}}, "meta": {}}, done, 0.1)
    assert store.history_entry("again") is None and fleet.fenced == 1      # dropped, not sent
    new_run = pool.scheduler.take_next(1)
    assert new_run is not None and new_run.prompt_id == "again"
    fleet.finish(new_run, {"outputs": {"1": {"who": ["new"]}}, "meta": {}}, done, 0.1)
    entry = store.history_entry("again")
    assert entry["outputs"] == {"1": {"who": ["new"]}} and entry["node"] == "m1" and entry["gpu_id"] == 1
    assert fleet.running_here() == [] and store.active_count() == 0


def test_a_lost_lease_of_a_gang_still_waiting_here_leaves_this_machines_queue(store):
    """A prompt of two GPUs taken by this machine waits for its second GPU; its lease is lost (taken
    over elsewhere): it leaves the local queue, so no GPU here holds or runs it for nothing."""
    pool, fleet = machine(store)
    enqueue(store, "busy")
    busy, _ = take(store, 1)
    fleet.hold(busy)
    fleet.run_locally(busy, 1)
    assert pool.scheduler.take_next(1).prompt_id == "busy"
    enqueue(store, "gang")
    gang, _ = take(store, 0)
    gang.record[2] = {"1": {"class_type": "SequenceParallel", "inputs": {"gpus": 2}}}
    fleet.hold(gang)
    fleet.run_locally(gang, 0)
    assert pool.scheduler.take_next(0) is None                      # GPU 1 is busy: it waits, held
    assert pool.scheduler.locate("gang")[0] == "queued"
    assert pool.scheduler.snapshot().gpus[0].held_for == "gang"
    fleet.lost("gang")
    assert pool.scheduler.locate("gang") is None and pool.scheduler.snapshot().gpus[0].held_for == ""
    assert [p.prompt_id for p in fleet._runs] == ["busy"]
