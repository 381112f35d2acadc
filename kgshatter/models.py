"""Model configs and construction: small GPT-style decoders as TransformerLens hooked transformers.

TransformerLens 4 replaced ``HookedTransformer`` with ``TransformerBridge``; a model trained from
scratch is ``TransformerBridge.boot_native(TransformerBridgeConfig(...))``, with the same hook
names (``blocks.0.mlp.hook_post``, ``blocks.1.hook_resid_post``, ...) and the same user API
(``run_with_cache``, ``run_with_hooks``, ``hooks()``).
"""

from __future__ import annotations

import functools
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kgshatter.validation import ConfigDict, check_bool, check_choice, check_int, resolve_device

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

ACT_FNS = ("gelu", "relu", "gelu_new", "silu")
NORMALIZATIONS = ("LN", "RMS")
LAYER0_ATTENTION = ("causal", "self")
EMBED_KEY, UNEMBED_KEY = "embed.weight", "unembed.weight"


@dataclass(frozen=True, kw_only=True)
class ModelConfig(ConfigDict):
    """Shape of the decoder (paper: 2 layers, context 16; width and heads are *(choice)*).

    ``d_vocab`` is not here: it follows from the graph (entities + relations).

    ``layer0_attention="self"`` (an experiment, not the paper's model) makes every token of the
    first block attend only to itself, through a permanent hook on
    ``blocks.0.attn.hook_pattern``. The subject's information then reaches the relation token
    only through a later attention layer, after the first MLP has processed it at the subject
    token: the routing the paper's subject-token edits assume. The standard model copies the
    subject's embedding in layer 0 instead (docs/shattering.md).

    ``tied_embeddings=True`` makes the unembedding the transpose of the token embedding, one
    parameter (nanoGPT's default, so presumably the paper's; the ``cpu`` model is untied).
    ``bias=False`` removes the biases of the attention and MLP projections (nanoGPT's
    ``bias`` flag; LayerNorm keeps its bias). The bridge's native model has biases and an untied
    head; :func:`build_model` changes its modules in place, so hooks, ``run_with_cache``,
    checkpoints and every editing method see an ordinary ``TransformerBridge``.
    """

    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_head: int | None = None
    d_mlp: int | None = None
    n_ctx: int = 16
    act_fn: str = "gelu"
    normalization_type: str = "LN"
    layer0_attention: str = "causal"
    tied_embeddings: bool = False
    bias: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("n_layers", self.n_layers, 1)
        check_int("d_model", self.d_model, 1)
        check_int("n_heads", self.n_heads, 1)
        if self.d_head is None and self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) when "
                f"d_head is unset; set d_head or choose n_heads among the divisors of d_model"
            )
        if self.d_head is not None:
            check_int("d_head", self.d_head, 1)
        if self.d_mlp is not None:
            check_int("d_mlp", self.d_mlp, 1)
        check_int("n_ctx", self.n_ctx, 2)
        check_choice("act_fn", self.act_fn, ACT_FNS)
        check_choice("normalization_type", self.normalization_type, NORMALIZATIONS)
        check_choice("layer0_attention", self.layer0_attention, LAYER0_ATTENTION)
        check_bool("tied_embeddings", self.tied_embeddings)
        check_bool("bias", self.bias)
        check_int("seed", self.seed, 0)

    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    @property
    def mlp_dim(self) -> int:
        return self.d_mlp if self.d_mlp is not None else 4 * self.d_model


