"""One token per entity and per relation (the paper's synthetic setup).

Token ids: entities ``0 .. N-1`` (so ``id < N`` is "is an entity"), then relations ``N .. N+R-1``.
No special tokens are needed: every training sequence has exactly the model's context length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int

from kgshatter.kg.graph import KnowledgeGraph


class Vocabulary:
    """Maps entity and relation names to token ids and back."""

    def __init__(self, graph: KnowledgeGraph) -> None:
        self.graph = graph
        self.n_entities = graph.n_entities
        self.n_relations = graph.n_relations

    @property
    def size(self) -> int:
        return self.n_entities + self.n_relations

    def relation_token(self, relation: str | int) -> int:
        return self.n_entities + self.graph.relation(relation).index

    def entity_token(self, entity: str | int) -> int:
        return self.graph.entity(entity)

    def token(self, name: str) -> int:
        """Token id of an entity (``e0042``) or relation (``I_C2``) name."""
        if not isinstance(name, str):
            raise ValueError(f"token names are strings, got {name!r}")
        if name.startswith("e") and name[1:].isdigit():
            return self.entity_token(name)
        return self.relation_token(name)

    def encode(self, text: str | Sequence[str]) -> Int[torch.Tensor, " seq"]:
        """``encode("e0003 I_C1")`` -> tensor of ids."""
        names = text.split() if isinstance(text, str) else list(text)
        return torch.tensor([self.token(n) for n in names], dtype=torch.long)

    def name(self, token: int) -> str:
        token = int(token)
        if not 0 <= token < self.size:
            raise ValueError(f"token id must be in [0, {self.size - 1}], got {token}")
        if token < self.n_entities:
            return self.graph.entity_name(token)
        return self.graph.relations[token - self.n_entities].name

    def decode(self, tokens: Sequence[int] | torch.Tensor) -> str:
        return " ".join(
            self.name(t) for t in (tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens)
        )
