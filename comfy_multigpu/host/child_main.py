"""A process worker's child: one ComfyUI executor that owns one GPU, driven by the main process.

Started by runtime/process_executor.py as `python -m comfy_multigpu.host.child_main --fd N --gpu G
--comfyui DIR -- <ComfyUI's command line>`, with CUDA_VISIBLE_DEVICES naming only its GPU. It starts
ComfyUI as main.py does, without the HTTP server (main.py:550-590: paths, prestartup scripts, custom
nodes, the progress hook), so its process globals are its own and stock (DynamicVRAM included); then
it runs what the main process sends: execute a prompt, free, preload, stop. Everything the executor
sends to clients (PromptServer.send_sync) goes back over the link; the main process delivers it.

Host objects touched: main (imported as a module: stock start-up), server.PromptServer (one instance,
a subclass, never started, whose send_sync forwards), nodes.init_extra_nodes, hook_breaker_ac10a0,
execution.PromptExecutor, comfy.model_management (interrupt, unload), comfy.utils progress hook,
folder_paths.get_save_image_path and the loaders host/sharing.py wraps (through child_hooks.py).
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import queue
import signal
import sys
import threading
import time

logger = logging.getLogger("comfy_multigpu")

GC_INTERVAL_S = 10.0              # main.py's gc_collect_interval


def _die_with_parent() -> None:
    """The kernel kills this child when the main process dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


