"""The pool and its scheduler in this process, with real worker threads and a fake executor (no ComfyUI):
placement and takeover, pinned prompts, pools, priorities, caps, deletes, interrupts, gang leases of
several workers, a worker whose loop dies, and shutdown. What depends on the host (nodes, events,
models, the HTTP API) is covered by the real-server tests."""
import threading
import time

import pytest

from comfy_multigpu.policy.admission import Limits
from comfy_multigpu.policy.errors import ApiError
from comfy_multigpu.runtime.pool import PoolOptions, WorkerPool
from comfy_multigpu.runtime.prompt import QueuedPrompt
from comfy_multigpu.runtime.scheduler import DuplicatePrompt

from helpers.fake_host import FakeHost, FakeServer

WAIT_S = 10.0


@pytest.fixture
def make_pool():
    pools = []

    def make(n, **options):
        host = FakeHost()
        pool = WorkerPool([("cpu", "cpu")] * n, PoolOptions(**options), host=host)
        pool.start(FakeServer(), timeout=WAIT_S)
        pool.start_housekeeping()
        pools.append(pool)
        return pool, host
    yield make
    for pool in pools:
        assert pool.shutdown(timeout=WAIT_S) == []


def prompt(prompt_id, number=0, target=None, eligible=None, gang=1, **graph):
    return QueuedPrompt(number, prompt_id, graph, {}, [], target=target, eligible=eligible, gang=gang)


