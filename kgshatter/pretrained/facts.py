"""Naturalistic knowledge in pretrained models: cyclic orders (months, days) and a tree
(city -> country), with the synthetic study's measurements (the paper's naturalistic study).

A :class:`FactTask` holds queries ``prompt.format(subject) -> answer`` over a fixed set of
candidate answers. It builds counterfactual text requests
(:class:`~kgshatter.editing.requests.TextRequest`), scores accuracy (the answer among the
candidates, read from each candidate's first token), edit success, and the subjects'
representations at any :class:`~kgshatter.sites.Site`, so R(D*) and the ring metrics of
:mod:`kgshatter.analysis` apply unchanged.

- :func:`cyclic_task` (``"months"``, ``"days"``), in one of two phrasings: ``"hop"`` (the
  paper's questions), "January is followed 8 months later by" -> "September" for every item and
  hop 1..n-1; ``"list"``, the next item in a written list, "The months in order: January," ->
  "February", in four wordings (what a small model such as SmolLM2-135M answers: it gets 12 of
  12 months in list form and 1 of 12 hop questions). A counterfactual at distance d moves the
  answer d steps along the ring (paper: d = 1..3).
- :func:`city_country_task`: the paper's preliminary tree case, "Paris is a city in the country
  of" -> "France"; a counterfactual moves the city to another country.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from jaxtyping import Float

from kgshatter.editing.core import Prompts, last_logits
from kgshatter.pretrained.text import TextRequest, continuation_tokens, encode_prompts
from kgshatter.sites import Site
from kgshatter.validation import check_choice, check_int

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
CYCLES = {"months": (MONTHS, "month"), "days": (DAYS, "day")}
PHRASINGS = ("hop", "list")
# the "list" phrasing: the next item of a written list, in four wordings; the first is the one
# edited, the others are its paraphrases (SmolLM2-135M: 12/12, 12/12, 12/12, 12/12 months and
# 6/7 days in each; docs/pretrained.md)
LIST_WORDINGS = {
    "months": (
        "The months in order: {},",
        "Months of the year: {},",
        "Here are the months: {},",
        "Months in sequence: {},",
    ),
    "days": (
        "The days in order: {},",
        "Days of the week: {},",
        "Here are the days: {},",
        "Days in sequence: {},",
    ),
}
# contexts in which a subject's representation is read (at its last token): the subject's
# state depends only on the text before it, so the contexts vary what precedes it (*choice*).
# Never the bare subject: a model's first position carries the attention sink's massive
# activations from its middle layers on (SmolLM2-135M: norm ~5,300 from layer 11, against tens
# elsewhere), which swamp the months ring in every layer after (neighbour agreement 0.17 with the
# bare context among the contexts, 1.00 without it; docs/smollm2/README.md)
CONTEXTS = {
    "months": ("In {}", "The month of {}", "It happened in {}", "Next {}"),
    "days": ("On {}", "The day is {}", "It happened on {}", "Next {}"),
    "cities": ("In {}", "The city of {}", "I live in {}", "We flew to {}"),
}
# the tree case: 5 countries x 4 cities (only well-known names, one token or a few)
CITIES = {
    "France": ("Paris", "Lyon", "Marseille", "Toulouse"),
    "Italy": ("Rome", "Milan", "Naples", "Turin"),
    "Germany": ("Berlin", "Munich", "Hamburg", "Cologne"),
    "Spain": ("Madrid", "Barcelona", "Seville", "Valencia"),
    "Japan": ("Tokyo", "Osaka", "Kyoto", "Nagoya"),
}


@dataclass(frozen=True)
class Query:
    subject: str
    prompt: str  # with "{}" for the subject
    answer: str
    hop: int = 0  # cyclic tasks: steps along the ring; 0 for the tree


SCORINGS = ("auto", "first-token", "sequence")


class FactTask:
    """Queries over subjects with answers among ``candidates``, measured the synthetic way.

    ``tokenizer`` is the model's. On construction every candidate's tokens (after a query
    prompt) are computed. ``scoring`` says how a query's answer is read:

    - ``"first-token"``: the candidate whose first token the next-token distribution ranks
      first (one forward pass per query; candidates must start with distinct tokens, else the
      tokenizer is refused);
    - ``"sequence"``: the candidate whose whole token sequence is most probable (the sum of
      its tokens' log-probabilities, teacher-forced; one row per query and candidate), so
      candidates may share their first tokens ("New Zealand", "New York");
    - ``"auto"`` (default): first-token when the first tokens are distinct, else sequence.
    """

    def __init__(
        self,
        name: str,
        subjects: Sequence[str],
        queries: Sequence[Query],
        candidates: Sequence[str],
        tokenizer: Any,
        contexts: Sequence[str],
        positions: np.ndarray | None = None,
        scoring: str = "auto",
    ) -> None:
        check_choice("scoring", scoring, SCORINGS)
        self.name = name
        self.subjects = tuple(subjects)
        self.queries = tuple(queries)
        self.candidates = tuple(candidates)
        self.tokenizer = tokenizer
        self.contexts = tuple(contexts)
        # ring position of each subject (cyclic tasks) for the ring metrics
        self.positions = positions
        probe = self.queries[0].prompt.format(self.subjects[0])
        self.candidate_tokens = [
            tuple(continuation_tokens(tokenizer, probe, c)) for c in self.candidates
        ]
        self.first_tokens = [t[0] for t in self.candidate_tokens]
        seen: dict[int, str] = {}
        clash = None
        for c, t in zip(self.candidates, self.first_tokens, strict=True):
            if t in seen and clash is None:
                clash = (seen[t], c, t)
            seen[t] = c
        if clash is not None and scoring == "first-token":
            a, b, t = clash
            raise ValueError(
                f"the tokenizer does not separate {a!r} and {b!r} (both start with token {t}: "
                f"{tokenizer.convert_ids_to_tokens(t)!r}); first-token scoring of the {name} "
                f"task needs every candidate to start with its own token (use "
                f"scoring='sequence')"
            )
        if len(set(self.candidate_tokens)) < len(self.candidates):
            raise ValueError(
                f"the tokenizer gives two {name} candidates the same tokens; they cannot be "
                f"told apart"
            )
        self.scoring = (
            ("first-token" if clash is None else "sequence") if scoring == "auto" else scoring
        )
        for s in self.subjects:
            if "{" in s or "}" in s:
                raise ValueError(f"subject {s!r} may not contain braces")

    @property
    def n(self) -> int:
        return len(self.subjects)

    def candidate_index(self, answer: str) -> int:
        return self.candidates.index(answer)

    # -- requests --------------------------------------------------------------------------
    def request(self, query: Query, target: str) -> TextRequest:
        request = TextRequest(query.prompt, query.subject, target, old=query.answer)
        self.check_request(request)
        if target == query.answer:
            raise ValueError(
                f"{target!r} is already the answer to {query.prompt.format(query.subject)!r}"
            )
        return request

    def counterfactuals(
        self,
        n: int,
        seed: int,
        distance: int | None = None,
        among: Collection[Query] | None = None,
    ) -> list[TextRequest]:
        """``n`` distinct counterfactual requests (seeded), drawn from ``among`` when given;
        see the subclass for ``distance``."""
        raise NotImplementedError

    def _pool(
        self,
        prompts: Collection[str] | None,
        among: Collection[Query] | None,
        n: int,
        per_fact: int = 1,
    ) -> list[Query]:
        """The queries a counterfactual may rewrite: in ``prompts`` (all if None), in ``among``
        (all if None); enough of them for ``n`` requests at ``per_fact`` requests per query,
        else one line saying how many there are."""
        check_int("n", n, 1)
        pool = [q for q in self.queries if prompts is None or q.prompt in prompts]
        if among is not None:
            allowed = set(among)
            pool = [q for q in pool if q in allowed]
        if n > per_fact * len(pool):
            raise ValueError(
                f"n = {n} {self.name} counterfactuals asked for, but only {per_fact * len(pool)} "
                f"can be made from the {len(pool)} facts that can be edited"
                + (" among the ones given (e.g. those the model answers right)"
                   if among is not None else "")
            )  # fmt: skip
        return pool

    def distance(self, request: TextRequest) -> int | None:
        """How far the request moves its answer (a ring's cyclic distance; ``None``: the
        structure has no distance)."""
        return None

    def check_request(self, request: TextRequest) -> None:
        """Refuse a request that is not a fact of this task with a candidate target."""
        if not isinstance(request, TextRequest):
            raise ValueError(f"the {self.name} task edits TextRequests, got {request!r}")
        if request.target not in self.candidates:
            raise ValueError(
                f"target {request.target!r} is not a candidate of {self.name}: {self.candidates}"
            )
        if request.subject not in self.subjects:
            raise ValueError(f"{request.subject!r} is not a subject of {self.name}")

    # -- measurements ----------------------------------------------------------------------
    def encode_queries(self, queries: Sequence[Query]) -> Prompts:
        return encode_prompts(self.tokenizer, [("", q.prompt, q.subject) for q in queries])

    @torch.inference_mode()
    def predictions(
        self,
        model: TransformerBridge,
        queries: Sequence[Query] | None = None,
        fwd_hooks: Sequence[tuple[str, Any]] = (),
        batch_size: int = 64,
    ) -> list[str]:
        """The candidate each query ranks first (see :attr:`scoring`)."""
        queries = self.queries if queries is None else queries
        scores = self.candidate_scores(model, queries, fwd_hooks, batch_size)
        return [self.candidates[j] for j in scores.argmax(-1).tolist()]

    @torch.inference_mode()
    def candidate_scores(
        self,
        model: TransformerBridge,
        queries: Sequence[Query],
        fwd_hooks: Sequence[tuple[str, Any]] = (),
        batch_size: int = 64,
    ) -> Float[torch.Tensor, "query candidate"]:
        """Each candidate's score after each query (see :attr:`scoring`): its first token's
        logit, or its whole sequence's log-probability; a softmax over a row gives the
        candidates' probabilities."""
        if self.scoring == "sequence":
            return self.sequence_logprobs(model, queries, fwd_hooks, batch_size)
        parts = []
        ids = torch.tensor(self.first_tokens)
        for i in range(0, len(queries), batch_size):
            chunk = queries[i : i + batch_size]
            logits = last_logits(model, self.encode_queries(chunk), fwd_hooks).float().cpu()
            parts.append(logits[:, ids])
        return torch.cat(parts) if parts else torch.empty(0, len(self.candidates))

    @torch.inference_mode()
    def sequence_logprobs(
        self,
        model: TransformerBridge,
        queries: Sequence[Query],
        fwd_hooks: Sequence[tuple[str, Any]] = (),
        batch_size: int = 64,
    ) -> Float[torch.Tensor, "query candidate"]:
        """log p(candidate's tokens | query) for every query and candidate (teacher-forced,
        summed over the candidate's tokens; ``batch_size`` rows per forward pass)."""
        device = next(model.parameters()).device
        rows = []  # (prompt continued by the candidate, candidate tokens)
        for q in queries:
            prompt = self.encode_queries([q])
            for tokens in self.candidate_tokens:
                rows.append((prompt.followed_by(tokens[:-1]), tokens))
        out = torch.empty(len(rows))
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            batch = Prompts.cat([p for p, _ in chunk])
            width = max(len(t) for _, t in chunk)
            at = batch.answer_positions(width).clamp(max=batch.tokens.shape[1] - 1).to(device)
            target = torch.tensor([list(t) + [0] * (width - len(t)) for _, t in chunk])
            mask = torch.tensor([[j < len(t) for j in range(width)] for _, t in chunk])
            logits = model.run_with_hooks(batch.tokens.to(device), fwd_hooks=list(fwd_hooks))
            n = torch.arange(len(chunk), device=device)[:, None]
            logp = torch.log_softmax(logits[n, at].float(), -1).cpu()
            picked = logp.gather(-1, target[..., None])[..., 0]
            out[i : i + len(chunk)] = (picked * mask).sum(1)
        return out.view(len(queries), len(self.candidates))

    def accuracy(
        self,
        model: TransformerBridge,
        fwd_hooks: Sequence[tuple[str, Any]] = (),
        exclude: Sequence[TextRequest] = (),
    ) -> float:
        """Fraction of queries answered right among the candidates (the edited facts excluded,
        in every wording the task asks them)."""
        skip = {self.fact_key(r.prompt, r.subject) for r in exclude}
        queries = [q for q in self.queries if self.fact_key(q.prompt, q.subject) not in skip]
        preds = self.predictions(model, queries, fwd_hooks)
        return float(np.mean([p == q.answer for p, q in zip(preds, queries, strict=True)]))

    def fact_key(self, prompt: str, subject: str) -> tuple[str, Any]:
        """What identifies a fact across its wordings (here: the prompt and the subject)."""
        return (subject, prompt)

    # -- the editing papers' metrics (CounterFact) ------------------------------------------
    def paraphrases(self, request: TextRequest) -> list[Query]:
        """Other wordings of the edited fact (their answer: the fact's original one)."""
        raise NotImplementedError

    def neighbourhood(self, request: TextRequest) -> list[Query]:
        """Facts the edit must leave alone: the same question about other subjects."""
        return [
            q for q in self.queries if q.prompt == request.prompt and q.subject != request.subject
        ]

    def generation_prompts(self, request: TextRequest) -> list[str]:
        """Texts about the subject whose continuations measure fluency."""
        return [c.format(request.subject) for c in self.contexts[:3]]

    def counterfact(
        self,
        model: TransformerBridge,
        request: TextRequest,
        fwd_hooks: Sequence[tuple[str, Any]] = (),
    ) -> dict[str, float]:
        """``paraphrase``: :meth:`paraphrase_success`; ``neighbourhood``:
        :meth:`neighbourhood_accuracy`."""
        return {
            "paraphrase": self.paraphrase_success(model, request, fwd_hooks),
            "neighbourhood": self.neighbourhood_accuracy(model, request, fwd_hooks),
        }

    def paraphrase_success(
        self,
        model: TransformerBridge,
        request: TextRequest,
        fwd_hooks: Sequence[tuple[str, Any]] = (),
    ) -> float:
        """The fraction of :meth:`paraphrases` now answered with the request's target."""
        hits = self.predictions(model, self.paraphrases(request), fwd_hooks)
        return float(np.mean([p == request.target for p in hits]))

    def neighbourhood_accuracy(
        self,
        model: TransformerBridge,
        request: TextRequest,
        fwd_hooks: Sequence[tuple[str, Any]] = (),
    ) -> float:
        """The fraction of :meth:`neighbourhood` facts answered right among the candidates,
        like :meth:`accuracy` (NaN when the request has no neighbours)."""
        near = self.neighbourhood(request)
        if not near:
            return float("nan")
        kept = self.predictions(model, near, fwd_hooks)
        return float(np.mean([p == q.answer for p, q in zip(kept, near, strict=True)]))

    def success(
        self,
        model: TransformerBridge,
        request: TextRequest,
        fwd_hooks: Sequence[tuple[str, Any]] = (),
    ) -> bool:
        """Whether the model now ranks the request's target first among the candidates."""
        query = Query(request.subject, request.prompt, request.target)
        return self.predictions(model, [query], fwd_hooks)[0] == request.target

    @torch.inference_mode()
    def representations(
        self,
        model: TransformerBridge,
        sites: Sequence[Site],
        fwd_hooks: Sequence[tuple[str, Any]] = (),
    ) -> dict[Site, Float[torch.Tensor, "subject d"]]:
        """Each subject's state at its last token, averaged over :attr:`contexts` (float32)."""
        sites = [s.check(model.cfg.n_layers) for s in sites]
        names = {s.hook_name for s in sites}
        queries = [Query(s, c, "") for s in self.subjects for c in self.contexts]
        prompts = self.encode_queries(queries)
        device = next(model.parameters()).device
        store: dict[str, torch.Tensor] = {}
        rows = torch.arange(len(prompts), device=device)
        idx = prompts.subject.to(device)

        def reader(activation: torch.Tensor, hook: Any) -> None:
            store[hook.name] = activation[rows, idx].float().cpu()

        hooks = [*fwd_hooks, *[(n, reader) for n in names]]
        model.run_with_hooks(prompts.tokens.to(device), fwd_hooks=cast(list[Any], hooks))
        canonical = {n: str(model.hook_dict[n].name) for n in names}
        k = len(self.contexts)
        return {s: store[canonical[s.hook_name]].reshape(self.n, k, -1).mean(1) for s in sites}


class CyclicTask(FactTask):
    """Months or days of the week on their ring.

    ``phrasing="hop"``: one query per item and hop 1..n-1 ("{} is followed 8 months later
    by"); ``"list"``: the next item (hop 1) in each of :data:`LIST_WORDINGS`' wordings, the
    first of which is the one edited.
    """

    def __init__(
        self,
        name: str,
        items: Sequence[str],
        unit: str,
        tokenizer: Any,
        scoring: str = "auto",
        phrasing: str = "hop",
    ) -> None:
        check_choice("phrasing", phrasing, PHRASINGS)
        if phrasing == "list" and name not in LIST_WORDINGS:
            raise ValueError(
                f"the list phrasing has wordings for {sorted(LIST_WORDINGS)}, not {name!r}"
            )
        n = len(items)
        self.phrasing = phrasing
        self.unit = unit
        if phrasing == "hop":
            self.hop_of = {_hop_prompt(k, unit): k for k in range(1, n)}
            self.edit_prompts: tuple[str, ...] = tuple(self.hop_of)
        else:
            self.hop_of = dict.fromkeys(LIST_WORDINGS[name], 1)
            self.edit_prompts = LIST_WORDINGS[name][:1]
        queries = [
            Query(items[i], prompt, items[(i + k) % n], hop=k)
            for prompt, k in self.hop_of.items()
            for i in range(n)
        ]
        super().__init__(
            name,
            items,
            queries,
            items,
            tokenizer,
            CONTEXTS[name],
            positions=np.arange(n),
            scoring=scoring,
        )

    def counterfactuals(
        self,
        n: int,
        seed: int,
        distance: int | None = None,
        among: Collection[Query] | None = None,
    ) -> list[TextRequest]:
        """``n`` distinct requests (asked in an edited prompt) whose answer moves ``distance``
        steps; ``distance`` must lie in 1..n_items-1. Distinct facts first, each in a seeded
        direction; beyond one request per fact, the same facts moved the other way (so up to
        twice as many requests as facts, once at half the ring). ``among``: draw only from these
        queries (e.g. the ones the model answers right, :attr:`FactScorer.known`).
        """
        if distance is None:
            raise ValueError(f"{self.name} counterfactuals need a distance in 1..{self.n - 1}")
        check_int("distance", distance, 1, self.n - 1)
        # two directions per fact, one at half the ring
        pool = self._pool(self.edit_prompts, among, n, 1 if 2 * distance == self.n else 2)
        g = np.random.default_rng(seed)
        picks = []
        for i in g.permutation(len(pool))[:n]:
            picks.append((pool[i], 1 if g.random() < 0.5 else -1))
        picks += [(q, -sign) for q, sign in picks[: n - len(picks)]]
        out = []
        for q, sign in picks:
            target = self.subjects[(self.subjects.index(q.answer) + sign * distance) % self.n]
            out.append(self.request(q, target))
        return out

    def distance(self, request: TextRequest) -> int | None:
        """Steps between the old answer and the target on the ring (``None`` if no old one)."""
        if request.old is None or request.old not in self.subjects:
            return None
        diff = abs(self.subjects.index(request.target) - self.subjects.index(request.old))
        return min(diff, self.n - diff)

    def fact_key(self, prompt: str, subject: str) -> tuple[str, int]:
        """One fact, whatever its wording: (subject, hop)."""
        if prompt not in self.hop_of:
            raise ValueError(f"{prompt!r} is not one of the {self.name} task's prompts")
        return (subject, self.hop_of[prompt])

    def query(self, subject: str, hop: int) -> Query:
        i = self.subjects.index(subject)
        if self.phrasing == "list":
            if hop != 1:
                raise ValueError(
                    f"the list phrasing asks for the next item only (hop 1), not {hop}"
                )
            prompt = self.edit_prompts[0]
        else:
            prompt = _hop_prompt(hop, self.unit)
        return Query(subject, prompt, self.subjects[(i + hop) % self.n], hop)

    def paraphrases(self, request: TextRequest) -> list[Query]:
        """The fact asked another way: hop phrasing "8 months after {} comes", "Counting 8
        months on from {}, one reaches"; list phrasing, the other wordings of the list."""
        if request.prompt not in self.hop_of:
            raise ValueError(f"{request.prompt!r} is not one of the {self.name} task's prompts")
        k = self.hop_of[request.prompt]
        answer = self.query(request.subject, k).answer
        if self.phrasing == "list":
            return [
                Query(request.subject, w, answer, 1) for w in self.hop_of if w != request.prompt
            ]
        units = f"{self.unit}{'' if k == 1 else 's'}"
        return [
            Query(request.subject, f"{k} {units} after {{}} comes", answer, k),
            Query(request.subject, f"Counting {k} {units} on from {{}}, one reaches", answer, k),
        ]


class TreeTask(FactTask):
    """Subjects grouped under parents (city -> country): a tree, not a ring."""

    def __init__(
        self,
        name: str,
        groups: Mapping[str, Sequence[str]],
        prompt: str,
        tokenizer: Any,
        scoring: str = "auto",
    ) -> None:
        subjects = [s for members in groups.values() for s in members]
        parent = {s: p for p, members in groups.items() for s in members}
        queries = [Query(s, prompt, parent[s]) for s in subjects]
        super().__init__(
            name, subjects, queries, list(groups), tokenizer, CONTEXTS[name], scoring=scoring
        )
        self.parent = parent

    def paraphrases(self, request: TextRequest) -> list[Query]:
        """The parent asked another way ("The city of {} is located in the country of")."""
        answer = self.parent[request.subject]
        return [
            Query(request.subject, "The city of {} is located in the country of", answer),
            Query(request.subject, "{} lies in the country of", answer),
        ]

    def neighbourhood(self, request: TextRequest) -> list[Query]:
        """The other children of the subject's parent (CounterFact's neighbourhood: subjects
        that share the edited fact's original answer)."""
        parent = self.parent[request.subject]
        return [
            q
            for q in self.queries
            if q.prompt == request.prompt
            and q.subject != request.subject
            and self.parent[q.subject] == parent
        ]

    def counterfactuals(
        self,
        n: int,
        seed: int,
        distance: int | None = None,
        among: Collection[Query] | None = None,
    ) -> list[TextRequest]:
        """``n`` cities moved to another country (seeded; from ``among`` when given); a tree
        has no distance."""
        if distance is not None:
            raise ValueError(f"{self.name} requests have no distance; pass distance=None")
        pool = self._pool(None, among, n)
        g = np.random.default_rng(seed)
        out = []
        for i in g.permutation(len(pool))[:n]:
            q = pool[i]
            others = [c for c in self.candidates if c != q.answer]
            out.append(self.request(q, others[int(g.integers(len(others)))]))
        return out


class FactScorer:
    """:class:`~kgshatter.editing.protocols.EditScorer`'s counterpart for a :class:`FactTask`
    (the :class:`~kgshatter.editing.protocols.Scorer` that :func:`run_protocol` takes for a
    pretrained model).

    - efficacy per request: ``success`` (the task's candidates rank the target first after the
      request's prompt), ``prompt_fraction`` (CounterFact's paraphrase: the fraction of
      :meth:`FactTask.paraphrases` now answered with the target) and ``target_prob`` (the
      target's probability among the candidates);
    - :attr:`known`: the queries the unedited model answers right, :attr:`baseline` their
      fraction;
    - collateral: the accuracy over the task's queries, the edited facts left out, under
      ``direct`` / ``all``, against the unedited model's accuracy over every query (measured
      here, once);
    - neighbourhood: :meth:`FactTask.neighbourhood_accuracy` now (``accuracy``), before any edit
      (``before``, recorded by :meth:`prepare`) and the ``change``, averaged over requests.
    """

    def __init__(self, task: FactTask, model: TransformerBridge) -> None:
        self.task = task
        preds = task.predictions(model)
        # the queries the unedited model answers right (counterfactuals are drawn from them)
        self.known = tuple(q for p, q in zip(preds, task.queries, strict=True) if p == q.answer)
        self.baseline = len(self.known) / len(task.queries)
        self._near_before: dict[tuple[str, str], float] = {}

    def describe(self, requests: Sequence[TextRequest]) -> list[dict[str, Any]]:
        for r in requests:
            self.task.check_request(r)
        return [
            {**r.to_dict(), "fact": r.describe(), "old_target": r.old,
             "distance": self.task.distance(r)}
            for r in requests
        ]  # fmt: skip

    def prepare(self, model: TransformerBridge, requests: Sequence[TextRequest]) -> None:
        for r in requests:
            key = (r.prompt, r.subject)
            if key not in self._near_before:
                self._near_before[key] = self.task.neighbourhood_accuracy(model, r)

    def efficacy(self, model: TransformerBridge, requests: Sequence[TextRequest]) -> list[Any]:
        from kgshatter.editing.protocols import Efficacy

        out = []
        for r in requests:
            asked = Query(r.subject, r.prompt, r.target)
            probs = torch.softmax(self.task.candidate_scores(model, [asked])[0], -1)
            target = self.task.candidate_index(r.target)
            out.append(
                Efficacy(
                    success=float(int(probs.argmax()) == target),
                    prompt_fraction=self.task.paraphrase_success(model, r),
                    target_prob=float(probs[target]),
                )
            )
        return out

    def collateral(self, model: TransformerBridge, requests: Sequence[TextRequest] = ()) -> Any:
        from kgshatter.editing.protocols import Collateral

        accuracy = self.task.accuracy(model, exclude=requests)
        return Collateral(
            {"direct": {"all": accuracy}}, {"direct": {"all": accuracy - self.baseline}}
        )

    def neighbourhood(
        self, model: TransformerBridge, requests: Sequence[TextRequest]
    ) -> dict[str, float] | None:
        now, before = [], []
        for r in requests:
            key = (r.prompt, r.subject)
            if key not in self._near_before:
                raise ValueError(
                    "FactScorer.neighbourhood needs prepare(model, requests) on the unedited "
                    "model first"
                )
            now.append(self.task.neighbourhood_accuracy(model, r))
            before.append(self._near_before[key])
        accuracy, base = _nanmean(now), _nanmean(before)
        return {"accuracy": accuracy, "before": base, "change": accuracy - base}


def _nanmean(values: Sequence[float]) -> float:
    """The mean of the values that are not NaN (NaN, without a warning, if none is)."""
    kept = [v for v in values if not np.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


def cyclic_task(
    name: str, tokenizer: Any, scoring: str = "auto", phrasing: str = "hop"
) -> CyclicTask:
    """``"months"`` or ``"days"`` for ``tokenizer``'s model (``scoring``: see FactTask;
    ``phrasing``: ``"hop"`` or ``"list"``, see CyclicTask)."""
    if name not in CYCLES:
        raise ValueError(f"cyclic task must be one of {sorted(CYCLES)}, got {name!r}")
    items, unit = CYCLES[name]
    return CyclicTask(name, items, unit, tokenizer, scoring, phrasing)


def city_country_task(tokenizer: Any, scoring: str = "auto") -> TreeTask:
    return TreeTask("cities", CITIES, "{} is a city in the country of", tokenizer, scoring)


def natural_task(
    name: str, tokenizer: Any, scoring: str = "auto", phrasing: str = "hop"
) -> FactTask:
    """``"months"``, ``"days"`` (in ``phrasing``) or ``"cities"`` (one phrasing: pass
    ``"hop"``)."""
    if name == "cities":
        if phrasing != "hop":
            raise ValueError(f"the cities task has one phrasing; phrasing {phrasing!r} is for "
                             f"the cyclic tasks")  # fmt: skip
        return city_country_task(tokenizer, scoring)
    if name in CYCLES:
        return cyclic_task(name, tokenizer, scoring, phrasing)
    raise ValueError(f"task must be one of {sorted([*CYCLES, 'cities'])}, got {name!r}")


def _hop_prompt(k: int, unit: str) -> str:
    """The query template for ``k`` steps along the ring.

    >>> _hop_prompt(8, "month")
    '{} is followed 8 months later by'
    """
    return f"{{}} is followed {k} {unit}{'' if k == 1 else 's'} later by"
