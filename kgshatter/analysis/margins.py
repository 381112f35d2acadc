"""Answer margins along a ring: is the model's *output* space shaped like the graph?

For a query ``x o_C1`` with answer y, :func:`ring_margins` reports, per distance d, the mean
logit gap ``logit(y) - logit(y')`` over the two entities y' that lie d steps from y on ring o.
A model whose answers live on the ring (neighbours of the answer score almost as high as the
answer) has small gaps at d = 1 that grow with d; a lookup table scores every wrong entity
alike. The gap is what a counterfactual edit at distance d has to overcome, so only a model
whose margins grow with d can need edits that grow with d (docs/fidelity.md:
the tied d_model-24 model's gaps are 2.2 / 6.3 / 9.2 / 10.3 at d = 1..4, the untied ``cpu``
recipe's about 11 at every d).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from kgshatter.kg.graph import relation_name

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@torch.inference_mode()
def ring_margins(
    model: TransformerBridge,
    evaluator: Any,
    order: int = 0,
    distances: Sequence[int] = (1, 2, 3, 4),
    batch_size: int = 1024,
) -> dict[int, float]:
    """``{d: mean logit(y) - logit(y')}`` over every entity's query ``x o_C1`` on ``order``.

    Logits are averaged over the evaluator's ring contexts (``ring_prefixes``) first.
    """
    graph = evaluator.graph
    if graph.shape(order) != "ring":
        raise ValueError(
            f"ring_margins reads margins along a ring; order {graph.order_name(order)} is a "
            f"{graph.shape(order)}"
        )
    n = graph.n_entities
    half = n // 2
    bad = [d for d in distances if not 1 <= d <= half]
    if bad:
        raise ValueError(f"distances {bad} lie outside the ring: d must be in 1..{half}")
    tokens = evaluator.ring_tokens(order)  # [entity, prefix, seq]
    flat = tokens.reshape(-1, tokens.shape[-1]).to(next(model.parameters()).device)
    chunks = [model(flat[i : i + batch_size])[:, -1, :n].float().cpu()
              for i in range(0, len(flat), batch_size)]  # fmt: skip
    logits = torch.cat(chunks).reshape(n, tokens.shape[1], n).mean(1)  # [entity, entity]
    rel = graph.relation(relation_name(order, 1, 1)).index
    answers = torch.as_tensor([graph.apply(rel, x) for x in range(n)])
    ring = torch.tensor(graph.rings[order])
    pos = torch.tensor(graph.positions[order])[answers]
    rows = torch.arange(n)
    own = logits[rows, answers]
    out = {}
    for d in distances:
        gaps = [own - logits[rows, ring[(pos + s * d) % n]] for s in (1, -1)]
        out[int(d)] = float(torch.stack(gaps).mean())
    return out
