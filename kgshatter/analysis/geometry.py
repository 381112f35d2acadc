"""Ring-structure metrics: is an order's cyclic structure present in a set of representations?

(Tori have their own versions, ``lattice_*`` at the end; ``structure_metrics`` picks by shape.)

Three views, because a ring can be encoded without being visible (README, "Learning the rings
on a CPU"):
- ``probe_r2``: cross-validated ridge probe from the representation to (cos, sin) of ring
  position; 1 = ring position linearly decodable.
- ``neighbour_fraction``: fraction of entities whose two nearest neighbours (Euclidean) lie
  within +-``window`` ring positions; ~1 for a clean ring; by chance
  ``(2w / (N-1)) * ((2w-1) / (N-2))``, about 0.1% for N = 128 and w = 2.
- ``isomap_alignment``: resultant length of the angle difference between a 2-D Isomap embedding
  and ring position, best over reflection; 1 = the Isomap picture is the ring in order.

Isomap's neighbourhood defaults to 3 points (*choice*): trained models encode a ring with
Fourier features of several frequencies, so the entities lie on a closed curve that winds
through many dimensions and is locally linear only over the nearest few ring neighbours. On the
``cpu`` model after 1000 steps the ring of order III scores 0.97 with 3 neighbours, 0.74 with 4,
0.22 with 6 and 0.27 with 10: larger neighbourhoods short-circuit the curve. Pass
``n_neighbors`` to choose another.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch

from kgshatter.analysis.shattering import distance_matrix

ISOMAP_NEIGHBORS = 3


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return (
        x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, float)
    )


def ring_angle(positions: np.ndarray, n: int) -> np.ndarray:
    return 2 * np.pi * np.asarray(positions, dtype=float) / n


def probe_r2(reps, positions: np.ndarray, n: int, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated R^2 of a ridge probe onto (cos, sin) of ring position.

    Features are centred and divided by one overall scale (not per feature), so the probe is
    invariant to rotations and translations of the representation.
    """
    theta = ring_angle(positions, n)
    return ridge_probe_r2(reps, np.stack([np.cos(theta), np.sin(theta)], axis=1), folds, seed)


