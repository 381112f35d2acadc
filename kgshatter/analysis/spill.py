"""Where a rank-one MLP edit lands, by order: a prediction of cross-order damage before editing.

ROME (and each layer of MEMIT) adds ``u v^T`` to an MLP's output matrix with
``u = C^-1 k* / (k* . C^-1 k*)`` for the edited query's key ``k*`` and the keys' second moment
``C``: any other query with key ``k`` then moves by ``(k . u)`` times the edited query's move.
The mean ``|k . u|`` over every entity's queries of one order's relations (:func:`order_overlap`)
is how much of the edit reaches that order. On the paper-scale models it predicts which
orders an edit of order I shatters (docs/paper-scale/README.md, "Why order III shatters least"
and "Which training seeds shatter every order": an order I edit's overlaps 0.25 / 0.16 / 0.11
on orders I / II / III where the damage spread to every order, 0.17 / 0.02 / 0.02 and
0.16 / 0.04 / 0.04 on two training seeds where it stayed in order I; on the second of those an
order II edit's 0.11 / 0.24 / 0.22 foretold that it would shatter order III too, which it
did). :func:`order_moves` measures the same for an edit already made, whatever its form;
:func:`key_sharing` the overlaps of every order's edits on every order, the model's pattern of
shared keys (``kgshatter evaluate RUN --key-sharing``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float

from kgshatter.analysis.representations import collect_representations, entity_query_tokens
from kgshatter.kg.graph import KnowledgeGraph
from kgshatter.kg.walks import WalkSampler
from kgshatter.sites import Site

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def entity_keys(
    model: TransformerBridge,
    sampler: WalkSampler,
    relation: int,
    site: Site,
    position: str = "relation",
    n_prefixes: int = 5,
    seed: int = 1,
) -> Float[torch.Tensor, "entity d_key"]:
    """The activation at ``site`` (an edited matrix's key) of the query ``x relation`` for
    every entity x, read at ``position`` and averaged over ``n_prefixes`` random contexts (what
    the sweep's ``spill`` reads for the edited relation)."""
    tokens = entity_query_tokens(sampler, relation, n_prefixes, seed)
    return collect_representations(model, tokens, [site], position)[site]


def relation_keys(
    model: TransformerBridge,
    sampler: WalkSampler,
    layer: int,
    position: str = "relation",
    n_prefixes: int = 5,
    seed: int = 1,
    site: Site | None = None,
) -> Float[torch.Tensor, "relation entity d_mlp"]:
    """Block ``layer``'s MLP keys (``mlp_post``, or the key ``site`` named) of the query
    ``x r`` for every relation r and entity x (:func:`entity_keys` of every relation)."""
    site = site or Site(layer, "mlp_post")
    return torch.stack(
        [
            entity_keys(model, sampler, r, site, position, n_prefixes, seed)
            for r in range(sampler.graph.n_relations)
        ]
    )


def order_overlap(
    keys: Float[torch.Tensor, "relation entity d_mlp"],
    graph: KnowledgeGraph,
    subject: int,
    relation: int,
    c_inv: Float[torch.Tensor, "d_mlp d_mlp"],
) -> dict[str, float]:
    """Per order: the mean ``|k . C^-1 k*| / (k* . C^-1 k*)`` over the keys of every entity's
    queries of that order's relations, for a rank-one edit of ``(subject, relation)``.

    1 is a query the edit moves as much as the edited one; 0 one it leaves alone. ``c_inv`` is
    the inverse of the keys' second moment (the identity gives the plain key overlap).
    """
    _check_keys(keys, graph)
    k = keys.double()
    u = c_inv.double() @ k[relation, subject]
    moves = (k @ u).abs().mean(1) / float(k[relation, subject] @ u)  # [relation]
    return _mean_by_order(moves, graph)


def order_moves(
    keys: Float[torch.Tensor, "relation entity d_key"],
    graph: KnowledgeGraph,
    subject: int,
    relation: int,
    delta: Float[torch.Tensor, "d_key d_out"],
) -> dict[str, float]:
    """Per order: how far an edit that adds ``delta`` to a matrix read by these keys moves the
    output of every other query of that order's relations, as a mean fraction of the edited
    query's move (``||k . delta|| / ||k* . delta||``; the edited query itself left out).

    The measured counterpart of :func:`order_overlap`, for any delta (MEMIT's layer, PMET,
    fine-tuning); for a rank-one ROME delta ``u v^T`` with ``u = C^-1 k* / (k* . C^-1 k*)`` the
    two agree but for the edited query. The sweep records it per edit as ``spill.ORDER``.
    """
    _check_keys(keys, graph)
    moves = (keys.double() @ delta.double()).norm(dim=-1)  # [relation, entity]
    edited = float(moves[relation, subject])
    if edited == 0:
        return {graph.order_name(o): math.nan for o in range(graph.n_orders)}
    moves = moves / edited
    moves[relation, subject] = math.nan
    return _mean_by_order(moves, graph)


def key_sharing(
    keys: Float[torch.Tensor, "relation entity d_mlp"],
    graph: KnowledgeGraph,
    c_inv: Float[torch.Tensor, "d_mlp d_mlp"],
    n_subjects: int = 64,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Which orders share the keys, before any edit: ``{edited order: {order: overlap}}``.

    For rank-one edits of each order's facts (every relation of that order, with ``n_subjects``
    seeded subjects; all of them when ``n_subjects >= n_entities``), the mean
    :func:`order_overlap` on every order. An order whose overlap is near the edited order's
    own shares its keys and shatters with it; one near 0 is kept apart (docs/paper-scale,
    "Which training seeds shatter every order"). Needs only the keys and C, so it reads a
    checkpoint early in training as well as a finished one.
    """
    _check_keys(keys, graph)
    if not (isinstance(n_subjects, int) and n_subjects >= 1):
        raise ValueError(f"n_subjects must be a positive int, got {n_subjects!r}")
    picked = np.random.default_rng(seed).permutation(graph.n_entities)[:n_subjects]
    subjects = torch.from_numpy(np.sort(picked))
    k, ci = keys.double(), c_inv.double()
    result = {}
    for o, relations in enumerate(_relations_by_order(graph)):
        edited = k[relations][:, subjects].reshape(-1, k.shape[-1])  # [m, d]
        u = edited @ ci.T  # row i: (C^-1 k*_i)^T
        own = (edited * u).sum(-1)  # k*_i . C^-1 k*_i
        total = torch.zeros(graph.n_relations, dtype=torch.float64)
        for lo in range(0, len(edited), 64):  # [relation, entity, 64] at a time
            total += ((k @ u[lo : lo + 64].T).abs() / own[lo : lo + 64]).mean(1).sum(1)
        result[graph.order_name(o)] = _mean_by_order(total / len(edited), graph)
    return result


def mean_key_cosine(
    keys: Float[torch.Tensor, "relation entity d_mlp"], graph: KnowledgeGraph, order: int = 0
) -> dict[str, float]:
    """Per order: the mean cosine between the mean key (over entities) of each relation of
    ``order`` and that of each other relation of the order named (how much the two orders
    share the MLP's key space)."""
    mean = keys.double().mean(1)
    by_order = _relations_by_order(graph)
    result = {}
    for o, relations in enumerate(by_order):
        cos = [
            float(torch.cosine_similarity(mean[a], mean[b], dim=0))
            for a in by_order[order]
            for b in relations
            if a != b
        ]
        result[graph.order_name(o)] = sum(cos) / len(cos) if cos else float("nan")
    return result


def _check_keys(keys: torch.Tensor, graph: KnowledgeGraph) -> None:
    if keys.shape[:2] != (graph.n_relations, graph.n_entities):
        raise ValueError(
            f"keys must be [relation, entity, d] = [{graph.n_relations}, {graph.n_entities}, d] "
            f"for this graph, got {list(keys.shape)}"
        )


def _relations_by_order(graph: KnowledgeGraph) -> list[list[int]]:
    """The relation indices of each order, in order."""
    return [[r.index for r in graph.relations if r.order == o] for o in range(graph.n_orders)]


def _mean_by_order(values: torch.Tensor, graph: KnowledgeGraph) -> dict[str, float]:
    """Per order: the mean of ``values`` (indexed by relation first) over that order's
    relations, NaNs left out."""
    orders = torch.tensor([graph.relation(r).order for r in range(graph.n_relations)])
    names = [graph.order_name(o) for o in range(graph.n_orders)]
    return {name: float(values[orders == o].nanmean()) for o, name in enumerate(names)}
