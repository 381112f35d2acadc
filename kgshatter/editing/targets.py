"""Target optimisation shared by the editors: find deltas so that h0 + delta makes the edit true.

The target optimisation of ROME and MEMIT: free vectors (one per hook: ROME's MLP output,
MEMIT's residual stream, PMET's attention and MLP outputs jointly) are added at one position of
every rewriting prompt; loss = NLL(target) + kl_factor * KL(current || initial) on "essence"
prompts + weight_decay * sum ||delta|| / ||h0||^2; Adam; early stop when NLL < 0.05 (in
``reference`` mode: the total loss, as the references do); after each
step every delta is projected to ||delta|| <= clamp_norm_factor * ||h0|| of its own hook. The
model's weights are never written and receive no gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float

from kgshatter.editing.core import Prompts, frozen_weights


@dataclass
class TargetResult:
    """Per hook: the optimised ``delta`` and the prompt-averaged initial activation ``h0``."""

    deltas: list[Float[torch.Tensor, " d_model"]]
    h0s: list[Float[torch.Tensor, " d_model"]]
    losses: list[float]
    nll: float

    @property
    def delta(self) -> torch.Tensor:
        return self.deltas[0]

    @property
    def h0(self) -> torch.Tensor:
        return self.h0s[0]


def optimize_targets(
    model: Any,
    hooks: Sequence[str],
    prompts: Prompts,
    target: int,
    essence: Prompts | None,
    *,
    steps: int,
    lr: float,
    kl_factor: float,
    weight_decay: float,
    clamp_norm_factor: float,
    position: str = "relation",
    fwd_hooks: Sequence[tuple[str, Any]] = (),
    micro_batch: int | None = None,
    relative: bool = False,
    reference: bool = False,
) -> TargetResult:
    """Optimise one delta per hook in ``hooks``, added at ``position`` of every prompt.

    ``position`` is ``"subject"`` (each row's subject token) or ``"relation"`` (its last token);
    the loss reads each row's next-token logits at its last token.

    ``fwd_hooks`` are extra hooks active throughout (e.g. earlier edits in a sequence).
    ``micro_batch`` bounds how many prompts run forward/backward at once (memory; the
    gradients are the same up to rounding); ``None`` runs them all together.
    ``relative=True``: ``lr`` and the decay are in units of ``||h0||`` (see ``TargetConfig``).

    ``reference=True`` follows kmeng01/rome's ``compute_v`` (and MEMIT's ``compute_z``) step for
    step: ``h0`` is the activation of the first prompt (the bare one, which the caller puts
    first) instead of the prompt average, so the decay and the clamp are relative to it; the KL
    is read at each essence row's delta position (the subject token of ``"{} is a"``) instead of
    its last token; the optimisation stops when the *total* loss (NLL + KL + decay) falls below
    0.05, and the last of ``steps`` iterations only evaluates (``steps - 1`` Adam updates).
    """
    if not hooks:
        raise ValueError("optimize_targets needs at least one hook name")
    missing = [h for h in hooks if h not in model.hook_dict]
    if missing:
        raise ValueError(f"the model has no hook points {missing}")
    device = next(model.parameters()).device
    batch = prompts if essence is None else Prompts.cat([prompts, essence])
    tokens = batch.tokens.to(device)
    at = batch.index(position).to(device)  # where deltas are added, per row
    last = batch.last.to(device)  # where the answer is read, per row
    n_rewrite = len(prompts)
    store: dict[str, torch.Tensor] = {}
    rows_now: dict[str, slice] = {"rows": slice(0, len(batch))}

    def reader(name: str):
        def read(activation: torch.Tensor, hook: Any) -> None:
            store[name] = activation[torch.arange(len(at), device=device), at].detach()

        return read

    # where each row's next-token distribution is read: its last token, except the essence
    # rows in reference mode, which are read where the delta goes in
    read = last.clone()
    if reference:
        read[n_rewrite:] = at[n_rewrite:]
    with torch.no_grad():
        logits0 = model.run_with_hooks(
            tokens, fwd_hooks=[*fwd_hooks, *[(h, reader(h)) for h in hooks]]
        )[torch.arange(len(read), device=device), read]
    h0s = [
        store[h][0].float() if reference else store[h][:n_rewrite].float().mean(0) for h in hooks
    ]
    init_logp = torch.log_softmax(logits0[n_rewrite:].float(), -1)
    deltas = [torch.zeros_like(h0, requires_grad=True) for h0 in h0s]
    # Adam's steps have the size of lr whatever the gradient's scale: relative mode scales
    # them, and the decay, by each hook's ||h0||
    scales = [float(h0.norm().clamp(min=1e-12)) if relative else 1.0 for h0 in h0s]
    opt = torch.optim.Adam(
        [{"params": [d], "lr": lr * s} for d, s in zip(deltas, scales, strict=True)]
    )
    target_t = torch.full((n_rewrite,), target, device=device)

    def adder(delta: torch.Tensor):
        def add(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            out = activation.clone()
            idx = at[rows_now["rows"]]
            rows = torch.arange(len(idx), device=device)
            out[rows, idx] = out[rows, idx] + delta.to(activation.dtype)
            return out

        return add

    editing_hooks = [*fwd_hooks, *[(h, adder(d)) for h, d in zip(hooks, deltas, strict=True)]]
    n_total = len(batch)
    n_essence = n_total - n_rewrite
    step = micro_batch or n_total
    losses: list[float] = []
    nll_value = float("inf")
    with frozen_weights(model):
        for _ in range(steps):
            opt.zero_grad()
            # the loss is a sum over prompts, so micro-batches accumulate exact gradients while
            # holding the activations of one micro-batch at a time
            decay = weight_decay * sum(
                d.norm() / (h0.norm().clamp(min=1e-12) ** (1 if relative else 2))
                for d, h0 in zip(deltas, h0s, strict=True)
            )
            _check_finite(decay, lr)
            decay.backward()
            nll_sum, kl_sum = 0.0, 0.0
            for start in range(0, n_total, step):
                rows = slice(start, min(start + step, n_total))
                rows_now["rows"] = rows
                logits = model.run_with_hooks(tokens[rows], fwd_hooks=editing_hooks)
                ends = read[rows]
                logits = logits[torch.arange(len(ends), device=device), ends].float()
                n_rw = max(0, min(rows.stop, n_rewrite) - start)
                chunk = torch.zeros((), device=device)
                if n_rw:
                    nll = F.cross_entropy(logits[:n_rw], target_t[:n_rw], reduction="sum")
                    chunk = chunk + nll / n_rewrite
                    nll_sum += nll.item()
                if n_essence and kl_factor > 0 and n_rw < logits.shape[0]:
                    logp = torch.log_softmax(logits[n_rw:], -1)
                    ess = slice(max(start, n_rewrite) - n_rewrite, rows.stop - n_rewrite)
                    kl = F.kl_div(init_logp[ess], logp, log_target=True, reduction="sum")
                    chunk = chunk + kl_factor * kl / n_essence
                    kl_sum += kl.item()
                _check_finite(chunk, lr)
                chunk.backward()
            nll_value = nll_sum / n_rewrite
            loss = nll_value + decay.item() + (kl_factor * kl_sum / n_essence if n_essence else 0.0)
            losses.append(loss)
            if (loss if reference else nll_value) < 0.05:
                break
            if reference and len(losses) == steps:  # the reference's last pass only evaluates
                break
            opt.step()
            with torch.no_grad():
                for d, h0 in zip(deltas, h0s, strict=True):
                    limit = clamp_norm_factor * h0.norm()
                    if d.norm() > limit:
                        d.mul_(limit / d.norm())
    return TargetResult([d.detach() for d in deltas], h0s, losses, nll_value)


def _check_finite(loss: torch.Tensor, lr: float) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"target optimisation diverged (loss {loss.item()}); lower lr (now {lr})"
        )
