"""The trained run shipped in the package: it is the preset's run, it works, and it is used."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kgshatter.cli import build_parser
from kgshatter.evaluate import Evaluator
from kgshatter.presets import get_preset
from kgshatter.studies.shipped import BUNDLED_DIR, bundled_run, install_bundled
from kgshatter.studies.sweep import SweepConfig, editor_defaults, sweep_defaults
from kgshatter.training import load_run, train

# the accuracy each shipped checkpoint must keep (its COMMAND.md: compressed 97.9 / 99.7 /
# 98.4 direct per order; paper 100.0 on every order)
SHIPPED = {"compressed": 0.95, "paper": 0.99}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_each_shipped_run_is_its_preset_and_knows_the_graph(tmp_path, name):
    run = get_preset(name)
    folder = bundled_run(run)
    assert folder == BUNDLED_DIR / name
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 20e6
    assert (folder / "COMMAND.md").is_file()
    loaded, graph, model, state = load_run(folder)
    assert loaded == run and state["step"] == run.train.steps
    torch.manual_seed(0)
    acc = Evaluator.for_run(run, graph, max_queries=200)(model)["accuracy"]
    assert acc["direct"]["all"] >= SHIPPED[name], acc
    # installed into a reproduction's run/ folder, training finds it finished
    dest = tmp_path / "repro" / "run"
    dest.parent.mkdir()
    assert install_bundled(run, dest)
    assert not install_bundled(run, dest)  # never over an existing folder
    before = (dest / "history.json").read_bytes()
    result = train(run, dest, resume=True, progress=False)
    assert len(result.history) == len(json.loads(before))
    assert (dest / "history.json").read_bytes() == before


def test_a_changed_config_gets_no_shipped_run():
    run = get_preset("compressed")
    other = run.replace(train=dataclasses.replace(run.train, steps=100))
    assert bundled_run(other) is None
    assert bundled_run(get_preset("tiny")) is None


def test_reproduce_defaults_to_each_presets_editor():
    assert editor_defaults("compressed")["position"] == "entity"
    args = build_parser().parse_args(["reproduce", "--preset", "compressed", "--out", "x",
                                      "--from-scratch"])  # fmt: skip
    assert args.from_scratch and args.editor_preset is None


def test_the_paper_preset_sweeps_memit_and_rome_at_the_relation_token():
    fields = sweep_defaults("paper")
    config = SweepConfig.from_dict({**SweepConfig().to_dict(), **fields})
    assert config.methods == ("memit", "rome") and config.n_edits == 16
    assert config.sequential_edits == 0 and config.position == "relation"
    assert config.editor_preset == "synthetic-relative"
    # the other presets keep the sweep's own defaults
    assert "methods" not in sweep_defaults("cpu") and "n_edits" not in sweep_defaults("compressed")
