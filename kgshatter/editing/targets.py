"""Target optimisation shared by the editors: find deltas so that h0 + delta makes the edit true.

The target optimisation of ROME and MEMIT: free vectors (one per hook: ROME's MLP output,
MEMIT's residual stream, PMET's attention and MLP outputs jointly) are added at one position of
every rewriting prompt; loss = NLL(target) + kl_factor * KL(current || initial) on "essence"
prompts + weight_decay * sum ||delta|| / ||h0||^2; Adam. A target of several tokens is
teacher-forced as the references do: each rewriting prompt is continued by all but the target's
last token, and its NLL is the mean over the target's tokens; early stop when NLL < 0.05 (in
``reference`` mode: the total loss, as the references do); after each
step every delta is projected to ||delta|| <= clamp_norm_factor * ||h0|| of its own hook. The
model's weights are never written and receive no gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from jaxtyping import Float

from kgshatter.editing.core import Prompts, frozen_weights
from kgshatter.editing.prefix import NativePrefix, PrefixCache
from kgshatter.editing.skip import BlockSkip

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


NLL_SCHEDULES = ("constant", "pmet")


@dataclass
class TargetResult:
    """Per hook: the optimised ``delta``, the initial activation ``h0`` the optimisation is
    relative to (the prompt average, or in reference mode the bare prompt's) and the
    prompt-averaged initial activation ``means`` (equal to ``h0s`` outside reference mode)."""

    deltas: list[Float[torch.Tensor, " d_model"]]
    h0s: list[Float[torch.Tensor, " d_model"]]
    losses: list[float]
    nll: float
    means: list[Float[torch.Tensor, " d_model"]]

    @property
    def delta(self) -> torch.Tensor:
        return self.deltas[0]

    @property
    def h0(self) -> torch.Tensor:
        return self.h0s[0]


@dataclass(frozen=True)
class TargetProblem:
    """One request's target optimisation: its rewriting prompts, target (one token id, or
    the tokens of a multi-token answer) and essence prompts."""

    prompts: Prompts
    target: int | tuple[int, ...]
    essence: Prompts | None = None

    def __post_init__(self) -> None:
        target = (self.target,) if isinstance(self.target, int) else tuple(self.target)
        if not target or not all(isinstance(t, int) and t >= 0 for t in target):
            raise ValueError(f"a target is one or more token ids >= 0, got {self.target!r}")
        object.__setattr__(self, "target", target)

    @property
    def tokens(self) -> tuple[int, ...]:
        return cast(tuple[int, ...], self.target)


def prepare_problems(
    model: TransformerBridge,
    task: Any,
    requests: Sequence[Any],
    config: Any,
    skip_answered: bool = False,
) -> tuple[list[Any], list[TargetProblem], list[int]]:
    """Each request's prompts (``config.prompts_for``) checked to change the model's answer.

    Returns ``(slots, problems, positions)``: per request its prompts, or with
    ``skip_answered`` the :class:`~kgshatter.editing.core.AlreadyAnswered` it raised (else it
    propagates); the optimisation problems of the others, and their positions in ``slots``.
    """
    from kgshatter.editing.core import AlreadyAnswered, check_changes_answer

    slots: list[Any] = []
    problems: list[TargetProblem] = []
    positions: list[int] = []
    for r in requests:
        prompts, essence = config.prompts_for(task, r)
        try:
            check_changes_answer(model, task, r, prompts)
        except AlreadyAnswered as e:
            if not skip_answered:
                raise
            slots.append(e)
            continue
        positions.append(len(slots))
        slots.append(prompts)
        problems.append(TargetProblem(prompts, task.target_tokens(r), essence))
    return slots, problems, positions


def optimize_targets(
    model: TransformerBridge,
    hooks: Sequence[str],
    prompts: Prompts,
    target: int | Sequence[int],
    essence: Prompts | None,
    **options: Any,
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

    The keyword options are :func:`optimize_many`'s.
    """
    problem = TargetProblem(prompts, target if isinstance(target, int) else tuple(target), essence)
    return optimize_many(model, hooks, [problem], **options)[0]


