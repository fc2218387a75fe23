"""FleetStore: the fleet's shared queue in Redis (>= 7.0, or Valkey), through redis-py. Every
read-then-write is one call of the function library library.lua; this module names the keys, encodes
and decodes. Host objects touched: none.

Keys (prefix cmg:):
  lane:<band>:<target>   stream per priority band x target (policy/fleet_lanes.py), consumer group
                         "workers"; an entry is {job: prompt id}; a running prompt's entry stays in the
                         group's pending list (its lease) until it completes or is requeued
  lanes                  set of every lane's key
  bell                   stream rung by every enqueue and requeue: idle GPUs block on it (XREAD)
  job:<id>               hash: record (the stock [number, id, prompt, extra_data, outputs] JSON),
                         sensitive, state (waiting | running), lane, entry, attempts, token (fencing),
                         owner (consumer "<node>:<gpu>"), node, gpu, door, client_id, ...
  active                 sorted set of waiting and running ids by queue number
  hist:<id>, history     stock-shaped history entry (JSON, with gpu_id and node); ids by completion
  idle                   consumers blocked on the bell (free GPUs)
  home:<client_id>       the consumer that ran the client's last prompt (holds its execution cache; an hour)
  idem:<key>             Idempotency-Key -> prompt id (a day)
  number, histseq        counters
  node:<name>            a machine's registration (JSON; expires unless refreshed)
  files, uploads         "<type>/<subfolder>/<filename>" -> machine holding the file
  names                  next free output number per "<subfolder>/<prefix>" across the fleet
  stats                  completed, failed, redelivered, fenced
  channel cmg:events     events for WebSocket clients connected to another machine
  channel cmg:control    interrupts by prompt id
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterable, Optional

import redis

logger = logging.getLogger("comfy_multigpu")

P = "cmg:"
GROUP = "workers"
BELL = P + "bell"
EVENTS = P + "events"
CONTROL = P + "control"
REGISTRY_TTL_S = 15.0
LIBRARY = Path(__file__).with_name("library.lua")
# Every failure of Redis to do what was asked (unreachable, loading, out of memory under noeviction,
# read-only replica after a failover, ...): callers answer 503 or retry, never 500.
ERRORS = (redis.exceptions.RedisError,)


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else ("" if value is None else str(value))


def failure_status(message: str, kind: str = "FleetError") -> str:
    """The history status of a prompt the fleet gave up on, as stock writes an execution error."""
    return json.dumps({"status_str": "error", "completed": False, "messages": [
        ["execution_error", {"prompt_id": "", "node_id": "", "node_type": "", "executed": [],
                             "exception_message": message, "exception_type": kind, "traceback": [],
                             "current_inputs": {}, "current_outputs": {}, "timestamp": int(time.time() * 1000)}]]})


class Taken:
    """A prompt this machine took from a lane: what it needs to run, renew and complete it."""
    __slots__ = ("prompt_id", "token", "record", "sensitive", "lane", "entry", "attempts", "consumer")

    def __init__(self, reply: list, consumer: str):
        self.prompt_id, token, record, sensitive, self.lane, self.entry, attempts = (_s(v) for v in reply)
        self.token, self.attempts, self.consumer = token, int(attempts), consumer
        self.record = json.loads(record)
        self.sensitive = json.loads(sensitive) if sensitive else {}


class FleetStore:
    def __init__(self, url: str, node: str, client: Optional[redis.Redis] = None):
        self.url = url
        self.node = node
        self.redis = client or redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=3,
                                                    health_check_interval=10, retry_on_timeout=False)
        self.calls = 0                  # Redis commands this process sent (reads per prompt, bench)

    def _call(self, *args):
        self.calls += 1
        return self.redis.execute_command(*args)

    def _fcall(self, name: str, keys: Iterable[str], args: Iterable) -> object:
        keys = list(keys)
        argv = [_s(a) if not isinstance(a, (int, float)) else a for a in args]
        try:
            return self._call("FCALL", name, len(keys), *keys, *argv)
        except redis.exceptions.ResponseError as ex:
            if "function not found" not in str(ex).lower():
                raise
            self.load_library()             # Redis restarted without its data, or FUNCTION FLUSH
            return self._call("FCALL", name, len(keys), *keys, *argv)

    # ---- set-up ------------------------------------------------------------------------------
    def load_library(self) -> str:
        """Load (or replace) the function library; returns the server's version."""
        info = self.redis.info("server")
        version = str(info.get("redis_version", "0"))
        major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
        if major < 7:
            raise RuntimeError(f"the fleet queue needs Redis >= 7.0 (Redis Functions); the server at the "
                               f"fleet URL runs {version}")
        self._call("FUNCTION", "LOAD", "REPLACE", LIBRARY.read_text())
        return version

    def ping(self) -> bool:
        try:
            return bool(self._call("PING"))
        except ERRORS:
            return False

    # ---- queue -------------------------------------------------------------------------------
    def enqueue(self, lane: str, prompt_id: str, idem: str, front: bool, fields: dict, record: list,
                sensitive: dict, home_band: str = "", client: str = "") -> tuple[str, list]:
        """("ok", [number, lane]) or ("dup", [id, state, number, gpu, node]). With `home_band`, a client
        whose last prompt ran on some GPU waits in that GPU's home lane of the band instead. Durable
        when it returns (the server's appendfsync always)."""
        reply = self._fcall("cmg_enqueue", [lane], [prompt_id, idem, -1 if front else 1, json.dumps(fields),
                                                    json.dumps(record), json.dumps(sensitive), home_band, client])
        reply = [_s(v) for v in reply]
        return reply[0], reply[1:]

    def take(self, order: list, consumer: str, gpu: int, steal_after_s: float) -> tuple[Optional[Taken], float]:
        """(what `consumer` takes, 0) or (None, seconds until a prompt of a lane it may steal from is
        due, -1 when none waits). `order`: (lane, consumers it prefers or None for its own lanes), in
        the order to read them (policy/fleet_lanes.read_order)."""
        kinds = ["-" if prefer is None else "+" + ",".join(prefer) for _lane, prefer in order]
        reply = self._fcall("cmg_take", [lane for lane, _ in order],
                            [consumer, self.node, gpu, int(steal_after_s * 1000), *kinds])
        if _s(reply[0]) == "wait":
            due = int(reply[1])
            return None, (due / 1000.0 if due >= 0 else -1.0)
        return Taken(reply, consumer), 0.0

    def not_idle(self, consumer: str) -> None:
        self._fcall("cmg_not_idle", [], [consumer])

    def renew(self, taken: Taken) -> bool:
        return bool(self._fcall("cmg_renew", [taken.lane], [taken.prompt_id, taken.token, taken.consumer,
                                                            taken.entry]))

    def complete(self, taken: Taken, entry: dict, files: list, client: str = "", free: bool = False) -> bool:
        """True: the history entry is the prompt's; False: fenced (another attempt owns it now).
        `client`: its next prompts prefer this GPU; `free`: the GPU is idle from now on."""
        reply = self._fcall("cmg_complete", [taken.lane], [taken.prompt_id, taken.token, taken.consumer,
                                                           taken.entry, json.dumps(entry), json.dumps(files),
                                                           client, "1" if free else "0"])
        return _s(reply) == "OK"

    def hand_back(self, taken: Taken) -> bool:
        return bool(self._fcall("cmg_handback", [taken.lane], [taken.prompt_id, taken.token, taken.consumer,
                                                               taken.entry]))

    def reap(self, min_idle_s: float, attempts: int, consumer_prefix: str = "", lanes: tuple = ()) -> list[tuple]:
        """Requeue (or fail after `attempts` starts) leases idle longer than `min_idle_s` in `lanes`
        (none: every lane); with `consumer_prefix`, every lease of those consumers. Returns
        [(prompt id, action)]."""
        reply = self._fcall("cmg_reap", list(lanes), [int(min_idle_s * 1000), attempts, 0,
                                                 f"{self.node}:reaper", consumer_prefix,
                                                 failure_status(f"the prompt was started {attempts} time(s) and "
                                                                f"no machine finished it (COMFY_MULTIGPU_FLEET_"
                                                                f"ATTEMPTS={attempts})")])
        reply = [_s(v) for v in reply]
        return list(zip(reply[0::2], reply[1::2]))

    def cancel(self, prompt_id: str) -> bool:
        return bool(self._fcall("cmg_cancel", [], [prompt_id]))

    def fail_waiting(self, prompt_id: str, message: str) -> bool:
        return bool(self._fcall("cmg_fail_waiting", [], [prompt_id, failure_status(message)]))

    def bell_id(self) -> str:
        last = self._call("XREVRANGE", BELL, "+", "-", "COUNT", 1)
        return _s(last[0][0]) if last else "0-0"

    def wait_bell(self, after: str, timeout_s: float) -> str:
        """Block until the bell rings after `after` (or the timeout); returns the newest id seen."""
        got = self._call("XREAD", "COUNT", 100, "BLOCK", max(1, int(timeout_s * 1000)), "STREAMS", BELL, after)
        if not got:
            return after
        return _s(got[0][1][-1][0])

    def lanes(self) -> list[str]:
        return sorted(_s(v) for v in self._call("SMEMBERS", P + "lanes"))

    def lane_backlog(self) -> dict:
        """lane -> (waiting, leased) counts."""
        out = {}
        for lane in self.lanes():
            try:
                groups = self.redis.xinfo_groups(lane)
            except redis.exceptions.ResponseError:
                continue
            for g in groups:
                if _s(g.get("name")) == GROUP:
                    out[lane] = (int(g.get("lag") or 0), int(g.get("pending") or 0))
        return out

    # ---- jobs and history --------------------------------------------------------------------
    def job(self, prompt_id: str) -> dict:
        return self._hash(P + "job:" + prompt_id)

    def _hash(self, key: str) -> dict:
        raw = self._call("HGETALL", key)
        if isinstance(raw, dict):
            return {_s(k): _s(v) for k, v in raw.items()}
        return {_s(k): _s(v) for k, v in zip(raw[0::2], raw[1::2])}

    def active_jobs(self) -> list[dict]:
        """Every waiting and running prompt's job hash, in queue-number order."""
        ids = [_s(v) for v in self._call("ZRANGE", P + "active", 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for pid in ids:
            pipe.hgetall(P + "job:" + pid)
        self.calls += 1
        jobs = []
        for pid, raw in zip(ids, pipe.execute()):
            if raw:
                job = {_s(k): _s(v) for k, v in raw.items()}
                job["id"] = pid
                jobs.append(job)
        return jobs

    def active_count(self) -> int:
        return int(self._call("ZCARD", P + "active"))

    def history_entry(self, prompt_id: str) -> Optional[dict]:
        raw = self._call("GET", P + "hist:" + prompt_id)
        return json.loads(raw) if raw else None

    def history_ids(self, start: int, stop: int) -> list[str]:
        return [_s(v) for v in self._call("ZRANGE", P + "history", start, stop)]

    def history_size(self) -> int:
        return int(self._call("ZCARD", P + "history"))

    def history_entries(self, ids: list) -> dict:
        if not ids:
            return {}
        values = self._call("MGET", *[P + "hist:" + i for i in ids])
        return {i: json.loads(v) for i, v in zip(ids, values) if v}

    def forget(self, prompt_id: str) -> None:
        self._call("DEL", P + "hist:" + prompt_id)
        self._call("ZREM", P + "history", prompt_id)

    def clear_history(self) -> None:
        ids = self.history_ids(0, -1)
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            self._call("DEL", *[P + "hist:" + i for i in chunk])
            self._call("ZREM", P + "history", *chunk)

    def stats(self) -> dict:
        return {k: int(v) for k, v in self._hash(P + "stats").items()}

    # ---- machines ----------------------------------------------------------------------------
    def register(self, info: dict) -> None:
        self._call("SET", P + "node:" + self.node, json.dumps(info), "PX", int(REGISTRY_TTL_S * 1000))

    def unregister(self) -> None:
        self._call("DEL", P + "node:" + self.node)

    def machines(self) -> dict:
        keys = [_s(k) for k in self.redis.scan_iter(match=P + "node:*", count=100)]
        if not keys:
            return {}
        values = self._call("MGET", *keys)
        return {k[len(P + "node:"):]: json.loads(v) for k, v in zip(keys, values) if v}

    # ---- files -------------------------------------------------------------------------------
    def file_owner(self, kind: str, key: str) -> Optional[str]:
        value = self._call("HGET", P + kind, key)
        return _s(value) if value else None

    def file_owners(self, kind: str, keys: list) -> list:
        values = self._call("HMGET", P + kind, *keys)
        return [_s(v) if v else None for v in values]

    def note_file(self, kind: str, key: str) -> None:
        self._call("HSET", P + kind, key, self.node)

    def name_reserve(self, key: str, local_next: int, block: int) -> int:
        return int(self._fcall("cmg_name_reserve", [], [key, local_next, block]))

    def name_release(self, key: str, reserved_end: int, next_free: int) -> None:
        self._fcall("cmg_name_release", [], [key, reserved_end, next_free])

    # ---- events ------------------------------------------------------------------------------
    def publish(self, channel: str, payload: bytes) -> None:
        self._call("PUBLISH", channel, payload)
