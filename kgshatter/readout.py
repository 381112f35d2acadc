"""Forward passes whose last block computes only the positions that are read.

An evaluation reads the next-token logits at the last position of each query, and the
representations of the sweep are read at the last two; in a causal model the last block's
output at a position depends on every position's keys and values but on no other position's
query, attention output or MLP. Inside :func:`last_columns`, the last block of a
TransformerLens-native bridge (the models kgshatter trains) computes its keys and values at
every position and everything else at the last ``n`` only, so its output, the final norm and
the unembedding hold ``n`` positions. In a two-block model of the study that is most of the
second block's work per query (README, "Speed").

The logits and activations read are those of the full pass up to float rounding (the same
matrix products over fewer rows). Every hook in the last block sees ``n`` positions where it
would see all of them (its keys and values and its input excepted), and so does every hook
of the final norm and the unembedding; the shortcut applies only when every such hook
declares that it acts per position (``per_position``, which the edits kgshatter installs
do) or, on an attention pattern or score, that it handles fewer queries than keys with the
queries being the last keys (``kv_cache_safe``, e.g. :func:`kgshatter.models.attend_to_self`);
otherwise, and for any other model, the full pass runs. :func:`disabled` turns the shortcut
off (the benchmark's baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

_ENABLED = [True]
_PATTERN_POINTS = ("attn.hook_pattern", "attn.hook_attn_scores")
_AFTER_BLOCKS = ("ln_final.", "unembed.", "hook_unembed")  # they see n positions too


@contextmanager
def disabled() -> Iterator[None]:
    """Every pass inside runs every position of every block (restored on exit)."""
    previous = _ENABLED[0]
    _ENABLED[0] = False
    try:
        yield
    finally:
        _ENABLED[0] = previous


@contextmanager
def last_columns(model: TransformerBridge, n: int) -> Iterator[bool]:
    """Inside, the last block of ``model`` computes only the last ``n`` positions of a pass
    (see the module docstring); yields whether it does (False: passes are the full ones, and
    their outputs hold every position)."""
    plan = _plan(model, n)
    if plan is None:
        yield False
        return
    block, attention = plan
    with replaced_forwards(
        [block, attention], [_block_forward(block, n), _attention_forward(attention, n)]
    ):
        yield True


def _plan(model: TransformerBridge, n: int) -> tuple[Any, Any] | None:
    """The last block's native module and its attention's, or None when the shortcut does
    not apply."""
    if not _ENABLED[0] or n < 1:
        return None
    native = getattr(model, "original_model", None)
    layers = getattr(native, "layers", None)
    blocks = getattr(model, "blocks", None)
    if layers is None or blocks is None or not len(blocks):
        return None
    from transformer_lens.model_bridge.sources.native.model import NativeAttention, NativeBlock

    block = _original(blocks[len(blocks) - 1])
    if type(block) is not NativeBlock or block.cfg.attn_only:
        return None
    attention = _original(block.attn)
    if not isinstance(attention, NativeAttention) or not _plain(attention):
        return None
    prefix = f"blocks.{len(blocks) - 1}."
    for name, point in model.hook_dict.items():
        if name.startswith(prefix) and name[len(prefix) :] in _PATTERN_POINTS:
            marks: tuple[str, ...] = ("kv_cache_safe",)
        elif name.startswith((prefix, *_AFTER_BLOCKS)):
            marks = ("per_position", "kv_cache_safe")
        else:
            continue
        if not hooks_declare(point, marks):
            return None
    return block, attention


def _plain(attention: Any) -> bool:
    """Causal attention without rotary positions, grouped keys or soft-capped scores."""
    from transformer_lens.utilities.activation_functions import softcap_enabled

    return (
        attention.rotary is None
        and attention.kv_repeats == 1
        and not softcap_enabled(attention.attn_scores_soft_cap)
        and attention.causal
    )


def _block_forward(block: Any, n: int) -> Callable[..., Any]:
    """TransformerLens 4.3's ``NativeBlock.forward`` over the last ``n`` positions (its
    attention's keys and values over all of them); a pass with a padding mask runs the full
    block and keeps its last ``n`` positions."""
    full = type(block).forward

    def forward(
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor]:
        if attention_mask is not None or hidden_states.shape[1] <= n:
            with replaced_forwards([block.attn.original_component], [_full(block)]):
                (out,) = full(block, hidden_states, attention_mask, position_ids, **kwargs)
            return (out[:, -n:],)
        attn_out, _pattern = block.attn(block.ln1(hidden_states), position_ids=position_ids)
        hidden = hidden_states[:, -n:] + attn_out
        return (hidden + block.mlp(block.ln2(hidden)),)

    return forward


def _full(block: Any) -> Callable[..., Any]:
    attention = block.attn.original_component
    return lambda *args, **kwargs: type(attention).forward(attention, *args, **kwargs)


def _attention_forward(attention: Any, n: int) -> Callable[..., Any]:
    """``NativeAttention.forward`` with queries at the last ``n`` positions only: the pattern
    is ``[batch, head, n, pos]``, query ``i`` being position ``pos - n + i``."""

    def forward(
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pattern_fn: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, _ = hidden_states.shape
        heads, d_head = attention.n_heads, attention.d_head
        q = attention.q(hidden_states[:, seq - n :]).view(batch, n, heads, d_head).transpose(1, 2)
        k = attention.k(hidden_states).view(batch, seq, heads, d_head).transpose(1, 2)
        v = attention.v(hidden_states).view(batch, seq, heads, d_head).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)).div_(attention.scale)
        scores.masked_fill_(attention.causal_mask[seq - n : seq, :seq], float("-inf"))
        pattern = torch.softmax(scores, dim=-1)  # every query sees itself: no row is all -inf
        if pattern_fn is not None:
            pattern = pattern_fn(pattern)
        out = torch.matmul(pattern, v).transpose(1, 2).contiguous().view(batch, n, -1)
        return attention.o(out), pattern

    return forward


def hooks_declare(point: Any, marks: str | Sequence[str]) -> bool:
    """Whether every forward hook on the TransformerLens hook ``point`` carries one of the
    attributes ``marks`` set true (True without hooks); any backward hook, or a forward hook
    registered past TransformerLens, counts as not declaring."""
    marks = (marks,) if isinstance(marks, str) else tuple(marks)
    if point._backward_hooks:
        return False
    handles = getattr(point, "fwd_hooks", [])
    if len(point._forward_hooks) != len(handles):
        return False
    return all(any(getattr(h.user_hook, m, False) for m in marks) for h in handles)


@contextmanager
def replaced_forwards(
    modules: Sequence[Any], forwards: Sequence[Callable[..., Any]]
) -> Iterator[None]:
    """Each module's ``forward`` replaced by its counterpart in ``forwards``, restored on exit
    (a forward someone else had put in the instance comes back too).

    Set in the instance's ``__dict__`` directly: a bridge component's ``__setattr__`` would
    pass ``forward`` on to the module it wraps, whose hooks would then still fire."""
    own = [module.__dict__.get("forward") for module in modules]
    for module, forward in zip(modules, forwards, strict=True):
        module.__dict__["forward"] = forward
    try:
        yield
    finally:
        for module, previous in zip(modules, own, strict=True):
            if previous is None:
                module.__dict__.pop("forward", None)  # the class's forward again
            else:
                module.__dict__["forward"] = previous


def _original(module: Any) -> Any:
    return getattr(module, "original_component", None) or module
