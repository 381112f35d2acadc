"""Editing benchmarks: efficacy, latency and collateral per method on a trained run, and the
edit sweep with every forward-pass shortcut against none (``kgshatter edit-benchmark``).

Benchmarks, not tests: they print numbers and write a JSON file.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kgshatter.io import write_json_atomic
from kgshatter.kg.walks import WalkSampler

if TYPE_CHECKING:
    pass


def edit_benchmark(
    run_dir: str,
    methods: list[str],
    n_edits: int = 50,
    distances: tuple[int, ...] = (1, 2, 3, 4),
    seed: int = 0,
    max_queries: int | None = 300,
    n_samples: int = 100_000,
    progress: bool = True,
) -> dict[str, Any]:
    """Efficacy, latency and collateral of each method over ``n_edits`` counterfactual edits.

    The edits cycle through ``distances`` (single-edit protocol, pristine model each time).
    Second moments are computed once per layer, timed, and kept in memory (the first edit that
    needs a layer pays for it; its time is reported separately as ``stats_seconds``).
    """
    from kgshatter.editing import SyntheticTask, TargetConfig, get_method, model_identity
    from kgshatter.editing.protocols import EditScorer, run_protocol, sample_requests
    from kgshatter.evaluate import Evaluator
    from kgshatter.training import load_run

    run, graph, model, _ = load_run(run_dir)
    model.eval()
    specs = [get_method(m) for m in methods]  # typos fail before any work
    sampler = WalkSampler(graph, run.walks)
    task = SyntheticTask(sampler, cache=None)
    model_id = model_identity(model)
    configs = {s.name: s.config_with_samples("synthetic", n_samples) for s in specs}
    stats_seconds = {}
    layers = {
        layer
        for name, c in configs.items()
        if isinstance(c, TargetConfig)
        for layer in c.edit_layers
    }
    for layer in sorted(layers):  # computed fresh (no disk cache) so the time is honest
        start = time.perf_counter()
        task.stats(model, layer, n_samples, 0, model_id)
        stats_seconds[str(layer)] = time.perf_counter() - start
    scorer = EditScorer(model, Evaluator.for_run(run, graph, max_queries=max_queries))
    per_d = [
        n_edits // len(distances) + (i < n_edits % len(distances)) for i in range(len(distances))
    ]
    requests = [
        r
        for d, k in zip(distances, per_d, strict=True)
        for r in sample_requests(graph, "counterfactual", k, seed + d, distance=d)
    ]
    results: dict[str, Any] = {
        "run_dir": str(run_dir),
        "n_edits": len(requests),
        "distances": list(distances),
        "threads": torch.get_num_threads(),
        "stats_seconds": stats_seconds,
        "stats_samples": n_samples,
        "methods": {},
    }
    for spec in specs:
        res = run_protocol(
            model,
            task,
            spec,
            configs[spec.name],
            requests,
            "single",
            scorer,
            model_id=model_id,
            progress=progress,
        )
        rows = [r.to_dict() for r in res.scored()]
        seconds = sorted(r["seconds"] for r in rows)
        change = {
            split: statistics.fmean(r["accuracy_change"][split]["all"] for r in rows)
            for split in rows[0]["accuracy_change"]
        }
        by_d = {
            str(d): statistics.fmean(
                r["efficacy"] for r in rows if r["requests"][0]["distance"] == d
            )
            for d in distances
        }
        change_by_d = {
            str(d): {
                split: statistics.fmean(
                    r["accuracy_change"][split]["all"]
                    for r in rows
                    if r["requests"][0]["distance"] == d
                )
                for split in change
            }
            for d in distances
        }
        results["methods"][spec.name] = {
            "efficacy": statistics.fmean(r["efficacy"] for r in rows),
            "efficacy_by_distance": by_d,
            "accuracy_change_by_distance": change_by_d,
            "skipped": len(res.records) - len(rows),
            "median_seconds": seconds[len(seconds) // 2],
            "max_seconds": seconds[-1],
            "mean_accuracy_change": change,
        }
    return results


@contextmanager
def without_shortcuts() -> Iterator[None]:
    """Every forward pass as TransformerLens computes it: no prompt-prefix shortcut
    (:func:`kgshatter.editing.prefix.disabled`), no last block over the read positions only
    (:func:`kgshatter.readout.disabled`), TransformerLens's own attention
    and normalisation forwards (:func:`kgshatter.models.native_forwards`). The same values up
    to float rounding."""
    from kgshatter import readout
    from kgshatter.editing import prefix
    from kgshatter.models import native_forwards

    with prefix.disabled(), readout.disabled(), native_forwards():
        yield


def sweep_benchmark(
    run_dir: str | Path,
    config: Any = None,
    batches: tuple[int, ...] = (1, 12),
    out: str | Path | None = None,
) -> dict[str, Any]:
    """The editing sweep's edits per second at each ``edit_batch``, with and without the
    forward-pass shortcuts (``"B"`` and ``"B-no-shortcuts"``, the latter inside
    :func:`without_shortcuts`: the prompt-prefix shortcut of the target optimisation, the
    last block computed only where it is read, the lean attention), side by side on the
    same rows, and how far their ``table.csv`` values differ from the first variant's
    (``seconds`` excluded). Statistics are computed once beforehand (cached in the run
    directory), so none pays for them. Speed-ups are over ``"<first batch>-no-shortcuts"``,
    the sweep without any lever (the prompts of the scorer are kept in every variant)."""
    import csv
    import shutil
    import tempfile

    from kgshatter.studies.sweep import SweepConfig, run_sweep

    config = config or SweepConfig(kinds=("counterfactual",), sequential_edits=0)
    results: dict[str, Any] = {"run_dir": str(run_dir), "sweep": config.to_dict(), "batches": {}}
    tables = {}
    variants = [(f"{b}-no-shortcuts", b, False) for b in batches]
    variants += [(str(b), b, True) for b in batches]
    work = Path(tempfile.mkdtemp(prefix="kgshatter-sweep-bench-"))
    try:
        warm = SweepConfig.from_dict({**config.to_dict(), "n_edits": 1, "distances": [1]})
        run_sweep(run_dir, work / "warm", warm, progress=False)  # statistics into the cache
        for name, b, shortcut in variants:
            start = time.perf_counter()
            with nullcontext() if shortcut else without_shortcuts():
                res = run_sweep(run_dir, work / name, config, progress=False, edit_batch=b)
            seconds = time.perf_counter() - start
            n = sum(1 for r in res.rows if "efficacy" in r)
            results["batches"][name] = {
                "seconds": round(seconds, 2),
                "edits": n,
                "edits_per_second": round(n / seconds, 3),
                "edit_batch": b,
                "shortcuts": shortcut,
            }
            with open(work / name / "table.csv", newline="") as f:
                tables[name] = list(csv.DictReader(f))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base, *others = [name for name, _, _ in variants]
    diffs = {}
    for name in others:
        worst = 0.0
        for r0, r1 in zip(tables[base], tables[name], strict=True):
            for k, v in r0.items():
                if k == "seconds" or v == r1[k]:
                    continue
                try:
                    worst = max(worst, abs(float(v) - float(r1[k])))
                except ValueError:
                    worst = math.inf  # a non-numeric cell differs
        diffs[name] = worst
    rates = {name: results["batches"][name]["edits_per_second"] for name, _, _ in variants}
    results["speedup"] = {name: round(rates[name] / rates[base], 3) for name in others}
    results["max_abs_table_difference"] = diffs
    results["threads"] = torch.get_num_threads()
    if out is not None:
        write_json_atomic(out, results)
    return results
