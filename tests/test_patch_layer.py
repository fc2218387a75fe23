"""The patch layer: every manifest entry applies, is idempotent, reverts to the identical original;
a host of another shape is refused before anything changes, and ComfyUI then runs stock."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_multigpu.host import patching
from helpers import workflows as wf
from helpers.comfy_server import HttpError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def roundtrip(comfyui_dir):
    proc = subprocess.run([sys.executable, str(REPO / "tests/helpers/patch_roundtrip.py"), str(comfyui_dir)],
                          capture_output=True, text=True, timeout=300)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("ROUNDTRIP ")), None)
    assert line, f"roundtrip script failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads(line[len("ROUNDTRIP "):])


def test_every_patch_applies_on_the_pinned_host(roundtrip):
    assert roundtrip["problems_on_pinned_host"] == []
    assert roundtrip["applied"] == roundtrip["ids"]
    assert roundtrip["changed_by_apply"] == roundtrip["ids"]
    assert roundtrip["not_in_place"] == []


def test_applying_twice_changes_nothing(roundtrip):
    assert roundtrip["applied_again"] == []
    assert roundtrip["changed_by_second_apply"] == []


def test_revert_puts_back_the_identical_originals(roundtrip):
    assert roundtrip["reverted"] == list(reversed(roundtrip["ids"]))
    assert roundtrip["identical_after_revert"] == roundtrip["ids"]


def test_a_changed_signature_is_refused_before_anything_changes(roundtrip):
    assert len(roundtrip["mismatch_problems"]) == 1
    assert "interrupt_current_processing" in roundtrip["mismatch_problems"][0]
    assert "expected (value=True)" in roundtrip["mismatch_problems"][0]
    assert roundtrip["mismatch_apply"].startswith("refused")
    assert roundtrip["changed_by_refused_apply"] == []


def test_a_failure_half_way_undoes_everything(roundtrip):
    assert roundtrip["half_way"] == "raised"
    assert roundtrip["changed_after_half_way"] == []


def test_host_version_range(roundtrip):
    assert roundtrip["host_version_check"] is None
    assert "outside the supported range" in roundtrip["old_host_version_check"]


def test_ram_cache_release_is_per_worker(roundtrip):
    """Two workers, each its own RAM-pressure release callback (internals §1 #10)."""
    assert roundtrip["ram_release_patched"] == [0, 1]
    assert roundtrip["ram_release_stock"] in ([0, 0], [1, 1])   # stock: the last setter wins for both


def test_unknown_host_shape_refuses_with_one_line_and_comfyui_runs_stock(servers):
    server = servers.start("shape", workers=2, shape_changer=True)
    errors = [l for l in server.log().splitlines() if "comfy-multigpu" in l and "ERROR" in l]
    assert len(errors) == 1, errors
    assert "refusing to enable" in errors[0] and "get_save_image_path" in errors[0]
    assert "runs stock" in errors[0]
    with pytest.raises(HttpError) as info:
        server.get("/queue/all")
    assert info.value.status == 404
    answer = server.submit(wf.save_batch("shape", 10, batch=1))
    assert "gpu_id" not in answer
    assert server.wait(answer["prompt_id"])[answer["prompt_id"]]["status"]["status_str"] == "success"


def test_docs_patch_table_is_generated_from_the_manifest():
    committed = (REPO / "docs" / "patches.md").read_text()
    assert committed == patching.markdown(), "docs/patches.md is stale: python -m comfy_multigpu.host.patching > docs/patches.md"


HOST_MODULES = {"comfy", "execution", "server", "nodes", "folder_paths", "latent_preview", "main",
                "comfy_execution", "comfy_api", "comfy_extras", "comfy_api_nodes", "torch"}
# patching.py applies the manifest; prestartup.py sets ComfyUI's --disable-dynamic-vram option before
# torch is imported (an option value, the same as passing the flag; see its docstring).
INSTALLER = {"patching.py", "prestartup.py"}


def test_no_module_but_the_installer_assigns_to_host_attributes():
    """Only comfy_multigpu/host/patching.py changes host objects; everything else goes through the manifest."""
    offenders = []
    for path in (REPO / "comfy_multigpu").rglob("*.py"):
        if path.name in INSTALLER:
            continue
        tree = ast.parse(path.read_text())
        host_names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in HOST_MODULES:
                        host_names.add((alias.asname or alias.name).split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in HOST_MODULES:
                for alias in node.names:
                    host_names.add(alias.asname or alias.name)
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for target in targets:
                if isinstance(target, ast.Attribute):
                    root = target
                    while isinstance(root, ast.Attribute):
                        root = root.value
                    if isinstance(root, ast.Name) and root.id in host_names:
                        offenders.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
                offenders.append(f"{path.name}:{node.lineno} setattr")
    assert offenders == []
