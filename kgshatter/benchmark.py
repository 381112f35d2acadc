"""Training throughput: the TransformerBridge model vs a plain PyTorch decoder of the same shape.

Both are trained by the same step (same batches, loss, AdamW and clipping), timed in interleaved
blocks so that machine noise hits both alike. The ratio is the cost of the hook machinery.
This is a benchmark, not a test: it prints numbers and writes a JSON file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
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


def edit_benchmark(
    run_dir: str,
    methods: list[str],
    n_edits: int = 50,
    distances: tuple[int, ...] = (1, 2, 3, 4),
    seed: int = 0,
    max_queries: int | None = 300,
    n_samples: int = 100_000,
    progress: bool = True,
) -> dict[str, Any]:
    """Efficacy, latency and collateral of each method over ``n_edits`` counterfactual edits.

    The edits cycle through ``distances`` (single-edit protocol, pristine model each time).
    Second moments are computed once per layer, timed, and kept in memory (the first edit that
    needs a layer pays for it; its time is reported separately as ``stats_seconds``).
    """
    from kgshatter.editing import SyntheticTask, TargetConfig, get_method, model_identity
    from kgshatter.editing.protocols import EditScorer, run_protocol, sample_requests
    from kgshatter.evaluate import Evaluator
    from kgshatter.training import load_run

    run, graph, model, _ = load_run(run_dir)
    model.eval()
    specs = [get_method(m) for m in methods]  # typos fail before any work
    sampler = WalkSampler(graph, run.walks)
    task = SyntheticTask(sampler, cache=None)
    model_id = model_identity(model)
    configs = {s.name: s.config_with_samples("synthetic", n_samples) for s in specs}
    stats_seconds = {}
    layers = {
        layer
        for name, c in configs.items()
        if isinstance(c, TargetConfig)
        for layer in c.edit_layers
    }
    for layer in sorted(layers):  # computed fresh (no disk cache) so the time is honest
        start = time.perf_counter()
        task.stats(model, layer, n_samples, 0, model_id)
        stats_seconds[str(layer)] = time.perf_counter() - start
    scorer = EditScorer(model, Evaluator.for_run(run, graph, max_queries=max_queries))
    per_d = [
        n_edits // len(distances) + (i < n_edits % len(distances)) for i in range(len(distances))
    ]
    requests = [
        r
        for d, k in zip(distances, per_d, strict=True)
        for r in sample_requests(graph, "counterfactual", k, seed + d, distance=d)
    ]
    results: dict[str, Any] = {
        "run_dir": str(run_dir),
        "n_edits": len(requests),
        "distances": list(distances),
        "threads": torch.get_num_threads(),
        "stats_seconds": stats_seconds,
        "stats_samples": n_samples,
        "methods": {},
    }
    for spec in specs:
        res = run_protocol(
            model,
            task,
            spec,
            configs[spec.name],
            requests,
            "single",
            scorer,
            model_id=model_id,
            progress=progress,
        )
        rows = [r.to_dict() for r in res.scored()]
        seconds = sorted(r["seconds"] for r in rows)
        change = {
            split: statistics.fmean(r["accuracy_change"][split]["all"] for r in rows)
            for split in rows[0]["accuracy_change"]
        }
        by_d = {
            str(d): statistics.fmean(
                r["efficacy"] for r in rows if r["requests"][0]["distance"] == d
            )
            for d in distances
        }
        change_by_d = {
            str(d): {
                split: statistics.fmean(
                    r["accuracy_change"][split]["all"]
                    for r in rows
                    if r["requests"][0]["distance"] == d
                )
                for split in change
            }
            for d in distances
        }
        results["methods"][spec.name] = {
            "efficacy": statistics.fmean(r["efficacy"] for r in rows),
            "efficacy_by_distance": by_d,
            "accuracy_change_by_distance": change_by_d,
            "skipped": len(res.records) - len(rows),
            "median_seconds": seconds[len(seconds) // 2],
            "max_seconds": seconds[-1],
            "mean_accuracy_change": change,
        }
    return results


@contextmanager
def without_shortcuts() -> Iterator[None]:
    """Every forward pass as TransformerLens computes it: no prompt-prefix shortcut
    (:func:`kgshatter.editing.prefix.disabled`), no last block over the read positions only
    (:func:`kgshatter.readout.disabled`), TransformerLens's own attention
    and normalisation forwards (:func:`kgshatter.models.native_forwards`). The same values up
    to float rounding."""
    from kgshatter import readout
    from kgshatter.editing import prefix
    from kgshatter.models import native_forwards

    with prefix.disabled(), readout.disabled(), native_forwards():
        yield


def sweep_benchmark(
    run_dir: str | Path,
    config: Any = None,
    batches: tuple[int, ...] = (1, 12),
    out: str | Path | None = None,
) -> dict[str, Any]:
    """The editing sweep's edits per second at each ``edit_batch``, with and without the
    forward-pass shortcuts (``"B"`` and ``"B-no-shortcuts"``, the latter inside
    :func:`without_shortcuts`: the prompt-prefix shortcut of the target optimisation, the
    last block computed only where it is read, the lean attention), side by side on the
    same rows, and how far their ``table.csv`` values differ from the first variant's
    (``seconds`` excluded). Statistics are computed once beforehand (cached in the run
    directory), so none pays for them. Speed-ups are over ``"<first batch>-no-shortcuts"``,
    the sweep without any lever (the prompts of the scorer are kept in every variant)."""
    import csv
    import shutil
    import tempfile

    from kgshatter.sweep import SweepConfig, run_sweep

    config = config or SweepConfig(kinds=("counterfactual",), sequential_edits=0)
    results: dict[str, Any] = {"run_dir": str(run_dir), "sweep": config.to_dict(), "batches": {}}
    tables = {}
    variants = [(f"{b}-no-shortcuts", b, False) for b in batches]
    variants += [(str(b), b, True) for b in batches]
    work = Path(tempfile.mkdtemp(prefix="kgshatter-sweep-bench-"))
    try:
        warm = SweepConfig.from_dict({**config.to_dict(), "n_edits": 1, "distances": [1]})
        run_sweep(run_dir, work / "warm", warm, progress=False)  # statistics into the cache
        for name, b, shortcut in variants:
            start = time.perf_counter()
            with nullcontext() if shortcut else without_shortcuts():
                res = run_sweep(run_dir, work / name, config, progress=False, edit_batch=b)
            seconds = time.perf_counter() - start
            n = sum(1 for r in res.rows if "efficacy" in r)
            results["batches"][name] = {
                "seconds": round(seconds, 2),
                "edits": n,
                "edits_per_second": round(n / seconds, 3),
                "edit_batch": b,
                "shortcuts": shortcut,
            }
            with open(work / name / "table.csv", newline="") as f:
                tables[name] = list(csv.DictReader(f))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base, *others = [name for name, _, _ in variants]
    diffs = {}
    for name in others:
        worst = 0.0
        for r0, r1 in zip(tables[base], tables[name], strict=True):
            for k, v in r0.items():
                if k == "seconds" or v == r1[k]:
                    continue
                try:
                    worst = max(worst, abs(float(v) - float(r1[k])))
                except ValueError:
                    worst = math.inf  # a non-numeric cell differs
        diffs[name] = worst
    rates = {name: results["batches"][name]["edits_per_second"] for name, _, _ in variants}
    results["speedup"] = {name: round(rates[name] / rates[base], 3) for name in others}
    results["max_abs_table_difference"] = diffs
    results["threads"] = torch.get_num_threads()
    if out is not None:
        write_json_atomic(out, results)
    return results


GPT2_XL_SHAPE = ModelConfig(
    n_layers=48, d_model=1600, n_heads=25, d_mlp=6400, n_ctx=1024, act_fn="gelu_new"
)
GPT2_XL_VOCAB = 50257


def _rss_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


GPT2_XL_SOURCES = ("huggingface", "native")


def gpt2_xl_rome_benchmark(
    n_edits: int = 2,
    stats_samples: int = 64,
    prompt_len: int = 10,
    cache_dir: str | None = None,
    source: str = "huggingface",
) -> dict[str, Any]:
    """ROME on a model of GPT-2-XL's exact shape (random weights, built here) on this machine.

    ``source="huggingface"`` (default): a Hugging Face ``GPT2LMHeadModel`` of GPT-2-XL's
    config, saved and loaded by :func:`kgshatter.pretrained.load_pretrained`, the model a
    researcher edits; ``source="native"``: the TransformerLens-native bridge of the same shape
    (untied head). Every edit is timed with the prompt-prefix shortcut
    (:mod:`kgshatter.editing.prefix`) and without it (inside
    :func:`~kgshatter.editing.prefix.disabled`), alternating, so the ratio is side by side.

    The same code path as the synthetic study: the prompts are walks over a small graph whose
    tokens are ids in GPT-2's vocabulary, the edit is computed with the ``gpt2-xl`` ROME preset
    (layer 17, 20 steps, 21 prompts) and applied as hooks. Statistics come from
    ``stats_samples`` walks (a small sample: the timing, not the quality, is measured here), are
    computed once and cached on disk; the timed edits load them from the cache. Peak memory is
    the process's resident-set high-water mark during the edits (reset before them), divided by
    the model's parameter bytes.
    """
    import gc
    import tempfile

    from kgshatter.editing import (
        ROME_PRESETS,
        CovarianceCache,
        SyntheticTask,
        compute_rome,
        model_identity,
    )
    from kgshatter.editing import prefix as prefix_cache
    from kgshatter.editing.protocols import sample_requests
    from kgshatter.hooks import edited
    from kgshatter.kg.config import KGConfig
    from kgshatter.kg.walks import WalkConfig

    if source not in GPT2_XL_SOURCES:
        raise ValueError(f"source must be one of {GPT2_XL_SOURCES}, got {source!r}")
    rss_start = _rss_kib("VmRSS")
    start = time.perf_counter()
    # the loaded weights may map the checkpoint's files; the mapping outlives the folder
    with tempfile.TemporaryDirectory() as checkpoint:
        if source == "native":
            model = build_model(GPT2_XL_SHAPE, GPT2_XL_VOCAB)
            checkpoint_bytes = None
        else:
            model = _hf_gpt2_xl(checkpoint)
            checkpoint_bytes = sum(f.stat().st_size for f in Path(checkpoint).glob("*.safetensors"))
    model.eval()
    gc.collect()
    build_seconds = time.perf_counter() - start
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    graph = KnowledgeGraph.from_config(KGConfig(n_entities=32, n_orders=2, max_hops=2, seed=0))
    sampler = WalkSampler(graph, WalkConfig(n_ctx=prompt_len))
    config = dataclasses.replace(ROME_PRESETS["gpt2-xl"], n_samples=stats_samples)
    start = time.perf_counter()
    model_id = model_identity(model)
    identity_seconds = time.perf_counter() - start
    variants = ["prefix_cache", "full_positions"]
    with tempfile.TemporaryDirectory() as tmp:
        cache = CovarianceCache(cache_dir or tmp)
        start = time.perf_counter()
        SyntheticTask(sampler, cache).stats(model, config.layer, stats_samples, 0, model_id)
        stats_seconds = time.perf_counter() - start
        requests = sample_requests(graph, "counterfactual", n_edits, seed=0, distance=2)
        rss_before = _rss_kib("VmRSS")
        peak_reset = _reset_peak()
        seconds: dict[str, list[float]] = {v: [] for v in variants}
        efficacy: dict[str, list[float]] = {v: [] for v in variants}
        differences = []  # per request: how far the shortcut's weight delta is from the other
        for request in requests:
            deltas: dict[str, torch.Tensor] = {}  # one request's, so the peak holds two at most
            for variant in variants:
                task = SyntheticTask(sampler, cache)  # fresh: statistics come from the disk cache
                off = prefix_cache.disabled() if variant == "full_positions" else nullcontext()
                start = time.perf_counter()
                with off:
                    edit = compute_rome(model, task, request, config, model_id=model_id)
                seconds[variant].append(time.perf_counter() - start)
                deltas[variant] = edit.deltas[0].dense
                tokens = task.prompts(request, 4, seed=99)[0].tokens
                with torch.inference_mode(), edited(model, edit):
                    hit = model(tokens)[:, -1].argmax(-1) == request.target
                    efficacy[variant].append(float(hit.float().mean()))
            a, b = deltas["prefix_cache"], deltas["full_positions"]
            differences.append(float((a - b).norm() / b.norm().clamp(min=1e-12)))
        peak = _rss_kib("VmHWM")
    medians = {v: statistics.median(t) for v, t in seconds.items()}
    result: dict[str, Any] = {
        "source": source,
        "shape": GPT2_XL_SHAPE.to_dict() | {"d_vocab": GPT2_XL_VOCAB},
        "tied_embeddings": source == "huggingface",
        "parameters": sum(p.numel() for p in model.parameters()),
        "model_bytes": model_bytes,
        "threads": torch.get_num_threads(),
        "build_seconds": build_seconds,
        "identity_seconds": identity_seconds,
        "stats_seconds": stats_seconds,
        "stats_samples": stats_samples,
        "prompt_len": prompt_len,
        "config": config.to_dict(),
        "seconds_per_edit": seconds,
        "median_seconds_per_edit": medians[variants[0]],
        "median_seconds": medians,
        "cache_hits": cache.hits,
        "efficacy_random_model": efficacy,  # fraction of 4 prompts; a random model, not a goal
        "peak_reset": peak_reset,
        "rss_before_model_bytes": rss_start * 1024,
        "rss_before_edits_bytes": rss_before * 1024,
        "peak_bytes": peak * 1024,
        "peak_over_model": peak * 1024 / model_bytes,
        "peak_above_start_over_model": (peak - rss_start) * 1024 / model_bytes,
    }
    if checkpoint_bytes is not None:  # the bridge holds split q/k/v copies beside c_attn
        result["checkpoint_bytes"] = checkpoint_bytes
        result["peak_over_checkpoint"] = peak * 1024 / checkpoint_bytes
    result["speedup_prefix_cache"] = medians["full_positions"] / medians["prefix_cache"]
    result["target_delta_rel_difference"] = max(differences)
    return result


def _hf_gpt2_xl(checkpoint: str) -> TransformerBridge:
    """A random Hugging Face GPT-2 of GPT-2-XL's config (seed 0), through the loader."""
    import gc

    from transformers import GPT2Config, GPT2LMHeadModel

    from kgshatter.pretrained import _tiny_tokenizer, load_pretrained

    shape = GPT2_XL_SHAPE
    config = GPT2Config(
        n_layer=shape.n_layers, n_embd=shape.d_model, n_head=shape.n_heads,
        n_inner=shape.d_mlp, n_positions=shape.n_ctx, vocab_size=GPT2_XL_VOCAB,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = GPT2LMHeadModel(config)
    hf.save_pretrained(checkpoint)
    del hf
    gc.collect()
    _tiny_tokenizer("byte").save_pretrained(checkpoint)
    return load_pretrained(checkpoint).model


def pretrained_benchmark(
    checkpoint_dir: str | os.PathLike[str],
    n_edits: int = 1,
    stats_tokens: int = 2048,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Through the pretrained loader: a random checkpoint with GPT-2-XL's exact config, saved
    to ``checkpoint_dir`` (once; ~6.5 GB), then

    - loading overhead: seconds from the directory to a ready hookable model
      (:func:`~kgshatter.pretrained.load_pretrained`) vs plain ``transformers``
      ``from_pretrained`` of the same files (each measured once, plain first);
    - ROME with the ``gpt2-xl`` preset on the months task (a :class:`~kgshatter.text.TextTask`
      whose statistics come from ``stats_tokens`` corpus tokens, computed once and cached, so
      the timed edits load them): seconds per edit and the resident-set peak during the edits
      as a multiple of the model's parameter bytes.
    """
    import gc
    import tempfile

    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from kgshatter.editing import ROME_PRESETS, CovarianceCache, compute_rome
    from kgshatter.hooks import edited
    from kgshatter.naturalistic import cyclic_task
    from kgshatter.pretrained import TINY_TEXT, _tiny_tokenizer, load_pretrained
    from kgshatter.text import TextCorpus, TextTask

    path = Path(checkpoint_dir)
    result: dict[str, Any] = {"threads": torch.get_num_threads()}
    if not (path / "config.json").is_file():
        start = time.perf_counter()
        config = GPT2Config(n_embd=1600, n_layer=48, n_head=25, n_positions=1024)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            hf = GPT2LMHeadModel(config)
        hf.save_pretrained(path)
        # an offline byte-level BPE (ids < 600 of GPT-2's 50257): real GPT-2's tokenizer files
        # cannot be downloaded here, and the timing does not depend on which ids are used
        _tiny_tokenizer("byte").save_pretrained(path)
        del hf
        gc.collect()
        result["write_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    plain = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    result["plain_load_seconds"] = time.perf_counter() - start
    del plain
    gc.collect()
    start = time.perf_counter()
    pm = load_pretrained(path)
    result["load_seconds"] = time.perf_counter() - start
    result["load_ratio"] = result["load_seconds"] / result["plain_load_seconds"]
    model = pm.model
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result |= {"parameters": pm.n_parameters, "model_bytes": model_bytes,
               "estimated_bytes": pm.estimated_bytes}  # fmt: skip
    task = cyclic_task("months", pm.tokenizer)
    rome_config = dataclasses.replace(ROME_PRESETS["gpt2-xl"], n_samples=stats_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        cache = CovarianceCache(cache_dir or tmp)
        corpus = TextCorpus(TINY_TEXT * 200, "tiny-text")
        start = time.perf_counter()
        TextTask(model, pm.tokenizer, corpus, cache, seq_len=64).stats(
            model, rome_config.layer, rome_config.n_samples, rome_config.seed, pm.model_id
        )
        result["stats_seconds"] = time.perf_counter() - start
        requests = task.counterfactuals(n_edits, seed=0, distance=2)
        rss_before = _rss_kib("VmRSS")
        peak_reset = _reset_peak()
        seconds, success = [], []
        for request in requests:
            text_task = TextTask(model, pm.tokenizer, corpus, cache, seq_len=64)
            start = time.perf_counter()
            edit = compute_rome(model, text_task, request, rome_config, model_id=pm.model_id)
            seconds.append(time.perf_counter() - start)
            with edited(model, edit):
                success.append(task.success(model, request))
        peak = _rss_kib("VmHWM")
    return result | {
        "edit_seconds": seconds,
        "median_edit_seconds": sorted(seconds)[len(seconds) // 2],
        "success": success,
        "rss_before_edits_bytes": rss_before * 1024,
        "peak_rss_bytes": peak * 1024,
        "peak_over_model": peak * 1024 / model_bytes,
        "peak_reset": peak_reset,
    }
