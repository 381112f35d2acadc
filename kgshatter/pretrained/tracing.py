"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", and
the representation-shattering paper's appendix): where a pretrained model computes a fact.

For each prompt the subject's token embeddings are corrupted with Gaussian noise (``noise``
times the standard deviation of the model's embedding entries; ROME uses 3 x the subject
embeddings' spread), and the clean hidden state of one component at one (layer, token) is
restored into the corrupted run. The *indirect effect* there is how much of the correct
answer's probability the restoration brings back:

    effect = p(answer | corrupted, state restored) - p(answer | corrupted)

Three kinds of state, as ROME's figures: ``"resid"`` (the residual stream after the block),
``"mlp"`` and ``"attn"`` (the block's MLP / attention output, restored over a ``window`` of
consecutive layers centred on the layer, ROME's window 10 for GPT-2-XL's 48 layers). ROME
chooses the edited layer where restoring the MLP at the subject's last token matters most
(:meth:`TraceResult.best_layer`).

Tokens before the subject are not changed by the corruption (the models are causal), so only
tokens from the subject's first one on are restored; the rest read as no effect. Per prompt,
tokens are grouped as ROME's figures group them (:data:`TOKEN_GROUPS`) and the groups averaged
over prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from kgshatter.pretrained.text import continuation_tokens, subject_last_token
from kgshatter.validation import check_choice, check_float, check_int

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

KINDS = {"resid": "blocks.{}.hook_resid_post", "mlp": "blocks.{}.hook_mlp_out",
         "attn": "blocks.{}.hook_attn_out"}  # fmt: skip
TOKEN_GROUPS = (
    "subject first",
    "subject middle",
    "subject last",
    "first after subject",
    "further tokens",
    "last token",
)


@dataclass(frozen=True)
class TracePrompt:
    """One fact to trace: ``prompt.format(subject)`` should be continued by ``answer``."""

    prompt: str
    subject: str
    answer: str


