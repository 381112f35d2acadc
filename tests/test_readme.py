"""The README's Python examples run as written (quickstart, then editing, in one namespace), and
so do the guides' under docs/ (each page in a namespace of its own)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDES = sorted((ROOT / "docs").glob("*.md"))


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = python_blocks(README)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)  # the examples write stats/ and edits/
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    edit, request = namespace["edit"], namespace["request"]
    assert [dict(r) for r in edit.requests] == [request.to_dict()]  # read-only views
    assert (tmp_path / "edits" / "e03.json").is_file()
    assert any((tmp_path / "stats").iterdir())


@pytest.mark.parametrize("page", [p for p in GUIDES if python_blocks(p)], ids=lambda p: p.name)
def test_guide_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in python_blocks(page):
        exec(compile(block, str(page), "exec"), namespace)


def test_guides_are_linked_from_the_readme():
    text = README.read_text()
    assert [p.name for p in GUIDES if f"docs/{p.name}" not in text] == []
