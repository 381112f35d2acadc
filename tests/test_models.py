"""Model construction, weight I/O and the benchmark's reference decoder."""

from __future__ import annotations

import pytest
import torch

from kgshatter.benchmark import PlainDecoder
from kgshatter.models import ModelConfig, build_model, load_weights, save_weights

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
