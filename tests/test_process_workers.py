"""Process workers (COMFY_MULTIGPU_WORKER_MODE=process) on real servers: prompts that hold the GIL run
in parallel only there; a child killed mid-prompt fails that prompt only and is replaced; kill -9 of
the main process takes its children and leaves no shared memory; /preload and the weights shared
between the children's processes (read once, counted once in PSS). The API, WebSocket, isolation and
reliability suites and the host's own tests run in this mode too (they take `multi2_modes` /
`worker_env`); this file holds what only process mode has."""
import os
import signal
import time
from pathlib import Path

import psutil

from helpers import workflows as wf

SHM = Path("/dev/shm")


def children(server) -> dict:
    """GPU id -> pid of its child process, from /queue/all."""
    return {q["gpu_id"]: q["process"]["pid"] for q in server.get("/queue/all", counts=1)["queues"]}


def wait_gone(pids, timeout=15.0) -> list:
    deadline = time.time() + timeout
    alive = list(pids)
    while alive and time.time() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    return alive


def segment_pss(pid: int, owner: int) -> tuple[int, int]:
    """(Rss, Pss) of the mappings of the main process `owner`'s shared segments in process `pid`."""
    rss = pss = 0
    inside = False
    with open(f"/proc/{pid}/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            parts = line.split(None, 5)
            if parts and not parts[0].endswith(":"):
                inside = len(parts) == 6 and f"comfy-multigpu-{owner}-" in parts[5]
            elif inside and parts[0] in ("Rss:", "Pss:"):
                value = int(parts[1]) * 1024
                if parts[0] == "Rss:":
                    rss += value
                else:
                    pss += value
    return rss, pss


def span(server, ids) -> float:
    """Seconds from the first prompt's start to the last one's end, as the nodes measured them."""
    done = server.wait(ids, timeout=120)
    return max(wf.ui(done[p], "1", "t1") for p in ids) - min(wf.ui(done[p], "1", "t0") for p in ids)


def test_prompts_that_hold_the_gil_run_in_parallel_only_on_process_workers(multi2_thread, multi2_process):
    """4 prompts that each hold the GIL for about 1 s on 2 workers (2 cores): about 4 s on threads (one
    interpreter), about 2 s on processes. Measured in units of one such prompt run alone, so a machine
    that is slower or busier than the sizing assumed changes nothing."""
    spans = {}
    blocks = wf.spin_blocks(1.0)
    multi2_thread.wait_idle()
    alone = span(multi2_thread, [multi2_thread.submit(wf.spin(blocks, 9), gpu=0)["prompt_id"]])
    for mode, server in (("thread", multi2_thread), ("process", multi2_process)):
        server.wait_idle()
        ids = [server.submit(wf.spin(blocks, i), gpu=i % 2)["prompt_id"] for i in range(4)]
        spans[mode] = span(server, ids)
    print(f"\n4 GIL-holding prompts ({alone:.2f} s alone) on 2 workers: thread {spans['thread']:.2f} s, "
          f"process {spans['process']:.2f} s (ratio {spans['process'] / spans['thread']:.2f})")
    assert spans["thread"] > 3.0 * alone               # one GIL: the four run one after another
    assert spans["process"] < 0.75 * spans["thread"]


def test_a_child_killed_mid_prompt_fails_that_prompt_only_and_is_replaced(multi2_process):
    server = multi2_process
    server.wait_idle()
    before = children(server)
    restarts = server.get("/queue/all", counts=1)["queues"][1]["restarts"]
    victim = server.submit(wf.sleep(30, 1), gpu=1)["prompt_id"]
    server.wait_running(victim)
    others = [server.submit(wf.sleep(0.3, i), gpu=0)["prompt_id"] for i in range(3)]
    os.kill(before[1], signal.SIGKILL)
    done = server.wait([victim] + others, timeout=60)
    error = dict(done[victim]["status"]["messages"])["execution_error"]
    assert done[victim]["status"]["status_str"] == "error" and "died" in error["exception_message"], error
    assert all(done[p]["status"]["status_str"] == "success" for p in others)
    after = server.submit(wf.sleep(0.05, 7), gpu=1)["prompt_id"]          # runs once the new child is up
    assert server.wait(after, timeout=120)[after]["status"]["status_str"] == "success"
    now = children(server)
    assert now[0] == before[0] and now[1] != before[1]
    assert server.get("/queue/all", counts=1)["queues"][1]["restarts"] == restarts + 1
    assert "[GPU 1] Process worker died" in server.log()

    # a child that dies between prompts is replaced at once, before anything asks for it
    os.kill(now[0], signal.SIGKILL)
    deadline = time.time() + 90
    while children(server)[0] == now[0] or not server.get("/queue/all", counts=1)["queues"][0]["process"]["alive"]:
        assert time.time() < deadline, "the idle child was not replaced"
        time.sleep(0.5)
    assert "[GPU 0] Process worker died (exit code -9); starting a new one" in server.log()


def test_kill_9_of_the_main_process_takes_its_children_and_leaves_no_shared_memory(own_servers, fixtures_dir):
    server = own_servers("process-crash", workers=2, env={"COMFY_MULTIGPU_WORKER_MODE": "process"})
    answer = server.post("/preload", {"model": "tiny-sd15.safetensors", "type": "checkpoint", "gpus": [1]})
    assert answer["gpus"] == {"1": "on_device"}, answer
    ids = [server.submit(wf.txt2img(i, prefix=f"crash{i}", lora=0.5 * i), gpu=i)["prompt_id"] for i in (0, 1)]
    done = server.wait(ids, timeout=180)
    assert all(e["status"]["status_str"] == "success" for e in done.values())

    # read from disk once, by one process; both children map it; counted once in PSS
    listed = server.get("/multigpu/models")
    (model,) = [m for m in listed["models"] if m["name"] == "tiny-sd15.safetensors"]
    assert model["loads"] == 1 and model["users"] == [0, 1], model
    (lora,) = [m for m in listed["models"] if m["type"] == "lora"]         # the LoRA file: shared too
    assert lora["loads"] == 1 and lora["users"] == [1], lora
    pids = children(server)
    main = server.proc.pid
    mapped = {gpu: segment_pss(pid, main) for gpu, pid in pids.items()}
    rss_max = max(r for r, _ in mapped.values())
    pss_sum = sum(p for _, p in mapped.values())
    print(f"\nshared checkpoint ({model['bytes'] / 2 ** 20:.0f} MiB) per child (Rss, Pss) MiB: "
          + ", ".join(f"GPU {g}: {r / 2 ** 20:.0f}, {p / 2 ** 20:.0f}" for g, (r, p) in mapped.items()))
    assert all(r > 0.5 * model["bytes"] for r, _ in mapped.values()), mapped
    assert pss_sum < 1.2 * rss_max, mapped           # the pages both map are counted once, not twice
    assert not list(SHM.glob(f"comfy-multigpu-{main}-*"))      # only descriptors hold segments

    stale = SHM / "comfy-multigpu-999999999-1-checkpoint"       # what a crash of an older build left
    stale.write_bytes(b"x")
    os.kill(main, signal.SIGKILL)                               # the main process only, not its group
    assert wait_gone(list(pids.values())) == [], "children outlived their main process"
    server.proc.wait(15)
    assert not list(SHM.glob(f"comfy-multigpu-{main}-*"))
    server.log_file.close()
    server.start()
    assert not stale.exists() and "removed 1 shared-memory segment(s)" in server.log()
    pid = server.submit(wf.txt2img(3, prefix="after-crash"), gpu=1)["prompt_id"]
    assert server.wait(pid, timeout=180)[pid]["status"]["status_str"] == "success"
    pids = children(server)
    server.stop()                                               # SIGTERM: drain, then a clean exit
    assert server.proc.returncode == 0
    assert wait_gone(list(pids.values())) == [], "children outlived a clean stop"
    assert not list(SHM.glob(f"comfy-multigpu-{server.proc.pid}-*"))


def test_a_sequence_parallel_prompt_runs_on_one_gpu_and_says_why(multi2_process):
    pid = multi2_process.submit(wf.flux(2))["prompt_id"]
    entry = multi2_process.wait(pid, timeout=120)[pid]
    assert entry["status"]["status_str"] == "success" and "gpu_ids" not in entry
    assert "process workers own one GPU each" in entry["sequence_parallel"]["fallback"]