def optimize_many(
    model: TransformerBridge,
    hooks: Sequence[str],
    problems: Sequence[TargetProblem],
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
    nll_schedule: str = "constant",
    skip_frozen: bool = True,
) -> list[TargetResult]:
    """:func:`optimize_targets` for several independent requests at once, one result each.

    Every request keeps its own deltas, Adam state, loss, early stop and clamp (Adam is
    elementwise and the loss a sum of per-request terms, so each result is what optimising its
    request alone gives, up to float rounding); their prompts share each forward pass, which on
    a small model costs little more than one request's. A request that has stopped keeps its
    deltas, and its prompts leave the forward passes, while the others go on.

    ``nll_schedule="pmet"`` adds PMET's rule (xpq-tech/PMET ``compute_zs``; its reference mode):
    once the target is the argmax at every target position of every rewriting prompt, the
    NLL's weight drops to 0.1 for the next pass (back to 1 when it no longer is), and the
    optimisation stops there if the KL term is at most 0.01.

    Three shortcuts leave the result unchanged up to float rounding (``tests/test_skip.py``,
    ``tests/test_pretrained.py``): the unembedding runs only where a loss term reads the
    logits; with ``skip_frozen`` (the default) the optimisation steps start at the lowest
    edited block, on the residual the first pass cached there
    (:class:`~kgshatter.editing.skip.BlockSkip`; the blocks below are frozen and see no
    delta), and each row at its delta position, on the keys and values the first pass cached
    for the columns before it (:mod:`kgshatter.editing.prefix`: the Hugging Face key/value
    cache on GPT-2 and Llama, recorded keys and values on TransformerLens-native bridges; rows
    with different delta positions share a pass, their cached columns left-padded and masked;
    ``micro_batch`` then bounds the tokens a pass holds, ``micro_batch`` full rows' worth). A
    long optimisation that does not converge can amplify the rounding into a different end
    point, as reordering its micro-batches also does (README, "Speed: training at the paper's
    shape"). ``skip_frozen=False`` runs every block and position at every step;
    :func:`kgshatter.editing.prefix.disabled` only the positions.
    """
    if nll_schedule not in NLL_SCHEDULES:
        raise ValueError(f"nll_schedule must be one of {NLL_SCHEDULES}, got {nll_schedule!r}")
    if not hooks:
        raise ValueError("optimize_targets needs at least one hook name")
    if not problems:
        raise ValueError("optimize_many needs at least one problem")
    missing = [h for h in hooks if h not in model.hook_dict]
    if missing:
        raise ValueError(f"the model has no hook points {missing}")
    device = next(model.parameters()).device
    rows = _Rows.build(problems, position, reference, device)
    native, skip = _shortcuts(model, hooks, fwd_hooks, skip_frozen)
    logits0, first, prefix = _first_pass(model, rows, hooks, fwd_hooks, native, skip, skip_frozen)
    run = _Optimisation(
        model, rows, hooks, first, logits0, fwd_hooks, skip, prefix, steps=steps, lr=lr,
        kl_factor=kl_factor, weight_decay=weight_decay, clamp_norm_factor=clamp_norm_factor,
        micro_batch=micro_batch, relative=relative, reference=reference,
        nll_schedule=nll_schedule,
    )  # fmt: skip
    with (
        frozen_weights(model),
        skip.running() if skip is not None else nullcontext(),
        prefix.running() if prefix is not None else nullcontext(),
    ):
        for _ in range(steps):
            if not run.step():
                break
    return run.results()


