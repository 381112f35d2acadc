"""Training walks (the paper's Algorithm 1, reconstructed) and evaluation query sets.

A training sequence is a random walk ``x0 r1 x1 r2 x2 ...`` with ``x_{t+1} = r_{t+1}(x_t)``;
relations from every order mix in one walk. With probability ``composition_prob`` a step is
written as a two-hop composition ``x r1 r2 z`` with the middle entity dropped (our reading of
the paper's "max composition length 2"). Held-out facts and held-out two-hop queries are never
emitted: every step is drawn only from the graph's trained masks. A step of a relation with
several answers (a tree's step down) goes to one of them, drawn uniformly; walks written
backward arrive by a step up from a uniformly drawn child (only graphs with such relations draw
these extra numbers, so every other graph's walks are the bytes they were).

Sequences are sampled on the fly from a generator seeded by ``(seed, step)``, so batch ``s`` is
the same bytes whether a run was interrupted or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Int

from kgshatter.kg.graph import KnowledgeGraph
from kgshatter.validation import ConfigDict, check_fraction, check_int

SPLITS = ("direct", "logical", "compositional")


@dataclass(frozen=True, kw_only=True)
class WalkConfig(ConfigDict):
    """How training sequences and evaluation contexts are written.

    Attributes:
        n_ctx: tokens the model reads (paper: 16).
        composition_prob: probability that a walk step is a two-hop composition *(choice)*.
        crop: sequences are cropped at a random offset of up to 2 tokens from a walk start, so
            they may begin with a relation, as evaluation contexts do *(choice: True)*.
    """

    n_ctx: int = 16
    composition_prob: float = 0.25
    crop: bool = True

    def __post_init__(self) -> None:
        check_int("n_ctx", self.n_ctx, 4)
        check_fraction("composition_prob", self.composition_prob)
        if not isinstance(self.crop, bool):
            raise ValueError(f"crop must be a bool, got {self.crop!r}")


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for (seed, step), independent of everything sampled before."""
    state = np.random.SeedSequence([int(seed), int(step)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state % (2**63)))


