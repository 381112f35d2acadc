"""Structured knowledge graphs: config, graph, tokenizer, walks and evaluation queries."""

from kgshatter.kg.config import KGConfig
from kgshatter.kg.graph import KnowledgeGraph, Relation
from kgshatter.kg.tokenizer import Vocabulary
from kgshatter.kg.walks import QuerySet, WalkConfig, WalkSampler

__all__ = [
    "KGConfig",
    "KnowledgeGraph",
    "QuerySet",
    "Relation",
    "Vocabulary",
    "WalkConfig",
    "WalkSampler",
]
