"""kgshatter: representation shattering under knowledge edits, as a TransformerLens plugin.

Re-implements "Representation Shattering in Transformers: A Synthetic Study with Knowledge
Editing" (Nishi et al., arXiv 2410.17194). ``import kgshatter`` is light: TransformerLens,
scikit-learn and matplotlib are imported by the functions that need them.
"""

from kgshatter.kg import KGConfig, KnowledgeGraph, QuerySet, Vocabulary, WalkConfig, WalkSampler
from kgshatter.presets import PRESETS, EvalConfig, RunConfig, TrainConfig, get_preset
from kgshatter.sites import Site

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "EvalConfig",
    "KGConfig",
    "KnowledgeGraph",
    "QuerySet",
    "RunConfig",
    "Site",
    "TrainConfig",
    "Vocabulary",
    "WalkConfig",
    "WalkSampler",
    "get_preset",
]
