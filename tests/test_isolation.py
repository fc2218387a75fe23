"""Every piece of state ComfyUI keeps per process is per worker: WebSocket routing, interrupts, progress
registries, graph-expansion prefixes, preview method, output file numbers, seeds, devices, loaded
models. Each behaviour is checked twice on real servers with 2 CPU workers running at once:
`multi2` (the extension) must keep the workers apart, and `unpatched2` (the same server with the
isolation patches left out, i.e. concurrent workers on the stock host) must show the defect, so each
test is known to be able to fail."""
import hashlib
import time

import pytest

from helpers import workflows as wf
from helpers import ws
from helpers.comfy_server import new_client_id


@pytest.fixture
def multi2(multi2_modes):
    """Every test here on thread workers and on process workers (COMFY_MULTIGPU_WORKER_MODE)."""
    return multi2_modes


# ---- WebSocket events and progress registries ------------------------------------------------------

def two_clients_side_by_side(server, timeout=60.0):
    a = ws.Client(new_client_id(), gpu=0)
    b = ws.Client(new_client_id(), gpu=1)
    plan = [(a, [(0.0, {**wf.sleep(1.2, 1, node="1"), **wf.expand(5, 2, 0.0, base=2)})]),
            (b, [(0.3, {**wf.sleep(1.2, 2, node="11"), **wf.expand(7, 2, 0.0, base=12)})])]
    return ws.run(server.url, plan, timeout=timeout)


def test_websocket_events_reach_only_the_submitting_client(multi2):
    a, b = two_clients_side_by_side(multi2)
    for client in (a, b):
        assert client.foreign() == []
        assert client.finished == client.prompt_ids
        for kind in ("execution_start", "executing", "progress", "progress_state", "executed", "execution_success"):
            assert client.of_type(kind), f"{kind} missing for {client.client_id}"


def test_progress_state_lists_only_the_prompts_own_nodes(multi2):
    a, b = two_clients_side_by_side(multi2)
    for client, own in ((a, {"1", "2", "3"}), (b, {"11", "12", "13"})):
        for event in client.of_type("progress_state"):
            nodes = event["data"]["nodes"]
            assert {n["display_node_id"] for n in nodes.values()} <= own
            assert {n["prompt_id"] for n in nodes.values()} <= client.prompt_ids


def test_without_the_patches_events_cross_to_the_other_client(unpatched2):
    a, b = two_clients_side_by_side(unpatched2, timeout=8.0)    # a client may never see its end
    assert a.foreign() or b.foreign() or a.finished != a.prompt_ids


# ---- interrupts -----------------------------------------------------------------------------------

def interrupt_gpu1_while_both_run(server):
    a = server.submit(wf.sleep(3.0, 1), gpu=0)["prompt_id"]
    b = server.submit(wf.sleep(3.0, 2), gpu=1)["prompt_id"]
    server.wait_running(a)
    server.wait_running(b)
    server.post("/interrupt", headers={"X-TARGET-GPU": "1"})
    done = server.wait([a, b])
    return done[a]["status"]["status_str"], done[b]["status"]["status_str"]


def test_an_interrupt_for_gpu1_stops_gpu1_only(multi2):
    assert interrupt_gpu1_while_both_run(multi2) == ("success", "error")


def test_without_the_patches_the_interrupt_misses_its_gpu(unpatched2):
    assert interrupt_gpu1_while_both_run(unpatched2) != ("success", "error")


# ---- graph expansion prefixes ------------------------------------------------------------------------

def expansions_side_by_side(server):
    a = server.submit(wf.expand(0, 3, 1.0, base=1), gpu=0)["prompt_id"]
    time.sleep(0.3)
    b = server.submit(wf.expand(100, 3, 0.0, base=21), gpu=1)["prompt_id"]
    done = server.wait([a, b])
    return ({k: wf.ui(done[a], "1", k) for k in ("prefix", "unique_id")} | {"value": wf.ui(done[a], "2", "value")},
            {k: wf.ui(done[b], "21", k) for k in ("prefix", "unique_id")} | {"value": wf.ui(done[b], "22", "value")})


def test_graph_expansion_prefixes_are_per_worker(multi2):
    a, b = expansions_side_by_side(multi2)
    assert a == {"prefix": "1.0.0.", "unique_id": "1", "value": 3}
    assert b == {"prefix": "21.0.0.", "unique_id": "21", "value": 103}


def test_without_the_patches_an_expansion_takes_the_other_workers_prefix(unpatched2):
    a, _ = expansions_side_by_side(unpatched2)
    assert not a["prefix"].startswith("1.")


# ---- preview method ------------------------------------------------------------------------------------

def preview_methods_side_by_side(server):
    a = server.submit(wf.preview_method(1.0), gpu=0, extra_data={"preview_method": "latent2rgb"})["prompt_id"]
    server.wait_running(a)
    b = server.submit(wf.preview_method(0.0), gpu=1, extra_data={"preview_method": "none"})["prompt_id"]
    done = server.wait([a, b])
    return wf.ui(done[a], "1", "before"), wf.ui(done[a], "1", "after"), wf.ui(done[b], "1", "after")


def test_a_prompts_preview_method_is_not_changed_by_another(multi2):
    before, after, other = preview_methods_side_by_side(multi2)
    assert before == after != other


def test_without_the_patches_the_other_prompt_switches_the_preview_method(unpatched2):
    before, after, other = preview_methods_side_by_side(unpatched2)
    assert after == other != before


