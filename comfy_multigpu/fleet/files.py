"""Files across the fleet: output numbers unique across machines (a block of numbers reserved in Redis
per saving node), inputs uploaded at one machine fetched by the machine that runs the prompt, and
/view of a file another machine holds, streamed from it. Host objects touched: folder_paths
(get_input_directory, get_directory_by_type, annotated names), PromptServer routes (through api/).
"""
from __future__ import annotations

import logging
import os
import re
import urllib.parse
import urllib.request
from typing import Optional

from .scheduler import file_key
from .store import ERRORS, FleetStore

logger = logging.getLogger("comfy_multigpu")

NAME_BLOCK = 1000          # numbers one saving node may use; more than any batch a node saves
FETCH_TIMEOUT_S = 60.0


def local_next(folder: str, filename: str) -> int:
    """The next number ComfyUI would give `filename` in `folder` (folder_paths.get_save_image_path)."""
    pattern = re.compile(re.escape(filename) + r"_(\d+)", re.IGNORECASE)
    best = 0
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 1
    for name in names:
        match = pattern.match(name)
        if match and name[len(filename)] == "_":
            best = max(best, int(match.group(1)))
    return best + 1


class FleetNames:
    """Output numbering: folder_paths counts files on this machine only; the fleet reserves blocks."""

    def __init__(self, store: FleetStore):
        self.store = store
        self._held: dict[tuple, tuple] = {}         # (folder, filename) -> (fleet key, reserved end)

    @staticmethod
    def key(folder: str, filename: str) -> str:
        import folder_paths
        for kind in ("output", "temp", "input"):
            base = folder_paths.get_directory_by_type(kind)
            if base and os.path.abspath(folder).startswith(os.path.abspath(base)):
                sub = os.path.relpath(folder, base)
                return f"{kind}/{'' if sub == '.' else sub}/{filename}"
        return f"other/{folder}/{filename}"

    def reserve(self, folder: str, filename: str, counter: int) -> int:
        """The number to save from: unique across machines (this machine's own count if Redis is away)."""
        key = self.key(folder, filename)
        try:
            start = self.store.name_reserve(key, counter, NAME_BLOCK)
        except ERRORS as ex:
            logger.warning("Fleet: output numbers of %s counted on this machine only (Redis: %s)", key, ex)
            return counter
        self._held[(folder, filename)] = (key, start + NAME_BLOCK)
        return start

    def release(self, folder: str, filename: str) -> None:
        held = self._held.pop((folder, filename), None)
        if held is None:
            return
        try:
            self.store.name_release(held[0], held[1], local_next(folder, filename))
        except ERRORS:
            pass                    # the next save starts after the reserved block: unique still


class FleetInputs:
    """Inputs uploaded at one machine, for prompts that run on another."""

    def __init__(self, store: FleetStore, machines):
        self.store = store
        self.machines = machines                    # () -> {name: registration}
        self.fetched = 0

    def note_upload(self, answer: dict) -> None:
        """After a stock /upload/image|mask answered {name, subfolder, type}: this machine has it."""
        if not isinstance(answer, dict) or not isinstance(answer.get("name"), str):
            return
        kind = answer.get("type") or "input"
        self.store.note_file("uploads", file_key(kind, answer.get("subfolder") or "", answer["name"]))

    def fetch_for(self, graph: dict) -> int:
        """Bring every uploaded input the prompt names that this machine lacks (one look-up in Redis
        for all of them); returns how many were fetched."""
        import folder_paths
        base = os.path.realpath(folder_paths.get_input_directory())
        wanted = {}
        for value in _strings(graph):
            name = re.sub(r"\s*\[(input|output|temp)\]$", "", value)
            if len(name) > 1024 or "\\" in name or "\x00" in name or name.startswith("/"):
                continue
            subfolder, _, filename = name.rpartition("/")
            if not filename or ".." in name.split("/"):
                continue
            path = os.path.realpath(os.path.join(base, subfolder, filename))
            if not path.startswith(base + os.sep):
                continue                    # never outside the input folder
            if not os.path.exists(path):
                wanted[file_key("input", subfolder, filename)] = (subfolder, filename, path)
        if not wanted:
            return 0
        count = 0
        for key, owner in zip(wanted, self.store.file_owners("uploads", list(wanted))):
            if owner is None or owner == self.store.node:
                continue
            subfolder, filename, path = wanted[key]
            url = self.machines().get(owner, {}).get("url")
            if not url:
                logger.warning("Fleet: input %s is on machine %s, which is not up", filename, owner)
                continue
            query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": "input"})
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with _NO_REDIRECTS.open(f"{url}/view?{query}", timeout=FETCH_TIMEOUT_S) as answer:
                data = answer.read()
            partial = f"{path}.{os.getpid()}.part"
            with open(partial, "wb") as out:
                out.write(data)
            os.replace(partial, path)
            count += 1
            self.fetched += 1
            logger.info("Fleet: fetched input %s from machine %s (%d bytes)", key, owner, len(data))
        return count


class _Refuse(urllib.request.HTTPRedirectHandler):
    """Inputs come from the machine the fleet's index names, never from where it redirects."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_NO_REDIRECTS = urllib.request.build_opener(_Refuse)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def view_owner(store: FleetStore, query) -> Optional[str]:
    """The machine that holds the file a /view query names, or None (unknown, or this one)."""
    kind = query.get("type") or "output"
    filename = query.get("filename") or ""
    subfolder = query.get("subfolder") or ""
    if not filename:
        return None
    table = "uploads" if kind == "input" else "files"
    owner = store.file_owner(table, file_key(kind, subfolder, filename))
    return owner if owner != store.node else None
