"""Hook factories fire at Site hook names and leave no hook behind."""

from __future__ import annotations

import pytest
import torch
from kgshatter.hooks import add_vector, capture, replace

from kgshatter.sites import Site, all_sites


def test_sites_name_real_hook_points(trained_tiny):
    model = trained_tiny.model
    tokens = torch.randint(0, 16, (2, 8))
    sites = all_sites(
        model.cfg.n_layers, ("resid_pre", "attn_out", "mlp_post", "mlp_out", "resid_post")
    )
    names = {s.hook_name for s in sites}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    for s in sites:
        assert cache[s.hook_name].shape[:2] == (2, 8)
    assert cache["blocks.0.mlp.hook_post"].shape[-1] == model.cfg.d_mlp


def test_site_errors():
    with pytest.raises(ValueError, match="unknown site component 'mlp_in'"):
        Site(0, "mlp_in")
    with pytest.raises(ValueError, match="takes no layer"):
        Site(1, "embed")
    with pytest.raises(ValueError, match="model has layers 0..1"):
        Site(5, "resid_post").check(2)
    assert Site.parse(str(Site(1, "mlp_out"))) == Site(1, "mlp_out")


def test_capture_add_replace(trained_tiny):
    model = trained_tiny.model
    tokens = torch.randint(0, 16, (3, 8))
    site = Site(0, "resid_post")
    store: dict[str, torch.Tensor] = {}
    clean = model.run_with_hooks(tokens, fwd_hooks=[(site.hook_name, capture(store, "x"))])
    assert store["x"].shape == (3, 8, model.cfg.d_model)
    v = torch.randn(model.cfg.d_model)
    seen: dict[str, torch.Tensor] = {}
    steered = model.run_with_hooks(
        tokens,
        fwd_hooks=[
            (site.hook_name, add_vector(v, positions=[-1])),
            (site.hook_name, capture(seen, "x")),
        ],
    )
    assert torch.allclose(seen["x"][:, -1], store["x"][:, -1] + v, atol=1e-5)
    assert torch.equal(seen["x"][:, :-1], store["x"][:, :-1])
    assert torch.equal(steered[:, :-1], clean[:, :-1]) and not torch.equal(steered, clean)
    patched = model.run_with_hooks(tokens, fwd_hooks=[(site.hook_name, replace(store["x"]))])
    assert torch.allclose(patched, clean, atol=1e-6)
    # no hook is left behind on any hook point
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())
    with pytest.raises(ValueError, match="last dimension"):
        model.run_with_hooks(tokens, fwd_hooks=[(site.hook_name, add_vector(torch.ones(3)))])
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())
