"""Shared fixtures: the tiny preset, its graph, and one tiny model trained once per session."""

from __future__ import annotations

import pytest
import torch

from kgshatter.kg import KnowledgeGraph, WalkSampler
from kgshatter.presets import get_preset


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_run():
    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_graph(tiny_run):
    return KnowledgeGraph.from_config(tiny_run.kg)


@pytest.fixture(scope="session")
def tiny_sampler(tiny_graph, tiny_run):
    return WalkSampler(tiny_graph, tiny_run.walks)


@pytest.fixture(scope="session")
def trained_tiny(tiny_run):
    """The tiny preset trained in memory (seconds); tests must not modify its weights."""
    from kgshatter.training import train

    return train(tiny_run, None, progress=False)


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory):
    """The tiny preset trained once into a run directory (for the sweep and the CLI)."""
    from kgshatter.training import train

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    train(get_preset("tiny"), out, progress=False)
    return out
