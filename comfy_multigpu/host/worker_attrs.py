"""Per-worker attributes on host objects (PromptServer, ComfyUI's args) via subclass-and-swap; in a
fleet, events for a client connected to another machine go to the fleet's event relay.

Host objects touched: server.PromptServer.instance (client_id, last_node_id, last_prompt_id, the
`status` broadcast) and comfy.cli_args.args (preview_method, written by latent_preview.set_preview_method).
"""
from __future__ import annotations

from ..runtime.context import current_request, current_worker, request_target


class WorkerAttribute:
    """Data descriptor: inside a worker thread the value is the worker's own, elsewhere the instance's."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        worker = current_worker.get()
        if worker is not None and self.name in worker.host_state.attrs:
            return worker.host_state.attrs[self.name]
        try:
            return obj.__dict__[self.name]
        except KeyError:
            raise AttributeError(self.name) from None

    def __set__(self, obj, value):
        worker = current_worker.get()
        if worker is not None:
            worker.host_state.attrs[self.name] = value
        else:
            obj.__dict__[self.name] = value


def make_server_class(original_cls, pool):
    """PromptServer subclass: per-worker client/node/prompt ids, per-GPU `status` for per-GPU sockets."""

    class MultiGpuPromptServer(original_cls):
        client_id = WorkerAttribute("client_id")
        last_node_id = WorkerAttribute("last_node_id")
        last_prompt_id = WorkerAttribute("last_prompt_id")

        async def send(self, event, data, sid=None):
            connecting = (event == "status" and sid is not None and isinstance(data, dict)
                          and data.get("sid") == sid)     # the /ws handler's first message
            if connecting:
                target = request_target()
                if target is None:
                    pool.socket_targets.pop(sid, None)
                else:
                    pool.socket_targets[sid] = target
            await original_cls.send(self, event, data, sid)
            if connecting and getattr(current_request.get(), "dashboard", False):
                pool.board.subscribers.add(sid)          # /ws?multigpu=1: live per-GPU state
                pool.board.touch()
            if connecting:
                # Stock resends the current node to a client reconnecting mid-prompt (server.py:289);
                # its check reads the process-wide client_id, so look in every worker instead.
                for worker in pool.workers:
                    node = worker.host_state.attrs.get("last_node_id")
                    if worker.host_state.attrs.get("client_id") == sid and node is not None:
                        await original_cls.send(self, "executing", {"node": node}, sid)

        async def send_json(self, event, data, sid=None):
            if sid is not None and sid not in self.sockets and pool.fleet is not None and pool.fleet.relay:
                pool.fleet.relay.outgoing(event, data, sid)      # its socket is on another machine
                return
            await original_cls.send_json(self, event, data, sid)

        async def send_bytes(self, event, data, sid=None):
            if sid is not None and sid not in self.sockets and pool.fleet is not None and pool.fleet.relay:
                pool.fleet.relay.outgoing(event, data, sid)
                return
            await original_cls.send_bytes(self, event, data, sid)

        def send_sync(self, event, data, sid=None):
            worker = current_worker.get()
            if worker is not None and event in ("progress", "executing"):
                pool.board.note_event(worker.gpu_id, event, data)    # the dashboard's live progress
            original_cls.send_sync(self, event, data, sid)

        def queue_updated(self):
            pool.board.touch()
            queue = self.prompt_queue
            total = {"exec_info": {"queue_remaining": sum(queue.tasks_remaining_of(w.gpu_id)
                                                          for w in pool.workers)}}
            targets = {sid: gpu for sid, gpu in list(pool.socket_targets.items()) if sid in self.sockets}
            if len(targets) != len(pool.socket_targets):
                for sid in set(pool.socket_targets) - set(targets):
                    pool.socket_targets.pop(sid, None)
            if not targets:
                self.send_sync("status", {"status": total})
                return
            for sid in list(self.sockets):
                if sid in targets:
                    info = {"exec_info": {"queue_remaining": queue.tasks_remaining_of(targets[sid])}}
                    self.send_sync("status", {"status": info}, sid)
                else:
                    self.send_sync("status", {"status": total}, sid)

    MultiGpuPromptServer.__qualname__ = MultiGpuPromptServer.__name__ = "MultiGpu" + original_cls.__name__
    return MultiGpuPromptServer


def make_args_class(original_cls, pool):
    """argparse.Namespace subclass whose preview_method is per worker (latent_preview.py:80, 132-138)."""
    return type("MultiGpu" + original_cls.__name__, (original_cls,),
                {"preview_method": WorkerAttribute("preview_method"),
                 "__doc__": "ComfyUI args with a per-worker preview_method."})
