"""Naturalistic knowledge in pretrained models: cyclic orders (months, days) and a tree
(city -> country), with the synthetic study's measurements (the paper's naturalistic study).

A :class:`FactTask` holds queries ``prompt.format(subject) -> answer`` over a fixed set of
candidate answers. It builds counterfactual :class:`~kgshatter.text.TextRequest`\\ s, scores
accuracy (the answer among the candidates, read from each candidate's first token), edit
success, and the subjects' representations at any :class:`~kgshatter.sites.Site`, so R(D*)
and the ring metrics of :mod:`kgshatter.analysis` apply unchanged.

- :func:`cyclic_task` (``"months"``, ``"days"``): queries "January is followed 8 months later
  by" -> "September" for every item and hop 1..n-1; a counterfactual at distance d moves the
  answer d steps along the ring (paper: d = 1..3).
- :func:`city_country_task`: the paper's preliminary tree case, "Paris is a city in the country
  of" -> "France"; a counterfactual moves the city to another country.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from jaxtyping import Float

from kgshatter.editing.core import Prompts, last_logits
from kgshatter.sites import Site
from kgshatter.text import TextRequest, continuation_tokens, encode_prompts
from kgshatter.validation import check_int

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
# contexts in which a subject's representation is read (at its last token): the subject's
# state depends only on the text before it, so the contexts vary what precedes it (*choice*)
CONTEXTS = {
    "months": ("{}", "In {}", "The month of {}", "It happened in {}", "Next {}"),
    "days": ("{}", "On {}", "The day is {}", "It happened on {}", "Next {}"),
    "cities": ("{}", "In {}", "The city of {}", "I live in {}", "We flew to {}"),
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


class FactTask:
    """Queries over subjects with answers among ``candidates``, measured the synthetic way.

    ``tokenizer`` is the model's. On construction every candidate's first token (after a
    query prompt) is computed; candidates that share a first token cannot be told apart by the
    editors' one-token objective, so such a tokenizer is refused.
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
    ) -> None:
        self.name = name
        self.subjects = tuple(subjects)
        self.queries = tuple(queries)
        self.candidates = tuple(candidates)
        self.tokenizer = tokenizer
        self.contexts = tuple(contexts)
        # ring position of each subject (cyclic tasks) for the ring metrics
        self.positions = positions
        probe = self.queries[0].prompt.format(self.subjects[0])
        self.first_tokens = [continuation_tokens(tokenizer, probe, c)[0] for c in self.candidates]
        seen: dict[int, str] = {}
        for c, t in zip(self.candidates, self.first_tokens, strict=True):
            if t in seen:
                raise ValueError(
                    f"the tokenizer does not separate {seen[t]!r} and {c!r} (both start with "
                    f"token {t}: {tokenizer.convert_ids_to_tokens(t)!r}); the {name} task needs "
                    f"every candidate to start with its own token"
                )
            seen[t] = c
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
        if target not in self.candidates:
            raise ValueError(
                f"target {target!r} is not a candidate of {self.name}: {self.candidates}"
            )
        if target == query.answer:
            raise ValueError(
                f"{target!r} is already the answer to {query.prompt.format(query.subject)!r}"
            )
        return TextRequest(query.prompt, query.subject, target, old=query.answer)

    def counterfactuals(self, n: int, seed: int, distance: int | None = None) -> list[TextRequest]:
        """``n`` distinct counterfactual requests (seeded); see the subclass for ``distance``."""
        raise NotImplementedError

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
        """The candidate each query's next-token distribution ranks first."""
        queries = self.queries if queries is None else queries
        out: list[str] = []
        ids = torch.tensor(self.first_tokens)
        for i in range(0, len(queries), batch_size):
            chunk = queries[i : i + batch_size]
            logits = last_logits(model, self.encode_queries(chunk), fwd_hooks).float().cpu()
            out += [self.candidates[j] for j in logits[:, ids].argmax(-1).tolist()]
        return out

    def accuracy(
        self,
        model: TransformerBridge,
        fwd_hooks: Sequence[tuple[str, Any]] = (),
        exclude: Sequence[TextRequest] = (),
    ) -> float:
        """Fraction of queries answered right among the candidates (the edited facts excluded)."""
        skip = {(r.prompt, r.subject) for r in exclude}
        queries = [q for q in self.queries if (q.prompt, q.subject) not in skip]
        preds = self.predictions(model, queries, fwd_hooks)
        return float(np.mean([p == q.answer for p, q in zip(preds, queries, strict=True)]))

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
        return [c.format(request.subject) for c in self.contexts[1:4]]

    def counterfact(
        self,
        model: TransformerBridge,
        request: TextRequest,
        fwd_hooks: Sequence[tuple[str, Any]] = (),
    ) -> dict[str, float]:
        """``paraphrase``: the fraction of :meth:`paraphrases` now answered with the target;
        ``neighbourhood``: :meth:`neighbourhood_accuracy`."""
        hits = self.predictions(model, self.paraphrases(request), fwd_hooks)
        return {
            "paraphrase": float(np.mean([p == request.target for p in hits])),
            "neighbourhood": self.neighbourhood_accuracy(model, request, fwd_hooks),
        }

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
    """Months or days of the week on their ring; queries for every item and hop 1..n-1."""

    def __init__(self, name: str, items: Sequence[str], unit: str, tokenizer: Any) -> None:
        n = len(items)
        queries = [
            Query(items[i], _hop_prompt(k, unit), items[(i + k) % n], hop=k)
            for k in range(1, n)
            for i in range(n)
        ]
        super().__init__(
            name, items, queries, items, tokenizer, CONTEXTS[name], positions=np.arange(n)
        )
        self.unit = unit

    def counterfactuals(self, n: int, seed: int, distance: int | None = None) -> list[TextRequest]:
        """``n`` distinct (item, hop) facts whose answer moves ``distance`` steps, direction
        seeded; ``distance`` must lie in 1..n_items-1."""
        if distance is None:
            raise ValueError(f"{self.name} counterfactuals need a distance in 1..{self.n - 1}")
        check_int("distance", distance, 1, self.n - 1)
        check_int("n", n, 1, len(self.queries))
        g = np.random.default_rng(seed)
        order = g.permutation(len(self.queries))[:n]
        out = []
        for i in order:
            q = self.queries[i]
            sign = 1 if g.random() < 0.5 else -1
            target = self.subjects[(self.subjects.index(q.answer) + sign * distance) % self.n]
            out.append(self.request(q, target))
        return out

    def query(self, subject: str, hop: int) -> Query:
        i = self.subjects.index(subject)
        return Query(subject, _hop_prompt(hop, self.unit), self.subjects[(i + hop) % self.n], hop)

    def paraphrases(self, request: TextRequest) -> list[Query]:
        """The hop asked another way: "8 months after {} comes", "Counting 8 months on from
        {}, one reaches"."""
        hops = {_hop_prompt(k, self.unit): k for k in range(1, self.n)}
        if request.prompt not in hops:
            raise ValueError(f"{request.prompt!r} is not one of the {self.name} task's prompts")
        k = hops[request.prompt]
        units = f"{self.unit}{'' if k == 1 else 's'}"
        answer = self.query(request.subject, k).answer
        return [
            Query(request.subject, f"{k} {units} after {{}} comes", answer, k),
            Query(request.subject, f"Counting {k} {units} on from {{}}, one reaches", answer, k),
        ]


