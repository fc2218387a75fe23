"""WorkerPool.take_next on a pool without threads or a server (its state set by hand): what a free
worker starts when another worker is down, busy or draining. The real-server tests cover the rest."""
from comfy_multigpu.pool import PendingPrompt, WorkerPool


def pool_of(n):
    pool = WorkerPool([("cpu", "cpu")] * n)
    for w in pool.workers:
        w.started.set()
        w.up = True
    return pool


def queue(pool, gpu, prompt_id, number, movable=True):
    pool.workers[gpu].pending.append((number, prompt_id, {}, {}, [], {}))
    pool.pending[prompt_id] = PendingPrompt(frozenset(), movable)


def test_a_down_workers_waiting_auto_prompts_go_to_a_healthy_one_but_its_pinned_ones_wait():
    pool = pool_of(2)
    queue(pool, 1, "pinned", 1, movable=False)
    queue(pool, 1, "auto", 2)
    pool.workers[1].up = False                     # its loop died and is restarting
    item, _ = pool.take_next(pool.workers[0])
    assert item[1] == "auto"
    assert pool.take_next(pool.workers[0]) is None  # the pinned prompt waits for GPU 1
    assert [i[1] for i in pool.workers[1].pending] == ["pinned"]


def test_an_idle_workers_own_queue_is_left_to_it():
    pool = pool_of(2)
    queue(pool, 1, "mine", 1)
    assert pool.take_next(pool.workers[0]) is None
    assert pool.take_next(pool.workers[1])[0][1] == "mine"


def test_nothing_starts_while_draining():
    pool = pool_of(1)
    queue(pool, 0, "a", 1)
    pool.draining = True
    assert pool.take_next(pool.workers[0]) is None
    pool.draining = False
    assert pool.take_next(pool.workers[0])[0][1] == "a"
    assert pool.locate("a") == ("running", 0, 1)
