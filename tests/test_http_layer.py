"""The HTTP layer in this process (aiohttp's test client, no ComfyUI): our middleware and routes over a
real pool and scheduler, with a stand-in for ComfyUI's own /prompt, /queue and /interrupt handlers
(the same calls server.py makes on its prompt_queue). Header and body errors are 400 JSON naming what
is valid and queue nothing; answers say where a prompt went; the /interrupt override is ours; a
prompt id sent twice is answered with the first; draining answers 503. End to end: test_api_contract.py."""
import pytest
import pytest_asyncio
from aiohttp import web

from comfy_multigpu.api import middleware, routes
from comfy_multigpu.host.prompt_queue import MultiQueue
from comfy_multigpu.runtime.pool import PoolOptions, WorkerPool

from helpers.fake_host import FakeHost, FakeServer

pytestmark = pytest.mark.asyncio

GRAPH = {"1": {"class_type": "EmptyImage", "inputs": {}}}


class StockHandlers:
    """What server.py's handlers do with the prompt queue (0.33.0: post_prompt numbers the prompt,
    puts the 6-tuple and answers prompt_id/number/node_errors; /interrupt interrupts everything)."""

    def __init__(self, queue):
        self.queue = queue
        self.number = 0
        self.interrupted_all = 0

    async def post_prompt(self, request):
        data = await request.json()
        number = self.number
        self.number += 1
        prompt_id = data.get("prompt_id", f"id{number}")
        self.queue.put((number, prompt_id, data["prompt"], data.get("extra_data", {}), ["1"], {}))
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": {}})

    async def get_queue(self, request):
        running, pending = self.queue.get_current_queue_volatile()
        return web.json_response({"queue_running": [list(i[:2]) for i in running],
                                  "queue_pending": [list(i[:2]) for i in pending]})

    async def post_interrupt(self, request):
        self.interrupted_all += 1
        return web.Response()


@pytest.fixture
def pool():
    pool = WorkerPool([("cpu", "cpu")] * 2, PoolOptions(), host=FakeHost())
    for w in pool.workers:          # not started: prompts stay queued where they were put
        w.started.set()
        w.up = True
    return pool


@pytest_asyncio.fixture
async def client(aiohttp_client, pool):
    queue = MultiQueue(pool, FakeServer())
    stock = StockHandlers(queue)
    app = web.Application(middlewares=[middleware.make_middleware(queue, routes.OVERRIDES)])
    table = web.RouteTableDef()
    table.post("/prompt")(stock.post_prompt)
    table.get("/queue")(stock.get_queue)
    table.post("/interrupt")(stock.post_interrupt)
    routes.add_routes(table, queue)
    app.add_routes(table)
    c = await aiohttp_client(app)
    c.stock = stock
    return c


async def test_a_pinned_prompt_is_answered_with_its_gpu_and_queued_there(client, pool):
    r = await client.post("/prompt", json={"prompt": GRAPH}, headers={"X-TARGET-GPU": "1"})
    assert r.status == 200
    body = await r.json()
    assert body["gpu_id"] == 1 and body["number"] == 0
    assert pool.scheduler.locate(body["prompt_id"]) == ("queued", 1, 0)
    r = await client.get("/queue", headers={"X-TARGET-GPU": "1"})
    assert (await r.json())["gpu_id"] == 1


async def test_a_bad_target_header_is_a_400_naming_the_valid_gpus_and_queues_nothing(client, pool):
    r = await client.post("/prompt", json={"prompt": GRAPH}, headers={"X-TARGET-GPU": "7"})
    assert r.status == 400
    body = await r.json()
    assert "0" in str(body) and "1" in str(body)
    assert pool.scheduler.tasks_remaining() == 0 and client.stock.number == 0


async def test_a_bad_pool_or_priority_header_is_refused_before_the_body_is_read(client, pool):
    for header in ({"X-GPU-POOL": "nope"}, {"X-PRIORITY": "urgent"}):
        r = await client.post("/prompt", data=b"not json at all", headers=header)
        assert r.status == 400, header
    assert pool.scheduler.tasks_remaining() == 0


async def test_a_malformed_body_is_a_400_json_error(client, pool):
    r = await client.post("/prompt", data=b"{", headers={"Content-Type": "application/json"})
    assert r.status == 400
    assert "error" in await r.json()


async def test_the_same_prompt_id_twice_is_answered_with_the_first(client, pool):
    first = await (await client.post("/prompt", json={"prompt": GRAPH, "prompt_id": "same"})).json()
    again = await client.post("/prompt", json={"prompt": GRAPH, "prompt_id": "same"})
    assert again.status == 200
    body = await again.json()
    assert body["duplicate"] is True and body["gpu_id"] == first["gpu_id"]
    assert pool.scheduler.tasks_remaining() == 1


async def test_interrupt_is_answered_by_our_override_not_the_stock_handler(client, pool):
    r = await client.post("/interrupt", json={"prompt_id": "not-running"})
    assert r.status == 200
    r = await client.post("/api/interrupt", json={})
    assert r.status == 200
    assert client.stock.interrupted_all == 0


async def test_while_draining_a_prompt_gets_503_and_readiness_turns_503(client, pool):
    pool.scheduler.start_draining()
    r = await client.post("/prompt", json={"prompt": GRAPH})
    assert r.status == 503 and "Retry-After" in r.headers
    assert (await client.get("/multigpu/ready")).status == 503
    assert pool.scheduler.tasks_remaining() == 0


async def test_queue_all_reports_every_gpu_and_refuses_a_bad_query(client, pool):
    await client.post("/prompt", json={"prompt": GRAPH}, headers={"X-TARGET-GPU": "0"})
    body = await (await client.get("/queue/all")).json()
    assert [q["pending_count"] for q in body["queues"]] == [1, 0]
    assert body["queues"][0]["queue_pending"][0][1] == "id0"
    assert (await client.get("/queue/all?counts=maybe")).status == 400
