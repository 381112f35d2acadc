"""The paper's editing experiments as one resumable sweep (arXiv 2410.17194).

For every method x edit kind (corrective; counterfactual at each distance d) x seed, ``n_edits``
requests are sampled from order I (or the ``edit_order`` chosen) and each is edited into the
pristine model (single-edit protocol); as a second protocol, each method edits a sequence of
counterfactual requests one after another, with metrics after every step. Every scoring point
records efficacy, the change in accuracy per task and order, R(D*) per order at every ring
site, and whether each order's ring survived (neighbour agreement, Isomap alignment) at the
representation site.

Rows are appended to ``rows.jsonl`` as they finish (fsynced), so an interrupted sweep resumes
where it stopped without recomputing or duplicating rows; ``table.csv`` and ``summary.json``
are rewritten from the rows at the end. Edits are applied as hooks; the model is never written.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import numbers
import os
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch

from kgshatter.analysis.geometry import one_blas_thread, structure_isomap, structure_neighbours
from kgshatter.analysis.representations import collect_representations
from kgshatter.analysis.shattering import distance_matrix, distance_shattering, fit_line
from kgshatter.analysis.spill import order_moves, relation_keys
from kgshatter.evaluate import RING_COMPONENTS, Evaluator
from kgshatter.io import write_atomic, write_json_atomic
from kgshatter.kg.walks import SPLITS, WalkSampler
from kgshatter.readout import FrozenPrefix, frozen_running
from kgshatter.sites import Site, all_sites, edit_sites
from kgshatter.studies.results import (
    Baseline,
    Fit,
    KindSummary,
    MethodSummary,
    SequenceStep,
    SingleEdit,
    SweepHeader,
    SweepSummary,
    kind_label,
)
from kgshatter.studies.rowlog import append_row, check_or_write_header, read_rows
from kgshatter.validation import ConfigDict, check_choice, check_int

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from kgshatter.editing.protocols import EditRecord
    from kgshatter.editing.requests import EditRequest

log = logging.getLogger(__name__)

SWEEP_FORMAT = "kgshatter.studies.sweep/1"
KIND_CHOICES = ("corrective", "counterfactual")


@dataclass(frozen=True, kw_only=True)
class SweepConfig(ConfigDict):
    """What the sweep runs. Defaults: the ``cpu`` reproduction (sizes are *choices* that fit
    the 30-minute budget on 2 cores; the paper's protocol is the single-edit one).

    ``site``: where representations are read for the ring metrics and the headline R.
    ``"auto"`` (default, *choice*): the ``mlp_post`` / ``resid_post`` site where the unedited
    model's rings are clearest (mean neighbour agreement over orders; ties go to the later
    layer), because shattering is only visible where a ring exists: in the ``cpu`` model that is
    ``1.mlp_post`` (neighbours 0.99) while the last residual stream, the paper's default
    (``"1.resid_post"`` here), draws no ring (Isomap alignment 0.2-0.35).
    R is recorded at every ``mlp_post`` / ``resid_post`` site in any case.

    ``position``: the token of the query ``x o_C1`` whose hidden state represents entity x:
    ``"relation"`` (default, our choice) or ``"entity"`` (x's own token, where a model that
    processes the subject at its position, like ``cpu-subject``, keeps its rings).

    ``edit_order``: the order whose facts are edited (0: order I, the paper's). The orders are
    symmetric in the graph but not in a trained model, which may share one pair's keys and
    keep another's apart (docs/paper-scale/README.md); summaries list the edited order first.
    """

    methods: tuple[str, ...] = ("rome", "memit", "alphaedit", "pmet", "ft")
    kinds: tuple[str, ...] = KIND_CHOICES
    distances: tuple[int, ...] = (1, 2, 3, 4)
    n_edits: int = 12
    seeds: tuple[int, ...] = (0,)
    sequential_edits: int = 12
    site: str = "auto"
    max_queries: int | None = 300
    n_samples: int = 100_000
    efficacy_prompts: int = 10
    editor_preset: str = "synthetic"
    position: str = "relation"
    edit_order: int = 0

    def __post_init__(self) -> None:
        from kgshatter.editing import get_method

        if not self.methods:
            raise ValueError("methods must name at least one editing method")
        for m in self.methods:
            get_method(m).config(self.editor_preset)  # unknown preset names list the valid ones
        for k in self.kinds:
            check_choice("kinds", k, KIND_CHOICES)
        for d in self.distances:
            check_int("distances", d, 1)
        check_int("n_edits", self.n_edits, 1)
        for s in self.seeds:
            check_int("seeds", s, 0)
        check_int("sequential_edits", self.sequential_edits, 0)
        if self.max_queries is not None:
            check_int("max_queries", self.max_queries, 1)
        check_int("n_samples", self.n_samples, 1)
        check_int("efficacy_prompts", self.efficacy_prompts, 1)
        check_choice("position", self.position, ("relation", "entity"))
        check_int("edit_order", self.edit_order, 0)

    def representation_site(self, n_layers: int) -> Site | None:
        """The configured site (checked against the model), or ``None`` for ``"auto"``."""
        if self.site == "auto":
            return None
        return Site.parse(self.site).check(n_layers)


class SweepFields(TypedDict, total=False):
    """Some of :class:`SweepConfig`'s fields, by name: what a model preset's sweep changes
    from the defaults (:func:`sweep_defaults`), and what the command line adds."""

    methods: tuple[str, ...]
    kinds: tuple[str, ...]
    distances: tuple[int, ...]
    n_edits: int
    seeds: tuple[int, ...]
    sequential_edits: int
    site: str
    max_queries: int | None
    n_samples: int
    efficacy_prompts: int
    editor_preset: str
    position: str
    edit_order: int


# the editor preset and representation position each model preset is edited with by default:
# models that process the subject at its own token are edited there (README, "The fidelity
# study"); the others at the relation token
PRESET_EDITORS = {
    "cpu-subject": "synthetic-subject",
    "compressed": "synthetic-subject-relative",
    "paper": "synthetic-relative",
    "paper-wide": "synthetic-relative",
}
# what else a model preset's sweep does by default: at 2,048 entities ROME and MEMIT (each
# meets 7 of the 9 fidelity targets on the paper model, docs/paper-scale/README.md; the width
# control gets the same sweep to compare), 16 single edits per distance and no sequence, which
# keeps the job from the shipped checkpoint within about a quarter of an hour on 2 cores
PRESET_SWEEPS: dict[str, SweepFields] = {
    name: {"methods": ("memit", "rome"), "n_edits": 16, "sequential_edits": 0}
    for name in ("paper", "paper-wide")
}


def representation_position(key_position: str | None) -> str:
    """The sweep's representation position for an editor's key position.

    >>> representation_position("subject"), representation_position("relation")
    ('entity', 'relation')
    """
    return "entity" if key_position == "subject" else "relation"


def editor_defaults(preset: str) -> SweepFields:
    """``SweepConfig`` fields ``editor_preset`` and ``position`` for a model preset: entities
    are represented at the token where the preset's ROME editor reads its keys.

    >>> editor_defaults("compressed")
    {'editor_preset': 'synthetic-subject-relative', 'position': 'entity'}
    >>> editor_defaults("cpu")
    {'editor_preset': 'synthetic', 'position': 'relation'}
    """
    from kgshatter.editing import get_method

    editor = PRESET_EDITORS.get(preset, "synthetic")
    position = representation_position(get_method("rome").config(editor).position)
    return {"editor_preset": editor, "position": position}


def sweep_defaults(preset: str) -> SweepFields:
    """The ``SweepConfig`` fields a model preset's sweep starts from (``kgshatter reproduce``
    without options): :func:`editor_defaults` and the preset's own methods and sizes.

    >>> sweep_defaults("paper")["methods"], sweep_defaults("cpu").get("methods")
    (('memit', 'rome'), None)
    """
    fields = editor_defaults(preset)
    fields.update(PRESET_SWEEPS.get(preset, {}))
    return fields


def default_edit_batch(model: TransformerBridge) -> int:
    """12 for the study's small models (d_model <= 64), 1 otherwise: grouping pays where one
    request's forward passes are too small to keep the CPU busy. Measured on 2 cores with the
    forward-pass shortcuts (``kgshatter edit-benchmark RUN --sweep``, ROME, 48 edits): the
    ``compressed`` model (d_model 24) sweeps 2.3-2.5x faster in groups of 12, the ``cpu``
    model (d_model 64) 1.23-1.34x; on ``cpu`` in groups of 6, MEMIT 1.04x, AlphaEdit 1.20x,
    PMET 1.07x, constrained fine-tuning 0.97x (docs/speed.md). Wider models are unmeasured.
    """
    return 12 if model.cfg.d_model <= 64 else 1


# fields added after SWEEP_FORMAT 1 with their defaults: pinned only when set otherwise, so a
# sweep folder written before they existed resumes
_LATER_FIELDS = {"edit_order": 0}


def _pinned(config: SweepConfig) -> dict[str, Any]:
    """The settings ``sweep.json`` pins (:data:`_LATER_FIELDS` left out at their defaults)."""
    return {k: v for k, v in config.to_dict().items() if _LATER_FIELDS.get(k, object()) != v}


def check_distances(distances: tuple[int, ...], kg: Any, order: int = 0) -> None:
    """The edited ``order`` must exist and counterfactual distances fit it, in the graph
    configured by ``kg`` (a :class:`~kgshatter.kg.KGConfig`): 1 .. N // 2 on a ring,
    1 .. w // 2 + h // 2 on a torus, 1 .. w + h - 2 on a grid, on a tree 1 .. the farthest a
    site lies from an inner one (an edit moves a parent)."""
    if not 0 <= order < kg.n_orders:
        raise ValueError(
            f"edit_order must be in 0..{kg.n_orders - 1} (the graph's {kg.n_orders} orders), "
            f"got {order}"
        )
    top = kg.max_edit_distance(order)
    bad = [d for d in distances if d > top]
    if bad:
        where = {"ring": "ring", "tree": f"{kg.branching}-ary tree"}.get(
            kg.shape(order), f"{kg.width}x{kg.height} {kg.shape(order)}"
        )
        raise ValueError(f"distances {bad} lie outside the {where}: d must be in 1..{top}")


def check_edit_layers(config: SweepConfig, n_layers: int) -> None:
    """Every method's editor preset must edit blocks the model has (checked before training:
    ``synthetic-relative-block1`` on a one-block model is refused in one line)."""
    from kgshatter.editing import get_method

    for m in config.methods:
        for layer in getattr(get_method(m).config(config.editor_preset), "edit_layers", ()):
            if not 0 <= layer < n_layers:
                raise ValueError(
                    f"{m} with editor preset {config.editor_preset!r} edits block {layer}, but "
                    f"the model has blocks 0..{n_layers - 1}; choose an editor preset for "
                    f"its blocks, or a model with more layers"
                )


# one row of the tidy table (``table.csv``, ``rows.jsonl``): column name -> JSON scalar
TableRow = dict[str, str | int | float | None]
# a row's identity: method, protocol, kind, sweep distance, seed, index in its job
RowKey = tuple[str, str, str, int, int, int]


@dataclass
class SweepResult:
    out_dir: Path
    rows: list[TableRow]  # the tidy table's rows (table.csv)
    summary: SweepSummary


@dataclass(frozen=True)
class SweepJob:
    """One method's requests of one kind, distance and seed, edited singly, or one sequence.

    ``distance`` is -1 for a sequence (its requests cycle through the distances) and 0 for
    corrective edits."""

    method: str
    protocol: str  # "single" or "sequential"
    kind: str
    distance: int
    seed: int
    requests: tuple[EditRequest, ...]

    def key(self, index: int) -> RowKey:
        """The key of the row the job writes for its ``index``-th request (or step)."""
        return (self.method, self.protocol, self.kind, self.distance, self.seed, index)

    @property
    def keys(self) -> list[RowKey]:
        return [self.key(i) for i in range(len(self.requests))]


@dataclass(frozen=True)
class SweepUnit:
    """A unit of work, what one process (or Ray worker) runs at a time: a group of a single
    job's requests, edited together and scored where ``todo`` (their indices in the job), or
    a whole sequence (``group`` None; ``todo`` the steps still to score)."""

    job: SweepJob
    group: tuple[int, ...] | None
    todo: tuple[int, ...]


def run_sweep(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: SweepConfig | None = None,
    progress: bool = True,
    device: str | None = None,
    edit_batch: int | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
) -> SweepResult:
    """Run (or resume) the sweep on the trained run in ``run_dir``; results in ``out_dir``.

    ``edit_batch``: single edits are computed in fixed groups of this many requests of a job,
    their target optimisations sharing forward passes (1: one at a time; ``None``:
    :func:`default_edit_batch`). Each edit equals the one computed alone up to float rounding,
    and a group is always computed whole, so a resumed sweep gives the rows an uninterrupted
    one gives.

    ``workers`` / ``ray_address``: spread the units of work (a group of single edits, or a
    sequence) over Ray actors, each loading the model and statistics once
    (:mod:`kgshatter.studies.distributed`; ``pip install 'kgshatter[ray]'``): ``workers=N`` starts a
    local cluster of N, ``ray_address`` joins an existing one. This process stays the only
    writer of ``rows.jsonl``, so resume and de-duplication are as without workers. A unit that
    raises gives rows whose ``skipped`` field holds the error, and the sweep goes on.
    """
    if edit_batch is not None:
        check_int("edit_batch", edit_batch, 1)
    if workers is not None:
        check_int("workers", workers, 1)
    config = config or SweepConfig()
    ctx = SweepContext(run_dir, config, device=device, edit_batch=edit_batch)
    out = Path(out_dir)
    header = SweepHeader(
        format=SWEEP_FORMAT,
        run_dir=str(run_dir),
        graph_fingerprint=ctx.graph.fingerprint,
        model_id=ctx.model_id,
        step=ctx.state.get("step"),
        sweep=_pinned(config),
    )
    check_or_write_header(
        out, "sweep.json", header.to_dict(), ("format", "graph_fingerprint", "model_id", "sweep"),
        "sweep",
    )  # fmt: skip
    rows_path = out / "rows.jsonl"
    rows = read_rows(rows_path, _row_key, "sweep table")
    done = {_row_key(r) for r in rows}
    jobs = ctx.jobs()
    units = _units(jobs, done, ctx.edit_batch)
    todo = sum(len(u.todo) for u in units)
    log.info(
        "sweep: %d edits to run%s; rows go to %s as they finish", todo,
        f" ({len(done)} already done)" if done else "", rows_path,
    )  # fmt: skip
    from tqdm.auto import tqdm

    with tqdm(total=todo, desc="sweep", disable=not progress) as bar:

        def finished(unit: SweepUnit, new_rows: list[TableRow] | BaseException) -> None:
            if isinstance(new_rows, BaseException):
                log.warning("a %s job failed: %s", unit.job.method, _error_text(new_rows))
                new_rows = ctx.error_rows(unit, new_rows)
            for row in new_rows:
                append_row(rows_path, row)
                rows.append(row)
            bar.update(len(new_rows))

        _run_units(ctx, units, finished, (str(run_dir), config, device), workers, ray_address)
    order = {k: i for i, k in enumerate(k for job in jobs for k in job.keys)}
    rows.sort(key=lambda r: order.get(_row_key(r), len(order)))  # job order, however run
    write_table(rows, out / "table.csv")
    summary = summarise(rows, ctx.edited_first, config)
    summary.baseline = Baseline(ctx.scorer.baseline, ctx.baseline_rings)
    summary.site = str(ctx.site)
    summary.position = config.position
    summary.run = header
    write_json_atomic(out / "summary.json", summary.to_dict())
    return SweepResult(out, rows, summary)


def _run_units(
    ctx: SweepContext,
    units: list[SweepUnit],
    finished: Callable[[SweepUnit, list[TableRow] | BaseException], None],
    context_args: tuple[str, SweepConfig, str | None],
    workers: int | None,
    ray_address: str | None,
) -> None:
    """Run ``units`` here, one after another, or on Ray workers (each building its own
    context from ``context_args`` and the edit batch); ``finished`` gets each unit's rows, or
    the error it raised, as it completes."""
    if workers is None and ray_address is None:
        for unit in units:
            try:
                result: list[TableRow] | BaseException = ctx.run_unit(unit)
            except Exception as err:  # recorded in the unit's rows; the sweep goes on
                result = err
            finished(unit, result)
        return
    from kgshatter.studies.distributed import run_units

    run_units(
        units, sweep_context, (*context_args, ctx.edit_batch), finished,
        methods=list(ctx.config.methods), workers=workers, address=ray_address,
    )  # fmt: skip


def _error_text(error: BaseException) -> str:
    """One line for a failed unit (a Ray task error carries the worker's own exception)."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        error = cause
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _units(jobs: list[SweepJob], done: set[RowKey], edit_batch: int) -> list[SweepUnit]:
    """The sweep's units of work still to do, in job order: a group of ``edit_batch`` single
    edits of a job (always computed whole, scored where not yet done), or a whole sequence."""
    units = []
    for job in jobs:
        pending = [i for i, k in enumerate(job.keys) if k not in done]
        if not pending:
            continue
        if job.protocol != "single":  # all-or-nothing: later steps need the earlier edits
            units.append(SweepUnit(job, None, tuple(pending)))
            continue
        n = len(job.requests)
        for lo in range(0, n, edit_batch):
            group = tuple(range(lo, min(lo + edit_batch, n)))
            todo_here = tuple(i for i in group if i in pending)
            if todo_here:
                units.append(SweepUnit(job, group, todo_here))
    return units


def sweep_context(
    run_dir: str, config: SweepConfig, device: str | None, edit_batch: int
) -> SweepContext:
    """A :class:`SweepContext` from picklable arguments (how each Ray worker builds its own)."""
    return SweepContext(run_dir, config, device, edit_batch)


class SweepContext:
    """What one process needs to run units of a sweep: the trained model, its task and
    scorer, the unedited representations and the measures. The driver builds one; each Ray
    worker builds its own from the same arguments (:mod:`kgshatter.studies.distributed`)."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        config: SweepConfig,
        device: str | None = None,
        edit_batch: int | None = None,
    ) -> None:
        from kgshatter.editing import CovarianceCache, SyntheticTask, get_method, model_identity
        from kgshatter.editing.protocols import EditScorer
        from kgshatter.training import load_run

        self.config = config
        self.run, self.graph, self.model, self.state = load_run(run_dir, device=device)
        model, graph = self.model, self.graph
        self.edit_batch = edit_batch or default_edit_batch(model)
        n_layers = model.cfg.n_layers
        chosen = config.representation_site(n_layers)
        check_distances(config.distances, graph.config, config.edit_order)
        check_edit_layers(config, n_layers)
        methods = [get_method(m) for m in config.methods]
        self.model_id = model_identity(model)
        self.sampler = WalkSampler(graph, self.run.walks)
        self.task = SyntheticTask(self.sampler, CovarianceCache(Path(run_dir) / "cache"))
        evaluator = Evaluator.for_run(self.run, graph, max_queries=config.max_queries)
        # every edit is scored on the same queries, and nothing below the lowest edited MLP
        # changes: those passes start from the unedited residual after its block's attention
        edit_layers = [
            getattr(m.config(config.editor_preset), "edit_layers", (0,)) for m in methods
        ]
        lowest = min(min(layers) for layers in edit_layers)
        self.frozen = evaluator.frozen = FrozenPrefix.plan(model, lowest)
        self.scorer = EditScorer(model, evaluator, n_prompts=config.efficacy_prompts)
        sites = [s for s in all_sites(n_layers, RING_COMPONENTS) if s.component != "embed"]
        if chosen is not None and chosen not in sites:
            sites.append(chosen)
        self.sites = sites
        self.orders = [graph.order_name(o) for o in range(graph.n_orders)]
        edited = self.orders[config.edit_order]
        self.edited_first = [edited] + [o for o in self.orders if o != edited]
        self.tokens = {o: evaluator.ring_tokens(o) for o in range(graph.n_orders)}
        log.info(
            "measuring the unedited model: accuracy and representations at %d sites", len(sites)
        )
        self.base = base = self.representations(model)
        # a site where every entity has the same representation (e.g. one that cannot see the
        # subject) has no geometry: R is undefined there and recorded as NaN
        self.flat = {(o, s) for o in base for s in sites if float(base[o][s].std(0).max()) < 1e-12}
        # D0 of R(D*), once for every edit
        self.base_distances = {
            (o, s): distance_matrix(base[o][s])
            for o in base
            for s in sites
            if (o, s) not in self.flat
        }
        live = [s for s in sites if not any((o, s) in self.flat for o in base)]
        if chosen is not None and chosen not in live:
            raise ValueError(f"every entity has the same representation at {chosen}; pick a "
                             f"site among {[str(s) for s in live]}")  # fmt: skip
        if not live:
            raise ValueError("the model's entity representations coincide at every site")
        # a site the edits cannot reach shows R = 0 whatever the edit did: "auto" never picks one
        reachable = reachable_sites(live, lowest)
        self.site = chosen or best_ring_site(base, graph, reachable or live)
        self.baseline_rings = {
            name: {
                "neighbours": structure_neighbours(base[o][self.site], graph, o),
                "isomap": structure_isomap(base[o][self.site], graph, o),
            }
            for o, name in enumerate(self.orders)
        }
        self._relation_keys: dict[tuple[Site, str], torch.Tensor] = {}

    def representations(self, m: Any) -> dict[int, dict[Site, torch.Tensor]]:
        with frozen_running(self.frozen, m):
            return {
                o: collect_representations(m, self.tokens[o], self.sites, self.config.position)
                for o in self.tokens
            }

    def measure(self, m: Any) -> dict[str, float]:
        """R(D*) per order and site, and the ring's neighbours and Isomap at the chosen site."""
        after = self.representations(m)
        with one_blas_thread():  # small matrices, next to torch's threads
            return self._measure(after)

    def _measure(self, after: dict[int, dict[Site, torch.Tensor]]) -> dict[str, float]:
        graph, site = self.graph, self.site
        out_m: dict[str, float] = {}
        for o, name in enumerate(self.orders):
            for s in self.sites:
                if (o, s) in self.flat:
                    out_m[f"R.{name}@{s}"] = math.nan
                else:
                    d1 = distance_matrix(after[o][s])
                    out_m[f"R.{name}@{s}"] = distance_shattering(self.base_distances[o, s], d1)
            out_m[f"R.{name}"] = out_m[f"R.{name}@{site}"]
            out_m[f"neighbours.{name}"] = structure_neighbours(after[o][site], graph, o)
            out_m[f"isomap.{name}"] = structure_isomap(after[o][site], graph, o)
        out_m["R.mean"] = statistics.fmean(out_m[f"R.{name}"] for name in self.orders)
        return out_m

    def measure_edit(self, edit: Any) -> dict[str, float]:
        """What the compression hypothesis predicts (docs/fidelity.md): how far the
        edit moves the edited entity's MLP output (``shift.edited``; for ROME ||v* - W k*||),
        how much of that lands on every other entity whose key overlaps (``spill``), and on
        every query of each order's relations (``spill.ORDER``, :func:`order_moves`)."""
        delta, req = edit.deltas[0], edit.requests[0]
        pos = representation_position(edit.config.get("position"))
        key_site = edit_sites(edit.module, delta.layer)[0]
        memo = (key_site, pos)
        if memo not in self._relation_keys:
            self._relation_keys[memo] = relation_keys(
                self.model, self.sampler, delta.layer, pos, site=key_site
            )
        x, r = int(req["subject"]), int(req["relation"])
        keys = self._relation_keys[memo]  # [relation, entity, d_key]
        shift = (keys[r].double() @ delta.dense.double()).norm(dim=1)  # [entity]
        others = torch.cat([shift[:x], shift[x + 1 :]])
        edited_shift = float(shift[x])
        by_order = order_moves(keys, self.graph, x, r, delta.dense)
        return {
            "shift.edited": edited_shift,
            "shift.others": float(others.mean()),
            "spill": float(others.mean()) / edited_shift if edited_shift > 0 else math.nan,
            **{f"spill.{o}": v for o, v in by_order.items()},
            "delta_norm": float(edit.info.get("delta_norm", math.nan)),
        }

    def jobs(self) -> list[SweepJob]:
        from kgshatter.editing.protocols import sample_requests

        return list(_jobs(self.config, self.graph, self.model, self.sampler, sample_requests))

    def run_unit(self, unit: SweepUnit) -> list[TableRow]:
        """The rows of one unit of work (see :func:`_units`)."""
        from kgshatter.editing import get_method
        from kgshatter.editing.protocols import run_protocol

        job = unit.job
        method = get_method(job.method)
        method_config = method.config_with_samples(self.config.editor_preset, self.config.n_samples)
        if unit.group is not None:
            group, todo = unit.group, unit.todo
            lo = group[0]
            res = run_protocol(
                self.model, self.task, method, method_config, [job.requests[i] for i in group],
                "single", self.scorer, model_id=self.model_id, measure=self.measure,
                measure_edit=self.measure_edit, only=[i - lo for i in todo],
            )  # fmt: skip
            return [
                _flatten(record, job, index=i, step=0)
                for i, record in zip(todo, res.records, strict=True)
            ]
        res = run_protocol(
            self.model, self.task, method, method_config, list(job.requests), "sequential",
            self.scorer, model_id=self.model_id, measure=self.measure,
        )  # fmt: skip
        todo_steps = set(unit.todo)  # a sequence cut short: keep the rows already written
        return [
            _flatten(record, job, index=i, step=i)
            for i, record in enumerate(res.records)
            if i in todo_steps
        ]

    def error_rows(self, unit: SweepUnit, error: BaseException) -> list[TableRow]:
        """Rows for a unit that raised: the requests, and the error in ``skipped``."""
        from kgshatter.editing.protocols import EditRecord, describe_requests

        job = unit.job
        rows = []
        for i in unit.todo:
            step = 0 if unit.group else i
            record = EditRecord(
                protocol=job.protocol,
                method=job.method,
                config={},
                step=step,
                requests=describe_requests(self.graph, [job.requests[i]]),
                seconds=0.0,
                skipped=f"error: {_error_text(error)}",
            )
            rows.append(_flatten(record, job, index=i, step=step))
        return rows


def reachable_sites(sites: list[Site], lowest: int) -> list[Site]:
    """The sites an edit of block ``lowest``'s ``W_out`` (or of later blocks) can change: not
    the MLP keys up to that block (``W_out`` reads them), nor the residual streams of earlier
    blocks.

    >>> [str(s) for s in reachable_sites(
    ...     [Site(0, "mlp_post"), Site(0, "resid_post"), Site(1, "mlp_post"),
    ...      Site(1, "resid_post")], lowest=1)]
    ['1.resid_post']
    >>> [str(s) for s in reachable_sites([Site(0, "mlp_post"), Site(0, "resid_post")], 0)]
    ['0.resid_post']
    """
    return [
        s
        for s in sites
        if s.layer is None
        or not (
            (s.component == "mlp_post" and s.layer <= lowest)
            or (s.component == "resid_post" and s.layer < lowest)
        )
    ]


def best_ring_site(base: dict[int, dict[Site, torch.Tensor]], graph: Any, sites: list[Site]):
    """The site with the highest mean neighbour agreement over orders (later layer on ties)."""
    scores = {
        s: statistics.fmean(structure_neighbours(base[o][s], graph, o) for o in base) for s in sites
    }
    return max(reversed(sites), key=lambda s: scores[s])


def _jobs(config, graph, model, sampler, sample_requests) -> Iterator[SweepJob]:
    """Every unit of work with the row keys it will produce (requests sampled with seeds)."""
    for method in config.methods:
        for seed in config.seeds:
            for kind in config.kinds:
                distances = config.distances if kind == "counterfactual" else (0,)
                for d in distances:
                    if kind == "counterfactual":
                        reqs = sample_requests(
                            graph, kind, config.n_edits, seed * 1000 + d, distance=d,
                            order=config.edit_order,
                        )  # fmt: skip
                    else:
                        reqs = sample_requests(
                            graph, kind, config.n_edits, seed, model=model, sampler=sampler,
                            order=config.edit_order,
                        )  # fmt: skip
                    yield SweepJob(method, "single", kind, d, seed, tuple(reqs))
            if config.sequential_edits:
                # a sequence cycling through the distances (choice), one per method and seed
                reqs = []
                per = math.ceil(config.sequential_edits / len(config.distances))
                pools = {
                    d: sample_requests(
                        graph,
                        "counterfactual",
                        per,
                        seed * 1000 + 500 + d,
                        distance=d,
                        order=config.edit_order,
                    )  # fmt: skip
                    for d in config.distances
                }
                seen = set()
                for i in range(config.sequential_edits):
                    d = config.distances[i % len(config.distances)]
                    for r in pools[d]:
                        if (r.subject, r.relation) not in seen:
                            seen.add((r.subject, r.relation))
                            pools[d] = [q for q in pools[d] if q is not r]
                            reqs.append(r)
                            break
                yield SweepJob(method, "sequential", "counterfactual", -1, seed, tuple(reqs))


def _row_key(row: TableRow) -> RowKey:
    return (_text(row, "method"), _text(row, "protocol"), _text(row, "kind"),
            _int(row, "sweep_distance"), _int(row, "seed"), _int(row, "index"))  # fmt: skip


def _text(row: TableRow, column: str) -> str:
    value = row[column]
    if not isinstance(value, str):
        raise TypeError(f"column {column!r} holds {value!r}, not text")
    return value


def _int(row: TableRow, column: str) -> int:
    value = row[column]
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"column {column!r} holds {value!r}, not an integer")
    return int(value)


