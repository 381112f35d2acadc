"""Model construction, weight I/O and the benchmark's reference decoder."""

from __future__ import annotations

import pytest
import torch

from kgshatter.bench.training import PlainDecoder
from kgshatter.models import ModelConfig, build_model, is_tied, load_weights, save_weights

CFG = ModelConfig(n_layers=2, d_model=32, n_heads=2, d_mlp=64, n_ctx=8)


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = build_model(CFG, 30), build_model(CFG, 30)
    assert torch.equal(torch.random.get_rng_state(), before)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    c = build_model(ModelConfig(**dict(CFG.to_dict(), seed=1)), 30)
    assert not torch.equal(a.W_E, c.W_E)
    assert a.cfg.d_vocab == 30 and a.cfg.n_layers == 2


def test_plain_decoder_has_the_same_shape():
    bridge, plain = build_model(CFG, 30), PlainDecoder(CFG, 30)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(bridge) == count(plain)
    assert plain(torch.randint(0, 30, (2, 8))).shape == (2, 8, 30)


def test_weights_round_trip_and_mismatch(tmp_path):
    model = build_model(CFG, 30)
    save_weights(model, tmp_path / "w.safetensors")
    other = build_model(ModelConfig(**dict(CFG.to_dict(), seed=9)), 30)
    load_weights(other, tmp_path / "w.safetensors")
    tokens = torch.randint(0, 30, (3, 8))
    with torch.no_grad():
        assert torch.equal(model(tokens), other(tokens))
    wider = build_model(ModelConfig(**dict(CFG.to_dict(), d_model=64)), 30)
    with pytest.raises(ValueError, match="do not fit this model"):
        load_weights(wider, tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match="missing model weights"):
        load_weights(model, tmp_path / "nothing.safetensors")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"d_model": 30, "n_heads": 4}, "must be divisible by n_heads"),
        ({"n_layers": 0}, "n_layers"),
        ({"act_fn": "tanh"}, "act_fn must be one of"),
        ({"normalization_type": "BN"}, "normalization_type"),
    ],
)
def test_model_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("tied, bias", [(True, True), (False, False), (True, False)])
def test_tied_embeddings_and_no_bias(tied, bias, tmp_path):
    """Tied: one parameter serves embedding and unembedding; bias=False drops the projection
    biases; both survive a checkpoint and keep the plain decoder's parameter count."""
    cfg = ModelConfig(**dict(CFG.to_dict(), tied_embeddings=tied, bias=bias))
    model = build_model(cfg, 30)
    assert is_tied(model) == tied
    names = [n for n, _ in model.named_parameters()]
    assert any("bias" in n and ".attn." in n for n in names) == bias
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) == count(PlainDecoder(cfg, 30))
    untied = build_model(CFG, 30)
    assert count(untied) - count(model) == (30 * 32 if tied else 0) + (
        0 if bias else 2 * (4 * 32 + 64 + 32)
    )
    tokens = torch.randint(0, 30, (3, 8))
    if tied:  # a gradient step moves the shared matrix in both roles at once
        model(tokens).sum().backward()
        with torch.no_grad():
            model.embed.W_E.add_(1.0)
        assert torch.equal(model.unembed.W_U, model.embed.W_E.T)
    save_weights(model, tmp_path / "w.safetensors")
    other = build_model(ModelConfig(**dict(cfg.to_dict(), seed=5)), 30)
    load_weights(other, tmp_path / "w.safetensors")
    assert is_tied(other) == tied
    with torch.no_grad():
        assert torch.equal(model(tokens), other(tokens))
        _, cache = other.run_with_cache(tokens)
    assert cache["blocks.0.mlp.hook_post"].shape == (3, 8, 64)


def test_untied_checkpoint_refused_by_a_tied_model(tmp_path):
    save_weights(build_model(CFG, 30), tmp_path / "u.safetensors")
    tied = build_model(ModelConfig(**dict(CFG.to_dict(), tied_embeddings=True)), 30)
    with pytest.raises(ValueError, match="tied_embeddings=False"):
        load_weights(tied, tmp_path / "u.safetensors")


@pytest.mark.ill_typed
@pytest.mark.parametrize("field", ["tied_embeddings", "bias"])
def test_boolean_model_fields_are_validated(field):
    with pytest.raises(ValueError, match=f"{field} must be true or false"):
        ModelConfig(**{field: "yes"})


