"""The fidelity study: in which model does an edit shatter globally, and more with distance?

The paper (arXiv 2410.17194, section 4) finds that a ROME edit's damage grows with the edit
distance d and lands on every order alike; :mod:`kgshatter.studies.targets` states that finding
as measurable targets. This module runs a controlled study (:func:`run_study`): variants of one
base preset, each differing from it in the fields it names, each trained (resumably) and edited
with ROME at d = 1..4 by the ordinary sweep (:func:`kgshatter.studies.sweep.run_sweep`), at the
relation token and at the subject token, and scored against those targets.

Besides accuracy and R(D*), each variant records its answer margins along order I
(:func:`kgshatter.analysis.margins.ring_margins`: what an edit at distance d must overcome) and
each edit records what the compression hypothesis predicts
(``measure_edit`` in the sweep): ``shift.edited``, how far the edit moves the edited entity's MLP
output (for ROME ``||v* - W k*||``), and ``spill``, the mean fraction of that shift landing on
every other entity (``|k_x' . dW| / |k* . dW|``): private keys give ``spill`` ~ 0, shared keys
spread the damage.

Layout of a study folder: ``OUT/<variant>/run`` (the trained run), ``OUT/<variant>/<editor>``
(its sweep), ``OUT/study.json``, ``OUT/study.md`` and ``OUT/study.png``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

from kgshatter.io import write_atomic, write_json_atomic
from kgshatter.kg.walks import SPLITS
from kgshatter.presets import RunConfig, apply_overrides
from kgshatter.studies.results import StudyEntry, StudyRow, SweepSummary, or_nan
from kgshatter.studies.targets import fidelity_checks, fmt

log = logging.getLogger(__name__)


# the ROME editor presets made for the synthetic models
STUDY_EDITORS = (
    "synthetic",
    "synthetic-subject",
    "synthetic-relative",
    "synthetic-subject-relative",
)


def study_row(
    name: str,
    overrides: list[str],
    editor: str,
    summary: SweepSummary,
    margins: dict[int, float] | None = None,
) -> StudyRow:
    """One variant x editor of the study (what ``study.json`` lists).

    ``margins``: the unedited model's answer margins along order I by distance
    (:func:`kgshatter.analysis.margins.ring_margins`)."""
    if summary.baseline is None:
        raise ValueError("study_row needs a finished sweep's summary (with its baseline)")
    by = summary.methods["rome"].by_distance()
    base = summary.baseline.accuracy
    return StudyRow(
        variant=name,
        overrides=overrides,
        editor=editor,
        site=summary.site,
        baseline={s: dict(base[s]) for s in SPLITS},
        rings=summary.baseline.rings,
        by_distance={d: StudyEntry.of(v) for d, v in sorted(by.items())},
        margins=dict(margins or {}),
        r2=summary.methods["rome"].fit_drop_on_R.r2,
        checks=fidelity_checks(summary),
    )


def run_study(
    base: RunConfig,
    variants: dict[str, list[str]],
    out_dir: str | os.PathLike[str],
    *,
    editors: tuple[str, ...] = ("synthetic-relative", "synthetic-subject-relative"),
    n_edits: int = 8,
    distances: tuple[int, ...] = (1, 2, 3, 4),
    max_queries: int | None = 300,
    progress: bool = True,
    device: str | None = None,
) -> list[StudyRow]:
    """Train each variant of ``base`` (``--set``-style overrides; ``[]`` is the base itself)
    and sweep ROME single edits with each editor preset; write and return the study rows.

    Everything is resumable: a finished run is reused and a finished sweep re-read.
    """
    from kgshatter.analysis.margins import ring_margins
    from kgshatter.editing import get_method
    from kgshatter.evaluate import Evaluator
    from kgshatter.studies.sweep import (
        SweepConfig,
        check_distances,
        representation_position,
        run_sweep,
    )
    from kgshatter.training import train

    for editor in editors:
        if editor not in STUDY_EDITORS:
            raise ValueError(f"editor preset {editor!r} unknown; choose from "
                             f"{sorted(STUDY_EDITORS)}")  # fmt: skip
    # every variant is validated before any training starts
    runs = {name: apply_overrides(base, list(o)) for name, o in variants.items()}
    for run in runs.values():
        check_distances(tuple(distances), run.kg)
    out = Path(out_dir)
    rows = []
    for name, run in runs.items():
        log.info("study variant %s: %s", name, variants[name] or "(base)")
        trained = train(run, out / name / "run", resume=True, progress=progress, device=device)
        evaluator = Evaluator.for_run(run, trained.graph)
        margins = ring_margins(trained.model, evaluator, 0, distances)
        for editor in editors:
            sweep = SweepConfig(
                methods=("rome",),
                kinds=("counterfactual",),
                distances=distances,
                n_edits=n_edits,
                sequential_edits=0,
                editor_preset=editor,
                position=representation_position(get_method("rome").config(editor).position),
                max_queries=max_queries,
            )
            result = run_sweep(out / name / "run", out / name / editor, sweep, progress, device)
            rows.append(study_row(name, list(variants[name]), editor, result.summary, margins))
    write_json_atomic(out / "study.json", [r.to_dict() for r in rows])
    write_study_report(rows, out)
    return rows


def write_study_report(rows: list[StudyRow], out: Path) -> Path:
    """``study.md`` (one table row per variant x editor) and ``study.png`` (curves vs d)."""
    lines = [
        "# The fidelity study (ROME, single counterfactual edits from order I)",
        "",
        "| variant | editor | site | pre-edit direct / logical / comp. (all) | direct drop by d "
        "| answer margin by d | R x100 order I by d | R x100 II, III at far d | spill by d "
        "| shift by d | r^2 | targets met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        byd = r.by_distance
        ds = sorted(byd)
        far = byd[ds[-1]].R_x100
        orders = [o for o in far if o != "mean"]
        lines.append(
            f"| {r.variant} | {r.editor} | {r.site} | "
            + " / ".join(f"{100 * or_nan(r.baseline[s]['all']):.1f}" for s in SPLITS)
            + " | "
            + ", ".join(fmt(byd[d].direct_drop, 1) for d in ds)
            + " | "
            + ", ".join(fmt(r.margins.get(d), 1) for d in ds)
            + " | "
            + ", ".join(fmt(byd[d].R_x100[orders[0]], 1) for d in ds)
            + " | "
            + ", ".join(fmt(far[o], 1) for o in orders[1:])
            + " | "
            + ", ".join(fmt(byd[d].mechanism.get("spill"), 3) for d in ds)
            + " | "
            + ", ".join(fmt(byd[d].mechanism.get("shift.edited"), 2) for d in ds)
            + f" | {fmt(r.r2)} | {r.n_holding} / {len(r.checks)} |"
        )
    lines += ["", "Overrides of each variant:", ""]
    seen = set()
    for r in rows:
        if r.variant not in seen:
            seen.add(r.variant)
            lines.append(f"- `{r.variant}`: {', '.join(r.overrides) or '(the base preset)'}")
    lines += ["", "![study](study.png)", ""]
    text = "\n".join(lines) + "\n"
    _study_figure(rows, out / "study.png")
    return write_atomic(out / "study.md", lambda tmp: Path(tmp).write_text(text, "utf-8"))


def _study_figure(rows: list[StudyRow], path: Path) -> Path:
    from kgshatter.plotting import pyplot, save_figure

    plt = pyplot()
    panels: list[tuple[str, Callable[[StudyRow, int], float | None]]] = [
        ("answer margin, logits (unedited)", lambda r, d: r.margins.get(d)),
        ("direct accuracy drop (points)", lambda r, d: r.by_distance[d].direct_drop),
        ("R(D*) x100, edited order I", lambda r, d: r.by_distance[d].first_order_R),
        ("R(D*) x100, mean of orders II, III", lambda r, d: r.by_distance[d].other_orders_R),
        (
            "shift of the edited entity's MLP output",
            lambda r, d: r.by_distance[d].mechanism.get("shift.edited"),
        ),  # fmt: skip
        (
            "spill onto other entities (fraction)",
            lambda r, d: r.by_distance[d].mechanism.get("spill"),
        ),  # fmt: skip
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.8))
    colours = plt.cm.tab20.colors
    for ax, (label, get) in zip(axes, panels, strict=True):
        for i, r in enumerate(rows):
            ds = sorted(r.by_distance)
            ys = [get(r, d) for d in ds]
            ax.plot(ds, [math.nan if y is None else y for y in ys],
                    ("o-", "s--", "^:")[i % 3], color=colours[i % len(colours)], ms=3,
                    label=f"{r.variant} / {r.editor}")  # fmt: skip
        ax.set_xlabel("edit distance d")
        ax.set_xticks(sorted({d for r in rows for d in r.by_distance}))
        ax.set_ylabel(label, fontsize=8)
    axes[-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("ROME single counterfactual edits from order I, mean per distance", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
