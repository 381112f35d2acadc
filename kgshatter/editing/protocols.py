"""Edit experiments: sampled requests, efficacy and collateral metrics, and the three protocols.

- :func:`sample_requests`: counterfactual edits at cyclic distance d and corrective edits (facts
  the model gets wrong), seeded, from the edit sub-graph (order I by default; the paper's protocol).
- :class:`EditScorer`: efficacy (the edited query answers y' after unseen context prefixes,
  softmax averaged over prefixes as in evaluation) and the change in direct / logical /
  compositional accuracy of every order, scored against the original graph.
- :func:`run_protocol`: ``single`` (each request edited alone into the pristine model),
  ``batch`` (one edit for all requests) or ``sequential`` (each edit computed on the model with
  every earlier edit applied, metrics after every step). Every record names its protocol.

Edits are applied as hooks throughout; the model's weights are never written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from kgshatter.editing import Method, get_method
from kgshatter.editing.core import AlreadyAnswered, EditTask, Request
from kgshatter.editing.edit import Edit, model_identity
from kgshatter.editing.requests import EditRequest, request_prompts_many
from kgshatter.evaluate import Evaluator, query_probs
from kgshatter.hooks import edited
from kgshatter.kg.graph import KnowledgeGraph
from kgshatter.kg.walks import QuerySet, WalkSampler, step_generator
from kgshatter.models import last_position_logits
from kgshatter.validation import check_choice, check_int

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

KINDS = ("counterfactual", "corrective")
PROTOCOLS = ("single", "batch", "sequential")


def sample_requests(
    graph: KnowledgeGraph,
    kind: str,
    n: int,
    seed: int = 0,
    *,
    distance: int = 1,
    order: int = 0,
    model: TransformerBridge | None = None,
    sampler: WalkSampler | None = None,
    n_prefixes: int = 5,
) -> list[EditRequest]:
    """``n`` distinct facts ``x r`` of ``order`` with new targets.

    ``counterfactual``: the target lies ``distance`` steps clockwise or anticlockwise (seeded
    coin) from the true answer on the relation's ring; ``distance`` must be in
    ``1 .. N // 2``. On a torus order the target is drawn (seeded) among the entities exactly
    ``distance`` lattice steps from the true answer, ``distance`` in ``1 .. w // 2 + h // 2``;
    on a grid or a tree among those ``distance`` away in its own metric, from the facts whose
    answer has one. A tree's steps down (several answers) are never edited: only its steps up.
    ``corrective``: facts ``model`` answers wrongly (softmax averaged over ``n_prefixes``
    contexts from ``sampler``), target = the graph's answer; fewer than ``n`` are returned when
    the model makes fewer mistakes.
    """
    check_choice("kind", kind, KINDS)
    check_int("n", n, 1)
    if not 0 <= order < graph.n_orders:
        raise ValueError(f"order must be in 0..{graph.n_orders - 1}, got {order}")
    # relations with one answer (a tree's steps down have several: nothing single to edit)
    rels = [
        r.index for r in graph.relations if r.order == order and not graph.multi_valued[r.index]
    ]
    table = graph.table[rels]  # [R_o, N]
    rel_idx, xs = torch.nonzero(torch.from_numpy(table >= 0), as_tuple=True)
    g = step_generator(seed, 1 << 30 | KINDS.index(kind) << 8 | order)
    if kind == "counterfactual":
        check_int("distance", distance, 1, graph.config.max_edit_distance(order))
        ring = graph.shape(order) == "ring"
        if graph.shape(order) in ("grid", "tree"):  # only facts whose answer has one d away
            reach = torch.from_numpy((graph.distances(order) == distance).any(1))
            keep = reach[torch.from_numpy(table)[rel_idx, xs]]
            rel_idx, xs = rel_idx[keep], xs[keep]
        if n > xs.numel():
            raise ValueError(
                f"asked for {n} edits but order {order} has only {xs.numel()} facts"
                + ("" if ring else f" whose answer has an entity {distance} steps away")
            )
        pick = torch.randperm(xs.numel(), generator=g)[:n]
        signs = torch.randint(0, 2, (n,), generator=g) * 2 - 1
        out = []
        for p, sign in zip(pick.tolist(), signs.tolist(), strict=True):
            rel, x = rels[int(rel_idx[p])], int(xs[p])
            old = graph.apply(rel, x)
            if ring:
                position = int(graph.positions[order][old])
                new = int(graph.rings[order][(position + sign * distance) % graph.n_entities])
            else:
                options = graph.at_distance(order, old, distance)
                new = int(options[int(torch.randint(len(options), (1,), generator=g))])
            out.append(EditRequest(x, rel, new))
        return out
    if model is None or sampler is None:
        raise ValueError("corrective edits need the model and a sampler to find its mistakes")
    rows = torch.stack(
        [xs, torch.tensor(rels)[rel_idx], torch.from_numpy(table)[rel_idx, xs]], 1
    ).numpy()
    queries = QuerySet.build(sampler, "direct", n_prefixes=n_prefixes, seed=seed, rows=rows)
    right = queries.correct(graph, query_probs(model, queries).argmax(-1))
    wrong = torch.nonzero(~right)[:, 0]
    wrong = wrong[torch.randperm(wrong.numel(), generator=g)][:n]
    return [EditRequest(int(rows[i, 0]), int(rows[i, 1]), int(rows[i, 2])) for i in wrong]


@dataclass(frozen=True)
class Efficacy:
    """One request's efficacy: ``success`` (the prompt-averaged softmax picks the target),
    the fraction of single prompts that pick it, and the target's averaged probability."""

    success: float
    prompt_fraction: float
    target_prob: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


