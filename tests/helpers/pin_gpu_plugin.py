"""pytest plugin for running ComfyUI's own tests/execution against comfy-multigpu.

With COMFY_MULTIGPU_TEST_PIN=<n> every HTTP request and WebSocket the host's tests make carries
X-TARGET-GPU: <n>. Either way, the gpu_id of every POST /prompt answer is recorded and written as
JSON to COMFY_MULTIGPU_TEST_REPORT at the end, so the caller can check where the prompts ran.

With COMFY_MULTIGPU_TEST_SECOND_MACHINE=<dir> (and COMFY_MULTIGPU_FLEET set), every ComfyUI server the
host's tests start gets a twin: a second fleet member ("b") with the same arguments on another port,
started and killed with it, so the tests talk to machine "a" of a two-machine fleet whose machines
run the same configuration (the host's tests restart their server with other cache settings).
"""
import io
import json
import os
import socket
import subprocess
import urllib.request

PIN = os.environ.get("COMFY_MULTIGPU_TEST_PIN")
REPORT = os.environ.get("COMFY_MULTIGPU_TEST_REPORT")
SECOND = os.environ.get("COMFY_MULTIGPU_TEST_SECOND_MACHINE")
_popen = subprocess.Popen
_twins = 0
_nodes: dict = {}          # machine -> prompts it ran (fleet history entries), over every server start
placements = []
_urlopen = urllib.request.urlopen


class _Answer(io.BytesIO):
    def __init__(self, data, original):
        super().__init__(data)
        self.status = original.status
        self.headers = original.headers

    def getcode(self):
        return self.status


def urlopen(url, *args, **kwargs):
    req = url if isinstance(url, urllib.request.Request) else urllib.request.Request(url)
    if PIN is not None:
        req.add_header("X-TARGET-GPU", PIN)
    resp = _urlopen(req, *args, **kwargs)
    if req.full_url.endswith("/prompt") and req.data is not None:
        data = resp.read()
        try:
            placements.append(json.loads(data).get("gpu_id"))
        except ValueError:
            pass
        return _Answer(data, resp)
    return resp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tally_and_flush(flush: bool = True) -> None:
    """Count the fleet's history entries by the machine that ran them (nodes.json), then empty it."""
    import redis
    client = redis.Redis.from_url(os.environ["COMFY_MULTIGPU_FLEET"])
    for key in client.scan_iter(match="cmg:hist:*", count=500):
        value = client.get(key)
        if value:
            node = json.loads(value).get("node")
            _nodes[node] = _nodes.get(node, 0) + 1
    if flush:
        client.flushdb()
    with open(os.path.join(SECOND, "nodes.json"), "w") as f:
        json.dump(_nodes, f)


def popen(args, *rest, **kwargs):
    """subprocess.Popen; a ComfyUI server (main.py) also starts its twin, machine "b" of the fleet."""
    global _twins
    if not isinstance(args, (list, tuple)) or "main.py" not in [str(a) for a in args] or "--port" not in args:
        return _popen(args, *rest, **kwargs)
    # A fresh fleet for every server the host's tests start: they expect each start to begin with an
    # empty history, as stock's memory-only queue does (the fleet's history outlives its machines).
    _tally_and_flush()
    proc = _popen(args, *rest, **kwargs)
    _twins += 1
    twin_args = [str(a) for a in args]
    twin_args[twin_args.index("--port") + 1] = str(_free_port())
    twin_args += ["--database-url", f"sqlite:///{SECOND}/twin-{_twins}.db"]
    env = dict(kwargs.get("env") or os.environ, COMFY_MULTIGPU_NODE_NAME="b")
    log = open(os.path.join(SECOND, f"twin-{_twins}.log"), "w")
    twin = _popen(twin_args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=kwargs.get("cwd"))
    kill = proc.kill

    def kill_both():
        kill()
        twin.kill()
        twin.wait()
        log.close()
    proc.kill = kill_both
    return proc


def pytest_configure(config):
    urllib.request.urlopen = urlopen
    if SECOND:
        subprocess.Popen = popen
    if PIN is not None:
        import websocket
        connect = websocket.WebSocket.connect

        def pinned_connect(self, url, **options):
            options["header"] = list(options.get("header") or []) + [f"X-TARGET-GPU: {PIN}"]
            return connect(self, url, **options)
        websocket.WebSocket.connect = pinned_connect


def pytest_unconfigure(config):
    if SECOND:
        _tally_and_flush(flush=False)
    if REPORT:
        with open(REPORT, "w") as f:
            json.dump(placements, f)
