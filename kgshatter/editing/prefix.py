"""Forward passes that start at each row's first edited position, on keys and values cached there.

A target optimisation adds its deltas at one position of every prompt (ROME: the subject's
last token), and a causal model's activations before that position do not depend on them:
the context prefix is the same function of the same tokens at every step. :class:`PrefixCache`
keeps the keys and values of every layer from the first, gradient-free pass and, in the passes
that follow, feeds each row only its columns from ``split`` (its first edited position) to the
last one a loss reads, with the cached keys and values of columns ``0 .. split-1`` as the
model's own key/value cache (Hugging Face's ``past_key_values``, the cache generation uses,
left-padded and masked as in batched generation; positions continue from each row's
``split``). The logits at the read positions are those of the full pass up to float rounding
(``tests/test_pretrained.py``). On GPT-2-XL with ROME's 10-token prompts each row runs 2 of
its 10 columns.

It needs a model that returns a Hugging Face :class:`~transformers.DynamicCache` (GPT-2 and
Llama bridges); for others (TransformerLens-native bridges, Mamba)
:meth:`PrefixCache.from_first_pass` declines and the passes run every position. Hooks active
during the optimisation must act on each position alone, as every edit kgshatter installs
does (a weight delta, or a vector added at given positions, which the caller shifts to the
columns run); a hook that mixes positions, or reads a square attention pattern, would see only
the suffix: run such an optimisation inside :func:`disabled` (or with ``skip_frozen=False``,
which also runs the blocks below the edit).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

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

    Use: run the first pass with :attr:`FIRST_PASS` among its keyword arguments and hand the
    cache it returns to :meth:`from_first_pass` (None where the model keeps no key/value cache,
    so no pass is spent finding out); then run each pass on :meth:`columns` of its rows with
    :meth:`past`'s keyword arguments. Rows with different splits share a pass: each row's
    cached columns are left-padded to the longest and the padding masked, with every position
    given explicitly.
    """

    #: what the first pass passes to the model's forward to get its key/value cache back
    FIRST_PASS: dict[str, Any] = {"return_type": "logits_and_cache"}

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.layers = layers

    @classmethod
    def from_first_pass(cls, cache: Any) -> PrefixCache | None:
        """The first pass's keys and values (detached), or None when the model returned no
        Hugging Face ``DynamicCache`` (TransformerLens-native bridges return None, Mamba its
        own state) or inside :func:`disabled`."""
        if not _ENABLED[0]:
            return None
        try:
            from transformers import DynamicCache
        except ImportError:  # pragma: no cover - transformers comes with transformer-lens
            return None
        layers = _layers(cache) if isinstance(cache, DynamicCache) else []
        return cls([(k.detach(), v.detach()) for k, v in layers]) if layers else None

    @staticmethod
    def rows_per_pass(micro_batch: int | None, width: int, span: int, n_rows: int) -> int:
        """Rows per pass: ``micro_batch`` bounds the tokens a pass holds (``micro_batch`` rows
        of the batch's ``width``), so rows that run ``span`` columns each fit more per pass."""
        if micro_batch is None:
            return n_rows
        return max(micro_batch, micro_batch * width // max(span, 1))

    def past(self, rows: torch.Tensor, splits: torch.Tensor, span: int) -> dict[str, Any]:
        """Keyword arguments for a pass of ``rows`` over ``span`` columns each, from column
        ``splits[i]`` of row ``rows[i]``: a fresh ``DynamicCache`` of their columns
        ``0 .. split-1``, left-padded to the longest (a pass extends the cache it is given, so
        each pass gets its own), the attention mask hiding the padding and the absolute
        positions of the columns run. Empty when no row has a prefix."""
        from transformers import DynamicCache

        longest = int(splits.max())
        if longest == 0:
            return {}
        width = self.layers[0][0].shape[2]
        j = torch.arange(longest, device=splits.device)
        pad = (longest - splits)[:, None]
        source = (j[None] - pad).clamp(min=0)  # padded column -> the row's own column
        cache = DynamicCache()
        for index, (keys, values) in enumerate(self.layers):
            picked_keys = keys[rows[:, None], :, source].permute(0, 2, 1, 3)
            picked_values = values[rows[:, None], :, source].permute(0, 2, 1, 3)
            cache.update(picked_keys, picked_values, index)
        suffix = torch.ones(len(rows), span, dtype=torch.long, device=splits.device)
        mask = torch.cat([(j[None] >= pad).long(), suffix], 1)
        positions = self.columns(splits, span, width)
        return {"past_key_values": cache, "attention_mask": mask, "position_ids": positions}

    @staticmethod
    def columns(splits: torch.Tensor, span: int, width: int) -> torch.Tensor:
        """``[rows, span]``: the batch columns a pass runs, from each row's split (past the
        batch's last column, its last column again: padding after the read positions)."""
        return (splits[:, None] + torch.arange(span, device=splits.device)).clamp(max=width - 1)


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
