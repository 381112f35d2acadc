"""Ring metrics behave on known geometry: a clean ring scores ~1, noise scores ~0."""

from __future__ import annotations

import numpy as np
import pytest

from kgshatter.analysis.geometry import (
    circular_alignment,
    embed_2d,
    fourier_probe,
    neighbour_fraction,
    probe_r2,
    ring_far_distance,
    ring_metrics,
    ring_step_distances,
)

N = 64


def ring_points(n: int = N, dim: int = 16, freq: int = 1, noise: float = 0.0, seed: int = 0):
    """A ring of n points (in a random order) embedded in ``dim`` dimensions by a random map."""
    rng = np.random.default_rng(seed)
    positions = rng.permutation(n)
    theta = 2 * np.pi * freq * positions / n
    plane = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:2]
    return plane @ basis * 3 + rng.normal(scale=noise, size=(n, dim)), positions


def test_clean_ring_scores_one():
    x, pos = ring_points()
    m = ring_metrics(x, pos, N)
    assert m["probe_r2"] > 0.98
    assert m["neighbours"] == 1.0
    assert m["isomap"] > 0.98 and m["pca"] > 0.98


def test_random_points_score_low():
    rng = np.random.default_rng(1)
    x, pos = rng.normal(size=(N, 16)), rng.permutation(N)
    m = ring_metrics(x, pos, N)
    assert m["probe_r2"] < 0.2
    assert m["neighbours"] < 0.2
    assert m["pca"] < 0.4


def test_invariant_to_rotation_translation_and_reflection():
    x, pos = ring_points(noise=0.3)
    rng = np.random.default_rng(2)
    q = np.linalg.qr(rng.normal(size=(16, 16)))[0]
    y = x @ q + 5.0
    assert neighbour_fraction(x, pos, N) == neighbour_fraction(y, pos, N)
    assert probe_r2(x, pos, N) == pytest.approx(probe_r2(y, pos, N), abs=1e-6)
    assert circular_alignment(embed_2d(x, "pca"), pos, N) == pytest.approx(
        circular_alignment(embed_2d(y, "pca"), pos, N), abs=1e-6
    )
    flipped = embed_2d(x, "pca") * np.array([1.0, -1.0])
    assert circular_alignment(flipped, pos, N) == pytest.approx(
        circular_alignment(embed_2d(x, "pca"), pos, N), abs=1e-9
    )


def test_metrics_fall_as_noise_grows():
    values = [ring_metrics(*ring_points(noise=s), N) for s in (0.0, 0.5, 2.0, 8.0)]
    for key in ("probe_r2", "pca"):
        seq = [v[key] for v in values]
        assert seq == sorted(seq, reverse=True), (key, seq)
    assert values[-1]["neighbours"] < values[0]["neighbours"]


def test_fourier_probe_finds_the_frequency():
    x, pos = ring_points(freq=5)
    spectrum = fourier_probe(x, pos, N, frequencies=range(1, 8))
    assert max(spectrum, key=spectrum.get) == 5
    assert spectrum[5] > 0.98 and spectrum[1] < 0.2


def test_ring_step_distances_follow_the_winding():
    # a circle drawn once around: D(d) is the chord, ~d * D(1) for small d, far entities ~1.8r
    x, pos = ring_points()
    dist = ring_step_distances(x, pos, N, (1, 2, 4, 8))
    assert dist[4] / dist[1] == pytest.approx(np.sin(4 * np.pi / N) / np.sin(np.pi / N))
    assert dist[1] / ring_far_distance(x, pos, N) < 0.06
    # wound 8 times around: D peaks at N / 16 = 4 places and is back to 0 at N / 8 = 8
    x, pos = ring_points(freq=8)
    dist = ring_step_distances(x, pos, N, range(1, 9))
    assert max(dist, key=dist.get) == 4 and dist[8] < 1e-9
    assert dist[1] / ring_far_distance(x, pos, N) > 0.2


