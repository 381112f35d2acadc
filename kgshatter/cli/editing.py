"""``kgshatter edit``, ``kgshatter edit-benchmark`` and ``kgshatter benchmark``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from kgshatter.editing.protocols import PROTOCOLS
from kgshatter.io import check_output_dir, check_output_file
from kgshatter.kg.walks import SPLITS
from kgshatter.presets import PRESETS, apply_overrides, get_preset
from kgshatter.studies.sweep import KIND_CHOICES

if TYPE_CHECKING:
    from kgshatter.editing.protocols import Accuracy, EditRecord

from kgshatter.cli.common import (
    _natural,
    _positive,
    _runtime_options,
    format_accuracy,
    set_threads,
)


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


def add_edit(sub: Any) -> None:
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
    p.add_argument("--sample", default=None, choices=KIND_CHOICES, help="sample requests")
    p.add_argument("--distance", type=_positive, default=1, help="counterfactual cyclic distance d")
    p.add_argument("--n", type=_positive, default=10, help="number of sampled requests")
    p.add_argument("--seed", type=_natural, default=0, help="sampling seed")
    p.add_argument("--protocol", default="single", choices=PROTOCOLS)
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


def add_edit_benchmark(sub: Any) -> None:
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


def add_benchmark(sub: Any) -> None:
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