def wait_done(pool, ids, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = pool.scheduler.history()
        if all(i in history for i in ids):
            return history
        time.sleep(0.01)
    raise AssertionError(f"not finished in {timeout} s: {[i for i in ids if i not in pool.scheduler.history()]}")


def wait_busy(pool, *gpus):
    deadline = time.monotonic() + WAIT_S
    while not all(pool.workers[g].busy for g in gpus):
        assert time.monotonic() < deadline, f"GPUs {gpus} never started"
        time.sleep(0.005)


def test_shutdown_stops_and_joins_every_thread_and_is_idempotent(make_pool):
    pool, _ = make_pool(3, watchdog_s=5.0)
    names = {t.name for t in threading.enumerate()}
    assert {"comfy-multigpu-gpu0", "comfy-multigpu-gpu2", "comfy-multigpu-housekeeping",
            "comfy-multigpu-watchdog"} <= names
    assert pool.shutdown(timeout=WAIT_S) == []
    assert pool.shutdown(timeout=WAIT_S) == []
    left = {t.name for t in threading.enumerate() if t.name.startswith("comfy-multigpu")}
    assert left == set()
    assert all(not w.up for w in pool.workers)


def test_shutdown_interrupts_a_running_prompt(make_pool):
    pool, host = make_pool(1)
    pool.scheduler.admit(prompt("long", seconds=60))
    wait_busy(pool, 0)
    started = time.monotonic()
    assert pool.shutdown(timeout=WAIT_S) == []
    assert time.monotonic() - started < 5
    assert pool.scheduler.history()["long"]["status"]["status_str"] == "error"


def test_auto_prompts_spread_over_idle_workers_and_run_at_once(make_pool):
    pool, host = make_pool(3)
    for i in range(3):
        pool.scheduler.admit(prompt(f"p{i}", i, seconds=0.3))
    history = wait_done(pool, ["p0", "p1", "p2"])
    assert sorted(history[f"p{i}"]["gpu_id"] for i in range(3)) == [0, 1, 2]
    starts = [start for _, _, start, _ in host.ran]
    assert max(starts) - min(starts) < 0.25                     # all three ran side by side


def test_pinned_prompts_stay_on_their_gpu_and_an_idle_worker_takes_over_auto_ones(make_pool):
    pool, host = make_pool(2)
    host.gates["hold"] = threading.Event()
    assert pool.scheduler.admit(prompt("busy", 0, target=1, gate="hold")) == 1
    wait_busy(pool, 1)
    for i in range(1, 4):
        pool.scheduler.admit(prompt(f"pinned{i}", i, target=1, seconds=0.01))
    pool.scheduler.admit(prompt("auto", 9, seconds=0.01))
    history = wait_done(pool, ["auto"])
    assert history["auto"]["gpu_id"] == 0                       # GPU 1 is busy: GPU 0 ran it
    assert pool.scheduler.locate("pinned1")[:2] == ("queued", 1)
    host.gates["hold"].set()
    history = wait_done(pool, ["busy", "pinned1", "pinned2", "pinned3"])
    assert {history[f"pinned{i}"]["gpu_id"] for i in range(1, 4)} == {1}
    order = [pid for pid, gpu, _, _ in host.ran if gpu == 1]
    assert order == ["busy", "pinned1", "pinned2", "pinned3"]


def test_a_pool_keeps_its_prompts_on_its_gpus(make_pool):
    pool, host = make_pool(3, pools={"fast": (1, 2), "all": (0, 1, 2)})
    ids = [f"f{i}" for i in range(6)]
    for i, pid in enumerate(ids):
        pool.scheduler.admit(prompt(pid, i, eligible=frozenset({1, 2}), seconds=0.02))
    history = wait_done(pool, ids)
    assert {history[pid]["gpu_id"] for pid in ids} <= {1, 2}


def test_priorities_run_high_before_normal_before_low_on_one_worker(make_pool):
    from comfy_multigpu.policy.placement import queue_number
    pool, host = make_pool(1)
    host.gates["hold"] = threading.Event()
    pool.scheduler.admit(prompt("first", 0, gate="hold"))
    wait_busy(pool, 0)
    for i, (pid, priority) in enumerate([("low", "low"), ("normal", "normal"), ("high", "high")], start=1):
        pool.scheduler.admit(prompt(pid, queue_number(i, priority), seconds=0.01))
    host.gates["hold"].set()
    wait_done(pool, ["first", "low", "normal", "high"])
    assert [pid for pid, *_ in host.ran] == ["first", "high", "normal", "low"]


def test_caps_refuse_with_429_and_duplicates_are_answered_with_the_first(make_pool):
    pool, host = make_pool(2, limits=Limits(per_gpu=1, total=0))
    host.gates["hold"] = threading.Event()
    pool.scheduler.admit(prompt("a", 0, gate="hold"))
    pool.scheduler.admit(prompt("b", 1, gate="hold"))
    wait_busy(pool, 0, 1)
    with pytest.raises(ApiError) as refused:
        pool.scheduler.admit(prompt("c", 2))
    assert refused.value.status == 429
    with pytest.raises(DuplicatePrompt) as duplicate:
        pool.scheduler.admit(prompt("a", 3))
    assert duplicate.value.state == "running"
    host.gates["hold"].set()
    wait_done(pool, ["a", "b"])
    assert pool.scheduler.locate("c") is None                 # refused means never queued


def test_deleted_prompts_never_run(make_pool):
    pool, host = make_pool(1)
    host.gates["hold"] = threading.Event()
    pool.scheduler.admit(prompt("running", 0, gate="hold"))
    wait_busy(pool, 0)
    for i in range(1, 5):
        pool.scheduler.admit(prompt(f"w{i}", i, seconds=0.01))
    assert pool.scheduler.cancel(lambda p: p.prompt_id in ("w2", "w4")) == ["w2", "w4"]
    assert pool.scheduler.cancel(lambda p: p.prompt_id == "running") == []    # running: not a queue item
    host.gates["hold"].set()
    wait_done(pool, ["running", "w1", "w3"])
    time.sleep(0.1)
    assert [pid for pid, *_ in host.ran] == ["running", "w1", "w3"]


def test_an_interrupt_by_lease_stops_only_that_prompt(make_pool):
    from comfy_multigpu.host.prompt_queue import MultiQueue
    pool, host = make_pool(2)
    queue = MultiQueue(pool, FakeServer())
    pool.scheduler.admit(prompt("stop-me", 0, target=0, seconds=30))
    pool.scheduler.admit(prompt("keep", 1, target=1, seconds=0.5))
    wait_busy(pool, 0, 1)
    assert queue.interrupt_if_running("stop-me")
    history = wait_done(pool, ["stop-me", "keep"])
    assert history["stop-me"]["status"]["status_str"] == "error"
    assert history["keep"]["status"]["status_str"] == "success"
    assert not queue.interrupt_if_running("stop-me")          # ended: nothing else is interrupted


def test_gang_leases_are_all_or_nothing_and_never_deadlock(make_pool):
    """Two prompts that need 2 of 3 GPUs each, and single-GPU prompts, submitted together: all finish;
    a gang's GPUs start nothing else while it runs, and its history entry lists them."""
    pool, host = make_pool(3)
    ids = []
    for i in range(6):
        gang = 2 if i in (1, 3) else 1
        pool.scheduler.admit(prompt(f"p{i}", i, gang=gang, seconds=0.15))
        ids.append(f"p{i}")
    history = wait_done(pool, ids)
    for pid in ("p1", "p3"):
        gpus = history[pid]["gpu_ids"]
        assert len(set(gpus)) == 2 and history[pid]["gpu_id"] == gpus[0]
        start, end = next((s, e) for p, _, s, e in host.ran if p == pid)
        overlapping = [p for p, g, s, e in host.ran if p != pid and g in gpus and s < end and e > start]
        assert overlapping == []                                # reserved GPUs ran nothing else
    assert "gpu_ids" not in history["p0"]


def wait_for(condition, what):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def started(host, pid):
    return next(s for p, _, s, _ in host.ran if p == pid)


def test_a_gang_prompt_passed_over_max_overtakes_times_holds_free_gpus_until_it_starts(make_pool):
    """A prompt needing both GPUs while GPU 0 is busy: GPU 1 starts one later prompt (max_overtakes 1),
    then holds itself free for the gang (shown in the snapshot), starts nothing later, and the gang runs
    when GPU 0 frees; a held GPU whose gang is deleted takes other work again."""
    pool, host = make_pool(2, max_overtakes=1)
    host.gates["a"] = threading.Event()
    pool.scheduler.admit(prompt("a0", 0, target=0, gate="a"))
    wait_busy(pool, 0)
    pool.scheduler.admit(prompt("gang", 1, gang=2, seconds=0.05))
    for i in (2, 3, 4):
        pool.scheduler.admit(prompt(f"b{i}", i, seconds=0.05))
    wait_for(lambda: [q.held_for for q in pool.scheduler.snapshot().gpus] == ["", "gang"], "GPU 1 never held")
    time.sleep(0.2)
    assert [p for p, *_ in host.ran] == ["b2"]                      # one overtake, then nothing later
    assert pool.scheduler.snapshot().gpus[1].held_for == "gang" and not pool.workers[1].busy
    host.gates["a"].set()
    history = wait_done(pool, ["a0", "gang", "b3", "b4"])
    assert history["gang"]["gpu_ids"] == [0, 1] or history["gang"]["gpu_ids"] == [1, 0]
    assert started(host, "gang") < min(started(host, "b3"), started(host, "b4"))
    assert [q.held_for for q in pool.scheduler.snapshot().gpus] == ["", ""]

    host.gates["c"] = threading.Event()                             # deleting the gang frees the hold
    pool.scheduler.admit(prompt("c0", 10, target=0, gate="c"))
    wait_busy(pool, 0)
    pool.scheduler.admit(prompt("gang2", 11, gang=2))
    pool.scheduler.admit(prompt("b12", 12, target=1, seconds=0.01))
    wait_for(lambda: pool.scheduler.snapshot().gpus[1].held_for == "gang2", "GPU 1 never held for gang2")
    assert pool.scheduler.cancel(lambda p: p.prompt_id == "gang2") == ["gang2"]
    wait_done(pool, ["b12"])
    host.gates["c"].set()
    wait_done(pool, ["c0"])


def test_single_gpu_prompts_flow_past_a_waiting_gang_only_max_overtakes_times(make_pool):
    """Without holding, a gang of both GPUs would wait for a stream of single prompts to end (the two
    GPUs are never free at once); with max_overtakes 3 at most 3 later prompts start before it."""
    pool, host = make_pool(2, max_overtakes=3)
    pool.scheduler.admit(prompt("a0", 0, seconds=0.1))
    wait_busy(pool, 0)
    pool.scheduler.admit(prompt("gang", 1, gang=2, seconds=0.05))
    singles = [f"b{i}" for i in range(2, 14)]
    for i, pid in enumerate(singles):
        pool.scheduler.admit(prompt(pid, i + 2, seconds=0.07))
    wait_done(pool, ["a0", "gang"] + singles, timeout=30)
    before = [p for p in singles if started(host, p) < started(host, "gang")]
    assert len(before) <= 3, before


def test_lower_priority_prompts_count_as_overtaking_a_waiting_gang_and_a_gang_not_yet_due_holds_nothing(make_pool):
    from comfy_multigpu.policy.placement import queue_number
    pool, host = make_pool(2, max_overtakes=1)
    host.gates["a"] = threading.Event()
    pool.scheduler.admit(prompt("a0", 0, target=0, gate="a"))
    wait_busy(pool, 0)
    pool.scheduler.admit(prompt("gang", 1, gang=2, seconds=0.05))
    low = [f"l{i}" for i in range(2, 6)]
    for i, pid in enumerate(low):
        pool.scheduler.admit(prompt(pid, queue_number(i + 2, "low"), seconds=0.05))
    wait_for(lambda: pool.scheduler.snapshot().gpus[1].held_for == "gang", "GPU 1 never held for the gang")
    host.gates["a"].set()
    wait_done(pool, ["a0", "gang"] + low)
    assert [p for p in low if started(host, p) < started(host, "gang")] == ["l2"]

    pool2, host2 = make_pool(2, max_overtakes=5)                    # not due: GPU 1 idles, holds nothing
    host2.gates["b"] = threading.Event()
    pool2.scheduler.admit(prompt("b0", 0, target=0, gate="b"))
    wait_busy(pool2, 0)
    pool2.scheduler.admit(prompt("gang", 1, gang=2, seconds=0.01))
    time.sleep(0.1)
    assert [q.held_for for q in pool2.scheduler.snapshot().gpus] == ["", ""] and not pool2.workers[1].busy
    host2.gates["b"].set()
    assert len(wait_done(pool2, ["b0", "gang"])["gang"]["gpu_ids"]) == 2


def test_a_gpu_held_for_an_earlier_gang_is_not_taken_by_a_later_one(make_pool):
    """Pools overlap on GPU 1: the earlier gang (GPUs 0, 1) is due while GPU 0 runs; GPU 1 holds for
    it, and the later gang (GPUs 1, 2), which GPU 2 could start with GPU 1, waits for it."""
    pool, host = make_pool(3)
    host.gates["a"] = threading.Event()
    pool.scheduler.admit(prompt("a0", 0, target=0, gate="a"))
    wait_busy(pool, 0)
    pool.scheduler.admit(prompt("first", 1, gang=2, eligible=frozenset({0, 1}), seconds=0.05))
    wait_for(lambda: pool.scheduler.snapshot().gpus[1].held_for == "first", "GPU 1 never held")
    pool.scheduler.admit(prompt("later", 2, gang=2, eligible=frozenset({1, 2}), seconds=0.05))
    time.sleep(0.2)
    assert "later" not in pool.scheduler.history() and not pool.workers[2].busy
    host.gates["a"].set()
    history = wait_done(pool, ["a0", "first", "later"])
    assert sorted(history["first"]["gpu_ids"]) == [0, 1] and sorted(history["later"]["gpu_ids"]) == [1, 2]
    assert started(host, "first") < started(host, "later")


def test_an_elastic_gang_starts_at_once_on_the_gpus_that_are_free(make_pool):
    """X-SEQUENCE-PARALLEL: auto (SequenceParallel's `auto`): up to `gang` GPUs, those free now."""
    pool, host = make_pool(3)
    host.gates["a"] = threading.Event()
    pool.scheduler.admit(prompt("a0", 0, target=0, gate="a"))
    wait_busy(pool, 0)
    elastic = QueuedPrompt(1, "auto", {"seconds": 0.05}, {}, [], gang=3, elastic=True)
    pool.scheduler.admit(elastic)
    history = wait_done(pool, ["auto"])
    assert sorted(history["auto"]["gpu_ids"]) == [1, 2]              # GPU 0 was busy: it did not wait
    host.gates["a"].set()
    wait_done(pool, ["a0"])
    wait_for(lambda: not any(w.busy for w in pool.workers), "the workers never went idle")
    pool.scheduler.admit(QueuedPrompt(2, "auto3", {"seconds": 0.05}, {}, [], gang=3, elastic=True))
    assert sorted(wait_done(pool, ["auto3"])["auto3"]["gpu_ids"]) == [0, 1, 2]


def test_lease_workers_takes_idle_workers_all_or_nothing(make_pool):
    pool, host = make_pool(3)
    host.gates["hold"] = threading.Event()
    pool.scheduler.admit(prompt("busy", 0, target=1, gate="hold"))
    wait_busy(pool, 1)
    assert pool.scheduler.lease_workers(prompt("gang"), [2, 1]) is None     # GPU 1 is busy: nothing taken
    lease = pool.scheduler.lease_workers(prompt("gang"), [2, 0])
    assert lease is not None and lease.gpu_ids == (0, 2)                   # ascending: one global order
    snap = pool.scheduler.snapshot()
    assert [q.busy for q in snap.gpus] == [True, True, True]
    with pytest.raises(DuplicatePrompt):
        pool.scheduler.lease_workers(prompt("busy"), [0])                   # a known id is not leased twice
    pool.scheduler.requeue(lease)                                           # back to waiting, then run
    host.gates["hold"].set()
    wait_done(pool, ["busy", "gang"])


def test_a_worker_whose_loop_dies_fails_its_prompt_restarts_and_runs_the_next(make_pool):
    pool, host = make_pool(1)
    pool.workers[0].RESTART_DELAY_S = 0.05
    pool.scheduler.admit(prompt("dies", 0, die=True))
    pool.scheduler.admit(prompt("next", 1, seconds=0.01))
    history = wait_done(pool, ["dies", "next"])
    assert history["dies"]["status"]["status_str"] == "error"
    assert history["next"]["status"]["status_str"] == "success"


def test_a_free_sent_while_a_prompt_runs_is_done_before_the_next_prompt(make_pool):
    pool, host = make_pool(1)
    host.gates["hold"] = threading.Event()
    pool.scheduler.admit(prompt("first", 0, gate="hold"))
    wait_busy(pool, 0)
    pool.scheduler.admit(prompt("next", 1, seconds=0.01))
    pool.scheduler.post([0], "unload_models", True)
    host.gates["hold"].set()
    wait_done(pool, ["first", "next"])
    next_start = next(start for pid, _, start, _ in host.ran if pid == "next")
    assert len(host.unloaded) == 1 and host.unloaded[0] < next_start


def test_after_a_restore_new_prompts_queue_after_the_restored_ones_in_every_band(tmp_path):
    from comfy_multigpu.policy.placement import queue_number
    from comfy_multigpu.runtime.journal import Journal
    from comfy_multigpu.runtime.local_scheduler import LocalScheduler
    journal = Journal(str(tmp_path / "journal.sqlite3"))
    for pid, number in (("n5", 5), ("h3", queue_number(3, "high")), ("l7", queue_number(7, "low"))):
        journal.accepted(prompt(pid, number))
    members = WorkerPool([("cpu", "cpu")], PoolOptions(), host=FakeHost()).workers
    scheduler = LocalScheduler(members, journal=journal)
    assert scheduler.restore(journal) == (0, 3)
    assert scheduler.number_floor == 8                      # past the highest counter value, 7
    assert scheduler.stock_number(0) == 8 and scheduler.stock_number(2) == 10
    assert scheduler.stock_number(-0.0, front=True) == -8     # stock's first "front" prompt: -0
    assert queue_number(scheduler.stock_number(0), "high") > queue_number(3, "high")
