"""The structured knowledge graph: entities on cyclic orders, relations, facts and splits.

Paper (arXiv 2410.17194, section 3): N entities, K independent random cyclic orders; per order the
relations "k hops clockwise" (``I_C2``) and "k hops anticlockwise" (``I_A2``). Order I is the edit
sub-graph, II the retain sub-graph, III the test sub-graph.

Relations are stored as lookup tables ``table[r, x] = y`` (``-1`` where undefined), so callers never
depend on the ring arithmetic: another structure only has to fill the same tables and say how far
apart two entities are (:meth:`KnowledgeGraph.distance`). Besides rings there are tori
(``KGConfig(structure="torus", width=w)``): each order places the N entities on a ``w`` x ``N/w``
lattice that wraps both ways, with relations "k steps east / west / south / north" (``I_E2``,
``I_W2``, ``I_S2``, ``I_N2``), each the inverse of its opposite, so every relation is a bijection
like a ring's and the walks, splits and evaluation apply unchanged; ``structure="mixed"``
alternates rings and tori; ``structure="grid"`` is the lattice without wrapping, where a move
off the edge is undefined (``-1``): those facts do not exist, and the splits, walks and
two-hop queries use only defined ones. ``structure="tree"`` places each order's entities on a
full tree (``kgshatter.kg.tree``) with relations "k levels up" (one answer) and "k levels
down" (several: :attr:`KnowledgeGraph.multi_valued`, :meth:`KnowledgeGraph.accepts`);
``"ring-tree"`` alternates rings and trees. ``rings[o]`` is order o's layout (ring position,
lattice site ``row * w + column`` or tree site, to entity) and ``positions[o]`` its inverse.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from kgshatter.io import write_json_atomic
from kgshatter.kg.config import KGConfig
from kgshatter.kg.tree import tree_ancestor, tree_depth, tree_distances

GRAPH_FORMAT = "kgshatter.graph/1"
ROLES = ("edit", "retain", "test")

# a relation or entity as a name ("I_C1", "e0042") or an index (Python or numpy integer)
NameOrIndex = str | int | np.integer

_ROMAN = [(10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]


def roman(n: int) -> str:
    """Roman numeral of a 1-based order index.

    >>> [roman(i) for i in (1, 2, 3, 4, 9, 14)]
    ['I', 'II', 'III', 'IV', 'IX', 'XIV']
    """
    out = []
    for value, symbol in _ROMAN:
        while n >= value:
            out.append(symbol)
            n -= value
    return "".join(out)


@dataclass(frozen=True)
class Relation:
    """One relation: ``hops`` steps ``direction`` (+1 clockwise, -1 anticlockwise) on ``order``.

    On a lattice (torus or grid) ``axis`` 0 moves along a row (+1 east, -1 west) and ``axis`` 1
    along a column (+1 south, -1 north); a ring has only axis 0.
    """

    index: int
    name: str
    order: int
    direction: int
    hops: int
    axis: int = 0

    @property
    def shift(self) -> int:
        """Signed displacement along the axis: C2 -> +2, A3 -> -3 (E2 -> +2, N1 -> -1)."""
        return self.direction * self.hops


# a move's letter per (shape, axis, direction)
_LETTERS = {
    ("ring", 0, 1): "C",
    ("ring", 0, -1): "A",
    ("torus", 0, 1): "E",
    ("torus", 0, -1): "W",
    ("torus", 1, 1): "S",
    ("torus", 1, -1): "N",
    ("grid", 0, 1): "E",
    ("grid", 0, -1): "W",
    ("grid", 1, 1): "S",
    ("grid", 1, -1): "N",
    ("tree", 0, 1): "D",
    ("tree", 0, -1): "U",
}


def relation_name(order: int, direction: int, hops: int, axis: int = 0, shape: str = "ring") -> str:
    """``relation_name(0, -1, 4) == 'I_A4'``; on a torus ``relation_name(1, 1, 2, 1, "torus")``
    is ``'II_S2'``."""
    return f"{roman(order + 1)}_{_LETTERS[(shape, axis, 1 if direction > 0 else -1)]}{hops}"


class KnowledgeGraph:
    """Entities, relations, facts and the train / held-out splits of one knowledge graph.

    Build one with :meth:`from_config` (seeded) or :meth:`load` (JSON written by :meth:`save`).
    The object is immutable by convention: arrays are marked read-only.
    """

    def __init__(
        self,
        config: KGConfig,
        rings: np.ndarray,
        logical_heldout: np.ndarray,
        compositional_heldout: np.ndarray,
    ) -> None:
        n, k = config.n_entities, config.n_orders
        rings = np.asarray(rings, dtype=np.int64)
        if rings.shape != (k, n):
            raise ValueError(
                f"rings must have shape (n_orders={k}, n_entities={n}), got {rings.shape}"
            )
        for o in range(k):
            if not np.array_equal(np.sort(rings[o]), np.arange(n)):
                raise ValueError(f"ring {roman(o + 1)} is not a permutation of the {n} entities")
        self.config = config
        self.rings = _readonly(rings)
        positions = np.empty_like(rings)
        for o in range(k):
            positions[o, rings[o]] = np.arange(n)
        self.positions = _readonly(positions)

        rels: list[Relation] = []
        for o in range(k):
            shape = config.shape(o)
            for axis in (0, 1) if shape in ("torus", "grid") else (0,):
                for direction in (1, -1):
                    for h in range(1, config.max_hops + 1):
                        name = relation_name(o, direction, h, axis, shape)
                        rels.append(Relation(len(rels), name, o, direction, h, axis))
        self.relations: tuple[Relation, ...] = tuple(rels)
        self._by_name = {r.name: r for r in rels}

        table = np.empty((len(rels), n), dtype=np.int64)
        for r in rels:
            moved = self._moved(positions[r.order], r)  # -1: off a grid's edge
            table[r.index] = np.where(moved >= 0, rings[r.order, moved.clip(min=0)], -1)
        self.table = _readonly(table)

        self.logical_heldout = _readonly(
            _as_mask(logical_heldout, (len(rels), n), "logical_heldout")
        )
        if self.logical_heldout[[r.index for r in rels if r.direction > 0]].any():
            raise ValueError("logical_heldout may only hold anticlockwise facts")
        if (self.logical_heldout & (self.table < 0)).any():
            raise ValueError("logical_heldout holds a fact that does not exist (off the grid)")
        self.compositional_heldout = _readonly(
            _as_mask(compositional_heldout, (len(rels), len(rels), n), "compositional_heldout")
        )
        if (self.compositional_heldout & ~self.composable).any():
            raise ValueError("compositional_heldout holds a two-hop query that is not composable")

    def _moved(self, sites: np.ndarray, r: Relation) -> np.ndarray:
        """Where relation ``r`` moves each position / lattice site of its order (-1: off a
        grid's edge)."""
        n = self.config.n_entities
        shape = self.config.shape(r.order)
        if shape == "ring":
            return (sites + r.shift) % n
        if shape == "tree":  # up: the ancestor; down: the first descendant (see answers)
            b = self.config.branching
            assert b is not None
            if r.direction < 0:
                return tree_ancestor(sites, r.hops, b)
            first = sites * b**r.hops + (b**r.hops - 1) // (b - 1)
            return np.where(first < n, first, -1)
        w, h = self.config.width, self.config.height
        assert w is not None and h is not None
        row, col = np.divmod(sites, w)
        if r.axis == 0:
            col = col + r.shift
        else:
            row = row + r.shift
        if shape == "torus":
            return (row % h) * w + col % w
        inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
        return np.where(inside, row * w + col, -1)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: KGConfig) -> KnowledgeGraph:
        """Sample rings and splits from ``config.seed`` (numpy PCG64; global RNGs untouched)."""
        rng = np.random.default_rng(config.seed)
        n = config.n_entities
        rings = np.stack([rng.permutation(n) for _ in range(config.n_orders)])
        skeleton = cls(
            config,
            rings,
            np.zeros((config.n_relations, n), dtype=bool),
            np.zeros((config.n_relations, config.n_relations, n), dtype=bool),
        )
        logical = np.zeros((config.n_relations, n), dtype=bool)
        defined = skeleton.table >= 0  # every fact but a grid's moves off its edge
        for r in skeleton.relations:
            exists = np.flatnonzero(defined[r.index])
            n_hold = int(round(config.logical_holdout * exists.size))
            if r.direction < 0 and n_hold:
                pick = rng.choice(n, size=n_hold, replace=False) if exists.size == n else (
                    exists[rng.choice(exists.size, size=n_hold, replace=False)])  # fmt: skip
                logical[r.index, pick] = True
        # Two-hop queries are held out only where both hops are trained facts, so that answering
        # them needs composition and nothing else.
        trained = ~logical & defined
        both = (
            skeleton.composable & trained[:, None, :] & _second_hop_trained(trained, skeleton.table)
        )
        candidates = np.flatnonzero(both)
        n_comp = int(round(config.compositional_holdout * candidates.size))
        comp = np.zeros(both.size, dtype=bool)
        if n_comp:
            comp[rng.choice(candidates, size=n_comp, replace=False)] = True
        return cls(config, rings, logical, comp.reshape(both.shape))

    # ------------------------------------------------------------------ names and lookup
    @property
    def n_entities(self) -> int:
        return self.config.n_entities

    @property
    def n_relations(self) -> int:
        return len(self.relations)

    @property
    def n_orders(self) -> int:
        return self.config.n_orders

    @property
    def relation_names(self) -> list[str]:
        return [r.name for r in self.relations]

    def order_name(self, order: int) -> str:
        return roman(order + 1)

    def role(self, order: int) -> str:
        """Edit / retain / test role of an order (paper: I / II / III); ``extra`` beyond."""
        self._check_order(order)
        return ROLES[order] if order < len(ROLES) else "extra"

    def relation(self, name_or_index: NameOrIndex) -> Relation:
        if isinstance(name_or_index, str):
            try:
                return self._by_name[name_or_index]
            except KeyError:
                raise ValueError(
                    f"unknown relation {name_or_index!r}; this graph has {self.n_relations} "
                    f"relations: {', '.join(self.relation_names)}"
                ) from None
        if isinstance(name_or_index, (int, np.integer)) and 0 <= name_or_index < self.n_relations:
            return self.relations[int(name_or_index)]
        raise ValueError(
            f"relation index must be in [0, {self.n_relations - 1}], got {name_or_index!r}"
        )

    def entity_name(self, entity: int) -> str:
        self._check_entity(entity)
        width = len(str(self.n_entities - 1))
        return f"e{entity:0{width}d}"

    def entity(self, name_or_index: NameOrIndex) -> int:
        """Entity index from a name such as ``e0042`` or from an index."""
        if isinstance(name_or_index, str):
            body = name_or_index[1:] if name_or_index.startswith("e") else ""
            if body.isdigit() and int(body) < self.n_entities:
                return int(body)
            raise ValueError(
                f"unknown entity {name_or_index!r}; entities are named e0..e{self.n_entities - 1} "
                f"(zero-padded, e.g. {self.entity_name(0)!r})"
            )
        self._check_entity(name_or_index)
        return int(name_or_index)

    # ------------------------------------------------------------------ algebra
    def apply(self, relation: NameOrIndex, entity: NameOrIndex) -> int:
        """``r(x)``: the entity the fact ``(x, r, ?)`` points to."""
        return int(self.table[self.relation(relation).index, self.entity(entity)])

    def inverse(self, relation: NameOrIndex) -> Relation:
        """The inverse relation: ``I_C2`` <-> ``I_A2`` (``E`` <-> ``W``, ``S`` <-> ``N``)."""
        r = self.relation(relation)
        return self.relation(
            relation_name(r.order, -r.direction, r.hops, r.axis, self.shape(r.order))
        )

    def compose(self, first: NameOrIndex, second: NameOrIndex) -> np.ndarray:
        """Table of ``second(first(x))`` for every x, shape [N]."""
        a, b = self.relation(first), self.relation(second)
        return self.table[b.index, self.table[a.index]]

    def closed_form(self, first: NameOrIndex, second: NameOrIndex) -> Relation | None:
        """The single relation equal to ``first`` then ``second``, if one exists.

        Within one order ``C_i`` then ``C_j`` is ``C_(i+j)`` (while ``i + j <= max_hops``);
        across orders there is none.
        """
        a, b = self.relation(first), self.relation(second)
        shift = a.shift + b.shift
        if a.order != b.order or a.axis != b.axis:  # a torus move along two axes has no name
            return None
        if self.multi_valued[a.index] or self.multi_valued[b.index]:
            return None  # a tree's step down has several answers: no single relation
        if shift == 0 or abs(shift) > self.config.max_hops:
            return None
        shape = self.shape(a.order)
        return self.relation(relation_name(a.order, 1 if shift > 0 else -1, abs(shift), a.axis,
                                           shape))  # fmt: skip

    @cached_property
    def composable(self) -> np.ndarray:
        """[R, R, N] mask of valid two-hop queries ``x r1 r2``: both hops exist, and (unless
        configured) both relations belong to one order."""
        orders = np.array([r.order for r in self.relations])
        pair = np.ones((self.n_relations,) * 2, dtype=bool)
        if not self.config.compose_across_orders:
            pair = orders[:, None] == orders[None, :]
        # a two-hop query needs one answer: no step with several (a tree's step down)
        pair &= ~self.multi_valued[:, None] & ~self.multi_valued[None, :]
        mask = np.broadcast_to(pair[:, :, None], pair.shape + (self.n_entities,)).copy()
        defined = self.table >= 0
        if not defined.all():  # a grid: x r1 must exist, and r1(x) r2 too
            mask &= defined[:, None, :] & _second_hop_trained(defined, self.table)
        return _readonly(mask)

    @cached_property
    def multi_valued(self) -> np.ndarray:
        """[R] bool: relations with several answers per subject (a tree's "k levels down"),
        whose ``table`` holds one of them (the first descendant) and :meth:`answers` all."""
        return _readonly(
            np.array(
                [self.shape(r.order) == "tree" and r.direction > 0 for r in self.relations],
                dtype=bool,
            )
        )

    @cached_property
    def inverse_index(self) -> np.ndarray:
        """[R] the index of each relation's :meth:`inverse`."""
        return _readonly(
            np.array([self.inverse(r.index).index for r in self.relations], dtype=np.int64)
        )

    def accepts(self, relations: Any, subjects: Any, answers: Any) -> np.ndarray:
        """Whether each ``answers[i]`` is a right answer of the fact ``(subjects[i],
        relations[i])`` (arrays of equal length; an answer outside the entities is wrong).
        A one-answer relation accepts its ``table`` entry only; a several-answer one every
        entity ``y`` whose inverse fact leads back to the subject (a tree's children: those
        whose parent is the subject)."""
        r = np.asarray(relations, dtype=np.int64)
        x = np.asarray(subjects, dtype=np.int64)
        y = np.asarray(answers, dtype=np.int64)
        inside = (y >= 0) & (y < self.n_entities)
        safe = np.where(inside, y, 0)
        single = self.table[r, x] == y
        multi = self.table[self.inverse_index[r], safe] == x
        return inside & (self.table[r, x] >= 0) & np.where(self.multi_valued[r], multi, single)

    def answers(self, relation: NameOrIndex, entity: NameOrIndex) -> np.ndarray:
        """Every right answer of ``(entity, relation)``, sorted (empty where none exists)."""
        r, x = self.relation(relation), self.entity(entity)
        if not self.multi_valued[r.index]:
            y = self.table[r.index, x]
            return np.array([y] if y >= 0 else [], dtype=np.int64)
        return np.flatnonzero(self.table[self.inverse_index[r.index]] == x)

    def edit_distance(self, relation: NameOrIndex, y: NameOrIndex, y_new: NameOrIndex) -> int:
        """How far apart two answers lie in the structure of ``relation``'s order (paper's d:
        the cyclic distance on a ring; on a torus the wrapped Manhattan distance, on a grid the
        Manhattan distance)."""
        r = self.relation(relation)
        return self.distance(r.order, self.entity(y), self.entity(y_new))

    # ------------------------------------------------------------------ geometry
    def shape(self, order: int) -> str:
        """``"ring"``, ``"torus"``, ``"grid"`` or ``"tree"``."""
        self._check_order(order)
        return self.config.shape(order)

    def distances(self, order: int, entities: np.ndarray | None = None) -> np.ndarray:
        """Distances in ``order``'s structure from each of ``entities`` (default: all) to every
        entity, shape [len(entities), N]."""
        self._check_order(order)
        pos = self.positions[order]
        rows = pos if entities is None else pos[np.asarray(entities, dtype=np.int64)]
        if self.shape(order) == "ring":
            diff = np.abs(rows[:, None] - pos[None, :])
            return np.minimum(diff, self.n_entities - diff)
        if self.shape(order) == "tree":
            assert self.config.branching is not None
            return tree_distances(rows, pos, self.config.branching)
        w, h = self.config.width, self.config.height
        assert w is not None and h is not None
        return lattice_distances(rows, pos, w, h, wrap=self.shape(order) == "torus")

    def distance(self, order: int, a: int, b: int) -> int:
        """The distance between entities ``a`` and ``b`` in ``order``'s structure."""
        return int(self.distances(order, np.array([self.entity(a)]))[0, self.entity(b)])

    def max_distance(self, order: int) -> int:
        """The largest distance in ``order``'s structure (N // 2 on a ring)."""
        self._check_order(order)
        return self.config.max_distance(order)

    def at_distance(self, order: int, entity: int, d: int) -> np.ndarray:
        """The entities exactly ``d`` away from ``entity`` in ``order``'s structure (sorted)."""
        return np.flatnonzero(self.distances(order, np.array([self.entity(entity)]))[0] == d)

    def coordinates(self, order: int) -> np.ndarray:
        """Each entity's place in ``order``: [N, 1] ring positions, [N, 2] (row, column) on a
        lattice, [N, 2] (depth, site) on a tree."""
        pos = self.positions[order]
        if self.shape(order) == "ring":
            return pos[:, None].copy()
        if self.shape(order) == "tree":
            assert self.config.branching is not None
            return np.stack([tree_depth(pos, self.config.branching), pos], axis=1)
        w = self.config.width
        assert w is not None
        return np.stack(np.divmod(pos, w), axis=1)

    # ------------------------------------------------------------------ facts and splits
    def facts(self) -> np.ndarray:
        """Every fact as rows ``(x, r, y)``, shape [R * N, 3], ordered by relation then x."""
        r, x = np.meshgrid(np.arange(self.n_relations), np.arange(self.n_entities), indexing="ij")
        return np.stack([x.ravel(), r.ravel(), self.table.ravel()], axis=1)

    @property
    def trained_facts_mask(self) -> np.ndarray:
        """[R, N]: facts that may appear in training walks (existing and not held out)."""
        return ~self.logical_heldout & (self.table >= 0)

    @property
    def trained_compositions_mask(self) -> np.ndarray:
        """[R, R, N]: two-hop steps ``x r1 r2 y`` that may appear in training walks."""
        trained = self.trained_facts_mask
        return (
            self.composable
            & ~self.compositional_heldout
            & trained[:, None, :]
            & _second_hop_trained(trained, self.table)
        )

    def split_facts(self, split: str) -> np.ndarray:
        """Rows of queries for one split.

        ``direct`` and ``logical``: ``(x, r, y)``; ``compositional``: ``(x, r1, r2, y)``.
        """
        if split == "direct":
            r, x = np.nonzero(self.trained_facts_mask)
            return np.stack([x, r, self.table[r, x]], axis=1)
        if split == "logical":
            r, x = np.nonzero(self.logical_heldout)
            return np.stack([x, r, self.table[r, x]], axis=1)
        if split == "compositional":
            r1, r2, x = np.nonzero(self.compositional_heldout)
            return np.stack([x, r1, r2, self.table[r2, self.table[r1, x]]], axis=1)
        raise ValueError(
            f"unknown split {split!r}; allowed: ['direct', 'logical', 'compositional']"
        )

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        r, x = np.nonzero(self.logical_heldout)
        r1, r2, cx = np.nonzero(self.compositional_heldout)
        return {
            "format": GRAPH_FORMAT,
            "config": self.config.to_dict(),
            "rings": self.rings.tolist(),
            "logical_heldout": np.stack([x, r], axis=1).tolist(),
            "compositional_heldout": np.stack([cx, r1, r2], axis=1).tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KnowledgeGraph:
        if not isinstance(data, dict) or data.get("format") != GRAPH_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(
                f"not a kgshatter graph: expected format {GRAPH_FORMAT!r}, got {found!r}"
            )
        config = KGConfig.from_dict(data["config"])
        n, nr = config.n_entities, config.n_relations
        logical = np.zeros((nr, n), dtype=bool)
        rows = np.asarray(data["logical_heldout"], dtype=np.int64).reshape(-1, 2)
        _check_rows(rows, (n, nr), "logical_heldout")
        logical[rows[:, 1], rows[:, 0]] = True
        comp = np.zeros((nr, nr, n), dtype=bool)
        rows = np.asarray(data["compositional_heldout"], dtype=np.int64).reshape(-1, 3)
        _check_rows(rows, (n, nr, nr), "compositional_heldout")
        comp[rows[:, 1], rows[:, 2], rows[:, 0]] = True
        return cls(config, np.asarray(data["rings"]), logical, comp)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the graph as JSON atomically (temp file + rename)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KnowledgeGraph:
        from kgshatter.io import read_json

        data = read_json(path, "graph")
        try:
            return cls.from_dict(data)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            why = f"lacks {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"graph at {path} is not a valid kgshatter graph: {why}") from None

    @cached_property
    def fingerprint(self) -> str:
        """Short content hash: equal fingerprints mean the same facts and splits."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KnowledgeGraph) and self.fingerprint == other.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"KnowledgeGraph({c.structure}, n_entities={c.n_entities}, orders={c.n_orders}, "
            f"relations={self.n_relations}, logical held out={int(self.logical_heldout.sum())}, "
            f"compositional held out={int(self.compositional_heldout.sum())}, seed={c.seed})"
        )

    # ------------------------------------------------------------------ checks
    def _check_entity(self, entity: Any) -> None:
        if isinstance(entity, bool) or not isinstance(entity, (int, np.integer)):
            raise ValueError(f"entity must be a name or an index, got {entity!r}")
        if not 0 <= entity < self.n_entities:
            raise ValueError(f"entity index must be in [0, {self.n_entities - 1}], got {entity}")

    def _check_order(self, order: int) -> None:
        if not 0 <= order < self.n_orders:
            raise ValueError(f"order must be in [0, {self.n_orders - 1}], got {order}")


def lattice_distances(
    a: np.ndarray, b: np.ndarray, width: int, height: int, wrap: bool
) -> np.ndarray:
    """[len(a), len(b)] Manhattan distances between lattice sites ``row * width + column``,
    wrapped both ways on a torus (``wrap``), plain on a grid."""
    (r0, c0), (r1, c1) = np.divmod(np.asarray(a), width), np.divmod(np.asarray(b), width)
    dr, dc = np.abs(r0[:, None] - r1[None, :]), np.abs(c0[:, None] - c1[None, :])
    if not wrap:
        return dr + dc
    return np.minimum(dr, height - dr) + np.minimum(dc, width - dc)


def _second_hop_trained(trained: np.ndarray, table: np.ndarray) -> np.ndarray:
    """[R1, R2, N] mask: the second hop ``(r1(x), r2)`` is a trained fact (never where
    ``r1(x)`` does not exist)."""
    # trained[r2, table[r1, x]] laid out as [r1, r2, x]
    second = trained[:, table.clip(min=0)].transpose(1, 0, 2)
    return second & (table >= 0)[:, None, :]


def _as_mask(mask: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != shape or mask.dtype != bool:
        raise ValueError(
            f"{name} must be a bool array of shape {shape}, got {mask.dtype} {mask.shape}"
        )
    return mask.copy()


def _check_rows(rows: np.ndarray, bounds: tuple[int, ...], name: str) -> None:
    for col, bound in enumerate(bounds):
        if rows.size and (rows[:, col].min() < 0 or rows[:, col].max() >= bound):
            raise ValueError(f"{name} column {col} must be in [0, {bound - 1}]")


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a
