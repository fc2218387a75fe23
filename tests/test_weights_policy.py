"""The shared RAM cache without ComfyUI: budget parsing, LRU choice, single-flight loads, users,
pin counts (pure functions and the store over plain torch tensors)."""
import gc
import threading
import time

import pytest
import torch

from comfy_multigpu.runtime import weights
from comfy_multigpu.policy.eviction import BudgetError, CachedFile, choose_evictions, parse_ram_budget
from comfy_multigpu.runtime.weights import PinCounts, WeightStore

GIB = 1024 ** 3


@pytest.mark.parametrize("raw, expected", [
    ("", int(64 * GIB * 0.7)), ("70%", int(64 * GIB * 0.7)), ("24GB", 24 * GIB), ("24 gib", 24 * GIB),
    ("512MB", 512 * 2 ** 20), ("1.5g", int(1.5 * GIB)), ("1000", 1000), ("off", None), ("OFF", None),
    ("100%", 64 * GIB),
])
def test_budget_parsing(raw, expected):
    assert parse_ram_budget(raw, 64 * GIB) == expected


@pytest.mark.parametrize("raw", ["0%", "101%", "-5GB", "lots", "12 parsecs", "%", "nan%"])
def test_budget_errors_say_what_is_valid(raw):
    with pytest.raises(BudgetError, match="COMFY_MULTIGPU_RAM_CACHE"):
        parse_ram_budget(raw, 64 * GIB)


def test_least_recently_used_unused_files_go_first_until_it_fits():
    files = [CachedFile("a", 40, False, 1.0), CachedFile("b", 40, True, 0.5), CachedFile("c", 40, False, 2.0),
             CachedFile("d", 40, False, 3.0)]
    assert choose_evictions(files, 160) == []
    assert choose_evictions(files, 120) == ["a"]          # b is older but in use
    assert choose_evictions(files, 60) == ["a", "c", "d"]
    assert choose_evictions(files, 0) == ["a", "c", "d"]  # in use stays, even over budget
    assert choose_evictions([CachedFile("x", 10, True, 0.0)], 0) == []


def _state_dict():
    return {"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(10)}


def test_concurrent_first_use_builds_once_and_every_caller_shares_the_storage(tmp_path):
    path = tmp_path / "file.safetensors"
    path.write_bytes(b"x")
    store = WeightStore(budget=1 << 30)
    builds = []

    def build():
        builds.append(1)
        time.sleep(0.3)            # the others arrive while it loads
        return _state_dict()

    views = [None] * 4
    threads = [threading.Thread(target=lambda i=i: views.__setitem__(i, store.get("lora", str(path), "", build)))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    ptrs = {v["w"].data_ptr() for v in views}
    assert len(ptrs) == 1 and len({id(v["w"]) for v in views}) == 4   # one storage, own tensor objects
    assert all(store.is_shared(v["w"]) for v in views)
    entry = next(iter(store.entries.values()))
    assert entry.loads == 1 and entry.views == 4 and entry.users == {weights.OUTSIDE: 4}
    assert entry.nbytes == 1000 * 4 + 10 * 4


def test_a_failed_load_reaches_every_waiter_and_the_next_caller_tries_again(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"x")
    store = WeightStore(budget=1 << 30)
    with pytest.raises(ValueError):
        store.get("lora", str(path), "", lambda: (_ for _ in ()).throw(ValueError("corrupt")))
    assert store.entries == {}
    assert store.get("lora", str(path), "", _state_dict)["b"].sum() == 10


def test_users_follow_the_views_and_unused_files_are_evicted_over_budget(tmp_path):
    paths = []
    for name in ("a", "b"):
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(name.encode())
        paths.append(str(p))
    store = WeightStore(budget=5000)         # one 4040-byte file fits, two do not
    first = store.get("lora", paths[0], "", _state_dict)
    second = store.get("lora", paths[1], "", _state_dict)
    assert len(store.entries) == 2            # both in use: over budget, nothing evicted
    del first
    gc.collect()                              # the finalizer only records the release ...
    assert len(store.entries) == 2
    store.evict()                             # ... the next store call (or housekeeping pass) applies it
    assert [e.path for e in store.entries.values()] == [paths[1]]
    assert store.evictions == 1
    assert second["w"].sum() == sum(range(1000))


def test_a_changed_file_is_a_new_entry(tmp_path):
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"one")
    store = WeightStore(budget=1 << 30)
    a = store.get("lora", str(path), "", _state_dict)
    path.write_bytes(b"longer content")
    b = store.get("lora", str(path), "", _state_dict)
    assert len(store.entries) == 2 and a["w"].data_ptr() != b["w"].data_ptr()


class FakeHost:
    """The CUDA registration that cannot run here: records what would be registered."""
    def __init__(self):
        self.registered = {}

    def pin(self, tensor):
        self.registered[tensor.data_ptr()] = tensor.nbytes
        return True

    def unpin(self, tensor):
        return self.registered.pop(tensor.data_ptr(), None) is not None

    def already(self, ptr, tensor):
        return self.registered.get(ptr) == tensor.nbytes


def test_a_shared_host_address_stays_pinned_until_its_last_holder_unpins():
    host, counts = FakeHost(), PinCounts()
    shared = torch.zeros(64)
    assert counts.pin(shared, host.pin, host.already)      # device 0
    assert counts.pin(shared, host.pin, host.already)      # device 1, same storage: counted, not re-registered
    assert counts.unpin(shared, host.unpin)                # device 0 offloads
    assert shared.data_ptr() in host.registered            # device 1 may still be copying from it
    assert counts.unpin(shared, host.unpin)
    assert host.registered == {}
