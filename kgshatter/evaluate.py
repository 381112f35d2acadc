"""Accuracy per task (direct recall, logical and compositional inference) per order, plus rings.

The paper's evaluation (arXiv 2410.17194): a query ``x r`` is answered by the argmax of the
next-token softmax, averaged over K random context prefixes (paper: K = 5; K = 1 allowed). The
argmax runs over the whole vocabulary (a relation token counts as wrong). Results are plain dicts
of floats, ready for JSON.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from kgshatter.analysis.geometry import one_blas_thread, structure_metrics
from kgshatter.analysis.representations import collect_representations, entity_query_tokens
from kgshatter.hooks import replace
from kgshatter.kg.graph import KnowledgeGraph, relation_name
from kgshatter.kg.walks import SPLITS, QuerySet, WalkSampler
from kgshatter.models import last_position_logits
from kgshatter.presets import EvalConfig, RunConfig
from kgshatter.sites import Site, all_sites

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from kgshatter.readout import FrozenPrefix

# where the ring code is strongest in trained models (MLP hidden layer) and the block outputs
RING_COMPONENTS = ("mlp_post", "resid_post")
# mean ablation: the components whose output is replaced, and the tokens of a direct query
# ``x r`` (after its context) where it is replaced
ABLATED_COMPONENTS = ("attn_out", "mlp_out")
QUERY_POSITIONS = {"subject": -2, "relation": -1}


@torch.inference_mode()
def query_probs(
    model: TransformerBridge, queries: QuerySet, batch_size: int = 1024
) -> torch.Tensor:
    """Next-token probabilities at the query position, averaged over prefixes: [query, vocab]."""
    q, k, seq = queries.tokens.shape
    flat = queries.tokens.reshape(q * k, seq)
    device = next(model.parameters()).device
    out = []
    for start in range(0, flat.shape[0], batch_size):
        logits = last_position_logits(model, flat[start : start + batch_size].to(device)).float()
        out.append(torch.softmax(logits, -1).cpu())
    if not out:
        return torch.zeros(0, model.cfg.d_vocab)
    return torch.cat(out).reshape(q, k, -1).mean(1)


@torch.inference_mode()
def mean_ablation(
    model: TransformerBridge,
    queries: QuerySet,
    graph: KnowledgeGraph,
    components: tuple[str, ...] = ABLATED_COMPONENTS,
    batch_size: int = 1024,
) -> dict[str, dict[str, float | None]]:
    """Where a direct-recall answer is computed: accuracy per order (and ``all``) with one
    component's output replaced by its mean over every query and context, at one token.

    Keys: ``"clean"``, then ``"LAYER.COMPONENT@POSITION"`` for every block, component and
    position of :data:`QUERY_POSITIONS` (``"0.attn_out@relation"``: block 0's attention output
    at the relation token ``r`` of ``x r``). A model that reads the subject at its own token
    loses accuracy when a component is ablated ``@subject``; one that carries the subject to
    the relation token and computes there loses it ``@relation`` only.
    """
    if queries.split != "direct":
        raise ValueError(
            f"mean_ablation reads direct-recall queries 'x r', got split {queries.split!r}"
        )
    sites = [Site(layer, c) for layer in range(model.cfg.n_layers) for c in components]
    flat = queries.tokens.reshape(-1, queries.tokens.shape[-1])
    device = next(model.parameters()).device
    sums: dict[tuple[Site, int], torch.Tensor] = {}

    def accumulate(site: Site) -> Any:
        def hook(activation: torch.Tensor, hook: Any) -> None:
            for pos in QUERY_POSITIONS.values():
                total = activation[:, pos].double().sum(0)
                sums[site, pos] = sums[site, pos] + total if (site, pos) in sums else total

        return hook

    with model.hooks(fwd_hooks=[(s.hook_name, accumulate(s)) for s in sites]):
        for start in range(0, flat.shape[0], batch_size):
            model(flat[start : start + batch_size].to(device))

    def score() -> dict[str, float | None]:
        probs = query_probs(model, queries, batch_size)
        return accuracy_by_order(queries.correct(graph, probs.argmax(-1)), queries.order, graph)

    result = {"clean": score()}
    for site in sites:
        for name, pos in QUERY_POSITIONS.items():
            mean = (sums[site, pos] / flat.shape[0]).float()
            with model.hooks(fwd_hooks=[(site.hook_name, replace(mean, positions=pos))]):
                result[f"{site}@{name}"] = score()
    return result


def accuracy_by_order(
    correct: torch.Tensor, order: torch.Tensor, graph: KnowledgeGraph
) -> dict[str, float | None]:
    """Mean of ``correct`` per order name, plus ``all``; ``None`` where an order has no query."""
    table: dict[str, float | None] = {}
    for o in range(graph.n_orders):
        sel = correct[order == o]
        table[graph.order_name(o)] = float(sel.float().mean()) if sel.numel() else None
    table["all"] = float(correct.float().mean()) if correct.numel() else None
    return table


class Evaluator:
    """Evaluation of one graph under one :class:`EvalConfig`; query sets are built once.

    ``max_queries`` (from the config, or overridden) subsamples each split with a fixed seed, so
    the same questions are asked at every evaluation of a run.
    """

    def __init__(
        self,
        graph: KnowledgeGraph,
        sampler: WalkSampler,
        config: EvalConfig,
        max_queries: int | None | str = "config",
    ) -> None:
        self.graph = graph
        self.sampler = sampler
        self.config = config
        limit = config.max_queries if isinstance(max_queries, str) else max_queries
        self.queries = {
            split: QuerySet.build(
                sampler, split, n_prefixes=config.n_prefixes, seed=config.seed, max_queries=limit
            )
            for split in SPLITS
        }
        self._ring_tokens: dict[int, torch.Tensor] = {}
        # set by an edit sweep: accuracy passes start from the unedited model's residual
        self.frozen: FrozenPrefix | None = None

    @classmethod
    def for_run(
        cls, run: RunConfig, graph: KnowledgeGraph, max_queries: int | None | str = "config"
    ):
        return cls(graph, WalkSampler(graph, run.walks), run.eval, max_queries)

    def accuracy(self, model: TransformerBridge) -> dict[str, dict[str, float | None]]:
        """``{split: {order: accuracy, "all": accuracy}}``."""
        from kgshatter.readout import frozen_running

        result = {}
        with frozen_running(self.frozen, model):
            for split, qs in self.queries.items():
                probs = query_probs(model, qs, self.config.batch_size)
                right = qs.correct(self.graph, probs.argmax(-1))
                result[split] = accuracy_by_order(right, qs.order, self.graph)
        return result

    def ring_tokens(self, order: int) -> torch.Tensor:
        """Query tokens ``x o_C1`` (a torus order: ``x o_E1``, a tree: ``x o_U1``, the step
        with one answer) for every entity x (cached per order)."""
        if order not in self._ring_tokens:
            shape = self.graph.shape(order)
            relation = relation_name(order, -1 if shape == "tree" else 1, 1, 0, shape)
            self._ring_tokens[order] = entity_query_tokens(
                self.sampler, relation, self.config.ring_prefixes, self.config.seed
            )
        return self._ring_tokens[order]

    def rings(
        self, model: TransformerBridge, sites: list[Site] | None = None
    ) -> dict[str, dict[str, dict[str, float]]]:
        """``{order: {site: {metric: value}}}`` at every site (default: embedding + each block)."""
        sites = sites or all_sites(model.cfg.n_layers, RING_COMPONENTS)
        result: dict[str, dict[str, dict[str, float]]] = {}
        for o in range(self.graph.n_orders):
            reps = collect_representations(
                model, self.ring_tokens(o), sites, batch_size=self.config.batch_size
            )
            with one_blas_thread():  # probes of a few hundred entities, next to torch
                result[self.graph.order_name(o)] = {
                    str(s): structure_metrics(r, self.graph, o, seed=self.config.seed)
                    for s, r in reps.items()
                }
        return result

    def __call__(self, model: TransformerBridge, rings: bool = True) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        try:
            out: dict[str, Any] = {"accuracy": self.accuracy(model)}
            if rings:
                out["rings"] = self.rings(model)
                out["ring_summary"] = summarise_rings(out["rings"])
        finally:
            model.train(was_training)
        return out


def summarise_rings(rings: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per order: the best value of each metric over sites, and the site that reached it."""
    summary: dict[str, dict[str, Any]] = {}
    for order, by_site in rings.items():
        best: dict[str, Any] = {}
        metrics = next(iter(by_site.values())).keys()
        for m in metrics:
            values = [(s, v[m]) for s, v in by_site.items() if not math.isnan(v[m])]
            if values:
                site, value = max(values, key=lambda t: t[1])
                best[m] = {"value": value, "site": site}
        summary[order] = best
    return summary
