"""Bad input and damaged files: one line on stderr, exit status 2, no file changed.

The CLI table drives every command through user errors that must be caught before any work;
the damage table corrupts a copy of a trained run in each way a disk or a user can, and checks
every command that reads it names the file instead of using it or raising a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kgshatter.cli import main


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_run_dir):
    root = tmp_path_factory.mktemp("errors")
    shutil.copytree(tiny_run_dir, root / "run")
    (root / "afile").write_text("not a folder")
    (root / "adir").mkdir()
    return root


# each case: the arguments (RUN: a trained tiny run, ROOT: its folder) and a piece of the message
CLI_CASES = [
    ("train --preset tiny --out ROOT/new --threads 0", "--threads: expected a whole number >= 1"),
    ("train --preset tiny --out ROOT/new --threads -1", "--threads: expected a whole number"),
    ("train --preset tiny --out ROOT/new --threads abc", "got 'abc'"),
    ("train --preset tiny --out ROOT/afile", "is an existing file"),
    ("train --preset tiny --out ROOT/afile/sub", "afile is a file, not a folder"),
    ("train --preset nosuch --out ROOT/new", "invalid choice: 'nosuch'"),
    ("train --preset tiny --out ROOT/new --set train.nosuch=1", "nosuch"),
    ("train --preset tiny --out ROOT/new --set train.steps=abc", "steps"),
    ("train --preset tiny --out ROOT/new --checkpoint-minutes -1", "--checkpoint-minutes"),
    ("train --preset tiny --out ROOT/new --device nosuch", "unknown device 'nosuch'"),
    ("train --preset tiny --out RUN", "--resume"),
    ("evaluate ROOT/missing", "no run directory"),
    ("evaluate ROOT/afile", "no run directory"),
    ("evaluate ROOT/adir", "run record"),
    ("evaluate RUN --json ROOT/adir", "--json ROOT/adir is a folder"),
    ("evaluate RUN --json ROOT/nowhere/x.json", "does not exist"),
    ("evaluate RUN --prefixes 0", "--prefixes: expected a whole number >= 1"),
    ("evaluate RUN --max-queries 0", "--max-queries"),
    ("evaluate RUN --figure ROOT/adir --no-rings", "--figure ROOT/adir is a folder"),
    ("evaluate RUN --site 9.mlp_post --figure ROOT/new.png", "layers 0..1"),
    ("evaluate RUN --device nosuch", "unknown device"),
    ("edit RUN --method nosuch --sample counterfactual", "unknown editing method 'nosuch'"),
    ("edit RUN --method rome --sample counterfactual --threads 0", "--threads"),
    ("edit RUN --method rome --fact nosuch --target e01", "'SUBJECT RELATION'"),
    ("edit RUN --method rome --sample counterfactual --distance 0", "--distance"),
    ("edit RUN --method rome --sample counterfactual --n 0", "--n"),
    ("edit RUN --method rome --sample counterfactual --out ROOT/afile", "is an existing file"),
    ("edit RUN --method rome --set layer=9 --sample counterfactual --n 1", "layer"),
    ("edit RUN --method rome --set nosuch=1 --sample counterfactual --n 1", "nosuch"),
    ("edit RUN --method rome --preset nosuch --sample counterfactual", "no preset 'nosuch'"),
    ("edit ROOT/missing --method rome --sample counterfactual", "no run directory"),
    ("reproduce --preset tiny --out ROOT/new --distances abc", "--distances must look like"),
    ("reproduce --preset tiny --out ROOT/new --methods nosuch", "nosuch"),
    ("reproduce --preset tiny --out ROOT/new --n 0", "--n"),
    ("reproduce --preset tiny --out ROOT/afile", "is an existing file"),
    ("reproduce --preset tiny --out ROOT/new --threads 0", "--threads"),
    ("reproduce --preset tiny --out ROOT/new --site nosuch", "nosuch"),
    (
        "reproduce --preset tiny --out ROOT/new --methods rome --editor-preset "
        "synthetic-relative-block1 --set model.n_layers=1",
        "edits block 1, but the model has blocks 0..0",
    ),
    ("months --model tiny:gpt2 --out ROOT/new --device nosuch", "unknown device"),
    ("months --model tiny:gpt2 --out ROOT/new --distance 0", "in [1, 6], got 0"),
    ("months --model tiny:gpt2 --out ROOT/new --distance 7", "in [1, 6], got 7"),
    ("months --model tiny:gpt2 --out ROOT/new --task days --distance 4", "in [1, 3], got 4"),
    ("months --model tiny:gpt2 --out ROOT/new --distance abc", "--distance must look like"),
    ("months --model tiny:gpt2 --out ROOT/new --threads 0", "--threads"),
    ("months --model tiny:gpt2 --out ROOT/afile", "is an existing file"),
    ("months --model tiny:gpt2 --out ROOT/new --method nosuch", "nosuch"),
    ("months --model tiny:gpt2 --out ROOT/new --n 0", "--n"),
    ("months --model tiny:gpt2 --out ROOT/new --mmlu ROOT/missing.jsonl", "no MMLU-Redux file"),
    ("months --model tiny:gpt2 --out ROOT/new --mmlu ROOT/afile", "allowed suffixes"),
    ("months --model tiny:gpt2 --out ROOT/new --corpus ROOT/none.txt", "does not exist"),
    ('months --model tiny:gpt2 --out ROOT/new --device-map {"transformer.h.0":"meta"}', "meta"),
    ("months --model tiny:gpt2 --out ROOT/new --device-map {bad", "JSON object"),
    ("months --model tiny:gpt2 --out ROOT/new --device cpu --device-map auto", "not both"),
    ("months --model tiny:gpt2 --out ROOT/new --device-map everywhere", "device_map must be"),
    ("benchmark --preset tiny --threads 0", "--threads"),
    ("benchmark --preset tiny --steps 0", "--steps"),
    ("benchmark --preset tiny --json ROOT/adir", "is a folder"),
    ("edit-benchmark --methods nosuch", "nosuch"),
    ("edit-benchmark --json ROOT/new.json", "nothing to benchmark"),
    ("edit-benchmark RUN --n 0", "--n"),
    ("edit-benchmark RUN --json ROOT/adir", "is a folder"),
    ("study --preset tiny --out ROOT/new --variant bad", "--variant takes NAME="),
    ("study --preset tiny --out ROOT/new --distances abc", "--distances must look like"),
    ("study --preset tiny --out ROOT/afile", "is an existing file"),
]


# a value of the wrong type on purpose: the run-time type checker answers first
# (docs/testing.md, "Shapes and types")
ILL_TYPED_CASES = {"train --preset tiny --out ROOT/new --set train.steps=abc"}


@pytest.mark.parametrize(
    ("command", "message"),
    [
        pytest.param(c, m, marks=pytest.mark.ill_typed) if c in ILL_TYPED_CASES else (c, m)
        for c, m in CLI_CASES
    ],
    ids=[c for c, _ in CLI_CASES],
)
def test_user_errors_are_one_line_and_change_nothing(workspace, capsys, command, message):
    root = workspace
    before = _snapshot(root)
    args = [a.replace("RUN", str(root / "run")).replace("ROOT", str(root)) for a in command.split()]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert message.replace("ROOT", str(root)) in lines[0], lines[0]
    assert "Traceback" not in err
    assert _snapshot(root) == before
    assert not (root / "new").exists() and not (root / "new.json").exists()


def _newest(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step_*"))[-1]


def _poke(path: Path, key_index: int = 0, value: float = float("nan")) -> None:
    tensors = load_file(str(path))
    key = sorted(tensors)[key_index]
    tensors[key].view(-1)[0] = value
    save_file(tensors, str(path))


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _nan_optimizer(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    first = next(iter(state["state"].values()))
    first["exp_avg"].view(-1)[0] = float("inf")
    torch.save(state, path)


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


# damage -> the piece of the one-line message that names what is wrong
DAMAGE = {
    "nan weights": (lambda r: _poke(_newest(r) / "model.safetensors"), "NaN or infinite"),
    "inf weights": (
        lambda r: _poke(_newest(r) / "model.safetensors", 3, float("inf")),
        "NaN or infinite",
    ),
    "random weights": (
        lambda r: (_newest(r) / "model.safetensors").write_bytes(os.urandom(4096)),
        "not a safetensors file",
    ),
    "truncated weights": (lambda r: _cut(_newest(r) / "model.safetensors"), "damaged"),
    "empty weights": (lambda r: (_newest(r) / "model.safetensors").write_bytes(b""), "damaged"),
    "run.json a list": (lambda r: (r / "run.json").write_text("[1, 2]"), "JSON array"),
    "run.json no config": (
        lambda r: _edit_json(
            r / "run.json", lambda d: {k: v for k, v in d.items() if k != "config"}
        ),
        "run.json",
    ),
    "run.json broken": (lambda r: (r / "run.json").write_text("{oops"), "not valid JSON"),
    "graph.json broken": (lambda r: (r / "graph.json").write_text("{oops"), "graph.json"),
    "graph.json lacks rings": (
        lambda r: _edit_json(
            r / "graph.json", lambda d: {k: v for k, v in d.items() if k != "rings"}
        ),
        "lacks 'rings'",
    ),
    "state.json lacks step": (
        lambda r: (_newest(r) / "state.json").write_text('{"history": []}'),
        "lacks 'step'",
    ),
}
RESUME_ONLY = {
    "truncated optimizer": (lambda r: _cut(_newest(r) / "optimizer.pt"), "optimizer.pt"),
    "empty optimizer": (lambda r: (_newest(r) / "optimizer.pt").write_bytes(b""), "optimizer.pt"),
    "inf in optimizer": (lambda r: _nan_optimizer(_newest(r) / "optimizer.pt"), "NaN or infinite"),
}


def _commands(run: Path, resume: bool) -> list[list[str]]:
    from kgshatter.presets import get_preset

    steps = get_preset("tiny").train.steps
    train = ["train", "--preset", "tiny", "--out", str(run), "--resume", "--quiet",
             "--set", f"train.steps={steps}"]  # fmt: skip
    if resume:
        return [train]
    return [
        ["evaluate", str(run), "--no-rings", "--max-queries", "5"],
        [
            "edit",
            str(run),
            "--method",
            "rome",
            "--sample",
            "counterfactual",
            "--n",
            "1",
            "--quiet",
            "--out",
            str(run / "e"),
        ],  # fmt: skip
        train,
    ]


@pytest.mark.parametrize("damage", [*DAMAGE, *RESUME_ONLY], ids=[*DAMAGE, *RESUME_ONLY])
def test_damaged_runs_are_named_not_used(tmp_path, tiny_run_dir, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns("cache", "edits"))
    breaks, message = {**DAMAGE, **RESUME_ONLY}[damage]
    breaks(run)
    before = _snapshot(run)
    for args in _commands(run, resume=damage in RESUME_ONLY):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], (args, err)
        assert _snapshot(run) == before


def test_a_stray_checkpoint_folder_is_skipped_with_a_warning(tmp_path, tiny_run_dir, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns("cache", "edits"))
    (run / "checkpoints" / "step_abc").mkdir()
    assert main(["evaluate", str(run), "--no-rings", "--max-queries", "5"]) == 0
    assert "ignoring" in capsys.readouterr().err


def test_damaged_statistics_are_moved_aside_and_recomputed(tmp_path, caplog):
    from kgshatter.editing import CovarianceCache, StatsKey

    key = StatsKey("m", 0, "blocks.0.mlp.hook_post", "c", 10)
    cache = CovarianceCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return torch.eye(3, dtype=torch.float64) * 2, 10

    first = cache.get(key, compute)
    path = tmp_path / key.filename()

    def nan_keeping_metadata() -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        tensors["eigenvalues"][0] = float("nan")
        save_file(tensors, str(path), metadata=meta)

    for damage in (nan_keeping_metadata, lambda: _cut(path, 0.4)):
        damage()
        again = cache.get(key, compute)
        assert torch.equal(again.eigenvalues, first.eigenvalues)
        assert path.with_name(path.name + ".damaged").is_file()
        assert "moved it to" in caplog.text
        caplog.clear()
    assert len(calls) == 3
    cache.get(key, compute)
    assert len(calls) == 3  # a sound file is used as it is


def _request(graph, subject: int, hops: int = 2):
    """A counterfactual for ``subject``'s I_C1 answer: ``hops`` further round order I."""
    from kgshatter.editing import EditRequest

    rel = graph.relation("I_C1").index
    old = graph.apply(rel, subject)
    return EditRequest(
        subject, rel, int(graph.rings[0][(graph.positions[0][old] + hops) % graph.n_entities])
    )