# accuracy per split and order ("direct" -> {"I": 0.97, ..., "all": 0.96}); None: no queries
Accuracy = dict[str, dict[str, float | None]]


@dataclass(frozen=True)
class Collateral:
    """Accuracy per split and order with the edits applied, and its change from the unedited
    model (fractions; ``None`` where a split has no queries)."""

    accuracy: Accuracy
    accuracy_change: Accuracy


@runtime_checkable
class Scorer(Protocol):
    """What :func:`run_protocol` asks of a scorer: :class:`EditScorer` for a trained graph,
    :class:`kgshatter.pretrained.facts.FactScorer` for facts of a pretrained model. Every measure
    is taken with the edits so far applied (hooks on ``model``)."""

    def describe(self, requests: Sequence[Any]) -> list[dict[str, Any]]:
        """Each request as a JSON dict (with ``fact``, ``old_target``, ``distance``); refuses
        requests that do not belong to the scorer's task."""
        ...

    def prepare(self, model: TransformerBridge, requests: Sequence[Any]) -> None:
        """Record what the unedited ``model`` does on the requests (before any edit)."""
        ...

    def efficacy(self, model: TransformerBridge, requests: Sequence[Any]) -> list[Efficacy]: ...

    def collateral(self, model: TransformerBridge, requests: Sequence[Any] = ()) -> Collateral:
        """Accuracy now and its change from the unedited model (``requests``: the edited
        facts, which a scorer may leave out of the accuracy)."""
        ...

    def neighbourhood(
        self, model: TransformerBridge, requests: Sequence[Any]
    ) -> dict[str, float] | None: ...


