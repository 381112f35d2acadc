"""Algorithm 1 walks never emit held-out facts, are deterministic, and queries are well formed."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch

from kgshatter.kg import KGConfig, KnowledgeGraph, QuerySet, Vocabulary, WalkConfig, WalkSampler


def parse_steps(row: list[int], n: int):
    """(x, relations, y) for each walk step fully inside the row."""
    ents = [i for i, t in enumerate(row) if t < n]
    for a, c in pairwise(ents):
        yield row[a], [t - n for t in row[a + 1 : c]], row[c]


def assert_walk_valid(g: KnowledgeGraph, tokens: torch.Tensor) -> int:
    n, steps = g.n_entities, 0
    for row in tokens.tolist():
        for x, rels, y in parse_steps(row, n):
            steps += 1
            if len(rels) == 1:
                assert g.trained_facts_mask[rels[0], x], "walk emitted a held-out fact"
                assert g.table[rels[0], x] == y
            else:
                assert len(rels) == 2, f"a step with {len(rels)} relations"
                assert g.trained_compositions_mask[rels[0], rels[1], x], "held-out two-hop query"
                assert g.table[rels[1], g.table[rels[0], x]] == y
    return steps


@pytest.mark.parametrize("across", [False, True])
def test_walks_never_emit_heldout_facts(across):
    # heavy hold-out fractions make any leak likely to show
    g = KnowledgeGraph.from_config(
        KGConfig(
            n_entities=12,
            n_orders=2,
            max_hops=2,
            logical_holdout=0.5,
            compositional_holdout=0.5,
            compose_across_orders=across,
            seed=1,
        )
    )
    sampler = WalkSampler(g, WalkConfig(n_ctx=12, composition_prob=0.5))
    steps = 0
    for step in range(20):
        steps += assert_walk_valid(g, sampler.batch_for_step(step, 128, seed=0))
    assert steps > 10_000
    # two-hop steps really occur
    row = sampler.batch_for_step(0, 128, seed=0)
    rel = (row >= g.n_entities).int()
    assert (rel[:, 1:] & rel[:, :-1]).sum() > 0


def test_batches_are_deterministic_per_seed_and_step(tiny_sampler):
    a = tiny_sampler.batch_for_step(7, 32, seed=0)
    b = tiny_sampler.batch_for_step(7, 32, seed=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, tiny_sampler.batch_for_step(8, 32, seed=0))
    assert not torch.equal(a, tiny_sampler.batch_for_step(7, 32, seed=1))
    assert a.shape == (32, tiny_sampler.config.n_ctx + 1) and a.dtype == torch.long


def test_contexts_lead_into_the_query_subject(tiny_sampler, tiny_graph):
    ends = torch.arange(tiny_graph.n_entities).repeat(4)
    ctx = tiny_sampler.contexts(ends, 9, torch.Generator().manual_seed(0))
    assert torch.equal(ctx[:, -1], ends)
    assert_walk_valid(tiny_graph, ctx)


@pytest.mark.parametrize("split", ["direct", "logical", "compositional"])
def test_query_sets(tiny_sampler, tiny_graph, split):
    qs = QuerySet.build(tiny_sampler, split, n_prefixes=3, seed=0)
    g = tiny_graph
    assert qs.tokens.shape == (qs.n_queries, 3, tiny_sampler.config.n_ctx)
    expected = {
        "direct": int(g.trained_facts_mask.sum()),
        "logical": int(g.logical_heldout.sum()),
        "compositional": int(g.compositional_heldout.sum()),
    }[split]
    assert qs.n_queries == expected
    n = g.n_entities
    for q in range(qs.n_queries):
        row = qs.rows[q]
        tail = qs.tokens[q, :, -(len(row) - 1) :]
        # every prefix ends with the query: subject then relation(s)
        assert (tail[:, 0] == row[0]).all()
        assert (tail[:, 1:] - n == torch.from_numpy(row[1:-1])).all()
        y = row[0]
        for r in row[1:-1]:
            y = g.table[r, y]
        assert y == qs.answers[q] == row[-1]
        # the contexts themselves only use trained facts
        assert_walk_valid(g, qs.tokens[q, :, : -(len(row) - 2)])
    same = QuerySet.build(tiny_sampler, split, n_prefixes=3, seed=0)
    assert torch.equal(same.tokens, qs.tokens)


def test_query_subsampling_is_seeded(tiny_sampler):
    a = QuerySet.build(tiny_sampler, "direct", n_prefixes=1, max_queries=10, seed=0)
    b = QuerySet.build(tiny_sampler, "direct", n_prefixes=1, max_queries=10, seed=0)
    assert a.n_queries == 10 and np.array_equal(a.rows, b.rows)
    with pytest.raises(ValueError, match="unknown split"):
        QuerySet.build(tiny_sampler, "abductive")


def test_vocabulary_round_trip(tiny_graph):
    v = Vocabulary(tiny_graph)
    text = "e03 I_C2 e05 III_A1"
    assert v.decode(v.encode(text)) == text
    assert v.size == 16 + 12
    assert v.token("e00") == 0 and v.token("I_C1") == 16
    with pytest.raises(ValueError, match="unknown relation"):
        v.encode("e01 IV_C1")
    with pytest.raises(ValueError, match="token id must be in"):
        v.name(99)


def test_walk_config_errors():
    with pytest.raises(ValueError, match="composition_prob"):
        WalkConfig(composition_prob=1.0)
    with pytest.raises(ValueError, match="n_ctx"):
        WalkConfig(n_ctx=2)


@pytest.mark.parametrize("structure", ["cyclic", "tree"])
def test_prompts_of_many_facts_in_one_walk_are_each_facts_own(structure):
    """request_prompts_many samples many seeded prompt sets in one loop (each fact with its
    own generator) and gives the bytes of one request_prompts call per fact, on a ring and on
    a tree (whose steps draw an extra number)."""
    from kgshatter.editing.requests import request_prompts, request_prompts_many

    extra = {"branching": 3} if structure == "tree" else {}
    graph = KnowledgeGraph.from_config(
        KGConfig(n_entities=40, n_orders=1, max_hops=2, structure=structure, **extra)
    )
    sampler = WalkSampler(graph, WalkConfig(n_ctx=12, composition_prob=0.5))
    facts = [(x, r) for x in (0, 5, 17, 39) for r in range(graph.n_relations) if r % 2 == 0]
    many = request_prompts_many(sampler, facts, 3, seed=4)
    one_by_one = torch.cat([request_prompts(sampler, x, r, 3, seed=4) for x, r in facts])
    assert torch.equal(many, one_by_one)
    with pytest.raises(ValueError, match="generators need as many sizes"):
        sampler.query_tokens(many[:2, -1], many[:2, -1:] * 0, [torch.Generator()] * 2, [1])
