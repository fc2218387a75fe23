"""Hostile input on every route the extension owns or changes (also /preload, /multigpu/models,
/metrics, /multigpu/state): 10,000 generated bodies, header values
and queries (hypothesis) sent by 8 concurrent clients to a real server. No answer is 5xx, none carries a
traceback, every refusal of ours is a JSON error naming its type; afterwards every worker is alive and
a canary prompt per GPU still completes."""
import concurrent.futures
import http.client
import json
import string
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import workflows as wf

TOTAL, CLIENTS = 10_000, 8
ROUTES = [("POST", "/prompt"), ("POST", "/api/prompt"), ("POST", "/queue"), ("GET", "/queue"),
          ("GET", "/queue/all"), ("POST", "/interrupt"), ("POST", "/free"), ("POST", "/history"),
          ("GET", "/prompt"), ("GET", "/multigpu/ready"), ("GET", "/api/queue/all"),
          ("POST", "/preload"), ("POST", "/api/preload"), ("GET", "/multigpu/models"), ("GET", "/metrics"),
          ("GET", "/multigpu/state")]

printable = st.text(alphabet=string.printable.replace("\r", "").replace("\n", "").replace("\x0b", "")
                    .replace("\x0c", ""), max_size=30)
scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
node = st.fixed_dictionaries({}, optional={
    "class_type": st.sampled_from(["EmptyImage", "SaveImage", "KSampler", "PrimitiveInt", "Nope"]) | json_values,
    "inputs": st.dictionaries(st.text(max_size=10), json_values, max_size=4) | json_values})
prompt_body = st.fixed_dictionaries({}, optional={
    "prompt": st.dictionaries(st.text(max_size=4), node | json_values, max_size=3) | json_values,
    "number": json_values, "front": json_values, "client_id": json_values,
    "prompt_id": st.uuids().map(str) | json_values, "partial_execution_targets": json_values,
    "extra_data": st.fixed_dictionaries({}, optional={"gpu_pool": json_values | st.sampled_from(["fast", "slow"]),
                                                      "priority": json_values | st.sampled_from(["high", "low"])})
    | json_values})
other_body = st.fixed_dictionaries({}, optional={
    "clear": json_values, "delete": st.lists(st.text(max_size=10), max_size=3) | json_values,
    "prompt_id": json_values, "unload_models": json_values, "free_memory": json_values})
preload_body = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["tiny-sd15.safetensors", "tiny-sd15-lora.safetensors", "nope", "", "../x"]) | json_values,
    "type": st.sampled_from(["checkpoint", "lora", "unet", "vae", "clip", "controlnet", "x"]) | json_values,
    "gpus": st.lists(st.integers(-3, 5), max_size=3) | json_values, "wait": json_values})
raw_body = st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())
header = st.sampled_from(["0", "1", "auto", "", "9", "-1", "1.0", "fast", "slow", "high", "LOW", "vip"]) | printable
requests = st.tuples(
    st.sampled_from(ROUTES),
    st.fixed_dictionaries({}, optional={"X-TARGET-GPU": header, "X-GPU-POOL": header, "X-PRIORITY": header,
                                        "X-SEQUENCE-PARALLEL": header}),
    st.one_of(prompt_body.map(lambda b: json.dumps(b).encode()), other_body.map(lambda b: json.dumps(b).encode()),
              preload_body.map(lambda b: json.dumps(b).encode()), raw_body),
    st.none() | st.sampled_from(["1", "0", "true", "x", "%00"]))


@pytest.fixture(scope="module", params=("thread", "process"))
def fuzzed(servers, request):
    """A 2-worker server with pools, on thread workers and on process workers in turn."""
    mode = {"COMFY_MULTIGPU_WORKER_MODE": request.param}
    server = servers.start(f"fuzz2-{request.param}", workers=2, env={"COMFY_MULTIGPU_POOLS": "fast=0;slow=1", **mode})
    yield server
    server.stop()


def _send(port: int, request) -> tuple:
    (method, path), headers, body, counts = request
    url = path + (f"?counts={counts}" if counts is not None and path.endswith("/all") else "")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, url, body=body if method == "POST" else None,
                     headers={"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", "replace")
        shaped = True
        if resp.status >= 400 and resp.getheader("Content-Type", "").startswith("application/json"):
            error = json.loads(text).get("error")
            shaped = isinstance(error, dict) and bool(error.get("type")) and "message" in error
        return method, path, headers, body[:200], resp.status, "Traceback" in text, shaped, text[:300]
    finally:
        conn.close()


def _check(seen):
    for method, path, headers, body, status, traceback, shaped, text in seen:
        where = f"{method} {path} {headers} {body!r} -> {status} {text[:200]}"
        assert status < 500, where
        assert not traceback, where
        assert shaped, where


def test_hostile_requests_never_get_a_5xx(fuzzed):
    """Hypothesis generates the requests; 8 client threads send them while it generates more."""
    futures = []
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as clients:
        @settings(max_examples=TOTAL, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(request=requests)
        def send(request):
            futures.append(clients.submit(_send, fuzzed.port, request))
            if len(futures) % 256 == 0:
                concurrent.futures.wait(futures[-256:-CLIENTS])     # keep the backlog bounded

        send()
        seen = [f.result() for f in futures]
    assert len(seen) == TOTAL
    _check(seen)
    statuses = Counter(item[4] for item in seen)
    print(f"\nfuzz: {len(seen)} requests, statuses {dict(sorted(statuses.items()))}")


def test_after_the_fuzzing_every_worker_is_alive_and_runs_a_canary(fuzzed):
    fuzzed.post("/queue", {"clear": True})
    state = fuzzed.get("/queue/all", counts=1)
    assert all(q["up"] and q["restarts"] == 0 for q in state["queues"])
    canaries = [fuzzed.submit(wf.sleep(0.05, g), gpu=g)["prompt_id"] for g in (0, 1)]
    done = fuzzed.wait(canaries, timeout=60)
    assert [done[p]["gpu_id"] for p in canaries] == [0, 1]
    assert all(done[p]["status"]["status_str"] == "success" for p in canaries)


def test_stock_comfyui_answers_some_of_the_same_requests_with_500(stock):
    """The twin of the test above: what it guards against (so it can fail)."""
    seen = []

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(request=requests.filter(lambda r: r[0] in ROUTES[:4] or r[0] in ROUTES[6:8]))
    def send(request):
        seen.append(_send(stock.port, request))

    send()
    failures = sum(1 for item in seen if item[4] >= 500)
    print(f"\nstock: {len(seen)} of the same kind of requests, {failures} answered with 5xx")
    assert failures > 10
