"""The prompt journal: every accepted prompt is written to SQLite (WAL) before POST /prompt answers,
and its history entry when it finishes, so that a crash or kill -9 loses nothing accepted.

On start-up the pool reads it back: finished prompts into history, unfinished ones (waiting or
running at the crash) into the queues again. Sensitive extra data (API keys) is never written, so a
prompt that needed one and was interrupted by a crash runs again without it.
Host objects touched: none (folder_paths gives the directory, in activation.py).
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger("comfy_multigpu")

SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    prompt_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,            -- acceptance order
    state TEXT NOT NULL,             -- 'queued' or 'done'
    number REAL NOT NULL,            -- queue number (priority band included)
    target INTEGER,                  -- pinned GPU, NULL for auto
    pool TEXT,                       -- GPU pool, NULL for any
    item TEXT NOT NULL,              -- JSON [prompt, extra_data, outputs_to_execute]
    entry TEXT,                      -- JSON history entry once done
    gpu_id INTEGER,                  -- where it ran
    accepted REAL NOT NULL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS prompts_state ON prompts (state, seq);
"""


@dataclass(frozen=True)
class Unfinished:
    prompt_id: str
    number: float
    target: Optional[int]
    pool: Optional[str]
    prompt: dict
    extra_data: dict
    outputs: list


class Journal:
    """One SQLite file, one connection shared under a lock (writes are short; WAL keeps readers out of
    the writers' way)."""

    def __init__(self, path: str, keep_done: int = 10000):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.keep_done = keep_done
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")     # durable across process crashes; fsync at checkpoints
        self.db.executescript(SCHEMA)
        self._seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM prompts").fetchone()[0]
        self._done_since_prune = 0

    def close(self) -> None:
        with self.lock:
            self.db.close()

    # ---- writes ----------------------------------------------------------------------------
    def accepted(self, prompt) -> None:
        """Before POST /prompt answers. `prompt` is a runtime.prompt.QueuedPrompt; its sensitive part
        is left out."""
        data = json.dumps([prompt.prompt, prompt.extra_data, prompt.outputs], default=str)
        with self.lock:
            self._seq += 1
            self.db.execute("INSERT OR REPLACE INTO prompts (prompt_id, seq, state, number, target, pool, item, "
                            "accepted) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
                            (prompt.prompt_id, self._seq, float(prompt.number), prompt.target, prompt.pool, data,
                             time.time()))

    def finished(self, prompt_id: str, gpu_id: int, entry: dict) -> None:
        with self.lock:
            self.db.execute("UPDATE prompts SET state='done', entry=?, gpu_id=?, finished=?, item='[]' "
                            "WHERE prompt_id=?", (json.dumps(entry, default=str), gpu_id, time.time(), prompt_id))
            self._done_since_prune += 1
            if self._done_since_prune >= 500:
                self._prune()

    def forget(self, prompt_ids) -> None:
        """Dequeued by a client, or deleted from history: gone after a restart too."""
        ids = [(p,) for p in prompt_ids]
        if ids:
            with self.lock:
                self.db.executemany("DELETE FROM prompts WHERE prompt_id=?", ids)

    def forget_history(self) -> None:
        with self.lock:
            self.db.execute("DELETE FROM prompts WHERE state='done'")

    def _prune(self) -> None:
        self._done_since_prune = 0
        self.db.execute("DELETE FROM prompts WHERE state='done' AND seq NOT IN (SELECT seq FROM prompts WHERE "
                        "state='done' ORDER BY finished DESC LIMIT ?)", (self.keep_done,))

    # ---- reads (start-up) ------------------------------------------------------------------
    def history(self) -> list[tuple[str, dict]]:
        """Finished prompts, oldest finish first (the newest keep_done)."""
        with self.lock:
            rows = self.db.execute("SELECT prompt_id, entry, gpu_id FROM (SELECT * FROM prompts WHERE state='done' "
                                   "ORDER BY finished DESC LIMIT ?) ORDER BY finished", (self.keep_done,)).fetchall()
        out = []
        for prompt_id, entry, gpu_id in rows:
            try:
                data = json.loads(entry)
            except (TypeError, ValueError):
                logger.warning("Journal: unreadable history entry of %s skipped", prompt_id)
                continue
            data["gpu_id"] = gpu_id
            out.append((prompt_id, data))
        return out

    def unfinished(self) -> list[Unfinished]:
        """Prompts accepted and not finished (waiting, or running when the process died), in order."""
        with self.lock:
            rows = self.db.execute("SELECT prompt_id, number, target, pool, item FROM prompts WHERE state='queued' "
                                   "ORDER BY seq").fetchall()
        out = []
        for prompt_id, number, target, pool, item in rows:
            try:
                prompt, extra_data, outputs = json.loads(item)
            except (TypeError, ValueError):
                logger.warning("Journal: unreadable queued prompt %s skipped", prompt_id)
                continue
            out.append(Unfinished(prompt_id, number, target, pool, prompt, extra_data, outputs))
        return out
