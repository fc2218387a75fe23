"""Every stock endpoint through every per-GPU port (Nginx), checking each lands on the port's GPU.

    python -m comfy_multigpu.tools.endpoint_check --host 127.0.0.1 --first-port 8181 --gpus 4 [--auto-port 8180]

Safe on a production server: it queues one tiny preview prompt per port, deletes and interrupts
only ids that do not exist, and uploads an 8x8 image named endpoint-check-<port>.png. Prints a table;
exit status 1 when any row fails. Needs aiohttp (the managed virtualenv has it).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Optional

import aiohttp

POLL_S = 0.25            # history polling stays well under the ports' 10 r/s limit


@dataclass
class Row:
    port: int
    gpu: Optional[int]
    endpoint: str
    ok: bool
    detail: str


def tiny_png(seed: int) -> bytes:
    """An 8x8 grey PNG, written without Pillow (zlib + struct)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + bytes([seed % 256]) * 8 for _ in range(8))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def preview_prompt(seed: int) -> dict:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": seed}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}


async def check_port(session: aiohttp.ClientSession, host: str, port: int, gpu: Optional[int],
                     timeout: float) -> list[Row]:
    base = f"http://{host}:{port}"
    rows: list[Row] = []

    def add(endpoint, ok, detail=""):
        rows.append(Row(port, gpu, endpoint, bool(ok), detail))

    def on_gpu(value):
        return gpu is None or value == gpu

    seed = port % 251
    async with session.post(f"{base}/prompt", json={"prompt": preview_prompt(seed)}) as r:
        answer = await r.json()
        add("POST /prompt", r.status == 200 and on_gpu(answer.get("gpu_id")), f"{r.status} gpu_id={answer.get('gpu_id')}")
    prompt_id = answer.get("prompt_id")
    async with session.get(f"{base}/queue") as r:
        q = await r.json()
        add("GET /queue", r.status == 200 and on_gpu(q.get("gpu_id")), f"{r.status} gpu_id={q.get('gpu_id')}")
    async with session.get(f"{base}/api/queue") as r:
        q = await r.json()
        add("GET /api/queue", r.status == 200 and on_gpu(q.get("gpu_id")), f"{r.status}")
    async with session.post(f"{base}/queue", json={"delete": [str(uuid.uuid4())]}) as r:
        add("POST /queue", r.status == 200, f"{r.status}")
    async with session.post(f"{base}/interrupt", json={"prompt_id": str(uuid.uuid4())}) as r:
        add("POST /interrupt", r.status == 200, f"{r.status}")
    entry, deadline = None, time.time() + timeout
    while prompt_id and entry is None and time.time() < deadline:
        async with session.get(f"{base}/history/{prompt_id}") as r:
            entry = (await r.json()).get(prompt_id) if r.status == 200 else None
        if entry is None:
            await asyncio.sleep(POLL_S)
    add("GET /history/{id}", entry is not None and on_gpu(entry.get("gpu_id"))
        and entry["status"]["status_str"] == "success",
        "not finished" if entry is None else f"ran on {entry.get('gpu_id')}, {entry['status']['status_str']}")
    name = f"endpoint-check-{port}.png"
    image = tiny_png(seed)
    form = aiohttp.FormData()
    form.add_field("image", io.BytesIO(image), filename=name, content_type="image/png")
    form.add_field("overwrite", "true")
    async with session.post(f"{base}/upload/image", data=form) as r:
        up = await r.json() if r.status == 200 else {}
        add("POST /upload/image", r.status == 200 and up.get("name") == name, f"{r.status}")
    form = aiohttp.FormData()
    form.add_field("image", io.BytesIO(tiny_png(0)), filename="mask.png", content_type="image/png")
    form.add_field("original_ref", json.dumps({"filename": name, "type": "input", "subfolder": ""}))
    async with session.post(f"{base}/upload/mask", data=form) as r:
        add("POST /upload/mask", r.status == 200, f"{r.status}")
    async with session.get(f"{base}/view", params={"filename": name, "type": "input"}) as r:
        body = await r.read()
        add("GET /view", r.status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n", f"{r.status} {len(body)} bytes")
    try:
        async with session.ws_connect(f"{base}/ws?clientId=endpoint-check-{port}") as ws:
            first = json.loads((await ws.receive(timeout=10)).data)
            add("GET /ws", first.get("type") == "status", f"first message {first.get('type')}")
    except (aiohttp.ClientError, asyncio.TimeoutError) as ex:
        add("GET /ws", False, f"{type(ex).__name__}: {ex}")
    return rows


async def run(host: str, ports: list[tuple[int, Optional[int]]], timeout: float) -> list[Row]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        results = []
        for port, gpu in ports:
            try:
                results += await check_port(session, host, port, gpu, timeout)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as ex:
                results.append(Row(port, gpu, "(port)", False, f"{type(ex).__name__}: {ex}"))
        return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--first-port", type=int, default=8181)
    p.add_argument("--gpus", type=int, default=4)
    p.add_argument("--auto-port", type=int, default=0, help="also check the automatic-placement port")
    p.add_argument("--timeout", type=float, default=60.0)
    opts = p.parse_args(argv)
    ports = [(opts.first_port + i, i) for i in range(opts.gpus)]
    if opts.auto_port:
        ports.insert(0, (opts.auto_port, None))
    rows = asyncio.run(run(opts.host, ports, opts.timeout))
    print(f"{'port':>5}  {'gpu':>4}  {'endpoint':<20} {'result':<6} detail")
    for r in rows:
        gpu = "auto" if r.gpu is None else str(r.gpu)
        print(f"{r.port:>5}  {gpu:>4}  {r.endpoint:<20} {'PASS' if r.ok else 'FAIL':<6} {r.detail}")
    failed = sum(not r.ok for r in rows)
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
