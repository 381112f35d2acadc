"""Knowledge-graph invariants: bijections, inverse and composition laws, splits, persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kgshatter.kg import KGConfig, KnowledgeGraph

# a case that passes an ill-typed value on purpose (docs/testing.md, "Shapes and types")
ILL_TYPED = pytest.mark.ill_typed


def small_configs():
    return st.builds(
        lambda n, k, h, lh, ch, across, seed: KGConfig(
            n_entities=n,
            n_orders=k,
            max_hops=min(h, (n - 1) // 2),
            logical_holdout=lh,
            compositional_holdout=ch,
            compose_across_orders=across,
            seed=seed,
        ),
        st.integers(5, 40),
        st.integers(1, 4),
        st.integers(1, 4),
        st.sampled_from([0.0, 0.1, 0.3]),
        st.sampled_from([0.0, 0.1, 0.5]),
        st.booleans(),
        st.integers(0, 2**31),
    )


@settings(max_examples=25, deadline=None)
@given(config=small_configs())
def test_relation_laws(config):
    g = KnowledgeGraph.from_config(config)
    n = g.n_entities
    for r in g.relations:
        # every relation is a bijection on the entities
        assert np.array_equal(np.sort(g.table[r.index]), np.arange(n))
        # A_k is the inverse of C_k
        inv = g.inverse(r.index)
        assert np.array_equal(g.table[inv.index][g.table[r.index]], np.arange(n))
        # moving along the ring by the signed shift
        pos = g.positions[r.order]
        assert np.array_equal(pos[g.table[r.index]], (pos + r.shift) % n)
    for a in g.relations:
        for b in g.relations:
            closed = g.closed_form(a.index, b.index)
            if closed is not None:
                assert np.array_equal(g.compose(a.index, b.index), g.table[closed.index])


@settings(max_examples=25, deadline=None)
@given(config=small_configs())
def test_splits_are_disjoint_and_sized(config):
    g = KnowledgeGraph.from_config(config)
    held = g.logical_heldout
    # held-out logical facts are anticlockwise, and their clockwise inverses are trained
    for r, x in zip(*np.nonzero(held), strict=True):
        rel = g.relations[r]
        assert rel.direction < 0
        y = g.table[r, x]
        assert g.trained_facts_mask[g.inverse(rel.index).index, y]
    assert not (g.trained_facts_mask & held).any()
    comp = g.compositional_heldout
    assert not (comp & g.trained_compositions_mask).any()
    # both hops of every held-out two-hop query are trained facts
    for r1, r2, x in zip(*np.nonzero(comp), strict=True):
        assert g.trained_facts_mask[r1, x] and g.trained_facts_mask[r2, g.table[r1, x]]
        if not config.compose_across_orders:
            assert g.relations[r1].order == g.relations[r2].order
    n_anti = config.n_orders * config.max_hops
    assert held.sum() == n_anti * round(config.logical_holdout * config.n_entities)


@settings(max_examples=15, deadline=None)
@given(config=small_configs())
def test_json_round_trip_is_exact(config, tmp_path_factory):
    g = KnowledgeGraph.from_config(config)
    path = tmp_path_factory.mktemp("g") / "graph.json"
    g.save(path)
    h = KnowledgeGraph.load(path)
    assert h == g and h.fingerprint == g.fingerprint
    assert h.to_dict() == g.to_dict()
    assert np.array_equal(h.compositional_heldout, g.compositional_heldout)
    assert path.read_text() == json.dumps(g.to_dict(), indent=1, sort_keys=True) + "\n"


def test_same_seed_same_graph_different_seed_different_graph():
    a = KnowledgeGraph.from_config(KGConfig(n_entities=64, seed=3))
    b = KnowledgeGraph.from_config(KGConfig(n_entities=64, seed=3))
    c = KnowledgeGraph.from_config(KGConfig(n_entities=64, seed=4))
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_names_roles_and_distance(tiny_graph):
    g = tiny_graph
    assert g.relation_names[:4] == ["I_C1", "I_C2", "I_A1", "I_A2"]
    assert g.relation("III_A2").order == 2
    assert [g.role(o) for o in range(3)] == ["edit", "retain", "test"]
    x = g.entity("e03")
    y = g.apply("I_C2", x)
    assert g.apply("I_A2", y) == x
    assert g.edit_distance("I_C1", y, g.apply("I_C1", y)) == 1
    assert g.edit_distance("I_C1", y, g.apply("I_A2", y)) == 2
    # cyclic: going all the way round is distance 0, halfway is the maximum
    assert g.edit_distance("II_C1", y, y) == 0
    far = g.rings[0][(g.positions[0][y] + g.n_entities // 2) % g.n_entities]
    assert g.edit_distance("I_C1", y, far) == g.n_entities // 2
    assert g.closed_form("I_C1", "I_C1").name == "I_C2"
    assert g.closed_form("I_C1", "II_C1") is None
    assert g.closed_form("I_C1", "I_A1") is None


def test_names_beyond_three_orders():
    g = KnowledgeGraph.from_config(KGConfig(n_entities=11, n_orders=5, max_hops=1))
    assert g.relation_names[-2:] == ["V_C1", "V_A1"]
    assert g.role(4) == "extra"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_entities": 0}, "n_entities must be an integer >= 3"),
        ({"n_entities": -5}, "n_entities"),
        ({"n_orders": 0}, "n_orders"),
        ({"max_hops": 0}, "max_hops"),
        ({"n_entities": 8, "max_hops": 4}, "max_hops must be < n_entities / 2"),
        ({"logical_holdout": 1.0}, r"logical_holdout must be in \[0, 1\)"),
        ({"compositional_holdout": -0.1}, "compositional_holdout"),
        pytest.param(
            {"logical_holdout": "a lot"}, "logical_holdout must be a number", marks=ILL_TYPED
        ),
        ({"structure": "tree"}, "a tree graph needs branching"),
        ({"structure": "spiral"}, "structure must be one of"),
        ({"seed": -1}, "seed"),
        pytest.param({"n_entities": 2.5}, "n_entities must be an integer", marks=ILL_TYPED),
    ],
)
def test_config_errors_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KGConfig(**kwargs)


def test_unknown_names_are_clear_errors(tiny_graph):
    with pytest.raises(ValueError, match="unknown relation 'I_C9'.*I_C1"):
        tiny_graph.relation("I_C9")
    with pytest.raises(ValueError, match="unknown entity 'bob'"):
        tiny_graph.entity("bob")
    with pytest.raises(ValueError, match=r"entity index must be in \[0, 15\]"):
        tiny_graph.apply("I_C1", 16)
    with pytest.raises(ValueError, match="unknown KGConfig fields"):
        KGConfig.from_dict({"n_entities": 10, "bogus": 1})


def test_load_rejects_broken_files(tmp_path, tiny_graph):
    data = tiny_graph.to_dict()
    bad = dict(data, rings=[list(range(16))] * 2 + [[0] * 16])
    with pytest.raises(ValueError, match="shape|permutation"):
        KnowledgeGraph.from_dict(bad)
    with pytest.raises(ValueError, match="not a kgshatter graph"):
        KnowledgeGraph.from_dict({"format": "something else"})
    with pytest.raises(FileNotFoundError):
        KnowledgeGraph.load(tmp_path / "missing.json")