class EditScorer:
    """Efficacy and collateral damage of edits, against the original graph.

    The baseline accuracy of the unedited ``model`` is measured once, here. Efficacy prompts
    use ``seed`` (default differs from the editors' prompt seed, so efficacy is measured on
    contexts the edit was not optimised on).
    """

    def __init__(
        self,
        model: TransformerBridge,
        evaluator: Evaluator,
        n_prompts: int = 10,
        seed: int = 12345,
        neighbour_prompts: int = 2,
        max_neighbours: int = 32,
    ) -> None:
        check_int("n_prompts", n_prompts, 1)
        check_int("neighbour_prompts", neighbour_prompts, 0)
        check_int("max_neighbours", max_neighbours, 1)
        self.max_neighbours = max_neighbours
        self.evaluator = evaluator
        self.graph = evaluator.graph
        self.sampler = evaluator.sampler
        self.n_prompts = n_prompts
        self.seed = seed
        self.neighbour_prompts = neighbour_prompts
        self.baseline = evaluator.accuracy(model)
        # (subject, relation) -> answered right by the unedited model (prepare_neighbourhood)
        self._right_before: dict[tuple[int, int], bool] = {}
        self._prompt_memo: dict[tuple[int, int, int, int], torch.Tensor] = {}

    # -- CounterFact's neighbourhood, synthetic: facts sharing the subject or the relation ----
    def neighbour_facts(
        self, request: EditRequest
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The subject's other facts ``(x, r')`` and the relation's other facts ``(x', r)``,
        each at most ``max_neighbours`` (a seeded sample, the same for every call)."""
        g, x, r = self.graph, request.subject, request.relation
        same_subject = [(x, q) for q in range(g.n_relations) if q != r and g.table[q, x] >= 0]
        same_relation = [(y, r) for y in range(g.n_entities) if y != x and g.table[r, y] >= 0]
        rng = np.random.default_rng([self.seed, x, r])

        def cap(facts: list[tuple[int, int]]) -> list[tuple[int, int]]:
            if len(facts) <= self.max_neighbours:
                return facts
            keep = rng.choice(len(facts), self.max_neighbours, replace=False)
            return [facts[i] for i in sorted(keep)]

        return cap(same_subject), cap(same_relation)

    @torch.inference_mode()
    def _prompt_probs(
        self,
        model: TransformerBridge,
        facts: Sequence[tuple[int, int]],
        n_prompts: int,
        seed: int,
        chunk: int = 256,
    ) -> torch.Tensor:
        """Next-token probabilities ``[fact, prompt, vocab]`` after ``n_prompts`` contexts of
        each ``(subject, relation)`` fact (``chunk`` facts per forward pass)."""
        device = next(model.parameters()).device
        self._sample_prompts(facts, n_prompts, seed)
        parts = []
        for start in range(0, len(facts), chunk):
            tokens = torch.cat([self._prompt_memo[x, r, n_prompts, seed]
                                for x, r in facts[start : start + chunk]])  # fmt: skip
            logits = last_position_logits(model, tokens.to(device))
            parts.append(torch.softmax(logits.float(), -1).cpu())
        return torch.cat(parts).view(len(facts), n_prompts, -1)

    def _sample_prompts(self, facts: Sequence[tuple[int, int]], n_prompts: int, seed: int) -> None:
        """:func:`request_prompts` of the facts not seen yet, kept: every edit of a sweep asks
        the same neighbour facts after the same seeded contexts, and the walks (sampled in one
        loop for all new facts) cost more than the forward passes on them."""
        new = sorted({f for f in facts if (*f, n_prompts, seed) not in self._prompt_memo})
        if not new:
            return
        tokens = request_prompts_many(self.sampler, new, n_prompts, seed)
        for (x, r), rows in zip(new, tokens.split(n_prompts), strict=True):
            self._prompt_memo[x, r, n_prompts, seed] = rows

    def _right(self, model: TransformerBridge, facts: Sequence[tuple[int, int]]) -> list[bool]:
        """Whether the averaged softmax over ``neighbour_prompts`` contexts picks each fact's
        answer in the graph."""
        if not facts:
            return []
        picks = self._prompt_probs(model, facts, self.neighbour_prompts, self.seed + 1)
        picks = picks.mean(1).argmax(-1)
        xs, rs = zip(*facts, strict=True)
        return [bool(v) for v in self.graph.accepts(rs, xs, picks.numpy())]

    def describe(self, requests: Sequence[EditRequest]) -> list[dict[str, Any]]:
        """Each request with its fact, old target and edit distance (validated on the graph)."""
        for r in requests:
            r.validate(self.graph)
        return describe_requests(self.graph, requests)

    def prepare(self, model: TransformerBridge, requests: Sequence[EditRequest]) -> None:
        """What :func:`run_protocol` calls before any edit: :meth:`prepare_neighbourhood`."""
        self.prepare_neighbourhood(model, requests)

    def prepare_neighbourhood(
        self, model: TransformerBridge, requests: Sequence[EditRequest]
    ) -> None:
        """Record the unedited ``model``'s answers on the requests' neighbour facts (call it
        before any edit is applied; :func:`run_protocol` does)."""
        if not self.neighbour_prompts:
            return
        todo = sorted(
            {f for r in requests for f in sum(self.neighbour_facts(r), [])}
            - set(self._right_before)
        )
        self._right_before.update(zip(todo, self._right(model, todo), strict=True))

    def neighbourhood(
        self, model: TransformerBridge, requests: Sequence[EditRequest]
    ) -> dict[str, float] | None:
        """The fraction of the subject's other facts (``subject``) and of the relation's other
        facts (``relation``) the model answers right now, and each one's change from the
        unedited model (``*_change``), averaged over ``requests``; ``None`` when the scorer
        was built with ``neighbour_prompts=0``."""
        if not self.neighbour_prompts:
            return None
        out: dict[str, list[float]] = {}
        for request in requests:
            same_subject, same_relation = self.neighbour_facts(request)
            both = same_subject + same_relation
            if any(f not in self._right_before for f in both):
                raise ValueError(
                    "EditScorer.neighbourhood needs prepare_neighbourhood(model, requests) "
                    "on the unedited model first"
                )
            right = dict(zip(both, self._right(model, both), strict=True))  # one pass
            for name, facts in (("subject", same_subject), ("relation", same_relation)):
                if not facts:
                    continue
                now = float(np.mean([right[f] for f in facts]))
                before = float(np.mean([self._right_before[f] for f in facts]))
                out.setdefault(name, []).append(now)
                out.setdefault(f"{name}_change", []).append(now - before)
        return {k: float(np.mean(v)) for k, v in out.items()}

    def efficacy(self, model: TransformerBridge, requests: Sequence[EditRequest]) -> list[Efficacy]:
        """Per request: ``success`` (averaged softmax picks the target), the fraction of single
        prompts that pick it, and the target's averaged probability."""
        if not requests:
            return []
        facts = [(r.subject, r.relation) for r in requests]
        probs = self._prompt_probs(model, facts, self.n_prompts, self.seed, chunk=len(facts))
        out = []
        for r, p in zip(requests, probs, strict=True):
            mean = p.mean(0)
            out.append(
                Efficacy(
                    success=float(mean.argmax() == r.target),
                    prompt_fraction=float((p.argmax(-1) == r.target).float().mean()),
                    target_prob=float(mean[r.target]),
                )
            )
        return out

    def collateral(self, model: TransformerBridge, requests: Sequence[Any] = ()) -> Collateral:
        """Accuracy per split and order now, and its change from the unedited baseline (over
        every query of the graph, the edited facts included: ``requests`` is not used)."""
        acc = self.evaluator.accuracy(model)
        change = {
            split: {k: _minus(v, self.baseline[split][k]) for k, v in by_order.items()}
            for split, by_order in acc.items()
        }
        return Collateral(acc, change)


