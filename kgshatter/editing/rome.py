"""ROME: a rank-one update of one layer's MLP output matrix (Meng et al. 2022; r-ROME 2024).

Over the shared core: k* = the subject's key averaged over context prompts; u = C^-1 k*;
v* = h0 + delta from target optimisation at the layer's MLP output;
dW = u (v* - out(k)) / (u . k). r-ROME (Gupta et al., arXiv 2403.07175, default) uses the
template-averaged k* and its output in both places; the original uses the bare prompt's key and
output, the mismatch r-ROME showed to cause model-disabling edits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kgshatter.editing.covariance import CovarianceCache, SecondMoment, StatsKey, second_moment
from kgshatter.editing.edit import Edit, LayerDelta, model_identity
from kgshatter.editing.requests import EditRequest, request_prompts
from kgshatter.editing.targets import optimize_delta
from kgshatter.kg.walks import WalkSampler
from kgshatter.sites import Site
from kgshatter.validation import ConfigDict, check_choice, check_float, check_int

DENOMINATORS = ("rrome", "original")
POSITIONS = {"subject": -2, "relation": -1}


@dataclass(frozen=True, kw_only=True)
class ROMEConfig(ConfigDict):
    """ROME hyperparameters. Defaults: the synthetic model *(choice)*; see ``ROME_PRESETS``.

    ``position`` is where the key is read and the value written: ``"subject"`` (the entity token,
    the paper's and ROME's choice) or ``"relation"`` (the last token). Default ``"relation"``
    (*choice*, measured): in the grokked ``cpu`` model the answer is computed at the relation
    token, and no delta at the subject token moves it (NLL of the new target stayed at 9-17 with
    a delta 100x the residual norm), while at the relation token ROME reaches efficacy 1.0 at
    d = 1 and d = 4 on layers 0 and 1.
    """

    layer: int = 0
    n_prompts: int = 10
    steps: int = 40
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    mom2_adjustment: bool = True
    n_samples: int = 100_000
    denominator: str = "rrome"
    position: str = "relation"
    ridge: float = 1e-6
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("layer", self.layer, 0)
        check_int("n_prompts", self.n_prompts, 1)
        check_int("steps", self.steps, 1)
        check_float("lr", self.lr, 0.0, inclusive=False)
        check_float("kl_factor", self.kl_factor, 0.0)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_float("clamp_norm_factor", self.clamp_norm_factor, 0.0, inclusive=False)
        check_int("n_samples", self.n_samples, 1)
        check_choice("denominator", self.denominator, DENOMINATORS)
        check_choice("position", self.position, tuple(POSITIONS))
        check_float("ridge", self.ridge, 0.0)
        check_int("seed", self.seed, 0)


ROME_PRESETS = {
    # The synthetic study edits the first block's W_out (science.md section 5).
    "synthetic": ROMEConfig(),
    # kmeng01/rome hparams/ROME/gpt2-xl.json: layer 17, 20 steps, lr 0.5, wd 0.5, clamp 4,
    # KL 0.0625.
    "gpt2-xl": ROMEConfig(
        layer=17,
        n_prompts=21,
        steps=20,
        lr=0.5,
        weight_decay=0.5,
        clamp_norm_factor=4.0,
        kl_factor=0.0625,
    ),
}


def synthetic_stats(
    model: Any,
    sampler: WalkSampler,
    layer: int,
    n_samples: int,
    cache: CovarianceCache | None,
    seed: int = 0,
    batch_size: int = 1000,
    model_id: str | None = None,
) -> SecondMoment:
    """C at ``layer`` from ``n_samples`` validation walks (paper: 10^5), cached when possible."""
    key = StatsKey(
        model_id=model_id or model_identity(model),
        layer=layer,
        hook=Site(layer, "mlp_post").hook_name,
        corpus=f"walks:{sampler.graph.fingerprint}:n_ctx{sampler.config.n_ctx}:seed{seed}",
        n_samples=n_samples,
    )

    def compute() -> tuple[torch.Tensor, int]:
        # validation walks: a seed stream disjoint from training batches (which use (seed, step))
        batches = (
            sampler.batch_for_step(1 << 40 | i, min(batch_size, n_samples - i * batch_size), seed)[
                :, :-1
            ]
            for i in range((n_samples + batch_size - 1) // batch_size)
        )
        return second_moment(model, layer, batches)

    if cache is None:
        matrix, n = compute()
        return SecondMoment.from_matrix(key, matrix, n)
    return cache.get(key, compute)


def compute_rome(
    model: Any,
    sampler: WalkSampler,
    request: EditRequest,
    config: ROMEConfig = ROMEConfig(),
    cache: CovarianceCache | None = None,
    stats: SecondMoment | None = None,
) -> Edit:
    """A rank-one :class:`Edit` making ``model`` answer ``request.target`` (model unchanged)."""
    graph = sampler.graph
    request.validate(graph)
    Site(config.layer, "mlp_post").check(model.cfg.n_layers)
    key_hook = Site(config.layer, "mlp_post").hook_name
    out_hook = Site(config.layer, "mlp_out").hook_name
    n = graph.n_entities
    model_id = model_identity(model)
    prompts = request_prompts(
        sampler, request.subject, request.relation, config.n_prompts, config.seed
    )
    rel = graph.relations[request.relation]
    essence = None
    if graph.n_orders > 1:  # the subject's facts on another order should not move (choice)
        other = next(r for r in graph.relations if r.order == (rel.order + 1) % graph.n_orders)
        essence = request_prompts(
            sampler, request.subject, other.index, config.n_prompts, config.seed + 1
        )
    pos = POSITIONS[config.position]
    target = optimize_delta(
        model,
        out_hook,
        prompts,
        request.target,
        essence,
        steps=config.steps,
        lr=config.lr,
        kl_factor=config.kl_factor,
        weight_decay=config.weight_decay,
        clamp_norm_factor=config.clamp_norm_factor,
        subject_position=pos,
    )
    device = next(model.parameters()).device
    keys = _keys_at(model, key_hook, prompts.to(device), pos).double()  # [P, d_mlp]
    k_star = keys.mean(0)
    if config.mom2_adjustment:
        if stats is None:
            stats = synthetic_stats(
                model,
                sampler,
                config.layer,
                config.n_samples,
                cache,
                config.seed,
                model_id=model_id,
            )
        u = stats.solve(k_star.cpu(), config.ridge).to(device)
    else:
        u = k_star.clone()
    v_star = target.h0.double() + target.delta.double()
    if config.denominator == "rrome":
        k_den, out_k = k_star, target.h0.double()
    else:  # the bare prompt "x r" (original ROME's plain template)
        bare = torch.tensor([[request.subject, n + request.relation]], device=device)
        w = model.blocks[config.layer].mlp.W_out.detach().double()  # [d_mlp, d_model]
        k_den = _keys_at(model, key_hook, bare, pos).double()[0]
        out_k = k_den @ w + (v_star - target.delta.double() - k_star @ w)  # same bias term
    denom = float(u @ k_den)
    if abs(denom) < 1e-12:
        raise FloatingPointError("ROME denominator u . k is ~0; raise ridge or check the key")
    a = (u / denom)[:, None].float()  # [d_mlp, 1]
    b = (v_star - out_k)[:, None].float()  # [d_model, 1]
    return Edit(
        method="rome",
        deltas=[LayerDelta(config.layer, a.cpu(), b.cpu())],
        requests=[request.to_dict()],
        config=config.to_dict(),
        model_id=model_id,
        info={
            "losses": target.losses,
            "final_nll": target.nll,
            "delta_norm": float(target.delta.norm()),
            "h0_norm": float(target.h0.norm()),
            "k_star": k_star.float().cpu().tolist(),
            "v_star": v_star.float().cpu().tolist(),
        },
    )


def _keys_at(model: Any, hook: str, prompts: torch.Tensor, position: int):
    with torch.inference_mode():
        _, cache = model.run_with_cache(prompts, names_filter=lambda n: n == hook)
    return cache[hook][:, position].clone()