def test_edit_files_are_checked_when_loaded(tmp_path, trained_tiny, tiny_sampler):
    from kgshatter.editing import CovarianceCache, Edit, SyntheticTask, get_method

    method = get_method("rome")
    task = SyntheticTask(tiny_sampler, CovarianceCache(tmp_path / "cache"))
    config = method.config("synthetic", n_samples=2000)
    edit = method.compute(trained_tiny.model, task, _request(trained_tiny.graph, 3), config)
    path = tmp_path / "edit"
    edit.save(path)
    assert Edit.load(path).fingerprint == edit.fingerprint != ""
    meta = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**meta, "layers": [1, 0]}))
    with pytest.raises(ValueError, match=r"do not match .*edit.json: 2 layer"):
        Edit.load(path)
    path.with_suffix(".json").write_text(
        json.dumps({k: v for k, v in meta.items() if k != "layers"})
    )
    with pytest.raises(ValueError, match="lacks 'layers'"):
        Edit.load(path)
    path.with_suffix(".json").write_text(json.dumps(meta))
    _cut(path.with_suffix(".safetensors"))
    with pytest.raises(ValueError, match=r"edit factors at .*edit.safetensors is damaged"):
        Edit.load(path)


def test_an_edit_refuses_another_model_unless_forced(trained_tiny, tiny_sampler, tmp_path):
    import copy

    from kgshatter.hooks import edited

    from kgshatter.editing import CovarianceCache, SyntheticTask, get_method

    model = trained_tiny.model
    method = get_method("rome")
    task = SyntheticTask(tiny_sampler, CovarianceCache(tmp_path))
    edit = method.compute(
        model, task, _request(trained_tiny.graph, 3), method.config(n_samples=2000)
    )
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.W_E[0, 0] += 1.0  # the same shape, another model
    tokens = torch.tensor([[0, model.cfg.d_vocab - 1]])
    with pytest.raises(ValueError, match="computed on another model.*force=True"):
        with edited(other, edit):
            pass
    with pytest.raises(ValueError, match="computed on another model"):
        edit.apply_to_weights(other)
    with edited(other, edit, force=True):
        other(tokens)
    with edit.apply_to_weights(other, force=True):
        pass
    # the edit's own model, also with another edit already written into its weights
    second = method.compute(
        model, task, _request(trained_tiny.graph, 5), method.config(n_samples=2000)
    )
    with second.apply_to_weights(model), edited(model, edit):
        model(tokens)
