"""The control-socket protocol between ftctl and ftd: JSON lines, versioned, validated here.

Request:  ``{"v": 1, "op": "status", "args": {...}}``
Response: ``{"v": 1, "ok": true, "result": ...}`` or ``{"v": 1, "ok": false, "error": "..."}``;
a streaming op (``events`` with ``follow``) answers with one ``{"ok": true, "event": ...}``
line per event until the client hangs up.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ftd.errors import RequestError

VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024
_OP_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_MAX_DEPTH = 8


@dataclass(frozen=True)
class ArgSpec:
    """One argument of an op: its JSON type, whether it is required, and its meaning."""

    type: type | tuple[type, ...]
    required: bool = False
    help: str = ""


@dataclass(frozen=True)
class OpSpec:
    name: str
    help: str
    args: dict[str, ArgSpec] = field(default_factory=dict)
    streaming: bool = False


@dataclass(frozen=True)
class Request:
    op: str
    args: dict[str, Any]


def _depth(value: Any, level: int = 0) -> int:
    if level > _MAX_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def parse_request(line: bytes, ops: dict[str, OpSpec]) -> Request:
    """Validate one request line against the known ops.

    Raises RequestError naming what is wrong (size, JSON, version, op, argument name or type).
    """
    if len(line) > MAX_REQUEST_BYTES:
        raise RequestError(f"request too large: {len(line)} bytes > {MAX_REQUEST_BYTES}")
    try:
        raw = json.loads(line)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(f"request is not JSON: {err}") from err
    if not isinstance(raw, dict):
        raise RequestError(f"request must be a JSON object, got {type(raw).__name__}")
    if _depth(raw) > _MAX_DEPTH:
        raise RequestError(f"request nested deeper than {_MAX_DEPTH} levels")
    unknown = sorted(set(raw) - {"v", "op", "args"})
    if unknown:
        raise RequestError(f"unknown request field(s): {', '.join(map(repr, unknown))}")
    v = raw.get("v")
    if v != VERSION or isinstance(v, bool):
        raise RequestError(f"unsupported protocol version {v!r} (this ftd speaks {VERSION})")
    op = raw.get("op")
    if not isinstance(op, str) or not _OP_RE.match(op):
        raise RequestError(f"'op' must be an operation name, got {op!r}")
    spec = ops.get(op)
    if spec is None:
        raise RequestError(f"unknown operation {op!r} (known: {', '.join(sorted(ops))})")
    args = raw.get("args", {})
    if not isinstance(args, dict):
        raise RequestError(f"'args' must be an object, got {type(args).__name__}")
    for name, value in args.items():
        a = spec.args.get(name)
        if a is None:
            raise RequestError(f"{op}: unknown argument {name!r}")
        allowed = a.type if isinstance(a.type, tuple) else (a.type,)
        # bool is an int in Python; never accept true for a number.
        if isinstance(value, bool) and bool not in allowed:
            raise RequestError(f"{op}: argument {name!r} must be {_names(allowed)}, got bool")
        if not isinstance(value, allowed):
            raise RequestError(
                f"{op}: argument {name!r} must be {_names(allowed)}, got {type(value).__name__}"
            )
    for name, a in spec.args.items():
        if a.required and name not in args:
            raise RequestError(f"{op}: missing required argument {name!r}")
    return Request(op=op, args=dict(args))


def _names(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def encode_request(op: str, args: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"v": VERSION, "op": op, "args": args or {}}).encode() + b"\n"


def ok(result: Any) -> bytes:
    return json.dumps({"v": VERSION, "ok": True, "result": result}, default=str).encode() + b"\n"


def event(ev: Any) -> bytes:
    return json.dumps({"v": VERSION, "ok": True, "event": ev}, default=str).encode() + b"\n"


def error(message: str) -> bytes:
    return json.dumps({"v": VERSION, "ok": False, "error": message}).encode() + b"\n"
