"""The patch layer: every manifest entry applies, is idempotent, reverts to the identical original
(but leaves alone what something else stacked on our patch since); a host of another shape is refused
before anything changes, and ComfyUI then runs stock, also when activation fails after the patches
went on."""
import ast
import json
import logging
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

from comfy_multigpu.host import patching
from helpers import workflows as wf
from helpers.comfy_server import HttpError

REPO = Path(__file__).resolve().parents[1]


def run_helper(script: str, tag: str, comfyui_dir) -> dict:
    """Run tests/helpers/<script> on the pinned host in a fresh interpreter; its "<tag> {json}" line."""
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "helpers" / script), str(comfyui_dir)],
                          capture_output=True, text=True, timeout=300)
    line = next((l for l in proc.stdout.splitlines() if l.startswith(tag + " ")), None)
    assert line, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads(line[len(tag) + 1:])


@pytest.fixture(scope="module")
def roundtrip(comfyui_dir):
    return run_helper("patch_roundtrip.py", "ROUNDTRIP", comfyui_dir)


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


def test_the_sigterm_handler_is_a_manifest_patch(roundtrip):
    assert "sigterm-drain" in roundtrip["ids"]


def test_revert_on_the_pinned_host_leaves_wrappers_stacked_on_our_patches(roundtrip):
    assert roundtrip["kept_foreign"] == ["sigterm-drain", "device-current"]
    assert roundtrip["foreign_still_there"] == [True, True]
    rest = [i for i in roundtrip["ids"] if i not in ("sigterm-drain", "device-current")]
    assert roundtrip["reverted_with_foreign"] == list(reversed(rest))
    assert roundtrip["identical_after_foreign_revert"] == rest


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


# ---- revert in-process, on fake host modules --------------------------------------------------------

class FakeSignals:
    """Stands in for the signal module (PatchSet resolves "signal:SIGTERM" through its modules map)."""
    SIGTERM = signal.SIGTERM

    def __init__(self):
        self.handlers = {signal.SIGTERM: signal.SIG_DFL}

    def getsignal(self, signum):
        return self.handlers[signum]

    def signal(self, signum, handler):
        self.handlers[signum] = handler


def make_wrapper(original, pool):
    def wrapper(*args, **kwargs):
        return original(*args, **kwargs)
    return wrapper


def make_handler(original, pool):
    return lambda signum, frame: None


@pytest.fixture
def fake_host(monkeypatch):
    """A host module with two functions, a fake signal module, the specs patching them, and a PatchSet."""
    factories = types.ModuleType("fake_patch_factories")
    factories.make_wrapper, factories.make_handler = make_wrapper, make_handler
    monkeypatch.setitem(sys.modules, "fake_patch_factories", factories)
    host = types.ModuleType("fakehost")
    host.work = lambda x: x
    host.rest = lambda: None
    signals = FakeSignals()
    specs = [patching.PatchSpec(id="work", target="fakehost:work", factory="fake_patch_factories:make_wrapper",
                                why="test", evidence="test"),
             patching.PatchSpec(id="rest", target="fakehost:rest", factory="fake_patch_factories:make_wrapper",
                                why="test", evidence="test"),
             patching.PatchSpec(id="term", target="signal:SIGTERM", kind="signal",
                                factory="fake_patch_factories:make_handler", why="test", evidence="test")]
    ps = patching.PatchSet(specs, pool=None, modules={"fakehost": host, "signal": signals})
    originals = {"work": host.work, "rest": host.rest, "term": signals.getsignal(signal.SIGTERM)}
    return types.SimpleNamespace(host=host, signals=signals, ps=ps, originals=originals)


def test_revert_keeps_a_foreign_wrapper_stacked_on_our_function(fake_host, caplog):
    h = fake_host
    assert h.ps.apply() == ["work", "rest", "term"]
    ours = h.host.work
    foreign = lambda x: ours(x)     # noqa: E731  another extension wraps our patch
    h.host.work = foreign
    with caplog.at_level(logging.WARNING, logger="comfy_multigpu"):
        assert h.ps.revert() == ["term", "rest"]
    assert h.ps.kept_foreign == ["work"]
    assert h.host.work is foreign
    assert h.host.rest is h.originals["rest"]
    assert h.signals.getsignal(signal.SIGTERM) is h.originals["term"]
    assert h.ps.applied == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "work" in warnings[0] and "fakehost:work" in warnings[0] and repr(foreign) in warnings[0]


