"""The knowledge-graph configuration (the paper's synthetic setup).

Everything marked *(choice)* in the docstrings is not specified by the paper and is ours.
"""

from __future__ import annotations

from dataclasses import dataclass

from kgshatter.validation import ConfigDict, check_fraction, check_int

STRUCTURES = ("cyclic",)


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
        structure: the graph family; only ``"cyclic"`` exists today.
        seed: seeds the ring permutations and the splits.
    """

    n_entities: int = 2048
    n_orders: int = 3
    max_hops: int = 4
    logical_holdout: float = 0.1
    compositional_holdout: float = 0.1
    compose_across_orders: bool = False
    structure: str = "cyclic"
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
        check_int("seed", self.seed, 0)

    @property
    def n_relations(self) -> int:
        return 2 * self.max_hops * self.n_orders
