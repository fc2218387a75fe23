"""FleetIntake: the threads that connect this machine's GPUs to the fleet queue. One taker per GPU:
while its GPU is idle it takes the next prompt from its lanes in order of preference (one atomic
call), else blocks on the fleet's bell (XREAD BLOCK: no polling); one upkeep thread registers the
machine, renews the leases of what runs here, retries completions Redis missed, and reaps leases
nobody renewed (requeued, or failed after the attempts). Host objects touched: none.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Optional

from ..policy import fleet_lanes
from .scheduler import FleetScheduler
from .store import ERRORS, REGISTRY_TTL_S

logger = logging.getLogger("comfy_multigpu")

IDLE_BLOCK_S = 5.0          # an idle GPU with nothing to steal re-reads its lanes this often at most
REGISTRY_CACHE_S = 0.5


class FleetIntake:
    def __init__(self, scheduler: FleetScheduler, pool, node_url: str = ""):
        self.scheduler = scheduler
        self.store = scheduler.store
        self.settings = scheduler.settings
        self.pool = pool
        self.node_url = node_url
        self.reachable = False              # Redis answered the last call
        self._since: Optional[float] = None # monotonic time since when Redis has answered
        self.instance = uuid.uuid4().hex    # tells this server's registration from another's
        self.version = ""                   # the Redis server's version, once connected
        self.takes = 0                      # prompts taken by this machine's GPUs
        self.take_calls = 0                 # calls of the take function (taken or not)
        self.wakeups = 0                    # bell wake-ups (blocking reads that returned)
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._registry: tuple[float, dict] = (0.0, {})
        self.before_run = lambda taken: None     # fetches its inputs (FleetMember)
        scheduler.on_free = self.poke

    # ---- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._spawn(self._upkeep, "comfy-multigpu-fleet-upkeep")
        for worker in self.pool.workers:
            self._spawn(lambda w=worker: self._taker(w), f"comfy-multigpu-fleet-gpu{worker.gpu_id}")

    def stop(self, hand_back: bool = True) -> None:
        self._stop.set()
        self.poke()
        if hand_back and self.reachable:
            try:
                for worker in self.pool.workers:
                    self.store.not_idle(f"{self.settings.node}:{worker.gpu_id}")
                given = self.scheduler.hand_back_all()
                if given:
                    logger.info("Fleet: handed back %d prompt(s) taken but not started here", given)
                self.store.unregister()
            except ERRORS:
                pass

    def poke(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _connect(self) -> None:
        """Load the function library and hand back what a previous run of this machine held."""
        delay = 0.5
        while not self._stop.is_set():
            try:
                self.version = self.store.load_library()
                if self._name_taken():
                    self._stop.wait(REGISTRY_TTL_S)
                    continue
                for prompt_id, action in self.store.reap(0, self.settings.attempts,
                                                         consumer_prefix=f"{self.settings.node}:"):
                    logger.warning("Fleet: prompt %s was running here when this machine stopped: %s",
                                   prompt_id, action)
                self._ok()
                self._ready.set()
                logger.info("comfy-multigpu: fleet member %r of %s (Redis %s): lease %.0f s, %d attempt(s), "
                            "steal delay %.1f s", self.settings.node, self.settings.safe_url, self.version,
                            self.settings.lease_s, self.settings.attempts, self.settings.steal_s)
                return
            except ERRORS as ex:
                self._unreachable(ex)
            except Exception:
                logger.exception("Fleet: could not set up the queue in Redis; retrying")
            self._stop.wait(delay)
            delay = min(delay * 2, 5.0)

    def _name_taken(self) -> bool:
        """Another running server is registered under this machine's name (it renews its registration:
        a dead one's stays still). Joining would mix up both machines' leases: refuse, loudly."""
        first = self.store.machines().get(self.settings.node)
        if not first or first.get("instance") == self.instance:
            return False
        self._stop.wait(self._period() + 1.0)
        again = self.store.machines().get(self.settings.node)
        if not again or again.get("time") == first.get("time") or again.get("instance") == self.instance:
            return False                # a previous run of this machine that stopped: take its place
        logger.error("comfy-multigpu: fleet: another server (%s) is registered as machine %r; this one does "
                     "not take prompts until it is gone. Give each server its own COMFY_MULTIGPU_NODE_NAME.",
                     again.get("url"), self.settings.node)
        return True

    def _period(self) -> float:
        return max(0.2, min(self.settings.lease_s / 3, REGISTRY_TTL_S / 3))

    def _unreachable(self, ex: BaseException) -> None:
        if self.reachable:
            logger.warning("Fleet: Redis at %s cannot be reached (%s); reconnecting", self.settings.safe_url, ex)
        self.reachable = False
        self._since = None

    def _ok(self) -> None:
        if not self.reachable:
            self._since = time.monotonic()
        self.reachable = True

    # ---- takers --------------------------------------------------------------------------------
    def _can_take(self, worker) -> bool:
        """Its GPU is free and nothing waits on this machine (a prompt that needs several of its GPUs
        waits until they are free: the others take nothing new meanwhile)."""
        local = self.scheduler.local
        # (the scheduler's state, not worker.lease: the worker clears that only after the finish that
        # pokes this thread)
        return (not self._stop.is_set() and not worker.down and not local.draining
                and local.tasks_remaining([worker.gpu_id]) == 0 and local.snapshot().pending_count == 0)

    def _taker(self, worker) -> None:
        self._ready.wait()
        consumer = f"{self.settings.node}:{worker.gpu_id}"
        bell: Optional[str] = None
        delay = 0.2
        while not self._stop.is_set():
            if not self._can_take(worker):
                with self._cond:
                    self._cond.wait(1.0)
                continue
            try:
                if bell is None:
                    bell = self.store.bell_id()
                order = self._lanes_of(worker)
                self.take_calls += 1
                taken, due = self.store.take(order, consumer, worker.gpu_id, self.settings.steal_s)
                self._ok()
                if taken is not None:
                    self.takes += 1
                    logger.info("[GPU %s] Fleet: took %s from %s (attempt %d)", worker.gpu_id, taken.prompt_id,
                                fleet_lanes.split_lane(taken.lane)[1], taken.attempts)
                    self.scheduler.hold(taken)          # renewed while its inputs are fetched
                    try:
                        self.before_run(taken)
                        self.scheduler.run_locally(taken, worker.gpu_id)
                    except Exception:
                        logger.exception("[GPU %s] Fleet: could not queue %s here; handing it back",
                                         worker.gpu_id, taken.prompt_id)
                        self.scheduler.give_back(taken)
                    continue
                bell = self.store.wait_bell(bell, IDLE_BLOCK_S if due < 0 else min(IDLE_BLOCK_S, max(0.02, due + 0.01)))
                self.wakeups += 1
                if not self._can_take(worker):
                    self.store.not_idle(consumer)
                delay = 0.2
            except ERRORS as ex:
                self._unreachable(ex)
                bell = None
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
            except Exception:
                logger.exception("[GPU %s] Fleet: taking a prompt failed", worker.gpu_id)
                self._stop.wait(1.0)

    def _lanes_of(self, worker) -> list:
        """(lane, GPUs it prefers) in reading order: band by band, this GPU's own lanes (pinned to it,
        its machine, its home lane, pools, models it holds, any), then the lanes it may steal from:
        other GPUs' home lanes and model lanes of models it does not hold (they wait for an idle GPU
        they prefer for the steal delay)."""
        pools = [name for name, gpus in self.scheduler.pools.items() if worker.gpu_id in gpus and name != "all"]
        warm = [key for key in reversed(worker.recent_models()) if fleet_lanes.affinity_model([key]) == key]
        existing = self.store.lanes()      # (a lane made after this read rings the bell: read again)
        own = [name for name in fleet_lanes.gpu_lanes(self.settings.node, worker.gpu_id, pools, warm)
               if name in existing]
        steal = fleet_lanes.steal_lanes(existing, own)
        machines = self._machines() if steal else {}
        holders = _holders(machines)
        me = f"{self.settings.node}:{worker.gpu_id}"
        prefer = {}
        for name in steal:
            target = fleet_lanes.split_lane(name)[1]
            if target.startswith("h:"):       # the home GPU, while its machine is registered
                home = target[2:]
                prefer[name] = [home] if home.rpartition(":")[0] in machines else []
            else:
                prefer[name] = [c for c in holders.get(target[2:], ()) if c != me]
        return fleet_lanes.read_order(own, steal, prefer)

    def _machines(self) -> dict:
        """The machines' registrations, read at most every REGISTRY_CACHE_S by the takers together."""
        stamp, machines = self._registry
        if time.monotonic() - stamp > REGISTRY_CACHE_S:
            machines = self.store.machines()
            self._registry = (time.monotonic(), machines)
        return machines

    # ---- upkeep ------------------------------------------------------------------------------
    def _upkeep(self) -> None:
        self._connect()
        period = self._period()
        while not self._stop.is_set():
            try:
                self._register()
                self._renew()
                self.scheduler.retry_completions()
                self._reap()
                self._ok()
            except ERRORS as ex:
                self._unreachable(ex)
            except Exception:
                logger.exception("Fleet: upkeep pass failed")
            self._stop.wait(period)

    def machine_info(self) -> dict:
        snap = self.scheduler.local.snapshot()
        gpus = []
        for worker, q in zip(self.pool.workers, snap.gpus):
            gpus.append({"gpu": worker.gpu_id, "device": worker.label, "down": worker.down,
                         "idle": not worker.down and not q.busy and q.pending_count == 0,
                         "running": len(q.running), "pending": q.pending_count,
                         "models": [k for k in worker.recent_models() if fleet_lanes.affinity_model([k]) == k]})
        return {"url": self.node_url, "gpus": gpus, "draining": self.scheduler.draining, "time": time.time(),
                "instance": self.instance}

    def _register(self) -> None:
        self.store.register(self.machine_info())

    def _renew(self) -> None:
        for taken in self.scheduler.running_here():
            if not self.store.renew(taken):
                logger.warning("Fleet: the lease of %s passed to another attempt; stopping it here",
                               taken.prompt_id)
                self.scheduler.lost(taken.prompt_id)

    def _reap(self) -> None:
        # Not in the first lease after (re)connecting: an outage ages every lease in Redis, and the
        # machines that are alive renew theirs within lease/3 of reconnecting.
        if self._since is None or time.monotonic() - self._since < self.settings.lease_s:
            return
        for prompt_id, action in self.store.reap(self.settings.lease_s, self.settings.attempts):
            logger.warning("Fleet: lease of %s expired (its machine stopped renewing it): %s", prompt_id, action)
        self._fail_absent()

    def _fail_absent(self) -> None:
        """Prompts pinned to a machine that is not up (or a GPU it does not have) fail after a while."""
        machines = self.store.machines()
        pinned = [lane for lane in self.store.lanes()
                  if fleet_lanes.pinned_node(lane) not in (None, *machines)
                  or _missing_gpu(lane, machines)]
        if not pinned:
            return
        now_ms = time.time() * 1000
        for job in self.store.active_jobs():
            if job.get("state") != "waiting" or job.get("lane") not in pinned:
                continue
            waited_s = (now_ms - int(job.get("entry", "0-0").split("-")[0])) / 1000
            node = fleet_lanes.pinned_node(job["lane"])
            if _missing_gpu(job["lane"], machines):
                reason = f"machine {node!r} has no GPU {job.get('target_gpu')}"
            elif waited_s >= self.settings.absent_s:
                reason = (f"machine {node!r} was not up for {waited_s:.0f} s (COMFY_MULTIGPU_FLEET_ABSENT_TIMEOUT="
                          f"{self.settings.absent_s:g}); machines up: {sorted(machines) or 'none'}")
            else:
                continue
            if self.store.fail_waiting(job["id"], f"the prompt was pinned to {reason}"):
                logger.warning("Fleet: prompt %s failed: pinned to %s", job["id"], reason)


def _missing_gpu(lane: str, machines: dict) -> bool:
    target = fleet_lanes.split_lane(lane)[1]
    if not target.startswith("g:"):
        return False
    node, _, gpu = target[2:].rpartition(":")
    info = machines.get(node)
    return info is not None and gpu.isdigit() and int(gpu) >= len(info.get("gpus", []))


def _holders(machines: dict) -> dict:
    """model key -> consumers ("<machine>:<gpu>") that hold it, from the machines' registrations."""
    held: dict = {}
    for name, info in machines.items():
        for gpu in info.get("gpus", []):
            for key in gpu.get("models", []):
                held.setdefault(key, []).append(f"{name}:{gpu.get('gpu')}")
    return held
