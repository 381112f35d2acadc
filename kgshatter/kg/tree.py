"""Heap-laid trees: site 0 is the root and site s's parent is ``(s - 1) // branching``.

A tree order (``KGConfig(structure="tree")``) places its N entities on the sites of the full
``branching``-ary tree; these functions are its geometry, on sites (not entities).
"""

from __future__ import annotations

import numpy as np


def tree_depth(sites: np.ndarray, branching: int) -> np.ndarray:
    """The depth of each site (the root's is 0).

    >>> tree_depth(np.arange(7), 2).tolist()
    [0, 1, 1, 2, 2, 2, 2]
    """
    cur = np.array(sites, dtype=np.int64)
    depth = np.zeros_like(cur)
    while (cur > 0).any():
        up = cur > 0
        depth[up] += 1
        cur[up] = (cur[up] - 1) // branching
    return depth


def tree_ancestor(sites: np.ndarray, k: int, branching: int) -> np.ndarray:
    """Each site's ancestor ``k`` levels up (-1 where the site is less than ``k`` deep).

    >>> tree_ancestor(np.arange(7), 2, 2).tolist()
    [-1, -1, -1, 0, 0, 0, 0]
    """
    cur = np.array(sites, dtype=np.int64)
    for _ in range(k):
        cur = np.where(cur > 0, (cur - 1) // branching, -1)
    return cur


def tree_distances(a: np.ndarray, b: np.ndarray, branching: int) -> np.ndarray:
    """[len(a), len(b)] path lengths between sites (up to the lowest common ancestor and down).

    >>> tree_distances(np.array([3]), np.arange(7), 2).tolist()
    [[2, 1, 3, 0, 2, 4, 4]]
    """
    x = np.broadcast_to(np.asarray(a, dtype=np.int64)[:, None], (len(a), len(b))).copy()
    y = np.broadcast_to(np.asarray(b, dtype=np.int64)[None, :], x.shape).copy()
    dx, dy = tree_depth(x, branching), tree_depth(y, branching)
    steps = np.zeros_like(x)
    while (x != y).any():  # lift the deeper of the two (both when level) until they meet
        differ = x != y
        lift_x = differ & (dx >= dy)
        lift_y = differ & (dy >= dx)
        x[lift_x] = (x[lift_x] - 1) // branching
        dx[lift_x] -= 1
        y[lift_y] = (y[lift_y] - 1) // branching
        dy[lift_y] -= 1
        steps += lift_x.astype(np.int64) + lift_y.astype(np.int64)
    return steps


def tree_diameter(n: int, branching: int) -> int:
    """The longest path between two of the ``n`` sites (two sweeps: the farthest site from the
    root ends a longest path; the farthest from it, the other end)."""
    sites = np.arange(n)
    end = int(np.argmax(tree_depth(sites, branching)))
    return int(tree_distances(np.array([end]), sites, branching).max())


def tree_parent_reach(n: int, branching: int) -> int:
    """The farthest any site lies from an inner site (one with children): how far a new
    parent can be from the old one."""
    inner = np.arange((n - 2) // branching + 1)
    return int(tree_distances(inner, np.arange(n), branching).max())
