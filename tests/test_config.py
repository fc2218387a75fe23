"""Device resolution rules (comfy_multigpu.policy.config): a table of environments and machines, no threads."""
import pytest

from comfy_multigpu.policy.config import ConfigError, cuda_count_without_torch, resolve_settings

CASES = [
    # env, cuda visible, --cpu, enabled, devices
    ({}, 0, False, False, ("cpu",)),
    ({}, 1, False, False, ("cuda:0",)),
    ({}, 4, False, True, ("cuda:0", "cuda:1", "cuda:2", "cuda:3")),
    ({"COMFY_NUM_GPUS": "2"}, 0, False, True, ("cpu", "cpu")),
    ({"COMFY_NUM_GPUS": "2"}, 4, False, True, ("cuda:0", "cuda:1")),
    ({"COMFY_NUM_GPUS": "3"}, 4, True, True, ("cpu", "cpu", "cpu")),         # --cpu wins
    ({"COMFY_NUM_GPUS": "1", "COMFY_MULTI_GPU_SCHED": "1"}, 0, False, True, ("cpu",)),
    ({"COMFY_NUM_GPUS": "4", "COMFY_MULTI_GPU_SCHED": "0"}, 4, False, False, ()),
    ({"COMFY_MULTI_GPU_SCHED": "off"}, 8, False, False, ()),
    ({"COMFY_MULTIGPU_DEVICES": "cuda:0,cuda:0"}, 1, False, True, ("cuda:0", "cuda:0")),
    ({"COMFY_MULTIGPU_DEVICES": "cpu, cpu"}, 2, False, True, ("cpu", "cpu")),
    ({"COMFY_MULTIGPU_DEVICES": "cuda:1,cuda"}, 2, False, True, ("cuda:1", "cuda:0")),
    ({"COMFY_MULTIGPU_DEVICES": "cuda:1", "COMFY_MULTI_GPU_SCHED": "auto"}, 2, False, False, ("cuda:1",)),
]


@pytest.mark.parametrize("env, cuda, cpu, enabled, devices", CASES)
def test_resolution_table(env, cuda, cpu, enabled, devices):
    s = resolve_settings(env, cuda, cpu)
    assert (s.enabled, s.devices) == (enabled, devices)


ERRORS = [
    ({"COMFY_NUM_GPUS": "4"}, 2, False, "only 2 CUDA device"),               # never a silent smaller count
    ({"COMFY_NUM_GPUS": "0"}, 2, False, "whole number"),
    ({"COMFY_NUM_GPUS": "two"}, 2, False, "whole number"),
    ({"COMFY_MULTI_GPU_SCHED": "maybe"}, 2, False, "not understood"),
    ({"COMFY_MULTIGPU_DEVICES": "cuda:2"}, 2, False, "only 2 CUDA"),
    ({"COMFY_MULTIGPU_DEVICES": "cuda:0"}, 2, True, "--cpu"),
    ({"COMFY_MULTIGPU_DEVICES": "gpu0"}, 2, False, "not a device"),
    ({"COMFY_MULTIGPU_DEVICES": "cpu,cpu", "COMFY_NUM_GPUS": "3"}, 0, False, "disagrees"),
    ({"COMFY_MULTIGPU_GC_FREEZE": "later"}, 2, False, "GC_FREEZE=.later. is not understood"),
]


@pytest.mark.parametrize("env, cuda, cpu, fragment", ERRORS)
def test_bad_settings_are_errors_that_say_what_to_fix(env, cuda, cpu, fragment):
    with pytest.raises(ConfigError, match=fragment):
        resolve_settings(env, cuda, cpu)


@pytest.mark.parametrize("visible, present, expected", [
    (None, 4, 4), ("0,1", 4, 2), ("", 4, 0), ("2", 4, 1), ("0,-1,1", 4, 1), ("0,1,2,3,4,5", 2, 2),
])
def test_cuda_count_before_torch_import_follows_cuda_visible_devices(tmp_path, visible, present, expected):
    gpus = tmp_path / "driver" / "nvidia" / "gpus"
    gpus.mkdir(parents=True)
    for i in range(present):
        (gpus / f"0000:0{i}:00.0").mkdir()
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert cuda_count_without_torch(env, proc_root=str(tmp_path)) == expected


