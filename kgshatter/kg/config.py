"""The knowledge-graph configuration (the paper's synthetic setup).

Everything marked *(choice)* in the docstrings is not specified by the paper and is ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kgshatter.validation import ConfigDict, check_fraction, check_int

STRUCTURES = ("cyclic", "torus", "grid", "mixed")
# the shape of each order under a structure: ``mixed`` alternates a ring (order I, the edited
# one), a torus (II), a ring (III), ...
SHAPES = ("ring", "torus", "grid")


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
            undefined and that fact does not exist. A tree (one-to-many inverse relations)
            is not available.
        width: the lattice's columns (``"torus"`` / ``"grid"`` / ``"mixed"`` only); it must
            divide ``n_entities``, and both sides must exceed ``2 * max_hops`` (on a torus so
            that opposite moves stay distinct, on a grid so that every move is defined
            somewhere on every row and column).
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
            raise ValueError(
                f"structure must be one of {STRUCTURES}, got {self.structure!r} (a tree is not "
                f"available: its inverse relations have several answers)"
            )
        if self.structure == "cyclic":
            if self.width is not None:
                raise ValueError(
                    f"width is the torus's; a cyclic graph has none (got width={self.width})"
                )
        else:
            if self.width is None:
                raise ValueError(
                    f"a {self.structure} graph needs width, the lattice's columns (a divisor of "
                    f"n_entities={self.n_entities}: {_divisors(self.n_entities, self.max_hops)})"
                )
            check_int("width", self.width, 1)
            allowed = _divisors(self.n_entities, self.max_hops)
            if self.width not in allowed:
                raise ValueError(
                    f"width must divide n_entities={self.n_entities} with both sides above "
                    f"2 * max_hops = {2 * self.max_hops}; allowed: {allowed or 'none'}, got "
                    f"{self.width}"
                )
        check_int("seed", self.seed, 0)

    def to_dict(self) -> dict[str, Any]:
        """As :class:`ConfigDict`, without ``width`` when unset (a cyclic graph's JSON, and so
        its fingerprint, is what it was before tori existed)."""
        out = super().to_dict()
        if out.get("width") is None:
            out.pop("width", None)
        return out

    def shape(self, order: int) -> str:
        """``"ring"``, ``"torus"`` or ``"grid"``: the structure of ``order``."""
        if self.structure == "cyclic":
            return "ring"
        if self.structure in ("torus", "grid"):
            return self.structure
        return "ring" if order % 2 == 0 else "torus"

    @property
    def height(self) -> int | None:
        """The lattice's rows (``None`` for a cyclic graph)."""
        return None if self.width is None else self.n_entities // self.width

    def max_distance(self, order: int) -> int:
        """The largest distance between two entities of ``order``: N // 2 on a ring,
        w // 2 + h // 2 on a torus, (w - 1) + (h - 1) on a grid."""
        if self.shape(order) == "ring":
            return self.n_entities // 2
        assert self.width is not None and self.height is not None
        if self.shape(order) == "grid":
            return self.width + self.height - 2
        return self.width // 2 + self.height // 2

    def relations_of(self, order: int) -> int:
        """How many relations ``order`` has: 2 per hop on a ring, 4 on a lattice."""
        return (2 if self.shape(order) == "ring" else 4) * self.max_hops

    @property
    def n_relations(self) -> int:
        return sum(self.relations_of(o) for o in range(self.n_orders))


def _divisors(n: int, max_hops: int) -> list[int]:
    """The widths that divide ``n`` with both sides above ``2 * max_hops``."""
    return [w for w in range(1, n + 1) if n % w == 0 and min(w, n // w) > 2 * max_hops]
