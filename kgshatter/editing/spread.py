"""Multi-layer editors over the shared core: MEMIT, AlphaEdit and PMET.

All three optimise per-request targets at the last edited layer L, then walk the edited layers
in ascending order: keys K at layer l (averaged over each request's prompts), the residual
R = target - current value at L with the lower layers' updates already in place, spread over the
remaining layers, and a least-squares solve for the layer's update ``dW_l = A_l R_l`` (rank <=
number of requests). They differ only in where the target lives and in the solve
(docs/editing.md):

- MEMIT (Meng et al. 2023): target on ``hook_resid_post`` of L; spread R / (layers left);
  ``A = (lambda C + K K^T)^-1 K``.
- AlphaEdit (Fang et al. 2025): MEMIT's targets and spread; ``A = (P (Kp Kp^T + K K^T) +
  alpha I)^-1 P K`` with P the projector on C's null space, so keys the model already uses are
  left (nearly) alone. ``Kp Kp^T`` sums the keys of earlier edits: it lives in an explicit
  :class:`AlphaEditState`, never in a global.
- PMET (Li et al. 2024): targets for attention and MLP outputs of L optimised jointly, only the
  MLP target used; residual at L's MLP output; spread R / sqrt(layers left); MEMIT's solve.

Keys are the mean over the request's prompts. The references weight the bare prompt by 0.5 and
the context-prefixed ones by 0.5; every synthetic prompt carries a context, so ours are
uniform (*choice*). The multi-layer solve uses Woodbury on C's stored eigendecomposition:
``(lambda C + K K^T)^-1 K = (lambda C)^-1 K (I + K^T (lambda C)^-1 K)^-1``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kgshatter.editing.core import (
    AlreadyAnswered,
    EditTask,
    Prompts,
    Request,
    TargetConfig,
    as_requests,
    check_layers,
    mean_activations,
    mean_keys,
    reject_state,
)
from kgshatter.editing.covariance import SecondMoment
from kgshatter.editing.edit import Edit, LayerDelta, edit_fingerprint, model_identity
from kgshatter.editing.targets import TargetResult, optimize_many, prepare_problems
from kgshatter.hooks import edited
from kgshatter.sites import Site, edit_module, edit_sites
from kgshatter.validation import check_choice, check_float

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

THRESHOLD_KINDS = ("absolute", "relative")


@dataclass(frozen=True, kw_only=True)
class MEMITConfig(TargetConfig):
    """MEMIT hyperparameters; ``mom2_weight`` is the references' ``mom2_update_weight``."""

    layers: tuple[int, ...] = (0, 1)
    mom2_weight: float = 1.0
    clamp_norm_factor: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layers("layers", self.layers)
        check_float("mom2_weight", self.mom2_weight, 0.0, inclusive=False)

    @property
    def edit_layers(self) -> tuple[int, ...]:
        return self.layers


@dataclass(frozen=True, kw_only=True)
class AlphaEditConfig(MEMITConfig):
    """AlphaEdit: MEMIT's targets with a null-space-projected solve.

    The null space of C is spanned by eigenvectors with eigenvalue below ``null_threshold``:
    an absolute value (the reference's 2e-2) or, with ``threshold_kind="relative"``, a fraction
    of the largest eigenvalue. ``l2`` is the reference's ``L2`` (alpha; 10 there). Default 1.0
    (*choice*, measured): alpha must be small against ``|P k|^2``, and the synthetic model's keys
    are far smaller than GPT-2-XL's; with alpha 10 only 1 of 12 edits on the cpu model succeeded,
    with 1.0 (and down to 1e-3) all 12 did.
    """

    null_threshold: float = 2e-2
    threshold_kind: str = "absolute"
    l2: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("null_threshold", self.null_threshold, 0.0, inclusive=False)
        check_choice("threshold_kind", self.threshold_kind, THRESHOLD_KINDS)
        check_float("l2", self.l2, 0.0, inclusive=False)


@dataclass(frozen=True, kw_only=True)
class PMETConfig(MEMITConfig):
    """PMET: joint attention + MLP targets at the last layer, MLP-only update.

    ``reference=True`` follows xpq-tech/PMET step for step: MEMIT's reference layout (bare and
    prefixed prompts, keys 0.5 bare + 0.5 prefixed, the current value at the bare prompt),
    each delta's decay and clamp relative to its own hook's bare-prompt activation, and
    ``compute_zs``'s NLL schedule (:func:`~kgshatter.editing.targets.optimize_many`,
    ``nll_schedule="pmet"``).
    """

    def optimisation(self) -> dict[str, Any]:
        return {**super().optimisation(), "nll_schedule": "pmet" if self.reference else "constant"}


