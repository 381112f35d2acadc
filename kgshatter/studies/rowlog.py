"""Append-only result logs with a pinned configuration: the sweep's and the months
replication's ``rows.jsonl``.

A run writes a header record first (``sweep.json``, ``months.json``) and refuses to continue a
folder whose header differs; each finished unit of work is one JSON line appended and fsynced,
so a kill loses at most the line being written, and a rerun skips the rows already there.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from kgshatter.io import read_json, remove_stale_temporaries, write_atomic, write_json_atomic

log = logging.getLogger(__name__)


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` as one JSON line and fsync it."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_rows(path: Path, key: Callable[[dict[str, Any]], Hashable], what: str) -> list[dict]:
    """Rows written so far, the first of each ``key``; a last line cut off by a crash is dropped
    (it is recomputed) and the file rewritten without it. A damaged line elsewhere, or a row
    lacking its key fields, is an error naming the file and line."""
    if not path.is_file():
        return []
    rows, seen = [], set()
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            k = key(row)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path} line {i + 1} is not JSON; the {what} is damaged") from None
        except (KeyError, TypeError):
            raise ValueError(
                f"{path} line {i + 1} is not a row of this {what} (it lacks its key fields)"
            ) from None
        if k not in seen:
            seen.add(k)
            rows.append(row)
    if lines and len(rows) < len(lines):  # rewrite without the torn or repeated lines
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return rows


def check_or_write_header(
    out: Path, name: str, header: dict[str, Any], keys: tuple[str, ...], what: str
) -> None:
    """Write ``out/name`` (the run's pinned settings) or, when it exists, refuse a run whose
    ``keys`` differ from it, naming the differing field (and, for a dict, its sub-fields); a
    folder that passes has the temporaries of killed writers removed."""
    path = out / name
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, header)
        return
    old = read_json(path, f"{what} record")
    _check_same(out, old, header, keys, what)
    for stale in remove_stale_temporaries(out):
        log.info("removed %s, left by a killed run", stale)


def _check_same(
    out: Path, old: dict[str, Any], header: dict[str, Any], keys: tuple[str, ...], what: str
) -> None:
    for key in keys:
        if old.get(key) == header[key]:
            continue
        description = f"{key} ({old.get(key)!r} there, {header[key]!r} now)"
        if isinstance(old.get(key), dict) and isinstance(header[key], dict):
            fields = sorted(
                f for f in set(old[key]) | set(header[key])
                if old[key].get(f) != header[key].get(f)
            )  # fmt: skip
            description = ("sweep setting " if key == "sweep" else f"{key} field ") + ", ".join(
                f"{f} ({old[key].get(f)!r} there, {header[key].get(f)!r} now)" for f in fields
            )
        elif key == "model_id":
            description = "model (its weights changed since the run began)"
        raise ValueError(
            f"{out} holds a {what} with a different {description}; resume it with the same "
            f"settings, or use a new --out"
        )
