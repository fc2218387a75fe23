"""The pinned ComfyUI's `comfy` package imported into the test process itself (no server): its
directory appended to sys.path, argv swapped for "--cpu" only while ComfyUI parses its arguments."""
import importlib
import sys


def import_comfy(comfyui_dir, *modules: str):
    """Imports `modules` (e.g. "comfy.sd") from the pinned ComfyUI with --cpu; returns the comfy package."""
    if str(comfyui_dir) not in sys.path:
        sys.path.append(str(comfyui_dir))
    argv, sys.argv = sys.argv, ["main.py", "--cpu"]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        for name in modules:
            importlib.import_module(name)
    finally:
        sys.argv = argv
    return comfy
