"""Editing benchmarks on pretrained shapes: ROME at GPT-2-XL's shape (time and peak memory of the
hook form against the dense weight delta) and a local pretrained checkpoint
(``kgshatter edit-benchmark --gpt2-xl / --pretrained-dir``).

Benchmarks, not tests: they print numbers and write a JSON file.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kgshatter.kg.graph import KnowledgeGraph
from kgshatter.kg.walks import WalkSampler
from kgshatter.models import (
    ModelConfig,
    build_model,
)

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


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
    config, saved and loaded by :func:`kgshatter.pretrained.loading.load_pretrained`, the model a
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

    from kgshatter.pretrained.loading import _tiny_tokenizer, load_pretrained

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
      (:func:`~kgshatter.pretrained.loading.load_pretrained`) vs plain ``transformers``
      ``from_pretrained`` of the same files (each measured once, plain first);
    - ROME with the ``gpt2-xl`` preset on the months task (a
      :class:`~kgshatter.pretrained.text.TextTask`
      whose statistics come from ``stats_tokens`` corpus tokens, computed once and cached, so
      the timed edits load them): seconds per edit and the resident-set peak during the edits
      as a multiple of the model's parameter bytes.
    """
    import gc
    import tempfile

    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from kgshatter.editing import ROME_PRESETS, CovarianceCache, compute_rome
    from kgshatter.hooks import edited
    from kgshatter.pretrained.facts import cyclic_task
    from kgshatter.pretrained.loading import TINY_TEXT, _tiny_tokenizer, load_pretrained
    from kgshatter.pretrained.text import TextCorpus, TextTask

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
