"""The reproduction report: figures and ``report.md`` from a finished sweep.

Paper numbers (arXiv 2410.17194) sit beside ours, and the report states, for every method of
the sweep, which of the paper's findings hold here as the fidelity targets
(:func:`kgshatter.studies.targets.fidelity_checks`) state them, without tuning.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kgshatter.io import write_atomic
from kgshatter.kg.graph import roman
from kgshatter.kg.walks import SPLITS
from kgshatter.plotting import panel_width, pyplot, ring_figure, save_figure
from kgshatter.studies.results import RingExample, SweepSummary, or_nan, ordered_kinds
from kgshatter.studies.sweep import SweepConfig, SweepResult, single_edits
from kgshatter.studies.targets import (
    PAPER_ACCURACY_CHANGE,
    PAPER_BASELINE,
    PAPER_R_X100,
    fidelity_checks,
    fmt,
)

if TYPE_CHECKING:
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    from kgshatter.presets import RunConfig


@dataclass(frozen=True)
class Times:
    """A reproduction's phase times in seconds: this invocation's, and the totals over every
    invocation that built the folder (one interrupted and resumed spends its time in several)."""

    now: dict[str, float]
    total: dict[str, float]
    invocations: int


@dataclass(frozen=True)
class RingPanels:
    """What ``rings_before_after.png`` draws: each order's representations (with positions
    and panel width) before and after one edit, and the edit with its ring measures (what
    ``summary.json`` keeps of it)."""

    panels: dict[str, tuple[torch.Tensor, np.ndarray, int | tuple[str, int] | None]]
    n: int  # entities
    title: str
    example: RingExample


def _shapes(kg: Any) -> str:
    """How a graph's orders are shaped, in words: "orders" (rings), "tori of 8 x 8", ..."""
    shapes = [kg.shape(o) for o in range(kg.n_orders)]
    if set(shapes) == {"ring"}:
        return "orders"
    if len(set(shapes)) == 1:
        return f"orders, each a {_shape_words(kg, shapes[0])}"
    return "orders: " + ", ".join(
        f"{roman(o + 1)} a {_shape_words(kg, sh)}" for o, sh in enumerate(shapes)
    )


def _shape_words(kg: Any, shape: str) -> str:
    """ "ring", "8 x 8 torus", "3-ary tree"."""
    if shape == "ring":
        return "ring"
    if shape == "tree":
        return f"{kg.branching}-ary tree"
    return f"{kg.width} x {kg.height} {shape}"


def _percent(x: float | None) -> float | None:
    return None if x is None else 100 * x


