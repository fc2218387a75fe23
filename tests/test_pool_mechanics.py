"""The scheduler's take_next on a pool without threads or a server (its queues set by hand): what a
free worker starts when another worker is down, busy or draining. The real-server tests cover the rest."""
from comfy_multigpu.policy.placement import LOOKAHEAD
from comfy_multigpu.runtime.pool import PoolOptions, WorkerPool
from comfy_multigpu.runtime.prompt import ExecutionStatus, QueuedPrompt


class Pool:
    """A WorkerPool without threads, and the calls of the tests below on its scheduler."""

    def __init__(self, n):
        self.pool = WorkerPool([("cpu", "cpu")] * n, PoolOptions(), host=object())
        self.workers = self.pool.workers
        self.scheduler = self.pool.scheduler
        for w in self.workers:
            w.started.set()
            w.up = True

    def take_next(self, worker):
        """What `worker` starts next; the prompt it started before (if any) ends first."""
        previous = self.scheduler._slots[worker.gpu_id].lease
        if previous is not None:
            self.scheduler.finish(previous, {}, ExecutionStatus("success", True, []))
        lease = self.scheduler.take_next(worker.gpu_id)
        return None if lease is None else (lease.prompt.stock(), lease.lease_id)

    def startable(self, worker):
        return self.scheduler._startable(worker.gpu_id)

    def locate(self, prompt_id):
        return self.scheduler.locate(prompt_id)

    def delete(self, prompt_id):
        self.scheduler.cancel(lambda p: p.prompt_id == prompt_id)

    def pending_ids(self, gpu):
        return [entry[1] for entry in self.scheduler._slots[gpu].pending]

    def pinned_heap(self, gpu):
        return self.scheduler._slots[gpu].pinned


def pool_of(n):
    return Pool(n)


def queue(pool, gpu, prompt_id, number, movable=True, models=frozenset(), eligible=None):
    prompt = QueuedPrompt(number, prompt_id, {}, {}, [], target=None if movable else gpu,
                          eligible=eligible, models=frozenset(models))
    with pool.scheduler._lock:
        pool.scheduler._push(gpu, prompt)      # into this GPU's queue, whatever placement would choose


def busy(pool, gpu):
    pool.scheduler.lease_workers(QueuedPrompt(0, f"running-{gpu}", {}, {}, []), [gpu])


def test_a_down_workers_waiting_auto_prompts_go_to_a_healthy_one_but_its_pinned_ones_wait():
    pool = pool_of(2)
    queue(pool, 1, "pinned", 1, movable=False)
    queue(pool, 1, "auto", 2)
    pool.workers[1].up = False                     # its loop died and is restarting
    item, _ = pool.take_next(pool.workers[0])
    assert item[1] == "auto"
    assert pool.take_next(pool.workers[0]) is None  # the pinned prompt waits for GPU 1
    assert pool.pending_ids(1) == ["pinned"]


def test_an_idle_workers_own_queue_is_left_to_it():
    pool = pool_of(2)
    queue(pool, 1, "mine", 1)
    assert pool.take_next(pool.workers[0]) is None
    assert pool.take_next(pool.workers[1])[0][1] == "mine"


def test_nothing_starts_while_draining():
    pool = pool_of(1)
    queue(pool, 0, "a", 1)
    pool.scheduler.start_draining()
    assert pool.take_next(pool.workers[0]) is None
    pool.scheduler.stop_draining()
    assert pool.take_next(pool.workers[0])[0][1] == "a"
    assert pool.locate("a") == ("running", 0, 1)


def test_with_thousands_waiting_a_free_worker_looks_at_the_first_lookahead_prompts_only():
    """Affinity may start a later prompt whose model the worker ran last, but only among the first
    LOOKAHEAD it may run: a free worker's choice costs the same with 5,000 prompts waiting."""
    pool = pool_of(2)
    pool.scheduler.max_overtakes = 10_000
    busy(pool, 1)
    for i in range(5000):
        queue(pool, 1, f"a{i}", i + 1, models={"ckpt_name:a"})
    queue(pool, 1, "b-near", LOOKAHEAD - 10.5, models={"ckpt_name:b"})
    queue(pool, 1, "b-far", LOOKAHEAD + 100.5, models={"ckpt_name:b"})
    pool.workers[0].remember_models({"ckpt_name:b"})
    assert pool.take_next(pool.workers[0])[0][1] == "b-near"        # inside the window: no model load
    assert pool.take_next(pool.workers[0])[0][1] == "a0"            # "b-far" lies beyond it: queue order
    assert len(pool.startable(pool.workers[0])) == LOOKAHEAD


def test_a_pinned_prompt_behind_many_prompts_of_another_pool_is_found():
    """GPU 0's queue holds 300 auto prompts of a pool GPU 0 is not in, then a prompt pinned to it:
    the scan widens past them (and the pinned heap finds the pinned one directly)."""
    pool = pool_of(2)
    busy(pool, 1)
    for i in range(300):
        queue(pool, 0, f"other{i}", i + 1, eligible=frozenset({1}))
    queue(pool, 0, "auto-mine", 400)
    queue(pool, 0, "pinned", 301, movable=False)
    assert pool.take_next(pool.workers[0])[0][1] == "pinned"
    assert pool.take_next(pool.workers[0])[0][1] == "auto-mine"
    assert pool.take_next(pool.workers[0]) is None                  # the rest belong to GPU 1's pool


def test_pinned_prompts_keep_their_order_and_deleted_ones_are_skipped():
    pool = pool_of(1)
    for n in (5, 3, 9, 7):
        queue(pool, 0, f"p{n}", n, movable=False)
    pool.delete("p7")                                                # deleted from the queue
    started = []
    while (job := pool.take_next(pool.workers[0])) is not None:
        started.append(job[0][1])
    assert started == ["p3", "p5", "p9"]
    assert pool.pinned_heap(0) == []


def test_a_resubmitted_pinned_prompt_id_takes_its_new_place():
    """A prompt id deleted and queued again (later number): its old heap entry must not count."""
    pool = pool_of(1)
    queue(pool, 0, "again", 1, movable=False)
    queue(pool, 0, "other", 2, movable=False)
    pool.delete("again")
    queue(pool, 0, "again", 3, movable=False)
    assert [pool.take_next(pool.workers[0])[0][1] for _ in range(2)] == ["other", "again"]


def test_a_heap_is_read_in_queue_order_without_changing_it():
    import heapq
    import random
    from comfy_multigpu.runtime.startable import heap_in_order
    rng = random.Random(7)
    heap = []
    for i in range(500):
        heapq.heappush(heap, (rng.choice([rng.uniform(-1e9, -1), rng.uniform(0, 1e3)]), f"p{i}", {}))
    before = list(heap)
    assert list(heap_in_order(heap)) == sorted(heap, key=lambda item: item[:2])
    assert heap == before
    assert list(heap_in_order([])) == []
