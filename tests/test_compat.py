"""The same scripted client run against stock ComfyUI (extension off) and ComfyUI with the extension
(2 workers) gives the same transcript: status codes, response shapes, WebSocket event sequence,
outputs and images. It covers every stock route the issue names."""
import hashlib
import io
import json
import uuid

from PIL import Image

from comfy_multigpu.host import sp_nodes, xdit_nodes
from helpers import workflows as wf
from helpers import ws
from helpers.comfy_server import HttpError


def shape(value):
    """A JSON value's structure: dict keys and value types, lists by their first element."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f'Content-Type: image/png\r\n\r\n'.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def png(color) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (8, 8), color).save(out, format="PNG")
    return out.getvalue()


def call(server, method, path, **kw):
    try:
        return 200, server.request(method, path, **kw)
    except HttpError as ex:
        return ex.status, ex.body


def scripted_client(server) -> list:
    t = []
    stats = server.get("/system_stats")
    t.append(("system_stats", shape(stats["system"]), shape(stats["devices"]), len(stats["devices"])))
    info = server.get("/object_info")
    # the extension's own nodes (SequenceParallel, the XDiT drop-ins) are added, as any node pack's are
    ours = set(sp_nodes.NODE_CLASS_MAPPINGS) | set(xdit_nodes.NODE_CLASS_MAPPINGS)
    t.append(("object_info", len(set(info) - ours), "KSampler" in info, shape(info["SaveImage"])))
    t.append(("object_info/KSampler", server.get("/object_info/KSampler")))
    t.append(("features", shape(server.get("/features"))))
    t.append(("models", server.get("/models/checkpoints")))
    body, ctype = multipart({"overwrite": "true"}, {"image": ("compat.png", png((200, 10, 10, 255)))})
    t.append(("upload/image", server.request("POST", "/upload/image", raw=body, content_type=ctype)))
    body, ctype = multipart({"original_ref": json.dumps({"filename": "compat.png", "type": "input", "subfolder": ""})},
                            {"image": ("mask.png", png((0, 0, 0, 128)))})
    t.append(("upload/mask", server.request("POST", "/upload/mask", raw=body, content_type=ctype)))
    view = server.request("GET", "/view", filename="compat.png", type="input")
    t.append(("view", hashlib.sha256(view).hexdigest()))
    t.append(("view-missing", call(server, "GET", "/view", filename="nope.png", type="input")[0]))
    t.append(("userdata-write", call(server, "POST", "/userdata/compat.json", raw=b'{"a": 1}')[0]))
    t.append(("userdata-read", server.request("GET", "/userdata/compat.json")))
    t.append(("userdata-list", server.get("/userdata", dir=".")))
    client = ws.Client(uuid.uuid4().hex)
    ws.run(server.url, [(client, [(0.0, wf.txt2img(77, prefix="compat"))])], timeout=300)
    kinds = []
    for event in client.events:
        kind = event["type"]
        if kind in ("progress", "progress_state"):
            kind = "progress*"   # ComfyUI throttles progress to one per 100 ms: the count depends on timing
        if kind not in ("status", "feature_flags") and (not kinds or kinds[-1] != kind):
            kinds.append(kind)
    t.append(("ws-events", kinds))
    (pid,) = client.prompt_ids
    entry = server.get(f"/history/{pid}")[pid]
    t.append(("history", entry["status"]["status_str"], shape(entry["outputs"]), sorted(set(entry) - {"gpu_id"})))
    image = entry["outputs"]["7"]["images"][0]
    pixels = server.request("GET", "/view", filename=image["filename"], subfolder="", type="output")
    t.append(("output-pixels", hashlib.sha256(Image.open(io.BytesIO(pixels)).tobytes()).hexdigest()))
    t.append(("queue", server.get("/queue")))
    t.append(("prompt-info", server.get("/prompt")))
    t.append(("interrupt", call(server, "POST", "/interrupt", body={})[0]))
    t.append(("free", call(server, "POST", "/free", body={"unload_models": True})[0]))
    jobs = server.get("/api/jobs", limit=1)
    t.append(("jobs", shape(jobs["pagination"]), shape(jobs["jobs"][0])))
    t.append(("job", server.get(f"/api/jobs/{pid}")["status"]))
    t.append(("history-clear", call(server, "POST", "/history", body={"clear": True})[0], server.get("/history")))
    return t


def test_same_script_same_results_on_stock_and_on_the_extension(stock, multi2):
    stock_run = scripted_client(stock)
    multi_run = scripted_client(multi2)
    for a, b in zip(stock_run, multi_run, strict=True):
        assert a == b, f"differs at {a[0]}"


def test_stock_routes_answer_the_same_with_the_header(multi2):
    """Behind a per-GPU port every request carries X-TARGET-GPU; routes that are not about the
    queue must not change because of it."""
    pid = multi2.submit(wf.sleep(0.01, 3), gpu=1)["prompt_id"]
    multi2.wait(pid)
    body, ctype = multipart({"overwrite": "true"}, {"image": ("hdr.png", png((1, 2, 3, 255)))})
    uploaded = [multi2.request("POST", "/upload/image", raw=body, content_type=ctype, headers=h)
                for h in ({}, {"X-TARGET-GPU": "1"})]
    assert uploaded[0] == uploaded[1] == {"name": "hdr.png", "subfolder": "", "type": "input"}
    multi2.request("POST", "/userdata/hdr.json", raw=b'{"b": 2}')
    for path, query in (("/system_stats", {}), ("/object_info/KSampler", {}), (f"/history/{pid}", {}),
                        ("/history", {"max_items": 5}), (f"/api/jobs/{pid}", {}), ("/features", {}),
                        ("/models/checkpoints", {}), ("/userdata/hdr.json", {}), ("/userdata", {"dir": "."}),
                        ("/view", {"filename": "hdr.png", "type": "input"}), ("/embeddings", {})):
        plain = multi2.get(path, **query)
        pinned = multi2.get(path, headers={"X-TARGET-GPU": "1"}, **query)
        if path == "/system_stats":      # free memory is a live reading: it may move between two calls
            for stats in (plain, pinned):
                stats["system"].pop("ram_free")
                for device in stats["devices"]:
                    for key in ("vram_free", "torch_vram_free"):
                        device.pop(key, None)
        assert plain == pinned, path
