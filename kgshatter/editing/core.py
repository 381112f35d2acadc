"""The shared editing core: configs' common fields, the task (prompts + statistics), keys.

Every method is a small solve step over these pieces (docs/editing.md):

- :class:`TargetConfig`: the fields every optimisation-based editor shares;
- :class:`Prompts`: right-padded prompt tokens with, per row, the subject's last token and the
  last token (where the answer is read); causal models never see the padding on the right;
- a *task* supplies prompts, statistics and names for its requests. :class:`SyntheticTask` does
  so for a model trained on a knowledge graph (prompts = random-walk contexts leading into the
  subject; C from validation walks, cached on disk and in memory);
  :class:`kgshatter.pretrained.text.TextTask` for a pretrained model (prompts after prefixes
  sampled from the model; C from a text corpus). Editors call only the methods both have
  (``prompts``, ``stats``, ``bare_prompt``, ``target_tokens``, ``fact``, ``describe``,
  ``request_from_dict``);
- :func:`mean_keys` / :func:`mean_activations`: activations at one position, averaged over a
  request's prompts, optionally with earlier edits applied as hooks;
- :func:`check_changes_answer`: refuse a request the model already satisfies.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int

from kgshatter.editing.covariance import CovarianceCache, SecondMoment, StatsKey, second_moment
from kgshatter.editing.requests import EditRequest, TextRequest, request_prompts
from kgshatter.kg.walks import WalkSampler
from kgshatter.sites import Site, edit_module, edit_sites
from kgshatter.validation import ConfigDict, check_bool, check_choice, check_float, check_int

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


# a request a task understands: a graph fact (SyntheticTask) or a text fact (TextTask)
Request = EditRequest | TextRequest

# where keys are read and values written: the subject's last token, or the prompt's last token
# (in a synthetic prompt "... x r" the relation token)
POSITIONS = ("subject", "relation")


@dataclass(frozen=True)
class Prompts:
    """Prompt tokens ``[p, seq]``, right-padded, with the positions that matter in each row.

    ``last[i]`` is row i's last real token (the answer is read there) and ``subject[i]`` its
    subject's last token. Padding sits after ``last``, so a causal model's activations up to
    ``last`` do not depend on it and no attention mask is needed.
    """

    tokens: Int[torch.Tensor, "p seq"]
    last: Int[torch.Tensor, " p"]
    subject: Int[torch.Tensor, " p"]

    def __post_init__(self) -> None:
        n, seq = self.tokens.shape
        for name in ("last", "subject"):
            idx = getattr(self, name)
            if idx.shape != (n,) or (n and (int(idx.min()) < 0 or int(idx.max()) >= seq)):
                raise ValueError(f"Prompts.{name} must hold one index in [0, {seq}) per row")
        if n and bool((self.subject > self.last).any()):
            raise ValueError("Prompts: a subject token lies after the prompt's last token")

    @classmethod
    def aligned(cls, tokens: Int[torch.Tensor, "p seq"]) -> Prompts:
        """Equal-length synthetic prompts ``... x r``: subject at -2, last at -1."""
        n, seq = tokens.shape
        return cls(tokens, torch.full((n,), seq - 1), torch.full((n,), max(seq - 2, 0)))

    @classmethod
    def cat(cls, parts: Sequence[Prompts]) -> Prompts:
        """Rows of several prompt sets in one batch (shorter ones right-padded with their
        last token, which no kept position can see)."""
        seq = max(p.tokens.shape[1] for p in parts)
        rows = []
        for p in parts:
            pad = seq - p.tokens.shape[1]
            rows.append(
                torch.cat([p.tokens, p.tokens[:, -1:].expand(-1, pad)], 1) if pad else p.tokens
            )
        return cls(
            torch.cat(rows),
            torch.cat([p.last for p in parts]),
            torch.cat([p.subject for p in parts]),
        )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def rows(self, start: int, stop: int | None = None) -> Prompts:
        """The prompts ``start:stop`` (e.g. the bare first prompt, or the prefixed rest)."""
        sl = slice(start, stop)
        return Prompts(self.tokens[sl], self.last[sl], self.subject[sl])

    def index(self, position: str) -> Int[torch.Tensor, " p"]:
        """Per-row index of ``position`` (``"subject"`` or ``"relation"`` = the last token)."""
        check_choice("position", position, POSITIONS)
        return self.subject if position == "subject" else self.last

    def followed_by(self, tokens: Sequence[int]) -> Prompts:
        """Every row continued by ``tokens`` right after its last token (teacher forcing a
        multi-token answer). ``last`` and ``subject`` stay where they were, so the answer's
        i-th token is predicted at ``last + i`` (i = 0 .. len(tokens)); what follows the
        continuation is padding, as before."""
        extra = [int(t) for t in tokens]
        if not extra:
            return self
        n, seq = self.tokens.shape
        width = max(seq, int(self.last.max()) + 1 + len(extra)) if n else seq
        out = self.tokens.clone()
        if width > seq:
            out = torch.cat([out, out[:, -1:].expand(-1, width - seq)], 1)
        cols = self.last[:, None] + 1 + torch.arange(len(extra))
        out.scatter_(1, cols, torch.tensor(extra, dtype=out.dtype).expand(n, -1).contiguous())
        return Prompts(out, self.last, self.subject)

    def answer_positions(self, n_tokens: int) -> Int[torch.Tensor, "p n_tokens"]:
        """Where each row predicts the tokens of an ``n_tokens``-token answer continued with
        :meth:`followed_by` (``last``, ``last + 1``, ...)."""
        check_int("n_tokens", n_tokens, 1)
        return self.last[:, None] + torch.arange(n_tokens)


@dataclass(frozen=True, kw_only=True)
class TargetConfig(ConfigDict):
    """Fields shared by the optimisation-based editors (target optimisation + statistics).

    ``position`` is where keys are read and values written: ``"subject"`` (the entity token, the
    paper's and ROME's choice) or ``"relation"`` (the last token). Default ``"relation"``
    (*choice*, measured): in the grokked ``cpu`` model the answer is computed at the relation
    token, and no delta at the subject token moves it (NLL of the new target stayed at 9-17 with
    a delta 100x the residual norm), while at the relation token every method edits.

    ``relative=True`` (a departure from the references, for small models; README, "The
    fidelity study") measures the optimisation in units of ``||h0||``: Adam's ``lr`` is
    multiplied by ``||h0||`` and the weight decay term is ``||delta|| / ||h0||`` instead of the
    references' ``||delta|| / ||h0||^2``, so that a layer whose outputs are c times larger gets a
    delta c times larger and nothing else changes. The references' form was tuned on GPT-2-XL
    (``||h0||`` in the tens); on a synthetic model with ``||h0||`` ~ 0.05 its decay term is 400x
    the NLL's scale and no edit succeeds.

    ``micro_batch`` is a memory knob, not a hyperparameter: at most that many prompts run
    through the model at once during target optimisation (same gradients up to rounding).

    ``reference=True`` follows the reference implementations step for step (kmeng01/rome's
    ``compute_v``, kmeng01/memit's ``compute_z`` and ``compute_ks``), where kgshatter's defaults
    depart from them (docs/editing.md, "Reference mode"): the prompts are the bare one plus
    ``n_prompts - 1`` prefixed ones and one bare essence prompt (``task.reference_prompts``);
    ``h0`` is the bare prompt's activation; the KL is read at the essence prompt's subject; the
    optimisation stops on the total loss and makes ``steps - 1`` updates. The presets named after
    a reference (``gpt2-xl``, ``llama3-8b``) use it.
    """

    n_prompts: int = 10
    steps: int = 40
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    position: str = "relation"
    n_samples: int = 100_000
    ridge: float = 1e-6
    seed: int = 0
    micro_batch: int | None = None
    relative: bool = False
    reference: bool = False

    def __post_init__(self) -> None:
        check_bool("relative", self.relative)
        check_bool("reference", self.reference)
        if self.reference and self.relative:
            raise ValueError("reference=True follows the references, which have no relative mode")
        check_int("n_prompts", self.n_prompts, 1)
        if self.micro_batch is not None:
            check_int("micro_batch", self.micro_batch, 1)
        check_int("steps", self.steps, 1)
        check_float("lr", self.lr, 0.0, inclusive=False)
        check_float("kl_factor", self.kl_factor, 0.0)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_float("clamp_norm_factor", self.clamp_norm_factor, 0.0, inclusive=False)
        check_choice("position", self.position, tuple(POSITIONS))
        check_int("n_samples", self.n_samples, 1)
        check_float("ridge", self.ridge, 0.0)
        check_int("seed", self.seed, 0)

    @property
    def edit_layers(self) -> tuple[int, ...]:
        raise NotImplementedError

    def prompts_for(self, task: Any, request: Any) -> tuple[Prompts, Prompts | None]:
        """The request's rewriting and essence prompts: the task's own, or in reference mode
        the references' layout (``task.reference_prompts``)."""
        make = task.reference_prompts if self.reference else task.prompts
        return make(request, self.n_prompts, self.seed)

    def optimisation(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~kgshatter.editing.targets.optimize_targets`."""
        return {
            "steps": self.steps,
            "lr": self.lr,
            "kl_factor": self.kl_factor,
            "weight_decay": self.weight_decay,
            "clamp_norm_factor": self.clamp_norm_factor,
            "position": self.position,
            "micro_batch": self.micro_batch,
            "relative": self.relative,
            "reference": self.reference,
        }


def as_requests(requests: Sequence[Any] | Any, method: str) -> list[Any]:
    """One request or several, as a non-empty list."""
    out = list(requests) if isinstance(requests, (list, tuple)) else [requests]
    if not out:
        raise ValueError(f"{method} needs at least one request")
    return out


def reject_state(method: str, state: Any) -> None:
    """Only AlphaEdit carries sequential state; other methods refuse one rather than ignore it."""
    if state is not None:
        raise ValueError(f"{method} keeps no editing state; state is for 'alphaedit'")


@contextmanager
def frozen_weights(model: TransformerBridge) -> Iterator[None]:
    """No weight receives gradients inside the block (restored on exit, even on error)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def check_layers(name: str, layers: Sequence[int]) -> None:
    """Layers: a non-empty, strictly ascending tuple of non-negative ints."""
    if not isinstance(layers, tuple) or not layers:
        raise ValueError(f"{name} must be a non-empty tuple of layer indices, got {layers!r}")
    for layer in layers:
        check_int(name, layer, 0)
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"{name} must be strictly ascending without repeats, got {layers}")


@runtime_checkable
class EditTask(Protocol):
    """What every editing method reads from a task: its prompts, target token and key
    statistics. :class:`SyntheticTask` (a trained graph) and
    :class:`kgshatter.pretrained.text.TextTask` (a pretrained model and a corpus) implement it;
    a new domain implements these methods."""

    def prompts(
        self, request: Any, n_prompts: int, seed: int
    ) -> tuple[Prompts, Prompts | None]: ...

    def reference_prompts(
        self, request: Any, n_prompts: int, seed: int
    ) -> tuple[Prompts, Prompts | None]: ...

    def bare_prompt(self, request: Any) -> Prompts: ...

    def target_tokens(self, request: Any) -> tuple[int, ...]: ...

    def fact(self, request: Any) -> tuple[Any, Any]: ...

    def describe(self, request: Any) -> str: ...

    def request_from_dict(self, data: Mapping[str, Any]) -> Any: ...

    def stats(
        self, model: TransformerBridge, layer: int, n_samples: int, seed: int, model_id: str
    ) -> SecondMoment: ...


class SyntheticTask:
    """Prompts and key statistics for a model trained on ``sampler.graph``.

    ``cache`` (a :class:`CovarianceCache`) stores second moments on disk; they are also kept in
    memory per (model identity, layer, sample count, seed), so a sequence of edits computes or
    loads each statistic once. Statistics are always those of the model as passed (edits applied
    as hooks do not change its identity; that is the references' behaviour in sequential
    editing, which keeps the unedited model's C).
    """

    def __init__(self, sampler: WalkSampler, cache: CovarianceCache | None = None) -> None:
        self.sampler = sampler
        self.graph = sampler.graph
        self.cache = cache
        self._stats: dict[tuple[str, int, int, int], SecondMoment] = {}

    def prompts(
        self, request: EditRequest, n_prompts: int, seed: int
    ) -> tuple[Prompts, Prompts | None]:
        """Rewriting prompts for ``request`` and "essence" prompts whose answers must not move.

        The essence prompts ask the subject's fact on the next order (same direction and hops),
        which the edit should leave alone (*choice*: the synthetic analogue of ROME's
        "{subject} is a"); a one-order graph has none.
        """
        request.validate(self.graph)
        prompts = request_prompts(self.sampler, request.subject, request.relation, n_prompts, seed)
        rel = self.graph.relations[request.relation]
        if self.graph.n_orders == 1:
            return Prompts.aligned(prompts), None
        other = next(
            r for r in self.graph.relations if r.order == (rel.order + 1) % self.graph.n_orders
        )
        essence = request_prompts(self.sampler, request.subject, other.index, n_prompts, seed + 1)
        return Prompts.aligned(prompts), Prompts.aligned(essence)

    def reference_prompts(
        self, request: EditRequest, n_prompts: int, seed: int
    ) -> tuple[Prompts, Prompts | None]:
        """The references' prompt layout: the bare prompt ``x r`` first, then ``n_prompts - 1``
        prefixed ones; one bare essence prompt (``x r'``, r' the next order's relation)."""
        prompts, essence = self.prompts(request, max(1, n_prompts - 1), seed)
        rows = [self.bare_prompt(request)] + ([prompts] if n_prompts > 1 else [])
        if essence is None:
            return Prompts.cat(rows), None
        bare_essence = Prompts.aligned(essence.tokens[:1, -2:])
        return Prompts.cat(rows), bare_essence

    def bare_prompt(self, request: EditRequest) -> Prompts:
        """The request without context: ``x r`` (original ROME's plain template)."""
        n_entities = self.graph.n_entities
        return Prompts.aligned(torch.tensor([[request.subject, n_entities + request.relation]]))

    def target_tokens(self, request: EditRequest) -> tuple[int, ...]:
        """A synthetic target is one entity token."""
        return (request.target,)

    def fact(self, request: EditRequest) -> tuple[int, int]:
        """What a request rewrites; a batch may not rewrite one fact twice."""
        return (request.subject, request.relation)

    def describe(self, request: EditRequest) -> str:
        return request.describe(self.graph)

    def request_from_dict(self, data: Mapping[str, Any]) -> EditRequest:
        return EditRequest(**data)

    def stats(
        self, model: TransformerBridge, layer: int, n_samples: int, seed: int, model_id: str
    ) -> SecondMoment:
        """``C = E[k k^T]`` at ``layer``'s MLP keys from ``n_samples`` validation walks."""
        memo = (model_id, layer, n_samples, seed)
        if memo not in self._stats:
            self._stats[memo] = synthetic_stats(
                model, self.sampler, layer, n_samples, self.cache, seed, model_id=model_id
            )
        return self._stats[memo]


def synthetic_stats(
    model: TransformerBridge,
    sampler: WalkSampler,
    layer: int,
    n_samples: int,
    cache: CovarianceCache | None,
    seed: int = 0,
    batch_size: int = 1000,
    model_id: str | None = None,
) -> SecondMoment:
    """C at ``layer`` from ``n_samples`` validation walks (paper: 10^5), cached when possible."""
    from kgshatter.editing.edit import model_identity

    Site(layer, "mlp_post").check(model.cfg.n_layers)
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


def mean_activations(
    model: TransformerBridge,
    hook_name: str,
    prompts: Sequence[Prompts],
    position: str,
    fwd_hooks: Sequence[tuple[str, Any]] = (),
    stop_at_layer: int | None = None,
) -> Float[torch.Tensor, "request d"]:
    """Activation at ``hook_name`` and ``position``, averaged over each request's prompts (float64).

    ``prompts`` holds one :class:`Prompts` per request; all run in one batch. With
    ``stop_at_layer`` the forward pass ends before that block (it must lie above the hook).
    """
    device = next(model.parameters()).device
    sizes = [len(p) for p in prompts]
    batch = Prompts.cat(prompts)
    idx = batch.index(position).to(device)
    seen: dict[str, torch.Tensor] = {}

    def read(activation: torch.Tensor, hook: Any) -> None:
        seen["a"] = activation[torch.arange(len(idx), device=device), idx].detach()

    with torch.inference_mode():
        model.run_with_hooks(
            batch.tokens.to(device),
            fwd_hooks=[*fwd_hooks, (hook_name, read)],
            stop_at_layer=stop_at_layer,
        )
    return torch.stack([chunk.double().mean(0) for chunk in seen["a"].split(sizes)])


def mean_keys(
    model: TransformerBridge,
    layer: int,
    prompts: Sequence[Prompts],
    position: str,
    fwd_hooks: Sequence[tuple[str, Any]] = (),
) -> Float[torch.Tensor, "request d_key"]:
    """Keys of the edited matrix (MLP ``hook_post``; Mamba ``out_proj`` input) per request."""
    key, _ = edit_sites(edit_module(model), layer)
    hook = key.check(model.cfg.n_layers).hook_name
    return mean_activations(model, hook, prompts, position, fwd_hooks, stop_at_layer=layer + 1)


class AlreadyAnswered(ValueError):
    """The model already gives the requested answer: the edit would be a no-op."""


def last_logits(
    model: TransformerBridge, prompts: Prompts, fwd_hooks: Sequence[tuple[str, Any]] = ()
) -> Float[torch.Tensor, "p vocab"]:
    """Next-token logits at each row's last real token."""
    device = next(model.parameters()).device
    logits = model.run_with_hooks(prompts.tokens.to(device), fwd_hooks=list(fwd_hooks))
    return logits[torch.arange(len(prompts), device=device), prompts.last.to(device)]


def answer_logits(
    model: TransformerBridge,
    prompts: Prompts,
    answer: Sequence[int],
    fwd_hooks: Sequence[tuple[str, Any]] = (),
) -> Float[torch.Tensor, "p n_tokens vocab"]:
    """Logits predicting each token of ``answer`` after every prompt, teacher-forced (the
    prompts continued by all but its last token; one forward pass)."""
    device = next(model.parameters()).device
    forced = prompts.followed_by(answer[:-1])
    logits = model.run_with_hooks(forced.tokens.to(device), fwd_hooks=list(fwd_hooks))
    at = forced.answer_positions(len(answer)).to(device)
    return logits[torch.arange(len(prompts), device=device)[:, None], at]


def check_changes_answer(
    model: TransformerBridge,
    task: Any,
    request: Any,
    prompts: Prompts,
    fwd_hooks: Sequence[tuple[str, Any]] = (),
) -> None:
    """Refuse ``request`` if the model (with ``fwd_hooks``) already answers its target: the
    prompt-averaged next-token distribution picks every target token in turn (one token:
    the answer; several: the teacher-forced greedy continuation is the target)."""
    target = list(task.target_tokens(request))
    with torch.inference_mode():
        logits = answer_logits(model, prompts, target, fwd_hooks)
    answer = torch.softmax(logits.float(), -1).mean(0).argmax(-1).tolist()
    if answer == target:
        raise AlreadyAnswered(
            f"the model already answers the target of {task.describe(request)}; nothing to "
            f"edit (choose another target)"
        )
