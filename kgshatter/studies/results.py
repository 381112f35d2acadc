"""The studies' results as typed values: what each ``summary.json`` holds, read by attribute.

:func:`kgshatter.studies.sweep.summarise` builds a :class:`SweepSummary` from the tidy table's
rows (the one place that reads the table's composed column names, ``acc.{split}.{order}``,
``R.{order}``); the report, the fidelity checks, the reproduction and the CLI read its
attributes; :meth:`SweepSummary.to_dict` writes ``summary.json`` and
:meth:`SweepSummary.from_dict` reads it back. :func:`kgshatter.studies.months.run_months`
returns a :class:`MonthsSummary` the same way (its rows stay the JSON lines of ``rows.jsonl``),
and :func:`kgshatter.studies.fidelity.run_study` a :class:`StudyRow` per variant and editor
(``study.json`` is their :meth:`StudyRow.to_dict`).

The per-order maps are keyed by order name (``"I"``, ``"II"``, ...), plus ``"all"`` for
accuracy (every order together) and ``"mean"`` for R (the mean over orders); a value is
``None`` where nothing was measured (no queries of that kind, or no edits that took).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from kgshatter.kg.walks import SPLITS

# a value per order name (and "all" or "mean"); None: not measured
PerOrder = dict[str, float | None]
# the order edit kinds are listed in: corrective edits, then counterfactuals by distance
KIND_ORDER = ["corrective", "d=1", "d=2", "d=3", "d=4", "d=5", "d=6", "d=7", "d=8"]


def kind_label(kind: str, distance: int | None) -> str:
    """``"corrective"`` or ``"d=3"``: how a group of single edits is named in a summary."""
    return "corrective" if kind == "corrective" else f"d={distance}"


def ordered_kinds(labels: Iterable[str]) -> list[str]:
    """Kind labels in report order (corrective first, then by distance)."""
    return sorted(labels, key=lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else 99)


@dataclass(frozen=True)
class KindSummary:
    """Means over one method's single edits of one kind (corrective, or counterfactual at one
    distance)."""

    kind: str  # "corrective" or "counterfactual"
    distance: int | None  # the distance asked for (None: corrective)
    n: int
    efficacy: float | None
    # split -> order (and "all") -> accuracy change in points (negative: lost)
    accuracy_change_points: dict[str, PerOrder]
    R_x100: PerOrder  # R(D*) x 100 per order and "mean", at the report's site
    neighbours: PerOrder  # after the edit, at the report's site
    isomap: PerOrder  # after the edit, at the report's site
    mechanism: dict[str, float | None]  # shift.edited, shift.others, spill, delta_norm

    def change(self, split: str, order: str = "all") -> float | None:
        """Accuracy change in points on one split and order."""
        return self.accuracy_change_points[split][order]

    @property
    def direct_drop(self) -> float | None:
        """Points of direct accuracy lost, all orders (positive: worse)."""
        change = self.change("direct")
        return None if change is None else -change

    @property
    def mean_change(self) -> float:
        """Accuracy change in points, all orders, averaged over the three splits."""
        return statistics.fmean(or_nan(self.change(s)) for s in SPLITS)

    @property
    def orders(self) -> list[str]:
        """The graph's order names, edited order first."""
        return [o for o in self.R_x100 if o != "mean"]


@dataclass(frozen=True)
class SingleEdit:
    """One scored single edit of a sweep: the request and the two numbers the report plots (a
    view of a ``table.csv`` row, :func:`kgshatter.studies.sweep.single_edits`)."""

    method: str
    kind: str  # "corrective" or "counterfactual"
    sweep_distance: int  # the distance asked for (0: corrective)
    distance: int  # the request's distance on the relation's ring
    fact: str  # "e0003 I_C1 -> e0042"
    subject: int  # entity index
    relation: int  # relation index
    target: int  # entity index
    R_mean: float  # R(D*) at the report's site, mean over orders
    drop: float  # accuracy drop in points, all orders, mean over the three tasks


