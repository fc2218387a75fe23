"""Queue-aware balancer across ComfyUI instances (stock, or with comfy-multigpu): aiohttp only, no torch.

    python -m comfy_multigpu.balancer --backend http://gpu-box-1:8188 --backend http://gpu-box-2:8188=2
"""
