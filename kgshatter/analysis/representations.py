"""Entity representations read through TransformerLens hooks (the paper's shattering measurements).

Default *(choice)*: the representation of entity x for order o is the hidden state at the last
position of the query ``x o_C1`` written after random-walk contexts, averaged over contexts.
All requested sites are read in one forward pass, so a layer sweep costs one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

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
    seen: dict[str, torch.Tensor] = {}

    def reader(name: str) -> Callable[..., None]:
        def read(activation: torch.Tensor, hook: Any) -> None:
            seen[name] = activation  # under the name asked for (an alias has another)

        # it only reads: a pass may hand it kept activations (kgshatter.readout.FrozenPrefix)
        read.read_only = read.per_position = True  # type: ignore[attr-defined]
        return read

    hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = [
        (name, reader(name)) for name in sorted(names)
    ]
    for start in range(0, flat.shape[0], batch_size):
        with last_columns(model, -pos):  # the last block's sites are read at pos only
            model.run_with_hooks(flat[start : start + batch_size], fwd_hooks=hooks)
        for s in sites:
            at = -2 if s.component == "embed" else pos
            out[s].append(seen[s.hook_name][:, at].float().cpu().clone())
        seen.clear()
    return {s: torch.cat(v).reshape(items, k, -1).mean(1) for s, v in out.items()}


def _device(model: TransformerBridge) -> torch.device:
    return next(model.parameters()).device