@dataclass(frozen=True)
class Fit:
    """Least-squares line of the accuracy drop (points) on R(D*) across single edits."""

    slope: float
    intercept: float
    r2: float
    n: int


@dataclass(frozen=True)
class SequenceStep:
    """One step of a sequence of edits, each applied on top of the earlier ones."""

    step: int
    efficacy: float
    retained: float | None  # fraction of the earlier edits still holding
    accuracy_drop_points: float
    R_x100: float


@dataclass(frozen=True)
class MethodSummary:
    """One editing method's results in a sweep."""

    by_kind: dict[str, KindSummary]  # keyed by kind_label
    fit_drop_on_R: Fit
    skipped: int  # requests the model already answered as asked
    sequential: list[SequenceStep]

    def by_distance(self) -> dict[int, KindSummary]:
        """The counterfactual kinds by their distance."""
        return {v.distance: v for v in self.by_kind.values() if v.distance is not None}

    def kinds(self) -> list[str]:
        """Kind labels in report order."""
        return ordered_kinds(self.by_kind)


@dataclass(frozen=True)
class Baseline:
    """The unedited model: accuracy (split -> order/"all" -> fraction) and its rings."""

    accuracy: dict[str, PerOrder]
    rings: dict[str, dict[str, float]]  # order -> metric -> value (shapes differ in metrics)

    @property
    def orders(self) -> list[str]:
        return [o for o in self.accuracy["direct"] if o != "all"]


@dataclass(frozen=True)
class SweepHeader:
    """What the sweep ran on (``sweep.json``): the run, its graph and model, the settings."""

    format: str
    run_dir: str
    graph_fingerprint: str
    model_id: str
    step: int | None
    sweep: dict[str, Any]  # SweepConfig.to_dict(), as pinned in sweep.json

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "run_dir": self.run_dir,
            "graph_fingerprint": self.graph_fingerprint,
            "model_id": self.model_id,
            "step": self.step,
            "sweep": self.sweep,
        }

    @property
    def kinds(self) -> list[str]:
        return list(self.sweep["kinds"])


@dataclass(frozen=True)
class RingExample:
    """The edit drawn in ``rings_before_after.png`` and its ring measures before and after."""

    label: str
    rings: dict[str, dict[str, dict[str, float]]]  # order -> "before"/"after" -> metric


