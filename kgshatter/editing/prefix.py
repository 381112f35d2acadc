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

On a model that returns a Hugging Face :class:`~transformers.DynamicCache` (GPT-2 and Llama
bridges) the cache is the model's own; TransformerLens-native bridges (the models kgshatter
trains) keep none, and :class:`NativePrefix` records the keys and values and runs their
attention over them; for others (Mamba) :meth:`PrefixCache.from_first_pass` declines and the
passes run every position. Hooks active
during the optimisation must act on each position alone, as every edit kgshatter installs
does (a weight delta, or a vector added at given positions, which the caller shifts to the
columns run); a hook that mixes positions, or reads a square attention pattern, would see only
the suffix: run such an optimisation inside :func:`disabled` (or with ``skip_frozen=False``,
which also runs the blocks below the edit).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from kgshatter.readout import (
    PATTERN_POINTS,
    hooks_declare,
    plain_attention,
    replaced_forwards,
    switched_off,
)

_ENABLED = [True]


def disabled() -> AbstractContextManager[None]:
    """Target optimisations inside the block run every position (side-by-side benchmarks;
    hooks that mix positions). Restored on exit."""
    return switched_off(_ENABLED)


class PrefixCache:
    """Per layer, the keys and values of every row and position of the first pass, in the
    model's own (Hugging Face) cache format.

    Use: run the first pass with :attr:`FIRST_PASS` among its keyword arguments and hand the
    cache it returns to :meth:`from_first_pass` (None where the model keeps no key/value cache,
    so no pass is spent finding out); then run each pass on :meth:`columns` of its rows with
    :meth:`past`'s keyword arguments, inside :meth:`running`. Rows with different splits share
    a pass: each row's cached columns are left-padded to the longest and the padding masked,
    with every position given explicitly.
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

    @staticmethod
    def columns(splits: torch.Tensor, span: int, width: int) -> torch.Tensor:
        """``[rows, span]``: the batch columns a pass runs, from each row's split (past the
        batch's last column, its last column again: padding after the read positions)."""
        return (splits[:, None] + torch.arange(span, device=splits.device)).clamp(max=width - 1)

    def past(self, rows: torch.Tensor, splits: torch.Tensor, span: int) -> dict[str, Any]:
        """Keyword arguments for a pass of ``rows`` over ``span`` columns each, from column
        ``splits[i]`` of row ``rows[i]``: a fresh ``DynamicCache`` of their columns
        ``0 .. split-1``, left-padded to the longest (a pass extends the cache it is given, so
        each pass gets its own), the attention mask hiding the padding and the absolute
        positions of the columns run. Empty when no row has a prefix."""
        from transformers import DynamicCache

        layers, valid = _left_padded(self.layers, rows, splits)
        if valid.shape[1] == 0:
            return {}
        cache = DynamicCache()
        for index, (keys, values) in enumerate(layers):
            cache.update(keys, values, index)
        suffix = torch.ones(len(rows), span, dtype=torch.long, device=splits.device)
        mask = torch.cat([valid.long(), suffix], 1)
        positions = self.columns(splits, span, self.layers[0][0].shape[2])
        return {"past_key_values": cache, "attention_mask": mask, "position_ids": positions}

    @contextmanager
    def running(self) -> Iterator[None]:
        """Nothing to install: the model's own attention reads ``past_key_values``."""
        yield


