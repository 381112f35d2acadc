"""The wheel installs one top-level name, ``kgshatter``, with ``hooks/`` as ``kgshatter.hooks``."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_light():
    code = (
        "import sys, kgshatter; print(any(m.startswith(('torch', 'transformer_lens', 'sklearn', "
        "'matplotlib', 'numpy')) for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_public_api_resolves_lazily():
    import importlib

    import kgshatter as ks

    for name in ks.__all__:
        value = getattr(ks, name)
        assert value is getattr(importlib.import_module(ks._EXPORTS[name]), name), name
    assert set(ks.__all__) <= set(dir(ks))
    # a submodule import does not replace the function of the same role
    importlib.import_module("kgshatter.training")
    assert callable(ks.train) and ks.train.__module__ == "kgshatter.training"
    with pytest.raises(AttributeError, match="public names are in kgshatter.__all__"):
        ks.no_such_name  # noqa: B018


def test_hooks_are_kgshatter_hooks():
    import kgshatter.hooks

    assert Path(kgshatter.hooks.__file__).parent.name == "hooks"
    assert "hooks" not in sys.modules or sys.modules["hooks"] is not kgshatter.hooks


def test_wheel_top_level_is_only_kgshatter(tmp_path):
    pytest.importorskip("setuptools")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("kgshatter-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"kgshatter"}
    assert "kgshatter/hooks/__init__.py" in names
    assert "kgshatter/kg/graph.py" in names
    for part in (
        "run.json",
        "graph.json",
        "COMMAND.md",
        "checkpoints/step_0020000/model.safetensors",
    ):
        assert f"kgshatter/studies/runs/compressed/{part}" in names