class TreeTask(FactTask):
    """Subjects grouped under parents (city -> country): a tree, not a ring."""

    def __init__(
        self, name: str, groups: Mapping[str, Sequence[str]], prompt: str, tokenizer: Any
    ) -> None:
        subjects = [s for members in groups.values() for s in members]
        parent = {s: p for p, members in groups.items() for s in members}
        queries = [Query(s, prompt, parent[s]) for s in subjects]
        super().__init__(name, subjects, queries, list(groups), tokenizer, CONTEXTS[name])
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

    def counterfactuals(self, n: int, seed: int, distance: int | None = None) -> list[TextRequest]:
        """``n`` cities moved to another country (seeded); a tree has no distance."""
        if distance is not None:
            raise ValueError(f"{self.name} requests have no distance; pass distance=None")
        check_int("n", n, 1, len(self.queries))
        g = np.random.default_rng(seed)
        out = []
        for i in g.permutation(len(self.queries))[:n]:
            q = self.queries[i]
            others = [c for c in self.candidates if c != q.answer]
            out.append(self.request(q, others[int(g.integers(len(others)))]))
        return out


def cyclic_task(name: str, tokenizer: Any) -> CyclicTask:
    """``"months"`` or ``"days"`` for ``tokenizer``'s model."""
    if name not in CYCLES:
        raise ValueError(f"cyclic task must be one of {sorted(CYCLES)}, got {name!r}")
    items, unit = CYCLES[name]
    return CyclicTask(name, items, unit, tokenizer)


def city_country_task(tokenizer: Any) -> TreeTask:
    return TreeTask("cities", CITIES, "{} is a city in the country of", tokenizer)


def natural_task(name: str, tokenizer: Any) -> FactTask:
    """``"months"``, ``"days"`` or ``"cities"``."""
    if name == "cities":
        return city_country_task(tokenizer)
    if name in CYCLES:
        return cyclic_task(name, tokenizer)
    raise ValueError(f"task must be one of {sorted([*CYCLES, 'cities'])}, got {name!r}")


def _hop_prompt(k: int, unit: str) -> str:
    """The query template for ``k`` steps along the ring.

    >>> _hop_prompt(8, "month")
    '{} is followed 8 months later by'
    """
    return f"{{}} is followed {k} {unit}{'' if k == 1 else 's'} later by"
