"""Knowledge edits as values: requests, the shared editing core, and the methods registry.

Every method is ``compute(model, task, requests, config, *, model_id=None, state=None) -> Edit``
and never modifies ``model``; apply the result with ``kgshatter.hooks.edited(model, edit)`` or
``edit.apply_to_weights(model)``. ``get_method(name)`` lists the valid names on a typo.
``register_method(Method(...))`` adds one (your own variant): the protocols, the sweep, the
``kgshatter`` commands and the report then take it by name. A package can register methods
for the command line through the ``kgshatter.methods`` entry-point group (each entry point a
:class:`Method`, loaded the first time an unknown name is asked for).
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
    config_class: type[Any]  # a ConfigDict dataclass: from_dict / to_dict
    compute: Callable[..., Edit]
    presets: dict[str, Any]
    batch: bool  # edits several requests in one solve
    stateful: bool = False  # sequential editing carries an explicit state object
    # independent single-request edits computed together (shared forward passes), each the
    # edit ``compute`` gives for its request alone up to float rounding; None: one at a time
    compute_many: Callable[..., list[Any]] | None = None
    # the state object of sequential editing (stateful methods; default AlphaEdit's)
    state_factory: Callable[[], Any] | None = None

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
        """A fresh sequential-editing state (``None`` for stateless methods)."""
        if not self.stateful:
            return None
        return (self.state_factory or AlphaEditState)()


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
    ),
    "alphaedit": Method(
        "alphaedit",
        AlphaEditConfig,
        compute_alphaedit,
        ALPHAEDIT_PRESETS,
        True,
        True,
        compute_many=compute_alphaedit_many,
    ),
    "pmet": Method(
        "pmet", PMETConfig, compute_pmet, PMET_PRESETS, batch=True, compute_many=compute_pmet_many
    ),
    "ft": Method("ft", FTConfig, compute_ft, FT_PRESETS, batch=True),
}


ENTRY_POINT_GROUP = "kgshatter.methods"


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry under ``method.name`` (``replace=True`` to override one).

    Checked here, not at first use: a name, a config class with ``from_dict`` / ``to_dict``,
    a callable ``compute``, and presets that are instances of the config class.
    """
    if not isinstance(method, Method):
        raise ValueError(f"register_method takes a kgshatter.editing.Method, got {method!r}")
    if not method.name or not isinstance(method.name, str) or "," in method.name:
        raise ValueError(f"a method needs a name without commas, got {method.name!r}")
    if method.name in METHODS and not replace:
        raise ValueError(
            f"an editing method {method.name!r} is already registered; pass replace=True to "
            f"override it"
        )
    if not callable(method.compute):
        raise ValueError(f"{method.name}: compute must be callable")
    for attr in ("from_dict", "to_dict"):
        if not hasattr(method.config_class, attr):
            raise ValueError(f"{method.name}: config_class needs {attr} (a kgshatter ConfigDict)")
    bad = [k for k, v in method.presets.items() if not isinstance(v, method.config_class)]
    if not method.presets or bad:
        raise ValueError(
            f"{method.name}: presets must be a non-empty dict of {method.config_class.__name__} "
            f"instances; not: {bad}"
        )
    METHODS[method.name] = method
    return method


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in METHODS:
            register_method(ep.load())


def get_method(name: str) -> Method:
    """The registered :class:`Method` called ``name``; typos list the valid names."""
    if name not in METHODS:
        _load_entry_points()
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
    "register_method",
]
