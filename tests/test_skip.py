"""Target optimisation from the first edited block (``kgshatter.editing.skip``).

The optimisation steps run blocks ``k ..`` on the residual cached at block ``k`` and the head
only where a loss reads it; the deltas must be those of the full passes, the skipped blocks
must really not run, and the shortcut must decline where it would change the result. The
Hugging Face families (GPT-2, Llama, Mamba) are checked in ``tests/test_pretrained.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kgshatter.editing import ROMEConfig, SyntheticTask
from kgshatter.editing.prefix import NativePrefix, PrefixCache, disabled
from kgshatter.editing.protocols import sample_requests
from kgshatter.editing.skip import BlockSkip, block_of
from kgshatter.editing.targets import optimize_many, prepare_problems


@pytest.fixture(scope="module")
def problems(trained_tiny, tiny_sampler):
    model, graph = trained_tiny.model, trained_tiny.graph
    requests = sample_requests(graph, "counterfactual", 3, seed=0, distance=2)
    config = ROMEConfig(layer=1, steps=8, n_prompts=4)
    _, probs, _ = prepare_problems(model, SyntheticTask(tiny_sampler, cache=None), requests, config)
    return model, probs, config


def _close(a, b):
    """Equal up to float rounding: Adam scales each coordinate's step to ``lr`` whatever its
    gradient, so rounding in a near-zero gradient moves that coordinate by up to ~1e-4 of the
    delta's scale over a few steps (the tolerance of the Hugging Face checks)."""
    for ra, rb in zip(a, b, strict=True):
        for da, db in zip(ra.deltas, rb.deltas, strict=True):
            torch.testing.assert_close(da, db, rtol=1e-4, atol=1e-6)
        assert ra.losses == pytest.approx(rb.losses, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize(
    "hooks, options",
    [
        (["blocks.1.hook_mlp_out"], {}),
        (["blocks.0.hook_mlp_out"], {}),  # nothing below to skip; the prefix cache still runs
        (["blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"], {"micro_batch": 3}),
        (["blocks.1.hook_resid_post"], {"reference": True}),
    ],
)
def test_skipping_frozen_blocks_gives_the_same_deltas(problems, hooks, options):
    model, probs, config = problems
    kw = config.optimisation() | options
    full = optimize_many(model, hooks, probs, **kw, skip_frozen=False)
    short = optimize_many(model, hooks, probs, **kw, skip_frozen=True)
    _close(full, short)
    assert any(d.norm() > 0 for r in short for d in r.deltas)


def test_an_earlier_edit_below_the_skipped_blocks_stays_in_effect(problems):
    """A sequence's earlier edits are hooks on the model (``edited``): one below the first
    edited block fires in the first pass only, and its effect rides in the cached residual."""
    model, probs, config = problems
    shift = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))

    def earlier(act, hook):
        return act + 0.5 * shift

    kw = config.optimisation()
    with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", earlier)]):
        full = optimize_many(model, ["blocks.1.hook_mlp_out"], probs, **kw, skip_frozen=False)
        short = optimize_many(model, ["blocks.1.hook_mlp_out"], probs, **kw)
    _close(full, short)
    plain = optimize_many(model, ["blocks.1.hook_mlp_out"], probs, **kw)
    assert not torch.allclose(plain[0].delta, short[0].delta)  # the earlier edit mattered


def test_the_blocks_below_do_not_run(problems):
    model, probs, config = problems
    calls = []
    counter = ("blocks.0.hook_out", lambda act, hook: calls.append(1))
    kw = config.optimisation() | {"steps": 5}
    res = optimize_many(model, ["blocks.1.hook_mlp_out"], probs, **kw, fwd_hooks=[counter])
    passes = max(len(r.losses) for r in res)  # the passes run until the last request stops
    assert len(calls) == passes + 1  # declined: a kept hook below the edit fires at every pass
    calls.clear()
    upper = ("blocks.1.hook_out", lambda act, hook: None)
    with model.hooks(fwd_hooks=[counter]):
        optimize_many(model, ["blocks.1.hook_mlp_out"], probs, **kw, fwd_hooks=[upper])
    assert len(calls) == 1 + 1  # the first pass and the probe of the blocks' output kind
    # the stubs are gone afterwards: a plain forward runs block 0 again
    calls.clear()
    with torch.no_grad(), model.hooks(fwd_hooks=[counter]):
        model(probs[0].prompts.tokens)
    assert len(calls) == 1
    assert "forward" not in model.blocks[0].__dict__