def test_no_nvidia_driver_means_no_cuda(tmp_path):
    assert cuda_count_without_torch({}, proc_root=str(tmp_path)) == 0


@pytest.mark.parametrize("env, pools, weights", [
    ({"COMFY_NUM_GPUS": "4"}, {"all": (0, 1, 2, 3)}, (1.0, 1.0, 1.0, 1.0)),
    ({"COMFY_NUM_GPUS": "4", "COMFY_MULTIGPU_POOLS": "fast=0,1;slow=2,3;vip=3"},
     {"fast": (0, 1), "slow": (2, 3), "vip": (3,), "all": (0, 1, 2, 3)}, (1.0,) * 4),
    ({"COMFY_NUM_GPUS": "4", "COMFY_MULTIGPU_POOLS": " Fast = 1, 0 ,1 ; default=0;"},
     {"fast": (0, 1), "default": (0,), "all": (0, 1, 2, 3)}, (1.0,) * 4),
    ({"COMFY_NUM_GPUS": "2", "COMFY_MULTIGPU_POOLS": "all=1"}, {"all": (1,)}, (1.0, 1.0)),
    ({"COMFY_NUM_GPUS": "3", "COMFY_MULTIGPU_GPU_WEIGHTS": "0:2, 2:0.5"}, {"all": (0, 1, 2)}, (2.0, 1.0, 0.5)),
])
def test_pools_and_weights(env, pools, weights):
    s = resolve_settings(env, 0, False)
    assert (dict(s.pools), s.weights) == (pools, weights)


@pytest.mark.parametrize("env, fragment", [
    ({"COMFY_MULTIGPU_POOLS": "fast=0,4"}, "GPU 4 does not exist"),
    ({"COMFY_MULTIGPU_POOLS": "fast"}, "not name=GPU,GPU"),
    ({"COMFY_MULTIGPU_POOLS": "fast=0;fast=1"}, "defined twice"),
    ({"COMFY_MULTIGPU_POOLS": "fast="}, "lists no GPU"),
    ({"COMFY_MULTIGPU_POOLS": "f ast=0"}, "not name=GPU,GPU"),
    ({"COMFY_MULTIGPU_POOLS": "fast=a"}, "not a GPU index"),
    ({"COMFY_MULTIGPU_GPU_WEIGHTS": "0:0"}, "must be a number above 0"),
    ({"COMFY_MULTIGPU_GPU_WEIGHTS": "0:nan"}, "must be a number above 0"),
    ({"COMFY_MULTIGPU_GPU_WEIGHTS": "0:fast"}, "must be a number above 0"),
    ({"COMFY_MULTIGPU_GPU_WEIGHTS": "0=2"}, "not GPU:weight"),
    ({"COMFY_MULTIGPU_GPU_WEIGHTS": "9:2"}, "GPU 9 does not exist"),
    ({"COMFY_MULTIGPU_GPU_WEIGHTS": "0:2,0:3"}, "listed twice"),
])
def test_bad_pools_and_weights_are_errors_that_say_what_to_fix(env, fragment):
    with pytest.raises(ConfigError, match=fragment):
        resolve_settings({"COMFY_NUM_GPUS": "4", **env}, 0, False)


def test_every_setting_is_documented_for_users():
    """Each environment variable config.py reads is in docs/configuration.md and the README's table."""
    from pathlib import Path
    from comfy_multigpu.policy import config
    repo = Path(__file__).resolve().parents[1]
    names = [value for key, value in vars(config).items() if key.startswith("ENV_")]
    assert len(names) >= 6
    for doc in ("docs/configuration.md", "README.md"):
        text = (repo / doc).read_text()
        assert [n for n in names if f"`{n}" not in text] == [], doc


@pytest.mark.parametrize("raw, expected", [(None, True), ("1", True), ("on", True), ("0", False), ("OFF", False)])
def test_gc_freeze_switch(raw, expected):
    env = {"COMFY_NUM_GPUS": "2"} | ({} if raw is None else {"COMFY_MULTIGPU_GC_FREEZE": raw})
    assert resolve_settings(env, 0, False).gc_freeze is expected
