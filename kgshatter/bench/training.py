"""Training throughput: the TransformerBridge model vs a plain PyTorch decoder of the same shape.

Both are trained by the same step (same batches, loss, AdamW and clipping), timed in interleaved
blocks so that machine noise hits both alike. The ratio is the cost of the hook machinery.
This is a benchmark, not a test: it prints numbers and writes a JSON file.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from kgshatter.io import write_json_atomic
from kgshatter.kg.graph import KnowledgeGraph
from kgshatter.kg.walks import WalkSampler
from kgshatter.models import (
    ModelConfig,
    build_model,
    use_lean_attention,
    use_lean_normalization,
    use_native_layernorm,
)
from kgshatter.presets import RunConfig

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


class PlainDecoder(nn.Module):
    """Pre-LayerNorm GPT decoder with learned positions; no hooks. Benchmark reference only."""

    def __init__(self, cfg: ModelConfig, d_vocab: int) -> None:
        super().__init__()
        d, h, dh = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.n_heads, self.d_head = h, dh
        self.embed = nn.Embedding(d_vocab, d)
        self.pos = nn.Embedding(cfg.n_ctx, d)
        self.blocks = nn.ModuleList()
        for _ in range(cfg.n_layers):
            self.blocks.append(
                nn.ModuleDict(
                    {
                        "ln1": nn.LayerNorm(d),
                        "q": nn.Linear(d, h * dh, bias=cfg.bias),
                        "k": nn.Linear(d, h * dh, bias=cfg.bias),
                        "v": nn.Linear(d, h * dh, bias=cfg.bias),
                        "o": nn.Linear(h * dh, d, bias=cfg.bias),
                        "ln2": nn.LayerNorm(d),
                        "fc_in": nn.Linear(d, cfg.mlp_dim, bias=cfg.bias),
                        "fc_out": nn.Linear(cfg.mlp_dim, d, bias=cfg.bias),
                    }
                )
            )
        self.ln_f = nn.LayerNorm(d)
        self.unembed = nn.Linear(d, d_vocab, bias=False)
        if cfg.tied_embeddings:
            self.unembed.weight = self.embed.weight
        mask = torch.triu(torch.ones(cfg.n_ctx, cfg.n_ctx, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)
        self.act = F.gelu if cfg.act_fn.startswith("gelu") else F.relu

    def forward(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[batch, pos, vocab]``, or ``[len(rows), vocab]`` at flattened ``rows``."""
        b, t = tokens.shape
        x = self.embed(tokens) + self.pos(torch.arange(t, device=tokens.device))
        for blk in self.blocks:
            blk = cast(nn.ModuleDict, blk)
            a = blk["ln1"](x)
            q, k, v = (
                blk[n](a).view(b, t, self.n_heads, self.d_head).transpose(1, 2)
                for n in ("q", "k", "v")
            )
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)  # [b, h, t, t]
            scores = scores.masked_fill(cast(torch.Tensor, self.mask)[:t, :t], float("-inf"))
            z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
            x = x + blk["o"](z)
            x = x + blk["fc_out"](self.act(blk["fc_in"](blk["ln2"](x))))
        x = self.ln_f(x)
        if rows is not None:
            return self.unembed(x.reshape(-1, x.shape[-1])[rows])
        return self.unembed(x)


