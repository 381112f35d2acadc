"""Run configs (graph + walks + model + training + evaluation) and the named presets.

``paper``: the paper's scale, meant for a GPU. ``cpu``: the embedded default, trained on 2 CPU
cores (its recipe and the evidence behind it are in the README's "Learning the rings" section).
``tiny``: seconds, for tests.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from kgshatter.kg.config import KGConfig
from kgshatter.kg.walks import WalkConfig
from kgshatter.models import ModelConfig
from kgshatter.validation import (
    ConfigDict,
    check_choice,
    check_float,
    check_fraction,
    check_int,
)

LOSS_POSITIONS = ("entities", "all")
PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(ConfigDict):
    """Optimiser and schedule (paper: 150k steps, batch 256; the rest is *(choice)*).

    AdamW with decoupled weight decay on matrices and embeddings (not on biases or norms),
    linear warmup then cosine decay to ``min_lr_ratio * lr``, gradient clipping.
    ``loss_positions="entities"`` puts the next-token loss only on positions whose target is an
    entity (relations in a walk are random, so their loss is irreducible noise).
    ``precision="bfloat16"`` runs the forward and backward passes under ``torch.autocast``
    (matrix products in bfloat16; weights, optimiser state and the loss stay float32): 2.2x
    the steps per second of a d_model-256 model on a CPU with AVX-512 BF16, 1.2x at d_model 64,
    none at d_model 24, whose time is not in matrix products (docs/speed.md).
    """

    steps: int = 150_000
    batch_size: int = 256
    lr: float = 6e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    loss_positions: str = "entities"
    precision: str = "float32"
    eval_every: int = 5000
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("steps", self.steps, 1)
        check_int("batch_size", self.batch_size, 1)
        check_float("lr", self.lr, 0.0, inclusive=False)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_fraction("beta1", self.beta1)
        check_fraction("beta2", self.beta2)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_float("min_lr_ratio", self.min_lr_ratio, 0.0)
        if self.min_lr_ratio > 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check_float("grad_clip", self.grad_clip, 0.0, inclusive=False)
        check_choice("loss_positions", self.loss_positions, LOSS_POSITIONS)
        check_choice("precision", self.precision, PRECISIONS)
        check_int("eval_every", self.eval_every, 1)
        check_int("checkpoint_every", self.checkpoint_every, 1)
        check_int("keep_checkpoints", self.keep_checkpoints, 1)
        check_int("seed", self.seed, 0)


@dataclass(frozen=True, kw_only=True)
class EvalConfig(ConfigDict):
    """How accuracy and ring structure are measured.

    ``n_prefixes``: random walk contexts per query; the next-token softmax is averaged over them
    before the argmax (paper: 5). ``max_queries``: per split, for periodic evaluation during
    training (``None``: all). ``ring_prefixes``: contexts per entity for ring metrics.
    """

    n_prefixes: int = 5
    max_queries: int | None = 2000
    ring_prefixes: int = 5
    batch_size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("n_prefixes", self.n_prefixes, 1)
        if self.max_queries is not None:
            check_int("max_queries", self.max_queries, 1)
        check_int("ring_prefixes", self.ring_prefixes, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("seed", self.seed, 0)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything that defines a training run; stored as ``run.json`` beside its checkpoints."""

    name: str = "custom"
    kg: KGConfig = field(default_factory=KGConfig)
    walks: WalkConfig = field(default_factory=WalkConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if self.walks.n_ctx != self.model.n_ctx:
            raise ValueError(
                f"walks.n_ctx ({self.walks.n_ctx}) must equal model.n_ctx ({self.model.n_ctx})"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kg": self.kg.to_dict(),
            "walks": self.walks.to_dict(),
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "eval": self.eval.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        if not isinstance(data, dict):
            raise ValueError(f"RunConfig needs a dict, got {type(data).__name__}")
        parts: dict[str, Any] = {
            "kg": KGConfig,
            "walks": WalkConfig,
            "model": ModelConfig,
            "train": TrainConfig,
            "eval": EvalConfig,
        }
        unknown = sorted(set(data) - set(parts) - {"name"})
        if unknown:
            raise ValueError(f"unknown RunConfig fields {unknown}; allowed: name, {sorted(parts)}")
        kwargs: dict[str, Any] = {k: c.from_dict(data[k]) for k, c in parts.items() if k in data}
        if "name" in data:
            kwargs["name"] = data["name"]
        return cls(**kwargs)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some top-level parts replaced (configs stay frozen)."""
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, RunConfig] = {
    # Recipe and evidence: docs/fidelity.md, "Learning the rings on a CPU". Weight decay 1.0 is
    # the lever that turns memorisation into generalisation (grokking); half of the walk steps
    # written as two-hop compositions lifts compositional inference from 0.27 to 0.49 at 1000 steps.
    "cpu": RunConfig(
        name="cpu",
        kg=KGConfig(n_entities=128, n_orders=3, max_hops=4),
        walks=WalkConfig(n_ctx=16, composition_prob=0.5),
        model=ModelConfig(n_layers=2, d_model=64, n_heads=4, d_mlp=256, n_ctx=16),
        train=TrainConfig(
            steps=10_000,
            batch_size=256,
            lr=2e-3,
            weight_decay=1.0,
            beta2=0.98,
            warmup_steps=100,
            min_lr_ratio=0.0,
            eval_every=1000,
            checkpoint_every=1000,
        ),
        eval=EvalConfig(max_queries=2000),
    ),
    "tiny": RunConfig(
        name="tiny",
        kg=KGConfig(
            n_entities=16, n_orders=3, max_hops=2, logical_holdout=0.125, compositional_holdout=0.1
        ),
        walks=WalkConfig(n_ctx=8, composition_prob=0.25),
        model=ModelConfig(n_layers=2, d_model=32, n_heads=2, d_mlp=128, n_ctx=8),
        train=TrainConfig(
            steps=300,
            batch_size=64,
            lr=3e-3,
            weight_decay=0.1,
            beta2=0.98,
            warmup_steps=20,
            min_lr_ratio=0.1,
            eval_every=100,
            checkpoint_every=100,
        ),
        eval=EvalConfig(n_prefixes=3, max_queries=None, ring_prefixes=2, batch_size=512),
    ),
}


# The paper's scale (docs/paper-scale/README.md): N = 2048 entities and the paper's reported
# width (d_model 24, 12 heads of 2, d_mlp 96), trained with the cpu recipe on the paper's 150k
# steps: direct / logical / compositional 100.0 / 99.6 / 98.8% (the paper, order I: 98.3 /
# 98.2 / 88.2). Too narrow to give each of its 49,152 facts a key of its own, it answers from
# the rings, and ROME and MEMIT edits damage every order more with distance. Trained once
# (about 3 h on one CPU thread) and shipped (kgshatter/studies/runs/paper). Which orders an
# edit shatters is this training seed's: an edit reaches the orders that share the edited
# order's block-0 keys (here I and II, III in part); seeds 1-3 edited the same way shatter
# order I only (docs/paper-scale/README.md, "Which training seeds shatter every order").
PRESETS["paper"] = PRESETS["cpu"].replace(
    name="paper",
    kg=dataclasses.replace(PRESETS["cpu"].kg, n_entities=2048),
    model=dataclasses.replace(PRESETS["cpu"].model, d_model=24, n_heads=12, d_mlp=96),
    train=dataclasses.replace(
        PRESETS["cpu"].train, steps=150_000, eval_every=10_000, checkpoint_every=2500
    ),
)
# Its width control: the same graph and recipe at d_model 64 (16 heads, d_mlp 256) reaches
# 100 / 100 / 100% in 50k steps, and MEMIT's edits on it cost nothing (-0.5 points at d = 4):
# the damage needs a model too narrow to store facts apart (docs/paper-scale/README.md).
PRESETS["paper-wide"] = PRESETS["paper"].replace(
    name="paper-wide",
    model=dataclasses.replace(PRESETS["paper"].model, d_model=64, n_heads=16, d_mlp=256),
    train=dataclasses.replace(PRESETS["paper"].train, steps=50_000),
)


# An experiment (docs/shattering.md): the cpu recipe with the first block's
# attention restricted to each token itself, so the subject is processed at its own position
# and edits at the subject token (the paper's) can change answers. Same accuracy (100 / 100 /
# 99.9 at 10k steps); ROME at the subject token then damages every order alike.
PRESETS["cpu-subject"] = PRESETS["cpu"].replace(
    name="cpu-subject",
    model=dataclasses.replace(PRESETS["cpu"].model, layer0_attention="self"),
)


# The fidelity study's best model (docs/fidelity.md): the paper's reported width
# (d_model 24, 12 heads of 2) with nanoGPT's tied embeddings, the subject processed at its own
# token (first block attends to itself, as cpu-subject), 20k steps. Its answers live on the
# rings (logit margins grow with the distance along the ring), so subject-token edits damage
# every order and more with distance. Trained once and shipped (kgshatter/studies/runs/compressed).
PRESETS["compressed"] = PRESETS["cpu-subject"].replace(
    name="compressed",
    model=dataclasses.replace(
        PRESETS["cpu-subject"].model, d_model=24, n_heads=12, d_mlp=96, tied_embeddings=True
    ),
    train=dataclasses.replace(
        PRESETS["cpu-subject"].train, steps=20_000, eval_every=2000, checkpoint_every=2000
    ),
)


# Other geometries (docs/geometries.md): the cpu recipe for 6000 steps on an 8 x 8 torus
# per order (relations 1-2 steps east / west / south / north), on an 8 x 8 grid (the lattice
# without wrapping) and on a mixed graph (I and III rings of 64, II a torus), each trained on 2
# CPU cores in minutes.
PRESETS["torus"] = PRESETS["cpu"].replace(
    name="torus",
    kg=KGConfig(n_entities=64, n_orders=3, max_hops=2, structure="torus", width=8),
    train=dataclasses.replace(PRESETS["cpu"].train, steps=6000),
)
PRESETS["mixed"] = PRESETS["torus"].replace(
    name="mixed",
    kg=KGConfig(n_entities=64, n_orders=3, max_hops=2, structure="mixed", width=8),
)
PRESETS["grid"] = PRESETS["torus"].replace(
    name="grid",
    kg=KGConfig(n_entities=64, n_orders=3, max_hops=2, structure="grid", width=8),
)
# a full ternary tree of 64 entities per order (relations 1-2 levels up / down), and rings with a
# tree between them (I and III rings, II a tree)
PRESETS["tree"] = PRESETS["torus"].replace(
    name="tree",
    kg=KGConfig(n_entities=64, n_orders=3, max_hops=2, structure="tree", branching=3),
)
PRESETS["ring-tree"] = PRESETS["torus"].replace(
    name="ring-tree",
    kg=KGConfig(n_entities=64, n_orders=3, max_hops=2, structure="ring-tree", branching=3),
)
# their control: the same recipe and size with every order a ring (the geometry study's baseline)
PRESETS["ring64"] = PRESETS["torus"].replace(
    name="ring64", kg=KGConfig(n_entities=64, n_orders=3, max_hops=2)
)


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
        fields = {f.name for f in dataclasses.fields(getattr(run, part))}
        if field not in fields:
            raise ValueError(f"--set: {part} has no field {field!r}; fields: {sorted(fields)}")
        if isinstance(data[part].get(field), float) and type(value) is int:
            value = float(value)  # "train.lr=1" sets the float 1.0
        data[part][field] = value
    return RunConfig.from_dict(data)


def get_preset(name: str) -> RunConfig:
    """A named preset; unknown names list the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