def build_model(
    config: ModelConfig, d_vocab: int, device: str | torch.device | None = None
) -> TransformerBridge:
    """A freshly initialised ``TransformerBridge``, seeded by ``config.seed``, on ``device``.

    The global RNG is left untouched (``boot_native`` forks it). The weights are initialised
    on the CPU (the same bytes on every device) and then moved: ``boot_native`` alone leaves
    them on the CPU whatever its config says. A malformed or unavailable device is refused.
    """
    check_int("d_vocab", d_vocab, 2)
    dev = resolve_device(device)
    bridge, bridge_config = _bridge()
    cfg = bridge_config(
        n_layers=config.n_layers,
        d_model=config.d_model,
        n_heads=config.n_heads,
        d_head=config.head_dim,
        d_mlp=config.mlp_dim,
        d_vocab=d_vocab,
        n_ctx=config.n_ctx,
        act_fn=config.act_fn,
        normalization_type=config.normalization_type,
        positional_embedding_type="standard",
        seed=config.seed,
        device="cpu",
    )
    model = bridge.boot_native(cfg)
    use_native_layernorm(model)
    use_lean_attention(model)
    use_lean_normalization(model)
    native = model.original_model
    if not config.bias:
        for block in native.layers:
            attn, mlp = _original(block).attn, _original(block).mlp
            for linear in (attn.q, attn.k, attn.v, attn.o, mlp.fc_in, mlp.fc_out):
                _original(linear).bias = None
    if config.tied_embeddings:
        # nn.Embedding.weight [vocab, d_model] and the head's nn.Linear.weight [vocab, d_model]
        # have one orientation: the head reuses the embedding's Parameter
        _original(native.head).weight = _original(native.tok_embed).weight
    if config.layer0_attention == "self":
        model.hook_dict["blocks.0.attn.hook_pattern"].add_perma_hook(attend_to_self)
    if dev.type != "cpu":
        model.to(dev)
        model.cfg.device = str(dev)
        if config.tied_embeddings:  # a move may make new Parameters (meta does): tie again
            _original(native.head).weight = _original(native.tok_embed).weight
    return model


def use_native_layernorm(model: TransformerBridge, enabled: bool = True) -> Any:
    """Run every LayerNorm through its torch module instead of the bridge's Python re-derivation.

    TransformerLens's ``use_native_layernorm_autograd`` mode (the one it uses for vision
    encoders): ``hook_scale`` and ``hook_normalized`` still fire with the same values (to
    rounding) and a hook that edits them still takes effect; without hooks, the normalisation is
    one fused kernel and the statistics are computed without a graph. Training steps of the
    small models are otherwise spent largely in the Python LayerNorm's dozen elementwise ops
    (docs/speed.md). ``enabled=False`` restores the Python LayerNorm (the benchmark's
    baseline).
    """
    from kgshatter.tl_compat import NormalizationBridge

    for module in model.modules():
        if isinstance(module, NormalizationBridge):
            module.use_native_layernorm_autograd = enabled
    return model


def use_lean_attention(model: TransformerBridge, enabled: bool = True) -> Any:
    """Run every TransformerLens-native attention through :class:`LeanAttention`'s forward:
    the same outputs and gradients, bit for bit, with the scores scaled and masked in place
    and without the second pass over the pattern that only fully masked rows need.

    The native attention allocates four ``[batch, heads, query, key]`` tensors per call (scaled
    scores, masked scores, pattern, masked pattern); in the narrow models of the study (12
    heads of 2 dimensions) those dominate the forward pass: the evaluations of the editing
    sweep spend most of their time there (docs/speed.md). Set as the attention's class
    (:class:`LeanAttention`, a subclass), so copies and pickles keep it; ``enabled=False``
    restores TransformerLens's class (the benchmark's baseline). Padding masks, rotary
    positions, grouped keys, soft-capped scores and non-causal attention run TransformerLens's
    own forward unchanged.
    """
    from kgshatter.tl_compat import NativeAttention

    lean = _lean_attention_class()
    for module in model.modules():
        if isinstance(module, NativeAttention):
            module.__class__ = lean if enabled else NativeAttention
    return model


def use_lean_normalization(model: TransformerBridge, enabled: bool = True) -> Any:
    """Run every LayerNorm bridge of ``model`` as :class:`LeanNormalization`: on a pass with
    no hook on its ``hook_scale`` and ``hook_normalized``, the torch module's result alone.

    In :func:`use_native_layernorm`'s mode TransformerLens's bridge computes the mean, the
    variance, the scale and the normalised input (six elementwise passes) for those two hook
    points, and then returns the torch module's own result whenever no hook changed them; with
    no hook there, :class:`LeanNormalization` returns that result without the six passes: the
    same bytes (outputs and gradients); 0.73 ms against 2.09 ms per call on ``[1024, 16, 64]``
    without gradients (2 cores). In an edit sweep of the ``cpu`` model the six passes were
    about 8% of the time (docs/speed.md). Set as the class of
    each exact ``NormalizationBridge`` (copies and pickles keep it); ``enabled=False`` restores
    TransformerLens's class."""
    from kgshatter.tl_compat import NormalizationBridge

    lean = _lean_normalization_class()
    for module in model.modules():
        if type(module) in (NormalizationBridge, lean):
            module.__class__ = lean if enabled else NormalizationBridge
    return model


