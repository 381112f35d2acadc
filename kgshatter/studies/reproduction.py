"""``kgshatter reproduce``: train (or reuse) a model, run the editing sweep, write the report.

The project's main job. ``OUT/run/`` holds the trained run (resumed if interrupted, reused when
finished); ``OUT/`` holds the sweep (``rows.jsonl``, ``table.csv``, ``summary.json``), the
figures and ``report.md``. Everything is checked before the first long computation starts.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path

from kgshatter.io import write_json_atomic
from kgshatter.presets import RunConfig
from kgshatter.studies.report import (
    RingPanels,
    Times,
    make_figures,
    rings_before_after,
    settings_lines,
    write_report,
)
from kgshatter.studies.sweep import (
    SweepConfig,
    SweepResult,
    check_distances,
    check_edit_layers,
    run_sweep,
    single_edits,
)
from kgshatter.studies.targets import fidelity_checks

log = logging.getLogger("kgshatter")


def reproduce(
    run: RunConfig,
    out_dir: str | os.PathLike[str],
    sweep: SweepConfig | None = None,
    progress: bool = True,
    device: str | None = None,
    from_scratch: bool = False,
    checkpoint_seconds: float | None = 300.0,
    workers: int | None = None,
    ray_address: str | None = None,
) -> tuple[SweepResult, Path]:
    """Train ``run`` into ``OUT/run`` (resuming), sweep the edits, write figures and report.

    A preset whose trained run ships with kgshatter (:mod:`kgshatter.studies.shipped`) starts
    from that checkpoint unless ``from_scratch``. ``workers`` / ``ray_address`` run the sweep on Ray
    (:func:`kgshatter.studies.sweep.run_sweep`).
    """
    from kgshatter.studies.shipped import install_bundled
    from kgshatter.training import train

    sweep = sweep or SweepConfig()
    out = Path(out_dir)
    check_distances(sweep.distances, run.kg, sweep.edit_order)  # fail before training
    sweep.representation_site(run.model.n_layers)
    check_edit_layers(sweep, run.model.n_layers)
    if out.exists() and any(out.iterdir()) and not (out / "run").is_dir():
        raise ValueError(f"{out} exists and holds no reproduction (no run/); use a new --out")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if not from_scratch:
        out.mkdir(parents=True, exist_ok=True)
        install_bundled(run, out / "run")
    train(
        run, out / "run", resume=True, progress=progress, device=device,
        checkpoint_seconds=checkpoint_seconds,
    )  # fmt: skip
    seconds["training (or reuse)"] = time.perf_counter() - start
    start = time.perf_counter()
    result = run_sweep(
        out / "run", out, sweep, progress=progress, device=device, workers=workers,
        ray_address=ray_address,
    )  # fmt: skip
    seconds["sweep"] = time.perf_counter() - start
    start = time.perf_counter()
    log.info("drawing the figures and writing %s", out / "report.md")
    panels = _example_rings(out / "run", result, sweep, device)
    figures = make_figures(result, panels)
    if panels is not None:
        result.summary.example = panels.example
        write_json_atomic(out / "summary.json", result.summary.to_dict())
    seconds["figures"] = time.perf_counter() - start
    times = _record_times(out / "times.json", seconds)
    report = write_report(result, figures, settings_lines(run, sweep), times)
    return result, report


def _record_times(path: Path, seconds: dict[str, float]) -> Times:
    """Append this invocation's phase times to ``path``; return them with the totals over all
    invocations (a reproduction interrupted and resumed spends its time in several)."""
    from kgshatter.io import read_json

    history: list[dict[str, float]] = []
    if path.is_file():
        try:
            loaded = read_json(path, "reproduction times")
            history = [h for h in loaded.get("invocations", []) if isinstance(h, dict)]
        except (ValueError, AttributeError):
            log.warning("%s is unreadable; starting the time record afresh", path)
    history.append({k: round(v, 2) for k, v in seconds.items()})
    total = {k: round(sum(float(h.get(k, 0.0)) for h in history), 2) for k in seconds}
    write_json_atomic(path, {"invocations": history, "total": total})
    return Times(seconds, total, len(history))


def _example_rings(
    run_dir: Path, result: SweepResult, sweep: SweepConfig, device: str | None
) -> RingPanels | None:
    """Before/after rings for the edit with the median R among the farthest ROME (or first
    method's) single edits, recomputed from its row (deterministic; statistics are cached)."""
    from kgshatter.editing import CovarianceCache, EditRequest, SyntheticTask, get_method
    from kgshatter.evaluate import Evaluator
    from kgshatter.kg.walks import WalkSampler
    from kgshatter.sites import Site
    from kgshatter.training import load_run

    method = "rome" if "rome" in sweep.methods else sweep.methods[0]
    edits = [e for e in single_edits(result.rows, method) if e.kind == "counterfactual"]
    if not edits:
        return None
    far = max(e.sweep_distance for e in edits)
    edits = sorted((e for e in edits if e.sweep_distance == far), key=lambda e: e.R_mean)
    row = edits[len(edits) // 2]
    run, graph, model, _ = load_run(run_dir, device=device)
    spec = get_method(method)
    task = SyntheticTask(WalkSampler(graph, run.walks), CovarianceCache(run_dir / "cache"))
    request = EditRequest(row.subject, row.relation, row.target)
    edit = spec.compute(
        model, task, [request], spec.config_with_samples(sweep.editor_preset, sweep.n_samples)
    )
    evaluator = Evaluator.for_run(run, graph)
    site = Site.parse(str(result.summary.site))
    label = (
        f"{method}: {row.fact} (d={row.distance}, R x100 = "
        f"{100 * row.R_mean:.1f}, median of the d={far} edits)"
    )
    return rings_before_after(model, edit, evaluator, site, label, sweep.position)


def describe(result: SweepResult) -> str:
    """A few lines for the terminal: per method, its mean efficacy and the fidelity targets it
    meets (report.md lists them), naming those it misses."""
    lines = []
    for m, v in result.summary.methods.items():
        eff = [b.efficacy for b in v.by_kind.values() if b.efficacy is not None]
        line = f"{m:>14}: mean efficacy {100 * statistics.fmean(eff):.0f}%" if eff else f"{m:>14}:"
        if result.summary.baseline is not None:
            checks = fidelity_checks(result.summary, m)
            met = sum(c.holds is True for c in checks)
            line += f"; {met} of {len(checks)} fidelity targets met (report.md)"
            line += "".join(f"\n{'':>16}not met: {c.claim}" for c in checks if c.holds is False)
        lines.append(line)
    return "\n".join(lines)
