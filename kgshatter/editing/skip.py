"""Forward passes that start at the first edited block, on the residual cached there.

A target optimisation adds its deltas at hooks of block ``k`` and above; the model's weights
are frozen, so everything below block ``k`` is the same function of the same tokens at every
step. :class:`BlockSkip` caches the residual stream entering block ``k`` once (during the
first, gradient-free pass, earlier edits' hooks included) and, in the passes that follow,
replaces blocks ``0 .. k-1`` by stubs that return their input untouched while a hook on
``blocks.k.hook_in`` puts the cached residual back. The embedding and the model's own masks
and positions are computed as usual, so nothing depends on the architecture (GPT-2, Llama,
Mamba and TransformerLens-native bridges are tested: ``tests/test_skip.py``); the logits are
those of the full pass up to float rounding. On GPT-2-XL with ROME at layer 17 this saves 17 of
the 48 blocks' forward work per step (the backward pass never reached them).

Hooks at the skipped blocks do not fire inside :meth:`BlockSkip.running`. A hook already on
the model (a sequence's earlier edits, installed by ``edited``) fires in the first pass, so
an edit below the skipped blocks keeps its effect through the cached residual (tested); a hook
with side effects there (a capture) sees that pass only. :meth:`BlockSkip.plan` declines when
a hook the caller passes for the optimisation's passes would sit below or at the injection
point.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from kgshatter.readout import replaced_forwards

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def block_of(hook_name: str) -> int | None:
    """The block index of a ``blocks.N.*`` hook name, else None.

    >>> block_of("blocks.17.hook_mlp_out"), block_of("unembed.hook_in")
    (17, None)
    """
    m = _BLOCK.match(hook_name)
    return int(m.group(1)) if m else None


class BlockSkip:
    """Run blocks ``start ..`` on a cached residual (see the module docstring).

    Use: :meth:`plan` (None when nothing can be skipped), then during the gradient-free first
    pass add :meth:`recorder` to its hooks, then run every later pass inside :meth:`running`
    with :meth:`injector` among its hooks. ``rows()`` gives the cached rows each later pass
    runs (e.g. the rows of a micro-batch).
    """

    def __init__(self, model: TransformerBridge, start: int) -> None:
        self.model = model
        self.start = start
        self.hook_name = f"blocks.{start}.hook_in"
        self.residual: torch.Tensor | None = None
        self._tuple_output: bool | None = None

    @classmethod
    def plan(
        cls,
        model: TransformerBridge,
        hooks: Sequence[str],
        kept_hooks: Sequence[str] = (),
        from_zero: bool = False,
    ) -> BlockSkip | None:
        """A skip for deltas at ``hooks``, or None when it would save nothing or change
        something: a hook outside the blocks, a first edited block 0 (unless ``from_zero``:
        then nothing is skipped, but the cached residual still enters block 0, as a pass over
        some columns only needs), or one of ``kept_hooks`` (hooks active during the later
        passes) at or below the injection point."""
        blocks = getattr(model, "blocks", None)
        layers = [block_of(h) for h in hooks]
        if blocks is None or not layers or any(layer is None for layer in layers):
            return None
        start = min(layer for layer in layers if layer is not None)
        if (start == 0 and not from_zero) or start >= len(blocks):
            return None
        for name in kept_hooks:
            layer = block_of(name)
            if layer is None or layer < start:
                return None
            if layer == start and _canonical(model, name) == _canonical(
                model, f"blocks.{start}.hook_in"
            ):
                return None
        return cls(model, start)

    def recorder(self) -> tuple[str, Callable[..., None]]:
        """A hook that stores the residual entering block ``start`` (detached)."""

        def record(residual: torch.Tensor, hook: Any) -> None:
            self.residual = residual.detach()

        return (self.hook_name, record)

    def injector(
        self,
        rows: Callable[[], torch.Tensor],
        columns: Callable[[], torch.Tensor | None] = lambda: None,
    ) -> tuple[str, Callable[..., Any]]:
        """A hook that replaces block ``start``'s input by the cached residual of ``rows()``,
        at each row's batch columns ``columns()`` (``[rows, n]``; None: all of them), for a
        pass that runs only some columns (a :class:`~kgshatter.editing.prefix.PrefixCache`)."""

        def inject(residual: torch.Tensor, hook: Any) -> torch.Tensor:
            if self.residual is None:
                raise RuntimeError("BlockSkip: no residual recorded (run the recorder first)")
            cached, cols = self.residual[rows()], columns()
            if cols is not None:
                cached = cached[torch.arange(len(cached), device=cols.device)[:, None], cols]
            return cached.to(residual.dtype)

        return (self.hook_name, inject)

    @contextmanager
    def running(self) -> Iterator[None]:
        """Blocks ``0 .. start-1`` pass their input through untouched (restored on exit)."""
        if self.start == 0:
            yield
            return
        if self._tuple_output is None:
            self._tuple_output = self._probe_output_kind()
        blocks = list(self.model.blocks)[: self.start]
        as_tuple = self._tuple_output

        def stub(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden,) if as_tuple else hidden

        with replaced_forwards(blocks, [stub] * len(blocks)):
            yield

    def _probe_output_kind(self) -> bool:
        """Whether a block returns a tuple (TransformerLens-native, older HF) or a tensor."""
        seen: list[bool] = []
        block = self.model.blocks[0]
        handle = block.register_forward_hook(lambda m, a, out: seen.append(isinstance(out, tuple)))
        try:
            with torch.no_grad():
                self.model(torch.zeros((1, 1), dtype=torch.long, device=_device(self.model)))
        finally:
            handle.remove()
        return seen[0]


def _canonical(model: TransformerBridge, name: str) -> Any:
    return model.hook_dict.get(name)


def _device(model: TransformerBridge) -> torch.device:
    return next(model.parameters()).device