def __getattr__(name: str) -> Any:
    # the lean classes are built on first use (TransformerLens is imported lazily); pickle and
    # copy find them here by name
    if name == "LeanAttention":
        return _lean_attention_class()
    if name == "LeanNormalization":
        return _lean_normalization_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_LEAN = [True]


def native_forwards() -> AbstractContextManager[None]:
    """Inside, every :class:`LeanAttention` and :class:`LeanNormalization` runs
    TransformerLens's own forward (the same values, more slowly: the benchmark's baseline);
    restored on exit."""
    from kgshatter.readout import switched_off

    return switched_off(_LEAN)


@functools.cache
def _lean_normalization_class() -> type:
    from kgshatter.readout import unhooked
    from kgshatter.tl_compat import NormalizationBridge

    class LeanNormalization(NormalizationBridge):
        """TransformerLens's ``NormalizationBridge`` (4.3) that skips the statistics its hook
        points would see when nothing hooks them (:func:`use_lean_normalization`)."""

        def _hf_autograd_forward_with_hooks(self, x: torch.Tensor) -> torch.Tensor:
            component = self.original_component
            if not (
                _LEAN[0]
                and component is not None
                and not isinstance(component, torch.nn.Identity)
                and unhooked(self.hook_scale)
                and unhooked(self.hook_normalized)
            ):
                return super()._hf_autograd_forward_with_hooks(x)
            result = component(x)  # what TransformerLens returns when no hook edits them
            return result if result.dtype == x.dtype else result.to(x.dtype)

    LeanNormalization.__module__ = __name__
    LeanNormalization.__qualname__ = "LeanNormalization"
    return LeanNormalization


