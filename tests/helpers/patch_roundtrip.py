"""Walk patches/manifest.toml against the real pinned ComfyUI modules, in a fresh interpreter.

python patch_roundtrip.py COMFYUI_DIR  -> prints one JSON object with what was observed:
apply (each target now holds a new object), apply again (no change), revert (the identical
original is back), revert after something else wrapped two of our patches (those wrappers stay,
the rest is back), a shape mismatch (refused before anything changes), a failure half-way
(everything undone), and per-worker RAM-release callbacks with and without the patches.
Targets include the process's SIGTERM handler (kind "signal"); this runs in the main thread.
"""
import collections
import json
import os
import signal
import sys
import threading


def main(comfyui_dir: str) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import pinned_host
    comfy_main = pinned_host.load(comfyui_dir)     # main.py as a module: its prompt_worker / get_progress_state
    import torch
    from comfy_multigpu.host import patching
    from comfy_multigpu.runtime.context import current_worker
    from comfy_multigpu.runtime.pool import WorkerPool

    modules = collections.ChainMap({"__main__": comfy_main}, sys.modules)
    host, specs = patching.load_manifest()
    pool = WorkerPool([(torch.device("cpu"), "cpu")] * 2)
    out = {"ids": [s.id for s in specs]}

    def snapshot(patchset):
        """What every target holds now (resolve() reads it the way the installer does, for every kind)."""
        return {spec.id: patchset.resolve(spec)[2] for spec in specs}

    ps = patching.PatchSet(specs, pool, modules)
    originals = snapshot(ps)
    out["problems_on_pinned_host"] = ps.problems()
    out["applied"] = ps.apply()
    after = snapshot(ps)
    out["changed_by_apply"] = [i for i in originals if after[i] is not originals[i]]
    out["applied_again"] = ps.apply()
    again = snapshot(ps)
    out["changed_by_second_apply"] = [i for i in after if again[i] is not after[i]]
    out["not_in_place"] = ps.not_in_place()

    # Per-worker RAM-cache release callbacks (internals §1 #10), patched: each worker its own.
    out["ram_release_patched"] = ram_release_cross_talk(pool, current_worker)
    out["reverted"] = ps.revert()
    reverted = snapshot(ps)
    out["identical_after_revert"] = [i for i in originals if reverted[i] is originals[i]]
    out["ram_release_stock"] = ram_release_cross_talk(pool, current_worker)

    # Something else wraps two of our patches after us (a function and the SIGTERM handler): revert
    # leaves both wrappers in place and puts every other original back.
    import comfy.model_management as mm
    stacked = patching.PatchSet(specs, pool, modules)
    stacked.apply()
    ours_device = vars(mm)["get_torch_device"]
    foreign_device = lambda: ours_device()          # noqa: E731
    foreign_sigterm = lambda signum, frame: None    # noqa: E731
    mm.get_torch_device = foreign_device
    signal.signal(signal.SIGTERM, foreign_sigterm)
    out["reverted_with_foreign"] = stacked.revert()
    out["kept_foreign"] = stacked.kept_foreign
    out["foreign_still_there"] = [vars(mm)["get_torch_device"] is foreign_device,
                                  signal.getsignal(signal.SIGTERM) is foreign_sigterm]
    after_foreign = snapshot(stacked)
    out["identical_after_foreign_revert"] = [i for i in originals if after_foreign[i] is originals[i]]
    mm.get_torch_device = originals["device-current"]          # the test's own clean-up
    signal.signal(signal.SIGTERM, originals["sigterm-drain"])

    # A host whose shape differs: a function with another signature. Refused, nothing changed.
    saved = vars(mm)["interrupt_current_processing"]
    mm.interrupt_current_processing = lambda value=True, device=None: None
    try:
        bad = patching.PatchSet(specs, pool, modules)
        out["mismatch_problems"] = bad.problems()
        try:
            bad.apply()
            out["mismatch_apply"] = "applied"
        except patching.HostMismatch as ex:
            out["mismatch_apply"] = f"refused: {ex}"
        out["changed_by_refused_apply"] = [i for i, v in snapshot(bad).items()
                                           if i != "interrupt-set" and v is not originals[i]]
    finally:
        mm.interrupt_current_processing = saved

    # A failure half-way through apply: everything applied so far is undone.
    broken = list(specs) + [patching.PatchSpec(
        id="broken", target="comfy.model_management:soft_empty_cache",
        factory="comfy_multigpu.no_such_module:make", why="test", evidence="test")]
    half = patching.PatchSet(broken, pool, modules)
    try:
        half.apply()
        out["half_way"] = "applied"
    except ImportError:
        out["half_way"] = "raised"
    out["changed_after_half_way"] = [i for i, v in snapshot(half).items() if v is not originals[i]]
    out["host_version_check"] = patching.check_host_version(host, "0.33.0")
    out["old_host_version_check"] = patching.check_host_version(host, "0.3.64")
    return out


def ram_release_cross_talk(pool, current_worker) -> list:
    """Two workers set their own release callback, then both release: whose callback ran in each?"""
    import comfy.memory_management as mem
    ran = [None, None]
    barrier = threading.Barrier(2)
    caller = threading.local()

    def run(i):
        current_worker.set(pool.workers[i])
        caller.index = i

        def callback(target, free_active=False, owner=i):
            ran[caller.index] = owner      # in the releasing thread: whose callback ran here
            return 0
        mem.set_ram_cache_release_state(callback, 1)
        barrier.wait()
        mem.extra_ram_release(0)
        barrier.wait()
        mem.set_ram_cache_release_state(None, 0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return ran


if __name__ == "__main__":
    print("ROUNDTRIP " + json.dumps(main(sys.argv[1])))
