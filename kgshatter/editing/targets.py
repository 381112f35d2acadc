"""Target optimisation shared by the editors: find delta so that h0 + delta makes the edit true.

editing-methods.md, "Target optimisation": a free vector added at the subject's last token of
every rewriting prompt; loss = NLL(target) + kl_factor * KL(current || initial) on "essence"
prompts + weight_decay * ||delta|| / ||h0||^2; Adam; early stop when NLL < 0.05; after each step
delta is projected to ||delta|| <= clamp_norm_factor * ||h0||. The model's weights are never
written and receive no gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int


@dataclass
class TargetResult:
    delta: Float[torch.Tensor, " d_model"]
    h0: Float[torch.Tensor, " d_model"]
    losses: list[float]
    nll: float


def optimize_delta(
    model: Any,
    hook_name: str,
    prompts: Int[torch.Tensor, "prompt seq"],
    target: int,
    essence: Int[torch.Tensor, "essence seq"] | None,
    *,
    steps: int,
    lr: float,
    kl_factor: float,
    weight_decay: float,
    clamp_norm_factor: float,
    subject_position: int = -2,  # -1 edits at the last (relation) token
) -> TargetResult:
    """Optimise a delta added at ``hook_name``, position ``subject_position`` of every prompt."""
    device = next(model.parameters()).device
    prompts = prompts.to(device)
    batch = prompts if essence is None else torch.cat([prompts, essence.to(device)])
    n_rewrite = prompts.shape[0]
    store: dict[str, torch.Tensor] = {}

    def read(activation: torch.Tensor, hook: Any) -> None:
        store["h"] = activation[:, subject_position].detach()

    with torch.no_grad():
        logits0 = model.run_with_hooks(batch, fwd_hooks=[(hook_name, read)])[:, -1]
    h0 = store["h"][:n_rewrite].mean(0)
    init_logp = torch.log_softmax(logits0[n_rewrite:].float(), -1)
    delta = torch.zeros_like(h0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    target_t = torch.full((n_rewrite,), target, device=device)

    def add(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        out = activation.clone()
        out[:, subject_position] = out[:, subject_position] + delta.to(activation.dtype)
        return out

    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    losses: list[float] = []
    nll_value = float("inf")
    try:
        for _ in range(steps):
            logits = model.run_with_hooks(batch, fwd_hooks=[(hook_name, add)])[:, -1].float()
            nll = F.cross_entropy(logits[:n_rewrite], target_t)
            loss = nll + weight_decay * delta.norm() / h0.norm() ** 2
            if essence is not None and kl_factor > 0:
                logp = torch.log_softmax(logits[n_rewrite:], -1)
                loss = loss + kl_factor * F.kl_div(
                    init_logp, logp, log_target=True, reduction="batchmean"
                )
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"target optimisation diverged (loss {loss.item()}); lower lr (now {lr})"
                )
            nll_value = nll.item()
            losses.append(loss.item())
            if nll_value < 0.05:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                limit = clamp_norm_factor * h0.norm()
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return TargetResult(delta.detach(), h0, losses, nll_value)