@dataclass
class _Rows:
    """Every problem's prompts as the rows of one batch: each problem's rewriting prompts
    (continued by all but the target's last token), then each problem's essence prompts."""

    tokens: torch.Tensor  # [rows, seq]
    at: torch.Tensor  # where the deltas are added, per row
    group: torch.Tensor  # the problem each row belongs to
    rewrite: torch.Tensor  # whether a row is a rewriting row
    first_row: torch.Tensor  # each problem's first rewriting row
    read: torch.Tensor  # where each row's next-token distribution is read
    answer_at: torch.Tensor  # [rows, width]: where each answer token is predicted
    targets: torch.Tensor  # [rows, width]: the answer tokens (-100: none)
    n_answer: torch.Tensor  # answer tokens per row (at least 1)
    n_rw: list[int]  # rewriting rows per problem
    n_es: list[int]  # essence rows per problem
    width: int  # the longest target

    @classmethod
    def build(
        cls, problems: Sequence[TargetProblem], position: str, reference: bool, device: Any
    ) -> _Rows:
        parts = [p.prompts.followed_by(p.tokens[:-1]) for p in problems]
        parts += [p.essence for p in problems if p.essence is not None]
        batch = Prompts.cat(parts)
        at = batch.index(position).to(device)
        n_rw = [len(p.prompts) for p in problems]
        n_es = [len(p.essence) if p.essence is not None else 0 for p in problems]
        group = torch.cat(
            [torch.full((n,), g) for g, n in enumerate(n_rw)]
            + [torch.full((n,), g) for g, n in enumerate(n_es)]
        ).to(device)
        rewrite = torch.zeros(len(batch), dtype=torch.bool, device=device)
        rewrite[: sum(n_rw)] = True
        first_row = torch.tensor([sum(n_rw[:g]) for g in range(len(problems))], device=device)
        # each row's last token, except the essence rows in reference mode, which are read
        # where the delta goes in
        read = batch.last.to(device).clone()
        if reference:
            read[~rewrite] = at[~rewrite]
        # an essence row reads one distribution, at column 0
        width = max(len(p.tokens) for p in problems)
        answer_at = (read[:, None] + torch.arange(width, device=device)).clamp(
            max=batch.tokens.shape[1] - 1
        )
        targets = torch.full((len(batch), width), -100, dtype=torch.long)
        for g, p in enumerate(problems):
            start = sum(n_rw[:g])
            targets[start : start + n_rw[g], : len(p.tokens)] = torch.tensor(p.tokens)
        targets = targets.to(device)
        return cls(
            batch.tokens.to(device), at, group, rewrite, first_row, read, answer_at, targets,
            (targets != -100).sum(1).clamp(min=1).float(), n_rw, n_es, width,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.tokens)


def _shortcuts(
    model: TransformerBridge,
    hooks: Sequence[str],
    fwd_hooks: Sequence[tuple[str, Any]],
    skip_frozen: bool,
) -> tuple[NativePrefix | None, BlockSkip | None]:
    """The native prefix pass and the block skip, where they apply (``skip_frozen``)."""
    if not skip_frozen:
        return None, None
    kept = [name for name, _ in fwd_hooks]
    native = NativePrefix.plan(model, kept)
    skip = BlockSkip.plan(model, hooks, kept, from_zero=native is not None)
    # a native prefix pass needs the cached residual at its columns
    return (native if skip is not None else None), skip


