"""Atomic file writes: nothing on disk is ever half-written (temp file + fsync + rename)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries that writers killed mid-write left in ``directory``
    (``.NAME.tmpPID`` files of :func:`write_atomic`, ``.tmp-NAME-PID`` checkpoint folders)
    whose process is gone; a live writer's are kept. Returns what was removed."""
    import re
    import shutil

    removed = []
    root = Path(directory)
    if not root.is_dir():
        return removed
    pattern = re.compile(r"^\.(?:.+\.tmp|tmp-.+-)(\d+)$")
    for entry in root.iterdir():
        match = pattern.match(entry.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented, key-sorted JSON atomically."""

    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")

    return write_atomic(path, write)


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """Read a JSON file, naming ``what`` it should be when it is missing or broken."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {what}: no file at {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} at {path} is not valid JSON: {e}") from None
