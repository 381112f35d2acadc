"""The README's Python examples run as written (quickstart, then editing, in one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)  # the examples write stats/ and edits/
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    edit, request = namespace["edit"], namespace["request"]
    assert [dict(r) for r in edit.requests] == [request.to_dict()]  # read-only views
    assert (tmp_path / "edits" / "e03.json").is_file()
    assert any((tmp_path / "stats").iterdir())