def make_figures(result: SweepResult, ring_panels: RingPanels | None = None) -> list[Path]:
    """Write the report's PNG figures into ``result.out_dir``; returns their paths."""
    plt = pyplot()
    out, summary, rows = result.out_dir, result.summary, result.rows
    methods = list(summary.methods)
    colours = {m: plt.cm.tab10(i) for i, m in enumerate(methods)}
    paths = []

    kinds = ordered_kinds({k for m in methods for k in summary.methods[m].by_kind})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, split in zip(axes, SPLITS, strict=True):
        for m in methods:
            by = summary.methods[m].by_kind
            xs = [i for i, k in enumerate(kinds) if k in by]
            ys = [by[kinds[i]].change(split) for i in xs]
            ax.plot(xs, ys, "o-", color=colours[m], label=m)
        px = [kinds.index(k) for k in PAPER_ACCURACY_CHANGE if k in kinds]
        py = [PAPER_ACCURACY_CHANGE[kinds[i]][SPLITS.index(split)] for i in px]
        ax.plot(px, py, "k*--", label="paper (ROME)", ms=9)
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set_xlabel("edit kind (counterfactual at distance d, or corrective)")
        ax.set_title(f"{split}", fontsize=9)
        ax.axhline(0, color="0.7", lw=0.8)
    axes[0].set_ylabel("accuracy change (points, all orders)")
    _legend_below(fig, axes[0])
    paths.append(save_figure(fig, out / "accuracy_vs_distance.png"))

    orders = next(iter(summary.methods.values())).by_kind[kinds[0]].orders
    # each counterfactual kind's distance, read from its summary entry
    at = {k: e.distance for m in methods for k, e in summary.methods[m].by_kind.items()
          if e.distance is not None}  # fmt: skip
    dkinds = [k for k in kinds if k in at]
    fig, axes = plt.subplots(1, len(orders), figsize=(4.3 * len(orders), 3.8), sharey=True)
    for ax, order in zip(np.atleast_1d(axes), orders, strict=True):
        for m in methods:
            by = summary.methods[m].by_kind
            xs = [at[k] for k in dkinds if k in by]
            ys = [by[k].R_x100[order] for k in dkinds if k in by]
            ax.plot(xs, ys, "o-", color=colours[m], label=m)
        paper = [(d, v[orders.index(order)]) for d, v in PAPER_R_X100.items()
                 if orders.index(order) < len(v)]  # fmt: skip
        ax.plot([p[0] for p in paper], [p[1] for p in paper], "k*--", label="paper (ROME)", ms=9)
        ax.set_xlabel("edit distance d")
        ax.set_xticks(sorted({at[k] for k in dkinds} | {p[0] for p in paper}))
        ax.set_title(f"order {order}" + (" (edited)" if order == orders[0] else ""), fontsize=9)
    first = np.atleast_1d(axes)[0]
    first.set_ylabel("R(D*) x100 (distance-matrix distortion)")
    _legend_below(fig, first)
    paths.append(save_figure(fig, out / "shattering_vs_distance.png"))

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m in methods:
        edits = single_edits(rows, m)
        if not edits:
            continue
        fit = summary.methods[m].fit_drop_on_R
        x = np.array([100 * e.R_mean for e in edits])
        y = np.array([e.drop for e in edits])
        ax.scatter(x, y, s=12, color=colours[m], label=f"{m} (r^2 {fmt(fit.r2, 2)})")
        if not math.isnan(fit.slope):
            grid = np.linspace(x.min(), x.max(), 10)
            ax.plot(grid, fit.slope * grid / 100 + fit.intercept, color=colours[m], lw=1)
    ax.set_xlabel("R(D*) x100 (mean over orders)")
    ax.set_ylabel("accuracy drop (points, mean over tasks)")
    ax.set_title("shattering vs accuracy drop, one point per edit", fontsize=9)
    _legend_below(fig, ax)
    paths.append(save_figure(fig, out / "shattering_vs_accuracy.png"))

    if any(summary.methods[m].sequential for m in methods):
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for m in methods:
            seq = summary.methods[m].sequential
            if seq:
                steps = [s.step + 1 for s in seq]
                axes[0].plot(steps, [s.accuracy_drop_points for s in seq], "o-",
                             color=colours[m], label=m, ms=3)  # fmt: skip
                axes[1].plot(steps, [s.R_x100 for s in seq], "o-", color=colours[m], ms=3)
        axes[0].set_title("sequential edits: accuracy", fontsize=9)
        axes[0].set_ylabel("accuracy drop (points, mean over tasks)")
        axes[1].set_title("sequential edits: shattering", fontsize=9)
        axes[1].set_ylabel("R(D*) x100 (mean over orders, log scale)")
        axes[1].set_yscale("log")
        for ax in axes:
            ax.set_xlabel("edits applied")
            ax.xaxis.get_major_locator().set_params(integer=True)
        _legend_below(fig, axes[0])
        paths.append(save_figure(fig, out / "sequential.png"))

    if ring_panels is not None:
        fig = ring_figure(ring_panels.panels, ring_panels.n, ncols=2, title=ring_panels.title)
        paths.append(save_figure(fig, out / "rings_before_after.png"))
    return paths


def _legend_below(fig: Any, ax: Any) -> None:
    """One legend under the panels, where it covers no data."""
    handles, labels = ax.get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8,
               frameon=False)  # fmt: skip


# what each column of table.csv holds (the report prints this guide)
TABLE_COLUMNS = [
    ("method, protocol, kind, sweep_distance, seed, index, step",
     "which edit: the method, single or sequential protocol, counterfactual or corrective, the "
     "distance asked for (0: corrective, -1: a sequence), the sampling seed, the edit's index "
     "and its step in a sequence"),
    ("fact, subject, relation, target, old_target, distance",
     "the request: the edited query, its new and old answers (entity ids) and their distance "
     "on the relation's ring"),
    ("seconds", "time to compute the edit (not its scoring)"),
    ("skipped", "why no edit was made (the model already gave the requested answer)"),
    ("efficacy, target_prob, retained",
     "1 if the edit took (averaged softmax over unseen contexts picks the target), the "
     "target's probability, and in a sequence the fraction of earlier edits still holding"),
    ("paraphrase",
     "the fraction of the unseen context prefixes after which the model gives the target "
     "(the synthetic counterpart of CounterFact's paraphrase score)"),
    ("neighbourhood.subject, neighbourhood.relation, *_change",
     "after the edit, the fraction of the subject's other facts and of the relation's other "
     "subjects' facts still answered right, and the change from the unedited model "
     "(CounterFact's neighbourhood score, synthetic)"),
    ("acc.SPLIT.ORDER",
     "the CHANGE in accuracy (edited minus unedited, a fraction: -0.25 is 25 points lost) on "
     "direct / logical / compositional queries of order I, II, III or all"),
    ("R.ORDER@SITE, R.ORDER, R.mean",
     "R(D*), the distortion of the entities' distance matrix, per order at every site; "
     "without @SITE at the report's representation site; mean over orders"),
    ("neighbours.ORDER, isomap.ORDER",
     "after the edit, at the representation site: fraction of entities whose two nearest "
     "neighbours are within 2 ring steps, and Isomap's circular alignment with the ring"),
    ("shift.edited, shift.others, spill, delta_norm",
     "how far the edit moves the edited entity's MLP output, the mean move of the others, "
     "their ratio, and the norm of the optimised target delta"),
    ("spill.ORDER",
     "the mean move of every query of that order's relations (the edited one left out) as a "
     "fraction of the edited query's, at the first edited layer: where the edit lands, "
     "before any accuracy is scored (kgshatter.analysis.spill.order_moves)"),
]  # fmt: skip