class WalkSampler:
    """Samples walks on a :class:`KnowledgeGraph` that never emit a held-out fact."""

    def __init__(self, graph: KnowledgeGraph, config: WalkConfig) -> None:
        self.graph = graph
        self.config = config
        n, nr = graph.n_entities, graph.n_relations
        # [R, N]; -1 where a fact does not exist (a grid's moves off its edge): such entries are
        # never allowed, and clamped to 0 only so that they can index
        table = torch.from_numpy(graph.table.copy())
        safe = table.clamp(min=0)
        trained = torch.from_numpy(graph.trained_facts_mask.copy())  # [R, N]
        comp = torch.from_numpy(graph.trained_compositions_mask.copy())  # [R1, R2, N]
        inverse = torch.from_numpy(graph.inverse_index.copy())
        two = safe[:, safe].permute(1, 0, 2).reshape(nr * nr, n)  # [(r1, r2), x] -> r2(r1(x))
        # forward: from x, relation r is allowed if (x, r) is trained and leads to table[r, x]
        self._fwd1 = (_cumulative(trained.T), safe)
        self._fwd2 = (_cumulative(comp.reshape(nr * nr, n).T), two)
        # backward: arrive at x by (p, r, x) with p = r^-1(x); allowed if (p, r) is trained
        prev1 = table[inverse]  # [R, N]
        allow_b1 = (prev1 >= 0) & torch.gather(trained, 1, prev1.clamp(min=0))
        # p = r1^-1(r2^-1(x)); allowed if (p, r1, r2) is a trained composition
        prev2 = prev1.clamp(min=0)[:, prev1.clamp(min=0)]  # [r1, r2, x] -> r1^-1(r2^-1(x))
        # both steps back exist: r2^-1(x), then r1^-1 of it
        exists2 = (prev1 >= 0)[None, :, :] & (prev1 >= 0)[:, prev1.clamp(min=0)]
        prev2 = prev2.reshape(nr * nr, n)
        allow_b2 = exists2.reshape(nr * nr, n) & torch.gather(
            comp.reshape(nr * nr, n), 1, prev2.clamp(min=0)
        )
        # a tree's one-hop steps with all their answers, forward and backward (else None)
        self._multi: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
        if graph.multi_valued.any():  # a tree: steps with several answers
            multi_inverse = torch.from_numpy(graph.multi_valued[inverse.numpy()].copy())
            # backward two-hop arrivals only where both steps back have one answer
            single2 = ~multi_inverse[:, None, None] & ~multi_inverse[None, :, None]
            allow_b2 = allow_b2 & single2.expand(nr, nr, n).reshape(nr * nr, n)
            fwd, bwd = _choices(graph, trained, backward=False), _choices(graph, trained, True)
            allow_b1 = bwd[1] > 0
            self._multi = (fwd, bwd)
        self._bwd1 = (_cumulative(allow_b1.T), prev1.clamp(min=0))
        self._bwd2 = (_cumulative(allow_b2.T), prev2.clamp(min=0))
        self._n_rel = nr

    # ------------------------------------------------------------------ core walk
    def _walk(
        self,
        start: Int[torch.Tensor, " batch"],
        n_tokens: int,
        generator: torch.Generator | list[torch.Generator],
        backward: bool = False,
        sizes: list[int] | None = None,
    ) -> Int[torch.Tensor, "batch n_tokens"]:
        """Walk from ``start`` until every row has ``n_tokens`` tokens.

        Forward rows read ``x r y r y ...``; backward rows are written away from ``start`` and
        flipped, so they read ``... y r y r x`` and end at ``start``.

        ``generator`` may be a list, one per consecutive group of rows (``sizes`` of them):
        each group's rows are then the bytes a walk of that group alone with its generator
        gives (a group draws its numbers only while one of its rows is unfinished), so many
        seeded prompt sets can be sampled in one loop.
        """
        n = self.graph.n_entities
        (w1, d1), (w2, d2) = (self._bwd1, self._bwd2) if backward else (self._fwd1, self._fwd2)
        b = start.shape[0]
        draw = _Draws(generator, sizes, b)
        buf = torch.zeros(b, n_tokens + 3, dtype=torch.long)
        rows = torch.arange(b)
        buf[:, 0] = start
        pos = torch.ones(b, dtype=torch.long)
        cur = start.clone()
        p = self.config.composition_prob
        while bool((pos < n_tokens).any()):
            groups = draw.unfinished(pos < n_tokens)
            u = draw(groups, 3)
            two = (u[0] < p) & (w2[cur, -1] > 0)
            r1 = _inverse_cdf(w1[cur], u[1])
            pair = _inverse_cdf(w2[cur], u[2])
            one = d1[r1, cur]
            if self._multi is not None:  # one of the step's answers, uniformly (a tree's children)
                choices, counts = self._multi[1 if backward else 0]
                pick = draw(groups, None)
                k = (pick * counts[r1, cur]).long().clamp(max=choices.shape[2] - 1)
                one = choices[r1, cur, k]
            nxt = torch.where(two, d2[pair, cur], one)
            first = torch.where(two, pair // self._n_rel, r1)
            second = pair % self._n_rel
            if backward:  # written reversed: r2 before r1
                first, second = torch.where(two, second, first), torch.where(two, first, second)
            live = pos < n_tokens  # finished rows stop growing
            two &= live
            buf[rows[live], pos[live]] = n + first[live]
            buf[rows[two], pos[two] + 1] = n + second[two]
            step = 1 + two.long()
            buf[rows[live], (pos + step)[live]] = nxt[live]
            pos = torch.where(live, pos + step + 1, pos)
            cur = torch.where(live, nxt, cur)
        out = buf[:, :n_tokens]
        return out.flip(1) if backward else out

    # ------------------------------------------------------------------ training batches
    def batch(
        self, batch_size: int, generator: torch.Generator
    ) -> Int[torch.Tensor, "batch n_ctx_plus_1"]:
        """``batch_size`` sequences of ``n_ctx + 1`` tokens (inputs are ``[:, :-1]``)."""
        check_int("batch_size", batch_size, 1)
        length = self.config.n_ctx + 1
        start = torch.randint(self.graph.n_entities, (batch_size,), generator=generator)
        walks = self._walk(start, length + 2, generator)
        if not self.config.crop:
            return walks[:, :length]
        offset = torch.randint(3, (batch_size,), generator=generator)
        idx = offset[:, None] + torch.arange(length)[None, :]
        return torch.gather(walks, 1, idx)

    def batch_for_step(
        self, step: int, batch_size: int, seed: int
    ) -> Int[torch.Tensor, "batch seq"]:
        return self.batch(batch_size, step_generator(seed, step))

    def contexts(
        self,
        ends: Int[torch.Tensor, " n"],
        length: int,
        generator: torch.Generator | list[torch.Generator],
        sizes: list[int] | None = None,
    ) -> Int[torch.Tensor, "n length"]:
        """Random walk contexts of ``length`` tokens whose last token is ``ends`` (an entity);
        several generators: see :meth:`_walk`."""
        return self._walk(ends, length, generator, backward=True, sizes=sizes)

    def query_tokens(
        self,
        subjects: Int[torch.Tensor, " n"],
        relations: Int[torch.Tensor, "n hops"],
        generator: torch.Generator | list[torch.Generator],
        sizes: list[int] | None = None,
    ) -> Int[torch.Tensor, "n n_ctx"]:
        """Full-length queries: a context leading into each subject, then its relation(s).

        ``relations`` are relation indices (one column for ``x r``, two for ``x r1 r2``).
        ``generator`` a list: one per consecutive group of ``sizes`` rows, each group's rows
        the bytes its own call would give.
        """
        n_ctx = self.config.n_ctx - relations.shape[1]
        ctx = self.contexts(subjects, n_ctx, generator, sizes)
        return torch.cat([ctx, relations + self.graph.n_entities], dim=1)


def _choices(
    graph: KnowledgeGraph, trained: torch.Tensor, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hop steps with every answer: ``choices[r, x, k]`` the k-th entity a step ``r`` may
    lead to from ``x`` (forward: the answers of the trained fact ``(x, r)``; backward: the
    entities ``p`` with ``x`` an answer of the trained fact ``(p, r)``), padded with the first,
    and ``counts[r, x]`` how many there are (0: none)."""
    n, nr = graph.n_entities, graph.n_relations
    lists: list[list[np.ndarray]] = []
    for r in graph.relations:
        row = []
        for x in range(n):
            if backward:  # p with x among r(p): the answers of the inverse fact, trained ones
                ps = graph.answers(int(graph.inverse_index[r.index]), x)
                row.append(ps[trained[r.index, torch.from_numpy(ps)].numpy()] if ps.size else ps)
            else:
                row.append(graph.answers(r.index, x) if trained[r.index, x] else np.array([]))
        lists.append(row)
    width = max(1, max(len(a) for row in lists for a in row))
    choices = torch.zeros(nr, n, width, dtype=torch.long)
    counts = torch.zeros(nr, n, dtype=torch.float64)
    for ri, row in enumerate(lists):
        for x, a in enumerate(row):
            if len(a):
                padded = np.concatenate([a, np.full(width - len(a), a[0])])
                choices[ri, x] = torch.from_numpy(padded.astype(np.int64))
                counts[ri, x] = len(a)
    return choices, counts


def _cumulative(allowed: torch.Tensor) -> torch.Tensor:
    """Per row, the running count of allowed choices (float64; last column = row total)."""
    return allowed.double().cumsum(-1).contiguous()


class _Draws:
    """Uniform numbers for :meth:`WalkSampler._walk`: from one generator for every row, or
    from each group's own generator for its rows (drawn in the order each generator would
    see alone: a group's numbers, then its tree pick, per step it takes part in)."""

    def __init__(
        self, generator: torch.Generator | list[torch.Generator], sizes: list[int] | None, b: int
    ) -> None:
        if isinstance(generator, torch.Generator):
            self.generators, self.sizes = [generator], [b]
        else:
            if sizes is None or len(sizes) != len(generator) or sum(sizes) != b:
                raise ValueError(f"{len(generator)} generators need as many sizes summing to {b}")
            self.generators, self.sizes = list(generator), list(sizes)
        self.bounds = np.cumsum([0, *self.sizes]).tolist()
        self.group_of = torch.repeat_interleave(
            torch.arange(len(self.sizes)), torch.tensor(self.sizes, dtype=torch.long)
        )

    def unfinished(self, live: torch.Tensor) -> list[int]:
        """The groups with a row still to walk (every group for a single generator)."""
        if len(self.generators) == 1:
            return [0]
        counts = torch.bincount(self.group_of[live], minlength=len(self.sizes))
        return torch.nonzero(counts).flatten().tolist()

    def __call__(self, groups: list[int], k: int | None) -> torch.Tensor:
        if len(self.generators) == 1:
            shape = (self.sizes[0],) if k is None else (k, self.sizes[0])
            return torch.rand(*shape, generator=self.generators[0], dtype=torch.float64)
        out = torch.zeros((self.bounds[-1],) if k is None else (k, self.bounds[-1]),
                          dtype=torch.float64)  # fmt: skip
        for i in groups:
            lo, hi = self.bounds[i], self.bounds[i + 1]
            shape = (hi - lo,) if k is None else (k, hi - lo)
            out[..., lo:hi] = torch.rand(*shape, generator=self.generators[i], dtype=torch.float64)
        return out


def _inverse_cdf(cum: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One uniform draw per row among its allowed choices (rows with none give index 0)."""
    target = (u * cum[:, -1]).unsqueeze(1)
    idx = torch.searchsorted(cum, target, right=True).squeeze(1)
    return idx.clamp_(max=cum.shape[1] - 1)


# ---------------------------------------------------------------------- evaluation queries
@dataclass(frozen=True)
class QuerySet:
    """Evaluation queries of one split, each written after ``n_prefixes`` random contexts.

    ``tokens[q, k]`` is query ``q`` after context ``k``; the answer is predicted at the last
    position. ``order[q]`` is the order of the query's (first) relation.
    """

    split: str
    tokens: Int[torch.Tensor, "query prefix n_ctx"]
    answers: Int[torch.Tensor, " query"]
    order: Int[torch.Tensor, " query"]
    rows: np.ndarray

    @property
    def n_queries(self) -> int:
        return int(self.answers.shape[0])

    def correct(self, graph: KnowledgeGraph, predictions: torch.Tensor) -> torch.Tensor:
        """[query] bool: whether each predicted token is a right answer. A one-hop query of a
        relation with several answers (a tree's children) accepts any of them
        (:meth:`KnowledgeGraph.accepts`); every other query has one answer, ``answers``."""
        if self.rows.shape[1] != 3 or not graph.multi_valued[self.rows[:, 1]].any():
            return predictions.cpu() == self.answers
        ok = graph.accepts(self.rows[:, 1], self.rows[:, 0], predictions.cpu().numpy())
        return torch.from_numpy(ok)

    @classmethod
    def build(
        cls,
        sampler: WalkSampler,
        split: str,
        n_prefixes: int = 5,
        seed: int = 0,
        max_queries: int | None = None,
        rows: np.ndarray | None = None,
    ) -> QuerySet:
        """Queries for ``split`` (all of them, or a seeded sample of ``max_queries``).

        ``rows`` overrides the split's facts (``(x, r, y)`` or ``(x, r1, r2, y)`` rows).
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {list(SPLITS)}")
        check_int("n_prefixes", n_prefixes, 1)
        graph = sampler.graph
        if rows is None:
            rows = graph.split_facts(split)
        rows = np.asarray(rows, dtype=np.int64)
        g = step_generator(seed, 1 << 20 | SPLITS.index(split))
        if max_queries is not None:
            check_int("max_queries", max_queries, 1)
            if rows.shape[0] > max_queries:
                pick = torch.randperm(rows.shape[0], generator=g)[:max_queries].sort().values
                rows = rows[pick.numpy()]
        q = rows.shape[0]
        tokens = sampler.query_tokens(
            torch.from_numpy(rows[:, 0]).repeat_interleave(n_prefixes),
            torch.from_numpy(rows[:, 1:-1]).repeat_interleave(n_prefixes, 0),  # [Q*K, 1 or 2]
            g,
        )
        order = torch.tensor([graph.relations[int(r)].order for r in rows[:, 1]], dtype=torch.long)
        return cls(
            split=split,
            tokens=tokens.reshape(q, n_prefixes, sampler.config.n_ctx),
            answers=torch.from_numpy(rows[:, -1].copy()),
            order=order,
            rows=rows,
        )
