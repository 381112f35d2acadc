"""Editing core and ROME on the tiny model: hook form == weight form, exact undo, rank one."""

from __future__ import annotations

import pytest
import torch
from kgshatter.hooks import capture, edited

from kgshatter.editing import (
    CovarianceCache,
    Edit,
    EditRequest,
    ROMEConfig,
    StatsKey,
    compute_rome,
    get_method,
)
from kgshatter.editing.requests import request_prompts


@pytest.fixture(scope="module")
def setup(trained_tiny, tiny_sampler):
    model, graph = trained_tiny.model, trained_tiny.graph
    x, rel = 3, graph.relation("I_C1").index
    old = graph.apply(rel, x)
    new = int(graph.rings[0][(graph.positions[0][old] + 2) % graph.n_entities])
    return model, graph, tiny_sampler, EditRequest(x, rel, new)


@pytest.fixture(scope="module")
def rome_edit(setup, tmp_path_factory):
    model, graph, sampler, req = setup
    cache = CovarianceCache(tmp_path_factory.mktemp("cov"))
    return compute_rome(model, sampler, req, ROMEConfig(n_samples=2000), cache), cache


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_edit_succeeds_and_model_is_untouched(setup, rome_edit):
    model, graph, sampler, req = setup
    before = snapshot(model)
    edit, _ = rome_edit
    test = request_prompts(sampler, req.subject, req.relation, 16, seed=7)
    with torch.no_grad(), edited(model, edit):
        hit = (model(test)[:, -1].argmax(-1) == req.target).float().mean()
    assert hit >= 0.9
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_hook_form_equals_weight_form_and_restore_is_exact(setup, rome_edit):
    model, _, sampler, req = setup
    edit, _ = rome_edit
    tokens = sampler.batch_for_step(3, 16, seed=5)[:, :-1]
    before = snapshot(model)
    with torch.no_grad():
        with edited(model, edit):
            hooked = model(tokens)
        with edit.apply_to_weights(model):
            weighted = model(tokens)
        plain = model(tokens)
    torch.testing.assert_close(hooked, weighted, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(hooked, plain)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "restore must be bit-identical"


def test_rome_delta_is_rank_one_and_maps_k_to_v(rome_edit):
    edit, _ = rome_edit
    (delta,) = edit.deltas
    assert delta.a.shape[1] == delta.b.shape[1] == 1
    s = torch.linalg.svdvals(delta.dense.double())
    assert s[0] > 0 and (s[1:] / s[0]).max() < 1e-6  # rank one up to float32 rounding
    k = torch.tensor(edit.info["k_star"])
    v = torch.tensor(edit.info["v_star"])
    moved = k @ delta.dense  # what the delta adds to the MLP output at k*
    h0 = v - delta.b[:, 0]  # r-ROME: v* - out(k*) is the optimised delta
    torch.testing.assert_close(moved, v - h0, atol=1e-4, rtol=1e-3)


def test_no_hook_left_behind_even_on_error(setup, rome_edit):
    model, _, _, _ = setup
    edit, _ = rome_edit
    mine: dict[str, torch.Tensor] = {}
    model.hook_dict["blocks.0.hook_mlp_out"].add_hook(capture(mine, "x"))
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with edited(model, edit):
                assert model.hook_dict["blocks.0.hook_mlp_out"].fwd_hooks
                raise RuntimeError("inside")
        # only the user's own hook remains
        assert len(model.hook_dict["blocks.0.hook_mlp_out"].fwd_hooks) == 1
        assert not model.hook_dict["blocks.0.mlp.hook_post"].fwd_hooks
    finally:
        model.reset_hooks()
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_covariance_cache_hits_and_rejects_foreign_files(setup, rome_edit, tmp_path):
    model, _, sampler, req = setup
    edit, cache = rome_edit
    misses = cache.misses
    again = compute_rome(model, sampler, req, ROMEConfig(n_samples=2000), cache)
    assert cache.misses == misses and cache.hits >= 1
    torch.testing.assert_close(again.deltas[0].dense, edit.deltas[0].dense)
    key = StatsKey("m", 0, "blocks.0.mlp.hook_post", "walks", 10)
    other = StatsKey("m", 1, "blocks.1.mlp.hook_post", "walks", 10)
    c = CovarianceCache(tmp_path)
    c.get(key, lambda: (torch.eye(3, dtype=torch.float64), 10))
    (tmp_path / key.filename()).rename(tmp_path / other.filename())
    with pytest.raises(ValueError, match="holds statistics for"):
        c.get(other, lambda: (torch.eye(3, dtype=torch.float64), 10))


def test_save_load_round_trip(rome_edit, tmp_path):
    edit, _ = rome_edit
    edit.save(tmp_path / "new_dir" / "e")
    loaded = Edit.load(tmp_path / "new_dir" / "e")
    assert loaded.method == "rome" and loaded.requests == edit.requests
    assert torch.equal(loaded.deltas[0].a, edit.deltas[0].a)
    assert loaded.model_id == edit.model_id


def test_bad_requests_fail_clearly(setup):
    model, graph, sampler, req = setup
    before = snapshot(model)
    same = EditRequest(req.subject, req.relation, req.old_target(graph))
    with pytest.raises(ValueError, match="already gives"):
        compute_rome(model, sampler, same)
    with pytest.raises(ValueError, match="unknown relation"):
        EditRequest.parse(graph, "e003 I_C9", "e001")
    with pytest.raises(ValueError, match="model has layers 0..1"):
        compute_rome(model, sampler, req, ROMEConfig(layer=5))
    with pytest.raises(ValueError, match="unknown editing method 'romee'.*rome"):
        get_method("romee")
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