def _num(row: TableRow, column: str) -> float:
    """A numeric column (NaN where the row stores none)."""
    value = row.get(column)
    if value is None:
        return math.nan
    if isinstance(value, str):
        raise TypeError(f"column {column!r} holds {value!r}, not a number")
    return float(value)


def _flatten(record: EditRecord, job: SweepJob, index: int, step: int) -> TableRow:
    (req,) = record.requests
    row: TableRow = {
        "method": job.method,
        "protocol": job.protocol,
        "kind": job.kind,
        "sweep_distance": job.distance,
        "distance": req["distance"],
        "seed": job.seed,
        "index": index,
        "step": step,
        "fact": req["fact"],
        "subject": req["subject"],
        "relation": req["relation"],
        "target": req["target"],
        "old_target": req["old_target"],
        "seconds": record.seconds,
        "skipped": record.skipped or "",
    }
    if record.scored:
        (detail,) = record.efficacy_detail
        row["efficacy"] = record.efficacy
        row["target_prob"] = detail.target_prob
        # CounterFact's paraphrase, synthetic: the edit asked after unseen context prefixes
        row["paraphrase"] = detail.prompt_fraction
        for k, v in (record.neighbourhood or {}).items():
            row[f"neighbourhood.{k}"] = v
        if record.retained is not None:
            row["retained"] = record.retained
        for split, by_order in (record.accuracy_change or {}).items():
            for order, value in by_order.items():
                row[f"acc.{split}.{order}"] = value
        row.update(record.measures or {})
    return row