def write_report(
    result: SweepResult, figures: list[Path], settings: list[str], seconds: Times
) -> Path:
    """``report.md``: our numbers beside the paper's, findings, ``settings`` (one bullet
    each, :func:`settings_lines`), figures, and the times ``kgshatter reproduce`` records."""
    s = result.summary
    if s.baseline is None or s.run is None:
        raise ValueError("write_report needs a finished sweep's summary (baseline and run)")
    lines = ["# Representation shattering: reproduction report", ""]
    lines += [
        f"Run `{s.run.run_dir}` (step {s.run.step}, graph {s.run.graph_fingerprint}), "
        f"representations at `{s.site}` ({s.position} token of `x o_C1`, on a lattice "
        "`x o_E1`, on a tree `x o_U1`, mean over contexts).",
        _times_line(seconds),
        "",
    ]
    lines += _findings_lines(s)
    lines += _baseline_lines(s)
    if "rome" in s.methods:
        lines += _rome_lines(s)
    lines += _methods_lines(s)
    lines += ["", "## Settings: the paper's and ours", ""]
    lines += [f"- {line}" for line in settings]
    lines += ["", "## Figures", ""]
    for p in figures:
        lines += [f"![{p.stem}]({p.name})", ""]
        if p.stem == "rings_before_after" and s.example is not None:
            lines += [_ring_paragraph(s.example.label, s.example.rings), ""]
    lines += ["## Data", "", "`table.csv` (one row per edit or sequence step), `summary.json`, "
              "`rows.jsonl` (the resumable log). The columns of `table.csv`:", ""]  # fmt: skip
    lines += [f"- `{cols}`: {what}." for cols, what in TABLE_COLUMNS]
    text = "\n".join(lines) + "\n"
    path = result.out_dir / "report.md"
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _findings_lines(s: SweepSummary) -> list[str]:
    """The paper's findings as the fidelity targets state them, for every method of the sweep,
    the paper's main method (ROME) first."""
    main = s.main_method()
    lines = [
        "## Findings: the fidelity targets (docs/fidelity.md)",
        "",
        "The paper's findings on its synthetic model as thresholds, looser than its own "
        "numbers (in parentheses after ours); single counterfactual edits, R at the "
        f"representation site `{s.site}`."
        + ("" if main == "rome" else " ROME, the paper's main method, was not in this sweep."),
    ]
    for method in sorted(s.methods, key=lambda m: m != main):
        checks = fidelity_checks(s, method)
        met = sum(c.holds is True for c in checks)
        lines += ["", f"### {method}: {met} of {len(checks)} met", ""]
        for check in checks:
            verdict = {True: "met", False: "**not met**", None: "not measurable"}[check.holds]
            lines.append(f"- {check.claim}: {verdict} ({check.evidence}).")
    return lines