@dataclass
class SweepSummary:
    """Everything ``summary.json`` holds about a sweep."""

    n_rows: int
    n_scored: int
    methods: dict[str, MethodSummary]
    baseline: Baseline | None = None
    site: str | None = None
    position: str = "relation"
    run: SweepHeader | None = None
    example: RingExample | None = None

    def main_method(self) -> str:
        """ROME, the paper's main method, when the sweep ran it; else its first method."""
        return "rome" if "rome" in self.methods else next(iter(self.methods), "rome")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``summary.json``)."""
        out: dict[str, Any] = {
            "n_rows": self.n_rows,
            "n_scored": self.n_scored,
            "methods": {m: _method_dict(v) for m, v in self.methods.items()},
        }
        if self.baseline is not None:
            out["baseline"] = {"accuracy": self.baseline.accuracy, "rings": self.baseline.rings}
        if self.site is not None:
            out["site"] = self.site
            out["position"] = self.position
        if self.run is not None:
            out["run"] = self.run.to_dict()
        if self.example is not None:
            out["example"] = {"label": self.example.label, "rings": self.example.rings}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepSummary:
        """Read a ``summary.json`` back."""
        base, run, example = data.get("baseline"), data.get("run"), data.get("example")
        return cls(
            n_rows=data["n_rows"],
            n_scored=data["n_scored"],
            methods={m: _method_from(v) for m, v in data["methods"].items()},
            baseline=None if base is None else Baseline(base["accuracy"], base["rings"]),
            site=data.get("site"),
            position=data.get("position", "relation"),
            run=None if run is None else SweepHeader(**run),
            example=None if example is None else RingExample(example["label"], example["rings"]),
        )


@dataclass(frozen=True)
class Check:
    """One fidelity target: what is claimed, whether it holds (``None``: not measurable), the
    numbers (:func:`kgshatter.studies.targets.fidelity_checks`)."""

    claim: str
    holds: bool | None
    evidence: str


@dataclass(frozen=True)
class StudyEntry:
    """One distance of a fidelity-study row: means over its ROME single edits."""

    n: int
    efficacy: float | None
    direct_drop: float | None  # points of direct accuracy lost, all orders
    drop_mean_tasks: float  # points lost, all orders, mean over the three tasks
    R_x100: PerOrder  # per order and "mean"
    isomap_after: PerOrder
    mechanism: dict[str, float | None]  # shift.edited, shift.others, spill, delta_norm

    @classmethod
    def of(cls, v: KindSummary) -> StudyEntry:
        return cls(v.n, v.efficacy, v.direct_drop, -v.mean_change, v.R_x100, v.isomap,
                   v.mechanism)  # fmt: skip

    @property
    def first_order_R(self) -> float | None:
        """R x100 of the edited order (the first)."""
        return next(v for o, v in self.R_x100.items() if o != "mean")

    @property
    def other_orders_R(self) -> float | None:
        """Mean R x100 of the orders the edit did not target."""
        values = [v for o, v in list(self.R_x100.items())[1:] if o != "mean" and v is not None]
        return statistics.fmean(values) if values else None


@dataclass(frozen=True)
class StudyRow:
    """One variant x editor of the fidelity study (what ``study.json`` lists)."""

    variant: str
    overrides: list[str]
    editor: str
    site: str | None
    baseline: dict[str, PerOrder]  # split -> order / "all" -> accuracy
    rings: dict[str, dict[str, float]]
    by_distance: dict[int, StudyEntry]
    margins: dict[int, float]  # the unedited answer margins along order I, by distance
    r2: float
    checks: list[Check]

    @property
    def n_holding(self) -> int:
        return sum(1 for c in self.checks if c.holds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "overrides": self.overrides,
            "editor": self.editor,
            "site": self.site,
            "baseline": self.baseline,
            "rings": self.rings,
            "by_distance": {str(d): asdict(v) for d, v in sorted(self.by_distance.items())},
            "margins": {str(d): v for d, v in self.margins.items()},
            "r2": self.r2,
            "checks": [asdict(c) for c in self.checks],
            "n_holding": self.n_holding,
            "n_checks": len(self.checks),
        }


def or_nan(value: float | None) -> float:
    """``value``, or NaN where nothing was measured (NaN compares false with any threshold)."""
    return math.nan if value is None else value


def _method_dict(m: MethodSummary) -> dict[str, Any]:
    return {
        "by_kind": {
            k: {
                "kind": v.kind,
                "distance": v.distance,
                "n": v.n,
                "efficacy": v.efficacy,
                "accuracy_change_points": v.accuracy_change_points,
                "R_x100": v.R_x100,
                "neighbours": v.neighbours,
                "isomap": v.isomap,
                "mechanism": v.mechanism,
            }
            for k, v in m.by_kind.items()
        },
        "fit_drop_on_R": {
            "slope": m.fit_drop_on_R.slope,
            "intercept": m.fit_drop_on_R.intercept,
            "r2": m.fit_drop_on_R.r2,
            "n": m.fit_drop_on_R.n,
        },
        "skipped": m.skipped,
        "sequential": [
            {
                "step": s.step,
                "efficacy": s.efficacy,
                "retained": s.retained,
                "accuracy_drop_points": s.accuracy_drop_points,
                "R_x100": s.R_x100,
            }
            for s in m.sequential
        ],
    }


def _method_from(data: dict[str, Any]) -> MethodSummary:
    return MethodSummary(
        by_kind={
            k: KindSummary(**{**v, "mechanism": v.get("mechanism", {})})
            for k, v in data["by_kind"].items()
        },
        fit_drop_on_R=Fit(**data["fit_drop_on_R"]),
        skipped=data["skipped"],
        sequential=[SequenceStep(**s) for s in data["sequential"]],
    )


# the months (days, cities) replication on a pretrained model (kgshatter.studies.months)


@dataclass(frozen=True)
class MonthsDistance:
    """Means over one distance's edits of a months replication (fractions; ``R`` is R(D*));
    the optional measures are ``None`` where the run did not take them."""

    n: int
    skipped: int
    success: float
    accuracy_change: float
    R: float
    seconds: float  # median per edit
    paraphrase: float | None = None
    neighbourhood: float | None = None
    neighbourhood_change: float | None = None
    fluency: float | None = None
    fluency_change: float | None = None
    perplexity: float | None = None
    calendar: float | None = None
    mmlu: float | None = None
    isomap_after: float | None = None

    def to_dict(self) -> dict[str, float | int]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims as d grows: Spearman's rho of its quantity with d over the
    edits, the p-value, whether it holds (the predicted sign at p < 0.05); ``unchanged`` is the
    value no edit changed (rho and p are then NaN)."""

    claim: str
    n: int
    holds: bool
    rho: float
    p: float
    unchanged: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "unchanged" or v is not None}