@dataclass(frozen=True)
class TraceResult:
    """Mean indirect effects, ``effects[kind]`` of shape (layer, token group); ``clean`` and
    ``corrupted``: the answer's mean probability without noise and with it; ``counts``: how many
    prompts have each token group (a group no prompt has reads NaN)."""

    effects: dict[str, np.ndarray]
    clean: float
    corrupted: float
    counts: tuple[int, ...]
    n_prompts: int
    noise: float
    window: int

    def best_layer(self, kind: str = "mlp", group: str = "subject last") -> int:
        """The layer whose restored ``kind`` at ``group`` brings back most (ROME's choice)."""
        check_choice("kind", kind, tuple(self.effects))
        check_choice("group", group, TOKEN_GROUPS)
        return int(np.nanargmax(self.effects[kind][:, TOKEN_GROUPS.index(group)]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": list(TOKEN_GROUPS),
            "effects": {k: np.round(v, 6).tolist() for k, v in self.effects.items()},
            "clean": self.clean,
            "corrupted": self.corrupted,
            "counts": list(self.counts),
            "n_prompts": self.n_prompts,
            "noise": self.noise,
            "window": self.window,
            "best_mlp_layer": self.best_layer("mlp") if "mlp" in self.effects else None,
        }


def _token_groups(n_tokens: int, first: int, last: int) -> list[int | None]:
    """Each token's group index (None: before the subject, never restored)."""
    groups: list[int | None] = []
    for t in range(n_tokens):
        if t == n_tokens - 1:
            groups.append(5)
        elif t < first:
            groups.append(None)
        elif t == last:
            groups.append(2)
        elif t == first:
            groups.append(0)
        elif t < last:
            groups.append(1)
        elif t == last + 1:
            groups.append(3)
        else:
            groups.append(4)
    return groups


@torch.inference_mode()
def causal_trace(
    model: TransformerBridge,
    tokenizer: Any,
    prompts: Sequence[TracePrompt],
    *,
    kinds: Sequence[str] = ("resid", "mlp", "attn"),
    noise: float = 3.0,
    n_noise: int = 5,
    window: int | None = None,
    seed: int = 0,
) -> TraceResult:
    """Trace each prompt's answer (its first token) through every layer and token (see the
    module). ``n_noise`` noise draws per prompt (seeded, the same draws for every restoration:
    ROME's layout); ``window``: layers restored together for ``"mlp"`` / ``"attn"`` (default
    5, or every layer of a model with fewer)."""
    if not prompts:
        raise ValueError("causal_trace needs at least one prompt")
    for k in kinds:
        check_choice("kind", k, tuple(KINDS))
    check_float("noise", noise, 0.0, inclusive=False)
    check_int("n_noise", n_noise, 1)
    n_layers = model.cfg.n_layers
    window = min(5, n_layers) if window is None else window
    check_int("window", window, 1, n_layers)
    device = next(model.parameters()).device
    emb = model.W_E if hasattr(model, "W_E") else model.embed.W_E
    scale = noise * float(emb.float().std())
    g = torch.Generator().manual_seed(seed)
    hook_names = {KINDS[k].format(layer) for k in kinds for layer in range(n_layers)}
    sums = {k: np.zeros((n_layers, len(TOKEN_GROUPS))) for k in kinds}
    counts = np.zeros(len(TOKEN_GROUPS), dtype=int)
    clean_p, corrupt_p = [], []
    for tp in prompts:
        text = tp.prompt.format(tp.subject)
        start = tp.prompt.index("{}")
        ids, last_subj = subject_last_token(tokenizer, text, start, start + len(tp.subject))
        first_subj = subject_last_token(tokenizer, text, start, start + 1)[1]
        answer = continuation_tokens(tokenizer, text, tp.answer)[0]
        tokens = torch.tensor([ids], device=device)
        n_tok = tokens.shape[1]
        groups = _token_groups(n_tok, first_subj, last_subj)
        # the clean run: every state that may be restored
        clean: dict[str, torch.Tensor] = {}

        def keep(act: torch.Tensor, hook: Any, clean: dict[str, torch.Tensor] = clean) -> None:
            clean[hook.name] = act[0].clone()

        logits = model.run_with_hooks(tokens, fwd_hooks=[(n, keep) for n in hook_names])
        canonical = {n: str(model.hook_dict[n].name) for n in hook_names}
        clean_p.append(float(torch.softmax(logits[0, -1].float(), -1)[answer]))
        restorable = [t for t in range(n_tok) if groups[t] is not None]
        # one row per (layer, token): restore that state (the kind's window) in that row; the
        # same rows for every noise draw
        pairs = [(layer, t) for layer in range(n_layers) for t in restorable]
        restore = {
            k: [(canonical[KINDS[k].format(j)], row, t, clean[canonical[KINDS[k].format(j)]][t])
                for row, (layer, t) in enumerate(pairs)
                for j in ([layer] if k == "resid" else _window(layer, window, n_layers))]
            for k in kinds
        }  # fmt: skip
        draws = torch.randn(n_noise, last_subj - first_subj + 1, emb.shape[-1], generator=g)
        corrupted_here = []
        effects = {k: np.zeros((n_layers, n_tok)) for k in kinds}
        for draw in draws:
            base = _run_corrupted(model, tokens, first_subj, draw * scale, [], answer)
            corrupted_here.append(base)
            for k in kinds:
                probs = _run_corrupted(model, tokens.expand(len(pairs), -1), first_subj,
                                       draw * scale, restore[k], answer)  # fmt: skip
                for row, (layer, t) in enumerate(pairs):
                    effects[k][layer, t] += float(probs[row]) - base
        corrupt_p.append(float(np.mean(corrupted_here)))
        for k in kinds:
            effects[k] /= n_noise
            for grp in range(len(TOKEN_GROUPS)):
                cols = [t for t in range(n_tok) if groups[t] == grp]
                if cols:
                    sums[k][:, grp] += effects[k][:, cols].mean(1)
        for grp in range(len(TOKEN_GROUPS)):
            counts[grp] += any(groups[t] == grp for t in range(n_tok))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = {
            k: np.where(counts > 0, v / np.maximum(counts, 1), np.nan) for k, v in sums.items()
        }
    return TraceResult(
        effects=means,
        clean=float(np.mean(clean_p)),
        corrupted=float(np.mean(corrupt_p)),
        counts=tuple(int(c) for c in counts),
        n_prompts=len(prompts),
        noise=noise,
        window=window,
    )


def _window(layer: int, window: int, n_layers: int) -> list[int]:
    lo = max(0, min(layer - window // 2, n_layers - window))
    return list(range(lo, lo + window))


def _run_corrupted(
    model: TransformerBridge,
    tokens: torch.Tensor,
    first: int,
    delta: torch.Tensor,
    restore: Sequence[tuple[str, int, int, torch.Tensor]],
    answer: int,
) -> Any:
    """The answer's probability (per row) with ``delta`` added to the subject's embeddings and
    each ``(hook, row, token, clean state)`` written back."""
    delta = delta.to(tokens.device)

    def corrupt(act: torch.Tensor, hook: Any) -> torch.Tensor:
        act = act.clone()
        act[:, first : first + delta.shape[0]] += delta.to(act.dtype)
        return act

    by_hook: dict[str, list[tuple[int, int, torch.Tensor]]] = {}
    for name, row, t, state in restore:
        by_hook.setdefault(name, []).append((row, t, state))

    def put(act: torch.Tensor, hook: Any) -> torch.Tensor:
        items = by_hook[hook.name]
        act = act.clone()
        rows = torch.tensor([r for r, _, _ in items], device=act.device)
        cols = torch.tensor([t for _, t, _ in items], device=act.device)
        act[rows, cols] = torch.stack([s for _, _, s in items]).to(act.dtype)
        return act

    hooks: list[Any] = [("hook_embed", corrupt), *[(n, put) for n in by_hook]]
    logits = model.run_with_hooks(tokens, fwd_hooks=cast(list[Any], hooks))
    probs = torch.softmax(logits[:, -1].float(), -1)[:, answer].cpu()
    return probs if len(restore) else float(probs[0])


def trace_figure(result: TraceResult, title: str) -> Any:
    """ROME's heatmaps: one panel per kind, layers across, token groups down."""
    from kgshatter.plotting import pyplot

    plt = pyplot()
    kinds = list(result.effects)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.2), squeeze=False)
    cmaps = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
    for ax, k in zip(axes[0], kinds, strict=True):
        im = ax.imshow(result.effects[k].T, aspect="auto", cmap=cmaps[k], vmin=0)
        ax.set_yticks(range(len(TOKEN_GROUPS)), TOKEN_GROUPS, fontsize=7)
        ax.set_xlabel("layer")
        label = "residual stream" if k == "resid" else f"{k} (window {result.window})"
        ax.set_title(f"restoring {label}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(
        f"{title}: indirect effect on p(answer) (clean {result.clean:.2f}, corrupted "
        f"{result.corrupted:.2f}; {result.n_prompts} prompts)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig
