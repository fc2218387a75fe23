"""pytest plugin for running ComfyUI's own tests/execution against comfy-multigpu.

With COMFY_MULTIGPU_TEST_PIN=<n> every HTTP request and WebSocket the host's tests make carries
X-TARGET-GPU: <n>. Either way, the gpu_id of every POST /prompt answer is recorded and written as
JSON to COMFY_MULTIGPU_TEST_REPORT at the end, so the caller can check where the prompts ran.
"""
import io
import json
import os
import urllib.request

PIN = os.environ.get("COMFY_MULTIGPU_TEST_PIN")
REPORT = os.environ.get("COMFY_MULTIGPU_TEST_REPORT")
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


def pytest_configure(config):
    urllib.request.urlopen = urlopen
    if PIN is not None:
        import websocket
        connect = websocket.WebSocket.connect

        def pinned_connect(self, url, **options):
            options["header"] = list(options.get("header") or []) + [f"X-TARGET-GPU: {PIN}"]
            return connect(self, url, **options)
        websocket.WebSocket.connect = pinned_connect


def pytest_unconfigure(config):
    if REPORT:
        with open(REPORT, "w") as f:
            json.dump(placements, f)
