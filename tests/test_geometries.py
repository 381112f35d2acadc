"""Other geometries: tori, grids, trees and mixed graphs, through the same pipeline.

Invariants of the lattice and tree tables, distances and counterfactual sampling; walks that
emit only trained facts (a tree's children drawn among all of them); the metrics on
representations built to be a perfect torus / sheet / tree and on noise; one-line errors for
sizes that do not fit; and mixed graphs end to end through ``kgshatter reproduce`` on a tiny
model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kgshatter.analysis.geometry import lattice_metrics, structure_metrics
from kgshatter.cli import main
from kgshatter.editing.protocols import sample_requests
from kgshatter.kg import KGConfig, KnowledgeGraph, WalkConfig, WalkSampler


def torus(**kw) -> KnowledgeGraph:
    cfg = {"n_entities": 48, "n_orders": 2, "max_hops": 2, "structure": "torus", "width": 8}
    return KnowledgeGraph.from_config(KGConfig(**{**cfg, **kw}))


def test_torus_relations_are_lattice_moves_with_inverses():
    g = torus()
    assert g.n_relations == 2 * 4 * 2  # 2 orders x 4 directions x 2 hops
    assert g.relation_names[:8] == ["I_E1", "I_E2", "I_W1", "I_W2", "I_S1", "I_S2", "I_N1", "I_N2"]
    w, h = 8, 6
    for r in g.relations:
        assert sorted(g.table[r.index]) == list(range(48))  # a bijection
        inv = g.inverse(r.index)
        assert (g.table[inv.index, g.table[r.index]] == np.arange(48)).all()
        coords = g.coordinates(r.order)
        for x in range(48):
            y = g.apply(r.index, x)
            (r0, c0), (r1, c1) = coords[x], coords[y]
            if r.axis == 0:  # east / west: same row, column moves by the shift
                assert r0 == r1 and (c1 - c0) % w == r.shift % w
            else:  # south / north
                assert c0 == c1 and (r1 - r0) % h == r.shift % h
            assert g.edit_distance(r.index, x, y) == r.hops
    # two moves along one axis compose to a named move; across axes there is none
    assert g.closed_form("I_E1", "I_E1").name == "I_E2"
    assert g.closed_form("I_S2", "I_N1").name == "I_S1"
    assert g.closed_form("I_E1", "I_S1") is None
    assert g.closed_form("I_E1", "II_E1") is None


def test_torus_distances_and_counterfactuals():
    g = torus()
    d = g.distances(0)
    assert (d == d.T).all() and (np.diag(d) == 0).all()
    assert d.max() == g.max_distance(0) == 4 + 3
    ring_sizes = {k: len(g.at_distance(0, 5, k)) for k in range(1, 8)}
    assert ring_sizes[1] == 4 and sum(ring_sizes.values()) == 47
    for dist in (1, 3, 7):
        for req in sample_requests(g, "counterfactual", 10, seed=2, distance=dist):
            assert g.edit_distance(req.relation, req.old_target(g), req.target) == dist
    again = sample_requests(g, "counterfactual", 10, seed=2, distance=3)
    assert again == sample_requests(g, "counterfactual", 10, seed=2, distance=3)  # seeded
    with pytest.raises(ValueError, match="distance"):
        sample_requests(g, "counterfactual", 2, seed=0, distance=8)


def test_mixed_graph_alternates_rings_and_tori():
    g = KnowledgeGraph.from_config(
        KGConfig(n_entities=48, n_orders=3, max_hops=2, structure="mixed", width=8)
    )
    assert [g.shape(o) for o in range(3)] == ["ring", "torus", "ring"]
    assert g.n_relations == 4 + 8 + 4
    assert {r.name[:4] for r in g.relations if r.order == 1} == {"II_E", "II_W", "II_S", "II_N"}
    assert g.max_distance(0) == 24 and g.max_distance(1) == 7
    assert KnowledgeGraph.from_dict(g.to_dict()) == g  # the JSON round trip keeps the shapes


def test_a_cyclic_graph_is_what_it_was():
    """Tori added fields; a ring graph's JSON and fingerprint must not change with them."""
    g = KnowledgeGraph.from_config(KGConfig(n_entities=128, n_orders=3, max_hops=4))
    assert "width" not in g.to_dict()["config"]
    assert g.fingerprint == "a271cade47273595"  # measured before tori existed


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"structure": "hexagon"}, "structure must be one of"),
        ({"structure": "tree"}, "needs branching"),
        ({"structure": "tree", "branching": 5}, "a divisor of n_entities - 1 = 47"),
        ({"structure": "tree", "branching": 5, "n_entities": 49}, "allowed: \\[2, 3, 4, 6"),
        ({"structure": "tree", "branching": 8, "n_entities": 49}, "more than max_hops"),
        ({"structure": "torus", "width": 8, "branching": 3}, "a torus graph has none"),
        ({"structure": "ring-tree", "branching": 3, "n_entities": 49, "width": 7}, "none"),
        ({"structure": "torus"}, "needs width"),
        ({"structure": "torus", "width": 5}, "width must be a divisor of n_entities=48"),
        ({"structure": "torus", "width": 4}, "both sides above 2 \\* max_hops"),
        ({"structure": "cyclic", "width": 8}, "a cyclic graph has none"),
        ({"structure": "torus", "width": 8, "max_hops": 3}, "allowed: none"),
        ({"structure": "grid", "width": 24}, "both sides above"),
    ],
)
def test_sizes_that_do_not_fit_are_one_line_errors(fields, message):
    base = {"n_entities": 48, "n_orders": 2, "max_hops": 2}
    with pytest.raises(ValueError, match=message) as err:
        KGConfig(**{**base, **fields})
    assert "\n" not in str(err.value)


