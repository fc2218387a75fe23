"""comfy-multigpu: one ComfyUI process, one prompt queue and one worker thread per GPU.

Importing this package does nothing; ComfyUI's custom-node shim (../__init__.py) calls
comfy_multigpu.activation.activate_from_comfyui().
"""
__version__ = "0.1.0"
