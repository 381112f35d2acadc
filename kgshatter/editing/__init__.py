"""Knowledge edits as values: requests, the shared editing core, and the methods registry.

Implemented so far: ROME (r-ROME denominator by default). MEMIT, AlphaEdit, PMET and FT-L are
the rest of the editing issue and are not registered yet.
"""

from __future__ import annotations

from typing import Any

from kgshatter.editing.covariance import CovarianceCache, SecondMoment, StatsKey
from kgshatter.editing.edit import Edit, LayerDelta, WeightPatch, model_identity
from kgshatter.editing.requests import EditRequest
from kgshatter.editing.rome import ROME_PRESETS, ROMEConfig, compute_rome

METHODS: dict[str, tuple[type, Any]] = {"rome": (ROMEConfig, compute_rome)}


def get_method(name: str) -> tuple[type, Any]:
    """``(config class, compute function)`` of an editing method; typos list the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown editing method {name!r}; available: {sorted(METHODS)}") from None


__all__ = [
    "METHODS",
    "ROME_PRESETS",
    "CovarianceCache",
    "Edit",
    "EditRequest",
    "LayerDelta",
    "ROMEConfig",
    "SecondMoment",
    "StatsKey",
    "WeightPatch",
    "compute_rome",
    "get_method",
    "model_identity",
]