def _baseline_lines(s: SweepSummary) -> list[str]:
    """The unedited model: a caution if it never learned a task, accuracy beside the paper's,
    its rings, and why there are no corrective edits if there are none."""
    assert s.baseline is not None and s.run is not None
    base, orders = s.baseline.accuracy, s.baseline.orders
    lines: list[str] = []
    weak = [sp for sp in SPLITS if base[sp]["all"] is not None and or_nan(base[sp]["all"]) < 0.8]
    if weak:
        skills = " and ".join(
            f"{sp} inference" if sp != "direct" else "direct recall" for sp in weak
        )
        levels = ", ".join(f"{sp} {100 * or_nan(base[sp]['all']):.0f}%" for sp in weak)
        lines += [
            "",
            f"**Caution: this model has not learned {skills} ({levels} before any edit; the "
            "paper's model: 79-99%).** Damage to knowledge the model never had says little "
            "about the paper's question; read these numbers as a test of the pipeline.",
        ]
    lines += ["", "## Before any edit", "", "| task | " + " | ".join(
        f"{o} ours / paper" for o in orders) + " |", "|---" * (len(orders) + 1) + "|"]  # fmt: skip
    for split in SPLITS:
        cells = [f"{fmt(_percent(base[split][o]), 1)} / {PAPER_BASELINE[split][i]}"
                 for i, o in enumerate(orders[:3])]  # fmt: skip
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    rings = s.baseline.rings
    lines += ["", "Ring structure before editing at the representation site: " + "; ".join(
        f"order {o}: neighbours {fmt(v['neighbours'], 2)}, Isomap alignment "
        f"{fmt(v['isomap'], 2)}" for o, v in rings.items()) + "."]  # fmt: skip
    got = {k for v in s.methods.values() for k in v.by_kind}
    if "corrective" in s.run.kinds and "corrective" not in got:
        lines += [
            "",
            "No corrective edits were made: the model answers every order-I fact correctly "
            "(softmax averaged over 5 contexts), so there is nothing to correct.",
        ]
    return lines


