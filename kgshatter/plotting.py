"""Static figures (matplotlib, imported on use): entity representations in 2-D, per order.

Points are coloured by ring position with a cyclic colour map and joined in ring order, so a
learned ring reads as a closed loop whose colours run once around, and a shattered one as a
tangle (paper, Figure 1 and section 4). A torus order's panel (a third tuple element: the
lattice width) joins lattice neighbours along rows and columns and colours points by column,
so a learned lattice reads as a mesh (a 2-D Isomap flattens the torus, folding it) and a
shattered one as a tangle; a tree order's joins parent and child and colours each of the
root's subtrees, so a learned tree reads as clusters.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kgshatter.analysis.geometry import ISOMAP_NEIGHBORS, circular_alignment, embed_2d


def ring_figure(
    panels: Mapping[str, tuple[Any, np.ndarray] | tuple[Any, np.ndarray, Any]],
    n_entities: int,
    method: str = "isomap",
    n_neighbors: int = ISOMAP_NEIGHBORS,
    title: str | None = None,
    ncols: int | None = None,
) -> Any:
    """One panel per entry ``label -> (representations [N, d], ring positions [N])``, or for a
    torus order ``(representations, lattice sites [N], width)`` (a grid's: ``-width``; a
    tree's: ``(representations, tree sites [N], ("tree", branching))``).

    Panels fill a grid of ``ncols`` columns (default: one row).
    """
    plt = pyplot()
    ncols = ncols or len(panels)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    points = None
    for ax, (label, panel) in zip(axes.flat, panels.items(), strict=False):
        reps, positions = panel[0], panel[1]
        width = panel[2] if len(panel) > 2 else None
        if isinstance(width, tuple):  # ("tree", branching)
            _tree_panel(ax, reps, np.asarray(positions), int(width[1]), label, method,
                        n_neighbors)  # fmt: skip
            continue
        if width is not None:  # a lattice: a negative width marks a grid (no wrapping)
            _lattice_panel(ax, reps, np.asarray(positions), abs(width), label, method,
                           n_neighbors, wrap=width > 0)  # fmt: skip
            continue
        xy = embed_2d(reps, method, n_neighbors)
        order = np.argsort(positions)
        loop = np.append(order, order[0])
        ax.plot(xy[loop, 0], xy[loop, 1], color="0.8", lw=0.6, zorder=1)
        points = ax.scatter(
            xy[:, 0],
            xy[:, 1],
            c=np.asarray(positions),
            cmap="twilight",
            vmin=0,
            vmax=n_entities,
            s=14,
            zorder=2,
        )
        score = circular_alignment(xy, positions, n_entities)
        ax.set_title(f"{label}\n{method} alignment {score:.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal", adjustable="datalim")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if points is not None:  # the colour key: where each entity sits on its order's ring
        bar = fig.colorbar(points, ax=axes.ravel().tolist(), shrink=0.8, pad=0.02)
        bar.set_label(f"ring position (0..{n_entities - 1}; grey line joins ring neighbours)")
    return fig


def _lattice_panel(ax: Any, reps: Any, sites: np.ndarray, width: int, label: str, method: str,
                   n_neighbors: int, wrap: bool = True) -> None:  # fmt: skip
    """A torus (or, ``wrap=False``, grid) order in 2-D: lattice neighbours joined, points
    coloured by column."""
    from kgshatter.analysis.geometry import lattice_isomap_alignment
    from kgshatter.kg.graph import lattice_distances

    xy = embed_2d(reps, method, max(n_neighbors, 4))
    n = len(sites)
    height = n // width
    at = np.empty(n, dtype=np.int64)
    at[sites] = np.arange(n)  # site -> entity
    for site in range(n):
        row, col = divmod(site, width)
        for r2, c2 in ((row, col + 1), (row + 1, col)):
            if not wrap and (r2 >= height or c2 >= width):
                continue  # a grid's edge
            a, b = at[site], at[(r2 % height) * width + c2 % width]
            ax.plot(xy[[a, b], 0], xy[[a, b], 1], color="0.85", lw=0.5, zorder=1)
    ax.scatter(xy[:, 0], xy[:, 1], c=sites % width, cmap="twilight", s=14, zorder=2)
    score = lattice_isomap_alignment(reps, lattice_distances(sites, sites, width, height, wrap))
    kind = "torus" if wrap else "grid"
    ax.set_title(f"{label}\n{width}x{height} {kind}, isomap geodesic rho {score:.2f}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")


def _tree_panel(ax: Any, reps: Any, sites: np.ndarray, branching: int, label: str, method: str,
                n_neighbors: int) -> None:  # fmt: skip
    """A tree order in 2-D: parent and child joined, points coloured by the root's subtree
    they lie in (a learned tree reads as clusters, one per subtree)."""
    from kgshatter.analysis.geometry import lattice_isomap_alignment
    from kgshatter.kg.tree import tree_distances

    xy = embed_2d(reps, method, max(n_neighbors, 4))
    n = len(sites)
    at = np.empty(n, dtype=np.int64)
    at[sites] = np.arange(n)  # site -> entity
    for site in range(1, n):
        a, b = at[site], at[(site - 1) // branching]
        ax.plot(xy[[a, b], 0], xy[[a, b], 1], color="0.85", lw=0.5, zorder=1)
    top = np.asarray(sites).copy()  # the root's child above each site (the root: itself)
    while (top > branching).any():
        up = top > branching
        top[up] = (top[up] - 1) // branching
    ax.scatter(xy[:, 0], xy[:, 1], c=top, cmap="tab10", s=14, zorder=2)
    score = lattice_isomap_alignment(reps, tree_distances(sites, sites, branching))
    ax.set_title(f"{label}\n{branching}-ary tree, isomap geodesic rho {score:.2f}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")


def panel_width(graph: Any, order: int) -> int | tuple[str, int] | None:
    """The third element of ``order``'s :func:`ring_figure` panel: the lattice width on a
    torus, minus it on a grid, ``("tree", branching)`` on a tree, ``None`` on a ring."""
    shape = graph.shape(order)
    if shape == "ring":
        return None
    if shape == "tree":
        return ("tree", graph.config.branching)
    return graph.config.width if shape == "torus" else -graph.config.width


def pyplot() -> Any:
    """``matplotlib.pyplot``: on the non-interactive Agg backend in scripts, and on whatever
    backend a Jupyter kernel chose (inline figures) in notebooks."""
    import sys

    import matplotlib

    if "ipykernel" not in sys.modules:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Save a figure atomically and close it."""
    import matplotlib.pyplot as plt

    from kgshatter.io import write_atomic

    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".")))
    plt.close(fig)
    return path