# kmeng01/memit hparams/MEMIT/gpt2-xl.json and Llama3-8B as the references give them;
# AlphaEdit: jianghoucheng/AlphaEdit hparams/AlphaEdit/{gpt2-xl,Llama3-8B}.json; PMET: no public
# GPT-2-XL config exists, derived from PMET's GPT-J one (hparams/PMET/EleutherAI_gpt-j-6B.json:
# lr 0.2, 30 steps, clamp 0.75, KL 1.0) with MEMIT's GPT-2-XL layers and lambda (our
# derivation), run with PMET's algorithm (reference mode). Synthetic presets: measured on the
# cpu model (README).
_GPT2_XL: dict[str, Any] = {"layers": (13, 14, 15, 16, 17), "n_prompts": 6, "steps": 20, "lr": 0.5,
            "weight_decay": 0.5, "clamp_norm_factor": 0.75, "kl_factor": 0.0625,
            "position": "subject", "mom2_weight": 20000.0, "micro_batch": 6,
            "reference": True}  # fmt: skip
_LLAMA3_8B: dict[str, Any] = {**_GPT2_XL, "layers": (4, 5, 6, 7, 8), "steps": 25, "lr": 0.1,
              "mom2_weight": 15000.0}  # fmt: skip
# SmolLM2-135M (30 layers): Llama 3 8B's settings on the layers around ROME's (layer 5), five as
# the references use; C from 32k self-sampled tokens (docs/pretrained.md, "SmolLM2"), weighted
# 1500 instead of 15000: measured on 6 month edits at d = 1 / d = 3 (docs/smollm2/README.md),
# 15000 lets 33% / 0% of MEMIT's edits take, and neither more steps (50), a larger step (0.5,
# 1.0) nor a looser clamp (4) brings that above 83%; 1500 alone takes 100% / 100%
_SMOLLM2: dict[str, Any] = {
    **_LLAMA3_8B,
    "layers": (3, 4, 5, 6, 7),
    "n_samples": 32768,
    "mom2_weight": 1500.0,
}
# subject-token editing (cpu-subject): only layer 0 is read at the subject token there, so the
# target sits on layer 0's output; steps and clamp as ROME's measured ones
_SUBJECT: dict[str, Any] = {
    "position": "subject",
    "steps": 100,
    "clamp_norm_factor": 0.5,
    "layers": (0,),
}
# the fidelity study's editors (docs/fidelity.md): the target optimisation in
# units of ||h0|| like ROME's synthetic-relative presets
_RELATIVE: dict[str, Any] = {"relative": True, "lr": 0.05, "steps": 200}
# the tiny random checkpoints of kgshatter.pretrained.loading.tiny_checkpoint (tests, tutorials):
# measured, the relation (last) position edits them; at the subject token the random
# attention carries too little to the last token for any delta to move the answer
_TINY: dict[str, Any] = {
    "layers": (1, 2),
    "position": "relation",
    "n_prompts": 5,
    "steps": 30,
    "n_samples": 4096,
}
MEMIT_PRESETS = {
    "synthetic": MEMITConfig(),
    "tiny-pretrained": MEMITConfig(**_TINY),
    "synthetic-subject": MEMITConfig(**_SUBJECT),
    "synthetic-relative": MEMITConfig(**_RELATIVE),
    "synthetic-subject-relative": MEMITConfig(**{**_SUBJECT, **_RELATIVE}),
    "gpt2-xl": MEMITConfig(**_GPT2_XL),
    "llama3-8b": MEMITConfig(**_LLAMA3_8B),
    "smollm2-135m": MEMITConfig(**_SMOLLM2),
}
ALPHAEDIT_PRESETS = {
    "synthetic": AlphaEditConfig(),
    "synthetic-subject": AlphaEditConfig(**_SUBJECT),
    "synthetic-relative": AlphaEditConfig(**_RELATIVE),
    "synthetic-subject-relative": AlphaEditConfig(**{**_SUBJECT, **_RELATIVE}),
    "tiny-pretrained": AlphaEditConfig(**_TINY, threshold_kind="relative"),
    "gpt2-xl": AlphaEditConfig(**_GPT2_XL, l2=10.0),
    "llama3-8b": AlphaEditConfig(**_LLAMA3_8B, l2=10.0),
    "smollm2-135m": AlphaEditConfig(**_SMOLLM2, l2=10.0),
}
PMET_PRESETS = {
    "synthetic": PMETConfig(),
    "synthetic-subject": PMETConfig(**_SUBJECT),
    "synthetic-relative": PMETConfig(**_RELATIVE),
    "synthetic-subject-relative": PMETConfig(**{**_SUBJECT, **_RELATIVE}),
    "tiny-pretrained": PMETConfig(**_TINY),
    # derived hyperparameters (above), the reference's algorithm
    "gpt2-xl": PMETConfig(**{**_GPT2_XL, "kl_factor": 1.0, "lr": 0.2, "steps": 30}),
}


