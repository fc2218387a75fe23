"""The README's tour as a newcomer follows it: the txt2img of its curl command (that JSON, with that
X-TARGET-GPU header) runs on GPU 1 with the smoke-test model and saves a PNG that /view serves, and
its /preload names the same model; scripts/make_smoke_model.sh writes that model (the tests' tiny
checkpoint, byte for byte, under its smoke-test name) and says that its images are noise."""
import hashlib
import io
import json
import re
import subprocess
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SMOKE = "smoke-test-random-sd15.safetensors"


def tour() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return text[text.index("## A five-minute tour"):text.index("## Configuration")]


def test_the_tours_txt2img_runs_on_gpu_1_and_its_png_is_served(multi2, fixtures_dir):
    command = r"curl -s -X POST localhost:8188/prompt -H '([^']*)'.*? -d '([^']*)'"
    header, body = re.search(command, tour(), re.S).groups()
    body = json.loads(body)
    assert header == "X-TARGET-GPU: 1"
    loaders = [n["inputs"]["ckpt_name"] for n in body["prompt"].values() if n["class_type"] == "CheckpointLoaderSimple"]
    assert loaders == [SMOKE]
    preload = json.loads(re.search(r"localhost:8188/preload -d '([^']*)'", tour()).group(1))
    assert preload["model"] == SMOKE
    # What the smoke-model script writes (the same bytes as the tests' checkpoint), in this server's folder.
    link = multi2.base / "models" / "checkpoints" / SMOKE
    if not link.exists():
        link.symlink_to(fixtures_dir / "tiny-sd15.safetensors")
    answer = multi2.post("/prompt", body, headers={"X-TARGET-GPU": "1"})
    assert answer["gpu_id"] == 1
    entry = multi2.wait(answer["prompt_id"], timeout=300)[answer["prompt_id"]]
    assert entry["status"]["status_str"] == "success" and entry["gpu_id"] == 1, entry["status"]
    (image,) = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    assert image["filename"].startswith("tour_") and image["type"] == "output"
    png = multi2.request("GET", "/view", filename=image["filename"], type="output")
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    assert (multi2.base / "output" / image["filename"]).is_file()
    ram_only = multi2.post("/preload", dict(preload, gpus=[]))          # the name resolves: no unknown_model
    assert ram_only["model"] == SMOKE and ram_only["ram"] == "loaded"


def test_the_smoke_model_script_writes_the_tiny_checkpoint_and_says_it_is_noise(fixtures_dir, tmp_path):
    out = subprocess.run([str(REPO / "scripts" / "make_smoke_model.sh"), str(tmp_path)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    written = tmp_path / SMOKE
    assert f"wrote {written}" in out.stdout and "RANDOM weights" in out.stdout and "noise" in out.stdout
    assert [p.name for p in tmp_path.iterdir()] == [SMOKE]
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (written, fixtures_dir / "tiny-sd15.safetensors")]
    assert digest[0] == digest[1]
    again = subprocess.run([str(REPO / "scripts" / "make_smoke_model.sh"), str(tmp_path)], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "already there" in again.stdout
