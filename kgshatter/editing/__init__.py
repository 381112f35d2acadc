"""Knowledge edits as values: requests, the shared editing core, and the methods registry.

Every method is ``compute(model, task, requests, config, *, model_id=None, state=None) -> Edit``
and never modifies ``model``; apply the result with ``kgshatter.hooks.edited(model, edit)`` or
``edit.apply_to_weights(model)``. ``get_method(name)`` lists the valid names on a typo.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kgshatter.editing.core import SyntheticTask, TargetConfig
from kgshatter.editing.covariance import CovarianceCache, SecondMoment, StatsKey
from kgshatter.editing.edit import Edit, LayerDelta, WeightPatch, model_identity
from kgshatter.editing.ft import FT_PRESETS, FTConfig, compute_ft
from kgshatter.editing.requests import EditRequest
from kgshatter.editing.rome import ROME_PRESETS, ROMEConfig, compute_rome, compute_rome_many
from kgshatter.editing.spread import (
    ALPHAEDIT_PRESETS,
    MEMIT_PRESETS,
    PMET_PRESETS,
    AlphaEditConfig,
    AlphaEditState,
    MEMITConfig,
    PMETConfig,
    compute_alphaedit,
    compute_alphaedit_many,
    compute_memit,
    compute_memit_many,
    compute_pmet,
    compute_pmet_many,
)


@dataclass(frozen=True)
class Method:
    """One editing method: its config class, presets, compute function and capabilities."""

    name: str
    config_class: type
    compute: Callable[..., Edit]
    presets: dict[str, Any]
    batch: bool  # edits several requests in one solve
    stateful: bool = False  # sequential editing carries an explicit state object
    # independent single-request edits computed together (shared forward passes), each the
    # edit ``compute`` gives for its request alone up to float rounding; None: one at a time
    compute_many: Callable[..., list[Any]] | None = None

    def config(self, preset: str = "synthetic", **overrides: Any) -> Any:
        """The preset's config with ``overrides`` (validated)."""
        if preset not in self.presets:
            raise ValueError(
                f"{self.name} has no preset {preset!r}; available: {sorted(self.presets)}"
            )
        data = {**self.presets[preset].to_dict(), **overrides}
        return self.config_class.from_dict(data)

    def config_with_samples(self, preset: str, n_samples: int) -> Any:
        """The preset's config, with ``n_samples`` walks for C where the method uses C."""
        if issubclass(self.config_class, TargetConfig):
            return self.config(preset, n_samples=n_samples)
        return self.config(preset)

    def new_state(self) -> Any:
        return AlphaEditState() if self.stateful else None


METHODS: dict[str, Method] = {
    "rome": Method(
        "rome", ROMEConfig, compute_rome, ROME_PRESETS, batch=False, compute_many=compute_rome_many
    ),
    "memit": Method(
        "memit",
        MEMITConfig,
        compute_memit,
        MEMIT_PRESETS,
        batch=True,
        compute_many=compute_memit_many,
    ),  # fmt: skip
    "alphaedit": Method(
        "alphaedit",
        AlphaEditConfig,
        compute_alphaedit,
        ALPHAEDIT_PRESETS,
        True,
        True,
        compute_many=compute_alphaedit_many,
    ),  # fmt: skip
    "pmet": Method(
        "pmet", PMETConfig, compute_pmet, PMET_PRESETS, batch=True, compute_many=compute_pmet_many
    ),
    "ft": Method("ft", FTConfig, compute_ft, FT_PRESETS, batch=True),
}


def get_method(name: str) -> Method:
    """The registered :class:`Method` called ``name``; typos list the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown editing method {name!r}; available: {sorted(METHODS)}") from None


__all__ = [
    "ALPHAEDIT_PRESETS",
    "FT_PRESETS",
    "MEMIT_PRESETS",
    "METHODS",
    "PMET_PRESETS",
    "ROME_PRESETS",
    "AlphaEditConfig",
    "AlphaEditState",
    "CovarianceCache",
    "Edit",
    "EditRequest",
    "FTConfig",
    "LayerDelta",
    "MEMITConfig",
    "Method",
    "PMETConfig",
    "ROMEConfig",
    "SecondMoment",
    "StatsKey",
    "SyntheticTask",
    "TargetConfig",
    "WeightPatch",
    "compute_alphaedit",
    "compute_ft",
    "compute_memit",
    "compute_pmet",
    "compute_rome",
    "get_method",
    "model_identity",
]
