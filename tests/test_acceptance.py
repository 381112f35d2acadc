"""Acceptance: the ``cpu`` preset reaches the spine's accuracy targets (slow: ~15 min on 2 cores).

Run with ``python -m pytest -m slow``.
"""

from __future__ import annotations

import pytest

from kgshatter.evaluate import Evaluator
from kgshatter.presets import get_preset
from kgshatter.training import train


@pytest.mark.slow
def test_cpu_preset_reaches_accuracy_targets(tmp_path):
    run = get_preset("cpu")
    result = train(run, tmp_path / "cpu", progress=False)
    final = Evaluator.for_run(run, result.graph, max_queries=None)(result.model, rings=False)
    acc = final["accuracy"]
    for order in ("I", "II", "III"):
        assert acc["direct"][order] >= 0.95
        assert acc["logical"][order] >= 0.90
        assert acc["compositional"][order] >= 0.60
    assert result.history[-1]["train_seconds"] <= 30 * 60
