"""ComfyUI custom-node entry for comfy-multigpu: the one module whose import does something.

ComfyUI imports this file from custom_nodes/ after its own nodes have loaded; the extension then
either enables itself (patches/manifest.toml) or logs one line saying why not and changes nothing.
Imported anywhere else (a test runner collecting this directory as a package), it does nothing.
"""
import os
import sys

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]


def _inside_comfyui() -> bool:
    server = sys.modules.get("server")
    return server is not None and getattr(getattr(server, "PromptServer", None), "instance", None) is not None


if _inside_comfyui():
    _ROOT = os.path.dirname(os.path.abspath(__file__))
    if _ROOT not in sys.path:
        sys.path.append(_ROOT)
    from comfy_multigpu.activation import activate_from_comfyui

    _ON = activate_from_comfyui() is not None
    if _ON or os.environ.get("COMFY_MULTIGPU_CHILD_GPU"):
        # our nodes (SequenceParallel, the XDiT drop-ins): where the extension runs, and in its
        # process workers' children
        from comfy_multigpu.host import sp_nodes, xdit_nodes
        for _module in (sp_nodes, xdit_nodes):
            NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
            NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
    if _ON:
        # the GPU selector and queue tab for the stock web UI: only when the extension is on
        WEB_DIRECTORY = "./comfy_multigpu/web/ui"
        __all__.append("WEB_DIRECTORY")
