"""A WebSocket opened with X-TARGET-GPU (a per-GPU port behind Nginx) gets `status` with that GPU's
queue count; a plain one gets the whole server's count, as on stock ComfyUI."""
import asyncio
import json

import aiohttp
import pytest

from helpers import workflows as wf


@pytest.fixture
def multi2(multi2_modes):
    """Every test here on thread workers and on process workers (COMFY_MULTIGPU_WORKER_MODE)."""
    return multi2_modes


async def last_status_counts(base_url, server):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{base_url}/ws?clientId=gpu1view", headers={"X-TARGET-GPU": "1"}) as on_gpu1, \
                session.ws_connect(f"{base_url}/ws?clientId=plainview") as plain:
            first = [json.loads((await ws.receive()).data) for ws in (on_gpu1, plain)]
            blocker = await asyncio.to_thread(server.submit, wf.sleep(30, 1), 0)
            await asyncio.to_thread(server.wait_running, blocker["prompt_id"])
            pending = [await asyncio.to_thread(server.submit, wf.sleep(0.01, i), 0) for i in range(2)]
            counts = {}
            for name, sock in (("gpu1", on_gpu1), ("plain", plain)):
                while True:
                    msg = json.loads((await asyncio.wait_for(sock.receive(), 10)).data)
                    if msg["type"] == "status":
                        counts[name] = msg["data"]["status"]["exec_info"]["queue_remaining"]
                        if name == "gpu1" or counts[name] == 3:
                            break
            await asyncio.to_thread(server.post, "/interrupt", {"prompt_id": blocker["prompt_id"]})
            await asyncio.to_thread(server.wait, [blocker["prompt_id"]] + [p["prompt_id"] for p in pending])
            return first, counts


def test_per_gpu_socket_sees_its_gpus_queue_count(multi2):
    first, counts = asyncio.run(last_status_counts(multi2.url, multi2))
    assert [m["type"] for m in first] == ["status", "status"]
    assert first[0]["data"]["sid"] == "gpu1view"
    assert counts == {"gpu1": 0, "plain": 3}


async def reconnect_mid_prompt(base_url, server):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{base_url}/ws?clientId=comesback") as first:
            await first.receive()
            pid = (await asyncio.to_thread(server.submit, wf.sleep(3.0, 5), 1, "comesback"))["prompt_id"]
            while True:                  # mid-prompt: its node runs (in a process worker's child, too)
                msg = await asyncio.wait_for(first.receive(), 30)
                event = json.loads(msg.data) if msg.type == aiohttp.WSMsgType.TEXT else {}
                if event.get("type") == "executing" and event["data"].get("node") == "1":
                    break
        async with session.ws_connect(f"{base_url}/ws?clientId=comesback") as again:
            messages = [json.loads((await asyncio.wait_for(again.receive(), 5)).data) for _ in range(2)]
        await asyncio.to_thread(server.post, "/interrupt", {"prompt_id": pid})
        await asyncio.to_thread(server.wait, pid)
        return messages


def test_a_client_reconnecting_mid_prompt_is_told_the_running_node(multi2):
    status, executing = asyncio.run(reconnect_mid_prompt(multi2.url, multi2))
    assert status["type"] == "status"
    assert executing == {"type": "executing", "data": {"node": "1"}}