@functools.cache
def _lean_attention_class() -> type:
    from kgshatter.readout import plain_attention
    from kgshatter.tl_compat import NativeAttention

    class LeanAttention(NativeAttention):
        """TransformerLens's ``NativeAttention`` (4.3) with a forward that computes its
        outputs in fewer tensor passes (:func:`use_lean_attention`)."""

        def forward(
            self,
            hidden_states: torch.Tensor,
            attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None,
            pattern_fn: Any = None,
            **kwargs: Any,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not (_LEAN[0] and attention_mask is None and plain_attention(self)):
                return super().forward(
                    hidden_states, attention_mask, position_ids, pattern_fn, **kwargs
                )
            batch, seq, _ = hidden_states.shape
            heads, d_head = self.n_heads, self.d_head
            q = self.q(hidden_states).view(batch, seq, heads, d_head).transpose(1, 2)
            k = self.k(hidden_states).view(batch, seq, heads, d_head).transpose(1, 2)
            v = self.v(hidden_states).view(batch, seq, heads, d_head).transpose(1, 2)
            # the matmul's backward needs q and k, not its output: scaling and masking it in
            # place are the native out-of-place ops' values without two more allocations
            scores = torch.matmul(q, k.transpose(-2, -1)).div_(self.scale)
            scores.masked_fill_(self.causal_mask[:seq, :seq], float("-inf"))
            # every query sees itself, so no row is fully masked and the softmax is already 0
            # where the native forward zeroes the pattern a second time
            pattern = torch.softmax(scores, dim=-1)
            if pattern_fn is not None:
                pattern = pattern_fn(pattern)
            out = torch.matmul(pattern, v).transpose(1, 2).contiguous().view(batch, seq, -1)
            return self.o(out), pattern

    LeanAttention.__module__ = __name__
    LeanAttention.__qualname__ = "LeanAttention"
    return LeanAttention


def logits_at(
    model: TransformerBridge, tokens: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits ``[len(rows), d_vocab]`` at the flattened positions ``rows`` of ``tokens`` only.

    The unembedding is the largest matrix of a narrow model with a large vocabulary (the paper's
    2072 tokens), and a loss on entity targets needs it at under half of the positions. A scoped
    hook on ``unembed.hook_in`` hands the head only those rows, so the rest of the forward pass
    (and every other hook) is unchanged. ``rows=None``: every position, ``[batch * pos, vocab]``.
    A model without TransformerLens hooks (the benchmark's plain decoder) takes ``rows`` itself.
    """
    if not hasattr(model, "hooks"):
        return model(tokens, rows=rows)
    if rows is None:
        logits = model(tokens)
        return logits.reshape(-1, logits.shape[-1])

    def keep_rows(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        # index_select: its backward (index_add_) is cheaper than advanced indexing's
        return resid.reshape(-1, resid.shape[-1]).index_select(0, rows).unsqueeze(0)

    with model.hooks(fwd_hooks=[("unembed.hook_in", keep_rows)]):
        logits = model(tokens)
    return logits.reshape(-1, logits.shape[-1])


def last_position_logits(model: TransformerBridge, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token logits ``[batch, vocab]`` at the last position of each row of ``tokens``,
    with the unembedding, and where :func:`kgshatter.readout.last_columns` applies the last
    block too, computed there only (what every evaluation query reads)."""
    from kgshatter.readout import last_columns

    batch, seq = tokens.shape
    with last_columns(model, 1) as only_last:
        width = 1 if only_last else seq
        rows = torch.arange(batch, device=tokens.device) * width + (width - 1)
        return logits_at(model, tokens, rows)


def _original(module: Any) -> Any:
    """The wrapped torch module of a bridge component (or the module itself)."""
    return getattr(module, "_original_component", module)


def is_tied(model: TransformerBridge) -> bool:
    """Whether the model's unembedding shares its parameter with the token embedding."""
    native = model.original_model
    return _original(native.head).weight is _original(native.tok_embed).weight


def attend_to_self(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
    """Replace an attention pattern [batch, head, query, key] by the identity.

    With fewer queries than keys (a pass over the last columns on cached keys and values,
    :mod:`kgshatter.editing.prefix`), the queries are the last keys: query ``i`` attends to key
    ``keys - queries + i``, the key/value-cache convention (``kv_cache_safe``)."""
    queries, keys = pattern.shape[-2:]
    eye = torch.eye(keys, dtype=pattern.dtype, device=pattern.device)[keys - queries :]
    return eye.expand_as(pattern).clone()


attend_to_self.kv_cache_safe = True  # type: ignore[attr-defined]


def model_state(model: TransformerBridge) -> dict[str, torch.Tensor]:
    """The model's weights as a flat, contiguous state dict (what checkpoints store).

    A tensor that shares storage with an earlier one (the tied unembedding) is copied, since
    safetensors stores no aliases; :func:`load_weights` checks the copies still agree.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in model.state_dict().items():
        v = v.detach().contiguous()
        if v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def save_weights(model: TransformerBridge, path: str | os.PathLike[str]) -> Path:
    """Write the weights as safetensors atomically."""
    from safetensors.torch import save_file

    from kgshatter.io import write_atomic

    state = {k: v.cpu() for k, v in model_state(model).items()}
    return write_atomic(path, lambda tmp: save_file(state, str(tmp)))


def load_weights(model: TransformerBridge, path: str | os.PathLike[str]) -> Any:
    """Load safetensors weights into ``model``, refusing mismatched keys or shapes."""
    from kgshatter.io import load_safetensors

    state, _ = load_safetensors(path, "model weights")
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or extra or bad:
        raise ValueError(
            f"weights at {path} do not fit this model: missing {missing[:3]}, unexpected "
            f"{extra[:3]}, shape mismatch {bad[:3]}"
        )
    if is_tied(model) and not torch.equal(state[EMBED_KEY], state[UNEMBED_KEY]):
        raise ValueError(
            f"weights at {path} have an unembedding different from the embedding (trained with "
            f"tied_embeddings=False); load them into a model with tied_embeddings=False"
        )
    device = next(iter(own.values())).device
    model.load_state_dict({k: v.to(device) for k, v in state.items()})
    return model


def _bridge() -> tuple[Any, Any]:
    from kgshatter.tl_compat import bridge_classes

    return bridge_classes()
