"""Stable JSON errors and request-body checks for the routes the extension owns or changes (pure).

Every refusal has the stock ComfyUI shape `{"error": {"type", "message", "details", "extra_info"}}`
(plus `node_errors` on /prompt, as stock) and never a traceback. Stock validation of a well-formed
graph is left to ComfyUI, so its errors stay exactly as stock.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional

MAX_DEPTH = 64          # JSON nesting we accept before parsing recursion becomes a risk


class ApiError(Exception):
    """An answer other than 200 with a JSON error body (4xx for the client's mistakes, 503 when draining)."""

    def __init__(self, status: int, kind: str, message: str, details: str = "",
                 extra: Optional[dict] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.details = details
        self.extra = extra or {}
        self.headers = headers or {}

    def body(self, route: str = "") -> dict:
        out: dict[str, Any] = {"error": {"type": self.kind, "message": self.message, "details": self.details,
                                         "extra_info": self.extra}}
        if route == "/prompt":
            out["node_errors"] = {}
        return out


def bad_request(kind: str, message: str, details: str = "", **extra) -> ApiError:
    return ApiError(400, kind, message, details, extra or None)


def _depth(raw: str) -> int:
    """Deepest bracket nesting of a JSON text (strings skipped), without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in raw:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_json_object(body: bytes, route: str, empty_ok: bool = False) -> dict:
    """The request body as a JSON object, or ApiError(400) saying what is wrong with it."""
    if not body.strip():
        if empty_ok:
            return {}
        raise bad_request("invalid_json", f"{route} needs a JSON object body; the body was empty",
                          "send e.g. {} with Content-Type: application/json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as ex:
        raise bad_request("invalid_json", f"{route}: the body is not UTF-8 (byte {ex.start})",
                          "send UTF-8 encoded JSON") from None
    if _depth(text) > MAX_DEPTH:
        raise bad_request("invalid_json", f"{route}: the JSON is nested deeper than {MAX_DEPTH} levels",
                          f"at most {MAX_DEPTH} levels of nesting")
    try:
        data = json.loads(text)
    except ValueError as ex:
        raise bad_request("invalid_json", f"{route}: the body is not valid JSON: {ex.msg} at line {ex.lineno} "
                          f"column {ex.colno}", "send a JSON object") from None
    if not isinstance(data, dict):
        raise bad_request("invalid_json", f"{route} needs a JSON object, got {type(data).__name__}",
                          "send a JSON object, e.g. {}")
    return data


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _need(data: Mapping, key: str, types: tuple, route: str, expected: str) -> None:
    if key in data and not isinstance(data[key], types):
        raise bad_request("invalid_field", f"{route}: {key!r} must be {expected}, got {_kind(data[key])}",
                          f"{key}: {expected}", field=key)


def _string_list(data: Mapping, key: str, route: str) -> None:
    value = data.get(key)
    if key in data and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise bad_request("invalid_field", f"{route}: {key!r} must be a list of strings, got {_kind(value)}",
                          f"{key}: list of ids", field=key)


def check_prompt_body(data: Mapping) -> None:
    """What stock POST /prompt would crash on (500) instead of answering; graph validation stays stock."""
    route = "/prompt"
    _need(data, "prompt", (dict,), route, "an API-format workflow object (node id -> node)")
    _need(data, "extra_data", (dict,), route, "an object")
    _need(data, "client_id", (str, type(None)), route, "a string")
    if "number" in data:
        number = data["number"]
        try:
            ok = not isinstance(number, bool) and math.isfinite(float(number))
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise bad_request("invalid_field", f"/prompt: 'number' must be a finite number, got {number!r}",
                              "number: queue position, e.g. 5", field="number")
    _string_list(data, "partial_execution_targets", route)
    for node_id, node in (data.get("prompt") or {}).items():
        if not isinstance(node, dict):
            raise bad_request("invalid_prompt", f"/prompt: node {node_id!r} must be an object, got {_kind(node)}",
                              'each node: {"class_type": "...", "inputs": {...}}', node_id=node_id)
        if "class_type" in node and not isinstance(node["class_type"], str):
            raise bad_request("invalid_prompt", f"/prompt: node {node_id!r} class_type must be a string",
                              'each node: {"class_type": "...", "inputs": {...}}', node_id=node_id)
        if "inputs" in node and not isinstance(node["inputs"], dict):
            raise bad_request("invalid_prompt", f"/prompt: node {node_id!r} inputs must be an object",
                              'each node: {"class_type": "...", "inputs": {...}}', node_id=node_id)


def check_queue_body(data: Mapping) -> None:
    _string_list(data, "delete", "/queue")


def check_history_body(data: Mapping) -> None:
    _string_list(data, "delete", "/history")


def check_interrupt_body(data: Mapping) -> None:
    _need(data, "prompt_id", (str, type(None)), "/interrupt", "a prompt id string")


PRELOAD_TYPES = ("checkpoint", "unet", "clip", "vae", "lora", "controlnet")


def check_preload_body(data: Mapping) -> None:
    """POST /preload {"model": name, "type": one of PRELOAD_TYPES, "gpus": [ids], "wait": bool}."""
    route = "/preload"
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise bad_request("invalid_field", f"{route}: 'model' must be a file name as the loader lists it, "
                          f"got {_kind(data.get('model'))}", 'e.g. {"model": "sd15.safetensors", "type": '
                          '"checkpoint", "gpus": [0, 2]}', field="model")
    if data.get("type", "checkpoint") not in PRELOAD_TYPES:
        raise bad_request("invalid_field", f"{route}: 'type' {data.get('type')!r} is not one of "
                          f"{', '.join(PRELOAD_TYPES)}", f"type: {' | '.join(PRELOAD_TYPES)}",
                          field="type", valid=list(PRELOAD_TYPES))
    gpus = data.get("gpus", [])
    if not isinstance(gpus, list) or not all(isinstance(g, int) and not isinstance(g, bool) for g in gpus):
        raise bad_request("invalid_field", f"{route}: 'gpus' must be a list of GPU ids (whole numbers), "
                          f"got {gpus!r}"[:300], "gpus: e.g. [0, 2]; [] = RAM only", field="gpus")
    _need(data, "wait", (bool,), route, "true or false")


# POST route -> (checker, empty body allowed)
BODY_CHECKS = {
    "/prompt": (check_prompt_body, False),
    "/queue": (check_queue_body, False),
    "/history": (check_history_body, False),
    "/free": (lambda data: None, False),
    "/interrupt": (check_interrupt_body, True),
    "/preload": (check_preload_body, False),
}
