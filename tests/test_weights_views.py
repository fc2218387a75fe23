"""Views of a shared checkpoint with ComfyUI's real classes (tests/helpers/weights_probe.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def probe(comfyui_dir, fixtures_dir):
    proc = subprocess.run([sys.executable, str(REPO / "tests/helpers/weights_probe.py"), str(comfyui_dir),
                           str(fixtures_dir / "tiny-sd15.safetensors")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_views_share_every_weight_storage_through_their_own_objects(probe):
    assert probe["shared_storage"] == probe["params"] > 100
    assert probe["own_objects"] == probe["params"]
    assert probe["own_modules"] and probe["patcher_points_at_own_module"]


def test_in_place_updates_are_copy_on_write(probe):
    assert probe["unpatched_inplace_reaches_other_view"], "without the patch the probe must see the leak"
    assert probe["applied"]
    assert probe["cow_writer_sees_update"]
    assert probe["cow_other_view_unchanged"] and probe["cow_template_unchanged"]
    assert probe["cow_writer_has_own_storage"]


def test_an_offload_points_back_at_the_shared_cpu_tensors(probe):
    assert probe["device_copies_before_offload"] == probe["params"]
    assert probe["private_after_offload"] == 0
    assert probe["reverted"]
