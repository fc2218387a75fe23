"""FleetScheduler: the Scheduler of a fleet member. Admission, the fleet-wide views (/queue, /history,
deletes) and completion go to the shared queue in Redis (fleet/store.py); what this machine runs is
in its LocalScheduler, fed by fleet/intake.py with the prompts its GPUs take from their lanes.
Per-GPU views (a request with X-TARGET-GPU, /queue/all) stay this machine's. Host objects touched: none.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

from ..policy import fleet_lanes
from ..policy.errors import ApiError
from ..runtime.prompt import ExecutionStatus, Lease, QueuedPrompt
from ..runtime.scheduler import DuplicatePrompt, QueueSnapshot, Scheduler
from .store import ERRORS, FleetStore, Taken

logger = logging.getLogger("comfy_multigpu")


@dataclass(frozen=True)
class Placement:
    """Where an admitted prompt may run (the POST /prompt answer)."""
    gpu: Optional[int]              # the door's GPU it is pinned to, else None
    number: float
    lane: str
    node: Optional[str]             # the machine it is pinned to, else None

    def where(self) -> dict:
        band, target = fleet_lanes.split_lane(self.lane)
        kind = target.split(":", 1)[0]
        text = {"g": f"GPU {self.gpu} of machine {self.node}", "n": f"any GPU of machine {self.node}",
                "h": f"GPU {target[2:]}, which ran this client's last prompt (others if it is busy)",
                "p": f"a GPU of pool {target[2:]}", "m": f"a GPU holding {target[2:]} (others after a delay)",
                "any": "any GPU of the fleet"}.get(kind, target)
        return {"band": band, "runs_on": text, "node": self.node}


def unavailable(ex: BaseException) -> ApiError:
    return ApiError(503, "fleet_unavailable", f"the fleet queue (Redis) cannot be reached or refused: {ex}",
                    "nothing was queued; retry shortly (the server reconnects by itself)",
                    headers={"Retry-After": "2"})


class FleetScheduler(Scheduler):
    def __init__(self, local, store: FleetStore, settings, members: Sequence):
        self.local = local                      # LocalScheduler: what this machine runs
        self.store = store
        self.settings = settings                # policy.config.FleetSettings
        self.members = members                  # GpuWorker per local GPU
        self._lock = threading.Lock()
        self._held: dict[str, Taken] = {}       # prompt id -> the lease this machine holds (renewed)
        self._runs: dict = {}                   # local QueuedPrompt (by identity) -> the lease it runs for
        self._parked: dict = {}                 # prompt id -> QueuedPrompt waiting for an earlier run
        self._unsent: list[tuple] = []          # completions Redis did not get yet (retried by intake)
        self.fenced = 0                         # completions refused: another attempt owned the prompt
        self.on_free: Callable[[], None] = lambda: None   # a local GPU may take again (intake)

    # ---- settings read through ---------------------------------------------------------------
    pools = property(lambda self: self.local.pools)
    default_pool = property(lambda self: self.local.default_pool)
    limits = property(lambda self: self.local.limits)
    mean_run_s = property(lambda self: self.local.mean_run_s)
    journal = property(lambda self: None)

    @property
    def node(self) -> str:
        return self.settings.node

    # ---- admission ---------------------------------------------------------------------------
    def admit(self, prompt: QueuedPrompt, node: Optional[str] = None, front: bool = False,
              idempotency_key: str = "") -> Placement:
        """Into its lane in Redis (durable when this returns); raises DuplicatePrompt for a prompt id or
        Idempotency-Key already seen, ApiError 503 while Redis cannot be reached or while draining."""
        if self.local.draining:
            raise ApiError(503, "draining", "this machine is shutting down and accepts no new prompts",
                           "send it to another machine of the fleet", headers={"Retry-After": "5"})
        gpu = prompt.target
        if gpu is not None and node is None:
            node = self.node
        model = fleet_lanes.affinity_model(prompt.models) if prompt.gang <= 1 else None
        pool = prompt.pool if prompt.pool not in (None, "all") else None
        lane = fleet_lanes.lane(fleet_lanes.band_of(prompt.priority, front),
                                fleet_lanes.lane_target(node, gpu, pool, model))
        client = prompt.client_id or ""
        fields = {"door": self.node, "client_id": client, "gang": prompt.gang, "strategy": prompt.strategy,
                  "pool": prompt.pool or "", "priority": prompt.priority or "", "target_gpu":
                  "" if gpu is None else gpu, "target_node": node or "", "models": ",".join(sorted(prompt.models))}
        record = [prompt.prompt_id, prompt.prompt, prompt.extra_data, prompt.outputs]
        band = fleet_lanes.band_of(prompt.priority, front)
        homeable = node is None and pool is None and prompt.gang <= 1 and bool(client)
        try:
            kind, reply = self.store.enqueue(lane, prompt.prompt_id, idempotency_key, front, fields, record,
                                             prompt.sensitive, band if homeable else "", client)
        except ERRORS as ex:
            raise unavailable(ex) from None
        if kind == "dup":
            pid, state, number, dgpu, _dnode = reply
            raise DuplicatePrompt(pid, state, int(dgpu) if dgpu.lstrip("-").isdigit() else None, int(float(number)))
        return Placement(gpu, int(reply[0]), reply[1], node)

    def stock_number(self, number: float, front: bool = False) -> float:
        return number                           # the fleet numbers prompts itself (admit)

    def restore(self, journal) -> tuple[int, int]:
        return 0, 0                             # the fleet queue is the journal

    def cancel(self, match: Callable[[QueuedPrompt], bool], gpus: Optional[Iterable[int]] = None,
               first_only: bool = False) -> list:
        if gpus is not None:
            return self.local.cancel(match, gpus, first_only)
        removed = []
        for prompt in self._fleet_pending():
            try:
                hit = match(prompt) and self.store.cancel(prompt.prompt_id)
            except ERRORS as ex:
                raise unavailable(ex) from None
            if hit:
                removed.append(prompt.prompt_id)
                if first_only:
                    break
        return removed

    # ---- leases: this machine's --------------------------------------------------------------
    def hold(self, taken: Taken) -> None:
        """A prompt this machine took: its lease is renewed from now on (also while its inputs are
        fetched, and while it waits here)."""
        with self._lock:
            self._held[taken.prompt_id] = taken

    def run_locally(self, taken: Taken, gpu_id: int) -> None:
        """A prompt GPU `gpu_id` took from the fleet: into this machine's queue, pinned to that GPU
        (or, for a prompt that needs several GPUs, to this machine). If an earlier attempt of it still
        runs here (its lease was lost meanwhile), this one waits until that one has ended."""
        number, prompt_id, graph, extra, outputs = taken.record[:5]
        local = QueuedPrompt.from_stock((number, prompt_id, graph, extra, outputs, taken.sensitive))
        if local.gang <= 1:
            local = QueuedPrompt.from_stock((number, prompt_id, graph, extra, outputs, taken.sensitive),
                                            target=gpu_id)
        with self._lock:
            self._held[prompt_id] = taken
            if self.local.locate(prompt_id) is not None:
                self._parked[prompt_id] = local
                return
            self._runs[local] = taken
        self.local.admit(local, restoring=True)

    def running_here(self) -> list[Taken]:
        """The leases this machine holds (renewed by the intake's upkeep)."""
        with self._lock:
            return list(self._held.values())

    def take_next(self, gpu_id: int) -> Optional[Lease]:
        return self.local.take_next(gpu_id)

    def wait_next(self, gpu_id: int):
        return self.local.wait_next(gpu_id)

    def lease_workers(self, prompt: QueuedPrompt, gpu_ids: Sequence[int]) -> Optional[Lease]:
        return self.local.lease_workers(prompt, gpu_ids)

    def requeue(self, lease: Lease) -> None:
        self.local.requeue(lease)

    def finish(self, lease: Lease, result: dict, status: ExecutionStatus, run_s: float = 0.0) -> dict:
        entry = self.local.finish(lease, result, status, run_s)
        with self._lock:
            taken = self._runs.pop(lease.prompt, None)
            current = taken is not None and self._held.get(lease.prompt_id) is taken
            if current:
                del self._held[lease.prompt_id]
        if taken is not None:
            entry = dict(entry, node=self.node)
            self.local.forget_history(lease.prompt_id)      # the fleet's history is the one served
            if current:
                free = not self.local.draining and self.local.tasks_remaining([lease.gpu_id]) == 0
                self._send_completion(taken, entry, lease.prompt.client_id or "", free)
            else:
                self.fenced += 1
                logger.warning("Fleet: %s ended here after its lease was lost; this result is dropped",
                               lease.prompt_id)
            self._unpark(lease.prompt_id)
        self.on_free()
        return entry

    def _unpark(self, prompt_id: str) -> None:
        """The newer attempt of a prompt whose earlier attempt just ended here runs now."""
        with self._lock:
            local = self._parked.pop(prompt_id, None)
            taken = self._held.get(prompt_id)
            if local is None or taken is None:
                return
            self._runs[local] = taken
        self.local.admit(local, restoring=True)

    def _send_completion(self, taken: Taken, entry: dict, client: str = "", free: bool = False) -> None:
        try:
            accepted = self.store.complete(taken, entry, output_files(entry), client, free)
        except ERRORS as ex:
            logger.warning("Fleet: could not record that %s finished (%s); retrying until Redis answers",
                           taken.prompt_id, ex)
            with self._lock:
                self._unsent.append((taken, entry))
            return
        if not accepted:
            self.fenced += 1
            logger.warning("Fleet: %s finished here after its lease passed to another attempt; this result "
                           "is dropped (the other attempt's is the prompt's)", taken.prompt_id)

    def retry_completions(self) -> None:
        with self._lock:
            unsent, self._unsent = self._unsent, []
        for taken, entry in unsent:
            self._send_completion(taken, entry)

    def hand_back_all(self) -> int:
        """Shutdown: prompts taken but not started here go back to their lanes."""
        given = []
        _running, pending = self.local.queue_items()
        for prompt in pending:
            if self.local.cancel(lambda p, me=prompt: p is me):
                with self._lock:
                    taken = self._runs.pop(prompt, None)
                    if taken is not None and self._held.get(prompt.prompt_id) is taken:
                        given.append(self._held.pop(prompt.prompt_id))
        with self._lock:
            for prompt_id in list(self._parked):
                self._parked.pop(prompt_id)
                if prompt_id in self._held:
                    given.append(self._held.pop(prompt_id))
        count = 0
        for taken in given:
            try:
                count += self.store.hand_back(taken)
            except ERRORS:
                pass                            # its lease expires and another machine takes it
        return count

    def give_back(self, taken: Taken) -> None:
        """A prompt taken here that cannot run here: back to its lane (no attempt counted)."""
        with self._lock:
            if self._held.get(taken.prompt_id) is taken:
                del self._held[taken.prompt_id]
        try:
            self.store.hand_back(taken)
        except ERRORS:
            pass                                # its lease expires and another machine takes it

    def lost(self, prompt_id: str) -> None:
        """Renewal found the lease taken over: stop renewing it; drop it from this machine's queue if it
        has not started, stop the run here if there is one (its result is dropped)."""
        with self._lock:
            self._held.pop(prompt_id, None)
            self._parked.pop(prompt_id, None)
        waiting: list = []                   # still queued here (a gang waiting for free GPUs): dropped

        def match(prompt: QueuedPrompt) -> bool:
            if prompt.prompt_id == prompt_id:
                waiting.append(prompt)
                return True
            return False
        self.local.cancel(match)
        with self._lock:
            for prompt in waiting:
                self._runs.pop(prompt, None)
        for worker in self.members:
            lease = worker.lease
            if lease is not None and lease.prompt_id == prompt_id and not lease.ended.is_set():
                worker.interrupt_lease(lease)

    def post(self, gpu_ids, name, value, append=False) -> None:
        self.local.post(gpu_ids, name, value, append)

    # ---- state -------------------------------------------------------------------------------
    @property
    def draining(self) -> bool:
        return self.local.draining

    def start_draining(self) -> bool:
        return self.local.start_draining()

    def stop_draining(self) -> None:
        self.local.stop_draining()

    def close(self) -> None:
        self.local.close()

    def check_health(self, now: float, limit_s: float) -> None:
        self.local.check_health(now, limit_s)

    def wake(self) -> None:
        self.local.wake()
        self.on_free()

    # ---- views -------------------------------------------------------------------------------
    def snapshot(self, detail: bool = False) -> QueueSnapshot:
        return self.local.snapshot(detail)

    def locate(self, prompt_id: str):
        known = self.local.locate(prompt_id)
        if known is not None:
            return known
        try:
            job = self.store.job(prompt_id)
            if job:
                gpu = int(job["gpu"]) if job.get("gpu", "").isdigit() else None
                return ("running" if job.get("state") == "running" else "queued", gpu, float(job["number"]))
            entry = self.store.history_entry(prompt_id)
        except ERRORS as ex:
            raise unavailable(ex) from None
        if entry is not None:
            return "done", entry.get("gpu_id"), float(entry["prompt"][0])
        return None

    def _fleet_jobs(self) -> list[dict]:
        try:
            return self.store.active_jobs()
        except ERRORS as ex:
            raise unavailable(ex) from None

    def _fleet_pending(self) -> list[QueuedPrompt]:
        return [job_prompt(job) for job in self._fleet_jobs() if job.get("state") == "waiting"]

    def queue_items(self, gpus=None) -> tuple[list, list]:
        if gpus is not None:
            return self.local.queue_items(gpus)
        running, pending = [], []
        for job in self._fleet_jobs():
            prompt = job_prompt(job)
            if job.get("state") == "running":
                gpu = int(job["gpu"]) if job.get("gpu", "").isdigit() else 0
                running.append(Lease(-1, prompt, (gpu,), record=prompt.public()))
            else:
                pending.append(prompt)
        return running, pending

    def tasks_remaining(self, gpus=None) -> int:
        if gpus is not None:
            return self.local.tasks_remaining(gpus)
        try:
            return self.store.active_count()
        except ERRORS:
            return self.local.tasks_remaining()

    def history(self, prompt_id=None, max_items=None, offset=-1, map_function=None) -> dict:
        """execution.PromptQueue.get_history's contract, over the fleet's history."""
        try:
            if prompt_id is not None:
                entry = self.store.history_entry(str(prompt_id))
                if entry is None:
                    return {}
                return {prompt_id: map_function(entry) if map_function else entry}
            size = self.store.history_size()
            if offset < 0 and max_items is not None:
                offset = size - max_items
            offset = max(offset, 0)
            stop = -1 if max_items is None else offset + max_items - 1
            ids = self.store.history_ids(offset, stop) if max_items != 0 else []
            entries = self.store.history_entries(ids)
        except ERRORS as ex:
            raise unavailable(ex) from None
        return {i: (map_function(entries[i]) if map_function else entries[i]) for i in ids if i in entries}

    def forget_history(self, prompt_id: str) -> None:
        if prompt_id is None:
            return
        try:
            self.store.forget(str(prompt_id))
        except ERRORS as ex:
            raise unavailable(ex) from None

    def clear_history(self) -> None:
        try:
            self.store.clear_history()
        except ERRORS as ex:
            raise unavailable(ex) from None


def job_prompt(job: dict) -> QueuedPrompt:
    """A fleet job hash as the typed prompt the views use (its sensitive part left out)."""
    import json
    number, prompt_id, graph, extra, outputs = json.loads(job["record"])[:5]
    return QueuedPrompt.from_stock((number, prompt_id, graph, extra, outputs))


def output_files(entry: dict) -> list[str]:
    """"<type>/<subfolder>/<filename>" of every file a history entry's outputs name."""
    keys = []
    for output in (entry.get("outputs") or {}).values():
        if not isinstance(output, dict):
            continue
        for items in output.values():
            for item in items if isinstance(items, list) else ():
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    keys.append(file_key(item.get("type") or "output", item.get("subfolder") or "",
                                         item["filename"]))
    return keys


def file_key(kind: str, subfolder: str, filename: str) -> str:
    return f"{kind}/{subfolder.strip('/')}/{filename}"