@dataclass(frozen=True, kw_only=True)
class EditRecord:
    """One scoring point of a protocol run: the edit step, its requests and, unless it was
    ``skipped`` (the reason), what was measured with the edits so far applied.

    ``efficacy`` is the mean success over the step's requests (``efficacy_detail`` per
    request); ``retained`` (sequential only) the same over every request edited so far;
    ``accuracy`` / ``accuracy_change`` per split and order, against the unedited model;
    ``neighbourhood`` CounterFact's neighbourhood (:meth:`EditScorer.neighbourhood`);
    ``measures`` what the protocol's ``measure`` callbacks returned. :meth:`to_dict` is the
    JSON form (``metrics.json``; absent fields left out).
    """

    protocol: str
    method: str
    config: dict[str, Any]
    step: int
    requests: list[dict[str, Any]]
    seconds: float
    skipped: str | None = None
    efficacy: float | None = None
    efficacy_detail: tuple[Efficacy, ...] = ()
    retained: float | None = None
    accuracy: Accuracy | None = None
    accuracy_change: Accuracy | None = None
    neighbourhood: dict[str, float] | None = None
    n_edits_applied: int | None = None
    edits_before: int | None = None
    measures: dict[str, Any] | None = None

    @property
    def scored(self) -> bool:
        """Whether the step was edited and measured (not skipped)."""
        return self.skipped is None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "efficacy_detail":
                if self.scored:
                    out[f.name] = [e.to_dict() for e in value]
            elif value is not None:
                out[f.name] = value
        return out


