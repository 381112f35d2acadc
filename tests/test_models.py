"""Model construction, weight I/O and the benchmark's reference decoder."""

from __future__ import annotations

import pytest
import torch

from kgshatter.benchmark import PlainDecoder
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