# ---- output file numbers --------------------------------------------------------------------------------

def save_race(server, prefix, rounds=8, gap=None):
    """Both workers number and write 4 files under one prefix at the same moment, `rounds` times.
    gap=None uses ComfyUI's SaveImage; a gap uses MGSaveNumbered (SaveImage's pattern, wider window)."""
    ids = []
    for r in range(rounds):
        for gpu in (0, 1):
            save = (wf.save_batch(prefix, 10 * gpu + r, batch=4) if gap is None
                    else wf.save_numbered(prefix, 10 * gpu + r, count=4, gap=gap))
            ids.append(server.submit({**wf.sleep(0.05, r, node="9"), **save}, gpu=gpu)["prompt_id"])
    done = server.wait(ids)
    names = [img["filename"] for e in done.values() for img in e["outputs"]["2"]["images"]]
    on_disk = sorted(p.name for p in (server.base / "output").glob(f"{prefix}_*.png"))
    return names, on_disk


@pytest.mark.parametrize("gap", [None, 0.05], ids=["SaveImage", "numbered-with-gap"])
def test_workers_saving_at_the_same_moment_never_share_a_file_name(multi2, gap):
    prefix = "race" if gap is None else "racegap"
    names, on_disk = save_race(multi2, prefix, gap=gap)
    assert len(names) == 64 and len(set(names)) == 64
    assert on_disk == sorted(names)


def test_without_the_patches_saved_files_collide(unpatched2):
    names, on_disk = save_race(unpatched2, "race", rounds=3, gap=0.05)
    assert len(set(names)) < len(names) and len(on_disk) < len(names)


# ---- seeds ---------------------------------------------------------------------------------------

def expected_noise_hash(seed, rounds):
    import torch
    data = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(seed)).numpy().tobytes()
    digest = hashlib.sha256()
    for _ in range(rounds):
        digest.update(data)
    return digest.hexdigest()


def noise_race(server, prompts=8, rounds=10, gap=0.003):
    """Both workers seed and draw at once; `gap` widens the host's seed-then-draw window."""
    ids = {server.submit(wf.noise(seed, rounds, gap=gap), gpu=seed % 2)["prompt_id"]: seed
           for seed in range(prompts)}
    done = server.wait(list(ids))
    return sum(wf.ui(done[pid], "1", "hash") != expected_noise_hash(seed, rounds) for pid, seed in ids.items())


def test_seeded_noise_is_exact_whatever_runs_beside_it(multi2):
    assert noise_race(multi2) == 0
    assert noise_race(multi2, gap=0.0, rounds=40) == 0        # comfy.sample.prepare_noise itself


def test_without_the_patches_concurrent_seeding_corrupts_noise(unpatched2):
    assert noise_race(unpatched2) > 0


# ---- devices --------------------------------------------------------------------------------------

@pytest.mark.parametrize("gpu", [0, 1])
def test_the_worker_device_is_seen_inside_the_worker_and_its_helper_threads(multi2, gpu):
    pid = multi2.submit(wf.probe(f"device-{gpu}"), gpu=gpu)["prompt_id"]
    entry = multi2.wait(pid)[pid]
    here, helper = wf.ui(entry, "1", "here"), wf.ui(entry, "1", "helper")
    for facts in (here, helper):
        assert facts["gpu"] == gpu
        assert facts["all_devices"] == ["cpu"]          # only the worker's own device
    if multi2.worker_mode == "thread":
        for facts in (here, helper):
            assert facts["device_is_worker_device"] is True
        assert here["thread"] == f"comfy-multigpu-gpu{gpu}"
    else:                         # the child's own process: ComfyUI's device is its GPU's, stock
        assert here["device"] == helper["device"] == "cpu"
    assert helper["thread"] != here["thread"]


def test_without_the_patches_the_device_is_the_process_default(unpatched2):
    pid = unpatched2.submit(wf.probe("device"), gpu=1)["prompt_id"]
    here = wf.ui(unpatched2.wait(pid)[pid], "1", "here")
    assert here["device_is_worker_device"] is False


# ---- loaded models ---------------------------------------------------------------------------------

def free_gpu0_while_gpu1_holds_a_model(server):
    pid = server.submit(wf.hold_model(4.0), gpu=1)["prompt_id"]
    server.wait_running(pid)
    time.sleep(1.5)                       # the checkpoint is loaded and held by then
    server.post("/free", {"unload_models": True}, headers={"X-TARGET-GPU": "0"})
    entry = server.wait(pid)[pid]
    assert entry["status"]["status_str"] == "success", entry["status"]
    return wf.ui(entry, "2", "stayed_loaded")


def test_freeing_gpu0_never_unloads_a_model_gpu1_is_using(multi2):
    assert free_gpu0_while_gpu1_holds_a_model(multi2) is True


def test_without_the_patches_freeing_gpu0_unloads_gpu1s_model(unpatched2):
    assert free_gpu0_while_gpu1_holds_a_model(unpatched2) is False


def test_dynamic_vram_is_switched_off_and_said_so(multi2):
    log = multi2.log()
    if multi2.worker_mode == "process":      # each child decides as stock ComfyUI does, and says so
        assert "DynamicVRAM decided by each worker process as stock ComfyUI does" in log
        assert "worker mode PROCESS" in log
        return
    assert "DynamicVRAM switched off for 2 concurrent workers" in log
    assert "; DynamicVRAM off;" in log
