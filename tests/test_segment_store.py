"""The main process's register of shared weight segments (process workers), in-process: single-flight
across callers, a failed load retried by the next caller, an unshareable file left private, a dead
child's load given up, users, LRU eviction within the budget (the memory goes with the descriptor),
and a clean close. Children are stood in for by threads speaking the same protocol."""
import os
import threading
import time

import pytest
import torch

from comfy_multigpu.runtime import shared_segments
from comfy_multigpu.runtime.segment_store import SegmentStore

MIB = 2 ** 20


@pytest.fixture
def files(tmp_path):
    paths = []
    for i in range(3):
        path = tmp_path / f"model{i}.safetensors"
        path.write_bytes(b"x" * (i + 1))
        paths.append(str(path))
    return paths


@pytest.fixture
def store():
    s = SegmentStore(budget=3 * MIB, owner_pid=os.getpid())
    yield s
    s.close()


def load_as_child(store, gpu, path, build, options="o"):
    """What host/child_weights.py does with a grant: attach, or load + publish + attach."""
    grant = store.acquire(gpu, "checkpoint", path, options)
    if grant.action == "attach":
        return grant.action, shared_segments.attach(grant.blob, f"/proc/self/fd/{grant.fd}")
    if grant.action == "private":
        return grant.action, build()
    obj = build()
    published = shared_segments.publish(obj, grant.segment)
    fd = os.open(grant.segment, os.O_RDONLY)
    shared_segments.remove(grant.segment)
    store.published(gpu, grant.key, published.blob, published.nbytes, fd)
    return grant.action, shared_segments.attach(published.blob, f"/proc/self/fd/{fd}")


def weights(mib=1.0, value=1.0):
    return {"w": torch.full((int(mib * MIB) // 4,), value)}


def test_one_caller_loads_the_others_wait_and_map_the_same_segment(store, files):
    builds = []

    def build():
        builds.append(1)
        time.sleep(0.3)                  # the others ask while this one is loading
        return weights(value=2.0)
    results = {}
    threads = [threading.Thread(target=lambda g=g: results.update({g: load_as_child(store, g, files[0], build)}))
               for g in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert sorted(action for action, _ in results.values()) == ["attach", "attach", "load"]
    assert all(torch.equal(obj["w"], torch.full_like(obj["w"], 2.0)) for _, obj in results.values())
    (entry,) = store.entries.values()
    assert entry.loads == 1 and entry.users == {0: 1, 1: 1, 2: 1}
    assert not any(n.startswith(f"comfy-multigpu-{os.getpid()}-") for n in os.listdir(shared_segments.segment_dir()))


def test_a_failed_load_reaches_the_waiters_and_the_next_caller_loads_again(store, files):
    grant = store.acquire(0, "checkpoint", files[0], "o")
    waiter_error = []

    def waiter():
        try:
            store.acquire(1, "checkpoint", files[0], "o")
        except RuntimeError as ex:
            waiter_error.append(str(ex))
    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.1)
    store.failed(0, grant.key, "OSError: disk gone")
    t.join(5)
    assert waiter_error and "disk gone" in waiter_error[0]
    assert store.acquire(1, "checkpoint", files[0], "o").action == "load"


def test_an_unshareable_file_is_loaded_privately_by_each_child(store, files):
    grant = store.acquire(0, "checkpoint", files[0], "o")
    store.failed(0, grant.key, "a quantized tensor subclass", shareable=False)
    again = store.acquire(1, "checkpoint", files[0], "o")
    assert again.action == "private" and "quantized" in again.reason


def test_a_child_that_dies_while_loading_does_not_leave_the_others_waiting(store, files):
    store.acquire(0, "checkpoint", files[0], "o")
    outcome = []
    t = threading.Thread(target=lambda: outcome.append(_try(store, 1, files[0])))
    t.start()
    time.sleep(0.1)
    store.abandon(0)
    t.join(5)
    assert outcome and "died while loading" in outcome[0]
    assert store.acquire(1, "checkpoint", files[0], "o").action == "load"


def _try(store, gpu, path):
    try:
        return store.acquire(gpu, "checkpoint", path, "o").action
    except RuntimeError as ex:
        return str(ex)


def test_over_budget_the_least_recently_used_unused_segment_goes(store, files):
    for i, path in enumerate(files[:2]):
        load_as_child(store, 0, path, lambda: weights(1.0, float(i)))
    first, second = list(store.entries.values())
    store.released(0, first.key)                  # the child let go of the first file
    fd = first.fd
    load_as_child(store, 1, files[2], lambda: weights(1.5))          # 3.5 MiB > 3 MiB budget
    assert first.key not in store.entries and second.key in store.entries
    assert store.evictions == 1
    with pytest.raises(OSError):
        os.fstat(fd)                               # its descriptor is closed: the memory can go
    assert store.totals()["files"] == 2


def test_a_segment_in_use_stays_over_budget(store, files):
    load_as_child(store, 0, files[0], lambda: weights(2.0))
    load_as_child(store, 1, files[1], lambda: weights(2.0))
    assert store.totals()["files"] == 2 and store.totals()["bytes"] > store.budget


def test_close_drops_every_segment(files):
    store = SegmentStore(budget=10 * MIB)
    load_as_child(store, 0, files[0], lambda: weights(0.5))
    (entry,) = store.entries.values()
    fd = entry.fd
    store.close()
    assert store.entries == {}
    with pytest.raises(OSError):
        os.fstat(fd)
