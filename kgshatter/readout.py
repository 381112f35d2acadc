"""Evaluation passes that compute less: the last block only where it is read, and a frozen
prefix reused across edits (:class:`FrozenPrefix`).

An evaluation reads the next-token logits at the last position of each query, and the
representations of the sweep are read at the last two; in a causal model the last block's
output at a position depends on every position's keys and values but on no other position's
query, attention output or MLP. Inside :func:`last_columns`, the last block of a
TransformerLens-native bridge (the models kgshatter trains) computes its keys and values at
every position and everything else at the last ``n`` only, so its output, the final norm and
the unembedding hold ``n`` positions. In a two-block model of the study that is most of the
second block's work per query (docs/speed.md).

The logits and activations read are those of the full pass up to float rounding (the same
matrix products over fewer rows). Every hook in the last block sees ``n`` positions where it
would see all of them (its keys and values and its input excepted), and so does every hook
of the final norm and the unembedding; the shortcut applies only when every such hook
declares that it acts per position (``per_position``, which the edits kgshatter installs
do) or, on an attention pattern or score, that it handles fewer queries than keys with the
queries being the last keys (``kv_cache_safe``, e.g. :func:`kgshatter.models.attend_to_self`);
otherwise, and for any other model, the full pass runs. :func:`disabled` turns both
shortcuts off (the benchmark's baseline).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

_ENABLED = [True]
# a block's hooks on its attention pattern and scores (shapes that depend on the queries run)
PATTERN_POINTS = ("attn.hook_pattern", "attn.hook_attn_scores")
_AFTER_BLOCKS = ("ln_final.", "unembed.", "hook_unembed")  # they see n positions too


def disabled() -> AbstractContextManager[None]:
    """Every pass inside runs in full: every position of every block, nothing kept by a
    :class:`FrozenPrefix` (restored on exit)."""
    return switched_off(_ENABLED)


@contextmanager
def switched_off(flag: list[bool]) -> Iterator[None]:
    """A module's on/off switch ``flag[0]`` set False inside, restored on exit."""
    previous = flag[0]
    flag[0] = False
    try:
        yield
    finally:
        flag[0] = previous


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
    blocks = getattr(model, "blocks", None)
    if blocks is None or not len(blocks):
        return None
    from kgshatter.tl_compat import NativeAttention, NativeBlock

    block = _original(blocks[len(blocks) - 1])
    if type(block) is not NativeBlock or block.cfg.attn_only:
        return None
    attention = _original(block.attn)
    if not isinstance(attention, NativeAttention) or not plain_attention(attention):
        return None
    prefix = f"blocks.{len(blocks) - 1}."
    for name, point in model.hook_dict.items():
        if name.startswith(prefix) and name[len(prefix) :] in PATTERN_POINTS:
            marks: tuple[str, ...] = ("kv_cache_safe",)
        elif name.startswith((prefix, *_AFTER_BLOCKS)):
            marks = ("per_position", "kv_cache_safe")
        else:
            continue
        if not hooks_declare(point, marks):
            return None
    return block, attention


def plain_attention(attention: Any) -> bool:
    """Whether a TransformerLens-native attention is causal, without rotary positions,
    grouped keys or soft-capped scores: the configurations kgshatter's own attention forwards
    reproduce (:class:`kgshatter.models.LeanAttention`, :func:`last_columns`,
    :class:`kgshatter.editing.prefix.NativePrefix`)."""
    from kgshatter.tl_compat import softcap_enabled

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


# the points of block ``s`` that fire after its attention (what a frozen prefix still runs)
_AFTER_ATTENTION = ("ln2.", "mlp.", "hook_mlp_in", "hook_mlp_out", "hook_resid_mid",
                    "hook_resid_post", "hook_out")  # fmt: skip


class _Kept:
    """What a frozen prefix keeps of one token batch: the residual after block ``s``'s
    attention (``mid``) and, once a pass has let it see them, the unedited input of the MLP's
    out-projection (``key``) and that projection's output (``out``)."""

    __slots__ = ("mid", "key", "out")

    def __init__(self, mid: torch.Tensor) -> None:
        self.mid = mid
        self.key: torch.Tensor | None = None
        self.out: torch.Tensor | None = None