def _first_pass(
    model: TransformerBridge,
    rows: _Rows,
    hooks: Sequence[str],
    fwd_hooks: Sequence[tuple[str, Any]],
    native: NativePrefix | None,
    skip: BlockSkip | None,
    skip_frozen: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
    """Each row's first answer logits, the hooks' activations at the delta positions, and the
    prefix cache the optimisation steps run on (``None`` without ``skip_frozen``)."""
    store: dict[str, torch.Tensor] = {}
    at = rows.at

    def reader(name: str) -> Any:
        def read_at(activation: torch.Tensor, hook: Any) -> None:
            store[name] = activation[torch.arange(len(at), device=at.device), at].detach()

        return read_at

    first_pass = [*fwd_hooks, *[(h, reader(h)) for h in hooks]]
    if skip is not None:
        first_pass.append(skip.recorder())
    # each row's first answer token, and the model's keys and values
    with torch.no_grad(), native.recording() if native is not None else nullcontext():
        extra = PrefixCache.FIRST_PASS if skip_frozen else {}
        logits0, cache = _logits_at(model, rows.tokens, rows.read[:, None], first_pass, **extra)
        logits0 = logits0[:, 0]
    prefix = native or (PrefixCache.from_first_pass(cache) if skip_frozen else None)
    return logits0, store, prefix


class _Optimisation:
    """The deltas of every problem, their Adam state and losses, one step at a time."""

    def __init__(
        self,
        model: TransformerBridge,
        rows: _Rows,
        hooks: Sequence[str],
        first: dict[str, torch.Tensor],
        logits0: torch.Tensor,
        fwd_hooks: Sequence[tuple[str, Any]],
        skip: BlockSkip | None,
        prefix: Any,
        *,
        steps: int,
        lr: float,
        kl_factor: float,
        weight_decay: float,
        clamp_norm_factor: float,
        micro_batch: int | None,
        relative: bool,
        reference: bool,
        nll_schedule: str,
    ) -> None:
        self.model, self.rows, self.prefix = model, rows, prefix
        self.steps, self.lr, self.kl_factor = steps, lr, kl_factor
        self.weight_decay, self.clamp_norm_factor = weight_decay, clamp_norm_factor
        self.micro_batch, self.reference, self.nll_schedule = micro_batch, reference, nll_schedule
        self.power = 1 if relative else 2
        device = rows.tokens.device
        n_groups = self.n_groups = len(rows.n_rw)
        self.rw_count = torch.tensor(rows.n_rw, dtype=torch.float32, device=device)
        self.es_count = torch.tensor(rows.n_es, dtype=torch.float32, device=device).clamp(min=1)
        # h0 per problem and hook: the mean over its rewriting rows, or its first (bare) row
        self.h0s: list[torch.Tensor] = []
        self.means: list[torch.Tensor] = []
        for h in hooks:
            acts = first[h].float()
            summed = torch.zeros(n_groups, acts.shape[1], device=device)
            summed.index_add_(0, rows.group[rows.rewrite], acts[rows.rewrite])
            self.means.append(summed / self.rw_count[:, None])
            self.h0s.append(acts[rows.first_row] if reference else self.means[-1])
        self.init_logp = torch.log_softmax(logits0[~rows.rewrite].float(), -1)
        # one delta tensor per (problem, hook), each its own Adam parameter group
        self.deltas = [
            [torch.zeros_like(h0[g], requires_grad=True) for h0 in self.h0s]
            for g in range(n_groups)
        ]
        # Adam's steps have the size of lr whatever the gradient's scale: relative mode scales
        # them, and the decay, by each hook's ||h0||
        groups = []
        for g in range(n_groups):
            for d, h0 in zip(self.deltas[g], self.h0s, strict=True):
                scale = float(h0[g].norm().clamp(min=1e-12)) if relative else 1.0
                groups.append({"params": [d], "lr": lr * scale, "problem": g})
        self.opt = torch.optim.Adam(groups)
        # the rows a pass runs and, with a prefix cache, the batch columns it runs ([rows, span])
        self.rows_now: dict[str, Any] = {
            "rows": torch.arange(len(rows), device=device),
            "columns": None,
        }
        self.editing_hooks = [*fwd_hooks, *[(h, self._adder(k)) for k, h in enumerate(hooks)]]
        if skip is not None:
            self.editing_hooks.append(
                skip.injector(lambda: self.rows_now["rows"], lambda: self.rows_now["columns"])
            )
        self.losses: list[list[float]] = [[] for _ in range(n_groups)]
        self.nll_factor = torch.ones(n_groups, device=device)  # the NLL's weight per problem
        self.nll_values = [float("inf")] * n_groups
        self.active = [True] * n_groups

    def _adder(self, k: int) -> Any:
        at, group, rows_now, deltas = self.rows.at, self.rows.group, self.rows_now, self.deltas

        def add(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            out = activation.clone()
            sel, columns = rows_now["rows"], rows_now["columns"]
            # a pass on a prefix cache starts at each row's delta position
            idx = at[sel] if columns is None else torch.zeros_like(at[sel])
            owners = group[sel]
            stacked = torch.stack([deltas[g][k] for g in range(self.n_groups)])  # [G, d]
            rows = torch.arange(len(idx), device=activation.device)
            out[rows, idx] = out[rows, idx] + stacked[owners].to(activation.dtype)
            return out

        return add

    def step(self) -> bool:
        """One step: gradients, losses and early stops, then Adam and the clamp for the
        problems still optimising. ``False`` (and no update) once every problem has stopped."""
        self.opt.zero_grad()
        decays = [
            self.weight_decay
            * sum(
                d.norm() / (h0[g].norm().clamp(min=1e-12) ** self.power)
                for d, h0 in zip(self.deltas[g], self.h0s, strict=True)
            )
            for g in range(self.n_groups)
        ]
        decay = sum(decays)
        _check_finite(decay, self.lr)
        decay.backward()
        nll_sum, kl_sum, missed = self._passes()
        self._settle(decays, nll_sum, kl_sum, missed)
        if not any(self.active):
            return False
        for pg in self.opt.param_groups:  # a stopped problem keeps its deltas
            if not self.active[pg["problem"]]:
                pg["params"][0].grad = None
        self.opt.step()
        with torch.no_grad():
            for g in range(self.n_groups):
                if not self.active[g]:
                    continue
                for d, h0 in zip(self.deltas[g], self.h0s, strict=True):
                    limit = self.clamp_norm_factor * h0[g].norm()
                    if d.norm() > limit:
                        d.mul_(limit / d.norm())
        return True

    def _passes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward and backward over the rows of the problems still optimising, in passes;
        per problem the summed NLL, the summed KL and the rewriting rows whose argmax at some
        target position is not the target (PMET's rule)."""
        rows, prefix, device = self.rows, self.prefix, self.rows.tokens.device
        nll_sum = torch.zeros(self.n_groups, device=device)
        kl_sum = torch.zeros(self.n_groups, device=device)
        missed = torch.zeros(self.n_groups, device=device)
        # the loss is a sum over prompts, so micro-batches accumulate exact gradients while
        # holding the activations of one micro-batch at a time
        live = torch.tensor(self.active, device=device)[rows.group].nonzero().squeeze(1)
        seq = rows.tokens.shape[1]
        if prefix is not None:  # each row runs from its delta position to its last read
            span = int((rows.answer_at[live].max(1).values + 1 - rows.at[live]).max())
            per_pass = prefix.rows_per_pass(self.micro_batch, seq, span, len(live))
        else:
            per_pass = self.micro_batch or len(rows)
        for start in range(0, len(live), per_pass):
            sel = live[start : start + per_pass]
            self.rows_now["rows"] = sel
            if prefix is None:
                run, where, kwargs = rows.tokens[sel], rows.answer_at[sel], {}
            else:
                columns = prefix.columns(rows.at[sel], span, seq)
                self.rows_now["columns"] = columns
                run = rows.tokens[sel[:, None], columns]
                where = rows.answer_at[sel] - rows.at[sel][:, None]
                kwargs = prefix.past(sel, rows.at[sel], span)
            # [rows, width, vocab]
            logits, _ = _logits_at(self.model, run, where, self.editing_hooks, **kwargs)
            chunk = self._loss(logits.float(), sel, nll_sum, kl_sum, missed)
            _check_finite(chunk, self.lr)
            chunk.backward()
        return nll_sum, kl_sum, missed

    def _loss(
        self,
        logits: torch.Tensor,
        sel: torch.Tensor,
        nll_sum: torch.Tensor,
        kl_sum: torch.Tensor,
        missed: torch.Tensor,
    ) -> torch.Tensor:
        """The loss of one pass's rows ``sel`` (their parts added to the per-problem sums)."""
        rows = self.rows
        owners, is_rw = rows.group[sel], rows.rewrite[sel]
        chunk = torch.zeros((), device=logits.device)
        if is_rw.any():
            # a row's NLL: the mean over its target's tokens
            tokens_nll = F.cross_entropy(
                logits[is_rw].flatten(0, 1), rows.targets[sel][is_rw].flatten(), reduction="none"
            ).view(-1, rows.width)
            nll = tokens_nll.sum(1) / rows.n_answer[sel][is_rw]
            weight = self.rw_count[owners[is_rw]]
            if self.nll_schedule == "pmet":  # the NLL's weight this pass
                chunk = chunk + (nll * self.nll_factor[owners[is_rw]] / weight).sum()
                wanted = rows.targets[sel][is_rw]
                hit = (logits[is_rw].argmax(-1) == wanted) | (wanted == -100)
                missed.index_add_(0, owners[is_rw], (~hit.all(1)).float())
            else:
                chunk = chunk + (nll / weight).sum()
            nll_sum.index_add_(0, owners[is_rw], nll.detach())
        if self.kl_factor > 0 and (~is_rw).any():
            logp = torch.log_softmax(logits[~is_rw, 0], -1)
            ess = sel[~is_rw] - sum(rows.n_rw)
            kl = F.kl_div(self.init_logp[ess], logp, log_target=True, reduction="none").sum(-1)
            chunk = chunk + self.kl_factor * (kl / self.es_count[owners[~is_rw]]).sum()
            kl_sum.index_add_(0, owners[~is_rw], kl.detach())
        return chunk

    def _settle(
        self,
        decays: Sequence[torch.Tensor],
        nll_sum: torch.Tensor,
        kl_sum: torch.Tensor,
        missed: torch.Tensor,
    ) -> None:
        """Record each optimising problem's loss and stop the ones that are done."""
        n_rw, n_es = self.rows.n_rw, self.rows.n_es
        for g in range(self.n_groups):
            if not self.active[g]:
                continue
            self.nll_values[g] = float(nll_sum[g]) / n_rw[g]
            kl_value = self.kl_factor * float(kl_sum[g]) / n_es[g] if n_es[g] else 0.0
            weighted = float(self.nll_factor[g]) * self.nll_values[g]
            loss = weighted + float(decays[g].detach()) + kl_value
            self.losses[g].append(loss)
            if (loss if self.reference else self.nll_values[g]) < 0.05:
                self.active[g] = False
                continue
            if self.nll_schedule == "pmet":  # PMET: soften the NLL once the target is argmax
                argmax = float(missed[g]) == 0
                self.nll_factor[g] = 0.1 if argmax else 1.0
                if argmax and kl_value <= 0.01:
                    self.active[g] = False
                    continue
            if self.reference and len(self.losses[g]) == self.steps:  # the last only evaluates
                self.active[g] = False

    def results(self) -> list[TargetResult]:
        return [
            TargetResult(
                [d.detach() for d in self.deltas[g]],
                [h0[g] for h0 in self.h0s],
                self.losses[g],
                self.nll_values[g],
                [m[g] for m in self.means],
            )
            for g in range(self.n_groups)
        ]


def _logits_at(
    model: TransformerBridge,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    fwd_hooks: Sequence[tuple[str, Any]],
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """Logits ``[rows, k, vocab]`` at ``positions[rows, k]`` of each row, with ``fwd_hooks``
    active, and the model's key/value cache when ``return_type="logits_and_cache"`` asks for
    it (else None); the unembedding runs at those positions only (a hook on its input, where
    the model has one). ``kwargs`` go to the model's forward (also a
    :class:`~kgshatter.editing.prefix.PrefixCache`'s cache of the columns before ``tokens``,
    mask and positions)."""
    rows, seq = tokens.shape
    flat = (torch.arange(rows, device=tokens.device)[:, None] * seq + positions).flatten()
    hooks = cast(list[Any], list(fwd_hooks))
    keep = kwargs.get("return_type") == "logits_and_cache"
    if "unembed.hook_in" not in model.hook_dict:
        out = model.run_with_hooks(tokens, fwd_hooks=hooks, **kwargs)
        logits, cache = out if keep else (out, None)
        return logits.reshape(rows * seq, -1)[flat].view(rows, positions.shape[1], -1), cache

    def keep_rows(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        return resid.reshape(-1, resid.shape[-1]).index_select(0, flat).unsqueeze(0)

    out = model.run_with_hooks(tokens, fwd_hooks=[*hooks, ("unembed.hook_in", keep_rows)], **kwargs)
    logits, cache = out if keep else (out, None)
    return logits.view(rows, positions.shape[1], -1), cache


def _check_finite(loss: torch.Tensor, lr: float) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"target optimisation diverged (loss {loss.item()}); lower lr (now {lr})"
        )
