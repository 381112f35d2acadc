"""Atomic file writes: nothing on disk is ever half-written (temp file + fsync + rename)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
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


def write_dir_atomic(
    path: str | os.PathLike[str], fill: Callable[[Path], object], replace: bool = False
) -> Path:
    """Call ``fill(tmp_dir)`` on a new empty folder beside ``path`` and rename it onto ``path``
    only once complete, so ``path`` never holds a partial folder. ``replace``: an existing
    ``path`` is removed just before the rename (else it is left to the caller to refuse). The
    temporary is named ``.tmp-NAME-PID``: removed on failure here, and after a kill by
    :func:`remove_stale_temporaries`."""
    import shutil

    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        if replace and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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

    removed: list[Path] = []
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


def read_json(
    path: str | os.PathLike[str],
    what: str,
    *,
    expect: type | None = dict,
    required: tuple[str, ...] = (),
) -> Any:
    """Read a JSON file, naming the file and ``what`` it should be when it is missing, broken,
    not of type ``expect`` (``None``: any) or lacking one of the ``required`` keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {what}: no file at {path}")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} at {path} is not valid JSON: {e}") from None
    except OSError as e:
        raise ValueError(f"{what} at {path} cannot be read: {e.strerror or e}") from None
    if expect is not None and not isinstance(data, expect):
        raise ValueError(
            f"{what} at {path} holds a JSON {_json_type(data)}, not a JSON {_json_type(expect())}"
        )
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{what} at {path} lacks {', '.join(map(repr, missing))}")
    return data


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def check_finite(tensors: Mapping[str, Any], path: str | os.PathLike[str], what: str) -> None:
    """Refuse NaN or infinite entries in any floating tensor of ``tensors``, naming the file."""
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(t.isfinite().all()):
            bad = int((~t.isfinite()).sum())
            raise ValueError(
                f"{what} at {path} is damaged: {name!r} has {bad} NaN or infinite value(s)"
            )


def load_safetensors(
    path: str | os.PathLike[str], what: str, *, finite: bool = True
) -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; a missing, truncated or foreign file, or
    (with ``finite``) one holding NaN or inf, fails with one line naming the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {what}: no file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"{what} at {path} is damaged or not a safetensors file ({detail})"
        ) from None
    if finite:
        check_finite(tensors, path, what)
    return tensors, meta


def load_torch_file(path: str | os.PathLike[str], what: str) -> Any:
    """``torch.load(path, weights_only=True)``, failing with one line naming a missing, truncated
    or foreign file."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {what}: no file at {path}")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{what} at {path} is damaged or not a torch file ({detail})") from None


def check_output_dir(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be made or written: an existing
    file, a file on the way to it, or a folder this user may not write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is an existing file; give a folder (new or empty)")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{flag} {path} cannot be made: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path} cannot be written: no write permission on {probe}")
    return path


def check_output_file(path: str | os.PathLike[str], flag: str) -> Path:
    """Refuse, before any work, an output file that is a folder or cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'out.json'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path} cannot be written: no write permission")
    if not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path} cannot be written: no write permission on {path.parent}")
    return path


def read_jsonl(path: str | os.PathLike[str], what: str) -> list[Any]:
    """The JSON values of a ``.jsonl`` file's non-blank lines; a broken line is named."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {what}: no file at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} at {path} is not UTF-8 text") from None
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} at {path} line {i + 1} is not valid JSON: {e}") from None
    return rows
