"""Auto placement on the real server: no GPU idles while an auto-placed prompt waits behind a busy
one (an idle worker takes it over), pinned prompts never move, and among idle GPUs the one that
already ran the prompt's models is preferred."""
from helpers import workflows as wf


def test_an_idle_gpu_takes_over_an_auto_prompt_waiting_behind_a_long_one(multi2):
    long_job = multi2.submit(wf.sleep(6.0, 1))["prompt_id"]               # auto -> GPU 0 (idle, lowest)
    multi2.wait_running(long_job)
    short_job = multi2.submit(wf.sleep(0.5, 2))                            # auto -> GPU 1 (idle)
    waiting = multi2.submit(wf.sleep(0.05, 3))                             # both busy: ties -> GPU 0
    pinned = multi2.submit(wf.sleep(0.05, 4), gpu=0)                       # pinned behind the long job
    assert short_job["gpu_id"] == 1 and waiting["gpu_id"] == 0
    done = multi2.wait([waiting["prompt_id"]], timeout=5)                  # well before the long job ends
    assert done[waiting["prompt_id"]]["gpu_id"] == 1                        # ran where a worker was free
    assert multi2.get(f"/history/{pinned['prompt_id']}") == {}             # pinned: still waiting on GPU 0
    assert [i[1] for i in multi2.get("/queue", headers={"X-TARGET-GPU": "0"})["queue_pending"]] == \
        [pinned["prompt_id"]]
    multi2.post("/interrupt", {"prompt_id": long_job})
    assert multi2.wait(pinned["prompt_id"])[pinned["prompt_id"]]["gpu_id"] == 0
    assert "Took over prompt" in multi2.log()


def test_among_idle_gpus_the_one_that_ran_the_models_is_chosen(multi2):
    """The server is shared with other tests that ran the checkpoint on both GPUs; the LoRA is used
    only here, so after this pinned run GPU 1 alone has every model of the prompt."""
    first = multi2.submit(wf.txt2img(5, prefix="affinity", lora=1.0), gpu=1)["prompt_id"]
    assert multi2.wait(first, timeout=300)[first]["status"]["status_str"] == "success"
    state = multi2.get("/queue/all", counts=1)
    assert {"ckpt_name:tiny-sd15.safetensors", "lora_name:tiny-sd15-lora.safetensors"} <= \
        set(state["queues"][1]["models"])
    assert "lora_name:tiny-sd15-lora.safetensors" not in state["queues"][0]["models"]
    again = multi2.submit(wf.txt2img(6, prefix="affinity", lora=1.0))     # both idle: GPU 1 has the models
    assert again["gpu_id"] == 1
    multi2.wait(again["prompt_id"], timeout=300)


def test_among_idle_gpus_without_the_models_the_one_with_more_free_device_memory_is_chosen(multi2):
    """The device's free memory is read after each prompt (CUDA only: the reading is faked here at
    that edge, by the test node pack); a prompt whose models no GPU has goes where loading them evicts
    least, and the next reading after a prompt is what counts."""
    gib = 1 << 30
    multi2.wait_idle()
    try:
        readings = [multi2.post("/mg_test/free_memory", {"gpu": 0, "bytes": 2 * gib}),
                    multi2.post("/mg_test/free_memory", {"gpu": 1, "bytes": 10 * gib})]
        assert [r["free_memory"] for r in readings] == [2 * gib, 10 * gib]
        assert [q["free_memory"] for q in multi2.get("/queue/all", counts=1)["queues"]] == [2 * gib, 10 * gib]
        first = multi2.submit(wf.standin("free-memory-probe-1", 0.05, 1, 0.0))
        assert first["gpu_id"] == 1
        assert multi2.wait(first["prompt_id"])[first["prompt_id"]]["gpu_id"] == 1
        multi2.post("/mg_test/free_memory", {"gpu": 0, "bytes": 12 * gib})
        multi2.post("/mg_test/free_memory", {"gpu": 1, "bytes": 1 * gib})
        second = multi2.submit(wf.standin("free-memory-probe-2", 0.05, 2, 0.0))
        assert second["gpu_id"] == 0
        assert multi2.wait(second["prompt_id"])[second["prompt_id"]]["gpu_id"] == 0
        # GPU 1 has probe 1 on its device: affinity comes before free memory.
        third = multi2.submit(wf.standin("free-memory-probe-1", 0.05, 3, 0.0))
        assert third["gpu_id"] == 1
        multi2.wait(third["prompt_id"])
    finally:
        for gpu in (0, 1):
            multi2.post("/mg_test/free_memory", {"gpu": gpu, "bytes": None})
