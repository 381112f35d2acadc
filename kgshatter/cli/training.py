"""``kgshatter train`` and ``kgshatter evaluate``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kgshatter.io import check_output_dir, check_output_file
from kgshatter.presets import PRESETS, apply_overrides, get_preset

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


from kgshatter.cli.common import (
    _checkpoint_option,
    _checkpoint_seconds,
    _natural,
    _positive,
    _runtime_options,
    format_accuracy,
    format_rings,
    set_threads,
)


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
    from kgshatter.evaluate import Evaluator, mean_ablation
    from kgshatter.io import write_json_atomic
    from kgshatter.sites import Site
    from kgshatter.training import load_run

    name = "evaluation.json" if args.step is None else f"evaluation_step_{args.step}.json"
    out = Path(args.json) if args.json else Path(args.run_dir) / name
    set_threads(args.threads)
    if Path(args.run_dir).is_dir():  # a missing run is named by load_run
        check_output_file(out, "--json")
    if args.figure:
        check_output_file(args.figure, "--figure")
    run, graph, model, state = load_run(args.run_dir, device=args.device, step=args.step)
    if args.site:  # fail before the long computation, not after it
        Site.parse(args.site).check(model.cfg.n_layers)
    if args.key_sharing is not None:
        Site(args.key_sharing, "mlp_post").check(model.cfg.n_layers)
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
    if args.ablate:
        result["ablation"] = mean_ablation(
            model, evaluator.queries["direct"], graph, batch_size=eval_cfg.batch_size
        )
        print("direct recall with one output mean-ablated at one token (where it is computed):")
        print(format_accuracy(result["ablation"]))
    if args.key_sharing is not None:
        result["key_sharing"] = measure_key_sharing(
            model, evaluator.sampler, args.key_sharing, Path(args.run_dir) / "cache"
        )
        print(format_key_sharing(result["key_sharing"]))
    write_json_atomic(out, result)
    print(f"wrote {out}")
    if args.figure:
        fig_path = write_ring_figure(evaluator, model, result, args.figure, args.site, args.method)
        print(f"wrote {fig_path}")
    return 0


def measure_key_sharing(
    model: TransformerBridge, sampler: Any, layer: int, cache_dir: Path
) -> dict[str, Any]:
    """Which orders share block ``layer``'s MLP keys at the relation token: the overlap of
    ROME-shaped edits of each order's facts on every order (C from 10^5 validation walks, as the
    sweep's ROME uses it, cached in ``cache_dir``) and the orders' mean-key cosines."""
    import torch

    from kgshatter.analysis.spill import key_sharing, mean_key_cosine, relation_keys
    from kgshatter.editing import CovarianceCache
    from kgshatter.editing.core import synthetic_stats
    from kgshatter.sites import Site

    graph = sampler.graph
    stats = synthetic_stats(model, sampler, layer, 100_000, CovarianceCache(cache_dir))
    c_inv = stats.solve(torch.eye(len(stats.eigenvalues), dtype=torch.float64))  # ROME's C^-1
    keys = relation_keys(model, sampler, layer)
    return {
        "site": str(Site(layer, "mlp_post")),
        "overlap": key_sharing(keys, graph, c_inv),
        "mean_key_cosine": {
            graph.order_name(o): mean_key_cosine(keys, graph, o) for o in range(graph.n_orders)
        },
    }


def format_key_sharing(sharing: dict[str, Any]) -> str:
    """One line per edited order: its overlap on every order, as a share of its own."""
    lines = [
        f"key sharing at {sharing['site']} (relation token): how much of an edit of one "
        "order's facts reaches each order, relative to the edited order (1: shared, 0: apart)"
    ]
    for edited, row in sharing["overlap"].items():
        own = row[edited]
        cells = ", ".join(f"{o} {v / own:.2f}" for o, v in row.items())
        cos = ", ".join(
            f"{o} {c:+.2f}" for o, c in sharing["mean_key_cosine"][edited].items() if o != edited
        )
        lines.append(f"  order {edited} edited: {cells} (own overlap {own:.3f}; key cosine {cos})")
    return "\n".join(lines)


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


def add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on a synthetic knowledge graph",
        description="Train a preset; checkpoints go to --out (atomic writes).",
    )
    p.add_argument(
        "--preset",
        default="cpu",
        choices=sorted(PRESETS),
        help="paper: the paper's scale, 2,048 entities (about 2.3 h on one CPU thread; shipped "
        "trained); cpu: 128 entities, minutes on 2 CPU cores (default); tiny: tests",
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


def add_evaluate(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="accuracy per task and order, and ring metrics",
        description="Evaluate a run directory's newest checkpoint (or the one at --step) on "
        "every query.",
    )
    p.add_argument("run_dir", help="a run directory written by 'kgshatter train'")
    p.add_argument(
        "--step",
        type=_natural,
        default=None,
        help="evaluate the checkpoint written at this step, a point of the learning curve "
        "(default: the newest; train with --set train.keep_checkpoints=N to keep more; "
        "results go to RUN_DIR/evaluation_step_STEP.json)",
    )
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
    p.add_argument(
        "--ablate",
        action="store_true",
        help="also mean-ablate each block's attention and MLP output at the subject and at "
        "the relation token of direct queries: where the answer is computed",
    )
    p.add_argument(
        "--key-sharing",
        type=_natural,
        nargs="?",
        const=0,
        default=None,
        metavar="LAYER",
        help="also measure which orders share block LAYER's MLP keys (default 0, where the "
        "paper preset's ROME edits): how much of an edit of each order's facts reaches every "
        "order, before any edit (C from 10^5 walks, cached in RUN_DIR/cache)",
    )
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
    p.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="torch CPU threads (default: half the cores, at least 1; docs/speed.md, 'Threads')",
    )
    p.set_defaults(func=_cmd_evaluate)