class FrozenPrefix:
    """The unedited model's residual stream after block ``block``'s attention, and its MLP's
    key and output, kept per token batch, so that passes over the same batches with hooks only
    above that point (an edit of block ``block``'s MLP or higher) start from them.

    An edit sweep scores every edit on the same query sets and representation queries
    (:class:`kgshatter.evaluate.Evaluator`, the sweep's ring tokens); the embedding, the
    blocks below ``block`` and ``block``'s attention compute the same values for each of
    them. Inside :meth:`running`, a pass whose tokens were seen before (under the same
    weights and the same permanent hooks below the point) skips them: the blocks below pass
    their input through, block ``block`` adds its MLP to the kept residual, and every hook from
    ``blocks.{block}.ln2`` on fires as usual; the values are those of the full pass, bit for bit
    (the kept residual is that pass's own). A pass with a temporary hook below the point, a
    padding mask or unseen tokens runs in full and, hook-free below, is kept (up to
    ``max_bytes`` in all). Only passes without gradients (``torch.inference_mode`` or
    ``no_grad``) and without autocast are kept or reused. A permanent hook below the point
    (the ``layer0_attention="self"`` hook) is part of the model: it does not fire on a pass
    that starts from a kept residual. TransformerLens-native bridges only (:meth:`plan`);
    :func:`disabled` turns it off.

    The MLP of block ``block`` is skipped too where an edit of its out-projection only reads
    that projection's input (a low-rank delta ``W += a b^T`` adds ``(key @ a) @ b^T`` to its
    output: :func:`kgshatter.hooks.low_rank_delta`): when no hook sits between the kept
    residual and the out-projection's input (``ln2``, the MLP's input and in-projection) and
    every hook on that input declares ``read_only`` (it returns ``None`` or its input, and
    writes nothing), the kept key goes through that point's hooks and the kept output through
    the out-projection's and the MLP's output hooks, which see what the full pass gives them.
    A hook that does not declare ``pure`` (it never writes the tensor it is handed) gets a copy
    of a kept tensor, so nothing kept is changed in place.
    """

    def __init__(self, model: TransformerBridge, block: int, max_bytes: int) -> None:
        self.model = model
        self.block = block
        self.max_bytes = max_bytes
        self._kept: dict[bytes, _Kept] = {}
        self._bytes = 0
        self._state: tuple | None = None
        self._key: bytes | None = None
        self._hit: _Kept | None = None

    @classmethod
    def plan(
        cls, model: TransformerBridge, block: int, max_bytes: int = 1 << 30
    ) -> FrozenPrefix | None:
        """A frozen prefix through ``block``'s attention, or None where it does not apply: a
        model other than a TransformerLens-native bridge, a block without an MLP, or the last
        block (whose positions :func:`last_columns` trims)."""
        blocks = getattr(model, "blocks", None)
        if blocks is None or not 0 <= block < len(blocks) - 1:
            return None
        from kgshatter.tl_compat import NativeBlock

        natives = [_original(b) for b in list(blocks)[: block + 1]]
        if any(type(b) is not NativeBlock for b in natives) or natives[-1].cfg.attn_only:
            return None
        return cls(model, block, max_bytes)

    @contextmanager
    def running(self) -> Iterator[None]:
        """Passes inside start from the kept residual where they can (restored on exit)."""
        if not _ENABLED[0]:
            yield
            return
        natives = [_original(b) for b in list(self.model.blocks)[: self.block + 1]]
        forwards = [self._below(b) for b in natives[:-1]] + [self._frozen(natives[-1])]
        root = self.model.original_model
        handle = root.register_forward_pre_hook(self._look_up, with_kwargs=True)
        try:
            with replaced_forwards(natives, forwards):
                yield
        finally:
            handle.remove()
            self._key = self._hit = None

    def _look_up(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        """Before a pass: its key (None: not to be kept or reused) and the kept residual."""
        self._key = self._hit = None
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(tokens, torch.Tensor) or kwargs.get("attention_mask") is not None:
            return
        if kwargs.get("inputs_embeds") is not None or kwargs.get("position_ids") is not None:
            return
        if torch.is_grad_enabled() or any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda")):
            return  # a kept residual carries no graph and one precision
        state = self._model_state()
        if state is None:
            return
        if state != self._state:  # new weights or permanent hooks: nothing kept holds
            self._kept.clear()
            self._bytes = 0
            self._state = state
        digest = hashlib.blake2b(tokens.detach().cpu().numpy().tobytes(), digest_size=16)
        digest.update(repr((tuple(tokens.shape), str(tokens.dtype))).encode())
        self._key = digest.digest()
        self._hit = self._kept.get(self._key)

    def _model_state(self) -> tuple | None:
        """What the kept residuals depend on besides the tokens: every parameter (identity,
        in-place version, dtype, device) and the permanent hooks below the point; None while
        a temporary hook sits there."""
        below = f"blocks.{self.block}."
        permanent = []
        for name, point in self.model.hook_dict.items():
            block = _block_of(name)
            if block is not None and block > self.block:
                continue
            if block == self.block and name[len(below) :].startswith(_AFTER_ATTENTION):
                continue
            if block is None and not name.startswith(("embed.", "pos_embed.", "hook_embed",
                                                      "hook_pos_embed")):  # fmt: skip
                continue
            handles = _forward_handles(point)
            if handles is None:
                return None
            for h in handles:
                if not h.is_permanent:
                    return None
                permanent.append((name, id(h.user_hook)))
        # a move or cast replaces a parameter's data without a new identity or version
        weights = tuple((id(p), p._version, p.dtype, p.device) for p in self.model.parameters())
        return (weights, tuple(sorted(set(permanent))))

    def _below(self, block: Any) -> Callable[..., Any]:
        """A block under the point: passes its input through on a pass that starts above."""

        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self._hit is not None:
                return (hidden_states,)
            return type(block).forward(block, hidden_states, *args, **kwargs)

        return forward

    def _frozen(self, block: Any) -> Callable[..., Any]:
        """TransformerLens 4.3's ``NativeBlock.forward``, its attention's result (and its MLP's
        key and output, see the class docstring) kept or reused."""
        points = _MlpPoints(block)

        def forward(
            hidden_states: torch.Tensor,
            attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None,
            **kwargs: Any,
        ) -> tuple[torch.Tensor]:
            kept = self._hit
            if kept is None:
                attn_out, _pattern = block.attn(
                    block.ln1(hidden_states), attention_mask=attention_mask,
                    position_ids=position_ids,
                )  # fmt: skip
                mid = hidden_states + attn_out
                if self._key is None or not self._fits(mid):
                    return (mid + block.mlp(block.ln2(mid)),)
                kept = self._kept[self._key] = _Kept(mid.detach())
            mid = kept.mid
            if not points.reads_key_only():
                if not _all_pure(points.before):
                    mid = mid.clone()  # a hook may write the residual it is handed
                return (mid + block.mlp(block.ln2(mid)),)
            if kept.key is None:
                return (mid + self._mlp_kept(block, mid, kept, points),)
            assert kept.out is not None and points.key is not None
            points.key(kept.key)  # its hooks only read
            out = kept.out if _all_pure(points.out) else kept.out.clone()
            return (mid + block.mlp.hook_out(block.mlp.out.hook_out(out)),)

        return forward

    def _mlp_kept(self, block: Any, mid: torch.Tensor, kept: _Kept, points: _MlpPoints) -> Any:
        """``block.mlp(block.ln2(mid))``, keeping its out-projection's input and output (as
        they are before the output's hooks run)."""
        assert points.key is not None and points.out_in is not None
        seen: dict[str, torch.Tensor] = {}
        copy = not _all_pure(points.out)

        def key(module: Any, args: tuple, output: torch.Tensor) -> None:
            seen["key"] = output

        def out(module: Any, args: tuple) -> None:
            seen["out"] = args[0].clone() if copy else args[0]

        handles = [points.key.register_forward_hook(key),
                   points.out_in.register_forward_pre_hook(out)]  # fmt: skip
        try:
            result = block.mlp(block.ln2(mid))
        finally:
            for h in handles:
                h.remove()
        if len(seen) == 2 and self._fits(seen["key"], seen["out"]):
            kept.key, kept.out = seen["key"].detach(), seen["out"].detach()
        return result

    def _fits(self, *tensors: torch.Tensor) -> bool:
        """Whether ``tensors`` fit under ``max_bytes`` (counted when they do)."""
        size = sum(t.numel() * t.element_size() for t in tensors)
        if self._bytes + size > self.max_bytes:
            return False
        self._bytes += size
        return True


class _MlpPoints:
    """The hook points of a native block after its attention that a frozen prefix tells
    apart: those between the residual and the MLP's out-projection (``before``: ``ln2``, the
    MLP's input and in-projection), the out-projection's input (``key``), and those handed its
    output (``out_in``, the projection's own, and ``out``: that and the MLP's). ``key`` and
    the rest are None for an MLP whose out-projection is not a TransformerLens
    ``LinearBridge`` with its own input and output hooks (its MLP always runs)."""

    def __init__(self, block: Any) -> None:
        from kgshatter.tl_compat import HookPoint

        mlp = block.mlp
        out_proj = getattr(mlp, "out", None)
        key, out_in = getattr(out_proj, "hook_in", None), getattr(out_proj, "hook_out", None)
        out_hook = getattr(mlp, "hook_out", None)
        found = all(isinstance(p, HookPoint) for p in (key, out_in, out_hook))
        after = {id(key), id(out_in), id(out_hook)} if found else set()
        self.before = [m for part in (block.ln2, mlp) for m in part.modules()
                       if isinstance(m, HookPoint) and id(m) not in after]  # fmt: skip
        self.key = key if found else None
        self.out_in = out_in if found else None
        self.out = [out_in, out_hook] if found else []

    def reads_key_only(self) -> bool:
        """Whether this pass's MLP output can come from a kept pass: no hook before the key,
        and every hook on the key ``read_only``."""
        if self.key is None or not all(unhooked(p) for p in self.before):
            return False
        return hooks_declare(self.key, "read_only")


def _all_pure(points: Sequence[Any]) -> bool:
    """Whether every hook on ``points`` declares that it writes nothing it is handed."""
    return all(hooks_declare(p, ("pure", "read_only")) for p in points)


def frozen_running(frozen: FrozenPrefix | None, model: Any) -> AbstractContextManager[None]:
    """``frozen.running()`` when ``frozen`` is a prefix of ``model``; otherwise nothing."""
    if frozen is not None and frozen.model is model:
        return frozen.running()
    return nullcontext()


def _block_of(hook_name: str) -> int | None:
    if not hook_name.startswith("blocks."):
        return None
    head = hook_name.split(".", 2)[1]
    return int(head) if head.isdigit() else None


def hooks_declare(point: Any, marks: str | Sequence[str]) -> bool:
    """Whether every forward hook on the TransformerLens hook ``point`` carries one of the
    attributes ``marks`` set true (True without hooks); any backward hook, or a forward hook
    registered past TransformerLens, counts as not declaring."""
    marks = (marks,) if isinstance(marks, str) else tuple(marks)
    handles = _forward_handles(point)
    if handles is None:
        return False
    return all(any(getattr(h.user_hook, m, False) for m in marks) for h in handles)


def unhooked(point: Any) -> bool:
    """Whether nothing hooks the TransformerLens hook point ``point``, through TransformerLens
    or torch (forward, pre-forward or backward)."""
    return not (
        point.fwd_hooks
        or point.bwd_hooks
        or point._forward_hooks
        or point._forward_pre_hooks
        or point._backward_hooks
        or point._backward_pre_hooks
    )


def _forward_handles(point: Any) -> list[Any] | None:
    """TransformerLens's handles of the forward hooks on ``point``; None when it also holds a
    backward hook, or a forward (pre-)hook registered past TransformerLens (which says nothing
    about itself)."""
    if point._backward_hooks or point._forward_pre_hooks:
        return None
    handles = getattr(point, "fwd_hooks", [])
    if len(point._forward_hooks) != len(handles):
        return None
    return list(handles)


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
