"""Entity representations read through TransformerLens hooks (the paper's shattering measurements).

Default *(choice)*: the representation of entity x for order o is the hidden state at the last
position of the query ``x o_C1`` written after random-walk contexts, averaged over contexts.
All requested sites come from one cached forward pass, so a layer sweep costs one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int

from kgshatter.kg.walks import WalkSampler, step_generator
from kgshatter.readout import last_columns
from kgshatter.sites import Site

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

POSITIONS = ("relation", "entity")


def entity_query_tokens(
    sampler: WalkSampler, relation: str | int, n_prefixes: int, seed: int = 0
) -> Int[torch.Tensor, "entity prefix n_ctx"]:
    """For every entity x, ``n_prefixes`` sequences ending in ``x relation``."""
    rel = sampler.graph.relation(relation)
    n = sampler.graph.n_entities
    subjects = torch.arange(n).repeat_interleave(n_prefixes)
    relations = torch.full((n * n_prefixes, 1), rel.index)
    tokens = sampler.query_tokens(subjects, relations, step_generator(seed, 1 << 21 | rel.index))
    return tokens.reshape(n, n_prefixes, -1)


@torch.inference_mode()
def collect_representations(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "item prefix seq"],
    sites: Sequence[Site],
    position: str = "relation",
    batch_size: int = 1024,
) -> dict[Site, Float[torch.Tensor, "item d"]]:
    """Mean over prefixes of each site's activation at the query position.

    ``position="relation"``: the last token; ``"entity"``: the token before it. The ``embed``
    site is always read at the entity token (at the relation token it is the same vector for
    every entity).
    """
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {list(POSITIONS)}, got {position!r}")
    n_layers = model.cfg.n_layers
    sites = [s.check(n_layers) for s in sites]
    names = {s.hook_name for s in sites}
    items, k, seq = tokens.shape
    flat = tokens.reshape(items * k, seq).to(_device(model))
    pos = -1 if position == "relation" else -2
    out: dict[Site, list[torch.Tensor]] = {s: [] for s in sites}
    for start in range(0, flat.shape[0], batch_size):
        with last_columns(model, -pos):  # the last block's sites are read at pos only
            _, cache = model.run_with_cache(
                flat[start : start + batch_size], names_filter=lambda n: n in names
            )
        for s in sites:
            at = -2 if s.component == "embed" else pos
            out[s].append(cache[s.hook_name][:, at].float().cpu())
    return {s: torch.cat(v).reshape(items, k, -1).mean(1) for s, v in out.items()}


def _device(model: TransformerBridge) -> torch.device:
    return next(model.parameters()).device
