"""Static figures (matplotlib, imported on use): entity representations in 2-D, per order.

Points are coloured by ring position with a cyclic colour map and joined in ring order, so a
learned ring reads as a closed loop whose colours run once around, and a shattered one as a
tangle (paper, Figure 1 and section 4).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kgshatter.analysis.geometry import ISOMAP_NEIGHBORS, circular_alignment, embed_2d


def ring_figure(
    panels: Mapping[str, tuple[Any, np.ndarray]],
    n_entities: int,
    method: str = "isomap",
    n_neighbors: int = ISOMAP_NEIGHBORS,
    title: str | None = None,
    ncols: int | None = None,
) -> Any:
    """One panel per entry ``label -> (representations [N, d], ring positions [N])``.

    Panels fill a grid of ``ncols`` columns (default: one row).
    """
    plt = pyplot()
    ncols = ncols or len(panels)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    points = None
    for ax, (label, (reps, positions)) in zip(axes.flat, panels.items(), strict=False):
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
