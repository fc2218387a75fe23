"""Activation that fails after the patches went on must leave ComfyUI stock, in a fresh interpreter.

python activation_rollback.py COMFYUI_DIR  -> prints one JSON object with what was observed when
activate_from_comfyui() runs with 2 CPU workers and a journal path that cannot be opened (a path
inside a regular file), which fails after PatchSet.apply(): what it returned, its ERROR lines, which
patches apply() had put on, and which manifest targets (attributes, the classes of
PromptServer.instance and args, the SIGTERM handler) hold the identical originals afterwards.
"""
import json
import logging
import os
import signal
import sys
import tempfile


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def main(comfyui_dir: str) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import pinned_host
    comfy_main = pinned_host.load(comfyui_dir)
    from comfy_multigpu import activation
    from comfy_multigpu.host import patching

    # In ComfyUI, main.py runs as __main__ and activation resolves "__main__:prompt_worker" through
    # sys.modules; here main.py was imported as "main", so it takes that place (this script's module
    # object stays referenced so its globals live on).
    script = sys.modules["__main__"]
    sys.modules["__main__"] = comfy_main

    host, specs = patching.load_manifest()
    reader = patching.PatchSet(specs, None)     # resolve() only: reads each target the installer's way
    originals = {s.id: reader.resolve(s)[2] for s in specs}
    sigterm_before = signal.getsignal(signal.SIGTERM)

    applied = []        # observe that the failure comes after apply() (not a refusal before it)
    real_apply = patching.PatchSet.apply

    def spy_apply(self):
        ids = real_apply(self)
        applied.extend(ids)
        return ids

    patching.PatchSet.apply = spy_apply
    lines = Lines()
    log = logging.getLogger("comfy_multigpu")
    log.addHandler(lines)
    with tempfile.NamedTemporaryFile() as regular_file:
        env = {"COMFY_MULTI_GPU_SCHED": "1", "COMFY_NUM_GPUS": "2",
               "COMFY_MULTIGPU_JOURNAL": os.path.join(regular_file.name, "journal.sqlite3")}
        try:
            returned = activation.activate_from_comfyui(env)
        finally:
            patching.PatchSet.apply = real_apply
            log.removeHandler(lines)

    after = {s.id: reader.resolve(s)[2] for s in specs}
    errors = [r for r in lines.records if r.levelno >= logging.ERROR]
    sys.modules["__main__"] = script
    return {
        "ids": [s.id for s in specs],
        "returned": None if returned is None else repr(returned),
        "errors": [r.getMessage() for r in errors],
        "error_causes": [type(r.exc_info[1]).__name__ for r in errors if r.exc_info],
        "applied_during_activation": applied,
        "identical_after": [i for i in originals if after[i] is originals[i]],
        "not_identical_after": [i for i in originals if after[i] is not originals[i]],
        "sigterm_handler_is_the_one_from_before": signal.getsignal(signal.SIGTERM) is sigterm_before,
    }


if __name__ == "__main__":
    print("ROLLBACK " + json.dumps(main(sys.argv[1])))
