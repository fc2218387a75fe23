"""A fresh interpreter's view of the pinned ComfyUI, for the helper scripts that drive the real host
modules without starting a server (patch_roundtrip.py, activation_rollback.py): sys.path, argv and
ComfyUI's argument parsing as main.py sets them, main.py imported as a module, the optional modules
that hold by-value copies loaded as ComfyUI does with its nodes, and a PromptServer instance."""
import asyncio
import os
import sys


def load(comfyui_dir: str):
    """Returns ComfyUI's main.py module (its prompt_worker, get_progress_state copies)."""
    sys.path.insert(0, comfyui_dir)
    sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    os.chdir(comfyui_dir)
    sys.argv = ["main.py", "--cpu", "--disable-all-custom-nodes"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import main as comfy_main
    import server

    import comfy_api_nodes.util._helpers  # noqa: F401  (optional by-value targets, loaded as
    import comfy_extras.mesh3d.postprocess.remesh  # noqa: F401  ComfyUI does with its nodes)
    server.PromptServer(asyncio.new_event_loop())
    return comfy_main
