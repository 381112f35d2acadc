"""ROME's target optimisation, kgshatter against the paper's algorithm in plain PyTorch.

One random GPT-2 is built as a Hugging Face model; a copy of the same weights is saved and
loaded as a TransformerBridge by :func:`kgshatter.pretrained.loading.load_pretrained`. On
the same prompts, with the same hyperparameters and the same number of updates, this times

- ``plain``: the algorithm of Meng et al. 2022 (ROME, section 3.1 and appendix; kmeng01/rome's
  ``compute_v``) written out here with a ``torch`` forward hook on the Hugging Face MLP: a free
  vector added to the MLP output of layer ``layer`` at the subject's last token of every prompt;
  loss = mean NLL of the target over the rewriting prompts + KL on the essence prompt (read at
  its subject) + weight decay ``||delta|| / ||h0||^2`` with ``h0`` the bare prompt's output;
  ``steps`` passes of which the last only evaluates; clamp ``||delta|| <= c ||h0||``;
- ``kgshatter``: :func:`kgshatter.editing.targets.optimize_targets` in reference mode on the
  bridge, with and without starting at the edited block (``skip_frozen``),

interleaved (plain, kgshatter, kgshatter without the skip, then again) so machine noise hits
all alike, and checks the three deltas agree; then the sampling of a text task's context
prefixes (:func:`kgshatter.pretrained.text.sample_text`) with and without the KV cache. This is a
benchmark, not a test: it returns numbers (``kgshatter edit-benchmark --rome-reference``
prints them and writes JSON).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F

from kgshatter.editing.core import Prompts

# GPT-2 small's shape; ROME's layer at GPT-2-XL's relative depth (17 of 48)
SMALL_GPT2 = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024}


def _plain_delta(
    hf: Any,
    layer: int,
    batch: torch.Tensor,
    lookup: torch.Tensor,
    answer_at: torch.Tensor,
    n_rewrite: int,
    target: int,
    options: dict[str, Any],
) -> torch.Tensor:
    """The paper's loop on the Hugging Face model (module docstring); returns the delta."""
    mlp = hf.transformer.h[layer].mlp
    rows = torch.arange(len(batch))
    seen: dict[str, torch.Tensor] = {}
    delta: torch.Tensor | None = None

    def hook(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if delta is None:
            seen["h"] = output[rows, lookup].detach()
            return output
        out = output.clone()
        out[rows, lookup] = out[rows, lookup] + delta
        return out

    handle = mlp.register_forward_hook(hook)
    try:
        with torch.no_grad():
            hf(batch)
        h0 = seen["h"][0]
        delta = torch.zeros_like(h0, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=options["lr"])
        init_kl = None
        for it in range(options["steps"]):
            opt.zero_grad()
            logits = hf(batch).logits
            kl_logp = torch.log_softmax(logits[rows[n_rewrite:], lookup[n_rewrite:]], -1)
            if init_kl is None:
                init_kl = kl_logp.detach().clone()
            logp = torch.log_softmax(logits[rows[:n_rewrite], answer_at], -1)
            nll = -logp[:, target].mean()
            kl = F.kl_div(init_kl, kl_logp, log_target=True, reduction="batchmean")
            decay = delta.norm() / h0.norm() ** 2
            loss = nll + options["kl_factor"] * kl + options["weight_decay"] * decay
            if loss < 5e-2 or it == options["steps"] - 1:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                limit = options["clamp_norm_factor"] * h0.norm()
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
    finally:
        handle.remove()
    return delta.detach()


def rome_reference_benchmark(
    shape: dict[str, int] | None = None,
    layer: int | None = None,
    n_prompts: int = 21,
    prompt_len: int = 10,
    steps: int = 20,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Seconds per target optimisation: plain PyTorch on Hugging Face vs kgshatter's bridge.

    ``shape`` holds ``GPT2Config`` fields (default GPT-2 small's); ``layer`` defaults to
    GPT-2-XL's relative depth (17 / 48). Prompts: ``n_prompts`` random rewriting prompts of
    ``prompt_len`` tokens (the first shorter, like the bare prompt; all right-padded) and one
    essence prompt; the target is a random token. Returns medians over ``repeats`` rounds,
    the ratios to ``plain`` and the largest relative difference between the deltas.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from kgshatter.editing.targets import optimize_targets
    from kgshatter.pretrained.loading import _tiny_tokenizer, load_pretrained
    from kgshatter.pretrained.text import sample_text

    fields: dict[str, Any] = dict(SMALL_GPT2 if shape is None else shape)
    config = GPT2Config(**fields)
    n_layer = config.n_layer
    layer = round(n_layer * 17 / 48) if layer is None else layer
    if not 0 <= layer < n_layer:
        raise ValueError(f"layer must be in 0..{n_layer - 1}, got {layer}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = GPT2LMHeadModel(config).eval()
        hf.set_attn_implementation("eager")  # what the bridge runs; SDPA drifts by ~1e-3
        gen = torch.Generator().manual_seed(seed)
        vocab = config.vocab_size
        tokens = torch.randint(0, vocab, (n_prompts, prompt_len), generator=gen)
        essence = torch.randint(0, vocab, (1, 4), generator=gen)
        target = int(torch.randint(0, vocab, (1,), generator=gen))
    with tempfile.TemporaryDirectory() as tmp:  # through the loader, as a checkpoint is
        hf.save_pretrained(tmp)
        _tiny_tokenizer("byte").save_pretrained(tmp)
        loaded = load_pretrained(tmp)
        bridge, tokenizer = loaded.model, loaded.tokenizer
    hf.requires_grad_(False)
    # the bare prompt: the first row, cut to 4 tokens and right-padded (padding follows `last`)
    last = torch.full((n_prompts,), prompt_len - 1)
    last[0] = 3
    subject = last - 2
    rewrite = Prompts(tokens, last, subject)
    ess = Prompts(essence, torch.tensor([3]), torch.tensor([1]))
    batch = torch.cat([tokens, torch.cat([essence, essence[:, -1:].expand(-1, prompt_len - 4)], 1)])
    lookup = torch.cat([subject, ess.subject])
    options = {
        "steps": steps,
        "lr": 0.5,
        "kl_factor": 0.0625,
        "weight_decay": 0.5,
        "clamp_norm_factor": 4.0,
    }  # fmt: skip  (ROME's gpt2-xl hyperparameters)
    hook = f"blocks.{layer}.hook_mlp_out"
    times: dict[str, list[float]] = {"plain": [], "kgshatter": [], "kgshatter-full-passes": []}
    deltas: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for name in times:
            start = time.perf_counter()
            if name == "plain":
                delta = _plain_delta(hf, layer, batch, lookup, last, n_prompts, target, options)
            else:
                delta = optimize_targets(
                    bridge, [hook], rewrite, target, ess, **options, position="subject",
                    reference=True, skip_frozen=name == "kgshatter",
                ).delta  # fmt: skip
            times[name].append(time.perf_counter() - start)
            deltas[name] = delta
    medians = {k: statistics.median(v) for k, v in times.items()}
    ref = deltas["plain"]
    # the context prefixes a text task samples from the model, with and without the KV cache
    sampling: dict[str, float] = {}
    texts = {}
    for use_cache in (True, False):
        start = time.perf_counter()
        texts[use_cache] = sample_text(bridge, tokenizer, 20, 10, seed, use_cache=use_cache)
        sampling["kv_cache" if use_cache else "full_passes"] = time.perf_counter() - start
    return {
        "shape": fields,
        "parameters": sum(p.numel() for p in hf.parameters()),
        "layer": layer,
        "rows_per_pass": len(batch),
        "prompt_len": prompt_len,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "seconds": times,
        "median_seconds": medians,
        "ratio_over_plain": {k: medians[k] / medians["plain"] for k in medians},
        "delta_rel_difference": {
            k: float((d - ref).norm() / ref.norm().clamp(min=1e-12)) for k, d in deltas.items()
        },
        "prefix_sampling_seconds": sampling,  # 20 prefixes of 10 tokens
        "prefix_sampling_speedup": sampling["full_passes"] / sampling["kv_cache"],
        "prefix_sampling_same_texts": texts[True] == texts[False],
    }