class Child:
    def __init__(self, link, gpu_id: int):
        self.link = link
        self.gpu_id = gpu_id
        self.commands: queue.Queue = queue.Queue()
        self.current_prompt = None
        self.interrupted: set = set()     # prompt ids interrupted before they started here
        self._calls: dict[int, queue.Queue] = {}
        self._next_call = 0
        self._calls_lock = threading.Lock()

    # ---- the link ----------------------------------------------------------------------------
    def read_forever(self) -> None:
        """Reader thread: interrupts and replies at once, the rest to the main thread in order."""
        from ..runtime.child_link import LinkClosed
        while True:
            try:
                message, fds = self.link.recv()
            except LinkClosed:
                os._exit(0)            # the main process is gone or stops us: nothing to finish
            except Exception:
                logger.warning("[GPU %s] unreadable message from the main process", self.gpu_id, exc_info=True)
                continue
            kind = message[0]
            if kind == "interrupt":
                self.interrupt(message[1])
            elif kind == "reply":
                with self._calls_lock:
                    waiter = self._calls.pop(message[1], None)
                if waiter is not None:
                    waiter.put((message[2], fds))
            else:
                self.commands.put((message, fds))

    def interrupt(self, prompt_id) -> None:
        """Now if it runs; if it has not started yet, as soon as it does (at execution_start, after the
        executor's own reset of the flag)."""
        import comfy.model_management
        if prompt_id is not None:
            if len(self.interrupted) > 1000:       # ids of prompts that never came here
                self.interrupted.clear()
            self.interrupted.add(prompt_id)
        if prompt_id is None or prompt_id == self.current_prompt:
            comfy.model_management.interrupt_current_processing(True)

    def started(self, prompt_id) -> None:
        """The executor reset its interrupt flag and starts `prompt_id`: apply an earlier interrupt."""
        if prompt_id in self.interrupted:
            self.interrupted.discard(prompt_id)
            import comfy.model_management
            comfy.model_management.interrupt_current_processing(True)

    def call(self, name: str, *args, fds: tuple = ()):
        """Ask the main process something and wait for the answer: (value, file descriptors)."""
        waiter: queue.Queue = queue.Queue(maxsize=1)
        with self._calls_lock:
            self._next_call += 1
            call_id = self._next_call
            self._calls[call_id] = waiter
        self.link.send(("call", call_id, name, args), fds=fds)
        value, fds = waiter.get()
        if isinstance(value, BaseException):
            raise value
        return value, fds

    def send_sync(self, event, data, sid=None) -> None:
        """PromptServer.send_sync in the child: the main process sends it to the client."""
        try:
            self.link.send(("event", event, data, sid))
        except Exception:
            logger.warning("[GPU %s] event %s could not be sent to the main process", self.gpu_id, event,
                           exc_info=True)

    # ---- commands ------------------------------------------------------------------------------
    def serve(self, prompt_server, executor) -> None:
        """Commands in order; between them, main.py's housekeeping: at most every GC_INTERVAL_S after
        work, a garbage collection and the device cache emptied (main.py:462-473)."""
        need_gc, last_gc = False, 0.0
        while True:
            timeout = max(0.0, GC_INTERVAL_S - (time.perf_counter() - last_gc)) if need_gc else None
            try:
                message, fds = self.commands.get(timeout=timeout)
            except queue.Empty:
                message, fds = None, []
            for fd in fds:
                os.close(fd)
            kind = message[0] if message is not None else None
            if kind == "execute":
                self.execute(prompt_server, executor, *message[1:])
            elif kind == "free":
                self.free(executor, *message[1:])
            elif kind == "preload":
                self.preload(*message[1:])
            elif kind == "stop":
                return
            need_gc = need_gc or kind in ("execute", "preload")
            if need_gc and time.perf_counter() - last_gc > GC_INTERVAL_S:
                self.collect()
                need_gc, last_gc = False, time.perf_counter()

    @staticmethod
    def collect() -> None:
        import gc
        import comfy.model_management
        import hook_breaker_ac10a0
        gc.collect()
        comfy.model_management.soft_empty_cache()
        hook_breaker_ac10a0.restore_functions()

    def execute(self, prompt_server, executor, prompt, prompt_id, extra_data, outputs, sockets_metadata) -> None:
        prompt_server.begin(prompt_id, sockets_metadata)
        self.current_prompt = prompt_id
        started = time.perf_counter()
        executor.history_result = {"outputs": {}, "meta": {}}
        try:
            executor.execute(prompt, prompt_id, extra_data, outputs)
            error = None
        except (Exception, SystemExit) as ex:
            logger.exception("[GPU %s] prompt %s failed outside node execution", self.gpu_id, prompt_id)
            executor.success = False
            error = f"{type(ex).__name__}: {ex}"
        finally:
            self.current_prompt = None
            self.interrupted.discard(prompt_id)
        free = self._device_memory()
        from . import child_hooks
        notes = child_hooks.take_notes()
        try:
            self.link.send(("done", executor.history_result, executor.success, executor.status_messages, free, error,
                            notes))
        except Exception as ex:          # an output that does not pickle: report it as the error
            self.link.send(("done", {"outputs": {}, "meta": {}}, False, [], free,
                            f"the result could not be sent to the main process: {type(ex).__name__}: {ex}", {}))
        logger.info("[GPU %s] Prompt executed in %.2f seconds", self.gpu_id, time.perf_counter() - started)

    def free(self, executor, unload_models: bool, free_memory: bool) -> None:
        import comfy.model_management
        import gc
        if unload_models:
            from . import child_hooks
            child_hooks.release_held()
            comfy.model_management.unload_all_models()
        if free_memory:
            executor.reset()
        gc.collect()
        comfy.model_management.soft_empty_cache()
        self.link.send(("freed", self._device_memory()))

    def preload(self, kind: str, name: str, onto_device: bool) -> None:
        from . import child_hooks
        try:
            state = child_hooks.preload(kind, name, onto_device)
            self.link.send(("preloaded", state, None))
        except Exception as ex:
            logger.exception("[GPU %s] preload of %s %s failed", self.gpu_id, kind, name)
            self.link.send(("preloaded", None, f"{type(ex).__name__}: {ex}"))

    @staticmethod
    def _device_memory():
        """(free, total) bytes of this child's CUDA device now; None on the CPU."""
        import comfy.model_management
        import torch
        device = comfy.model_management.get_torch_device()
        if getattr(device, "type", "cpu") != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)