def test_ring_step_distances_obey_the_triangle_inequality_and_reject_bad_input():
    rng = np.random.default_rng(3)
    x, pos = rng.normal(size=(N, 8)), rng.permutation(N)
    dist = ring_step_distances(x, pos, N, (1, 4))
    assert dist[4] <= 4 * dist[1]
    with pytest.raises(ValueError, match="permutation of 0..63"):
        ring_step_distances(x, np.zeros(N, int), N)
    with pytest.raises(ValueError, match="steps must lie in 1..63"):
        ring_step_distances(x, pos, N, (0,))
    with pytest.raises(ValueError, match="one row per entity"):
        ring_step_distances(x[:10], pos, N)


def test_degenerate_representations_give_nan():
    m = ring_metrics(np.ones((N, 4)), np.arange(N), N)
    assert all(np.isnan(v) for v in m.values())
    with pytest.raises(ValueError, match="isomap' or 'pca"):
        embed_2d(np.ones((4, 2)), "tsne")


def test_order_overlap_follows_the_keys_an_edit_shares(tiny_graph):
    """Keys of order I along one axis, order II along another, order III half on each: an
    edit of an order I fact reaches order I fully, order II not at all, order III by half."""
    import torch

    from kgshatter.analysis.spill import mean_key_cosine, order_overlap

    g = tiny_graph
    axis = {0: torch.tensor([1.0, 0.0]), 1: torch.tensor([0.0, 1.0]), 2: torch.tensor([0.5, 0.5])}
    keys = torch.stack(
        [axis[g.relation(r).order].expand(g.n_entities, 2) for r in range(g.n_relations)]
    )
    r0 = next(r for r in range(g.n_relations) if g.relation(r).order == 0)
    overlap = order_overlap(keys, g, subject=3, relation=r0, c_inv=torch.eye(2))
    assert overlap == pytest.approx({"I": 1.0, "II": 0.0, "III": 0.5})
    # C^-1 sets the update's direction: for an order III edit, u = C^-1 k* = (0.5, 1.0) and
    # k* . u = 0.75, so order I's keys move 0.5 / 0.75 and order II's 1.0 / 0.75
    r2 = next(r for r in range(g.n_relations) if g.relation(r).order == 2)
    weighted = order_overlap(keys, g, 3, r2, torch.diag(torch.tensor([1.0, 2.0])))
    assert weighted == pytest.approx({"I": 2 / 3, "II": 4 / 3, "III": 1.0})
    cosine = mean_key_cosine(keys, g)
    assert cosine == pytest.approx({"I": 1.0, "II": 0.0, "III": 2**-0.5})
    with pytest.raises(ValueError, match=r"keys must be \[relation, entity, d\]"):
        order_overlap(keys[:, :5], g, 3, r0, torch.eye(2))


def test_order_moves_of_a_rank_one_edit_are_its_overlaps(tiny_graph):
    """A ROME-shaped delta u v^T moves each query by (k . u) times the edited query's move,
    so the measured per-order moves equal order_overlap but for the edited query itself."""
    import torch

    from kgshatter.analysis.spill import order_moves, order_overlap

    g = tiny_graph
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(g.n_relations, g.n_entities, 6, generator=gen, dtype=torch.float64)
    c_inv = torch.linalg.inv(torch.einsum("rei,rej->ij", keys, keys) / keys[..., 0].numel())
    r, x = 1, 4
    u = c_inv @ keys[r, x] / (keys[r, x] @ c_inv @ keys[r, x])
    delta = torch.outer(u, torch.randn(5, generator=gen, dtype=torch.float64))
    moves = order_moves(keys, g, x, r, delta)
    overlap = order_overlap(keys, g, x, r, c_inv)
    edited = g.order_name(g.relation(r).order)
    n = sum(g.relation(q).order == g.relation(r).order for q in range(g.n_relations))
    n *= g.n_entities
    for o in overlap:
        want = (overlap[o] * n - 1) / (n - 1) if o == edited else overlap[o]
        assert moves[o] == pytest.approx(want, rel=1e-9)
    # a delta no key reads moves nothing; a bad key shape is refused in one line
    zero = order_moves(keys, g, x, r, torch.zeros(6, 5, dtype=torch.float64))
    assert all(v != v for v in zero.values())  # NaN: no edited move to compare with
    with pytest.raises(ValueError, match=r"keys must be \[relation, entity, d\]"):
        order_moves(keys[:2], g, x, r, delta)


