"""TransformerLens hook functions users attach themselves (installed as ``kgshatter.hooks``).

Every factory returns a function with TransformerLens' hook signature ``fn(activation, hook)``,
ready for ``model.run_with_hooks(tokens, fwd_hooks=[(site.hook_name, fn)])`` or
``model.hooks(fwd_hooks=...)``. Nothing here modifies weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

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


def low_rank_delta(
    key_hook: str,
    out_hook: str,
    a: Float[torch.Tensor, "d_in rank"],
    b: Float[torch.Tensor, "d_out rank"] | None,
) -> list[tuple[str, HookFn]]:
    """A weight delta ``W += a @ b.T`` applied as hooks, weights untouched.

    The activation at ``key_hook`` (the matrix's input, e.g. ``blocks.0.mlp.hook_post``) is read
    and ``(key @ a) @ b.T`` is added at ``out_hook`` (its output, e.g. ``blocks.0.hook_mlp_out``)
    in the same forward pass. With ``b=None``, ``a`` is a dense ``[d_in, d_out]`` delta and
    ``key @ a`` is added. Returns the ``(name, fn)`` pairs for ``fwd_hooks``. Gradients flow into
    ``a`` and ``b`` (fine-tuning a delta uses this).
    """
    if b is not None and a.shape[1] != b.shape[1]:
        raise ValueError(f"factors disagree on rank: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    d_out = a.shape[1] if b is None else b.shape[0]
    seen: dict[str, torch.Tensor] = {}

    def read_key(activation: torch.Tensor, hook: Any) -> None:
        seen["key"] = activation

    def add_delta(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        key = seen.pop("key", None)
        if key is None:
            raise RuntimeError(f"low_rank_delta: {key_hook} did not fire before {out_hook}")
        if key.shape[-1] != a.shape[0] or activation.shape[-1] != d_out:
            shapes = f"{tuple(a.shape)}" + ("" if b is None else f" x {tuple(b.shape)}")
            raise ValueError(
                f"low_rank_delta: factors {shapes} do not fit "
                f"{key_hook} ({key.shape[-1]}) -> {out_hook} ({activation.shape[-1]})"
            )
        aa = a.to(key.dtype).to(key.device)
        if b is None:
            return activation + key @ aa
        return activation + (key @ aa) @ b.to(key.dtype).to(key.device).T

    # both act on each position alone: a pass that runs some positions only may keep them
    # (kgshatter.readout.last_columns); the first only reads, the second writes nothing it is
    # handed: a pass may hand them kept activations (kgshatter.readout.FrozenPrefix)
    read_key.per_position = add_delta.per_position = True  # type: ignore[attr-defined]
    read_key.read_only = True  # type: ignore[attr-defined]
    add_delta.pure = True  # type: ignore[attr-defined]
    return [(key_hook, read_key), (out_hook, add_delta)]


@contextmanager
def edited(model: TransformerBridge, *edits: Any, force: bool = False) -> Iterator[Any]:
    """``with edited(model, edit1, edit2): ...`` runs the model with the edits as hooks.

    Each edit is an object with ``hooks() -> list[(name, fn)]`` (a kgshatter ``Edit``) or such a
    list itself. The hooks go through TransformerLens's own scoped API (``model.hooks(...)``),
    which adds them in order and removes exactly these on exit, even when the body raises:
    hooks the user attached, before or inside the block, stay. The weights are never touched.
    An ``Edit`` computed on another model (its ``check_model`` fingerprint differs) is refused
    unless ``force=True``.
    """
    pairs: list[tuple[str, HookFn]] = []
    for e in edits:
        if hasattr(e, "check_model"):
            e.check_model(model, force)
        pairs.extend(e.hooks() if hasattr(e, "hooks") else e)
    missing = sorted({name for name, _ in pairs if name not in model.hook_dict})
    if missing:
        raise ValueError(f"edited(): the model has no hook points {missing}")
    with model.hooks(fwd_hooks=pairs):
        yield model


def _check_last_dim(activation: torch.Tensor, vector: torch.Tensor, hook: Any) -> None:
    if vector.shape[-1] != activation.shape[-1]:
        name = getattr(hook, "name", "?")
        raise ValueError(
            f"hook at {name}: vector has size {vector.shape[-1]} in its last dimension but the "
            f"activation has {activation.shape[-1]}"
        )


__all__ = ["HookFn", "add_vector", "capture", "edited", "low_rank_delta", "replace"]