def write_table(rows: list[TableRow], path: Path) -> Path:
    """The tidy table: one row per scoring point, one column per field (CSV)."""
    first = ["method", "protocol", "kind", "sweep_distance", "distance", "seed", "index", "step"]
    fields = first + sorted({k for r in rows for k in r} - set(first))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(r)
    text = buf.getvalue()
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else None


def accuracy_drop(row: TableRow) -> float:
    """Mean accuracy drop over the three tasks, all orders, in points (positive = worse)."""
    return -100 * statistics.fmean(_num(row, f"acc.{s}.all") for s in SPLITS)


def _scored(row: TableRow) -> bool:
    return "efficacy" in row


def single_edits(rows: list[TableRow], method: str | None = None) -> list[SingleEdit]:
    """The scored single edits among a sweep's rows (of one method), typed."""
    return [
        SingleEdit(
            method=_text(r, "method"),
            kind=_text(r, "kind"),
            sweep_distance=_int(r, "sweep_distance"),
            distance=_int(r, "distance"),
            fact=_text(r, "fact"),
            subject=_int(r, "subject"),
            relation=_int(r, "relation"),
            target=_int(r, "target"),
            R_mean=_num(r, "R.mean"),
            drop=accuracy_drop(r),
        )  # fmt: skip
        for r in rows
        if _scored(r) and r["protocol"] == "single" and method in (None, r["method"])
    ]


