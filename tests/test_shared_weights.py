"""Model weights held once in RAM for every worker (issue 3), against real ComfyUI servers.

RSS and file opens are measured from outside the server (psutil on its pid, inotify on the file);
images are compared pixel for pixel with stock ComfyUI running each prompt alone.
"""
import gc
import hashlib
import io
import shutil
import time

import psutil
import pytest
from PIL import Image

from helpers import workflows as wf
from helpers.comfy_server import HttpError
from helpers.file_opens import OpenCounter

MIB = 2 ** 20


def rss(server) -> int:
    return psutil.Process(server.proc.pid).memory_info().rss


def settle(server) -> int:
    """RSS once the server is idle and its housekeeping pass (GC, heap trim: at most every 10 s
    after a prompt) has run: the lowest of samples over 11 s."""
    server.wait_idle()
    samples = []
    for _ in range(12):
        samples.append(rss(server))
        time.sleep(1.0)
    return min(samples)


def pixels(server, entry) -> str:
    image = entry["outputs"]["7"]["images"][0]
    data = server.request("GET", "/view", filename=image["filename"], subfolder=image["subfolder"], type="output")
    return hashlib.sha256(Image.open(io.BytesIO(data)).tobytes()).hexdigest()


def models(server) -> dict:
    return {m["name"]: m for m in server.get("/multigpu/models")["models"]}


def checkpoint_size(server) -> int:
    return (server.base / "models" / "checkpoints" / wf.CHECKPOINT).stat().st_size


def run_everywhere(server, gpus, seed=1):
    """The checkpoint workflow on each GPU at once; returns {gpu: history entry}."""
    ids = {g: server.submit(wf.txt2img(seed, prefix=f"w{g}"), gpu=g)["prompt_id"] for g in gpus}
    done = server.wait(list(ids.values()), timeout=300)
    for g, pid in ids.items():
        assert done[pid]["status"]["status_str"] == "success", done[pid]["status"]
        assert done[pid]["gpu_id"] == g
    return {g: done[pid] for g, pid in ids.items()}


@pytest.mark.parametrize("sharing", ["on", "off"])
def test_rss_after_4_workers_ran_the_checkpoint(own_servers, sharing):
    """Shared: 4 workers cost at most 15% of the file more than 1. Off: the growth it prevents."""
    env = {} if sharing == "on" else {"COMFY_MULTIGPU_RAM_CACHE": "off"}
    server = own_servers(f"rss-{sharing}", workers=4, env=env)
    try:
        size = checkpoint_size(server)
        with OpenCounter(str(server.base / "models" / "checkpoints" / wf.CHECKPOINT)) as opens:
            run_everywhere(server, [0])
            opens.poll()
            one = settle(server)
            for gpu in (1, 2, 3):        # one at a time: inotify merges identical events left unread
                run_everywhere(server, [gpu])
                opens.poll()
            four = settle(server)
            opened = opens.poll()
        growth = four - one
        print(f"sharing {sharing}: RSS 1 worker {one / MIB:.0f} MiB, 4 workers {four / MIB:.0f} MiB, "
              f"growth {growth / MIB:.0f} MiB = {growth / size:.2f} x the file ({size / MIB:.0f} MiB); "
              f"file opened {opened} times")
        if sharing == "on":
            assert growth <= 0.15 * size
            assert opened == 1 and reads(server, wf.CHECKPOINT) == 1
            listed = models(server)[wf.CHECKPOINT]
            assert listed["loads"] == 1 and listed["users"] == [0, 1, 2, 3]
        else:
            assert growth >= 2 * size       # three more private copies (fp32 on CPU: ~1.5x the file each)
            assert opened == 4 and reads(server, wf.CHECKPOINT) == 4
            assert server.get("/multigpu/models") == {"sharing": False, "ram_cache": None, "models": []}
    finally:
        server.stop()
        gc.collect()


@pytest.fixture(scope="module")
def shared4(servers):
    server = servers.start("shared4", workers=4)
    yield server
    server.stop()


def reads(server, name: str) -> int:
    """How often ComfyUI opened the file (counted by the test node pack around safetensors.safe_open)."""
    return server.get("/mg_test/file_reads").get(name, 0)


def test_concurrent_first_use_reads_the_file_once(shared4):
    run_everywhere(shared4, [0, 1, 2, 3], seed=3)
    assert reads(shared4, wf.CHECKPOINT) == 1
    listed = models(shared4)[wf.CHECKPOINT]
    assert listed["loads"] == 1
    assert listed["views_made"] == 4
    assert listed["users"] == [0, 1, 2, 3]
    assert listed["bytes"] > 0.9 * checkpoint_size(shared4)
    assert listed["type"] == "checkpoint"