@dataclass(frozen=True)
class MMLUScore:
    accuracy: float
    no_answer_rate: float
    n: int


@dataclass(frozen=True)
class TraceSummary:
    """What causal tracing found: the MLP layer whose restored output matters most at the
    subject's last token, the answer probability clean and with the subject corrupted."""

    best_mlp_layer: int | None  # None: MLP outputs were not traced
    clean: float
    corrupted: float
    n_prompts: int


@dataclass
class MonthsSummary:
    """Everything a months replication's ``summary.json`` holds."""

    model: str
    random_weights: bool
    family: str
    model_id: str
    config: Any  # the MonthsConfig (kgshatter.studies.months)
    preset: str
    site: str
    accuracy_before: float
    mmlu_before: MMLUScore | None
    rings_before: dict[str, dict[str, float]]  # site -> ring metric -> value
    per_distance: dict[str, MonthsDistance]  # keyed str(d) ("None" for the tree task)
    fit_accuracy_on_R: Fit | None
    claims: dict[str, Claim]
    ability_before: dict[str, float] | None = None  # perplexity, calendar
    scoring: str = "auto"  # what the task's "auto" scoring resolved to
    phrasing: str = "hop"
    facts: str = "all"
    known: int = 0  # prompts answered right before editing
    queries: int = 0
    corpus: str | None = None
    tracing: TraceSummary | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``summary.json``)."""
        fit = self.fit_accuracy_on_R
        return {
            "model": self.model,
            "random_weights": self.random_weights,
            "family": self.family,
            "model_id": self.model_id,
            "config": self.config.to_dict(),
            "preset": self.preset,
            "site": self.site,
            "accuracy_before": self.accuracy_before,
            "mmlu_before": None if self.mmlu_before is None else asdict(self.mmlu_before),
            "rings_before": self.rings_before,
            "per_distance": {d: e.to_dict() for d, e in self.per_distance.items()},
            "fit_accuracy_on_R": None if fit is None else {"slope": fit.slope, "r2": fit.r2},
            "claims": {k: c.to_dict() for k, c in self.claims.items()},
            "ability_before": self.ability_before,
            "scoring": self.scoring,
            "phrasing": self.phrasing,
            "facts": self.facts,
            "known": self.known,
            "queries": self.queries,
            "corpus": self.corpus,
            "tracing": None if self.tracing is None else asdict(self.tracing),
        }