@dataclass
class ProtocolResult:
    """The records (one per evaluation point) and the edits of one protocol run."""

    protocol: str
    method: str
    records: list[EditRecord]
    edits: list[Edit]

    def scored(self) -> list[EditRecord]:
        """The records of the steps that were edited (not skipped)."""
        return [r for r in self.records if r.scored]


def _minus(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value - base


def describe_requests(graph: KnowledgeGraph, requests: Sequence[EditRequest]) -> list[dict]:
    return [
        {
            **r.to_dict(),
            "fact": r.describe(graph),
            "old_target": r.old_target(graph),
            "distance": graph.edit_distance(r.relation, r.old_target(graph), r.target),
        }
        for r in requests
    ]


def run_protocol(
    model: TransformerBridge,
    task: EditTask,
    method: Method | str,
    config: Any,
    requests: Sequence[Request],
    protocol: str,
    scorer: Scorer,
    *,
    model_id: str | None = None,
    progress: bool = False,
    measure: Callable[[Any], dict[str, Any]] | None = None,
    measure_edit: Callable[[Edit], dict[str, Any]] | None = None,
    only: Sequence[int] | None = None,
) -> ProtocolResult:
    """Edit ``requests`` under ``protocol`` and score after every edit (see module doc).

    The same loop serves a trained graph (:class:`SyntheticTask` with an :class:`EditScorer`)
    and a pretrained model (:class:`kgshatter.pretrained.text.TextTask` with a
    :class:`kgshatter.pretrained.facts.FactScorer`).

    ``measure(model)``, if given, runs at every scoring point with the edits applied, and its
    result is stored under ``"measures"`` (the shattering sweep reads representations here).
    ``measure_edit(edit)`` adds measures of the new edit itself (e.g. the size of its update)
    to the same dict.

    Under ``single``, a method with ``compute_many`` computes all the requests' edits together
    (their target optimisations share forward passes). ``only`` (``single`` only) scores just
    those request indices; the others are still computed with them, so that an edit does not
    depend on which of its neighbours were already scored (a resumed sweep).
    """
    method = get_method(method) if isinstance(method, str) else method
    check_choice("protocol", protocol, PROTOCOLS)
    if not requests:
        raise ValueError("run_protocol needs at least one request")
    if protocol == "batch" and not method.batch and len(requests) > 1:
        raise ValueError(
            f"{method.name} edits one fact at a time; a batch needs one of "
            f"{sorted(m for m, spec in _methods().items() if spec.batch)}"
        )
    if only is not None and protocol != "single":
        raise ValueError("run_protocol(only=...) applies to the single protocol")
    run = _Run(
        model=model, task=task, method=method, config=config, protocol=protocol,
        scorer=scorer, described=scorer.describe(requests),  # validates them, before any work
        model_id=model_id or model_identity(model), measure=measure, measure_edit=measure_edit,
    )  # fmt: skip
    steps = [list(requests)] if protocol == "batch" else [[r] for r in requests]
    bar = _progress(len(steps), f"{method.name} {protocol}", progress)
    ready = run.compute_together(requests) if protocol == "single" else {}
    scorer.prepare(model, list(requests))  # before any edit is applied
    with ExitStack() as stack:
        state = method.new_state()
        applied: list[Request] = []
        for step, batch in enumerate(steps):
            if only is not None and step not in only:
                continue
            if step in ready:
                edit, seconds, skipped = ready[step]
            else:
                edit, seconds, skipped = run.compute(batch, state if protocol != "single" else None)
            if edit is None:
                run.record(step, batch, None, seconds, skipped, batch)
            elif protocol == "sequential":
                run.edits.append(edit)
                stack.enter_context(edited(model, edit))
                applied.extend(batch)
                run.record(step, batch, edit, seconds, None, list(applied))
            else:
                run.edits.append(edit)
                with edited(model, edit):
                    run.record(step, batch, edit, seconds, None, batch)
            bar.update()
        bar.close()
    return ProtocolResult(protocol, method.name, run.records, run.edits)


_Computed = tuple[Edit | None, float, str | None]  # the edit (None: skipped), seconds, reason


@dataclass
class _Run:
    """One protocol run's fixed parts and what it has produced so far (:func:`run_protocol`)."""

    model: TransformerBridge
    task: EditTask
    method: Method
    config: Any
    protocol: str
    scorer: Scorer
    described: list[dict[str, Any]]
    model_id: str
    measure: Callable[[Any], dict[str, Any]] | None
    measure_edit: Callable[[Edit], dict[str, Any]] | None
    records: list[EditRecord] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)

    def compute(self, batch: list[Request], state: Any) -> _Computed:
        start = time.perf_counter()
        try:
            edit = self.method.compute(self.model, self.task, batch, self.config,
                                       model_id=self.model_id, state=state)  # fmt: skip
        except AlreadyAnswered as e:
            return None, time.perf_counter() - start, str(e)
        return edit, time.perf_counter() - start, None

    def compute_together(self, requests: Sequence[Request]) -> dict[int, _Computed]:
        """Independent single edits with ``compute_many``: their target optimisations share
        forward passes, and each step's seconds are its share of the whole computation."""
        if self.method.compute_many is None or len(requests) < 2:
            return {}
        start = time.perf_counter()
        many = self.method.compute_many(self.model, self.task, list(requests), self.config,
                                        model_id=self.model_id)  # fmt: skip
        share = (time.perf_counter() - start) / len(requests)
        ready: dict[int, _Computed] = {}
        for i, result in enumerate(many):
            failed = isinstance(result, AlreadyAnswered)
            ready[i] = (None if failed else result, share, str(result) if failed else None)
        return ready

    def record(self, step: int, batch: list[Request], edit: Edit | None, seconds: float,
               skipped: str | None, scored: list[Request]) -> None:  # fmt: skip
        """Score the model as it stands (``edit`` applied) after ``step``'s ``batch``;
        ``scored``: every request whose edit is applied (sequential: all so far)."""
        batch_mode = self.protocol == "batch"
        rows = [self.described[i] for i in (range(len(self.described)) if batch_mode else [step])]
        head: dict[str, Any] = {"protocol": self.protocol, "method": self.method.name,
                                "config": self.config.to_dict(), "step": step,
                                "seconds": seconds, "requests": rows}  # fmt: skip
        if skipped is not None:
            self.records.append(EditRecord(**head, skipped=skipped))
            return
        model, scorer = self.model, self.scorer
        eff = scorer.efficacy(model, batch)
        retained = None
        if scored is not batch:  # sequential: do the earlier edits still hold?
            held = scorer.efficacy(model, scored)
            retained = sum(e.success for e in held) / len(held)
        collateral = scorer.collateral(model, scored)
        near = scorer.neighbourhood(model, batch)
        measures: dict[str, Any] | None = None
        if self.measure is not None or self.measure_edit is not None:
            measures = {
                **(self.measure(model) if self.measure is not None else {}),
                **(self.measure_edit(edit) if self.measure_edit and edit is not None else {}),
            }
        self.records.append(
            EditRecord(
                **head,
                efficacy=sum(e.success for e in eff) / len(eff),
                efficacy_detail=tuple(eff),
                retained=retained,
                accuracy=collateral.accuracy,
                accuracy_change=collateral.accuracy_change,
                neighbourhood=near,
                n_edits_applied=len(self.edits),
                edits_before=len(self.edits) - 1 if self.protocol == "sequential" else 0,
                measures=measures,
            )
        )


def _methods() -> dict[str, Method]:
    from kgshatter.editing import METHODS

    return METHODS


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)
