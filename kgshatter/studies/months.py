"""The paper's naturalistic replication (arXiv 2410.17194): edit a pretrained model's knowledge of
the months (days, cities), measure the ring before and after, and reasoning (MMLU-Redux).

``run_months(pretrained, config, out)`` writes, like the synthetic ``reproduce``:
``rows.jsonl`` (one row per edit), ``summary.json`` (means per distance and the fit of
accuracy drop on R(D*)), figures and ``report.md``. Edits are applied as hooks only; the model
is unchanged afterwards.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kgshatter.io import remove_stale_temporaries
from kgshatter.studies.results import (
    Claim,
    Fit,
    MMLUScore,
    MonthsDistance,
    MonthsSummary,
    TraceSummary,
)
from kgshatter.studies.rowlog import append_row, check_or_write_header, read_rows
from kgshatter.validation import ConfigDict, check_bool, check_choice, check_int

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger(__name__)

TASKS = ("months", "days", "cities")
# ring sizes of the cyclic tasks: an edit moves an answer at most half the ring away
RING_SIZES = {"months": 12, "days": 7}
# 2: the subjects' representations no longer include the bare-subject context (facts.CONTEXTS)
MONTHS_FORMAT = "kgshatter-months-2"
# which preset each known checkpoint uses (editing presets of kgshatter.editing)
MODEL_PRESETS = {
    "gpt2-xl": "gpt2-xl",
    "llama-3-8b": "llama3-8b",
    "llama3-8b": "llama3-8b",
    "mamba-2.8b": "mamba-2.8b",
    "smollm2-135m": "smollm2-135m",
}
# the phrasing of the cyclic tasks a checkpoint answers (kgshatter.pretrained.facts): SmolLM2-135M
# answers 1 of 12 hop questions on the months and 12 of 12 in list form (docs/pretrained.md)
MODEL_PHRASINGS = {"smollm2": "list"}
FACT_POOLS = ("auto", "known", "all")


def phrasing_for(name: str) -> str:
    """The cyclic tasks' phrasing for a checkpoint name or path: ``"list"`` for the models of
    :data:`MODEL_PHRASINGS`, else ``"hop"`` (the paper's questions)."""
    low = name.lower()
    return next((v for k, v in MODEL_PHRASINGS.items() if k in low), "hop")


def preset_for(name: str) -> str | None:
    """The editing preset for a checkpoint name or path (``None`` if none is known).

    A local directory written by :func:`kgshatter.pretrained.loading.tiny_checkpoint` (it holds the
    tiny-random marker) gets ``"tiny-pretrained"``.
    """
    from kgshatter.pretrained.loading import TINY_MARKER

    if name.startswith("tiny:") or (Path(name) / TINY_MARKER).is_file():
        return "tiny-pretrained"
    low = name.lower()
    for key, preset in MODEL_PRESETS.items():
        if key in low:
            return preset
    return None


def resolve_preset(model: str, method: str, preset: str | None = None) -> str:
    """The editing preset ``method`` uses on ``model`` (a hub name, a directory or
    ``tiny:FAMILY``), checked before any weight is loaded: an explicit ``preset`` must exist
    for the method; otherwise the model must be one with a preset, and the method must have it.
    """
    from kgshatter.editing import METHODS, get_method

    spec = get_method(method)
    if preset is not None:
        spec.config(preset)  # an unknown name lists the method's presets
        return preset
    found = preset_for(model)
    if found is None:
        raise ValueError(
            f"no editing preset is known for model {model!r} (known: "
            f"{', '.join(sorted(set(MODEL_PRESETS.values())))}, and tiny:FAMILY checkpoints); "
            f"pass --preset with one of {method}'s presets {sorted(spec.presets)}"
        )
    if found not in spec.presets:
        others = sorted(m for m, s in METHODS.items() if found in s.presets)
        raise ValueError(
            f"{method} has no {found!r} preset (a reference gives none in kgshatter's "
            f"sources); methods with one: {others}, or pass --preset with one of "
            f"{sorted(spec.presets)}"
        )
    return found


@dataclass(frozen=True, kw_only=True)
class MonthsConfig(ConfigDict):
    """What to run. ``site``: where representations are compared (``"L.resid_post"``);
    ``None`` picks the unedited model's clearest ring (cyclic tasks) or the last layer (tree).
    ``n_samples``: corpus tokens for C (``None``: the preset's). ``mmlu_every``: score
    MMLU-Redux after every k-th edit of each distance (1 = all; costly with real weights).
    ``phrasing``: the cyclic tasks' questions, ``"hop"`` or ``"list"`` (``"auto"``: the
    model's, :func:`phrasing_for`). ``facts``: which facts are edited, ``"known"`` (those the
    unedited model answers right), ``"all"``, or ``"auto"`` (known, but all on a tiny random
    checkpoint). ``trace_prompts``: facts traced causally before editing (0: none)."""

    task: str = "months"
    method: str = "rome"
    preset: str | None = None
    distances: tuple[int, ...] = (1, 2, 3)
    n_edits: int = 4
    seed: int = 0
    site: str | None = None
    n_samples: int | None = None
    mmlu_every: int = 1
    mmlu_max_new_tokens: int = 512
    # fluency (n-gram entropy of continuations about the subject): tokens generated per prompt
    # before and after each edit (0: not measured)
    fluency_tokens: int = 24
    # how an answer is read among the candidates (kgshatter.pretrained.facts.FactTask): its first
    # token, its whole token sequence, or "auto" (first token where those are distinct)
    scoring: str = "auto"
    phrasing: str = "auto"
    facts: str = "auto"
    trace_prompts: int = 12
    # general ability beyond the edited facts, before and after each edit: perplexity of a
    # fixed text and kgshatter's calendar questions (kgshatter.pretrained.ability)
    ability: bool = True

    def __post_init__(self) -> None:
        check_choice("task", self.task, TASKS)
        check_choice("phrasing", self.phrasing, ("auto", "hop", "list"))
        check_choice("facts", self.facts, FACT_POOLS)
        check_int("trace_prompts", self.trace_prompts, 0)
        check_bool("ability", self.ability)
        if self.task == "cities" and self.phrasing == "list":
            raise ValueError("the cities task has one phrasing; phrasing 'list' is for months "
                             "and days")  # fmt: skip
        check_int("n_edits", self.n_edits, 1)
        check_int("seed", self.seed, 0)
        check_int("mmlu_every", self.mmlu_every, 1)
        check_int("mmlu_max_new_tokens", self.mmlu_max_new_tokens, 1)
        check_int("fluency_tokens", self.fluency_tokens, 0)
        from kgshatter.pretrained.facts import SCORINGS

        check_choice("scoring", self.scoring, SCORINGS)
        if self.n_samples is not None:
            check_int("n_samples", self.n_samples, 1)
        if self.task == "cities":
            if self.distances:
                raise ValueError("the cities task is a tree: it has no distances; pass ()")
        elif not self.distances:
            raise ValueError(f"the {self.task} task needs at least one distance")
        else:
            half = RING_SIZES[self.task] // 2
            for d in self.distances:
                check_int(f"distance on the {RING_SIZES[self.task]}-item {self.task} ring", d, 1,
                          half)  # fmt: skip
            if len(set(self.distances)) != len(self.distances):
                raise ValueError(f"distances must differ, got {list(self.distances)}")
        from kgshatter.editing import get_method

        get_method(self.method)


def run_months(
    pretrained: Any,
    config: MonthsConfig,
    out: str | os.PathLike[str],
    *,
    corpus: Any = None,
    cache_dir: str | os.PathLike[str] | None = None,
    mmlu_items: Any = (),
    progress: bool = True,
) -> MonthsSummary:
    """Run the replication on a :class:`~kgshatter.pretrained.loading.PretrainedModel`; returns the
    summary (:class:`~kgshatter.studies.results.MonthsSummary`, also written to
    ``out/summary.json``).

    Resumable like the sweep: ``out/months.json`` pins the model, the configuration and the
    preset (a different one is refused); each edit's row is appended to ``rows.jsonl`` (fsynced)
    with its after-edit representations in ``reps/``, and a rerun skips finished rows. The
    summary, figures and report are rewritten atomically at the end.
    """
    from kgshatter.editing import CovarianceCache
    from kgshatter.io import write_json_atomic
    from kgshatter.pretrained.text import TextTask

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = _MonthsPlan.resolve(pretrained, config, out, corpus, cache_dir)
    if (out / "rows.jsonl").exists() and not (out / "months.json").exists():
        raise ValueError(
            f"{out} holds rows.jsonl but no months.json: rows of an older kgshatter or of "
            f"something else; use a new --out"
        )
    header = plan.header(pretrained, config, len(mmlu_items))
    pinned = tuple(k for k in header if k != "model")  # the same weights under another path
    check_or_write_header(out, "months.json", header, pinned, "months replication")
    cache = CovarianceCache(cache_dir) if cache_dir is not None else None
    text_task = TextTask(pretrained.model, pretrained.tokenizer, plan.corpus, cache)
    tracing = (
        _trace(out, pretrained.model, pretrained.tokenizer, plan.task, plan.scorer.known, config,
               pretrained.model_id, cache_dir)
        if plan.scorer.known
        else None
    )  # fmt: skip
    base = _Baseline.measure(pretrained, plan, config, mmlu_items, progress)
    log.info("baseline: accuracy %.3f, site %s, mmlu %s", base.accuracy, base.site, base.mmlu)

    rows, afters = _edit_all(out, pretrained, plan, base, config, text_task, mmlu_items, progress)
    edited_rows = [r for r in rows if not r.get("skipped")]  # afters[k] is edited_rows[k]'s
    summary = _summarise(rows, pretrained, config, plan.preset, base.site, base.accuracy,
                         base.mmlu, base.rings)  # fmt: skip
    summary.ability_before = base.ability
    summary.scoring = plan.task.scoring  # what "auto" resolved to
    summary.phrasing, summary.facts = plan.phrasing, plan.facts
    summary.known, summary.queries = len(plan.scorer.known), len(plan.task.queries)
    summary.corpus = getattr(plan.corpus, "name", None)
    if tracing is not None:
        summary.tracing = TraceSummary(
            tracing["best_mlp_layer"], tracing["clean"], tracing["corrupted"], tracing["n_prompts"]
        )
    write_json_atomic(out / "summary.json", summary.to_dict())
    _figures(out, plan.task, base.before[base.site], edited_rows, afters, summary, pretrained.name)
    _report(out, summary)
    return summary


def _edit_all(
    out: Path,
    pretrained: Any,
    plan: _MonthsPlan,
    base: _Baseline,
    config: MonthsConfig,
    text_task: Any,
    mmlu_items: Any,
    progress: bool,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Every edit of the replication, each on the unedited model: the rows (those already in
    ``rows.jsonl`` read back, the rest computed and appended) and the representations after
    each edit that took (``afters[k]`` belongs to the k-th row that is not skipped)."""
    rows_path, reps_dir = out / "rows.jsonl", out / "reps"
    reps_dir.mkdir(exist_ok=True)
    remove_stale_temporaries(reps_dir)
    done = {_months_key(r): r for r in read_rows(rows_path, _months_key, "months table")}
    rows: list[dict[str, Any]] = []
    afters: list[Any] = []  # representations after each edit (small: subjects x d_model)
    fluency_unedited: dict[tuple[str, ...], float | None] = {}
    for distance in config.distances or (None,):
        requests = plan.task.counterfactuals(
            config.n_edits, config.seed + (distance or 0), distance, among=plan.among
        )
        for i, request in enumerate(requests):
            reps_path = reps_dir / f"d{distance}-{i:03d}.safetensors"
            if (distance, i) in done and done[(distance, i)].get("skipped"):
                rows.append(done[(distance, i)])  # a request the model already answered
                continue
            if (distance, i) in done and reps_path.is_file():
                rows.append(done[(distance, i)])
                afters.append(_load_reps(reps_path))
                continue
            subject_prompts = tuple(plan.task.generation_prompts(request))
            if subject_prompts not in fluency_unedited:  # the unedited model's, once per subject
                fluency_unedited[subject_prompts] = _fluency(
                    pretrained.model, pretrained.tokenizer, subject_prompts, config
                )
            row, after = _edit_once(
                pretrained, plan, base, config, text_task, request, distance, i,
                fluency_unedited[subject_prompts], mmlu_items, progress,
            )  # fmt: skip
            if after is not None:
                _save_reps(reps_path, after)  # before the row: a row on disk has its reps
                afters.append(after)
            append_row(rows_path, row)
            rows.append(row)
    return rows, afters


@dataclass
class _MonthsPlan:
    """What a months run settles before any model work beyond scoring the prompts: the task in
    its phrasing, the editor and its configuration, the facts it may edit, the corpus for C.
    Every check that must refuse a run before it claims its folder happens here."""

    task: Any
    method: Any
    preset: str
    edit_config: Any
    phrasing: str
    facts: str
    scorer: Any
    among: Any  # the facts edits are drawn from (None: all)
    corpus: Any

    @classmethod
    def resolve(
        cls,
        pretrained: Any,
        config: MonthsConfig,
        out: Path,
        corpus: Any,
        cache_dir: str | os.PathLike[str] | None,
    ) -> _MonthsPlan:
        from kgshatter.editing import get_method
        from kgshatter.pretrained.facts import FactScorer, natural_task
        from kgshatter.pretrained.text import SampledCorpus
        from kgshatter.sites import Site

        model, tokenizer = pretrained.model, pretrained.tokenizer
        random_weights = bool(getattr(pretrained, "random_weights", False))
        phrasing = config.phrasing
        if phrasing == "auto":
            phrasing = "hop" if config.task == "cities" else phrasing_for(pretrained.name)
        facts = config.facts if config.facts != "auto" else ("all" if random_weights else "known")
        task = natural_task(config.task, tokenizer, config.scoring, phrasing)
        method = get_method(config.method)
        if config.preset is not None:
            preset = resolve_preset(pretrained.name, config.method, config.preset)
        elif random_weights:
            preset = resolve_preset("tiny:", config.method)
        else:
            preset = resolve_preset(pretrained.name, config.method)
        overrides = {"n_samples": config.n_samples} if config.n_samples else {}
        edit_config = method.config(preset, **overrides)
        for layer in getattr(edit_config, "edit_layers", ()):
            Site(layer, "resid_post").check(pretrained.n_layers)
        if config.site is not None:  # before the header: a typo must not pin a folder
            Site.parse(config.site).check(pretrained.n_layers)
        # which facts can be edited, before the header: a prompt set the model gets wrong
        # everywhere, or too few known facts for n_edits, must not pin a folder
        scorer = FactScorer(task, model)
        among = scorer.known if facts == "known" else None
        if among is not None and not among:
            raise ValueError(
                f"the model answers none of the {len(task.queries)} {config.task} prompts "
                f"({phrasing} phrasing) right, so no known fact can be edited; try --phrasing "
                f"{'list' if phrasing == 'hop' else 'hop'}, or --facts all"
            )
        for distance in config.distances or (None,):
            task.counterfactuals(config.n_edits, config.seed + (distance or 0), distance, among)
        if corpus is None:  # C from text the model writes itself (sampled when first needed)
            corpus = SampledCorpus(model, tokenizer, pretrained.model_id, seed=config.seed,
                                   cache_dir=Path(cache_dir or out) / "samples")  # fmt: skip
        return cls(task, method, preset, edit_config, phrasing, facts, scorer, among, corpus)

    def header(self, pretrained: Any, config: MonthsConfig, mmlu_items: int) -> dict[str, Any]:
        """The settings ``months.json`` pins (the site follows from them)."""
        return {
            "format": MONTHS_FORMAT,
            "model": pretrained.name,
            "model_id": pretrained.model_id,
            "config": config.to_dict(),
            "preset": self.preset,
            "phrasing": self.phrasing,
            "facts": self.facts,
            "corpus": getattr(self.corpus, "fingerprint", None),
            "mmlu_items": mmlu_items,
        }

    @property
    def cyclic(self) -> bool:
        from kgshatter.pretrained.facts import CyclicTask

        return isinstance(self.task, CyclicTask)


@dataclass
class _Baseline:
    """The unedited model: representations at every layer (and the site), the ring per layer,
    the site edits are measured at, accuracy, and the ability checks."""

    before: Any
    rings: dict[str, dict[str, float]]
    site: Any
    accuracy: float
    ability: dict[str, float] | None
    mmlu: MMLUScore | None

    @classmethod
    def measure(
        cls,
        pretrained: Any,
        plan: _MonthsPlan,
        config: MonthsConfig,
        mmlu_items: Any,
        progress: bool,
    ) -> _Baseline:
        from kgshatter.sites import Site

        model, tokenizer, task = pretrained.model, pretrained.tokenizer, plan.task
        sites = [Site(layer, "resid_post") for layer in range(pretrained.n_layers)]
        before = task.representations(model, sites)
        rings = {str(s): _ring(before[s], task) for s in sites} if plan.cyclic else {}
        if config.site is not None:
            site = Site.parse(config.site).check(pretrained.n_layers)
            if site not in before:
                before.update(task.representations(model, [site]))
        else:
            # representations below the edited layer cannot change: choose among the layers
            # from the (last) edited one up, the clearest ring there (cyclic) or the last layer
            top_edited = max(getattr(plan.edit_config, "edit_layers", (0,)))
            above = [s for s in sites if s.layer is not None and s.layer >= top_edited]
            site = above[-1]
            if plan.cyclic:
                site = max(above, key=lambda s: np.nan_to_num(rings[str(s)]["isomap"], nan=-1.0))
        ability = _ability(model, tokenizer) if config.ability else None
        mmlu = _mmlu(model, tokenizer, mmlu_items, config, progress) if mmlu_items else None
        return cls(before, rings, site, plan.scorer.baseline, ability, mmlu)


def _edit_once(
    pretrained: Any,
    plan: _MonthsPlan,
    base: _Baseline,
    config: MonthsConfig,
    text_task: Any,
    request: Any,
    distance: int | None,
    i: int,
    fluency_before: float | None,
    mmlu_items: Any,
    progress: bool,
) -> tuple[dict[str, Any], Any]:
    """Edit one request (hooks only; the model is unchanged afterwards) and measure it: its
    row, and the representations at the site after the edit (``None`` when the model already
    gave the target, so nothing was edited)."""
    from kgshatter.analysis.shattering import shattering
    from kgshatter.editing.protocols import run_protocol

    model, tokenizer, task, site = pretrained.model, pretrained.tokenizer, plan.task, base.site
    prompts = tuple(task.generation_prompts(request))
    seen: dict[str, Any] = {}

    def measure(edited_model: Any) -> dict[str, Any]:
        # with the edit applied: representations, fluency, MMLU-Redux
        seen["after"] = task.representations(edited_model, [site])[site]
        got: dict[str, Any] = {"R": shattering(base.before[site], seen["after"])}
        if fluency_before is not None:
            got["fluency"] = _fluency(edited_model, tokenizer, prompts, config)
        if plan.cyclic:
            got["ring_after"] = _ring(seen["after"], task)
        if config.ability:
            got.update(_ability(edited_model, tokenizer))
        if mmlu_items and i % config.mmlu_every == 0:
            got["mmlu"] = asdict(_mmlu(edited_model, tokenizer, mmlu_items, config, progress))
        return got

    (record,) = run_protocol(
        model, text_task, plan.method, plan.edit_config, [request], "single", plan.scorer,
        model_id=pretrained.model_id, measure=measure,
    ).records  # fmt: skip
    row: dict[str, Any] = {"distance": distance, "index": i, "request": request.to_dict()}
    if not record.scored:  # the model already gives the target: nothing to edit
        row.update(skipped=record.skipped, seconds=record.seconds)
        log.info("d=%s edit %d: skipped (%s)", distance, i, record.skipped)
        return row, None
    (efficacy,) = record.efficacy_detail
    measured = dict(record.measures or {})
    near = record.neighbourhood or {}
    row.update(
        success=bool(efficacy.success),
        target_prob=efficacy.target_prob,
        accuracy=(record.accuracy or {})["direct"]["all"],
        accuracy_before=base.accuracy,
        R=measured.pop("R"),
        seconds=record.seconds,
        paraphrase=efficacy.prompt_fraction,
        neighbourhood=near["accuracy"],
        neighbourhood_before=near["before"],
    )
    if fluency_before is not None:
        row["fluency_before"] = fluency_before
    row.update(measured)
    row["accuracy_change"] = row["accuracy"] - base.accuracy
    log.info("d=%s edit %d: success %s, R %.4f", distance, i, row["success"], row["R"])
    return row, seen["after"]


def _trace(out: Path, model: TransformerBridge, tokenizer: Any, task: Any, known: Sequence[Any],
           config: MonthsConfig, model_id: str,
           cache_dir: str | os.PathLike[str] | None) -> dict[str, Any] | None:  # fmt: skip
    """Causal tracing of up to ``config.trace_prompts`` facts the model answers right, asked in
    the edited prompts (``tracing.json`` and ``tracing.png``). A finished trace is reused: the
    run's own, or one in ``cache_dir`` of the same model, prompts and seed (another method's
    run shares it)."""
    import hashlib
    import json
    import shutil

    from kgshatter.io import read_json, write_json_atomic
    from kgshatter.plotting import save_figure
    from kgshatter.pretrained.tracing import TracePrompt, causal_trace, trace_figure

    if not config.trace_prompts:
        return None
    path = out / "tracing.json"
    if path.is_file():
        return read_json(path, "causal trace", expect=dict)
    edited = getattr(task, "edit_prompts", None)
    pool = [q for q in known if edited is None or q.prompt in edited] or list(known)
    g = np.random.default_rng(config.seed)
    picks = [pool[i] for i in sorted(g.permutation(len(pool))[: config.trace_prompts])]
    prompts = [TracePrompt(q.prompt, q.subject, q.answer) for q in picks]
    key = json.dumps([model_id, [(p.prompt, p.subject, p.answer) for p in prompts], config.seed])
    cached = None
    if cache_dir is not None:
        cached = Path(cache_dir) / f"trace-{hashlib.sha256(key.encode()).hexdigest()[:20]}"
        if (cached / "tracing.json").is_file() and (cached / "tracing.png").is_file():
            shutil.copyfile(cached / "tracing.png", out / "tracing.png")
            data = read_json(cached / "tracing.json", "causal trace", expect=dict)
            write_json_atomic(path, data)
            return data
    result = causal_trace(model, tokenizer, prompts, seed=config.seed)
    data = {**result.to_dict(), "prompts": [p.prompt.format(p.subject) for p in prompts]}
    save_figure(trace_figure(result, f"{task.name}"), out / "tracing.png")
    write_json_atomic(path, data)
    if cached is not None:
        cached.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "tracing.png", cached / "tracing.png")
        write_json_atomic(cached / "tracing.json", data)  # last: a complete entry
    log.info("causal trace: best MLP layer %s", data["best_mlp_layer"])
    return data


def _fluency(
    model: TransformerBridge, tokenizer: Any, prompts: Sequence[str], config: MonthsConfig
) -> float | None:
    if not config.fluency_tokens:
        return None
    from kgshatter.pretrained.fluency import generation_fluency

    return generation_fluency(model, tokenizer, prompts, config.fluency_tokens)


def _distance_line(d: str, e: MonthsDistance) -> str:
    """One distance's row of the report's table."""

    def pct(x: float | None, fmt: str = ".0f") -> str:
        return "-" if x is None else f"{100 * x:{fmt}}%"

    near = (
        f"{100 * e.neighbourhood:.0f}% ({100 * (e.neighbourhood_change or 0.0):+.0f})"
        if e.neighbourhood is not None and not math.isnan(e.neighbourhood)
        else "-"
    )
    flu = f"{e.fluency:.2f} ({e.fluency_change or 0.0:+.2f})" if e.fluency is not None else "-"
    ppl = f"{e.perplexity:.2f}" if e.perplexity is not None else "-"
    return (
        f"| {d if d != 'None' else 'tree'} | {e.n} | {100 * e.success:.0f}% | "
        f"{pct(e.paraphrase)} | {near} | {flu} | {100 * e.accuracy_change:+.1f} | {e.R:.4f} | "
        f"{ppl} | {pct(e.calendar)} | {pct(e.mmlu, '.1f')} | {e.seconds:.2f} |"
    )


def _months_key(row: dict[str, Any]) -> tuple:
    return (row["distance"], row["index"])


def _save_reps(path: Path, reps: Any) -> None:
    from safetensors.torch import save_file

    from kgshatter.io import write_atomic

    tensor = reps.detach().float().cpu().contiguous()
    write_atomic(path, lambda tmp: save_file({"reps": tensor}, str(tmp)))


def _load_reps(path: Path) -> Any:
    from kgshatter.io import load_safetensors

    tensors, _ = load_safetensors(path, "after-edit representations")
    if "reps" not in tensors:
        raise ValueError(f"after-edit representations at {path} lack 'reps'")
    return tensors["reps"]


def _ring(reps: Any, task: Any) -> dict[str, float]:
    from kgshatter.analysis.geometry import ring_metrics

    m = ring_metrics(reps, task.positions, task.n)
    return {"neighbours": m["neighbours"], "isomap": m["isomap"], "probe_r2": m["probe_r2"]}


def _ability(model: TransformerBridge, tokenizer: Any) -> dict[str, float]:
    from kgshatter.pretrained.ability import perplexity, question_accuracy

    return {"perplexity": perplexity(model, tokenizer),
            "calendar": question_accuracy(model, tokenizer)}  # fmt: skip


def _mmlu(
    model: TransformerBridge, tokenizer: Any, items: Any, config: MonthsConfig, progress: bool
) -> MMLUScore:
    from kgshatter.pretrained.mmlu import evaluate

    result = evaluate(model, tokenizer, items, config.mmlu_max_new_tokens, progress=progress)
    return MMLUScore(result.accuracy, result.no_answer_rate, result.n)


def _mean(values: Sequence[float | int]) -> float:
    """The mean (NaN, without a warning, when every edit of a distance was skipped)."""
    return float(np.mean(values)) if len(values) else math.nan


def _summarise(
    rows: list[dict[str, Any]],
    pretrained: Any,
    config: MonthsConfig,
    preset: str,
    site: Any,
    acc0: float,
    mmlu0: MMLUScore | None,
    rings: dict[str, Any],
) -> MonthsSummary:
    from kgshatter.analysis.shattering import fit_line

    per: dict[str, MonthsDistance] = {}
    for d in config.distances or (None,):
        group = [r for r in rows if r["distance"] == d and not r.get("skipped")]
        entry: dict[str, Any] = {
            "n": len(group),
            "skipped": sum(1 for r in rows if r["distance"] == d and r.get("skipped")),
            "success": _mean([r["success"] for r in group]),
            "accuracy_change": _mean([r["accuracy_change"] for r in group]),
            "R": _mean([r["R"] for r in group]),
            "seconds": float(np.median([r["seconds"] for r in group])) if group else math.nan,
        }
        if group and "paraphrase" in group[0]:
            entry["paraphrase"] = float(np.mean([r["paraphrase"] for r in group]))
            entry["neighbourhood"] = float(np.nanmean([r["neighbourhood"] for r in group]))
            entry["neighbourhood_change"] = float(
                np.nanmean([r["neighbourhood"] - r["neighbourhood_before"] for r in group])
            )
        if group and "fluency" in group[0]:
            entry["fluency"] = float(np.mean([r["fluency"] for r in group]))
            entry["fluency_change"] = float(
                np.mean([r["fluency"] - r["fluency_before"] for r in group])
            )
        if group and "perplexity" in group[0]:
            entry["perplexity"] = float(np.mean([r["perplexity"] for r in group]))
            entry["calendar"] = float(np.mean([r["calendar"] for r in group]))
        scored = [r["mmlu"]["accuracy"] for r in group if "mmlu" in r]
        if scored:
            entry["mmlu"] = float(np.mean(scored))
        if group and "ring_after" in group[0]:
            entry["isomap_after"] = float(np.nanmean([r["ring_after"]["isomap"] for r in group]))
        per[str(d)] = MonthsDistance(**entry)
    edited = [r for r in rows if not r.get("skipped")]
    claims = _claims(edited) if config.distances and len(config.distances) > 1 else {}
    fit = (
        fit_line([r["R"] for r in edited], [r["accuracy_change"] for r in edited])
        if len(edited) > 2
        else None
    )
    return MonthsSummary(
        model=pretrained.name,
        random_weights=pretrained.random_weights,
        family=pretrained.family,
        model_id=pretrained.model_id,
        config=config,
        preset=preset,
        site=str(site),
        accuracy_before=acc0,
        mmlu_before=mmlu0,
        rings_before=rings,
        per_distance=per,
        fit_accuracy_on_R=None if fit is None else Fit(fit.slope, fit.intercept, fit.r2, fit.n),
        claims=claims,
    )


# the paper's claims on a pretrained model: (what it says, the sign it predicts against d, how a
# row holds the quantity)
CLAIMS: dict[str, tuple[str, int, Callable[[dict[str, Any]], Any]]] = {
    "R": ("the ring is disrupted more (R(D*) grows)", 1, lambda r: r.get("R")),
    "isomap_after": ("the ring's Isomap picture degrades more", -1,
                     lambda r: (r.get("ring_after") or {}).get("isomap")),
    "accuracy_change": ("the other facts lose more accuracy", -1,
                        lambda r: r.get("accuracy_change")),
    "perplexity": ("perplexity on ordinary text rises more", 1, lambda r: r.get("perplexity")),
    "calendar": ("calendar questions lose more", -1, lambda r: r.get("calendar")),
}  # fmt: skip


def _claims(rows: list[dict[str, Any]]) -> dict[str, Claim]:
    """Spearman's rank correlation of each claim's quantity with d over the edits, its
    two-sided p-value, and whether the claim holds (the predicted sign, p < 0.05); a quantity
    no edit changed is reported as unchanged."""
    from scipy.stats import spearmanr

    out: dict[str, Claim] = {}
    for key, (text, sign, read) in CLAIMS.items():
        pairs = [(r["distance"], read(r)) for r in rows]
        pairs = [(d, float(v)) for d, v in pairs if isinstance(v, (int, float)) and v == v]
        if len(pairs) < 3 or len({d for d, _ in pairs}) < 2:
            continue
        if len({v for _, v in pairs}) < 2:
            out[key] = Claim(text, len(pairs), False, math.nan, math.nan, unchanged=pairs[0][1])
        else:
            rho, p = spearmanr([d for d, _ in pairs], [v for _, v in pairs])
            holds = bool(rho * sign > 0 and p < 0.05)
            out[key] = Claim(text, len(pairs), holds, float(rho), float(p))
    return out


def _figures(out: Path, task: Any, before: Any, rows: list[dict[str, Any]], afters: list[Any],
             summary: MonthsSummary, model_name: str) -> None:  # fmt: skip
    from kgshatter.plotting import pyplot, ring_figure, save_figure

    site = summary.site
    plt = pyplot()
    per = summary.per_distance
    keys = list(per)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    xs = [k if k != "None" else "tree" for k in keys]
    axes[0].bar(xs, [100 * per[k].accuracy_change for k in keys])
    axes[0].set(title=f"{task.name}: accuracy change (points)", xlabel="edit distance")
    axes[1].bar(xs, [per[k].R for k in keys], color="tab:red")
    axes[1].set(title=f"R(D*) at {site}", xlabel="edit distance")
    mmlu = [m for k in keys if (m := per[k].mmlu) is not None]
    if len(mmlu) == len(keys) and summary.mmlu_before:
        axes[2].plot(["before", *xs], [summary.mmlu_before.accuracy, *mmlu], "o-")
        axes[2].set(title="MMLU-Redux accuracy", xlabel="edit distance")
    else:
        axes[2].axis("off")
        axes[2].text(0.5, 0.5, "MMLU-Redux not run\n(pass --mmlu FILE)", ha="center", va="center")
    fig.tight_layout()
    save_figure(fig, out / "distance.png")
    rings = summary.rings_before
    if rings:
        layers = list(rings)
        fig, ax = plt.subplots(figsize=(7, 3))
        for metric in ("neighbours", "isomap", "probe_r2"):
            ax.plot(range(len(layers)), [rings[k][metric] for k in layers], "o-", ms=3,
                    label=metric)  # fmt: skip
        ax.set(xlabel="layer (resid_post)", title=f"{model_name}: the {task.name} ring per layer")
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, out / "ring_layers.png")
    if task.positions is None or not rows:
        return
    # the ring before and after the median-R edit at the largest distance
    last = [i for i, r in enumerate(rows) if r["distance"] == rows[-1]["distance"]]
    pick = sorted(last, key=lambda i: rows[i]["R"])[len(last) // 2]
    req = rows[pick]["request"]
    label = f"after {req['prompt'].format(req['subject'])} -> {req['target']}"
    fig = ring_figure(
        {"before": (before, task.positions), label: (afters[pick], task.positions)},
        task.n,
        n_neighbors=min(3, task.n - 2),
        title=f"{model_name}: {task.name} at {site} (Isomap)",
    )
    save_figure(fig, out / "rings.png")


def _report(out: Path, summary: MonthsSummary) -> None:
    s = summary
    scored = "its first token" if s.scoring == "first-token" else "its whole tokens"
    lines = [
        f"# {s.config.task} on {s.model} ({s.family})",
        "",
        *(
            [
                "**A tiny random checkpoint, not a trained model: these numbers only show that the "
                "code path runs.**",
                "",
            ]
            if s.random_weights
            else []
        ),
        f"Method {s.config.method} (preset {s.preset}); representations at "
        f"{s.site}; accuracy before {100 * s.accuracy_before:.1f}% "
        f"(the answer ranked first among the candidates, scored on {scored}): "
        f"{s.known} of {s.queries} prompts ({s.phrasing} phrasing) "
        f"answered right before editing; the edits rewrite "
        + ("only facts the model knows." if s.facts == "known" else "any fact."),
        "",
        *([f"Key statistics C from: {s.corpus}.", ""] if s.corpus else []),
        "| distance | edits | success | paraphrase | neighbourhood (change) | fluency (change) "
        "| accuracy change (points) | R(D*) | perplexity | calendar | MMLU-Redux | s/edit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d, e in s.per_distance.items():
        lines.append(_distance_line(d, e))
    if s.ability_before:
        a = s.ability_before
        lines += ["", f"Before editing: perplexity {a['perplexity']:.2f} on the fixed text, "
                  f"calendar questions {100 * a['calendar']:.0f}% right "
                  f"(kgshatter.pretrained.ability; chance 25%)."]  # fmt: skip
    if s.mmlu_before:
        m = s.mmlu_before
        lines += ["", f"MMLU-Redux before: {100 * m.accuracy:.1f}% ({m.n} items, "
                  f"no answer {100 * m.no_answer_rate:.0f}%)."]  # fmt: skip
    if s.claims:
        lines += ["", "The paper's claims on this model, as d grows (Spearman's rank correlation "
                  "with d over the edits; holds: the predicted sign at p < 0.05):", ""]  # fmt: skip
        for c in s.claims.values():
            if c.unchanged is not None:
                lines.append(f"- {c.claim}: not seen (no edit changed it: {c.unchanged:.4g} "
                             f"after each of {c.n} edits)")  # fmt: skip
                continue
            verdict = "holds" if c.holds else "not seen"
            lines.append(f"- {c.claim}: {verdict} (rho {c.rho:+.2f}, p {c.p:.3g}, "
                         f"{c.n} edits)")  # fmt: skip
    fit = s.fit_accuracy_on_R
    if fit and not math.isnan(fit.r2):
        lines += ["", f"Accuracy change on R(D*): slope {fit.slope:.3f}, r² {fit.r2:.2f}."]
    lines += [
        "",
        "The editing papers' metrics (CounterFact): *paraphrase*, the edited fact asked in two "
        "other wordings and answered with the new target; *neighbourhood*, the same question "
        "about the other subjects (for the tree, the subject's siblings) still answered right, "
        "with its change from before the edit in points; *fluency*, the weighted bigram / "
        "trigram entropy (bits) of greedy continuations of three texts about the subject, and "
        "its change.",
        "",
        "![accuracy, R and MMLU by distance](distance.png)",
    ]
    if (out / "rings.png").exists():
        lines += ["", "![rings before and after](rings.png)"]
    rings = s.rings_before
    if rings:
        best = max(rings, key=lambda k: np.nan_to_num(rings[k]["isomap"], nan=-1.0))
        r = rings[best]
        lines += [
            "",
            f"The ring before editing, per layer (each item's two nearest neighbours on the "
            f"ring, Isomap alignment, the ring-position probe's r²): clearest at {best} "
            f"(neighbours {r['neighbours']:.2f}, Isomap {r['isomap']:.2f}, probe "
            f"{r['probe_r2']:.2f}).",
            "",
            "![ring metrics per layer](ring_layers.png)",
        ]
    trace = s.tracing
    if trace:
        lines += [
            "",
            f"Causal tracing ({trace.n_prompts} facts the model knows; answer probability "
            f"clean {trace.clean:.2f}, subject corrupted {trace.corrupted:.2f}): restoring "
            f"the MLP output at the subject's last token matters most at layer "
            f"{trace.best_mlp_layer} (tracing.json).",
            "",
            "![causal tracing](tracing.png)",
        ]
    from kgshatter.io import write_atomic

    text = "\n".join(lines) + "\n"
    write_atomic(out / "report.md", lambda tmp: tmp.write_text(text))
