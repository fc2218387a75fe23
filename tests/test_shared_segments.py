"""Model objects shared between processes through one RAM file (runtime/shared_segments.py): the pinned
ComfyUI's checkpoint tuple and LoRA come back equal and compute the same bits, their tensors live in the
copy-on-write mapping, two processes hold the pages once, views and odd tensors keep their shape, what
cannot be published is refused by name without leaving a file, and stale segments are cleaned up.

ComfyUI is imported in this process (appended to sys.path, argv swapped only for its argument parsing)."""
import inspect
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from comfy_multigpu.runtime.shared_segments import (
    SEGMENT_PREFIX, Published, SegmentError, attach, mapped_bytes, publish, remove, remove_owned,
    remove_stale, segment_dir, segment_path,
)

REPO = Path(__file__).resolve().parent.parent
NEVER_A_PID = 4194304 + 7          # above Linux's PID_MAX_LIMIT: no process ever has it


def checksum(parts) -> int:
    """crc32 of every tensor (name and bytes) of a checkpoint tuple's MODEL, CLIP and VAE."""
    import zlib
    import torch
    crc = 0
    for module in (parts[0].model, parts[1].cond_stage_model, parts[2].first_stage_model):
        for name, t in sorted(module.state_dict().items()):
            crc = zlib.crc32(name.encode(), crc)
            crc = zlib.crc32(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
    return crc


CHILD = textwrap.dedent("""
    import sys
    comfyui_dir, blob_file, segment = sys.argv[1:4]
    sys.path.append(comfyui_dir)
    sys.argv = ["main.py", "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    from comfy_multigpu.runtime.shared_segments import attach
    """) + textwrap.dedent(inspect.getsource(checksum)) + textwrap.dedent("""
    parts = attach(open(blob_file, "rb").read(), segment)
    print(checksum(parts), flush=True)
    sys.stdin.read()                 # hold the mapping until the parent has measured it
    """)


def mapped_ranges(path: str) -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].strip() == path:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((start, end))
    return ranges


@pytest.fixture(scope="module")
def host(comfyui_dir):
    """The pinned ComfyUI's comfy package, imported here with --cpu."""
    from helpers.comfy_import import import_comfy
    return import_comfy(comfyui_dir, "comfy.sd", "comfy.utils")


@pytest.fixture(scope="module")
def new_path():
    """Segment paths named with this pid; every one is removed when the module is done."""
    made = []

    def make(name: str) -> str:
        made.append(segment_path(os.getpid(), f"test-{name}-{uuid.uuid4().hex[:8]}"))
        return made[-1]
    yield make
    for path in made:
        remove(path)


@pytest.fixture(scope="module")
def checkpoint(host, fixtures_dir):
    return host.sd.load_checkpoint_guess_config(str(fixtures_dir / "tiny-sd15.safetensors"), output_vae=True,
                                                output_clip=True, embedding_directory=[])


@pytest.fixture(scope="module")
def published(checkpoint, new_path) -> tuple[str, Published]:
    path = new_path("checkpoint")
    return path, publish(checkpoint, path)


@pytest.fixture(scope="module")
def attached(published):
    return attach(published[1].blob, published[0])


def parts_of(ckpt):
    return {"MODEL": ckpt[0].model, "CLIP": ckpt[1].cond_stage_model, "VAE": ckpt[2].first_stage_model}


def test_a_checkpoint_tuple_comes_back_with_every_tensor_and_dtype(checkpoint, published, attached):
    path, pub = published
    assert [type(x) for x in attached] == [type(x) for x in checkpoint]
    config, original = attached[0].model.model_config, checkpoint[0].model.model_config
    assert vars(config).keys() == vars(original).keys()     # its class answers every name with None
    assert config.unet_config == original.unet_config
    assert type(config.latent_format) is type(original.latent_format)
    assert pub.tensors > 500 and 0 <= os.path.getsize(path) - pub.nbytes < 64 * pub.tensors
    for part, module in parts_of(checkpoint).items():
        want, got = module.state_dict(), parts_of(attached)[part].state_dict()
        assert list(got) == list(want), part
        for name, t in want.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), f"{part} {name}"


def test_the_attached_diffusion_model_computes_the_same_bits(checkpoint, attached):
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
    timesteps = torch.tensor([10.0])
    with torch.no_grad():
        want = checkpoint[0].model.diffusion_model(x, timesteps, context)
        got = attached[0].model.diffusion_model(x, timesteps, context)
    assert torch.equal(got, want)


def test_attached_tensors_live_in_the_mapping_of_the_file(published, attached):
    path, pub = published
    ranges = mapped_ranges(path)
    assert ranges, f"{path} is not mapped"
    tensors = [t for m in parts_of(attached).values() for t in m.state_dict().values() if t.numel()]
    assert all(any(lo <= t.data_ptr() < hi for lo, hi in ranges) for t in tensors)
    checksum(attached)                                  # touch every page
    rss, _ = mapped_bytes(path)
    assert rss >= 0.9 * pub.nbytes


def test_a_write_into_an_attached_tensor_stays_private(checkpoint, published):
    path, pub = published
    mine = attach(pub.blob, path)
    name, weight = next(iter(mine[0].model.diffusion_model.named_parameters()))
    original = dict(checkpoint[0].model.diffusion_model.named_parameters())[name].detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
    again = dict(attach(pub.blob, path)[0].model.diffusion_model.named_parameters())[name]
    assert torch.equal(again, original) and not torch.equal(weight, original)


