"""The fidelity study: in which model does an edit shatter globally, and more with distance?

The paper (arXiv 2410.17194, section 4) finds that a ROME edit's damage grows with the edit
distance d and lands on every order alike. This module states that finding as measurable
targets (:func:`fidelity_checks`, the thresholds of the README's "The fidelity study") and runs
a controlled study (:func:`run_study`): variants of one base preset, each differing from it in
the fields it names, each trained (resumably) and edited with ROME at d = 1..4 by the ordinary
sweep (:func:`kgshatter.studies.sweep.run_sweep`), at the relation token and at the subject token.

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
import statistics
from collections.abc import Callable
from pathlib import Path

from kgshatter.io import write_atomic, write_json_atomic
from kgshatter.kg.walks import SPLITS
from kgshatter.presets import RunConfig, apply_overrides
from kgshatter.studies.results import (
    Baseline,
    Check,
    KindSummary,
    StudyEntry,
    StudyRow,
    SweepSummary,
    or_nan,
)

log = logging.getLogger(__name__)

# the thresholds (docs/fidelity.md)
MIN_BASELINE = {"direct": 0.95, "logical": 0.90, "compositional": 0.60}
MIN_EFFICACY = 0.9  # ours: the targets presume edits that succeed
MIN_FAR_DROP = 20.0  # points of direct accuracy lost at the farthest distance
MIN_FAR_OVER_NEAR = 3.0  # far drop / near drop
MIN_R_RATIO = 2.0  # R on the edited order, far / near
MIN_GLOBAL = 0.5  # R of the other orders / R of the edited order, at the farthest distance
MIN_R2 = 0.6
MIN_RING = 0.8  # Isomap alignment of every order before editing
MAX_RING_AFTER = 0.5  # Isomap alignment of the edited order after a far edit: "broken"

# the ROME editor presets made for the synthetic models
STUDY_EDITORS = (
    "synthetic",
    "synthetic-subject",
    "synthetic-relative",
    "synthetic-subject-relative",
)


def fidelity_checks(summary: SweepSummary, method: str = "rome") -> list[Check]:
    """The paper's phenomenon as targets, checked on a sweep summary (single edits)."""
    if summary.baseline is None:
        raise ValueError("fidelity_checks needs a finished sweep's summary (with its baseline)")
    checks = [_baseline_check(summary.baseline)]
    if method not in summary.methods:
        return [*checks, Check(f"{method} is in the sweep", False, "")]
    by = summary.methods[method].by_distance()
    if len(by) < 2:
        return [*checks, Check("at least two distances were swept", False, str(sorted(by)))]
    efficacy = statistics.fmean(or_nan(v.efficacy) for v in by.values())
    checks.append(
        Check(
            f"the edits take (mean efficacy >= {MIN_EFFICACY:.0%}; damage from edits that did "
            "not happen means little)",
            efficacy >= MIN_EFFICACY,
            ", ".join(f"d={d}: {or_nan(by[d].efficacy):.0%}" for d in sorted(by)),
        )
    )
    checks += _damage_checks(by)
    fit = summary.methods[method].fit_drop_on_R
    checks.append(
        Check(
            f"r^2 of accuracy drop on R across single edits >= {MIN_R2}",
            None if math.isnan(fit.r2) else fit.r2 >= MIN_R2,
            f"r^2 {fit.r2:.3f} over {fit.n} edits",
        )
    )
    checks += _ring_checks(summary.baseline, by)
    if efficacy < 0.5:  # most edits did not take: what they did is no evidence either way
        checks[2:] = [  # the baseline and efficacy checks stay, and so does the unedited ring
            c if c.claim.startswith("rings before")
            else Check(c.claim, None, f"not measured, most edits did not take: {c.evidence}")
            for c in checks[2:]
        ]  # fmt: skip
    return checks