class NativePrefix(PrefixCache):
    """:class:`PrefixCache` for TransformerLens-native bridges (``boot_native``: the models
    kgshatter trains), whose attention keeps no key/value cache.

    The first pass runs inside :meth:`recording` (forward hooks on every attention's key and
    value projections keep their outputs); the later passes inside :meth:`running`, where each
    block's attention is replaced by the same computation over the cached keys and values of
    the columns before the pass's (left-padded and masked as in :class:`PrefixCache`) and its
    own. The blocks' input at the columns run is the first pass's residual
    (:class:`~kgshatter.editing.skip.BlockSkip` from block 0), so the embedding's positions
    are right. :meth:`plan` declines anything but plain causal multi-head attention with
    absolute positions, and any hook on an attention pattern or score that does not declare
    ``kv_cache_safe`` (the one ``layer0_attention="self"`` installs does).
    """

    def __init__(self, attentions: list[Any]) -> None:
        super().__init__([])
        self.attentions = attentions
        self._pass: tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor] | None = None

    @classmethod
    def plan(cls, model: Any, kept_hooks: Sequence[str] = ()) -> NativePrefix | None:
        """A shortcut for ``model``, or None: not a TransformerLens-native bridge, an
        attention :meth:`_forward` does not reproduce, a hook on a pattern or score (on the
        model, or among ``kept_hooks``, the hooks passed for the optimisation) not declared
        ``kv_cache_safe``, or inside :func:`disabled`."""
        if not _ENABLED[0]:
            return None
        try:
            from kgshatter.tl_compat import NativeAttention
        except ImportError:  # pragma: no cover - another TransformerLens layout
            return None
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            return None
        attentions = []
        for block in blocks:
            try:  # a Mamba block has a mixer, no attention
                attentions.append(getattr(block.attn, "original_component", None))
            except AttributeError:
                return None
        for attn in attentions:
            if not isinstance(attn, NativeAttention) or not plain_attention(attn):
                return None
        if any(name.endswith(PATTERN_POINTS) for name in kept_hooks):
            return None
        for name, point in model.hook_dict.items():
            if name.endswith(PATTERN_POINTS) and not hooks_declare(point, "kv_cache_safe"):
                return None
        return cls(attentions)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Keep every attention's keys and values ``[batch, heads, pos, d_head]``."""
        seen: list[dict[str, torch.Tensor]] = [{} for _ in self.attentions]

        def keeper(store: dict[str, torch.Tensor], name: str, attn: Any) -> Any:
            def keep(module: Any, inputs: Any, output: torch.Tensor) -> None:
                batch, seq = output.shape[:2]
                heads = output.detach().view(batch, seq, attn.n_heads, attn.d_head)
                store[name] = heads.transpose(1, 2)

            return keep

        handles = []
        for store, attn in zip(seen, self.attentions, strict=True):
            handles.append(attn.k.register_forward_hook(keeper(store, "k", attn)))
            handles.append(attn.v.register_forward_hook(keeper(store, "v", attn)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self.layers = [(store["k"], store["v"]) for store in seen if store]

    def past(self, rows: torch.Tensor, splits: torch.Tensor, span: int) -> dict[str, Any]:
        """Sets the cached columns for the next pass; the model's forward needs no argument."""
        if len(self.layers) != len(self.attentions):
            raise RuntimeError("NativePrefix: nothing recorded (run the first pass first)")
        self._pass = _left_padded(self.layers, rows, splits)
        return {}

    @contextmanager
    def running(self) -> Iterator[None]:
        """Every attention reads the cached columns :meth:`past` set (restored on exit)."""
        forwards = [self._forward(index, attn) for index, attn in enumerate(self.attentions)]
        with replaced_forwards(self.attentions, forwards):
            yield

    def _forward(self, index: int, attn: Any) -> Any:
        """NativeAttention's computation (TransformerLens 4.3, the configurations :meth:`plan`
        accepts) with the cached keys and values of the columns before the pass's."""

        def forward(
            hidden_states: torch.Tensor,
            attention_mask: Any = None,
            position_ids: Any = None,
            pattern_fn: Any = None,
            **kwargs: Any,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if self._pass is None:
                raise RuntimeError("NativePrefix: no cached columns set for this pass")
            layers, valid = self._pass
            batch, seq, _ = hidden_states.shape
            heads, d_head = attn.n_heads, attn.d_head
            q = attn.q(hidden_states).view(batch, seq, heads, d_head).transpose(1, 2)
            k = attn.k(hidden_states).view(batch, seq, heads, d_head).transpose(1, 2)
            v = attn.v(hidden_states).view(batch, seq, heads, d_head).transpose(1, 2)
            k = torch.cat([layers[index][0].to(k.device, k.dtype), k], 2)
            v = torch.cat([layers[index][1].to(v.device, v.dtype), v], 2)
            scores = torch.matmul(q, k.transpose(-2, -1)) / attn.scale
            causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
            hidden = ~valid.to(q.device)[:, None, None, :].expand(batch, 1, seq, valid.shape[1])
            block_mask = torch.cat([hidden, causal.expand(batch, 1, seq, seq)], -1)
            scores = scores.masked_fill(block_mask, float("-inf"))
            pattern = torch.softmax(scores, dim=-1).masked_fill(block_mask, 0.0)
            if pattern_fn is not None:
                pattern = pattern_fn(pattern)
            out = torch.matmul(pattern, v).transpose(1, 2).contiguous().view(batch, seq, -1)
            return attn.o(out), pattern

        return forward


def _left_padded(
    layers: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor, splits: torch.Tensor
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Per layer the keys and values ``[rows, heads, longest, d_head]`` of columns
    ``0 .. splits[i]-1`` of each row, right-aligned (padding first), and ``[rows, longest]``
    True where a column is the row's own (``longest`` 0 when no row has a prefix)."""
    longest = int(splits.max())
    j = torch.arange(longest, device=splits.device)
    pad = (longest - splits)[:, None]
    source = (j[None] - pad).clamp(min=0)  # padded column -> the row's own column
    picked = []
    for keys, values in layers:  # each layer's own device (a model split across devices)
        r, src = rows.to(keys.device)[:, None], source.to(keys.device)
        picked.append((keys[r, :, src].permute(0, 2, 1, 3), values[r, :, src].permute(0, 2, 1, 3)))
    return picked, j[None] >= pad


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
