"""Trained runs shipped inside the package, so the main job need not retrain them.

``kgshatter/studies/runs/<preset>/`` is an ordinary run directory (``run.json``, ``graph.json``,
``history.json``, ``checkpoints/step_*/``) written by ``kgshatter train --preset <preset>``;
its ``COMMAND.md`` gives the command, seed and machine. :func:`install_bundled` copies it into
a reproduction's ``run/`` folder when the preset's config is exactly the one it was trained
with; ``kgshatter reproduce --from-scratch`` retrains instead.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from kgshatter.io import read_json
from kgshatter.presets import RunConfig

log = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).parent / "runs"


def bundled_run(run: RunConfig) -> Path | None:
    """The shipped run directory trained with exactly ``run``'s config, if there is one."""
    folder = BUNDLED_DIR / run.name
    record = folder / "run.json"
    if not record.is_file():
        return None
    try:
        same = RunConfig.from_dict(read_json(record, "bundled run record").get("config")) == run
    except (ValueError, TypeError):
        same = False
    return folder if same else None


def install_bundled(run: RunConfig, dest: str | Path) -> bool:
    """Copy the shipped run for ``run`` to ``dest`` (which must not exist); ``False`` if none."""
    source = bundled_run(run)
    dest = Path(dest)
    if source is None or dest.exists():
        return False
    tmp = dest.with_name(f".{dest.name}.installing")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("COMMAND.md", "cache"))
    tmp.rename(dest)
    log.info("using the trained %s checkpoint shipped with kgshatter (%s)", run.name, source)
    return True
