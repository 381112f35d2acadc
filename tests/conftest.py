"""Shared fixtures (the tiny preset, its graph, one tiny model trained once per session) and
the test tiers (docs/testing.md): every collected test is marked ``unit`` or ``integration``
unless it is already ``slow``, ``pretrained`` or ``gpu``."""

from __future__ import annotations

import os

if os.environ.get("KGSHATTER_TYPECHECK") == "1":  # jaxtyping shapes checked at run time
    from jaxtyping import install_import_hook

    install_import_hook("kgshatter", "beartype.beartype")

import pytest
import torch

from kgshatter.kg import KnowledgeGraph, WalkSampler
from kgshatter.presets import get_preset

TYPECHECKED = os.environ.get("KGSHATTER_TYPECHECK") == "1"
# fixtures that train (or hold) a model: a test that requests one is an integration test
TRAINED_FIXTURES = {"trained_tiny", "tiny_run_dir"}
# modules whose tests train, run the command line, notebooks or a wheel build, or build
# pretrained-format checkpoints themselves
INTEGRATION_MODULES = {
    "test_acceptance.py", "test_bundled.py", "test_cli.py", "test_distributed.py",
    "test_errors.py", "test_fidelity.py", "test_multidevice.py", "test_multitoken.py",
    "test_packaging.py", "test_pretrained.py", "test_readme.py", "test_train.py",
    "test_tutorials.py",
}  # fmt: skip
OWN_TIERS = {"slow", "pretrained", "packaged_weights", "gpu"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TYPECHECKED and "ill_typed" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="passes an ill-typed value on purpose to "
                                             "test kgshatter's own message; the run-time type "
                                             "checker answers first"))  # fmt: skip
        if OWN_TIERS & set(item.keywords):
            continue
        trains = TRAINED_FIXTURES & set(getattr(item, "fixturenames", ()))
        integration = trains or item.path.name in INTEGRATION_MODULES
        item.add_marker("integration" if integration else "unit")


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