def _baseline_check(baseline: Baseline) -> Check:
    low = [
        f"{split} {o} {100 * v:.1f}"
        for split, floor in MIN_BASELINE.items()
        for o in baseline.orders
        if (v := baseline.accuracy[split][o]) is not None and v < floor  # None: no such queries
    ]
    return Check(
        "pre-edit accuracy >= 95 / 90 / 60 on every order",
        not low,
        "below: " + ", ".join(low) if low else "all above",
    )


def _damage_checks(by: dict[int, KindSummary]) -> list[Check]:
    """How the direct drop and R grow from the nearest to the farthest distance, and whether
    the other orders shatter with the edited one."""
    near, far = min(by), max(by)
    # a distance without a direct accuracy fails the checks below (nan compares false)
    drops = {d: or_nan(by[d].direct_drop) for d in sorted(by)}
    dn, df = drops[near], drops[far]
    ratio = df / dn if dn and dn > 0 else math.inf
    seq = list(drops.values())
    first, *rest = by[far].orders
    rn, rf = or_nan(by[near].R_x100[first]), or_nan(by[far].R_x100[first])
    checks = [
        Check(
            f"direct drop at d={far} >= {MIN_FAR_DROP:.0f} points and >= "
            f"{MIN_FAR_OVER_NEAR:.0f}x the drop at d={near}",
            df >= MIN_FAR_DROP and ratio >= MIN_FAR_OVER_NEAR,
            f"{dn:.1f} at d={near}, {df:.1f} at d={far} (x{ratio:.1f})",
        ),
        Check(
            "the direct drop does not shrink as d grows",
            all(b >= a for a, b in zip(seq, seq[1:], strict=False)),
            ", ".join(f"d={d}: {v:.1f}" for d, v in drops.items()),
        ),
        Check(
            f"R x100 on order {first} at d={far} >= {MIN_R_RATIO:.0f}x its value at d={near}",
            rf >= MIN_R_RATIO * rn,
            f"{rn:.2f} -> {rf:.2f} (x{rf / rn if rn else math.inf:.2f})",
        ),
    ]
    if rest:
        others = {o: or_nan(by[far].R_x100[o]) for o in rest}
        checks.append(
            Check(
                f"at d={far} the other orders shatter >= half as much as order {first}",
                min(others.values()) >= MIN_GLOBAL * rf,
                f"{first} {rf:.2f}, " + ", ".join(f"{o} {v:.2f}" for o, v in others.items()),
            )
        )
    return checks


def _ring_checks(baseline: Baseline, by: dict[int, KindSummary]) -> list[Check]:
    """A ring before the edit on every order, and the edited order's broken after the
    farthest edits."""
    far = max(by)
    first = by[far].orders[0]
    rings = baseline.rings
    after = by[far].isomap[first]
    return [
        Check(
            f"rings before the edit: Isomap alignment >= {MIN_RING} on every order",
            all(v["isomap"] >= MIN_RING for v in rings.values()),
            ", ".join(f"{o} {v['isomap']:.2f}" for o, v in rings.items()),
        ),
        Check(
            f"order {first}'s ring broken after a d={far} edit (alignment <= {MAX_RING_AFTER})",
            None if after is None else after <= MAX_RING_AFTER,
            f"{rings[first]['isomap']:.2f} before, {_fmt(after)} after (mean over edits)",
        ),
    ]


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


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
            + ", ".join(_fmt(byd[d].direct_drop, 1) for d in ds)
            + " | "
            + ", ".join(_fmt(r.margins.get(d), 1) for d in ds)
            + " | "
            + ", ".join(_fmt(byd[d].R_x100[orders[0]], 1) for d in ds)
            + " | "
            + ", ".join(_fmt(far[o], 1) for o in orders[1:])
            + " | "
            + ", ".join(_fmt(byd[d].mechanism.get("spill"), 3) for d in ds)
            + " | "
            + ", ".join(_fmt(byd[d].mechanism.get("shift.edited"), 2) for d in ds)
            + f" | {_fmt(r.r2)} | {r.n_holding} / {len(r.checks)} |"
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
