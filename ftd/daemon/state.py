"""ftd's local persisted state: written atomically (temp file, fsync, rename, fsync dir), so a
crash at any instant leaves either the old or the new file, both loadable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ftd.errors import StateError


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON, atomically. Raises StateError on I/O failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = json.dumps(data, indent=1, sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, blob)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise StateError(f"cannot write state {path}: {err}") from err


def read_json(path: Path, default: Any = None) -> Any:
    """Load ``path``; ``default`` when it does not exist. Raises StateError when unreadable."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as err:
        raise StateError(f"cannot read state {path}: {err}") from err


def next_boot_epoch(state_dir: Path) -> int:
    """Increment and persist the host's boot epoch (orders this daemon's bus messages).

    Raises StateError when the epoch file cannot be read or written.
    """
    path = state_dir / "epoch.json"
    current = read_json(path, {"epoch": 0})
    if not isinstance(current, dict) or not isinstance(current.get("epoch"), int):
        raise StateError(f"{path}: expected {{'epoch': int}}, got {current!r}")
    epoch = int(current["epoch"]) + 1
    write_json_atomic(path, {"epoch": epoch})
    return epoch