def test_lora_on_one_worker_never_reaches_the_other(shared4, stock):
    """GPU 0 runs the checkpoint while GPU 1 runs it with a LoRA at 1.0, at the same time: both images
    are bit-identical to stock ComfyUI running each prompt alone."""
    expected = {}
    for lora in (0.0, 1.0):
        pid = stock.submit(wf.txt2img(11, prefix="stock", steps=12, lora=lora))["prompt_id"]
        expected[lora] = pixels(stock, stock.wait(pid, timeout=300)[pid])
    assert expected[0.0] != expected[1.0], "the LoRA must change the image for this test to mean anything"
    for round_ in range(3):
        # every round computes from scratch: each worker's node cache reset, the views come anew
        resets = shared4.log().count("Reset node caches (/free)")
        shared4.post("/free", {"free_memory": True})
        deadline = time.time() + 30
        while shared4.log().count("Reset node caches (/free)") < resets + 4 and time.time() < deadline:
            time.sleep(0.05)
        plain = shared4.submit(wf.txt2img(11, prefix=f"plain{round_}", steps=12), gpu=0)["prompt_id"]
        lora = shared4.submit(wf.txt2img(11, prefix=f"lora{round_}", steps=12, lora=1.0), gpu=1)["prompt_id"]
        done = shared4.wait([plain, lora], timeout=300)
        spans = []
        for pid in (plain, lora):
            assert done[pid]["status"]["status_str"] == "success", done[pid]["status"]
            messages = dict(done[pid]["status"]["messages"])
            spans.append((messages["execution_start"]["timestamp"], messages["execution_success"]["timestamp"]))
        assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], f"round {round_}: did not overlap {spans}"
        assert pixels(shared4, done[plain]) == expected[0.0], f"round {round_}: the plain image changed"
        assert pixels(shared4, done[lora]) == expected[1.0], f"round {round_}: the LoRA image differs from stock"
    listed = models(shared4)
    assert listed[wf.CHECKPOINT]["loads"] == 1 and listed[wf.LORA]["loads"] == 1
    assert listed[wf.LORA]["type"] == "lora"


def test_preload_puts_a_file_in_ram_and_on_a_device(shared4):
    copy = shared4.base / "models" / "checkpoints" / "preload-copy.safetensors"
    shutil.copyfile(shared4.base / "models" / "checkpoints" / wf.CHECKPOINT, copy)
    with OpenCounter(str(copy)) as opens:
        answer = shared4.post("/preload", {"model": copy.name, "type": "checkpoint", "gpus": [2]})
        assert answer["ram"] == "loaded" and answer["gpus"] == {"2": "on_device"}
        assert opens.poll() == 1
        listed = models(shared4)[copy.name]
        assert listed["devices"] == [2] and listed["preloaded_for"] == [2] and listed["loads"] == 1
        gpu2 = shared4.get("/queue/all", counts=1)["queues"][2]      # placement's affinity knows it too
        assert f"ckpt_name:{copy.name}" in gpu2["models"]
        views = listed["views_made"]
        pid = shared4.submit(wf.txt2img(5, prefix="preloaded", ckpt=copy.name), gpu=2)["prompt_id"]
        entry = shared4.wait(pid, timeout=300)[pid]
        assert entry["status"]["status_str"] == "success"
        assert opens.poll() == 1
    listed = models(shared4)[copy.name]
    assert listed["views_made"] == views, "the prompt must use the view /preload made, not a new one"
    assert listed["preloaded_for"] == [] and 2 in listed["users"]
    # a file some prompt loaded (its template holds inference tensors) preloads too
    again = shared4.post("/preload", {"model": wf.CHECKPOINT, "gpus": [3]})
    assert again["gpus"] == {"3": "on_device"}


@pytest.mark.parametrize("body, kind, field", [
    ({"model": "nope.safetensors", "type": "checkpoint"}, "unknown_model", "model"),
    ({"model": wf.CHECKPOINT, "type": "checkpoint", "gpus": [9]}, "unknown_gpu", "gpus"),
    ({"model": wf.CHECKPOINT, "type": "bogus"}, "invalid_field", "type"),
    ({"model": wf.CHECKPOINT, "gpus": "0"}, "invalid_field", "gpus"),
    ({"type": "checkpoint"}, "invalid_field", "model"),
    ({"model": wf.LORA, "type": "checkpoint"}, "unknown_model", "model"),
])
def test_preload_refuses_what_does_not_exist(shared4, body, kind, field):
    with pytest.raises(HttpError) as caught:
        shared4.post("/preload", body)
    assert caught.value.status == 400
    error = caught.value.json()["error"]
    assert error["type"] == kind and error["extra_info"]["field"] == field
    if kind == "unknown_model":
        assert wf.CHECKPOINT in error["extra_info"]["valid"]


def test_over_budget_the_least_recently_used_unused_file_is_evicted(own_servers):
    server = own_servers("evict", workers=2, env={"COMFY_MULTIGPU_RAM_CACHE": "1000MB"})
    try:
        folder = server.base / "models" / "checkpoints"
        shutil.copyfile(folder / wf.CHECKPOINT, folder / "second.safetensors")
        run_everywhere(server, [0])
        server.post("/free", {"unload_models": True, "free_memory": True}, headers={"X-TARGET-GPU": "0"})
        deadline = time.time() + 30
        while models(server)[wf.CHECKPOINT]["users"] and time.time() < deadline:
            time.sleep(0.2)
        assert models(server)[wf.CHECKPOINT]["users"] == []      # GPU 0 let go of its copy
        pid = server.submit(wf.txt2img(2, prefix="second", ckpt="second.safetensors"), gpu=1)["prompt_id"]
        assert server.wait(pid, timeout=300)[pid]["status"]["status_str"] == "success"
        state = server.get("/multigpu/models")
        assert set(models(server)) == {"second.safetensors"}, "the unused file must be evicted"
        assert state["ram_cache"]["evictions"] == 1
        assert state["ram_cache"]["bytes"] <= state["ram_cache"]["budget_bytes"]
        # both in use: over budget, nothing evicted (their memory could not be freed anyway)
        run_everywhere(server, [0])
        state = server.get("/multigpu/models")
        assert set(models(server)) == {wf.CHECKPOINT, "second.safetensors"}
        assert state["ram_cache"]["bytes"] > state["ram_cache"]["budget_bytes"]
        assert state["ram_cache"]["evictions"] == 1
    finally:
        server.stop()