@dataclass
class AlphaEditState:
    """What sequential AlphaEdit remembers: per layer, the sum of earlier edits' ``K K^T``.

    Pass the same state to every call of a sequence; each call adds its own keys, recomputed on
    the model with the new edit applied (the reference's ``cache_c``). One state belongs to one
    model and one config; reusing it elsewhere raises.
    """

    model_id: str | None = None
    layers: tuple[int, ...] = ()
    kkt: dict[int, torch.Tensor] = field(default_factory=dict)
    n_requests: int = 0

    def bind(self, model_id: str, layers: tuple[int, ...]) -> None:
        if self.model_id is None:
            self.model_id, self.layers = model_id, layers
        elif (self.model_id, self.layers) != (model_id, layers):
            raise ValueError(
                f"this AlphaEditState belongs to model {self.model_id} layers {self.layers}, "
                f"not model {model_id} layers {layers}; start a new state"
            )

    def previous(self, layer: int, d: int) -> torch.Tensor:
        return self.kkt.get(layer, torch.zeros(d, d, dtype=torch.float64))


def null_space_projector(stats: SecondMoment, threshold: float, kind: str) -> torch.Tensor:
    """``P = U0 U0^T`` over C's eigenvectors with eigenvalue below the threshold."""
    w, v = stats.eigenvalues, stats.eigenvectors
    limit = threshold if kind == "absolute" else threshold * float(w.max())
    u0 = v[:, w < limit]
    if u0.shape[1] == 0:
        raise ValueError(
            f"C at layer {stats.key.layer} has no eigenvalue below {limit:.3g} (smallest "
            f"{float(w.min()):.3g}): the null space is empty, AlphaEdit cannot edit; raise "
            f"null_threshold or use threshold_kind='relative'"
        )
    return u0 @ u0.T


