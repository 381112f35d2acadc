"""TransformerLens hook functions users attach themselves (installed as ``kgshatter.hooks``).

Every factory returns a function with TransformerLens' hook signature ``fn(activation, hook)``,
ready for ``model.run_with_hooks(tokens, fwd_hooks=[(site.hook_name, fn)])`` or
``model.hooks(fwd_hooks=...)``. Nothing here modifies weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float

HookFn = Callable[[torch.Tensor, Any], torch.Tensor | None]


def capture(store: dict[str, torch.Tensor], key: str | None = None, detach: bool = True) -> HookFn:
    """Record the activation in ``store[key or hook.name]`` and pass it through unchanged."""

    def hook(activation: torch.Tensor, hook: Any) -> None:
        value = activation.detach() if detach else activation
        store[key or hook.name] = value.clone() if detach else value

    return hook


def add_vector(
    vector: Float[torch.Tensor, " d"],
    positions: Sequence[int] | int | None = None,
    scale: float = 1.0,
) -> HookFn:
    """Add ``scale * vector`` to the activation at ``positions`` (all positions if ``None``).

    Works on ``[batch, pos, d]`` activations; the vector follows the activation's dtype/device.
    """

    def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        _check_last_dim(activation, vector, hook)
        delta = (scale * vector).to(activation.dtype).to(activation.device)
        out = activation.clone()
        if positions is None:
            out = out + delta
        else:
            out[:, positions] = out[:, positions] + delta
        return out

    return hook


def replace(
    value: Float[torch.Tensor, "... d"], positions: Sequence[int] | int | None = None
) -> HookFn:
    """Overwrite the activation at ``positions`` with ``value`` (activation patching).

    ``value`` broadcasts against ``activation[:, positions]`` (e.g. a cached activation from a
    clean run, or one vector for every batch row).
    """

    def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        _check_last_dim(activation, value, hook)
        out = activation.clone()
        v = value.to(activation.dtype).to(activation.device)
        if positions is None:
            out[...] = v
        else:
            out[:, positions] = v
        return out

    return hook


def _check_last_dim(activation: torch.Tensor, vector: torch.Tensor, hook: Any) -> None:
    if vector.shape[-1] != activation.shape[-1]:
        name = getattr(hook, "name", "?")
        raise ValueError(
            f"hook at {name}: vector has size {vector.shape[-1]} in its last dimension but the "
            f"activation has {activation.shape[-1]}"
        )


__all__ = ["HookFn", "add_vector", "capture", "replace"]