def test_key_sharing_is_every_orders_mean_overlap(tiny_graph):
    """key_sharing is the mean order_overlap of an edit of every fact of each order (with every
    subject sampled), and it reads the axis picture: orders I and II apart, III half on each."""
    import torch

    from kgshatter.analysis.spill import key_sharing, order_overlap

    g = tiny_graph
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(g.n_relations, g.n_entities, 4, generator=gen, dtype=torch.float64)
    c_inv = torch.linalg.inv(torch.einsum("rei,rej->ij", keys, keys) / keys[..., 0].numel())
    sharing = key_sharing(keys, g, c_inv, n_subjects=g.n_entities)
    for o in range(g.n_orders):
        per = [
            order_overlap(keys, g, x, r, c_inv)
            for r in range(g.n_relations)
            if g.relation(r).order == o
            for x in range(g.n_entities)
        ]
        want = {name: sum(p[name] for p in per) / len(per) for name in per[0]}
        assert sharing[g.order_name(o)] == pytest.approx(want, rel=1e-9)
    # a sample of subjects: seeded, so the same bytes twice
    assert key_sharing(keys, g, c_inv, n_subjects=5) == key_sharing(keys, g, c_inv, n_subjects=5)
    axis = {0: torch.tensor([1.0, 0.0]), 1: torch.tensor([0.0, 1.0]), 2: torch.tensor([0.5, 0.5])}
    flat = torch.stack(
        [axis[g.relation(r).order].expand(g.n_entities, 2) for r in range(g.n_relations)]
    )
    picture = key_sharing(flat, g, torch.eye(2), n_subjects=3)
    assert picture["I"] == pytest.approx({"I": 1.0, "II": 0.0, "III": 0.5})
    assert picture["II"] == pytest.approx({"I": 0.0, "II": 1.0, "III": 0.5})
    assert picture["III"] == pytest.approx({"I": 1.0, "II": 1.0, "III": 1.0})
    with pytest.raises(ValueError, match="n_subjects must be a positive int, got 0"):
        key_sharing(flat, g, torch.eye(2), n_subjects=0)


def test_relation_keys_are_the_sweeps_keys(trained_tiny, tiny_sampler):
    import torch

    from kgshatter.analysis.representations import collect_representations, entity_query_tokens
    from kgshatter.analysis.spill import relation_keys
    from kgshatter.sites import Site

    keys = relation_keys(trained_tiny.model, tiny_sampler, 0)
    g = tiny_sampler.graph
    assert keys.shape == (g.n_relations, g.n_entities, trained_tiny.model.cfg.d_mlp)
    site = Site(0, "mlp_post")
    one = collect_representations(
        trained_tiny.model, entity_query_tokens(tiny_sampler, 2, 5, seed=1), [site]
    )[site]
    assert torch.equal(keys[2], one)


def test_isomap_embeddings_are_the_same_bytes_every_call():
    """Above 200 points scikit-learn's Isomap starts ARPACK from numpy's global random state:
    the embedding must not depend on it, and the caller's random stream must not move."""
    import numpy as np
    import torch

    from kgshatter.analysis.geometry import embed_2d

    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    first = embed_2d(x)
    np.random.seed(123)  # noqa: NPY002 (the legacy global state scikit-learn reads)
    before = np.random.get_state()[1].copy()  # noqa: NPY002
    second = embed_2d(x)
    assert np.array_equal(np.random.get_state()[1], before)  # noqa: NPY002
    assert first.tobytes() == second.tobytes()
