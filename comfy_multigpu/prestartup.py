"""Before torch is imported: switch DynamicVRAM off when multi-GPU workers will run, and cap the
C heap's arenas before the worker threads exist (comfy_multigpu/runtime/heap.py).

Host objects touched: comfy.cli_args.args.disable_dynamic_vram / enable_dynamic_vram, read by
enables_dynamic_vram() at call time (cli_args.py:312-315, main.py:291) after prestartup scripts.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping

from .policy.config import ENV_CHILD, ConfigError, resolve_settings, cuda_count_without_torch
from .runtime.heap import cap_arenas

logger = logging.getLogger("comfy_multigpu")


def run(env: Mapping[str, str] = os.environ) -> None:
    if env.get(ENV_CHILD):
        return          # a process worker's child: one executor, ComfyUI's own settings (DynamicVRAM too)
    from comfy.cli_args import args
    try:
        settings = resolve_settings(env, cuda_count_without_torch(env), bool(args.cpu))
    except ConfigError:
        return          # activation reports configuration errors once, with the real device count
    if not settings.enabled:
        return
    if args.enable_dynamic_vram and settings.worker_mode != "process":
        logger.warning("comfy-multigpu: --enable-dynamic-vram ignored: DynamicVRAM is not safe with "
                       "concurrent per-GPU workers")
    args.enable_dynamic_vram = False
    args.disable_dynamic_vram = True
    if settings.worker_mode == "process":
        logger.info("comfy-multigpu: DynamicVRAM off in the main process, which runs no models; each of the %d "
                    "worker processes decides as stock ComfyUI does", len(settings.devices))
    else:
        logger.info("comfy-multigpu: DynamicVRAM switched off for %d concurrent workers (%s)",
                    len(settings.devices), ", ".join(settings.devices))
    if cap_arenas(settings.malloc_arenas):
        logger.info("comfy-multigpu: at most %d malloc arenas (COMFY_MULTIGPU_MALLOC_ARENAS)", settings.malloc_arenas)