@pytest.mark.parametrize("layer", [0, 1])
def test_later_passes_run_only_the_columns_from_the_delta_on(problems, layer):
    """``kgshatter.editing.prefix.NativePrefix``: after the first pass every row runs from its
    delta position (the subject) to its last read one; inside ``disabled()`` all columns."""
    model, probs, config = problems
    shapes: list[tuple[int, int]] = []
    upper = ("blocks.1.hook_out", lambda act, hook: shapes.append(tuple(act.shape[:2])))
    kw = config.optimisation() | {"steps": 3}
    hook = f"blocks.{layer}.hook_mlp_out"
    with model.hooks(fwd_hooks=[upper]):
        optimize_many(model, [hook], probs, **kw)
    width = max(p.prompts.tokens.shape[1] for p in probs)
    subject = min(int(p.prompts.index("subject").min()) for p in probs)
    widths = [w for rows, w in shapes if (rows, w) != (1, 1)]  # not the output-kind probe
    assert widths[0] == width and subject > 0
    assert max(widths[1:]) <= width - subject
    shapes.clear()
    with disabled(), model.hooks(fwd_hooks=[upper]):
        optimize_many(model, [hook], probs, **kw)
    assert {w for rows, w in shapes if (rows, w) != (1, 1)} == {width}


def test_attention_to_self_keeps_its_meaning_on_cached_columns(problems, tiny_run, tiny_graph):
    """``layer0_attention="self"`` (the fidelity preset's) rewrites block 0's pattern; its hook
    declares the key/value-cache convention, so the prefix shortcut runs and gives the full
    passes' deltas."""
    from kgshatter.models import attend_to_self, build_model

    _, probs, config = problems
    square = attend_to_self(torch.rand(2, 3, 5, 5), None)
    assert torch.equal(attend_to_self(torch.rand(2, 3, 2, 5), None), square[:, :, 3:])
    model_config = dataclasses.replace(tiny_run.model, layer0_attention="self")
    model = build_model(model_config, tiny_graph.n_entities + tiny_graph.n_relations)
    assert NativePrefix.plan(model) is not None
    kw = config.optimisation() | {"steps": 4}
    hook = "blocks.0.hook_mlp_out"
    _close(
        optimize_many(model, [hook], probs, **kw, skip_frozen=False),
        optimize_many(model, [hook], probs, **kw),
    )


def test_plan_declines_where_skipping_would_change_something(trained_tiny):
    model = trained_tiny.model
    with torch.no_grad():  # the native bridge keeps no Hugging Face cache: its own shortcut
        _, cache = model(torch.zeros((1, 3), dtype=torch.long), return_type="logits_and_cache")
    assert PrefixCache.from_first_pass(cache) is None
    assert NativePrefix.plan(model) is not None
    # a hook on an attention pattern would see a rectangular one: declined
    assert NativePrefix.plan(model, ["blocks.1.attn.hook_pattern"]) is None
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda p, hook: None)]):
        assert NativePrefix.plan(model) is None
    with disabled():
        assert NativePrefix.plan(model) is None
    assert block_of("blocks.12.mlp.hook_out") == 12 and block_of("hook_embed") is None
    assert BlockSkip.plan(model, ["blocks.0.hook_mlp_out"]) is None  # nothing below
    assert BlockSkip.plan(model, ["hook_embed"]) is None
    assert BlockSkip.plan(model, ["blocks.1.hook_mlp_out"], ["blocks.0.hook_mlp_out"]) is None
    # a kept hook at the injection point itself (also under its alias name)
    assert BlockSkip.plan(model, ["blocks.1.hook_mlp_out"], ["blocks.1.hook_resid_pre"]) is None
    plan = BlockSkip.plan(model, ["blocks.1.hook_mlp_out"], ["blocks.1.hook_mlp_out"])
    assert plan is not None and plan.start == 1


def test_a_stub_left_by_someone_else_is_restored(problems):
    model, probs, config = problems
    block = model.blocks[0]
    own = block.forward  # a bound method, put in the instance as someone's patch would be
    block.__dict__["forward"] = own
    try:
        kw = dataclasses.replace(config, steps=2).optimisation()
        optimize_many(model, ["blocks.1.hook_mlp_out"], probs, **kw)
        assert block.__dict__["forward"] is own
    finally:
        del block.__dict__["forward"]


def test_the_plain_pytorch_reference_on_hugging_face_gives_the_same_delta():
    """kgshatter's reference-mode target optimisation on the bridge against the paper's loop
    written with a plain torch hook on the Hugging Face model of the same weights
    (``kgshatter edit-benchmark --rome-reference`` times the two)."""
    from kgshatter.bench.rome_reference import rome_reference_benchmark

    shape = {"n_layer": 4, "n_embd": 32, "n_head": 4, "n_positions": 32}
    result = rome_reference_benchmark(shape=shape, steps=4, repeats=1, prompt_len=8)
    assert result["layer"] == 1 and result["rows_per_pass"] == 22
    for name, difference in result["delta_rel_difference"].items():
        assert difference < 1e-4, name
    assert result["prefix_sampling_same_texts"]
    with pytest.raises(ValueError, match="layer must be in 0..3"):
        rome_reference_benchmark(shape=shape, layer=4)