def all_positions_loss(
    model: TransformerBridge, tokens: torch.Tensor, n_entities: int
) -> torch.Tensor:
    """The entity-target loss with logits computed at every position, then masked.

    How :func:`kgshatter.training.loss_fn` worked before it computed logits only where the loss
    is: kept as the benchmark's baseline (same value; gradients equal to rounding).
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs)
    mask = targets < n_entities
    return F.cross_entropy(logits[mask], targets[mask])


THROUGHPUT_VARIANTS = ("bridge", "plain", "bridge-all-logits", "bridge-bf16", "bridge-previous")


def throughput_benchmark(
    run: RunConfig,
    steps: int = 60,
    blocks: int = 6,
    threads: int | None = None,
    out: str | Path | None = None,
    variants: tuple[str, ...] = THROUGHPUT_VARIANTS,
) -> dict[str, Any]:
    """Tokens and steps per second of one training step, for each variant, side by side.

    ``bridge``: the training loop's step (:func:`kgshatter.training.loss_fn` at the run's
    precision); ``plain``: the same step on :class:`PlainDecoder`; ``bridge-all-logits``: the
    bridge with logits at every position (:func:`all_positions_loss`, the loss before logits
    were restricted to the loss positions); ``bridge-bf16``: the bridge under bfloat16
    autocast; ``bridge-previous``: the step before this benchmark's levers (all-position
    logits, TransformerLens's Python LayerNorm and its attention forward), the baseline of
    ``speedup_over_previous``.
    Timed in interleaved blocks so machine noise hits all alike; ``out``: JSON.
    """
    from kgshatter.training import loss_fn

    unknown = sorted(set(variants) - set(THROUGHPUT_VARIANTS))
    if unknown or not variants:
        raise ValueError(f"unknown benchmark variants {unknown}; allowed: {THROUGHPUT_VARIANTS}")
    if threads is not None:
        torch.set_num_threads(threads)
    graph = KnowledgeGraph.from_config(run.kg)
    sampler = WalkSampler(graph, run.walks)
    d_vocab = graph.n_entities + graph.n_relations
    n_ent = graph.n_entities
    positions = run.train.loss_positions

    def build(name: str) -> nn.Module:
        if name == "plain":
            return PlainDecoder(run.model, d_vocab)
        model = build_model(run.model, d_vocab)
        if name == "bridge-previous":
            use_native_layernorm(model, enabled=False)
            use_lean_attention(model, enabled=False)
            use_lean_normalization(model, enabled=False)
        return model

    models: dict[str, Any] = {name: build(name) for name in variants}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=run.train.lr) for k, m in models.items()}
    batches = [sampler.batch_for_step(i, run.train.batch_size, run.train.seed) for i in range(8)]
    tokens_per_step = run.train.batch_size * run.walks.n_ctx

    def compute_loss(name: str, batch: torch.Tensor) -> torch.Tensor:
        model = models[name]
        if name in ("bridge-all-logits", "bridge-previous") and positions == "entities":
            return all_positions_loss(model, batch, n_ent)
        bf16 = name == "bridge-bf16" or (name != "plain" and run.train.precision == "bfloat16")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return loss_fn(model, batch, n_ent, positions)

    def step(name: str, i: int) -> None:
        loss = compute_loss(name, batches[i % len(batches)])
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models[name].parameters(), run.train.grad_clip)
        opts[name].step()

    for name in models:  # warm-up
        for i in range(3):
            step(name, i)
    per_block = max(1, steps // blocks)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(blocks):
        for name in models:
            start = time.perf_counter()
            for i in range(per_block):
                step(name, i)
            rates[name].append(per_block / (time.perf_counter() - start))
    med = {name: statistics.median(r) for name, r in rates.items()}

    def ratio(a: str, b: str) -> float | None:
        return round(med[a] / med[b], 3) if a in med and b in med else None

    result: dict[str, Any] = {
        "preset": run.name,
        "shape": {
            "n_entities": graph.n_entities,
            "d_vocab": d_vocab,
            "d_model": run.model.d_model,
            "n_heads": run.model.n_heads,
            "d_mlp": run.model.mlp_dim,
            "n_layers": run.model.n_layers,
            "batch_size": run.train.batch_size,
            "n_ctx": run.walks.n_ctx,
        },
        "tokens_per_step": tokens_per_step,
        "steps_per_model": per_block * blocks,
        "threads": torch.get_num_threads(),
        "steps_per_second": {k: round(v, 3) for k, v in med.items()},
        "tokens_per_second": {k: round(v * tokens_per_step, 1) for k, v in med.items()},
        "steps_per_second_blocks": {k: [round(x, 3) for x in v] for k, v in rates.items()},
        "bridge_over_plain": ratio("bridge", "plain"),
        "hook_overhead": None
        if ratio("bridge", "plain") is None
        else round(1 - med["bridge"] / med["plain"], 3),
        "loss_positions_speedup": ratio("bridge", "bridge-all-logits"),
        "bf16_speedup": ratio("bridge-bf16", "bridge"),
        "speedup_over_previous": ratio("bridge", "bridge-previous"),
        "bf16_speedup_over_previous": ratio("bridge-bf16", "bridge-previous"),
        "hours_for_run_steps": {k: round(run.train.steps / v / 3600, 2) for k, v in med.items()},
        "run_steps": run.train.steps,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu": _cpu_name(),
    }
    if out is not None:
        write_json_atomic(out, result)
    return result


def _cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