def test_revert_keeps_a_foreign_signal_handler(fake_host, caplog):
    h = fake_host
    h.ps.apply()
    foreign = lambda signum, frame: None    # noqa: E731
    h.signals.signal(signal.SIGTERM, foreign)
    with caplog.at_level(logging.WARNING, logger="comfy_multigpu"):
        assert h.ps.revert() == ["rest", "work"]
    assert h.ps.kept_foreign == ["term"]
    assert h.signals.getsignal(signal.SIGTERM) is foreign
    assert (h.host.work, h.host.rest) == (h.originals["work"], h.originals["rest"])
    assert h.host.work is h.originals["work"] and h.host.rest is h.originals["rest"]
    assert sum("signal:SIGTERM" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1


def test_a_half_way_failure_undoes_only_what_is_still_ours(fake_host, monkeypatch):
    h = fake_host
    foreign = lambda x: x     # noqa: E731

    def fail_after_someone_replaced_work(original, pool):
        h.host.work = foreign
        raise RuntimeError("factory failed")
    monkeypatch.setattr(sys.modules["fake_patch_factories"], "make_handler", fail_after_someone_replaced_work)
    with pytest.raises(RuntimeError):
        h.ps.apply()
    assert h.ps.kept_foreign == ["work"] and h.host.work is foreign
    assert h.host.rest is h.originals["rest"]
    assert h.signals.getsignal(signal.SIGTERM) is h.originals["term"]
    assert h.ps.applied == []


def test_a_signal_patch_is_refused_outside_the_main_thread_and_applies_in_it(monkeypatch):
    """The real signal module: installing a handler is only allowed in the main thread."""
    factories = types.ModuleType("fake_patch_factories")
    factories.make_handler = make_handler
    monkeypatch.setitem(sys.modules, "fake_patch_factories", factories)
    spec = patching.PatchSpec(id="term", target="signal:SIGTERM", kind="signal",
                              factory="fake_patch_factories:make_handler", why="test", evidence="test")
    before = signal.getsignal(signal.SIGTERM)
    ps = patching.PatchSet([spec], pool=None)
    seen = {}

    def off_main():
        seen["problems"] = ps.problems()
        try:
            ps.apply()
            seen["apply"] = "applied"
        except patching.HostMismatch as ex:
            seen["apply"] = f"refused: {ex}"
    thread = threading.Thread(target=off_main, name="not-main")
    thread.start()
    thread.join(10)
    assert len(seen["problems"]) == 1 and "main thread" in seen["problems"][0]
    assert seen["apply"].startswith("refused") and signal.getsignal(signal.SIGTERM) is before
    try:
        assert ps.apply() == ["term"]
        assert signal.getsignal(signal.SIGTERM) is ps.applied[0].replacement
    finally:
        assert ps.revert() == ["term"]
    assert signal.getsignal(signal.SIGTERM) is before


def test_manifest_kinds_are_known_and_isolation_defaults_to_false(tmp_path):
    _, specs = patching.load_manifest()
    assert {s.kind for s in specs} <= set(patching.KINDS)
    assert [s.id for s in specs if s.kind == "signal"] == ["sigterm-drain"]
    assert not next(s for s in specs if s.id == "weights-pin").isolation
    bad = tmp_path / "manifest.toml"
    bad.write_text('[host]\nname="x"\nmin_version="1"\nbelow_version="2"\ncommit="c"\n'
                   '[[patch]]\nid="a"\ntarget="m:f"\nkind="sigterm"\nfactory="m:g"\nwhy="w"\nevidence="e"\n')
    with pytest.raises(ValueError, match="kind 'sigterm'"):
        patching.load_manifest(bad)


# ---- activation that fails after the patches went on ---------------------------------------------

@pytest.fixture(scope="module")
def rollback(comfyui_dir):
    return run_helper("activation_rollback.py", "ROLLBACK", comfyui_dir)


def test_activation_failing_after_apply_leaves_comfyui_stock(rollback):
    """A journal that cannot be opened fails activation after every patch went on: it returns None,
    says so in one ERROR line, and every target holds the identical original again."""
    assert rollback["applied_during_activation"] == rollback["ids"]     # it failed after apply()
    assert rollback["returned"] is None
    assert len(rollback["errors"]) == 1 and "ComfyUI runs stock" in rollback["errors"][0]
    assert rollback["not_identical_after"] == []
    assert rollback["identical_after"] == rollback["ids"]
    assert rollback["sigterm_handler_is_the_one_from_before"]


def test_unknown_host_shape_refuses_with_one_line_and_comfyui_runs_stock(own_servers):
    server = own_servers("shape", workers=2, shape_changer=True)
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
    """Only comfy_multigpu/host/patching.py changes host objects or installs signal handlers; everything
    else goes through the manifest."""
    offenders = []
    for path in (REPO / "comfy_multigpu").rglob("*.py"):
        if path.name in INSTALLER:
            continue
        tree = ast.parse(path.read_text())
        host_names = set()
        signal_modules, signal_functions = set(), set()     # `import signal [as x]`, `from signal import signal`
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in HOST_MODULES:
                        host_names.add((alias.asname or alias.name).split(".")[0])
                    if alias.name == "signal":
                        signal_modules.add(alias.asname or alias.name)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in HOST_MODULES:
                for alias in node.names:
                    host_names.add(alias.asname or alias.name)
            elif isinstance(node, ast.ImportFrom) and node.module == "signal":
                signal_functions.update(a.asname or a.name for a in node.names if a.name == "signal")
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
            if isinstance(node, ast.Call) and (
                    (isinstance(node.func, ast.Attribute) and node.func.attr == "signal"
                     and isinstance(node.func.value, ast.Name) and node.func.value.id in signal_modules)
                    or (isinstance(node.func, ast.Name) and node.func.id in signal_functions)):
                offenders.append(f"{path.name}:{node.lineno} signal.signal")
    assert offenders == []