def summarise(rows: list[TableRow], orders: list[str], config: SweepConfig) -> SweepSummary:
    """Per method: means per edit kind / distance, fits of accuracy drop on R, and sequences.

    The one reader of the table's composed column names; everything downstream reads the
    :class:`~kgshatter.studies.results.SweepSummary`'s attributes."""
    scored = [r for r in rows if _scored(r)]
    methods: dict[str, MethodSummary] = {}
    for method in config.methods:
        single = [r for r in scored if r["method"] == method and r["protocol"] == "single"]
        groups: dict[str, list[TableRow]] = {}
        for r in single:
            label = kind_label(_text(r, "kind"), _int(r, "sweep_distance"))
            groups.setdefault(label, []).append(r)
        per_kind = {label: _kind_summary(rs, orders) for label, rs in groups.items()}
        edits = single_edits(rows, method)  # the same rows as ``single``, typed
        fit = fit_line([e.R_mean for e in edits], [e.drop for e in edits])
        skipped = sum(1 for r in rows if r["method"] == method and r.get("skipped"))
        seq = sorted(
            (r for r in scored if r["method"] == method and r["protocol"] == "sequential"),
            key=lambda r: (_int(r, "seed"), _int(r, "step")),
        )
        methods[method] = MethodSummary(
            by_kind=per_kind,
            fit_drop_on_R=Fit(fit.slope, fit.intercept, fit.r2, fit.n),
            skipped=skipped,
            sequential=[
                SequenceStep(
                    step=_int(r, "step"),
                    efficacy=_num(r, "efficacy"),
                    retained=None if r.get("retained") is None else _num(r, "retained"),
                    accuracy_drop_points=accuracy_drop(r),
                    R_x100=100 * _num(r, "R.mean"),
                )
                for r in seq
            ],
        )
    return SweepSummary(n_rows=len(rows), n_scored=len(scored), methods=methods)


def _mechanism_columns(orders: list[str]) -> list[str]:
    """The columns :meth:`SweepContext.measure_edit` writes."""
    return ["shift.edited", "shift.others", "spill", *(f"spill.{o}" for o in orders), "delta_norm"]


def _kind_summary(rs: list[TableRow], orders: list[str]) -> KindSummary:
    """Means over one group of single edits' rows."""
    kind = _text(rs[0], "kind")
    return KindSummary(
        kind=kind,
        distance=None if kind == "corrective" else _int(rs[0], "sweep_distance"),
        n=len(rs),
        efficacy=_mean([_num(r, "efficacy") for r in rs]),
        accuracy_change_points={
            s: {o: _mean([100 * _num(r, f"acc.{s}.{o}") for r in rs]) for o in [*orders, "all"]}
            for s in SPLITS
        },
        R_x100={o: _mean([100 * _num(r, f"R.{o}") for r in rs]) for o in [*orders, "mean"]},
        neighbours={o: _mean([_num(r, f"neighbours.{o}") for r in rs]) for o in orders},
        isomap={o: _mean([_num(r, f"isomap.{o}") for r in rs]) for o in orders},
        mechanism={k: _mean([_num(r, k) for r in rs]) for k in _mechanism_columns(orders)},
    )
