"""The dashboard's 15-minute timeline (runtime/timeline.py) on a hand-driven clock: busy time split
exactly across buckets, running leases counted up to now, gang leases on every GPU's strip, sampled
gauges keeping their maximum, the bounds (ring of buckets, runs per GPU), the tail a push carries;
and, in this process with real worker threads and the fake executor, that a pool's leases reach it."""
import time

import pytest

from comfy_multigpu.runtime.pool import PoolOptions, WorkerPool
from comfy_multigpu.runtime.prompt import QueuedPrompt
from comfy_multigpu.runtime.timeline import ALL, BUCKETS, Timeline

from helpers.fake_host import FakeHost, FakeServer

EPOCH = 1_000_000.0          # a multiple of the 5 s bucket: bucket edges fall on round numbers


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def timeline(clock):
    return Timeline(clock=clock, wall=lambda: EPOCH)


def last(view, gpu, field, n=None):
    row = view["series"]["all"] if gpu == ALL else next(r for r in view["series"]["gpus"] if r["gpu_id"] == gpu)
    values = row[field]
    return values if n is None else values[-n:]


def test_a_prompt_spanning_buckets_splits_its_busy_time_exactly(timeline, clock):
    clock.t = 2.0
    timeline.started([0], "p1", "ckpt_name:a.safetensors")
    clock.t = 13.0
    timeline.finished(0, "success")
    clock.t = 19.0
    view = timeline.view([0, 1])
    assert last(view, 0, "busy", 4) == [0.6, 1.0, 0.6, 0.0]       # 3 s of 5, 5 of 5, 3 of 5, then idle
    assert last(view, 1, "busy", 4) == [0.0, 0.0, 0.0, 0.0]
    assert last(view, 0, "finished", 4) == [0, 0, 1, 0]
    assert last(view, ALL, "busy", 4) == [0.3, 0.5, 0.3, 0.0]      # the server: the mean over GPUs
    assert last(view, ALL, "finished", 4) == [0, 0, 1, 0]
    assert view["series"]["start"] == EPOCH + 15 - (BUCKETS - 1) * 5
    assert last(view, 0, "busy")[0] is None                         # before the server started
    (run,) = view["runs"]
    assert run == {"id": run["id"], "prompt_id": "p1", "gpus": [0], "start": EPOCH + 2, "end": EPOCH + 13,
                   "outcome": "success", "model": "ckpt_name:a.safetensors"}


def test_a_running_lease_counts_up_to_now_and_the_current_bucket_is_a_share_of_its_time_so_far(timeline, clock):
    clock.t = 3.5
    timeline.started([1], "p", start=3.0)                           # the lease's own (monotonic) start
    clock.t = 8.0
    view = timeline.view([0, 1])
    assert last(view, 1, "busy", 2) == [0.4, 1.0]                  # 2 s of the first 5; 3 s of the 3 so far
    assert view["runs"][0]["end"] is None and view["runs"][0]["outcome"] is None


def test_a_gang_lease_is_busy_on_every_gpu_and_one_block_finished_on_rank_0(timeline, clock):
    timeline.started([2, 0], "gang")
    clock.t = 4.0
    timeline.finished(2, "error")
    view = timeline.view([0, 1, 2])
    assert [last(view, g, "busy", 1) for g in (0, 1, 2)] == [[1.0], [0.0], [1.0]]
    assert [last(view, g, "finished", 1) for g in (0, 1, 2)] == [[0], [0], [1]]
    assert [(r["prompt_id"], r["gpus"], r["outcome"]) for r in view["runs"]] == [("gang", [2, 0], "error")]


def test_gauges_keep_the_highest_sample_of_a_bucket_and_unsampled_buckets_are_empty(timeline, clock):
    clock.t = 1.0
    timeline.sample(0, waiting=3, memory=100, memory_max=1000, memory_kind="device")
    clock.t = 2.0
    timeline.sample(0, waiting=1, memory=300, memory_max=1000, memory_kind="device")
    assert not timeline.due()
    clock.t = 11.0
    assert timeline.due()
    timeline.sample(ALL, waiting=5)
    view = timeline.view([0])
    assert last(view, 0, "waiting", 3) == [3, None, None]
    assert last(view, 0, "memory", 3) == [300, None, None]
    assert last(view, 0, "memory_max") == 1000 and last(view, 0, "memory_kind") == "device"
    assert last(view, ALL, "waiting", 3) == [None, None, 5]


