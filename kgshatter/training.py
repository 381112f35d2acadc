"""Training: one readable loop (nanoGPT style), atomic checkpoints, exact resume.

A run directory holds::

    run.json                      the RunConfig and the graph's fingerprint
    graph.json                    the knowledge graph (rings and splits)
    checkpoints/step_0001000/     model.safetensors, optimizer.pt, state.json (step, history)
    history.json                  the evaluation history of the finished run
    init.safetensors              a warm start's initial weights (``init_from``; run.json names
                                  their source and SHA-256)

Every file is written through a temp name and renamed; a checkpoint folder is renamed into place
only once complete, so a killed run never leaves a half-written checkpoint. Batches depend only on
``(train.seed, step)`` and the optimiser state is saved, so ``resume=True`` reproduces an
uninterrupted run bit for bit on the same machine and thread count.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from kgshatter.evaluate import Evaluator
from kgshatter.io import (
    check_finite,
    file_sha256,
    load_torch_file,
    read_json,
    remove_stale_temporaries,
    write_atomic,
    write_dir_atomic,
    write_json_atomic,
)
from kgshatter.kg.graph import KnowledgeGraph
from kgshatter.kg.walks import WalkSampler
from kgshatter.models import build_model, load_weights, logits_at, save_weights
from kgshatter.presets import RunConfig

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger(__name__)

RUN_FORMAT = "kgshatter.run/1"
CHECKPOINT_PREFIX = "step_"


@dataclass
class TrainResult:
    model: TransformerBridge
    graph: KnowledgeGraph
    run: RunConfig
    history: list[dict[str, Any]]
    out_dir: Path | None


def lr_at(step: int, run: RunConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at the last step.

    >>> from kgshatter.presets import get_preset
    >>> run = get_preset("tiny")
    >>> lr_at(0, run) < lr_at(10, run) < lr_at(20, run) == run.train.lr
    True
    """
    t = run.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    floor = t.min_lr_ratio * t.lr
    return floor + 0.5 * (t.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: TransformerBridge, run: RunConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings only (nanoGPT's grouping)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    t = run.train
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": t.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
    )


def loss_fn(
    model: TransformerBridge, tokens: torch.Tensor, n_entities: int, positions: str
) -> torch.Tensor:
    """Next-token cross-entropy on ``tokens[:, :-1] -> tokens[:, 1:]``.

    ``positions="entities"``: only where the target is an entity, and the logits are computed
    only there (:func:`kgshatter.models.logits_at`); ``"all"``: every position.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:].reshape(-1)
    rows = (targets < n_entities).nonzero().squeeze(1) if positions == "entities" else None
    logits = logits_at(model, inputs, rows).float()
    return F.cross_entropy(logits, targets if rows is None else targets[rows])


def autocast(run: RunConfig, device: torch.device) -> Any:
    """The autocast context of ``run.train.precision`` on ``device`` (off for float32)."""
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=run.train.precision == "bfloat16"
    )


# ---------------------------------------------------------------------- warm starts
INIT_FILE = "init.safetensors"


@dataclass(frozen=True)
class WarmStart:
    """Initial weights for a new run: a finished or running run's newest checkpoint.

    A warm start trains a model further under a new schedule (fresh optimiser, step 0, the new
    run's ``train`` config): a run whose cosine schedule ended while accuracy was still rising
    continues without retraining from scratch. The weights are copied into the new run directory
    (``init.safetensors``) so the run stays self-contained and resumable.
    """

    weights: Path
    sha256: str
    source: str
    source_step: int | None
    graph_fingerprint: str | None

    @classmethod
    def resolve(cls, path: str | os.PathLike[str]) -> WarmStart:
        """A run directory (its newest checkpoint), a checkpoint folder or a safetensors file."""
        p = Path(path)
        graph_fp: str | None = None
        step: int | None = None
        if (p / "run.json").is_file():
            record = read_json(p / "run.json", "run record")
            graph_fp = record.get("graph_fingerprint")
            found = checkpoints(p)
            if not found:
                raise ValueError(f"--init-from {p}: the run has no checkpoint to start from")
            p = found[-1]
        if p.is_dir():
            if not (p / "model.safetensors").is_file():
                raise ValueError(
                    f"--init-from {p}: not a run directory, checkpoint folder or .safetensors file"
                )
            if (p / "state.json").is_file():
                step = _read_state(p)["step"]
            if graph_fp is None and (p.parent.parent / "run.json").is_file():
                graph_fp = read_json(p.parent.parent / "run.json", "run record").get(
                    "graph_fingerprint"
                )
            p = p / "model.safetensors"
        elif not p.is_file():
            raise ValueError(
                f"--init-from {p}: no such file or directory (give a run directory, a checkpoint "
                f"folder or a .safetensors file)"
            )
        return cls(p, file_sha256(p), str(path), step, graph_fp)

    def record(self) -> dict[str, Any]:
        return {"source": self.source, "source_step": self.source_step, "sha256": self.sha256}


# ---------------------------------------------------------------------- run directories
def _run_record(
    run: RunConfig, graph: KnowledgeGraph, init: WarmStart | None = None
) -> dict[str, Any]:
    record = {"format": RUN_FORMAT, "config": run.to_dict(), "graph_fingerprint": graph.fingerprint}
    if init is not None:
        record["init"] = init.record()
    return record


def _check_init(out_dir: Path, existing: dict[str, Any], init: WarmStart | None) -> Path | None:
    """The warm-start weights an existing run directory starts from (``None``: from scratch)."""
    recorded = existing.get("init")
    if init is not None and (recorded is None or recorded.get("sha256") != init.sha256):
        raise ValueError(
            f"{out_dir} holds a run that did not start from {init.source}; choose a new --out, or "
            f"resume it without --init-from"
        )
    if recorded is None:
        return None
    copy = out_dir / INIT_FILE
    if not copy.is_file():  # killed between the run record and the copy
        if init is None:
            raise ValueError(
                f"{copy} is missing; pass --init-from {recorded.get('source')} to restore it"
            )
        weights = init.weights
        write_atomic(copy, lambda tmp: shutil.copyfile(weights, tmp))
    return copy


CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "state.json")


def checkpoints(out_dir: str | os.PathLike[str], warn: bool = False) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first.

    A folder whose name is not ``step_<digits>`` or that lacks one of its files (damaged after
    it was written) is skipped, so resume falls back to the previous one; ``warn`` logs each
    (done once where a run is opened, not at every pruning).
    """
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found: list[tuple[int, Path]] = []
    for p in root.iterdir():
        if not p.is_dir() or not p.name.startswith(CHECKPOINT_PREFIX):
            continue
        step = _step_of(p)
        missing = [f for f in CHECKPOINT_FILES if not (p / f).is_file()]
        if step is None or missing:
            if warn:
                why = "not a step_<number> folder" if step is None else f"missing {missing}"
                log.warning("ignoring %s: %s", p, why)
            continue
        found.append((step, p))
    return [p for _, p in sorted(found)]


def _prepare_out_dir(
    out_dir: Path, run: RunConfig, graph: KnowledgeGraph, resume: bool, init: WarmStart | None
) -> tuple[bool, Path | None]:
    """Check ``out_dir`` may hold this run.

    Returns whether a checkpoint is there to resume and the warm-start weights the run starts
    from (``None``: from scratch).
    """
    record = out_dir / "run.json"
    if record.exists():
        existing = read_json(record, "run record", required=("config",))
        try:  # fields added since the record was written take their defaults
            same = RunConfig.from_dict(existing.get("config")) == run
        except (ValueError, TypeError) as e:
            raise ValueError(f"run record at {record} has a bad config: {e}") from None
        if not same:
            other = existing.get("config", {}).get("name")
            raise ValueError(
                f"{out_dir} already holds a different run (preset {other!r}"
                f" with other settings); choose a new --out, or resume it with its own config"
            )
        if existing.get("graph_fingerprint") != graph.fingerprint:
            raise ValueError(f"{out_dir} holds a run on a different graph; choose a new --out")
        init_weights = _check_init(out_dir, existing, init)
        if not (out_dir / "graph.json").is_file():  # killed right after the run record
            graph.save(out_dir / "graph.json")
        elif KnowledgeGraph.load(out_dir / "graph.json").fingerprint != graph.fingerprint:
            raise ValueError(
                f"{out_dir / 'graph.json'} is not the graph this run's config builds; restore it "
                f"or delete it (it is rewritten from the config)"
            )
        for stale in remove_stale_temporaries(out_dir) + remove_stale_temporaries(
            out_dir / "checkpoints"
        ):
            log.info("removed %s, left by a killed run", stale)
        if checkpoints(out_dir) and not resume:
            raise ValueError(
                f"{out_dir} already holds this run with checkpoints; pass --resume (resume=True) "
                f"to continue it, or choose a new --out"
            )
        return bool(checkpoints(out_dir, warn=True)), init_weights
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(
            f"{out_dir} exists and is not a kgshatter run directory (no run.json); refusing to "
            f"write into it: choose an empty or new --out"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    # the run record first: a kill before graph.json leaves a folder recognised as this run
    write_json_atomic(record, _run_record(run, graph, init))
    graph.save(out_dir / "graph.json")
    if init is None:
        return False, None
    return False, _check_init(out_dir, _run_record(run, graph, init), init)


def save_checkpoint(
    out_dir: Path,
    model: TransformerBridge,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write a checkpoint folder atomically and prune all but the newest ``keep``."""
    root = out_dir / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{state['step']:07d}"

    def fill(tmp: Path) -> None:
        save_weights(model, tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        write_json_atomic(tmp / "state.json", state)

    write_dir_atomic(final, fill, replace=True)
    complete = checkpoints(out_dir)
    # older folders missing a file (a prune killed mid-delete by an earlier version) go too
    broken = [
        p
        for p in root.glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir() and p not in complete and (_step_of(p) or state["step"]) < state["step"]
    ]
    for old in complete[:-keep] + broken:
        # renamed aside first: a kill mid-delete leaves a temporary that the next open removes,
        # never a half-deleted step_ folder
        aside = root / f".tmp-{old.name}-{os.getpid()}"
        os.replace(old, aside)
        shutil.rmtree(aside)
    return final


def _step_of(folder: Path) -> int | None:
    digits = folder.name[len(CHECKPOINT_PREFIX) :]
    return int(digits) if digits.isdigit() else None


def _read_state(ckpt: Path) -> dict[str, Any]:
    state = read_json(ckpt / "state.json", "checkpoint state", required=("step", "history"))
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"checkpoint state at {ckpt / 'state.json'} has a bad step {step!r}")
    return state


def _load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """The optimiser's saved state, refused with one line when damaged, foreign or non-finite."""
    saved = load_torch_file(path, "optimizer state")
    if not isinstance(saved, dict) or "state" not in saved:
        raise ValueError(f"optimizer state at {path} is not a torch optimizer state_dict")
    tensors = {
        f"{i}.{k}": v
        for i, entry in saved["state"].items()
        for k, v in entry.items()
        if isinstance(v, torch.Tensor)
    }
    check_finite(tensors, path, "optimizer state")
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"optimizer state at {path} does not fit this model: {e}") from None


def load_run(
    out_dir: str | os.PathLike[str],
    device: str | torch.device | None = None,
    step: int | None = None,
) -> tuple[RunConfig, KnowledgeGraph, TransformerBridge, dict[str, Any]]:
    """``(run, graph, model, state)`` from a run directory's newest checkpoint, or from the
    one written at ``step`` (a learning curve's model: keep them with
    ``train.keep_checkpoints``).

    Refuses a directory whose graph does not match its run record or whose files are missing,
    and a ``step`` with no checkpoint (naming the steps there are).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"no run directory at {out_dir}")
    record = read_json(out_dir / "run.json", "run record")
    if record.get("format") != RUN_FORMAT or "config" not in record:
        raise ValueError(f"{out_dir / 'run.json'} is not a kgshatter run record")
    try:
        run = RunConfig.from_dict(record["config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"run record at {out_dir / 'run.json'} has a bad config: {e}") from None
    graph = KnowledgeGraph.load(out_dir / "graph.json")
    if graph.fingerprint != record.get("graph_fingerprint"):
        raise ValueError(
            f"{out_dir / 'graph.json'} is a different graph from the one this run was trained on "
            f"(fingerprint {graph.fingerprint} != {record.get('graph_fingerprint')})"
        )
    if graph.config != run.kg:
        raise ValueError(f"{out_dir / 'graph.json'} was not built from this run's kg config")
    found = checkpoints(out_dir, warn=True)
    if not found:
        raise FileNotFoundError(f"{out_dir} has no checkpoint (no checkpoints/step_*/ folder)")
    if step is not None:
        at = [p for p in found if _step_of(p) == step]
        if not at:
            there = ", ".join(str(_step_of(p)) for p in found)
            raise ValueError(f"{out_dir} has no checkpoint at step {step}; it has steps {there}")
        found = at
    state = _read_state(found[-1])
    model = build_model(run.model, d_vocab=graph.n_entities + graph.n_relations, device=device)
    load_weights(model, found[-1] / "model.safetensors")
    model.eval()
    return run, graph, model, state


def _start(
    run: RunConfig,
    out_dir: str | os.PathLike[str] | None,
    resume: bool,
    device: str | torch.device | None,
    init_from: str | os.PathLike[str] | None,
) -> tuple[KnowledgeGraph, TransformerBridge, torch.optim.AdamW, dict[str, Any], Path | None]:
    """The graph, model, optimiser and loop state a run starts (or resumes) from.

    Everything is checked before anything is written: a warm start's source (graph and shape),
    then the run directory (:func:`_prepare_out_dir`).
    """
    graph = KnowledgeGraph.from_config(run.kg)
    init = WarmStart.resolve(init_from) if init_from is not None else None
    if init is not None and init.graph_fingerprint not in (None, graph.fingerprint):
        raise ValueError(
            f"--init-from {init.source} was trained on another graph (fingerprint "
            f"{init.graph_fingerprint}, this run's is {graph.fingerprint}): kg settings must match"
        )
    model = build_model(run.model, d_vocab=graph.n_entities + graph.n_relations, device=device)
    if init is not None:  # refuses weights of another shape before anything is written
        load_weights(model, init.weights)
    optimizer = make_optimizer(model, run)
    state: dict[str, Any] = {
        "step": 0,
        "seconds": 0.0,
        "history": [],
        "loss_sum": 0.0,
        "loss_count": 0,
        "tokens": 0,
    }
    out = Path(out_dir) if out_dir is not None else None
    if out is None:
        return graph, model, optimizer, state, out
    resumable, init_weights = _prepare_out_dir(out, run, graph, resume, init)
    steps = run.train.steps
    if resumable:
        ckpt = checkpoints(out)[-1]
        load_weights(model, ckpt / "model.safetensors")
        _load_optimizer(optimizer, ckpt / "optimizer.pt")
        state = _read_state(ckpt)
        if state["step"] >= steps:
            log.info("%s holds the finished run (step %d); reusing it", out, state["step"])
        else:
            log.info("resuming %s from step %d of %d", out, state["step"], steps)
    else:
        if init_weights is not None and init is None:  # resumed without --init-from: the copy
            load_weights(model, init_weights)
        log.info("training %s for %d steps into %s", run.name, steps, out)
    return graph, model, optimizer, state, out


def _history_entry(
    state: dict[str, Any], result: dict[str, Any], lr: float, tokens: int, elapsed: float
) -> dict[str, Any]:
    """One evaluation's record: step, time, throughput, the mean loss since the last, results."""
    return {
        "step": state["step"],
        "train_seconds": round(state["seconds"], 2),
        "tokens_per_second": round(tokens / max(elapsed, 1e-9), 1),
        "loss": state["loss_sum"] / max(1, state["loss_count"]),
        "lr": lr,
        **result,
    }


# ---------------------------------------------------------------------- the loop
def train(
    run: RunConfig,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    max_steps: int | None = None,
    checkpoint_seconds: float | None = 300.0,
    init_from: str | os.PathLike[str] | None = None,
) -> TrainResult:
    """Train ``run`` from scratch (or resume it) and return the model, graph and history.

    ``out_dir=None`` trains in memory without checkpoints. ``max_steps`` stops early (the
    schedule still follows ``run.train.steps``), which is how tests interrupt a run.
    Checkpoints are written every ``run.train.checkpoint_every`` steps and, in between, once
    ``checkpoint_seconds`` have passed since the last one (``None``: by steps only), so a slow
    machine never leaves more than a few minutes of work unsaved. Where checkpoints fall does
    not change the trained weights: a resumed run equals an uninterrupted one.

    ``init_from`` (a run directory, checkpoint folder or weights file; :class:`WarmStart`)
    starts from those weights instead of a fresh initialisation, with a fresh optimiser and this
    run's schedule from step 0. The source must be a model of this run's shape on this run's
    graph. A warm-started run directory resumes like any other (``init_from`` may be omitted).
    """
    if checkpoint_seconds is not None and not checkpoint_seconds > 0:
        raise ValueError(f"checkpoint_seconds must be > 0 or None, got {checkpoint_seconds}")
    from tqdm.auto import tqdm

    graph, model, optimizer, state, out = _start(run, out_dir, resume, device, init_from)
    sampler = WalkSampler(graph, run.walks)
    evaluator = Evaluator.for_run(run, graph)
    t = run.train

    dev = next(model.parameters()).device
    end = t.steps if max_steps is None else min(t.steps, max_steps)
    model.train()
    bar = tqdm(total=t.steps, initial=state["step"], disable=not progress, desc=f"train {run.name}")
    meter = _Meter(state, dev)
    last_save = time.perf_counter()
    while state["step"] < end:
        step = state["step"]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, run)
        tokens = sampler.batch_for_step(step, t.batch_size, t.seed).to(dev)
        with autocast(run, dev):
            loss = loss_fn(model, tokens, graph.n_entities, t.loss_positions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        state["step"] = step + 1
        meter.add(loss, tokens)
        bar.update(1)
        last = state["step"] == end
        if state["step"] % t.eval_every == 0 or last:
            _evaluate(model, evaluator, meter, run, step, bar)
        overdue = (
            checkpoint_seconds is not None and time.perf_counter() - last_save >= checkpoint_seconds
        )
        if out is not None and (state["step"] % t.checkpoint_every == 0 or last or overdue):
            meter.flush_loss()
            meter.bank_time()
            path = save_checkpoint(out, model, optimizer, state, t.keep_checkpoints)
            last_save = time.perf_counter()
            log.debug("checkpoint %s", path)
    bar.close()
    if out is not None and state["step"] == t.steps:
        write_json_atomic(out / "history.json", state["history"])
    model.eval()
    return TrainResult(model=model, graph=graph, run=run, history=state["history"], out_dir=out)


class _Meter:
    """The running loss (summed on the device: no sync per step) and the training time and
    tokens since they were last moved into the run's ``state``."""

    def __init__(self, state: dict[str, Any], device: torch.device) -> None:
        self.state, self.device = state, device
        self.running_loss = torch.zeros((), device=device)
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def add(self, loss: torch.Tensor, tokens: torch.Tensor) -> None:
        self.running_loss += loss.detach()
        self.state["loss_count"] += 1
        self.window_tokens += tokens.shape[0] * (tokens.shape[1] - 1)

    def flush_loss(self) -> None:
        """Move the running loss into ``state``; refuse a non-finite loss before any save."""
        value = self.running_loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(
                f"training loss became {value} before step {self.state['step']}; nothing was "
                f"saved for this window: lower train.lr or resume from the last checkpoint"
            )
        self.state["loss_sum"] += value
        self.running_loss = torch.zeros((), device=self.device)

    def bank_time(self) -> float:
        """Move the time and tokens since the last call into ``state``; return the seconds."""
        elapsed = time.perf_counter() - self.window_start
        self.state["seconds"] += elapsed
        self.state["tokens"] += self.window_tokens
        self.window_start, self.window_tokens = time.perf_counter(), 0
        return elapsed


def _evaluate(
    model: TransformerBridge,
    evaluator: Evaluator,
    meter: _Meter,
    run: RunConfig,
    step: int,
    bar: Any,
) -> None:
    """Evaluate after ``step``: a history entry with the loss, accuracy and speed since the
    last one (evaluation time is not training time)."""
    state = meter.state
    meter.flush_loss()
    tokens_seen = meter.window_tokens
    elapsed = meter.bank_time()
    result = evaluator(model)
    model.train()
    entry = _history_entry(state, result, lr_at(step, run), tokens_seen, elapsed)
    state["history"].append(entry)
    state["loss_sum"], state["loss_count"] = 0.0, 0
    acc = result["accuracy"]
    bar.set_postfix(
        loss=f"{entry['loss']:.3f}",
        direct=acc["direct"]["all"],
        logical=acc["logical"]["all"],
        comp=acc["compositional"]["all"],
    )
    log.info(
        "step %d: %s", state["step"],
        ", ".join(f"{k} {100 * v['all']:.1f}%" for k, v in acc.items()),
    )  # fmt: skip
    meter.window_start = time.perf_counter()
