"""The package's layout rules (README, "Layout"): checked on the source, so a change that breaks
one fails here rather than in a reviewer's head.

- no import cycles between kgshatter's modules (lazy imports inside functions included);
- the layers import downwards only: the library never imports the studies, the benchmarks or the
  command line; the studies never import the benchmarks or the command line;
- TransformerLens internals are imported in ``kgshatter/tl_compat.py`` alone (elsewhere only the
  public ``TransformerBridge`` type, for annotations), and every internal named there resolves
  in the installed TransformerLens.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "kgshatter").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    found["kgshatter.hooks"] = ROOT / "hooks" / "__init__.py"
    return found


MODULES = _modules()


def _imports(path: Path) -> list[str]:
    """Every module named by an import statement in ``path`` (absolute imports)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def _graph() -> dict[str, set[str]]:
    """Module -> the kgshatter modules it imports (a package's own __init__ re-exports aside)."""
    return {
        name: {n for n in _imports(path) if n in MODULES and n != "kgshatter" and n != name}
        for name, path in MODULES.items()
        if name != "kgshatter"  # the lazy public namespace re-exports every layer
    }


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, set())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def _layer(name: str) -> int:
    if name.startswith("kgshatter.cli"):
        return 3
    if name.startswith("kgshatter.bench"):
        return 2
    if name.startswith("kgshatter.studies"):
        return 1
    return 0


def test_layers_import_downwards_only():
    upward = [
        f"{name} imports {dep}"
        for name, deps in _graph().items()
        for dep in deps
        if _layer(dep) > _layer(name)
    ]
    assert not upward, upward


def test_transformer_lens_internals_only_in_tl_compat():
    allowed = {"transformer_lens.model_bridge.TransformerBridge"}
    offenders = []
    for name, path in MODULES.items():
        if name == "kgshatter.tl_compat":
            continue
        for imported in _imports(path):
            if imported.startswith("transformer_lens") and imported not in allowed | {
                "transformer_lens.model_bridge"
            }:
                offenders.append(f"{name}: {imported}")
    assert not offenders, offenders


def test_every_named_internal_resolves():
    from kgshatter import tl_compat

    for name, (module, attribute) in tl_compat.INTERNALS.items():
        assert getattr(importlib.import_module(module), attribute) is getattr(tl_compat, name)
    with pytest.raises(AttributeError, match="no attribute 'Missing'"):
        _ = tl_compat.Missing  # type: ignore[attr-defined]