class _GpuPrefix(logging.Filter):
    """Every line a child logs says which GPU's process wrote it (they share the server's output)."""

    def __init__(self, gpu_id: int):
        super().__init__()
        self.prefix = f"[GPU {gpu_id} process] "

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and not record.msg.startswith("[GPU "):
            record.msg = self.prefix + record.msg
        return True


def _start_comfyui(child: Child, sharing: bool):
    """ComfyUI's start-up without the server (main.py:550-590), then our hooks and the executor."""
    import asyncio
    import main as comfy_main            # stock module-level start-up: paths, prestartup, DynamicVRAM
    for handler in logging.getLogger().handlers:
        handler.addFilter(_GpuPrefix(child.gpu_id))
    import comfy.model_management
    import hook_breaker_ac10a0
    import nodes
    import server
    from comfy.cli_args import args

    class ChildServer(server.PromptServer):
        """The child's PromptServer (never started): what the executor sends goes to the main process,
        which delivers it to the clients; the client's feature flags come with each prompt."""

        def send_sync(self, event, data, sid=None):
            child.send_sync(event, data, sid)

        def begin(self, prompt_id, sockets_metadata):
            self.last_prompt_id = prompt_id           # as main.py's prompt_worker does
            self.sockets_metadata = sockets_metadata

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    prompt_server = ChildServer(loop)
    hook_breaker_ac10a0.save_functions()
    loop.run_until_complete(nodes.init_extra_nodes(
        init_custom_nodes=(not args.disable_all_custom_nodes) or len(args.whitelist_custom_nodes) > 0,
        init_api_nodes=not args.disable_api_nodes))
    comfy.model_management.set_cudnn_benchmark()
    hook_breaker_ac10a0.restore_functions()
    comfy_main.hijack_progress(prompt_server)
    from . import child_hooks
    child_hooks.install(child, sharing)
    import comfy.model_management as mm
    import execution
    from .services import executor_cache_settings

    class ChildExecutor(execution.PromptExecutor):
        """ComfyUI's executor; its execution_start (after it reset the interrupt flag) applies an
        interrupt that reached this process before the prompt did."""

        def add_message(self, event, data, broadcast: bool):
            if event == "execution_start":
                child.started(data.get("prompt_id"))
            return super().add_message(event, data, broadcast)

    cache_type, cache_args = executor_cache_settings(args, mm.total_ram)
    return prompt_server, ChildExecutor(prompt_server, cache_type=cache_type, cache_args=cache_args)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="comfy_multigpu.host.child_main")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--gpu", type=int, required=True)
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--no-sharing", action="store_true")
    parser.add_argument("comfy_args", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    _die_with_parent()
    comfy_args = [a for a in options.comfy_args if a != "--"]
    sys.path.insert(0, options.comfyui)
    sys.argv = [os.path.join(options.comfyui, "main.py")] + comfy_args
    from ..runtime.child_link import Link
    child = Child(Link.from_fd(options.fd), options.gpu)
    threading.Thread(target=child.read_forever, daemon=True, name="comfy-multigpu-link").start()
    started = time.perf_counter()
    try:
        prompt_server, executor = _start_comfyui(child, not options.no_sharing)
    except BaseException as ex:
        logger.exception("[GPU %s] process worker could not start ComfyUI", options.gpu)
        child.link.send(("failed", f"{type(ex).__name__}: {ex}"))
        raise SystemExit(1)
    import comfy.memory_management
    import comfy.model_management
    device = comfy.model_management.get_torch_device()
    child.link.send(("ready", {"pid": os.getpid(), "device": str(device),
                               "dynamic_vram": bool(comfy.memory_management.aimdo_enabled),
                               "seconds": round(time.perf_counter() - started, 2),
                               "memory": Child._device_memory()}))
    child.serve(prompt_server, executor)


if __name__ == "__main__":
    main(sys.argv[1:])
