"""Four CPU workers run prompts at the same time (timestamps prove it); 100 overlapping prompts from
four WebSocket clients show none of the isolation defects; GC runs once for all workers."""
import time

from helpers import workflows as wf
from helpers import ws
from helpers.comfy_server import new_client_id
from test_isolation import expected_noise_hash


def test_four_prompts_run_at_the_same_time_on_four_workers(multi4):
    ids = [multi4.submit(wf.sleep(1.5, i))["prompt_id"] for i in range(4)]
    done = multi4.wait(ids)
    gpus = sorted(done[i]["gpu_id"] for i in ids)
    assert gpus == [0, 1, 2, 3]
    starts = [wf.ui(done[i], "1", "t0") for i in ids]
    ends = [wf.ui(done[i], "1", "t1") for i in ids]
    assert max(starts) < min(ends), f"no common moment: starts {starts}, ends {ends}"


def test_a_hundred_concurrent_prompts_show_no_isolation_defect(multi4):
    clients = [ws.Client(new_client_id(), gpu=gpu) for gpu in (None, 0, 2, None)]
    plan, seeds = [], {}
    for c_index, client in enumerate(clients):
        items = []
        for i in range(25):
            seed = 1000 * c_index + i
            prompt = {**wf.noise(seed, rounds=5, node="1"), **wf.save_batch("hundred", seed, batch=2, base=2),
                      **wf.sleep(0.02, seed, node="4")}
            items.append((0.01 * i, prompt))
            seeds[(c_index, i)] = seed
        plan.append((client, items))
    started = time.time()
    ws.run(multi4.url, plan, timeout=300)
    history = multi4.get("/history", max_items=1000)
    names = []
    for client in clients:
        assert client.foreign() == [], f"{len(client.foreign())} foreign events"
        assert client.finished == client.prompt_ids and len(client.prompt_ids) == 25
        for pid in client.prompt_ids:
            entry = history[pid]
            assert entry["status"]["status_str"] == "success"
            if client.gpu is not None:
                assert entry["gpu_id"] == client.gpu                     # pinned work is never moved
            seed = wf.ui(entry, "4", "value")
            assert wf.ui(entry, "1", "hash") == expected_noise_hash(seed, 5)
            names += [img["filename"] for img in entry["outputs"]["3"]["images"]]
    assert len(names) == 200 and len(set(names)) == 200
    on_disk = sorted(p.name for p in (multi4.base / "output").glob("hundred_*.png"))
    assert on_disk == sorted(names)
    used = {history[pid]["gpu_id"] for c in clients for pid in c.prompt_ids}
    assert used == {0, 1, 2, 3}
    assert time.time() - started < 300


def test_periodic_gc_runs_once_for_all_workers(multi4):
    """Stock runs gc.collect + cache emptying in its one worker after prompts, at most every 10 s; with
    four workers finishing together it still runs once per interval, not four times."""
    ids = [multi4.submit(wf.sleep(0.5, 500 + i), gpu=i)["prompt_id"] for i in range(4)]
    before = multi4.get("/queue/all", counts=1)["housekeeping"]["gc_runs"]
    multi4.wait(ids)
    time.sleep(11)
    after = multi4.get("/queue/all", counts=1)["housekeeping"]["gc_runs"]
    assert 1 <= after - before <= 2


def _cycles_freed_after_prompts(server, count: int) -> dict:
    """Run `count` prompts that each leave a reference cycle behind; wait (bounded) until the garbage
    collector has freed every one made so far."""
    made_before = server.get("/mg_test/cycles")["made"]
    server.wait([server.submit(wf.make_cycle(i))["prompt_id"] for i in range(count)])
    deadline = time.time() + 30           # the housekeeping pass runs at most every 10 s
    while True:
        cycles = server.get("/mg_test/cycles")
        if cycles["freed"] == cycles["made"] or time.time() > deadline:
            break
        time.sleep(0.5)
    assert cycles["made"] == made_before + count
    return cycles


def test_start_up_objects_are_frozen_out_of_the_gc_and_later_garbage_is_still_freed(multi4):
    """The periodic full collection holds every worker up (one GIL); freezing what start-up left alive
    makes it scan only newer objects. Garbage made by prompts afterwards must still be freed."""
    housekeeping = multi4.get("/queue/all", counts=1)["housekeeping"]
    assert housekeeping["gc_frozen_objects"] > 100_000          # torch + ComfyUI + nodes
    log = multi4.log()       # frozen before any worker could start a prompt (whose models it would freeze)
    assert log.index("start-up objects frozen out of the garbage collector") < log.index("Worker started")
    cycles = _cycles_freed_after_prompts(multi4, 8)
    assert cycles["freed"] == cycles["made"]
    after = multi4.get("/queue/all", counts=1)["housekeeping"]
    assert after["gc_frozen_objects"] == housekeeping["gc_frozen_objects"]   # frozen once, at start only


def test_gc_freeze_off_keeps_stock_full_collections(own_servers):
    server = own_servers("gc-off", workers=2, env={"COMFY_MULTIGPU_GC_FREEZE": "0"})
    assert server.get("/queue/all", counts=1)["housekeeping"]["gc_frozen_objects"] == 0
    cycles = _cycles_freed_after_prompts(server, 4)
    assert cycles["freed"] == cycles["made"]