def test_old_buckets_and_runs_leave_the_window_and_runs_are_bounded_per_gpu(clock):
    timeline = Timeline(clock=clock, wall=lambda: EPOCH, max_runs=5)
    for i in range(8):
        clock.t = float(i)
        timeline.started([0], f"p{i}")
        clock.t = i + 0.5
        timeline.finished(0, "success")
    view = timeline.view([0])
    assert [r["prompt_id"] for r in view["runs"]] == ["p3", "p4", "p5", "p6", "p7"]
    assert sum(last(view, 0, "finished")) == 8                        # counts are not runs: all kept
    clock.t = 8 + BUCKETS * 5.0                                       # 15 minutes later: all gone
    view = timeline.view([0])
    assert view["runs"] == [] and sum(last(view, 0, "finished")) == 0
    assert len(last(view, 0, "busy")) == BUCKETS and set(last(view, 0, "busy")) == {0.0}
    timeline.sample(0, waiting=2)                                     # the ring slot is reused cleanly
    assert last(timeline.view([0]), 0, "waiting", 1) == [2]


def test_a_push_carries_only_the_last_two_buckets_and_the_runs_still_in_them(timeline, clock):
    timeline.started([0], "old")
    clock.t = 1.0
    timeline.finished(0, "success")
    clock.t = 30.0
    timeline.started([1], "new")
    clock.t = 31.0
    tail = timeline.view([0, 1], tail=True)
    assert tail["series"]["tail"] and tail["series"]["count"] == 2
    assert tail["series"]["start"] == EPOCH + 25
    assert all(len(r["busy"]) == 2 for r in tail["series"]["gpus"])
    assert [r["prompt_id"] for r in tail["runs"]] == ["new"]
    assert [r["prompt_id"] for r in timeline.view([0, 1])["runs"]] == ["old", "new"]


def test_a_lease_that_never_finished_ends_as_lost_when_its_gpu_starts_the_next(timeline, clock):
    timeline.started([0], "a")
    clock.t = 2.0
    timeline.started([0], "b")
    clock.t = 3.0
    timeline.finished(0, "success")
    clock.t = 4.0
    runs = timeline.view([0])["runs"]
    assert [(r["prompt_id"], r["outcome"], r["end"]) for r in runs] == [("a", "lost", EPOCH + 2),
                                                                        ("b", "success", EPOCH + 3)]
    assert last(timeline.view([0]), 0, "busy", 1) == [0.75]           # 3 s of the 4 so far


def test_a_pools_leases_reach_the_board_with_their_gpus_models_and_outcomes():
    pool = WorkerPool([("cpu", "cpu")] * 3, PoolOptions(), host=FakeHost())
    pool.start(FakeServer(), timeout=10)
    try:
        pool.scheduler.admit(QueuedPrompt(0, "one", {"seconds": 0.05}, {}, [], target=1,
                                          models=frozenset({"ckpt_name:x.safetensors"})))
        pool.scheduler.admit(QueuedPrompt(1, "gang", {"seconds": 0.05}, {}, [], gang=2))
        deadline = time.monotonic() + 10
        while True:                # a run ends just after its history entry is written: wait for both
            runs = {r["prompt_id"]: r for r in pool.board.timeline.view([0, 1, 2])["runs"]}
            if len(runs) == 2 and all(r["end"] is not None for r in runs.values()):
                break
            assert time.monotonic() < deadline, f"prompts did not finish: {runs}"
            time.sleep(0.01)
        assert runs["one"]["gpus"] == [1] and runs["one"]["model"] == "ckpt_name:x.safetensors"
        assert len(runs["gang"]["gpus"]) == 2 and runs["gang"]["outcome"] == "success"
        assert all(r["end"] - r["start"] >= 0.049 for r in runs.values()), runs   # rounded to ms
    finally:
        assert pool.shutdown(timeout=10) == []
