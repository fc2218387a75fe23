"""What the runtime asks of ComfyUI itself: an executor per worker, the asset seeder around prompts,
the periodic clean-up pass, unloading a device's models. `ComfyServices` is the real host; tests of
the runtime pass an object with the same methods and a fake executor.

Host objects touched: execution.PromptExecutor / CacheType (built per worker as main.py:378-398
does), gc + comfy.model_management.soft_empty_cache (once for all workers, main.py:462-473),
comfy.model_management.unload_all_models, hook_breaker_ac10a0.restore_functions, app.assets.seeder.
"""
from __future__ import annotations

import gc
import sys


def executor_cache_settings(args, total_ram_mb: float):
    """The cache type and cache_args main.py's prompt_worker builds (main.py:379-398 of 0.33.0)."""
    import execution
    cache_ram = 0
    cache_ram_inactive = 0
    if not args.cache_classic and not args.cache_none and args.cache_lru <= 0:
        cache_ram = min(10.0, max(2.0, total_ram_mb * 0.10 / 1024.0))
        cache_ram_inactive = min(128.0, total_ram_mb / 1024.0)
        if len(args.cache_ram) > 0:
            cache_ram = args.cache_ram[0]
        if len(args.cache_ram) > 1:
            cache_ram_inactive = args.cache_ram[1]
    cache_type = execution.CacheType.RAM_PRESSURE
    if args.cache_classic:
        cache_type = execution.CacheType.CLASSIC
    elif args.cache_lru > 0:
        cache_type = execution.CacheType.LRU
    elif args.cache_none:
        cache_type = execution.CacheType.NONE
    return cache_type, {"lru": args.cache_lru, "ram": cache_ram, "ram_inactive": cache_ram_inactive}


class ComfyServices:
    """The real host: one method per thing the runtime needs of ComfyUI."""

    def new_executor(self, server):
        import execution
        import comfy.model_management
        from comfy.cli_args import args
        cache_type, cache_args = executor_cache_settings(args, comfy.model_management.total_ram)
        return execution.PromptExecutor(server, cache_type=cache_type, cache_args=cache_args)

    def prompt_started(self) -> None:
        from app.assets.seeder import asset_seeder
        asset_seeder.pause()

    def prompt_finished(self, history_result: dict, prompt_id: str) -> None:
        from app.assets.seeder import asset_seeder
        if not asset_seeder.is_disabled():
            from app.assets.services import register_output_files
            collect = getattr(sys.modules.get("__main__"), "_collect_output_absolute_paths", None)
            if collect is not None:
                register_output_files(collect(history_result), job_id=prompt_id)

    def collect(self) -> None:
        """The periodic pass main.py runs between prompts: GC, then empty the device caches."""
        import comfy.model_management
        gc.collect()
        comfy.model_management.soft_empty_cache()

    def after_collect(self, idle: bool) -> None:
        """hook_breaker's restore and, when no worker has anything to do, the asset seeder's turn."""
        import hook_breaker_ac10a0
        from app.assets.seeder import asset_seeder
        from comfy.cli_args import args
        hook_breaker_ac10a0.restore_functions()
        if idle:
            if not asset_seeder.is_disabled():
                asset_seeder.enqueue_enrich(roots=("output",), compute_hashes=args.enable_asset_hashing)
            asset_seeder.resume()

    def unload_models(self) -> None:
        """/free: unload the calling worker's device's models (patched to spare other workers')."""
        import comfy.model_management
        comfy.model_management.unload_all_models()

    def free_memory(self, device) -> int:
        import comfy.model_management
        return int(comfy.model_management.get_free_memory(device))
