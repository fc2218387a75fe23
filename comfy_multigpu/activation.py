"""Turns the extension on inside a starting ComfyUI, or refuses with one log line and changes nothing.

Called once from the custom-node entry shim (../__init__.py). Host objects touched: comfy.cli_args.args,
comfyui_version, comfy.memory_management.aimdo_enabled, server.PromptServer.instance (middleware,
routes, app key), and everything patches/manifest.toml lists (through comfy_multigpu.host.patching).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Optional

from aiohttp import web

from .api import dashboard
from .api import middleware as api_middleware
from .api import routes as api_routes
from .host import patching
from .policy.admission import Limits
from .policy.config import ENV_CHILD, ConfigError, Settings, resolve_settings
from .policy.eviction import parse_ram_budget
from .runtime.journal import Journal
from .api.metrics import Metrics
from .runtime.pool import PoolOptions, WorkerPool
from .runtime.weights import WeightStore

logger = logging.getLogger("comfy_multigpu")

ENV_DISABLE_PATCHES = "COMFY_MULTIGPU_DISABLE_PATCHES"   # diagnostics only: ids to leave out


@dataclass
class Extension:
    settings: Settings
    pool: WorkerPool
    patches: patching.PatchSet
    host_version: str

    @property
    def queue(self):
        return self.pool.server.prompt_queue if self.pool.server is not None else None


EXTENSION_KEY = web.AppKey("comfy_multigpu", Extension)


def _machine() -> tuple[int, bool]:
    import torch
    from comfy.cli_args import args
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return cuda, bool(args.cpu)


def activate_from_comfyui(env: Mapping[str, str] = os.environ) -> Optional[Extension]:
    """Never raises: any failure leaves ComfyUI stock (every patch reverted) with one ERROR line."""
    try:
        return _activate(env)
    except Exception:
        logger.exception("comfy-multigpu: activation failed before any patch was applied; ComfyUI runs stock")
        return None


def _activate(env: Mapping[str, str]) -> Optional[Extension]:
    import comfy.memory_management
    import comfyui_version
    import server
    import torch

    if env.get(ENV_CHILD):
        logger.info("comfy-multigpu: process worker of GPU %s: this ComfyUI runs prompts for the main process",
                    env[ENV_CHILD])
        return None
    cuda_count, cpu_flag = _machine()
    try:
        settings = resolve_settings(env, cuda_count, cpu_flag)
    except ConfigError as ex:
        logger.error("comfy-multigpu: not enabled, configuration error: %s. ComfyUI runs stock.", ex)
        return None
    if not settings.enabled:
        logger.info("comfy-multigpu: off (%s); ComfyUI runs stock", settings.reason)
        return None

    host, specs = patching.load_manifest()
    version = comfyui_version.__version__
    wrong = patching.check_host_version(host, version)
    if wrong:
        logger.error("comfy-multigpu: refusing to enable: %s. ComfyUI runs stock; use a comfy-multigpu "
                     "release made for this ComfyUI.", wrong)
        return None
    process_mode = settings.worker_mode == "process"
    if comfy.memory_management.aimdo_enabled and not process_mode:
        logger.error("comfy-multigpu: refusing to enable: DynamicVRAM is on and is not safe with "
                     "concurrent workers. Start ComfyUI with --disable-dynamic-vram. ComfyUI runs stock.")
        return None

    skipped = {s.strip() for s in env.get(ENV_DISABLE_PATCHES, "").split(",") if s.strip()}
    unknown = skipped - {s.id for s in specs}
    if unknown:
        logger.error("comfy-multigpu: not enabled: %s names unknown patch ids %s. ComfyUI runs stock.",
                     ENV_DISABLE_PATCHES, sorted(unknown))
        return None
    specs = [s for s in specs if s.id not in skipped]

    weights, weights_text = _weight_store(settings)
    spawn = None
    if process_mode:
        from .runtime import shared_segments
        from .runtime.process_executor import SpawnSpec
        stale = shared_segments.remove_stale()
        if stale:
            logger.warning("comfy-multigpu: removed %d shared-memory segment(s) a crashed server left in %s",
                           len(stale), shared_segments.segment_dir())
        spawn = SpawnSpec.of_this_process(sharing=weights is not None)
    options = PoolOptions(settings.pools, settings.weights, settings.max_overtakes,
                          Limits(settings.max_queue_per_gpu, settings.max_queue), settings.watchdog,
                          settings.drain_timeout, settings.gc_freeze, spawn)
    pool = WorkerPool(((torch.device(label), label) for label in settings.devices), options, weights=weights)
    member = None
    if settings.fleet is not None:
        from .fleet.member import FleetMember
        member = FleetMember.join(settings.fleet, pool)     # before the queue swap: every route sees it
    patchset = patching.PatchSet(specs, pool)
    problems = patchset.problems()
    if problems:
        logger.error("comfy-multigpu: refusing to enable on ComfyUI %s: %s. ComfyUI runs stock; use a "
                     "comfy-multigpu release made for this ComfyUI.", version, "; ".join(problems))
        return None
    applied = patchset.apply()          # all or nothing: raises with nothing changed
    srv = server.PromptServer.instance
    wiring = _Wiring(srv)
    try:
        journal_text = (_open_journal(settings, pool) if member is None else
                        "journal: the fleet queue (Redis, append-only file) holds every accepted prompt")
        pool.observe(Metrics(pool))
        queue = srv.prompt_queue
        wiring.add_middleware(api_middleware.make_middleware(queue, api_routes.OVERRIDES))
        wiring.add_routes(lambda routes: api_routes.add_routes(routes, queue))
        ext = Extension(settings, pool, patchset, version)
        srv.app[EXTENSION_KEY] = ext
        pool.start_hooks.append(lambda _server: _verify_in_place(ext))
        if member is not None:
            pool.start_hooks.append(lambda server: member.start(server, queue.interrupt_here))
        wiring.add_task(srv.loop.create_task(dashboard.publisher(pool)))
    except BaseException:
        wiring.undo()
        kept = patchset.revert()
        if pool.journal is not None:
            pool.journal.close()
        logger.exception("comfy-multigpu: activation failed after the patches were applied; all %d reverted "
                         "(%d restored), ComfyUI runs stock", len(applied), len(kept))
        return None

    if process_mode:
        import atexit
        atexit.register(pool.stop_children)
    if member is not None:
        import atexit
        atexit.register(member.stop)
        logger.info("comfy-multigpu: FLEET member %r (%s, reached at %s); prompts wait in Redis and run on "
                    "whichever machine's GPU takes them first", settings.fleet.node, settings.fleet.safe_url,
                    member.node_url)
    logger.info("comfy-multigpu: %s", _mode_text(settings, len(pool)))
    logger.info("comfy-multigpu: ComfyUI %s, %d workers on %s (%s); %s; %d patches applied: %s%s",
                version, len(pool), ", ".join(settings.devices), settings.reason,
                "DynamicVRAM decided by each worker process as stock ComfyUI does" if process_mode
                else "DynamicVRAM off", len(applied),
                ", ".join(applied), f"; left out on request: {', '.join(sorted(skipped))}" if skipped else "")
    logger.info("comfy-multigpu: pools %s%s; weights %s; a prompt is overtaken at most %d times",
                _pool_text(settings.pools), f" (default: {pool.default_pool})" if pool.default_pool else "",
                ", ".join(f"{i}:{w:g}" for i, w in enumerate(settings.weights)), settings.max_overtakes)
    logger.info("comfy-multigpu: %s; queue caps: %s per GPU, %s in all; SIGTERM drains for up to %.0f s; "
                "watchdog %s", journal_text, settings.max_queue_per_gpu or "none", settings.max_queue or "none",
                settings.drain_timeout, f"{settings.watchdog:g} s" if settings.watchdog else "off")
    logger.info("comfy-multigpu: %s", weights_text)
    return ext


def _open_journal(settings: Settings, pool: WorkerPool) -> str:
    """Open the prompt journal and put what it holds back (history; unfinished prompts into the queues)."""
    if settings.journal.lower() == "off":
        return "journal OFF (accepted prompts are lost on a crash)"
    import folder_paths
    path = settings.journal or os.path.join(folder_paths.get_user_directory(), "comfy-multigpu", "journal.sqlite3")
    history, requeued = pool.attach_journal(Journal(path))
    if requeued:
        logger.warning("comfy-multigpu: journal: %d prompt(s) accepted before the last stop had not finished; "
                       "queued again", requeued)
    return f"journal {path} ({history} finished prompts in history, {requeued} queued again)"


def _weight_store(settings: Settings):
    """The shared RAM cache of model files (None when COMFY_MULTIGPU_RAM_CACHE=off): views of one
    template in this process (thread mode), or shared-memory segments mapped by every child."""
    import psutil
    total = psutil.virtual_memory().total
    budget = parse_ram_budget(settings.ram_cache, total)
    if budget is None:
        return None, "model weights NOT shared (COMFY_MULTIGPU_RAM_CACHE=off): every worker loads its own copy"
    if settings.worker_mode == "process":
        from .runtime.segment_store import SegmentStore
        return SegmentStore(budget), (f"model weights shared by all worker processes through shared memory; "
                                      f"budget {budget / 2 ** 30:.1f} GiB of {total / 2 ** 30:.1f} GiB")
    return WeightStore(budget), (f"model weights shared by all workers; RAM cache budget "
                                 f"{budget / 2 ** 30:.1f} GiB of {total / 2 ** 30:.1f} GiB")


def _mode_text(settings: Settings, workers: int) -> str:
    """The start-up line that says which worker mode runs and why (docs/configuration.md, 'Worker mode')."""
    if settings.worker_mode == "process":
        return (f"worker mode PROCESS (COMFY_MULTIGPU_WORKER_MODE=process): each of the {workers} GPUs runs its "
                f"prompts in a child process of its own (its own GIL and ComfyUI globals; the queue, API and "
                f"journal stay here), for many fast GPUs where one interpreter cannot keep them busy")
    return (f"worker mode THREAD (the default): {workers} worker threads in this process share one GIL; for "
            f"many fast GPUs on small models set COMFY_MULTIGPU_WORKER_MODE=process (docs/configuration.md)")


class _Wiring:
    """What activation adds to ComfyUI's server besides the manifest's patches (our own middleware,
    routes and event-loop task, through aiohttp's extension points), so that a failure can take it
    all out again."""

    def __init__(self, srv):
        self.srv = srv
        self.middlewares: list = []
        self.route_count = 0
        self.tasks: list = []

    def add_middleware(self, middleware) -> None:
        self.srv.app.middlewares.append(middleware)
        self.middlewares.append(middleware)

    def add_routes(self, register) -> None:
        before = len(self.srv.routes)
        register(self.srv.routes)
        self.route_count = len(self.srv.routes) - before

    def add_task(self, task) -> None:
        self.tasks.append(task)

    def undo(self) -> None:
        for task in self.tasks:
            task.cancel()
        for middleware in self.middlewares:
            if middleware in self.srv.app.middlewares:
                self.srv.app.middlewares.remove(middleware)
        if self.route_count:
            del self.srv.routes._items[-self.route_count:]      # RouteTableDef keeps them in a list
        if self.srv.app.get(EXTENSION_KEY) is not None:
            del self.srv.app[EXTENSION_KEY]


def _pool_text(pools) -> str:
    return "; ".join(f"{name}={','.join(str(g) for g in gpus)}" for name, gpus in pools.items())


def _verify_in_place(ext: Extension) -> None:
    """After custom nodes loaded and hook_breaker restored its functions: are our patches still there?"""
    missing = ext.patches.not_in_place()
    if missing:
        logger.error("comfy-multigpu: patches replaced by something else after start-up: %s. "
                     "Another custom node overrides the same ComfyUI functions.", ", ".join(missing))
    else:
        logger.info("comfy-multigpu: all %d patches in place at worker start", len(ext.patches.applied))
