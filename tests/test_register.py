"""A user's own editing method, registered once, goes through the protocols and the sweep."""

from __future__ import annotations

import dataclasses

import pytest

from kgshatter.editing import (
    METHODS,
    ROME_PRESETS,
    Edit,
    LayerDelta,
    Method,
    ROMEConfig,
    compute_rome,
    get_method,
    register_method,
)


def compute_half_rome(model, task, requests, config, *, model_id=None, state=None) -> Edit:
    """ROME with its update halved: a variant a researcher might compare."""
    edit = compute_rome(model, task, requests, config, model_id=model_id, state=state)
    (d,) = edit.deltas
    return dataclasses.replace(edit, method="half-rome", deltas=[LayerDelta(d.layer, d.a / 2, d.b)])


@pytest.fixture
def half_rome():
    method = register_method(
        Method("half-rome", ROMEConfig, compute_half_rome, dict(ROME_PRESETS), batch=False)
    )
    yield method
    METHODS.pop("half-rome", None)


def test_a_registered_method_runs_in_the_sweep(half_rome, tiny_run_dir, tmp_path):
    from kgshatter.studies.sweep import SweepConfig, run_sweep

    assert get_method("half-rome") is half_rome
    config = SweepConfig(methods=("half-rome", "rome"), kinds=("counterfactual",), n_edits=1,
                         distances=(2,), sequential_edits=2, n_samples=1000, max_queries=16,
                         efficacy_prompts=4)  # fmt: skip
    result = run_sweep(tiny_run_dir, tmp_path / "s", config, progress=False)
    assert set(result.summary.methods) == {"half-rome", "rome"}
    rows = {(r["method"], r["protocol"]): r for r in result.rows if r["step"] == 0}
    shift = {m: rows[(m, "single")]["shift.edited"] for m in ("half-rome", "rome")}
    assert shift["half-rome"] == pytest.approx(shift["rome"] / 2, rel=1e-4)


def test_register_method_checks_what_it_is_given(half_rome):
    with pytest.raises(ValueError, match="already registered"):
        register_method(half_rome)
    assert register_method(half_rome, replace=True) is half_rome
    with pytest.raises(ValueError, match="unknown editing method 'nope'"):
        get_method("nope")


@pytest.mark.ill_typed
def test_register_method_refuses_what_is_not_a_method(half_rome):
    with pytest.raises(ValueError, match="presets must be a non-empty dict of ROMEConfig"):
        register_method(Method("x", ROMEConfig, compute_half_rome, {"a": 1}, batch=False))
    with pytest.raises(ValueError, match="takes a kgshatter.editing.Method"):
        register_method("rome")
