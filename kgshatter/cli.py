"""The ``kgshatter`` command line: train, evaluate, benchmark.

Errors in user input print one line naming the problem and exit with status 2; nothing on disk
is overwritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from kgshatter.kg.graph import roman
from kgshatter.kg.walks import SPLITS
from kgshatter.presets import PRESETS, RunConfig, get_preset

ROMAN_ORDER = {roman(i): i for i in range(1, 40)}

log = logging.getLogger("kgshatter")


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"train.lr=0.002"`` -> ``("train", "lr", 0.002)`` (values are JSON, else strings).

    >>> parse_override("train.weight_decay=1.0")
    ('train', 'weight_decay', 1.0)
    >>> parse_override("model.act_fn=relu")
    ('model', 'act_fn', 'relu')
    """
    key, eq, raw = text.partition("=")
    part, dot, field = key.partition(".")
    if not eq or not dot or not part or not field:
        raise ValueError(f"--set takes PART.FIELD=VALUE (e.g. train.lr=0.002), got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return part, field, value


def apply_overrides(run: RunConfig, overrides: list[str]) -> RunConfig:
    """A copy of ``run`` with ``--set`` overrides applied and validated."""
    data = run.to_dict()
    for text in overrides:
        part, field, value = parse_override(text)
        if part not in data or part == "name":
            allowed = sorted(k for k in data if k != "name")
            raise ValueError(f"--set part must be one of {allowed}, got {part!r}")
        if field not in data[part]:
            raise ValueError(f"--set: {part} has no field {field!r}; fields: {sorted(data[part])}")
        data[part][field] = value
    return RunConfig.from_dict(data)


def _cmd_train(args: argparse.Namespace) -> int:
    from kgshatter.train import train

    run = apply_overrides(get_preset(args.preset), args.set or [])
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    result = train(run, args.out, resume=args.resume, device=args.device, progress=not args.quiet)
    last = result.history[-1] if result.history else {}
    print(format_accuracy(last.get("accuracy", {})))
    print(f"trained {run.name} for {run.train.steps} steps; checkpoints in {args.out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from kgshatter.evaluate import Evaluator
    from kgshatter.io import write_json_atomic
    from kgshatter.sites import Site
    from kgshatter.train import load_run

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
    out = Path(args.json) if args.json else Path(args.run_dir) / "evaluation.json"
    write_json_atomic(out, result)
    print(f"wrote {out}")
    if args.figure:
        fig_path = write_ring_figure(evaluator, model, result, args.figure, args.site, args.method)
        print(f"wrote {fig_path}")
    return 0


def write_ring_figure(
    evaluator: Any, model: Any, result: dict[str, Any], path: str, site: str | None, method: str
) -> Path:
    """Each order's entities in 2-D at ``site`` (default: that order's best site by ``method``)."""
    from kgshatter.analysis.representations import collect_representations
    from kgshatter.plotting import ring_figure, save_figure
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
        panels[f"order {name} ({graph.role(o)}) @ {s}"] = (reps, graph.positions[o])
    fig = ring_figure(
        panels,
        graph.n_entities,
        method=method,
        title=f"entity representations, queries 'x <order>_C1' (step {result['step']})",
    )
    return save_figure(fig, path)


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from kgshatter.benchmark import throughput_benchmark

    result = throughput_benchmark(
        get_preset(args.preset), steps=args.steps, threads=args.threads, out=args.json
    )
    print(json.dumps(result, indent=1))
    return 0


def format_accuracy(acc: dict[str, dict[str, float | None]]) -> str:
    """Accuracy table: tasks as rows, orders as columns."""
    if not acc:
        return "(no evaluation)"
    tasks = [t for t in SPLITS if t in acc] + [t for t in acc if t not in SPLITS]
    orders = sorted(acc[tasks[0]], key=lambda o: (o == "all", ROMAN_ORDER.get(o, 99), o))
    lines = ["task           " + "".join(f"{o:>8}" for o in orders)]
    for task in tasks:
        cells = "".join(
            f"{'-' if acc[task][o] is None else f'{100 * acc[task][o]:.1f}':>8}" for o in orders
        )
        lines.append(f"{task:<15}{cells}")
    return "\n".join(lines)


def format_rings(summary: dict[str, dict[str, Any]]) -> str:
    lines = ["ring structure (best site per metric)"]
    for order, metrics in summary.items():
        cells = ", ".join(f"{m} {v['value']:.2f} @ {v['site']}" for m, v in metrics.items())
        lines.append(f"  {order}: {cells}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kgshatter",
        description="Representation shattering under knowledge edits (arXiv 2410.17194) on "
        "TransformerLens: train a model on a structured knowledge graph and evaluate it.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
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
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="accuracy per task and order, and ring metrics",
        description="Evaluate a run directory's newest checkpoint on every query.",
    )
    p.add_argument("run_dir", help="a run directory written by 'kgshatter train'")
    p.add_argument(
        "--prefixes",
        type=int,
        default=None,
        help="context prefixes per query, softmax averaged (default: the run's, 5)",
    )
    p.add_argument(
        "--max-queries",
        type=int,
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

    p = sub.add_parser("benchmark", help="training throughput: bridge vs plain PyTorch decoder")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=60, help="timed steps per model")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default="benchmark.json", help="where to write the numbers")
    p.set_defaults(func=_cmd_benchmark)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"kgshatter {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
