"""kgshatter: representation shattering under knowledge edits, as a TransformerLens plugin.

Re-implements "Representation Shattering in Transformers: A Synthetic Study with Knowledge
Editing" (Nishi et al., arXiv 2410.17194). ``import kgshatter as ks`` is the common path::

    run = ks.get_preset("tiny")
    result = ks.train(run, "runs/tiny")                      # graph -> walks -> model -> train
    scores = ks.Evaluator.for_run(run, result.graph)(result.model)
    rome = ks.get_method("rome")
    task = ks.SyntheticTask(ks.WalkSampler(result.graph, run.walks), ks.CovarianceCache("stats"))
    edit = rome.compute(result.model, task, ks.EditRequest.parse(result.graph, "e03 I_C1", "e09"),
                        rome.config("synthetic"))
    with ks.edited(result.model, edit):
        ...

Every name is exported lazily: ``import kgshatter`` loads none of torch, TransformerLens,
scikit-learn or matplotlib (README, "Quickstart"); the first use of a name imports its module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it (the one-directional data flow, in order)
_EXPORTS: dict[str, str] = {
    # the knowledge graph and its walks
    "KGConfig": "kgshatter.kg",
    "KnowledgeGraph": "kgshatter.kg",
    "QuerySet": "kgshatter.kg",
    "Vocabulary": "kgshatter.kg",
    "WalkConfig": "kgshatter.kg",
    "WalkSampler": "kgshatter.kg",
    # presets and configs
    "PRESETS": "kgshatter.presets",
    "EvalConfig": "kgshatter.presets",
    "RunConfig": "kgshatter.presets",
    "TrainConfig": "kgshatter.presets",
    "apply_overrides": "kgshatter.presets",
    "get_preset": "kgshatter.presets",
    "ModelConfig": "kgshatter.models",
    "build_model": "kgshatter.models",
    # training and evaluation
    "TrainResult": "kgshatter.training",
    "load_run": "kgshatter.training",
    "train": "kgshatter.training",
    "Evaluator": "kgshatter.evaluate",
    "mean_ablation": "kgshatter.evaluate",
    "Site": "kgshatter.sites",
    # editing
    "CovarianceCache": "kgshatter.editing",
    "Edit": "kgshatter.editing",
    "EditRequest": "kgshatter.editing",
    "METHODS": "kgshatter.editing",
    "Method": "kgshatter.editing",
    "SyntheticTask": "kgshatter.editing",
    "WeightPatch": "kgshatter.editing",
    "get_method": "kgshatter.editing",
    "register_method": "kgshatter.editing",
    "EditScorer": "kgshatter.editing.protocols",
    "EditRecord": "kgshatter.editing.protocols",
    "ProtocolResult": "kgshatter.editing.protocols",
    "run_protocol": "kgshatter.editing.protocols",
    "sample_requests": "kgshatter.editing.protocols",
    "edited": "kgshatter.hooks",
    "capture": "kgshatter.hooks",
    "add_vector": "kgshatter.hooks",
    # representations and shattering
    "collect_representations": "kgshatter.analysis.representations",
    "entity_query_tokens": "kgshatter.analysis.representations",
    "distance_matrix": "kgshatter.analysis.shattering",
    "fit_line": "kgshatter.analysis.shattering",
    "shattering": "kgshatter.analysis.shattering",
    "isomap_alignment": "kgshatter.analysis.geometry",
    "ring_metrics": "kgshatter.analysis.geometry",
    "ring_figure": "kgshatter.plotting",
    # the sweep and the report
    "SweepConfig": "kgshatter.studies.sweep",
    "run_sweep": "kgshatter.studies.sweep",
    "reproduce": "kgshatter.studies.reproduction",
    "SweepSummary": "kgshatter.studies.results",
    "MonthsSummary": "kgshatter.studies.results",
    # pretrained models and the months replication
    "PretrainedModel": "kgshatter.pretrained.loading",
    "TINY_TEXT": "kgshatter.pretrained.loading",
    "load_pretrained": "kgshatter.pretrained.loading",
    "tiny_checkpoint": "kgshatter.pretrained.loading",
    "SampledCorpus": "kgshatter.pretrained.text",
    "TextCorpus": "kgshatter.pretrained.text",
    "TextTask": "kgshatter.pretrained.text",
    "TracePrompt": "kgshatter.pretrained.tracing",
    "causal_trace": "kgshatter.pretrained.tracing",
    "city_country_task": "kgshatter.pretrained.facts",
    "cyclic_task": "kgshatter.pretrained.facts",
    "export_lora": "kgshatter.pretrained.export",
    "export_merged": "kgshatter.pretrained.export",
    "MonthsConfig": "kgshatter.studies.months",
    "run_months": "kgshatter.studies.months",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(
            f"module 'kgshatter' has no attribute {name!r}; the public names are in "
            f"kgshatter.__all__"
        )
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # the names as a type checker and an editor see them
    from kgshatter.analysis.geometry import isomap_alignment, ring_metrics
    from kgshatter.analysis.representations import collect_representations, entity_query_tokens
    from kgshatter.analysis.shattering import distance_matrix, fit_line, shattering
    from kgshatter.editing import (
        METHODS,
        CovarianceCache,
        Edit,
        EditRequest,
        Method,
        SyntheticTask,
        WeightPatch,
        get_method,
        register_method,
    )
    from kgshatter.editing.protocols import (
        EditRecord,
        EditScorer,
        ProtocolResult,
        run_protocol,
        sample_requests,
    )
    from kgshatter.evaluate import Evaluator
    from kgshatter.hooks import add_vector, capture, edited
    from kgshatter.kg import (
        KGConfig,
        KnowledgeGraph,
        QuerySet,
        Vocabulary,
        WalkConfig,
        WalkSampler,
    )
    from kgshatter.models import ModelConfig, build_model
    from kgshatter.plotting import ring_figure
    from kgshatter.presets import (
        PRESETS,
        EvalConfig,
        RunConfig,
        TrainConfig,
        apply_overrides,
        get_preset,
    )
    from kgshatter.pretrained.export import export_lora, export_merged
    from kgshatter.pretrained.facts import city_country_task, cyclic_task
    from kgshatter.pretrained.loading import (
        TINY_TEXT,
        PretrainedModel,
        load_pretrained,
        tiny_checkpoint,
    )
    from kgshatter.pretrained.text import SampledCorpus, TextCorpus, TextTask
    from kgshatter.pretrained.tracing import TracePrompt, causal_trace
    from kgshatter.sites import Site
    from kgshatter.studies.months import MonthsConfig, run_months
    from kgshatter.studies.reproduction import reproduce
    from kgshatter.studies.results import MonthsSummary, SweepSummary
    from kgshatter.studies.sweep import SweepConfig, run_sweep
    from kgshatter.training import TrainResult, load_run, train