def test_native_layernorm_keeps_its_hooks():
    """LayerNorms run through torch's module, yet hook_normalized fires with the normalised
    values, and a hook that changes it changes the output."""
    model = build_model(CFG, 30)
    tokens = torch.randint(0, 30, (3, 8))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        resid = cache["blocks.1.hook_resid_post"]
        centred = resid - resid.mean(-1, keepdim=True)
        expected = centred / (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
        assert torch.allclose(cache["ln_final.hook_normalized"], expected, atol=1e-5)
        plain_logits = model(tokens)
        with pytest.warns(UserWarning, match="reconstructed from the hooked values"):
            zeroed = model.run_with_hooks(
                tokens, fwd_hooks=[("ln_final.hook_normalized", lambda x, hook: x * 0)]
            )
        bias = model.original_model.head._original_component.bias
        bias = torch.zeros(30) if bias is None else bias
        assert not torch.allclose(plain_logits, zeroed)
        # a zeroed normalised residual leaves the LayerNorm's bias through the head
        ln = model.original_model.ln_out._original_component
        head = model.original_model.head._original_component
        assert torch.allclose(zeroed, head(ln.bias.expand(3, 8, -1)), atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_device_request_reaches_the_model(tied):
    """boot_native alone leaves the weights on the CPU whatever its config says: the requested
    device must reach the parameters (meta stands in for an accelerator here)."""
    cfg = ModelConfig(**dict(CFG.to_dict(), tied_embeddings=tied))
    model = build_model(cfg, 30, device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert is_tied(model) == tied


def test_unknown_or_unavailable_devices_are_refused():
    with pytest.raises(ValueError, match="unknown device 'nosuch'"):
        build_model(CFG, 30, device="nosuch")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            build_model(CFG, 30, device="cuda")


@pytest.mark.gpu
def test_a_training_step_on_cuda(tmp_path):
    from kgshatter.presets import TrainConfig, get_preset
    from kgshatter.training import train

    tiny = get_preset("tiny")
    run = tiny.replace(train=TrainConfig.from_dict(dict(tiny.train.to_dict(), steps=2)))
    result = train(run, None, progress=False, device="cuda")
    assert {p.device.type for p in result.model.parameters()} == {"cuda"}


def _outputs_and_grads(model, tokens, **kwargs):
    model.zero_grad()
    logits = model(tokens, **kwargs)
    logits.float().pow(2).mean().backward()
    return logits.detach().clone(), [None if p.grad is None else p.grad.clone()
                                     for p in model.parameters()]  # fmt: skip


@pytest.mark.parametrize("layer0", ["causal", "self"])
def test_lean_attention_and_normalization_give_the_native_bytes(layer0):
    """LeanAttention's and LeanNormalization's logits and gradients are TransformerLens's own,
    bit for bit (so a trained model's bytes do not depend on them); copies keep the classes; a
    padding mask, and a hook on a norm's statistics, take the native path."""
    import copy

    from transformer_lens.model_bridge.sources.native.model import NativeAttention

    from kgshatter.models import (
        LeanAttention,
        LeanNormalization,
        native_forwards,
        use_lean_attention,
        use_lean_normalization,
    )

    config = ModelConfig(n_layers=2, d_model=24, n_heads=12, d_mlp=48, n_ctx=8,
                         layer0_attention=layer0)  # fmt: skip
    model = build_model(config, 20)
    attention = model.blocks[0].attn.original_component
    assert type(attention) is LeanAttention and type(model.blocks[1].ln2) is LeanNormalization
    tokens = torch.randint(0, 20, (6, 8), generator=torch.Generator().manual_seed(0))
    lean = _outputs_and_grads(model, tokens)
    with native_forwards():
        native = _outputs_and_grads(model, tokens)
    use_lean_attention(model, enabled=False)
    use_lean_normalization(model, enabled=False)
    assert type(attention) is NativeAttention and type(model.ln_final) is not LeanNormalization
    reverted = _outputs_and_grads(model, tokens)
    use_lean_attention(model)
    use_lean_normalization(model)
    for other in (native, reverted):
        assert torch.equal(lean[0], other[0])
        for a, b in zip(lean[1], other[1], strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
    twin = copy.deepcopy(model)
    assert type(twin.blocks[1].attn.original_component) is LeanAttention
    assert type(twin.blocks[0].ln1) is LeanNormalization
    # a hook on a norm's statistics takes TransformerLens's path: its edit takes effect
    with torch.no_grad():
        with model.hooks(fwd_hooks=[("blocks.1.ln1.hook_normalized", lambda a, hook: 2 * a)]):
            doubled = model(tokens)
            with native_forwards():
                assert torch.equal(model(tokens), doubled)
        assert not torch.equal(doubled, model(tokens))
    with torch.no_grad():
        assert torch.equal(twin(tokens), model(tokens))
        mask = torch.ones(6, 8, dtype=torch.long)
        mask[0, :3] = 0
        with native_forwards():
            padded = model(tokens, attention_mask=mask)
        assert torch.equal(model(tokens, attention_mask=mask), padded)


def test_the_last_block_over_the_read_positions_only():
    """readout.last_columns: the last-position logits and the representations equal the full
    pass's (an edit's hooks at either block, per position); a hook that does not declare
    ``per_position`` in the last block or after it keeps the full pass; one below does not."""
    from kgshatter.hooks import low_rank_delta

    from kgshatter import readout
    from kgshatter.analysis.representations import collect_representations
    from kgshatter.models import last_position_logits
    from kgshatter.sites import Site

    config = ModelConfig(n_layers=2, d_model=24, n_heads=12, d_mlp=48, n_ctx=8)
    model = build_model(config, 20)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (12, 8), generator=g)
    sites = [Site.parse(s) for s in ("embed", "0.mlp_post", "1.mlp_post", "1.resid_post")]
    for layer in (0, 1):
        a, b = torch.randn(48, 1, generator=g), torch.randn(24, 1, generator=g)
        hooks = low_rank_delta(f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_mlp_out",
                               a, b)  # fmt: skip
        with model.hooks(fwd_hooks=hooks):
            with readout.last_columns(model, 1) as applies:
                assert applies
            short = last_position_logits(model, tokens)
            reps = collect_representations(model, tokens.view(4, 3, 8), sites, "entity")
            with readout.disabled():
                with readout.last_columns(model, 1) as applies:
                    assert not applies
                full = last_position_logits(model, tokens)
                reps_full = collect_representations(model, tokens.view(4, 3, 8), sites, "entity")
        assert short.shape == full.shape == (12, 20)
        torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-6)
        for s in sites:
            torch.testing.assert_close(reps[s], reps_full[s], rtol=1e-5, atol=1e-6)
    for name, applies in [("blocks.1.hook_resid_post", False), ("ln_final.hook_normalized",
                          False), ("blocks.0.hook_resid_post", True)]:  # fmt: skip
        with model.hooks(fwd_hooks=[(name, lambda act, hook: act)]):
            with readout.last_columns(model, 1) as got:
                assert got is applies, name
    # a pattern hook that handles fewer queries than keys (attention to self) is kept
    one = build_model(ModelConfig(n_layers=1, d_model=24, n_heads=12, d_mlp=48, n_ctx=8,
                                  layer0_attention="self"), 20)  # fmt: skip
    with readout.last_columns(one, 1) as applies:
        assert applies
    with readout.disabled():
        full = last_position_logits(one, tokens)
    torch.testing.assert_close(last_position_logits(one, tokens), full, rtol=1e-5, atol=1e-6)


def _full_and_frozen(model, frozen, tokens, hooks):
    """The logits of a full pass and of a pass inside ``frozen.running()``, under ``hooks``."""
    with torch.inference_mode(), model.hooks(fwd_hooks=list(hooks)):
        full = model(tokens)
        with frozen.running():
            short = model(tokens)
    return full, short


@pytest.mark.parametrize("layer0", ["causal", "self"])
def test_a_frozen_prefix_gives_the_full_pass_bytes(layer0):
    """readout.FrozenPrefix: a pass over tokens seen before, with an edit's hooks at block 0's
    MLP, skips block 0's attention and gives the full pass's logits bit for bit; a temporary
    hook below the point, new weights or a pass with gradients run block 0's attention again
    (and stay exact)."""
    from kgshatter.hooks import low_rank_delta

    from kgshatter import readout

    config = ModelConfig(n_layers=2, d_model=24, n_heads=12, d_mlp=48, n_ctx=8,
                         layer0_attention=layer0)  # fmt: skip
    model = build_model(config, 20)
    frozen = readout.FrozenPrefix.plan(model, 0)
    assert frozen is not None and readout.FrozenPrefix.plan(model, 1) is None  # the last block
    calls = []
    model.blocks[0].attn.original_component.register_forward_hook(lambda *a: calls.append(1))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (6, 8), generator=g)
    a, b = torch.randn(48, 1, generator=g), torch.randn(24, 1, generator=g)
    edit = low_rank_delta("blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out", a, b)

    def passes(*hooks):
        return _full_and_frozen(model, frozen, tokens, hooks)

    with torch.inference_mode(), frozen.running():
        model(tokens)  # kept
    calls.clear()
    full, short = passes(*edit)
    assert calls == [1] and torch.equal(full, short)  # only the full pass ran the attention
    calls.clear()
    full, short = passes(*edit, ("blocks.0.attn.hook_z", lambda act, hook: 2 * act))
    assert calls == [1, 1] and torch.equal(full, short)
    with torch.no_grad():
        model.blocks[0].attn.original_component.q.weight.add_(0.5)
    calls.clear()
    full, short = passes(*edit)
    assert calls == [1, 1] and torch.equal(full, short)
    calls.clear()
    full, short = passes(*edit)  # the last short pass kept the new weights' residual
    assert calls == [1] and torch.equal(full, short)
    calls.clear()
    with frozen.running():
        model(tokens)  # with gradients: not reused
    with readout.disabled(), torch.inference_mode(), frozen.running():
        model(tokens)  # turned off
    assert calls == [1, 1]


def test_a_frozen_prefix_reuses_the_mlp_an_edit_only_reads():
    """readout.FrozenPrefix: with an edit that only reads block 0's MLP key (a low-rank delta),
    a pass over kept tokens adds the delta to the kept MLP output without running the MLP,
    bit for bit; a hook before the key runs it again; a hook that writes the kept output in
    place sees a copy (later passes stay exact)."""
    from kgshatter.hooks import low_rank_delta

    from kgshatter import readout
    from kgshatter.analysis.representations import collect_representations
    from kgshatter.sites import Site

    model = build_model(ModelConfig(n_layers=2, d_model=24, n_heads=12, d_mlp=48, n_ctx=8), 20)
    frozen = readout.FrozenPrefix.plan(model, 0)
    assert frozen is not None
    calls = []
    model.blocks[0].mlp.original_component.fc_in.register_forward_hook(lambda *a: calls.append(1))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 20, (6, 8), generator=g)
    a, b = torch.randn(48, 1, generator=g), torch.randn(24, 1, generator=g)
    edit = low_rank_delta("blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out", a, b)

    def in_place(act, hook):
        act[:, 0] += 1.0  # writes the tensor it is handed
        return act

    def passes(*hooks):
        return _full_and_frozen(model, frozen, tokens, hooks)

    # the short pass keeps the residual, the key and the output (before the hook writes it)
    full, short = passes(("blocks.0.hook_mlp_out", in_place), *edit)
    assert torch.equal(full, short)
    for hooks, mlp_runs in [
        (edit, 0),
        ([*edit, ("blocks.0.ln2.hook_normalized", lambda act, hook: act)], 1),
        ([("blocks.0.hook_mlp_out", in_place), *edit], 0),
        (edit, 0),  # the in-place hook wrote a copy
        ([("blocks.0.hook_resid_mid", in_place)], 1),
        (edit, 0),
    ]:
        calls.clear()
        full, short = passes(*hooks)
        assert torch.equal(full, short) and len(calls) == 1 + mlp_runs
    # the sweep's representations read the key as well: the MLP does not run for them
    sites = [Site(0, "mlp_post"), Site(0, "resid_post"), Site(1, "resid_post")]
    with torch.inference_mode(), frozen.running():
        collect_representations(model, tokens[:, None], sites)
        calls.clear()
        with model.hooks(fwd_hooks=edit):
            reps = collect_representations(model, tokens[:, None], sites)
    assert calls == []
    with readout.disabled(), model.hooks(fwd_hooks=edit):
        full_reps = collect_representations(model, tokens[:, None], sites)
    for s in sites[:2]:
        assert torch.equal(reps[s], full_reps[s])