def ridge_probe_r2(reps, targets: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated R^2 of a ridge probe from the representations onto ``targets`` [N, k]
    (the ring, lattice and tree probes; features centred and divided by one overall scale)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict

    x = _np(reps)
    x = (x - x.mean(0)) / max(float(x.std()), 1e-12)
    y = np.asarray(targets, dtype=float)
    probe = RidgeCV(alphas=np.logspace(-3, 4, 15))
    pred = cross_val_predict(probe, x, y, cv=KFold(folds, shuffle=True, random_state=seed))
    return float(1 - ((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def fourier_probe(
    reps, positions: np.ndarray, n: int, frequencies: range | list[int] = range(1, 9), seed: int = 0
) -> dict[int, float]:
    """Probe R^2 onto (cos, sin) of ``k * position`` for each frequency k.

    A model can encode a ring with Fourier features of any frequency (as in modular-arithmetic
    grokking); a frequency-k code is invisible to the plain (k = 1) probe and draws the ring
    k times around in 2-D. This spectrum says which frequencies the representation uses.
    """
    pos = np.asarray(positions)
    return {int(k): probe_r2(reps, (k * pos) % n, n, seed=seed) for k in frequencies}


def neighbour_fraction(reps, positions: np.ndarray, n: int, window: int = 2) -> float:
    """Fraction of entities whose 2 nearest neighbours are within +-window ring positions."""
    x = _np(reps)
    sq = (x * x).sum(1)
    d = sq[:, None] + sq[None, :] - 2 * x @ x.T  # squared distances, O(N^2) memory
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, axis=1)[:, :2]
    pos = np.asarray(positions)
    gap = np.abs(pos[nn] - pos[:, None])
    gap = np.minimum(gap, n - gap)
    return float((gap <= window).all(axis=1).mean())


def _ring_ordered(reps, positions: np.ndarray, n: int) -> np.ndarray:
    """The representations in ring order (row p: the entity at ring position p)."""
    pos = np.asarray(positions)
    if pos.shape != (n,) or not np.array_equal(np.sort(pos), np.arange(n)):
        raise ValueError(f"positions must be a permutation of 0..{n - 1} (one per entity)")
    x = _np(reps)
    if len(x) != n:
        raise ValueError(f"reps has {len(x)} rows, positions {n}: one row per entity")
    return x[np.argsort(pos)]


def ring_step_distances(
    reps, positions: np.ndarray, n: int, steps: Iterable[int] = (1, 2, 4)
) -> dict[int, float]:
    """D(d): the mean distance between the representations of entities d places apart along
    the ring, for each d in ``steps`` (0 < d < n).

    The gap between a subject and the entity whose answer a counterfactual edit at distance d
    asks for; on the 2,048-entity models an edit's size is 1.5-2.2 times that gap at every d
    (docs/paper-scale/README.md, "Why the far edit is only 1-4x the near one"). D(d) <= d *
    D(1) on any ring (the triangle inequality, averaged around it), with equality where the ring
    is straight over d places; a ring wound f times around peaks at d = n / 2f and returns to
    ~0 at d = n / f.
    """
    x = _ring_ordered(reps, positions, n)
    out = {}
    for d in steps:
        if not 0 < int(d) < n:
            raise ValueError(f"steps must lie in 1..{n - 1}, got {d}")
        out[int(d)] = float(np.linalg.norm(np.roll(x, -int(d), 0) - x, axis=1).mean())
    return out


def ring_far_distance(reps, positions: np.ndarray, n: int) -> float:
    """The mean of D(d) over d = n / 4 .. n / 2: how far apart entities a quarter or more of the
    ring apart are. ``D(1) / ring_far_distance`` says how wound the ring is: small for a
    circle drawn once around (about 3.5 / n: 0.0017 at n = 2,048), a sizeable fraction for a
    ring that winds many times around (its neighbours nearly as far apart as distant ones)."""
    steps = range(max(n // 4, 1), n // 2 + 1)
    return float(np.mean(list(ring_step_distances(reps, positions, n, steps).values())))


def embed_2d(reps, method: str = "isomap", n_neighbors: int = ISOMAP_NEIGHBORS) -> np.ndarray:
    """2-D Isomap or PCA embedding of the representations."""
    x = _np(reps)
    if method == "pca":
        x = x - x.mean(0)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        return x @ vt[:2].T
    if method == "isomap":
        from scipy.sparse import SparseEfficiencyWarning
        from sklearn.manifold import Isomap

        with warnings.catch_warnings():
            # a small neighbourhood may split the graph; Isomap then joins the components itself
            warnings.filterwarnings("ignore", message=".*connected components.*")
            warnings.filterwarnings("ignore", category=SparseEfficiencyWarning)
            # on the exact distances (the ones R(D*) uses) rather than scikit-learn's own
            # neighbour search, and with one BLAS thread: the same embedding to 1e-15, without
            # thread pools that compete with torch's (inside an edit sweep on 2 cores the
            # neighbour search took 17 ms per call instead of 5, the eigen-solver 21 ms
            # instead of 2)
            isomap = Isomap(n_neighbors=min(n_neighbors, len(x) - 1), n_components=2,
                            metric="precomputed")  # fmt: skip
            with one_blas_thread(), _numpy_global_seed(0):
                return isomap.fit_transform(distance_matrix(x).numpy())
    raise ValueError(f"method must be 'isomap' or 'pca', got {method!r}")


@contextlib.contextmanager
def _numpy_global_seed(seed: int) -> Iterator[None]:
    """Inside, numpy's global random state is seeded (and restored on exit). Above 200 points
    scikit-learn's Isomap solves its eigenproblem with ARPACK from a random start vector drawn
    from that global state, so without this the same representations gave embeddings (and
    alignments) that differed in the last bits from one call to the next."""
    state = np.random.get_state()  # noqa: NPY002 (the legacy state scikit-learn draws from)
    np.random.seed(seed)  # noqa: NPY002
    try:
        yield
    finally:
        np.random.set_state(state)  # noqa: NPY002


def one_blas_thread() -> AbstractContextManager[Any]:
    """Inside, numpy's and scipy's BLAS run on one thread (restored on exit).

    The measures here work on matrices of a few hundred entities; on a small machine that is
    also running torch, a second BLAS thread competes with torch's own and slows them down
    (on 2 cores a 128-entity neighbour fraction took 2.6 ms after a torch matrix product
    against 0.9 ms on one thread; scikit-learn's Isomap eigen-solver 21 ms against 2)."""
    return _blas_threads().limit(limits=1, user_api="blas")


@functools.cache
def _blas_threads() -> Any:
    """threadpoolctl's controller of the loaded BLAS libraries, found once: a plain
    ``threadpool_limits`` looks them up again on every call (4.6 ms of a 13 ms Isomap)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def circular_alignment(xy: np.ndarray, positions: np.ndarray, n: int) -> float:
    """How well the angle of a 2-D embedding follows ring position (0..1, reflection allowed)."""
    xy = np.asarray(xy, float) - np.asarray(xy, float).mean(0)
    phi = np.arctan2(xy[:, 1], xy[:, 0])
    theta = ring_angle(positions, n)
    return float(max(abs(np.exp(1j * (phi - s * theta)).mean()) for s in (1, -1)))


def isomap_alignment(
    reps, positions: np.ndarray, n: int, n_neighbors: int = ISOMAP_NEIGHBORS
) -> float:
    return circular_alignment(embed_2d(reps, "isomap", n_neighbors), positions, n)


def ring_metrics(reps, positions: np.ndarray, n: int, seed: int = 0) -> dict[str, float]:
    """All ring metrics of one order's representations (NaN where all points coincide)."""
    if np.ptp(_np(reps), axis=0).max() < 1e-12:
        return {
            "probe_r2": float("nan"),
            "neighbours": float("nan"),
            "isomap": float("nan"),
            "pca": float("nan"),
        }
    return {
        "probe_r2": probe_r2(reps, positions, n, seed=seed),
        "neighbours": neighbour_fraction(reps, positions, n),
        "isomap": isomap_alignment(reps, positions, n),
        "pca": circular_alignment(embed_2d(reps, "pca"), positions, n),
    }


# ---------------------------------------------------------------------- lattices (tori)
# A torus order (KGConfig(structure="torus")) places entities on a w x h lattice that wraps both
# ways, a grid order (structure="grid") on one that does not. Their metrics answer the ring
# metrics' questions for the lattice: is (row, column) decodable (probe_r2: onto cos/sin of both
# angles on a torus, onto row and column on a grid); are an entity's two nearest neighbours
# lattice neighbours (neighbours: both within lattice distance 1, i.e. among its 4 neighbours,
# the same count as the ring's +-2 window); do the representation's Isomap geodesics follow the
# lattice's distances (isomap: Spearman correlation of the two over all pairs, on Isomap's
# 4-nearest-neighbour graph, the lattice's degree); and do distances in the top principal
# components follow them (pca: the same correlation; 4 components on a torus, which embeds flat
# in 4-D, 2 on a grid).
LATTICE_NEIGHBORS = 4


def lattice_probe_r2(reps, coords: np.ndarray, shape: tuple[int, int], folds: int = 5,
                     seed: int = 0, wrap: bool = True) -> float:  # fmt: skip
    """Cross-validated R^2 of a ridge probe onto (cos, sin) of the row and column angles of
    an ``(h, w)`` = ``shape`` torus, or (``wrap=False``, a grid) onto row and column.

    ``coords`` is [N, 2] (row, column).
    """
    coords = np.asarray(coords, dtype=float)
    if wrap:
        rows, cols = 2 * np.pi * coords[:, 0] / shape[0], 2 * np.pi * coords[:, 1] / shape[1]
        y = np.stack([np.cos(rows), np.sin(rows), np.cos(cols), np.sin(cols)], axis=1)
    else:
        y = coords
    return ridge_probe_r2(reps, y, folds, seed)


def lattice_neighbour_fraction(reps, distances: np.ndarray, radius: int = 1) -> float:
    """Fraction of entities whose 2 nearest neighbours lie within ``radius`` lattice steps
    (``distances``: the [N, N] lattice distances)."""
    x = _np(reps)
    sq = (x * x).sum(1)
    d = sq[:, None] + sq[None, :] - 2 * x @ x.T
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, axis=1)[:, :2]
    gap = np.take_along_axis(np.asarray(distances), nn, axis=1)
    return float((gap <= radius).all(axis=1).mean())


def _spearman_upper(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two [N, N] distance matrices over their upper triangles."""
    from scipy.stats import spearmanr

    iu = np.triu_indices(a.shape[0], 1)
    rho = spearmanr(a[iu], b[iu]).statistic
    return float(rho) if np.isfinite(rho) else float("nan")


def lattice_isomap_alignment(reps, distances: np.ndarray,
                             n_neighbors: int = LATTICE_NEIGHBORS) -> float:  # fmt: skip
    """Spearman correlation between the Isomap geodesic distances of the representations and
    the lattice distances (1 = the representation's neighbourhood graph is the lattice's)."""
    from scipy.sparse import SparseEfficiencyWarning
    from sklearn.manifold import Isomap

    x = _np(reps)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*connected components.*")
        warnings.filterwarnings("ignore", category=SparseEfficiencyWarning)
        isomap = Isomap(n_neighbors=min(n_neighbors, len(x) - 1), n_components=2).fit(x)
    return _spearman_upper(isomap.dist_matrix_, np.asarray(distances, dtype=float))


def lattice_pca_alignment(reps, distances: np.ndarray, components: int = 4) -> float:
    """Spearman correlation between distances in the top ``components`` principal components
    and the lattice distances."""
    x = _np(reps)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    z = x @ vt[:components].T
    d = np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).sum(-1))
    return _spearman_upper(d, np.asarray(distances, dtype=float))


def lattice_metrics(reps, coords: np.ndarray, shape: tuple[int, int], distances: np.ndarray,
                    seed: int = 0, wrap: bool = True) -> dict[str, float]:  # fmt: skip
    """All lattice metrics of one torus (or, ``wrap=False``, grid) order's representations
    (NaN where all coincide). On a grid ``pca`` uses the top 2 components (a sheet is flat)."""
    if np.ptp(_np(reps), axis=0).max() < 1e-12:
        return {k: float("nan") for k in ("probe_r2", "neighbours", "isomap", "pca")}
    return {
        "probe_r2": lattice_probe_r2(reps, coords, shape, seed=seed, wrap=wrap),
        "neighbours": lattice_neighbour_fraction(reps, distances),
        "isomap": lattice_isomap_alignment(reps, distances),
        "pca": lattice_pca_alignment(reps, distances, components=4 if wrap else 2),
    }


# ---------------------------------------------------------------------- trees
# A tree order (KGConfig(structure="tree")) has no angle to decode: its metrics ask whether the
# tree's metric is in the representations. probe_r2: a ridge probe onto the tree's classical
# multidimensional-scaling coordinates (the top 4 of the double-centred squared tree
# distances); neighbours: both nearest neighbours within 2 tree steps (a sibling, the parent or
# a child); isomap / pca: the lattice versions with tree distances (Spearman over all pairs).
TREE_NEIGHBOUR_RADIUS = 2


def tree_coordinates(distances: np.ndarray, components: int = 4) -> np.ndarray:
    """[N, components] classical MDS coordinates of a tree's distance matrix."""
    d2 = np.asarray(distances, dtype=float) ** 2
    n = d2.shape[0]
    centre = np.eye(n) - 1.0 / n
    values, vectors = np.linalg.eigh(-0.5 * centre @ d2 @ centre)
    top = np.argsort(values)[::-1][:components]
    return vectors[:, top] * np.sqrt(np.clip(values[top], 0, None))


def tree_probe_r2(reps, distances: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated R^2 of a ridge probe onto :func:`tree_coordinates`."""
    return ridge_probe_r2(reps, tree_coordinates(distances), folds, seed)


def tree_metrics(reps, distances: np.ndarray, seed: int = 0) -> dict[str, float]:
    """All tree metrics of one tree order's representations (NaN where all coincide)."""
    if np.ptp(_np(reps), axis=0).max() < 1e-12:
        return {k: float("nan") for k in ("probe_r2", "neighbours", "isomap", "pca")}
    return {
        "probe_r2": tree_probe_r2(reps, distances, seed=seed),
        "neighbours": lattice_neighbour_fraction(reps, distances, TREE_NEIGHBOUR_RADIUS),
        "isomap": lattice_isomap_alignment(reps, distances),
        "pca": lattice_pca_alignment(reps, distances),
    }


# ---------------------------------------------------------------------- any order of a graph
def structure_metrics(reps, graph: Any, order: int, seed: int = 0) -> dict[str, float]:
    """:func:`ring_metrics`, :func:`lattice_metrics` or :func:`tree_metrics`, whichever
    ``order``'s shape needs."""
    if graph.shape(order) == "ring":
        return ring_metrics(reps, graph.positions[order], graph.n_entities, seed=seed)
    if graph.shape(order) == "tree":
        return tree_metrics(reps, graph.distances(order), seed=seed)
    return lattice_metrics(reps, graph.coordinates(order), _lattice_shape(graph),
                           graph.distances(order), seed=seed,
                           wrap=graph.shape(order) == "torus")  # fmt: skip


def structure_neighbours(reps, graph: Any, order: int) -> float:
    """The neighbour agreement of ``order``'s representations (ring, lattice or tree)."""
    if graph.shape(order) == "ring":
        return neighbour_fraction(reps, graph.positions[order], graph.n_entities)
    radius = TREE_NEIGHBOUR_RADIUS if graph.shape(order) == "tree" else 1
    return lattice_neighbour_fraction(reps, graph.distances(order), radius)


def structure_isomap(reps, graph: Any, order: int) -> float:
    """The Isomap alignment of ``order``'s representations (ring, lattice or tree)."""
    if graph.shape(order) == "ring":
        return isomap_alignment(reps, graph.positions[order], graph.n_entities)
    return lattice_isomap_alignment(reps, graph.distances(order))


def _lattice_shape(graph: Any) -> tuple[int, int]:
    return (graph.config.height, graph.config.width)