def test_lattice_metrics_see_a_torus_and_not_noise():
    g = torus(n_orders=1)
    rows, cols = g.coordinates(0).T
    a, b = 2 * np.pi * rows / 6, 2 * np.pi * cols / 8
    clean = np.stack([np.cos(a), np.sin(a), np.cos(b), np.sin(b)], 1)  # a flat 4-D torus
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    reps = np.concatenate([clean, np.zeros((48, 12))], 1) @ rotation  # the torus, turned, in 16-D
    good = structure_metrics(reps, g, 0)
    assert good == lattice_metrics(reps, g.coordinates(0), (6, 8), g.distances(0))
    assert good["probe_r2"] > 0.95 and good["neighbours"] > 0.9
    assert good["isomap"] > 0.9 and good["pca"] > 0.9
    noise = structure_metrics(rng.normal(size=(48, 16)), g, 0)
    assert noise["probe_r2"] < 0.3 and noise["neighbours"] < 0.2 and noise["isomap"] < 0.3


def test_reproduce_a_mixed_graph(tmp_path, capsys):
    out = tmp_path / "mixed"
    args = ["reproduce", "--preset", "tiny", "--out", str(out), "--quiet", "--n", "1",
            "--methods", "rome", "--sequential", "0", "--samples", "1000", "--max-queries",
            "16", "--distances", "1,3", "--set", "kg.n_entities=36", "--set",
            "kg.structure=mixed", "--set", "kg.width=6", "--set", "train.steps=100"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    header = (out / "table.csv").read_text().splitlines()[0].split(",")
    for column in ("isomap.I", "isomap.II", "neighbours.II", "R.II", "acc.direct.II"):
        assert column in header
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert {r["distance"] for r in rows if r["kind"] == "counterfactual"} == {1, 3}
    assert (out / "rings_before_after.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["example"]["rings"]) == {"I", "II", "III"}
    tree = tmp_path / "tree"
    assert main(["reproduce", "--geometry", "torus", "--preset", "cpu", "--out", str(tree)]) == 2
    assert "not both" in capsys.readouterr().err
    far = [*args[:4], str(tmp_path / "far"), *args[5:]]
    far[far.index("1,3")] = "9"  # on a ring of 36 that is fine; on a 6 x 6 torus it is not
    far[far.index("kg.structure=mixed")] = "kg.structure=torus"
    assert main(far) == 2
    assert "outside the 6x6 torus: d must be in 1..6" in capsys.readouterr().err
    assert not (tmp_path / "far").exists()


def _steps(walk: list[int], n: int):
    """The (x, relations, y) steps of one walk (from its first entity on)."""
    i = next(k for k, t in enumerate(walk) if t < n)
    while True:
        j = i + 1
        while j < len(walk) and walk[j] >= n:
            j += 1
        if j >= len(walk):
            return
        yield walk[i], [t - n for t in walk[i + 1 : j]], walk[j]
        i = j


def test_a_grid_has_edges_and_its_walks_stay_on_the_sheet():
    g = torus(structure="grid")
    w, h = 8, 6
    coords = g.coordinates(0)
    for r in (r for r in g.relations if r.order == 0):
        for x in range(48):
            row, col = coords[x]
            r2, c2 = (row, col + r.shift) if r.axis == 0 else (row + r.shift, col)
            inside = 0 <= r2 < h and 0 <= c2 < w
            y = int(g.table[r.index, x])
            assert (y >= 0) == inside  # a move off the edge does not exist
            if inside:
                assert tuple(coords[y]) == (r2, c2)
                assert g.apply(g.inverse(r.index).index, y) == x
    assert g.max_distance(0) == 7 + 5 and g.distance(0, 0, 0) == 0
    corner = int(g.rings[0][0])  # the entity at row 0, column 0
    assert len(g.at_distance(0, corner, 1)) == 2  # a corner has 2 neighbours, not 4
    for split in ("direct", "logical", "compositional"):
        assert (g.split_facts(split) >= 0).all()  # queries only about facts that exist
    sampler = WalkSampler(g, WalkConfig(n_ctx=12, composition_prob=0.5))
    walks = sampler.batch(300, torch.Generator().manual_seed(0)).tolist()
    contexts = sampler.contexts(torch.arange(48), 12, torch.Generator().manual_seed(1))
    assert (contexts[:, -1] == torch.arange(48)).all()
    for walk in walks + contexts.tolist():
        for x, rels, y in _steps(walk, 48):
            if len(rels) == 1:
                assert g.trained_facts_mask[rels[0], x] and g.table[rels[0], x] == y
            else:
                assert g.trained_compositions_mask[rels[0], rels[1], x]
                assert g.table[rels[1], g.table[rels[0], x]] == y
    for req in sample_requests(g, "counterfactual", 10, seed=4, distance=9):
        assert g.edit_distance(req.relation, req.old_target(g), req.target) == 9


def test_lattice_metrics_see_a_sheet():
    g = torus(n_orders=1, structure="grid")
    rows, cols = g.coordinates(0).T.astype(float)
    rng = np.random.default_rng(1)
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    reps = np.concatenate([rows[:, None], cols[:, None], np.zeros((48, 6))], 1) @ rotation
    good = structure_metrics(reps, g, 0)
    assert good["probe_r2"] > 0.95 and good["neighbours"] > 0.9
    assert good["isomap"] > 0.9 and good["pca"] > 0.9


def tree(**kw) -> KnowledgeGraph:
    cfg = {"n_entities": 40, "n_orders": 2, "max_hops": 2, "structure": "tree", "branching": 3}
    return KnowledgeGraph.from_config(KGConfig(**{**cfg, **kw}))


def test_tree_relations_go_up_to_one_answer_and_down_to_several():
    g = tree()  # sites: 0 | 1-3 | 4-12 | 13-39 (a full ternary tree of 40)
    assert g.relation_names[:4] == ["I_D1", "I_D2", "I_U1", "I_U2"]
    assert g.multi_valued.tolist() == [True, True, False, False] * 2
    site, at = g.positions[0], g.rings[0]
    up1, down1 = g.relation("I_U1").index, g.relation("I_D1").index
    for x in range(40):
        s = int(site[x])
        parent = g.apply(up1, x)
        assert parent == (-1 if s == 0 else at[(s - 1) // 3])
        children = sorted(int(at[c]) for c in range(3 * s + 1, min(3 * s + 4, 40)))
        assert g.answers(down1, x).tolist() == sorted(children)
        if children:
            assert g.accepts([down1] * len(children), [x] * len(children), children).all()
            assert g.apply(down1, x) in children  # the table holds one of them
        assert not g.accepts([down1], [x], [x])[0] and not g.accepts([down1], [x], [999])[0]
        grand = g.apply("I_U2", x)
        assert grand == (-1 if s < 4 else at[((s - 1) // 3 - 1) // 3])
    assert g.closed_form("I_U1", "I_U1").name == "I_U2"
    assert g.closed_form("I_D1", "I_D1") is None and g.closed_form("I_U2", "I_D1") is None
    assert not g.composable[down1].any() and not g.composable[:, down1].any()
    d = g.distances(0)
    assert (d == d.T).all() and (np.diag(d) == 0).all()
    root, leaf = int(at[0]), int(at[39])
    assert g.distance(0, root, leaf) == 3 and d.max() == g.max_distance(0) == 6
    assert (g.logical_heldout[[r.index for r in g.relations if r.direction > 0]] == 0).all()
    for split in ("direct", "logical", "compositional"):
        assert (g.split_facts(split) >= 0).all()
    assert KnowledgeGraph.from_dict(g.to_dict()) == g


def test_tree_edits_move_a_parent_and_never_a_set_of_children():
    g = tree()
    for dist in (1, 3, 5):  # a parent lies at most 2 deep: 5 is the farthest a new one can be
        requests = sample_requests(g, "counterfactual", 8, seed=1, distance=dist)
        for req in requests:
            assert not g.multi_valued[req.relation]
            assert g.edit_distance(req.relation, req.old_target(g), req.target) == dist
    with pytest.raises(ValueError, match=r"distance must be an integer in \[1, 5\], got 6"):
        sample_requests(g, "counterfactual", 1, seed=1, distance=6)
    from kgshatter.editing.requests import EditRequest

    root_child = int(g.rings[0][1])
    with pytest.raises(ValueError, match="several answers per subject") as err:
        EditRequest(int(g.rings[0][0]), g.relation("I_D1").index, root_child).validate(g)
    assert "\n" not in str(err.value)


def test_tree_walks_draw_among_the_children_and_emit_only_trained_facts():
    g = tree()
    sampler = WalkSampler(g, WalkConfig(n_ctx=12, composition_prob=0.5))
    walks = sampler.batch(400, torch.Generator().manual_seed(0)).tolist()
    contexts = sampler.contexts(torch.arange(40), 12, torch.Generator().manual_seed(1))
    assert (contexts[:, -1] == torch.arange(40)).all()
    seen: dict[tuple[int, int], set[int]] = {}
    for walk in walks + contexts.tolist():
        for x, rels, y in _steps(walk, 40):
            if len(rels) == 1:
                assert g.trained_facts_mask[rels[0], x] and g.accepts(rels, [x], [y])[0]
                if g.multi_valued[rels[0]]:
                    seen.setdefault((x, rels[0]), set()).add(y)
            else:
                assert g.trained_compositions_mask[rels[0], rels[1], x]
                assert g.table[rels[1], g.table[rels[0], x]] == y
    # the root's children, drawn uniformly, all appear
    root = int(g.rings[0][0])
    assert seen[(root, g.relation("I_D1").index)] == set(g.answers("I_D1", root).tolist())
    # the same seed, the same bytes
    again = sampler.batch(400, torch.Generator().manual_seed(0)).tolist()
    assert again == walks


def test_tree_queries_accept_any_child():
    from kgshatter.kg.walks import QuerySet

    g = tree()
    sampler = WalkSampler(g, WalkConfig(n_ctx=8))
    queries = QuerySet.build(sampler, "direct", n_prefixes=1, seed=0)
    rows = queries.rows
    down = g.multi_valued[rows[:, 1]]
    other = torch.tensor([int(g.answers(r, x)[-1]) for x, r, _ in rows])  # a different child
    assert queries.correct(g, queries.answers).all()
    assert queries.correct(g, other).all()
    assert (other != queries.answers)[torch.from_numpy(down)].any()
    assert not queries.correct(g, torch.full_like(queries.answers, g.n_entities)).any()


def test_tree_metrics_see_a_tree_and_not_noise():
    from kgshatter.analysis.geometry import tree_coordinates

    g = tree(n_orders=1)
    clean = tree_coordinates(g.distances(0), components=8)
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    reps = np.concatenate([clean, np.zeros((40, 8))], 1) @ rotation
    good = structure_metrics(reps, g, 0)
    assert good["probe_r2"] > 0.95 and good["isomap"] > 0.8 and good["pca"] > 0.6
    assert good["neighbours"] > 0.6
    noise = structure_metrics(rng.normal(size=(40, 16)), g, 0)
    assert noise["probe_r2"] < 0.3 and noise["isomap"] < 0.3


def test_reproduce_rings_with_a_tree(tmp_path, capsys):
    out = tmp_path / "ring-tree"
    args = ["reproduce", "--preset", "tiny", "--out", str(out), "--quiet", "--n", "1",
            "--methods", "rome", "--sequential", "0", "--samples", "1000", "--max-queries",
            "16", "--distances", "1,3", "--set", "kg.n_entities=40", "--set",
            "kg.structure=ring-tree", "--set", "kg.branching=3", "--set",
            "train.steps=100"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    header = (out / "table.csv").read_text().splitlines()[0].split(",")
    for column in ("isomap.II", "neighbours.II", "R.II", "acc.direct.II", "acc.logical.II"):
        assert column in header
    assert (out / "rings_before_after.png").read_bytes()[:4] == b"\x89PNG"
    assert "3-ary tree" in (out / "report.md").read_text()
    # the edited order is a tree in the tree preset; its distances stop at the diameter
    far = tmp_path / "far"
    bad = ["reproduce", "--geometry", "tree", "--distances", "9", "--out", str(far)]
    assert main(bad) == 2
    assert "outside the 3-ary tree: d must be in 1..6" in capsys.readouterr().err
    assert not far.exists()
    assert main(["reproduce", "--geometry", "hexagon", "--out", str(far)]) == 2
    assert "invalid choice" in capsys.readouterr().err and not far.exists()
