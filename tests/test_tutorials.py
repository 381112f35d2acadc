"""The tutorials run top to bottom in smoke mode (KGSHATTER_SMOKE=1) and are stored without
outputs; each notebook's checkpoint assertions make a broken one fail here."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.ipynb"))


def test_there_are_tutorials():
    assert TUTORIALS, "tutorials/ holds no notebook"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and
             (c.outputs or c.execution_count is not None)]  # fmt: skip
    assert not dirty, f"{path.name}: strip the outputs of cells {dirty} before committing"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("KGSHATTER_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # fmt: skip
    seconds = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]  # fmt: skip
    assert not errors
    print(f"{path.name}: {seconds:.1f} s")
    assert os.environ["KGSHATTER_SMOKE"] == "1"
