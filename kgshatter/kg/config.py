"""The knowledge-graph configuration (the paper's synthetic setup).

Everything marked *(choice)* in the docstrings is not specified by the paper and is ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kgshatter.kg.tree import tree_depth, tree_diameter, tree_parent_reach
from kgshatter.validation import ConfigDict, check_fraction, check_int

STRUCTURES = ("cyclic", "torus", "grid", "mixed", "tree", "ring-tree")
# the shape of each order under a structure: ``mixed`` alternates a ring (order I, the edited
# one), a torus (II), a ring (III), ...; ``ring-tree`` a ring (I), a tree (II), a ring (III), ...
SHAPES = ("ring", "torus", "grid", "tree")
LATTICES = ("torus", "grid", "mixed")
TREES = ("tree", "ring-tree")


@dataclass(frozen=True, kw_only=True)
class KGConfig(ConfigDict):
    """A structured knowledge graph of entities on cyclic orders.

    Attributes:
        n_entities: entities N, one token each (paper: 2048).
        n_orders: independent cyclic orders (paper: 3, named I, II, III).
        max_hops: relations "k hops clockwise / anticlockwise" for k = 1..max_hops (paper: 4).
        logical_holdout: fraction of anticlockwise facts held out of training; their clockwise
            inverses stay in training, so answering them is logical inference *(choice: 0.1)*.
        compositional_holdout: fraction of two-hop queries ``x r1 r2`` held out of training
            *(choice: 0.1)*.
        compose_across_orders: whether two-hop steps may mix relations of different orders.
            Within one order a composition has a closed form on the ring (``C_i`` then ``C_j`` is
            ``C_(i+j)``), across orders it is a pure two-step lookup *(choice: False, so that
            compositional inference is per order and tied to the ring geometry)*.
        structure: the graph family. ``"cyclic"`` (the paper's): every order a ring;
            ``"torus"``: every order a ``width`` x ``N / width`` lattice that wraps in both
            directions, relations "k steps east / west / south / north" (``I_E2``, ``I_W2``,
            ``I_S2``, ``I_N2``); ``"mixed"``: rings and tori alternating (I ring, II torus,
            III ring), to see whether an edit's damage crosses from one structure to another;
            ``"grid"``: the lattice without wrapping (a sheet), so a move off the edge is
            undefined and that fact does not exist. ``"tree"``: every order a full
            ``branching``-ary tree over the N entities (site s's parent is ``(s - 1) //
            branching``), relations "k levels up" (``I_U1`` the parent, ``I_U2`` the
            grandparent; one answer, none at the root) and "k levels down" (``I_D1`` the
            children, ``I_D2`` the grandchildren: several answers, none at a leaf; any of
            them is a right answer); ``"ring-tree"``: rings and trees alternating (I ring, II
            tree, III ring).
        width: the lattice's columns (``"torus"`` / ``"grid"`` / ``"mixed"`` only); it must
            divide ``n_entities``, and both sides must exceed ``2 * max_hops`` (on a torus so
            that opposite moves stay distinct, on a grid so that every move is defined
            somewhere on every row and column).
        branching: the tree's children per inner node (``"tree"`` / ``"ring-tree"`` only);
            ``n_entities - 1`` must be a multiple of it (a full tree), and the deepest leaf
            must lie more than ``max_hops`` levels down (so that every relation exists).
        seed: seeds the ring and lattice permutations and the splits.
    """

    n_entities: int = 2048
    n_orders: int = 3
    max_hops: int = 4
    logical_holdout: float = 0.1
    compositional_holdout: float = 0.1
    compose_across_orders: bool = False
    structure: str = "cyclic"
    width: int | None = None
    branching: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("n_entities", self.n_entities, 3)
        check_int("n_orders", self.n_orders, 1)
        if self.n_orders > 39:
            raise ValueError(
                f"n_orders must be in [1, 39] (Roman-numeral names), got {self.n_orders}"
            )
        check_int("max_hops", self.max_hops, 1)
        # k and N - k hops would name the same move; k < N/2 keeps every relation distinct.
        if 2 * self.max_hops >= self.n_entities:
            raise ValueError(
                f"max_hops must be < n_entities / 2 so that clockwise and anticlockwise relations "
                f"stay distinct, got max_hops={self.max_hops} for n_entities={self.n_entities} "
                f"(allowed: 1..{(self.n_entities - 1) // 2})"
            )
        check_fraction("logical_holdout", self.logical_holdout)
        check_fraction("compositional_holdout", self.compositional_holdout)
        if not isinstance(self.compose_across_orders, bool):
            raise ValueError(
                f"compose_across_orders must be a bool, got {self.compose_across_orders!r}"
            )
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {self.structure!r}")
        self._check_size(
            "width",
            LATTICES,
            "the lattice's columns",
            "a divisor of n_entities="
            f"{self.n_entities} with both sides above 2 * max_hops = "
            f"{2 * self.max_hops}",
            _divisors(self.n_entities, self.max_hops),
            1,
        )
        self._check_size("branching", TREES, "the children per inner node", "a divisor of "
                         f"n_entities - 1 = {self.n_entities - 1} (a full tree) that leaves the "
                         f"deepest leaf more than max_hops={self.max_hops} levels down",
                         _branchings(self.n_entities, self.max_hops), 2)  # fmt: skip
        check_int("seed", self.seed, 0)

    def _check_size(self, name: str, owners: tuple[str, ...], meaning: str, rule: str,
                    allowed: list[int], minimum: int) -> None:  # fmt: skip
        """``width`` / ``branching``: given exactly for the structures in ``owners``, and one
        of ``allowed`` (``rule`` says which ones fit)."""
        value = getattr(self, name)
        if self.structure not in owners:
            if value is not None:
                raise ValueError(
                    f"{name} belongs to {', '.join(owners)} graphs; a {self.structure} graph "
                    f"has none (got {name}={value})"
                )
            return
        if value is None:
            raise ValueError(
                f"a {self.structure} graph needs {name}, {meaning} ({rule}: {allowed or 'none'})"
            )
        check_int(name, value, minimum)
        if value not in allowed:
            raise ValueError(f"{name} must be {rule}; allowed: {allowed or 'none'}, got {value}")

    def to_dict(self) -> dict[str, Any]:
        """As :class:`ConfigDict`, without ``width`` / ``branching`` when unset (a cyclic
        graph's JSON, and so its fingerprint, is what it was before tori and trees existed)."""
        out = super().to_dict()
        for name in ("width", "branching"):
            if out.get(name) is None:
                out.pop(name, None)
        return out

    def shape(self, order: int) -> str:
        """``"ring"``, ``"torus"``, ``"grid"`` or ``"tree"``: the structure of ``order``."""
        if self.structure == "cyclic":
            return "ring"
        if self.structure in ("torus", "grid", "tree"):
            return self.structure
        if order % 2 == 0:
            return "ring"
        return "torus" if self.structure == "mixed" else "tree"

    @property
    def height(self) -> int | None:
        """The lattice's rows (``None`` without a lattice)."""
        return None if self.width is None else self.n_entities // self.width

    def max_distance(self, order: int) -> int:
        """The largest distance between two entities of ``order``: N // 2 on a ring,
        w // 2 + h // 2 on a torus, (w - 1) + (h - 1) on a grid."""
        if self.shape(order) == "ring":
            return self.n_entities // 2
        if self.shape(order) == "tree":
            assert self.branching is not None
            return tree_diameter(self.n_entities, self.branching)
        assert self.width is not None and self.height is not None
        if self.shape(order) == "grid":
            return self.width + self.height - 2
        return self.width // 2 + self.height // 2

    def max_edit_distance(self, order: int) -> int:
        """The largest counterfactual edit distance ``order`` allows: :meth:`max_distance`,
        except on a tree, whose edits move a parent (an inner site): the farthest any site lies
        from an inner one."""
        if self.shape(order) == "tree":
            assert self.branching is not None
            return tree_parent_reach(self.n_entities, self.branching)
        return self.max_distance(order)

    def relations_of(self, order: int) -> int:
        """How many relations ``order`` has: 2 per hop on a ring or a tree (up and down), 4 on
        a lattice."""
        return (2 if self.shape(order) in ("ring", "tree") else 4) * self.max_hops

    @property
    def n_relations(self) -> int:
        return sum(self.relations_of(o) for o in range(self.n_orders))


def _divisors(n: int, max_hops: int) -> list[int]:
    """The widths that divide ``n`` with both sides above ``2 * max_hops``."""
    return [w for w in range(1, n + 1) if n % w == 0 and min(w, n // w) > 2 * max_hops]


def _branchings(n: int, max_hops: int) -> list[int]:
    """The branchings that make a full tree of ``n`` sites with leaves below ``max_hops``."""
    return [
        b
        for b in range(2, n)
        if (n - 1) % b == 0 and int(tree_depth(np.array([n - 1]), b)[0]) > max_hops
    ]
