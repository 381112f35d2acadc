"""A pretrained model split across devices (device_map): the same logits, hooks on every block,
edits as hooks; weight patches refused where the weights are offloaded.

On this CPU-only machine the split is CPU + disk offload (accelerate); a split across GPUs
takes the same code path in kgshatter but was not run here (no GPU).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")

SPLIT = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu",
         "transformer.h.1": "cpu", "transformer.h.2": "disk", "transformer.h.3": "disk",
         "transformer.ln_f": "cpu", "lm_head": "cpu"}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from kgshatter.pretrained.loading import load_pretrained, tiny_checkpoint

    root = tmp_path_factory.mktemp("multi")
    path = tiny_checkpoint("gpt2", root / "gpt2")
    whole = load_pretrained(path)
    split = load_pretrained(path, device_map=SPLIT, offload_folder=root / "offload")
    return whole, split


def test_the_split_model_computes_what_the_whole_one_does(models):
    whole, split = models
    assert split.model.W_E.device.type == "cpu"
    assert split.model.original_model.hf_device_map["transformer.h.3"] == "disk"
    tokens = whole.tokenizer("January is followed 8 months later by", return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = whole.model(tokens)
        assert torch.allclose(split.model(tokens), expected, atol=1e-5)
        _, cache = split.model.run_with_cache(
            tokens, names_filter=lambda n: n == "blocks.3.hook_resid_post"
        )
    assert (
        "blocks.3.hook_resid_post" in cache and cache["blocks.3.hook_resid_post"].is_meta is False
    )


def test_edits_on_a_split_model(models):
    from kgshatter.hooks import edited

    from kgshatter.editing import LayerDelta, get_method
    from kgshatter.editing.edit import Edit
    from kgshatter.pretrained.facts import cyclic_task
    from kgshatter.pretrained.loading import TINY_TEXT
    from kgshatter.pretrained.text import TextCorpus, TextTask

    whole, split = models
    rome = get_method("rome")
    config = rome.config("tiny-pretrained")  # layer 2: offloaded in the split model
    corpus = TextCorpus(TINY_TEXT * 50, "tiny")
    edits = {}
    for name, pm in (("whole", whole), ("split", split)):
        task = cyclic_task("months", pm.tokenizer)
        request = task.request(task.query("January", 8), target="December")
        text_task = TextTask(pm.model, pm.tokenizer, corpus)
        edits[name] = rome.compute(pm.model, text_task, request, config, model_id=pm.model_id)
    (a,), (b,) = edits["whole"].deltas, edits["split"].deltas
    assert torch.allclose(a.dense, b.dense, atol=1e-4, rtol=1e-3)
    tokens = whole.tokenizer("January is followed 8 months later by", return_tensors="pt").input_ids
    with torch.inference_mode(), edited(whole.model, edits["whole"]):
        expected = whole.model(tokens)
    with torch.inference_mode(), edited(split.model, edits["split"]):
        assert torch.allclose(split.model(tokens), expected, atol=1e-4)
    with pytest.raises(ValueError, match="offloaded.*apply edits as hooks"):
        edits["split"].apply_to_weights(split.model)
    # a layer kept in memory is patched and restored as usual
    d_mlp, d_model = whole.model.cfg.d_mlp, whole.model.cfg.d_model
    low = Edit("manual", [LayerDelta(1, torch.ones(d_mlp, 1) * 1e-3, torch.ones(d_model, 1))],
               [], {}, split.model_id)  # fmt: skip
    before = split.model.blocks[1].mlp.W_out.detach().clone()
    with low.apply_to_weights(split.model):
        assert not torch.equal(split.model.blocks[1].mlp.W_out, before)
    assert torch.equal(split.model.blocks[1].mlp.W_out, before)


def test_bad_device_maps_are_one_line_errors(tmp_path):
    from kgshatter.pretrained.loading import load_pretrained, tiny_checkpoint

    path = tiny_checkpoint("gpt2", tmp_path / "gpt2")
    cases = [
        ({"device": "cpu", "device_map": "auto"}, "not both"),
        ({"device_map": "everywhere"}, "device_map must be one of"),
        ({"device_map": {"transformer.h.0": "disk"}}, "offload_folder"),
        ({"device_map": {"transformer.h.0": "meta"}}, "holds no weights"),
        ({"device_map": {"transformer.h.0": "nosuch"}}, "unknown device 'nosuch'"),
        ({"device_map": {}}, "non-empty dict"),
    ]
    if not torch.cuda.is_available():
        cases.append(({"device_map": {"": 0}}, "CUDA is not available"))
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            load_pretrained(path, **kwargs)
    mamba = tiny_checkpoint("mamba", tmp_path / "mamba")
    with pytest.raises(ValueError, match="Mamba cannot be split"):
        load_pretrained(mamba, device_map="auto")
