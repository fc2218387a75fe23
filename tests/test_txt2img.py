"""A real txt2img (CheckpointLoaderSimple -> CLIPTextEncode -> KSampler -> VAEDecode -> SaveImage) on the
generated tiny SD1.5 checkpoint: the same seed gives the same pixels on every worker, while both
workers sample at once, and the same pixels as stock ComfyUI."""
import io

import numpy as np
from PIL import Image

from helpers import workflows as wf


def pixels(server, entry, node="7"):
    image = entry["outputs"][node]["images"][0]
    data = server.request("GET", "/view", filename=image["filename"], subfolder=image["subfolder"],
                          type=image["type"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_same_seed_same_image_on_every_worker_and_on_stock(multi2, stock):
    ids = {gpu: multi2.submit(wf.txt2img(1234, prefix=f"t2i{gpu}", steps=6), gpu=gpu)["prompt_id"] for gpu in (0, 1)}
    done = multi2.wait(list(ids.values()), timeout=300)
    stock_id = stock.submit(wf.txt2img(1234, prefix="t2istock", steps=6))["prompt_id"]
    stock_entry = stock.wait(stock_id, timeout=300)[stock_id]
    images = [pixels(multi2, done[ids[0]]), pixels(multi2, done[ids[1]]), pixels(stock, stock_entry)]
    assert images[0].shape == (64, 64, 3) and images[0].std() > 0
    assert (images[0] == images[1]).all() and (images[0] == images[2]).all()
    assert done[ids[0]]["gpu_id"] == 0 and done[ids[1]]["gpu_id"] == 1


def test_different_seeds_give_different_images(multi2):
    ids = [multi2.submit(wf.txt2img(seed, prefix="seeds"), gpu=seed % 2)["prompt_id"] for seed in (1, 2)]
    done = multi2.wait(ids, timeout=300)
    assert not (pixels(multi2, done[ids[0]]) == pixels(multi2, done[ids[1]])).all()