def _rome_lines(s: SweepSummary) -> list[str]:
    """ROME's accuracy change and R(D*) per kind, beside the paper's."""
    assert s.baseline is not None
    orders = s.baseline.orders
    rome = s.methods["rome"]
    by = rome.by_kind
    lines = ["", "## ROME: accuracy change (points, all orders), ours / paper", "",
             "| edit | n | efficacy | direct | logical | compositional |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for k in rome.kinds():
        paper = PAPER_ACCURACY_CHANGE.get(k)
        cells = [
            f"{fmt(by[k].change(sp), 1)}" + (f" / {paper[i]}" if paper else "")
            for i, sp in enumerate(SPLITS)
        ]
        lines.append(f"| {k} | {by[k].n} | {fmt(_percent(by[k].efficacy), 0)}% | "
                     + " | ".join(cells) + " |")  # fmt: skip
    header = "| edit | " + " | ".join(orders) + " |"
    rule = "|---" * (len(orders) + 1) + "|"
    lines += ["", "## ROME: R(D*) x100 per order, ours / paper", "", header, rule]
    for k in rome.kinds():
        d = by[k].distance
        paper = PAPER_R_X100.get(d) if d is not None else None
        cells = [f"{fmt(by[k].R_x100[o], 2)}" + (f" / {paper[i]}" if paper and i < 3
                 else "") for i, o in enumerate(orders)]  # fmt: skip
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def _methods_lines(s: SweepSummary) -> list[str]:
    """Every method's single edits per kind, and the end of each sequence."""
    orders = s.baseline.orders if s.baseline is not None else []
    lines = ["", "## Every method (single-edit protocol)", "",
             "| method | edit | n | efficacy | accuracy change | R x100 | neighbours after |"
             f" spill {' / '.join(orders)} | r^2 (drop on R) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for m, v in s.methods.items():
        for k in v.kinds():
            b = v.by_kind[k]
            nb = statistics.fmean(x for x in b.neighbours.values() if x is not None)
            spill = " / ".join(fmt(b.mechanism.get(f"spill.{o}"), 3) for o in orders)
            lines.append(
                f"| {m} | {k} | {b.n} | {fmt(_percent(b.efficacy), 0)}% | "
                f"{b.mean_change:.1f} | {fmt(b.R_x100['mean'], 2)} | {nb:.2f} | {spill} | "
                f"{fmt(v.fit_drop_on_R.r2, 2)} |"
            )
        if v.skipped:
            lines.append(f"| {m} | skipped | {v.skipped} | (the model already gave the "
                         "requested answer) | | | | | |")  # fmt: skip
    if any(v.sequential for v in s.methods.values()):
        lines += ["", "## Sequential editing (each edit on top of the earlier ones)", "",
                  "| method | edits | efficacy of the last | earlier edits retained | "
                  "accuracy drop | R x100 |", "|---|---|---|---|---|---|"]  # fmt: skip
        for m, v in s.methods.items():
            if v.sequential:
                last = v.sequential[-1]
                lines.append(
                    f"| {m} | {last.step + 1} | {fmt(100 * last.efficacy, 0)}% | "
                    f"{fmt(_percent(last.retained), 0)}% "
                    f"| {last.accuracy_drop_points:.1f} | {last.R_x100:.2f} |"
                )
    return lines


def _times_line(seconds: Times) -> str:
    """This invocation's times, and the totals over every invocation that built this folder."""
    text = "Times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.now.items())
    if seconds.invocations > 1:
        text += f" (this invocation); over all {seconds.invocations} invocations: " + ", ".join(
            f"{k} {v / 60:.1f} min" for k, v in seconds.total.items()
        )
    return text + "."


def _ring_paragraph(label: str, rings: dict[str, dict[str, dict[str, float]]]) -> str:
    """What ``rings_before_after.png`` shows, with the numbers of the edit drawn."""
    parts = "; ".join(
        f"order {o}: neighbours {fmt(v['before']['neighbours'], 2)} -> "
        f"{fmt(v['after']['neighbours'], 2)}, alignment {fmt(v['before']['isomap'], 2)} -> "
        f"{fmt(v['after']['isomap'], 2)}"
        for o, v in rings.items()
    )
    return (
        f"`rings_before_after.png` draws {label}: each row is one order, before "
        "(left) and after (right) the edit, in a 2-D Isomap of the entities' representations. "
        "Colour is each entity's position on that order's ring and the grey line joins ring "
        "neighbours, so an intact ring is a closed loop whose colours run once around; "
        f"shattering tangles it. Measured on these panels: {parts}."
    )


def settings_lines(run: RunConfig, sweep: SweepConfig) -> list[str]:
    """What is the paper's and what is our choice, in this run."""
    return [
        "Paper: 2048 entities on 3 cyclic orders, relations up to 4 hops both "
        "ways, 2-layer decoder, context 16, softmax averaged over 5 context prefixes, "
        "ROME on the first block's W_out, C from 10^5 validation walks, R(D*) on Euclidean "
        "distance matrices, counterfactual distances d = 1..4.",
        f"Ours (choice, the `{run.name}` preset): {run.kg.n_entities} entities on "
        f"{run.kg.n_orders} {_shapes(run.kg)}, hops up to {run.kg.max_hops}, d_model "
        f"{run.model.d_model}, {run.train.steps} steps (paper 150k), weight decay "
        f"{run.train.weight_decay}, two-hop steps in {run.walks.composition_prob:.0%} of walk "
        "steps, compositions within one order.",
        (
            "Ours (experiment): the first block's attention is restricted to each token "
            "itself (`layer0_attention='self'`), so the subject is processed at its own "
            "position as the paper's edits assume; "
            if run.model.layer0_attention == "self"
            else "Ours (choice, measured): "
        )
        + (
            "keys and values at the subject token"
            if sweep.editor_preset.endswith("subject")
            else "keys and values at the relation token (the standard grokked model "
            "computes the answer there; edits at the subject token do not change it)"
        )
        + f"; editor presets `{sweep.editor_preset}` (kgshatter/editing); collateral scored "
        f"on {sweep.max_queries or 'all'} queries per split; representations at the "
        "site where the unedited model's rings are clearest (neighbour agreement; R is also "
        "stored at every MLP and block output in table.csv); Isomap with 3 neighbours.",
        f"Sweep: methods {', '.join(sweep.methods)}; {sweep.n_edits} edits per kind and "
        f"seed, seeds {list(sweep.seeds)}; sequences of {sweep.sequential_edits} edits "
        "cycling through the distances (beyond the paper).",
    ]


def rings_before_after(
    model: TransformerBridge,
    edit: Any,
    evaluator: Any,
    site: Any,
    label: str,
    position: str = "relation",
) -> RingPanels:
    """Panels for ``rings_before_after.png``: each order before and after ``edit``."""
    from kgshatter.analysis.geometry import structure_isomap, structure_neighbours
    from kgshatter.analysis.representations import collect_representations
    from kgshatter.hooks import edited

    graph = evaluator.graph
    panels = {}
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for o in range(graph.n_orders):
        tokens = evaluator.ring_tokens(o)
        before = collect_representations(model, tokens, [site], position=position)[site]
        with edited(model, edit):
            after = collect_representations(model, tokens, [site], position=position)[site]
        name = graph.order_name(o)
        width = panel_width(graph, o)
        panels[f"order {name} before"] = (before, graph.positions[o], width)
        panels[f"order {name} after"] = (after, graph.positions[o], width)
        metrics[name] = {
            when: {
                "neighbours": structure_neighbours(r, graph, o),
                "isomap": structure_isomap(r, graph, o),
            }
            for when, r in (("before", before), ("after", after))
        }
    return RingPanels(panels, graph.n_entities, f"{label} @ {site}", RingExample(label, metrics))
