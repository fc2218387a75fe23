"""ComfyUI custom-node entry for comfy-multigpu: the one module whose import does something.

ComfyUI imports this file from custom_nodes/ after its own nodes have loaded; the extension then
either enables itself (patches/manifest.toml) or logs one line saying why not and changes nothing.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from comfy_multigpu.activation import activate_from_comfyui  # noqa: E402

activate_from_comfyui()

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
