"""Forward passes that start at each row's first edited position, on keys and values cached there.

A target optimisation adds its deltas at one position of every prompt (ROME: the subject's
last token), and a causal model's activations before that position do not depend on them:
the context prefix is the same function of the same tokens at every step. :class:`PrefixCache`
keeps the keys and values of every layer from the first, gradient-free pass and, in the passes
that follow, feeds a group of rows only its columns from ``split`` (the rows' first edited
position) to the last one a loss reads, with the cached keys and values of columns
``0 .. split-1`` as the model's own key/value cache (Hugging Face's ``past_key_values``, the
cache generation uses; positions continue from ``split``). The logits at the read positions
are those of the full pass up to float rounding (``tests/test_pretrained.py``).

It needs a model that returns a Hugging Face :class:`~transformers.DynamicCache` (GPT-2 and
Llama bridges); for others (TransformerLens-native bridges, Mamba) :meth:`PrefixCache.plan`
declines and the passes run every position. Hooks active during the optimisation must act on
each position alone, as every edit kgshatter installs does (a weight delta, or a vector added
at given positions, which the caller shifts by ``split``); a hook that mixes positions, or
reads a square attention pattern, would see only the suffix: run such an optimisation inside
:func:`disabled` (or with ``skip_frozen=False``, which also runs the blocks below the edit).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


_ENABLED = [True]


@contextmanager
def disabled() -> Iterator[None]:
    """Target optimisations inside the block run every position (side-by-side benchmarks;
    hooks that mix positions). Restored on exit."""
    previous = _ENABLED[0]
    _ENABLED[0] = False
    try:
        yield
    finally:
        _ENABLED[0] = previous


class PrefixCache:
    """Per layer, the keys and values of every row and position of the first pass.

    Use: :meth:`plan` (None where the model keeps no key/value cache), run the first pass with
    :meth:`first_pass_kwargs` and hand what it returns to :meth:`record`; then for each group
    of rows :meth:`groups` gives ``(rows, split)`` and :meth:`past` the cache of their columns
    ``0 .. split-1``.
    """

    def __init__(self) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def plan(cls, model: TransformerBridge) -> PrefixCache | None:
        """A cache for ``model``, or None when its forward pass returns no Hugging Face
        ``DynamicCache`` (one token through the model decides), or inside :func:`disabled`."""
        if not _ENABLED[0]:
            return None
        try:
            from transformers import DynamicCache
        except ImportError:  # pragma: no cover - transformers comes with transformer-lens
            return None
        device = next(model.parameters()).device
        try:
            with torch.no_grad():
                out = model(
                    torch.zeros((1, 1), dtype=torch.long, device=device),
                    return_type="logits_and_cache",
                )
        except (TypeError, ValueError):
            return None
        cache = out[1] if isinstance(out, tuple) and len(out) == 2 else None
        if not isinstance(cache, DynamicCache) or not _layers(cache):
            return None
        return cls()

    @staticmethod
    def first_pass_kwargs() -> dict[str, Any]:
        return {"return_type": "logits_and_cache"}

    def record(self, cache: Any) -> None:
        """Keep the first pass's keys and values (detached)."""
        self.layers = [(k.detach(), v.detach()) for k, v in _layers(cache)]

    @staticmethod
    def groups(
        live: torch.Tensor, split: torch.Tensor, chunk_rows: int
    ) -> Iterator[tuple[torch.Tensor, int]]:
        """``live`` rows in groups of equal ``split[row]`` (ascending, stable), at most
        ``chunk_rows`` each: ``(rows, split)``."""
        values = split[live]
        for value in torch.unique(values).tolist():
            rows = live[values == value]
            for start in range(0, len(rows), chunk_rows):
                yield rows[start : start + chunk_rows], int(value)

    def past(self, rows: torch.Tensor, split: int) -> Any:
        """A fresh ``DynamicCache`` holding columns ``0 .. split-1`` of ``rows`` (a pass
        extends the cache it is given, so each pass gets its own)."""
        from transformers import DynamicCache

        if self.layers is None:
            raise RuntimeError("PrefixCache: nothing recorded (run the first pass first)")
        cache = DynamicCache()
        for index, (keys, values) in enumerate(self.layers):
            cache.update(keys[rows, :, :split], values[rows, :, :split], index)
        return cache


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A ``DynamicCache``'s per-layer ``(keys, values)`` ``[batch, heads, pos, d_head]``, or
    [] when it holds anything else."""
    out = []
    for layer in getattr(cache, "layers", ()):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)):
            return []
        if keys.dim() != 4 or values.dim() != 4:
            return []
        out.append((keys, values))
    return out