def test_a_lora_state_dict_round_trips(host, fixtures_dir, new_path):
    lora = host.utils.load_torch_file(str(fixtures_dir / "tiny-sd15-lora.safetensors"))
    path = new_path("lora")
    got = attach(publish(lora, path).blob, path)
    assert got.keys() == lora.keys()
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in lora.items())


def test_views_of_one_storage_come_back_over_one_storage(new_path):
    base = torch.arange(100, dtype=torch.float32)
    obj = {"base": base, "slice": base[10:20], "column": base.view(10, 10).t()[3], "again": base}
    path = new_path("views")
    pub = publish(obj, path)
    got = attach(pub.blob, path)
    assert pub.nbytes == 400 and pub.tensors == 3              # "again" is the same object as "base"
    assert got["again"] is got["base"]
    assert len({t.untyped_storage().data_ptr() for t in got.values()}) == 1
    for k, t in obj.items():
        assert (got[k].storage_offset(), got[k].stride()) == (t.storage_offset(), t.stride())
        assert torch.equal(got[k], t)
    got["base"][13] = -1.0
    assert got["slice"][3] == -1.0 and got["column"][1] == -1.0


def test_zero_size_bf16_and_parameter_tensors_round_trip(new_path):
    big = torch.ones(6)
    linear = torch.nn.Linear(3, 2)
    tagged = torch.zeros(2)
    tagged.comfy_tag = "kept"
    obj = {"empty": torch.empty(0, 3), "empty_view": big[2:2], "bf16": torch.randn(5, 7).bfloat16(),
           "ints": torch.arange(5), "scalar": torch.tensor(4.0).half(), "linear": linear, "tagged": tagged}
    path = new_path("odd")
    got = attach(publish(obj, path).blob, path)
    for k in ("empty", "empty_view", "bf16", "ints", "scalar", "tagged"):
        assert (got[k].dtype, got[k].shape) == (obj[k].dtype, obj[k].shape) and torch.equal(got[k], obj[k]), k
    assert isinstance(got["linear"].weight, torch.nn.Parameter) and got["linear"].weight.requires_grad
    assert torch.equal(got["linear"].weight, linear.weight)
    assert got["tagged"].comfy_tag == "kept"


class Marked(torch.Tensor):
    pass


@pytest.mark.parametrize("make, named", [
    (lambda: {"model": torch.nn.Linear(2, 2, device="meta")}, "['model'].weight"),
    (lambda: {"q": torch.Tensor._make_subclass(Marked, torch.zeros(3))}, "['q']"),
], ids=["meta-parameter", "tensor-subclass"])
def test_an_unpublishable_tensor_is_named_and_leaves_no_file(make, named, new_path):
    path = new_path("refused")
    with pytest.raises(SegmentError, match="cannot publish") as refused:
        publish(make(), path)
    assert named in str(refused.value)
    assert not os.path.exists(path)


def test_publish_never_replaces_an_existing_segment(new_path):
    path = new_path("taken")
    publish({"a": torch.ones(2)}, path)
    with pytest.raises(FileExistsError):
        publish({"a": torch.zeros(2)}, path)
    assert os.path.getsize(path) == 8


def test_attach_of_a_removed_segment_raises_file_not_found(new_path):
    path = new_path("gone")
    pub = publish({"a": torch.ones(2)}, path)
    assert remove(path) and not remove(path)
    with pytest.raises(FileNotFoundError):
        attach(pub.blob, path)


def test_segment_names_are_checked():
    assert segment_path(12, "ckpt-1.a_b") == f"{segment_dir()}/{SEGMENT_PREFIX}12-ckpt-1.a_b"
    for bad in ("", "a/b", "../x", "a b"):
        with pytest.raises(ValueError):
            segment_path(12, bad)


def test_remove_stale_takes_dead_owners_only_and_remove_owned_one_owner(new_path):
    live = new_path("live")
    dead = [segment_path(NEVER_A_PID, f"test-{n}-{uuid.uuid4().hex[:8]}") for n in ("a", "b")]
    other = segment_path(NEVER_A_PID + 1, f"test-c-{uuid.uuid4().hex[:8]}")
    try:
        for path in [live, *dead, other]:
            Path(path).write_bytes(b"x")
        assert sorted(remove_owned(NEVER_A_PID)) == sorted(dead)
        assert os.path.exists(other) and os.path.exists(live)
        assert other in remove_stale() and not os.path.exists(other)
        assert os.path.exists(live)
    finally:
        for path in [*dead, other]:
            remove(path)


def test_two_processes_attach_the_same_bytes_and_share_the_pages(checkpoint, comfyui_dir, new_path, tmp_path):
    path = new_path("children")                 # this process never maps it: only the children count
    pub = publish(checkpoint, path)
    (tmp_path / "blob").write_bytes(pub.blob)
    logs = [tmp_path / f"child{i}.log" for i in range(2)]
    command = [sys.executable, "-c", CHILD, str(comfyui_dir), str(tmp_path / "blob"), path]
    children = []
    for log in logs:
        with log.open("w") as stderr:
            children.append(subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=stderr, text=True))
    try:
        sums = [child.stdout.readline().strip() for child in children]
        assert all(sums), [log.read_text()[-3000:] for log in logs]
        assert sums == [str(checksum(checkpoint))] * 2
        for child in children:
            rss, pss = mapped_bytes(path, child.pid)
            assert rss >= 0.9 * pub.nbytes and 0.4 <= pss / rss <= 0.6, (rss, pss)
    finally:
        for child in children:
            child.stdin.close()
            child.wait(timeout=30)
            child.stdout.close()