def _memit_solver(
    model: TransformerBridge, task: EditTask, config: MEMITConfig, model_id: str
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """MEMIT's (and PMET's) per-layer solve ``(lambda C + K^T K)^-1 K^T`` (keys as rows),
    via Woodbury on the layer's stored eigendecomposition of C."""

    def solve(layer: int, keys: torch.Tensor) -> torch.Tensor:
        stats = task.stats(model, layer, config.n_samples, config.seed, model_id)
        kc = keys.T.cpu()  # [d_mlp, n]
        cinv_k = stats.solve(kc, config.ridge) / config.mom2_weight  # (lambda C)^-1 K
        inner = torch.eye(kc.shape[1], dtype=torch.float64) + kc.T @ cinv_k
        return cinv_k @ torch.linalg.inv(inner)  # [d_mlp, n]

    return solve


def _spread_targets(
    model: TransformerBridge,
    task: Any,
    requests: Sequence[Any],
    config: MEMITConfig,
    target_hooks: list[str],
    skip_answered: bool = False,
) -> list[Any]:
    """Each request's prompts and optimised targets, optimised together (each independently,
    :func:`optimize_many`). A request the model already answers raises
    :class:`AlreadyAnswered`, or with ``skip_answered`` takes its place in the list."""
    out, problems, slots = prepare_problems(model, task, requests, config, skip_answered)
    if problems:
        results = optimize_many(model, target_hooks, problems, **config.optimisation())
        for slot, result in zip(slots, results, strict=True):
            out[slot] = (out[slot], result)
    return out


def _spread_many(compute: Callable[..., Edit], hooks: Callable[[Any, Any], list[str]]):
    """``compute_many`` of a spread method: independent single-request edits whose target
    optimisations share forward passes."""

    def many(
        model: TransformerBridge,
        task: Any,
        requests: Sequence[Any],
        config: Any,
        *,
        model_id: str | None = None,
    ) -> list[Edit | AlreadyAnswered]:
        model_id = model_id or model_identity(model)
        prepared = _spread_targets(
            model, task, requests, config, hooks(model, config), skip_answered=True
        )
        return [
            p if isinstance(p, AlreadyAnswered)
            else compute(model, task, [r], config, model_id=model_id, targets=[p])
            for r, p in zip(requests, prepared, strict=True)
        ]  # fmt: skip

    return many


def _spread_edit(
    method: str,
    model: TransformerBridge,
    task: EditTask,
    requests: Sequence[Request] | Request,
    config: MEMITConfig,
    *,
    target_hooks: list[str],
    residual_hook: str,
    spread: Callable[[int], float],
    solve: Callable[[int, torch.Tensor], torch.Tensor],
    model_id: str,
    targets: Sequence[tuple[Prompts, TargetResult]] | None = None,
) -> Edit:
    """Targets at the last layer, then one solve per layer in ascending order (module doc).

    ``targets``: the requests' target optimisations, already done (:func:`_spread_targets`).
    """
    requests = as_requests(requests, method)
    n_layers = model.cfg.n_layers
    module = edit_module(model)
    for layer in config.layers:
        edit_sites(module, layer)[1].check(n_layers)
    facts = [task.fact(r) for r in requests]
    if len(set(facts)) != len(facts):
        raise ValueError(f"{method}: a batch may not edit the same fact twice, got {facts}")
    last = config.layers[-1]
    pos = config.position
    if targets is None:
        targets = _spread_targets(model, task, requests, config, target_hooks)
    prompt_sets = [p for p, _ in targets]
    losses = [t.nll for _, t in targets]
    z = torch.stack([t.h0s[-1].double() + t.deltas[-1].double() for _, t in targets]).cpu()
    # z: [n, d_model] at residual_hook
    deltas: list[LayerDelta] = []
    bare = [p.rows(0, 1) for p in prompt_sets]
    prefixed = [p.rows(1) for p in prompt_sets]
    for i, layer in enumerate(config.layers):
        so_far = Edit(method, list(deltas), [], {}, model_id, module=module)
        if config.reference and all(len(p) for p in prefixed):
            # kmeng01/memit compute_ks: the mean over each context type (bare; prefixed), then
            # the mean of the two; the current value at the bare prompt (compute_z's target)
            keys = (
                0.5
                * (
                    mean_keys(model, layer, bare, pos, so_far.hooks())
                    + mean_keys(model, layer, prefixed, pos, so_far.hooks())
                ).cpu()
            )
            sets = bare
        else:
            keys = mean_keys(model, layer, prompt_sets, pos, so_far.hooks()).cpu()  # [n, d_mlp]
            sets = bare if config.reference else prompt_sets
        current = mean_activations(
            model, residual_hook, sets, pos, so_far.hooks(), stop_at_layer=last + 1
        ).cpu()
        residual = (z - current) / spread(len(config.layers) - i)  # [n, d_model]
        a = solve(layer, keys)  # [d_mlp, n]
        deltas.append(LayerDelta(layer, a.float(), residual.T.float().contiguous()))
    return Edit(
        method=method,
        deltas=deltas,
        requests=[r.to_dict() for r in requests],
        config=config.to_dict(),
        model_id=model_id,
        module=module,
        fingerprint=edit_fingerprint(model, config.layers, module),
        info={"final_nll": losses, "target_hook": residual_hook},
    )


def compute_memit(
    model: TransformerBridge,
    task: EditTask,
    requests: Sequence[Request] | Request,
    config: MEMITConfig = MEMITConfig(),
    *,
    model_id: str | None = None,
    state: Any = None,
    targets: Sequence[tuple[Prompts, TargetResult]] | None = None,
) -> Edit:
    """MEMIT: one :class:`Edit` for a batch of requests, spread over ``config.layers``.

    ``targets``: the requests' target optimisations when already done (``compute_many``)."""
    reject_state("memit", state)
    model_id = model_id or model_identity(model)
    (resid,) = _memit_hooks(model, config)
    return _spread_edit(
        "memit",
        model,
        task,
        requests,
        config,
        target_hooks=[resid],
        residual_hook=resid,
        spread=float,
        solve=_memit_solver(model, task, config, model_id),
        model_id=model_id,
        targets=targets,
    )


def _memit_hooks(model: TransformerBridge, config: MEMITConfig) -> list[str]:
    """Where MEMIT's and AlphaEdit's targets live: the residual stream after the last layer."""
    return [Site(config.layers[-1], "resid_post").check(model.cfg.n_layers).hook_name]


def _pmet_hooks(model: TransformerBridge, config: MEMITConfig) -> list[str]:
    """PMET's joint targets at the last layer: attention output, then the MLP output."""
    if edit_module(model) != "mlp":
        raise ValueError("PMET needs attention and MLP blocks; this model has neither (Mamba)")
    last = config.layers[-1]
    return [
        Site(last, "attn_out").check(model.cfg.n_layers).hook_name,
        Site(last, "mlp_out").hook_name,
    ]


def compute_pmet(
    model: TransformerBridge,
    task: EditTask,
    requests: Sequence[Request] | Request,
    config: PMETConfig = PMETConfig(),
    *,
    model_id: str | None = None,
    state: Any = None,
    targets: Sequence[tuple[Prompts, TargetResult]] | None = None,
) -> Edit:
    """PMET: joint attention + MLP targets at the last layer; MLP updates spread by sqrt."""
    reject_state("pmet", state)
    model_id = model_id or model_identity(model)
    attn, mlp = _pmet_hooks(model, config)
    return _spread_edit(
        "pmet",
        model,
        task,
        requests,
        config,
        target_hooks=[attn, mlp],  # the MLP target (last) drives the update
        residual_hook=mlp,
        spread=math.sqrt,
        solve=_memit_solver(model, task, config, model_id),
        model_id=model_id,
        targets=targets,
    )


def compute_alphaedit(
    model: TransformerBridge,
    task: EditTask,
    requests: Sequence[Request] | Request,
    config: AlphaEditConfig = AlphaEditConfig(),
    *,
    model_id: str | None = None,
    state: AlphaEditState | None = None,
    targets: Sequence[tuple[Prompts, TargetResult]] | None = None,
) -> Edit:
    """AlphaEdit: MEMIT with the update projected onto C's null space.

    With ``state`` (sequential editing) earlier edits' keys are preserved too, and this edit's
    keys are added to ``state`` once it is computed.
    """
    model_id = model_id or model_identity(model)
    if state is not None:
        state.bind(model_id, config.layers)
    (resid,) = _memit_hooks(model, config)
    projectors: dict[int, torch.Tensor] = {}

    def solve(layer: int, keys: torch.Tensor) -> torch.Tensor:
        stats = task.stats(model, layer, config.n_samples, config.seed, model_id)
        p = null_space_projector(stats, config.null_threshold, config.threshold_kind)
        projectors[layer] = p
        d = p.shape[0]
        kp = state.previous(layer, d) if state is not None else torch.zeros(d, d).double()
        lhs = p @ (kp + keys.T @ keys) + config.l2 * torch.eye(d, dtype=torch.float64)
        return torch.linalg.solve(lhs, p @ keys.T)  # [d_mlp, n]

    edit = _spread_edit(
        "alphaedit",
        model,
        task,
        requests,
        config,
        target_hooks=[resid],
        residual_hook=resid,
        spread=float,
        solve=solve,
        model_id=model_id,
        targets=targets,
    )
    dims = {str(layer): int(round(float(torch.trace(p)))) for layer, p in projectors.items()}
    edit = dataclasses.replace(edit, info={**edit.info, "null_space_dims": dims})
    if state is not None:
        prompt_sets = [
            task.prompts(task.request_from_dict(r), config.n_prompts, config.seed)[0]
            for r in edit.requests
        ]
        pos = config.position
        with edited(model, edit):
            for layer in config.layers:
                k = mean_keys(model, layer, prompt_sets, pos).cpu()
                state.kkt[layer] = state.previous(layer, k.shape[1]) + k.T @ k
        state.n_requests += len(edit.requests)
    return edit


compute_memit_many = _spread_many(compute_memit, _memit_hooks)
compute_alphaedit_many = _spread_many(compute_alphaedit, _memit_hooks)
compute_pmet_many = _spread_many(compute_pmet, _pmet_hooks)
