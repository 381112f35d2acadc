"""Pretrained loaders, text editing, naturalistic tasks and MMLU-Redux on tiny random checkpoints.

No network and no real weights: every checkpoint is written here by ``tiny_checkpoint`` (GPT-2
and Mamba with a byte-level BPE tokenizer, Llama with a SentencePiece-style one). Real-weight
runs are marked ``pretrained`` and skipped by default.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from kgshatter.hooks import edited

from kgshatter.cli import main
from kgshatter.editing import CovarianceCache, get_method
from kgshatter.pretrained.facts import city_country_task, cyclic_task
from kgshatter.pretrained.loading import (
    TINY_TEXT,
    PretrainedUnavailable,
    load_pretrained,
    tiny_checkpoint,
)
from kgshatter.pretrained.mmlu import (
    MMLUItem,
    evaluate,
    load_items,
    parse_answer,
    score,
    zeroeval_prompt,
)
from kgshatter.pretrained.text import TextCorpus, TextRequest, TextTask
from kgshatter.sites import Site

FAMILIES = ("gpt2", "llama", "mamba")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {f: tiny_checkpoint(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="module")
def loaded(checkpoints):
    return {f: load_pretrained(p) for f, p in checkpoints.items()}


def corpus():
    return TextCorpus(TINY_TEXT * 20, "tiny")


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hugging_face(checkpoints, loaded, family):
    from transformers import AutoModelForCausalLM

    extra = {} if family == "mamba" else {"attn_implementation": "eager"}
    hf = AutoModelForCausalLM.from_pretrained(checkpoints[family], **extra)
    pm = loaded[family]
    tokens = pm.tokenizer("January is followed 8 months later by", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (pm.model(tokens) - hf(tokens).logits).abs().max()
    assert diff < 1e-4
    assert pm.family == family and pm.random_weights and pm.n_parameters > 0


def test_same_seed_same_checkpoint_bytes(tmp_path):
    a = tiny_checkpoint("gpt2", tmp_path / "a", seed=3)
    b = tiny_checkpoint("gpt2", tmp_path / "b", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_fire_at_every_advertised_site(loaded, family):
    pm = loaded[family]
    components = ["resid_pre", "resid_post"]
    components += (
        ["mixer_key", "mixer_out"] if family == "mamba" else ["attn_out", "mlp_post", "mlp_out"]
    )
    sites = [Site(layer, c) for layer in range(pm.n_layers) for c in components]
    fired = set()

    def seen(activation, hook):
        fired.add(hook.name)

    tokens = pm.tokenizer("Paris is a city", return_tensors="pt").input_ids
    with torch.no_grad():
        pm.model.run_with_hooks(tokens, fwd_hooks=[(s.hook_name, seen) for s in sites])
    expected = {pm.model.hook_dict[s.hook_name].name for s in sites}
    assert fired == expected


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["rome", "memit"])
def test_edits_succeed_and_undo_exactly(loaded, family, method):
    pm = loaded[family]
    task = cyclic_task("months", pm.tokenizer)
    text_task = TextTask(pm.model, pm.tokenizer, corpus(), seq_len=32)
    request = task.counterfactuals(1, seed=0, distance=2)[0]
    config = get_method(method).config("tiny-pretrained")
    before = {k: v.clone() for k, v in pm.model.state_dict().items()}
    edit = get_method(method).compute(pm.model, text_task, request, config, model_id=pm.model_id)
    assert edit.module == ("mixer" if family == "mamba" else "mlp")
    assert not task.success(pm.model, request)
    with edited(pm.model, edit):
        assert task.success(pm.model, request)
    prompts = text_task.bare_prompt(request).tokens
    with torch.no_grad():
        with edited(pm.model, edit):
            hooked = pm.model(prompts)
        patch = edit.apply_to_weights(pm.model)
        weights = pm.model(prompts)
        patch.restore()
    assert (hooked - weights).abs().max() < 1e-4
    after = pm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.fwd_hooks for p in pm.model.hook_dict.values())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reference", [False, True])
def test_target_optimisation_from_the_edited_block_equals_the_full_one(loaded, family, reference):
    """``kgshatter.editing.skip`` and ``kgshatter.editing.prefix`` on Hugging Face blocks: the
    same deltas with and without running the blocks below the edit and the columns before each
    row's delta position (tests/test_skip.py does the native bridge). Reference mode's bare
    rows start at another position than the prefixed ones, so they share passes left-padded."""
    from kgshatter.editing.prefix import PrefixCache, disabled
    from kgshatter.editing.targets import TargetProblem, optimize_many
    from kgshatter.sites import edit_sites

    pm = loaded[family]
    model = pm.model
    hook = edit_sites("mixer" if family == "mamba" else "mlp", 2)[1].hook_name
    text_task = TextTask(model, pm.tokenizer, corpus(), seq_len=32)
    request = cyclic_task("months", pm.tokenizer).counterfactuals(1, seed=0, distance=2)[0]
    make = text_task.reference_prompts if reference else text_task.prompts
    prompts, essence = make(request, 4, seed=0)
    problem = TargetProblem(prompts, text_task.target_tokens(request), essence)
    kw = {"steps": 4, "lr": 0.5, "kl_factor": 0.0625, "weight_decay": 0.5, "micro_batch": 2}
    kw |= {"clamp_norm_factor": 4.0, "position": "subject", "reference": reference}
    shapes: list[tuple[int, int]] = []
    upper = ("blocks.3.hook_out", lambda act, hook: shapes.append(tuple(act.shape[:2])))
    full = optimize_many(model, [hook], [problem], **kw, skip_frozen=False)[0]
    with model.hooks(fwd_hooks=[upper]):
        short = optimize_many(model, [hook], [problem], **kw)[0]
    widths = [w for rows, w in shapes if (rows, w) != (1, 1)]  # not the output-kind probe
    assert full.delta.norm() > 0
    torch.testing.assert_close(short.delta, full.delta, rtol=1e-4, atol=1e-6)
    assert short.losses == pytest.approx(full.losses, rel=1e-4)
    first = prompts.index("subject")
    if family == "mamba":  # no key/value cache: every pass runs every column
        with torch.no_grad():
            _, cache = model(prompts.tokens, return_type="logits_and_cache")
        assert PrefixCache.from_first_pass(cache) is None
        assert set(widths) == {prompts.tokens.shape[1]}
    else:  # the first pass runs all columns, the later ones from the delta position on
        assert widths[0] == prompts.tokens.shape[1] and int(first.max()) > 0
        assert max(widths[1:]) <= int((prompts.last - first).max()) + len(problem.tokens)
        assert max(widths[1:]) < widths[0]
        shapes.clear()
        with disabled(), model.hooks(fwd_hooks=[upper]):
            optimize_many(model, [hook], [problem], **kw)
        assert {w for rows, w in shapes if (rows, w) != (1, 1)} == {prompts.tokens.shape[1]}


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_sampling_with_a_kv_cache_gives_the_same_texts(loaded, family):
    from kgshatter.pretrained.text import sample_text

    pm = loaded[family]
    cached = sample_text(pm.model, pm.tokenizer, 4, 6, seed=3)
    full = sample_text(pm.model, pm.tokenizer, 4, 6, seed=3, use_cache=False)
    assert cached == full
    if family != "mamba":  # the tiny Mamba favours end-of-text: its samples decode to "."
        assert len(set(cached)) > 1


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # byte-level BPE and SentencePiece
def test_prompts_locate_the_subjects_last_token(loaded, family):
    pm = loaded[family]
    text_task = TextTask(pm.model, pm.tokenizer, seq_len=32)
    for subject in ("September", "Barcelona", "Tuesdayfriday"):  # one token, or several
        request = TextRequest("{} is followed 8 months later by", subject, "May")
        prompts, essence = text_task.prompts(request, 5, seed=0)
        assert len(prompts) == 5 and len(essence) == 5
        for row, s, last in zip(prompts.tokens, prompts.subject, prompts.last, strict=True):
            upto = pm.tokenizer.decode(row[: s + 1]).rstrip()
            nxt = pm.tokenizer.decode(row[s + 1 : last + 1])
            assert upto.endswith(subject)
            assert nxt.strip().startswith("is followed")
    # prefixes are sampled from the model with a seed: same seed, same prompts
    again = TextTask(pm.model, pm.tokenizer, seq_len=32).prompts(request, 5, seed=0)[0]
    assert torch.equal(again.tokens, prompts.tokens)


def test_months_task_queries_and_requests(loaded):
    task = cyclic_task("months", loaded["llama"].tokenizer)
    assert len(task.queries) == 12 * 11
    q = task.query("January", 8)
    assert q.prompt.format(q.subject) == "January is followed 8 months later by"
    assert q.answer == "September"
    for d in (1, 2, 3):
        for r in task.counterfactuals(6, seed=1, distance=d):
            old, new = task.subjects.index(r.old), task.subjects.index(r.target)
            assert (new - old) % 12 in (d, 12 - d)
    with pytest.raises(ValueError, match="distance"):
        task.counterfactuals(2, seed=0, distance=12)
    days = cyclic_task("days", loaded["gpt2"].tokenizer)
    assert days.query("Saturday", 2).answer == "Monday"
    # the editing papers' metrics: other wordings of the fact, the same question elsewhere
    request = task.request(q, target="December")
    para = task.paraphrases(request)
    assert [p.prompt.format(p.subject) for p in para] == [
        "8 months after January comes",
        "Counting 8 months on from January, one reaches",
    ]
    assert all(p.answer == "September" for p in para)
    near = task.neighbourhood(request)
    assert len(near) == 11 and all(n.prompt == q.prompt and n.subject != "January" for n in near)
    assert task.paraphrases(task.request(task.query("May", 1), "July"))[0].prompt == (
        "1 month after {} comes"
    )
    metrics = task.counterfact(loaded["llama"].model, request)
    assert set(metrics) == {"paraphrase", "neighbourhood"}
    assert 0 <= metrics["paraphrase"] <= 1 and 0 <= metrics["neighbourhood"] <= 1


def test_months_list_phrasing(loaded):
    """The list phrasing: the next item in four wordings; the first is edited, the others are
    its paraphrases, and accuracy leaves the edited fact out in every wording."""
    from kgshatter.pretrained.facts import FactScorer

    pm = loaded["llama"]
    task = cyclic_task("months", pm.tokenizer, phrasing="list")
    assert len(task.queries) == 4 * 12 and {q.hop for q in task.queries} == {1}
    q = task.query("December", 1)
    assert q.prompt.format(q.subject) == "The months in order: December," and q.answer == "January"
    with pytest.raises(ValueError, match="next item only"):
        task.query("May", 2)
    for d in (1, 4, 6):
        requests = task.counterfactuals(12, seed=d, distance=d)
        assert len({(r.subject, r.target) for r in requests}) == 12
        assert all(r.prompt == "The months in order: {}," and task.distance(r) == d
                   for r in requests)  # fmt: skip
    request = task.request(q, "March")
    para = task.paraphrases(request)
    assert [p.prompt.format(p.subject) for p in para] == [
        "Months of the year: December,", "Here are the months: December,",
        "Months in sequence: December,",
    ]  # fmt: skip
    # accuracy without the edited fact drops all four of its wordings
    scorer = FactScorer(task, pm.model)
    preds = task.predictions(pm.model)
    kept = [
        p == q.answer for p, q in zip(preds, task.queries, strict=True) if q.subject != "December"
    ]
    assert task.accuracy(pm.model, exclude=[request]) == pytest.approx(sum(kept) / len(kept))
    assert scorer.baseline == pytest.approx(len(scorer.known) / 48)
    # counterfactuals drawn among given queries only, and too few is one line
    among = [qq for qq in task.queries if qq.subject in ("May", "June")]
    assert {r.subject for r in task.counterfactuals(2, 0, 3, among=among)} == {"May", "June"}
    # beyond one request per fact: the same facts moved the other way, then one line
    both = task.counterfactuals(4, 0, 3, among=among)
    assert len({(r.subject, r.target) for r in both}) == 4
    with pytest.raises(ValueError, match="only 4 can be made from the 2 facts that can be edited"):
        task.counterfactuals(5, 0, 3, among=among)
    with pytest.raises(ValueError, match="only 2 can be made"):
        task.counterfactuals(3, 0, 6, among=among)  # half the ring: one way only
    with pytest.raises(ValueError, match="phrasing must be one of"):
        cyclic_task("months", pm.tokenizer, phrasing="poem")
    from kgshatter.pretrained.facts import natural_task

    with pytest.raises(ValueError, match="cities task has one phrasing"):
        natural_task("cities", pm.tokenizer, phrasing="list")


def test_causal_trace_restores_exactly_at_the_last_layer(loaded):
    """Restoring the residual stream after the last block at the last token gives the clean
    probability (the effect is clean - corrupted); tokens before the subject are never
    restored; restoring the last block at an earlier token changes nothing."""
    from kgshatter.pretrained.tracing import TOKEN_GROUPS, TracePrompt, causal_trace

    pm = loaded["gpt2"]
    prompts = [TracePrompt("The months in order: {},", "January", "February"),
               TracePrompt("In {} we", "New York", "are")]  # fmt: skip
    result = causal_trace(pm.model, pm.tokenizer, prompts, n_noise=2, seed=3)
    last = pm.model.cfg.n_layers - 1
    resid = result.effects["resid"]
    assert resid.shape == (pm.model.cfg.n_layers, len(TOKEN_GROUPS))
    assert resid[last, TOKEN_GROUPS.index("last token")] == pytest.approx(
        result.clean - result.corrupted, abs=1e-5
    )
    assert abs(resid[last, TOKEN_GROUPS.index("subject last")]) < 1e-6
    assert result.counts[TOKEN_GROUPS.index("subject middle")] == 1  # "New York": 2+ tokens
    again = causal_trace(pm.model, pm.tokenizer, prompts, n_noise=2, seed=3)
    assert all(np.array_equal(again.effects[k], v, equal_nan=True)
               for k, v in result.effects.items())  # fmt: skip
    assert 0 <= result.best_layer("mlp") < pm.model.cfg.n_layers
    with pytest.raises(ValueError, match="kind must be one of"):
        causal_trace(pm.model, pm.tokenizer, prompts, kinds=("mlp", "heads"))
    with pytest.raises(ValueError, match="at least one prompt"):
        causal_trace(pm.model, pm.tokenizer, [])


def test_tokenizer_without_the_months_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["abc abd"], trainers.BpeTrainer(vocab_size=300))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="a")
    with pytest.raises(ValueError, match="does not separate"):
        cyclic_task("months", fast, scoring="first-token")
    # whole-sequence scoring cannot help either: this tokenizer maps months to the same ids
    with pytest.raises(ValueError, match="cannot be told apart"):
        cyclic_task("months", fast)


def test_self_sampled_corpus_is_seeded_cached_and_extends(loaded, tmp_path):
    from kgshatter.pretrained.text import SampledCorpus

    pm = loaded["llama"]
    corpus = SampledCorpus(pm.model, pm.tokenizer, pm.model_id, length=16, batch=4, seed=1,
                           cache_dir=tmp_path)  # fmt: skip
    first = corpus.texts_for(64)  # one batch of 4 texts x 16 tokens
    assert len(first) == 4 and len(list(tmp_path.glob("sampled-*.json"))) == 1
    more = corpus.texts_for(65)
    assert more[:4] == first and len(more) == 8  # extends the same texts
    again = SampledCorpus(pm.model, pm.tokenizer, pm.model_id, length=16, batch=4, seed=1,
                          cache_dir=tmp_path)  # fmt: skip
    assert again.texts_for(100) == more and again.fingerprint == corpus.fingerprint
    other = SampledCorpus(pm.model, pm.tokenizer, pm.model_id, length=16, batch=4, seed=2)
    assert other.texts_for(64) != first and other.fingerprint != corpus.fingerprint
    windows = corpus.token_windows(pm.tokenizer, 8, 40)
    assert windows.shape == (5, 8)
    task = TextTask(pm.model, pm.tokenizer, corpus, CovarianceCache(tmp_path / "c"), seq_len=8)
    stats = task.stats(pm.model, 1, 40, 0, pm.model_id)
    assert stats.key.corpus.startswith("text:sampled-")


def test_city_country_tree_edit(loaded):
    pm = loaded["gpt2"]
    task = city_country_task(pm.tokenizer)
    request = task.counterfactuals(1, seed=0)[0]
    assert request.target != request.old and request.target in task.candidates
    near = task.neighbourhood(request)  # the subject's siblings under its country
    assert len(near) == 3 and all(task.parent[n.subject] == request.old for n in near)
    assert len(task.paraphrases(request)) == 2
    text_task = TextTask(pm.model, pm.tokenizer, corpus(), seq_len=32)
    method = get_method("rome")
    edit = method.compute(pm.model, text_task, request, method.config("tiny-pretrained"))
    with edited(pm.model, edit):
        assert task.success(pm.model, request)
    reps = task.representations(pm.model, [Site(3, "resid_post")])[Site(3, "resid_post")]
    assert reps.shape == (20, pm.model.cfg.d_model)


def test_corpus_statistics_are_cached(loaded, tmp_path):
    pm = loaded["llama"]
    (tmp_path / "a.txt").write_text(" ".join(TINY_TEXT) * 5)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": TINY_TEXT[0]}) + "\n")
    c = TextCorpus.from_files([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    assert len(c.texts) == 2
    assert c.token_windows(pm.tokenizer, 16, 200).shape == (12, 16)
    cache = CovarianceCache(tmp_path / "cache")
    s1 = TextTask(pm.model, pm.tokenizer, c, cache, seq_len=16).stats(pm.model, 1, 200, 0, "id")
    s2 = TextTask(pm.model, pm.tokenizer, c, cache, seq_len=16).stats(pm.model, 1, 200, 0, "id")
    assert (cache.misses, cache.hits) == (1, 1)
    assert torch.equal(s1.eigenvalues, s2.eigenvalues)
    with pytest.raises(ValueError, match="corpus"):
        TextTask(pm.model, pm.tokenizer).stats(pm.model, 1, 200, 0, "id")
    with pytest.raises(ValueError, match="suffixes"):
        (tmp_path / "c.csv").write_text("x")
        TextCorpus.from_files([tmp_path / "c.csv"])


def test_bad_checkpoints_are_refused(tmp_path, checkpoints, monkeypatch):
    import huggingface_hub.constants

    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "bert" / "model.safetensors"))
    (tmp_path / "bert" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="supports the families"):
        load_pretrained(tmp_path / "bert")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedUnavailable, match="config.json"):
        load_pretrained(tmp_path / "empty")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PretrainedUnavailable, match="hf download"):
        load_pretrained("gpt2-xl")
    with pytest.raises(ValueError, match="dtype"):
        load_pretrained(checkpoints["gpt2"], dtype="int8")
    monkeypatch.setattr("kgshatter.pretrained.loading.available_bytes", lambda device: 1000)
    with pytest.raises(MemoryError, match="GiB"):
        load_pretrained(checkpoints["gpt2"])


def test_months_refuses_damaged_checkpoints_in_one_line(tmp_path, checkpoints, capsys):
    """What a probe of `kgshatter months` found: each is one line, exit 2, nothing in --out."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = checkpoints["gpt2"]
    cut = shutil.copytree(src, tmp_path / "cut")
    weights = cut / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    nan = shutil.copytree(src, tmp_path / "nan")
    tensors = load_file(str(nan / "model.safetensors"))
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_file(tensors, str(nan / "model.safetensors"), metadata={"format": "pt"})
    bpe = shutil.copytree(src, tmp_path / "bpe")  # a GPT-2 tokenizer's vocab.json alone
    (bpe / "tokenizer.json").unlink()
    (bpe / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "file").write_text("x")
    cases = {
        "cut": (cut, "damaged or truncated"),
        "nan": (nan, "NaN or infinite weights"),
        "bpe": (bpe, "merges.txt"),
        "nowhere": (tmp_path / "no" / "dir", "is not a directory"),
        "file": (tmp_path / "file", "is not a directory"),
        "hub": ("nosuch-org/nosuch-model", "not in the local Hugging Face cache"),
    }
    for label, (model, message) in cases.items():
        out = tmp_path / f"out-{label}"
        code = main(["months", "--model", str(model), "--out", str(out), "--n", "1",
                     "--distance", "1", "--quiet"])  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert code == 2, (label, err)
        assert message in err and len(err.splitlines()) == 1, (label, err)
        assert not out.exists() or not any(out.iterdir()), label


def test_months_refuses_a_prompt_set_the_model_never_answers(tmp_path, checkpoints, capsys):
    out = tmp_path / "m"
    assert main(["months", "--model", str(checkpoints["llama"]), "--out", str(out), "--facts",
                 "known", "--n", "100", "--distance", "1", "--quiet"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "can be made from the" in err or "answers none of the" in err
    assert not (out / "months.json").exists()


def test_a_layer_the_model_lacks_is_refused(loaded):
    pm = loaded["gpt2"]
    task = cyclic_task("months", pm.tokenizer)
    request = task.counterfactuals(1, seed=0, distance=1)[0]
    method = get_method("rome")
    with pytest.raises(ValueError, match="layer 17"):
        method.compute(
            pm.model, TextTask(pm.model, pm.tokenizer), request, method.config("gpt2-xl")
        )
    with pytest.raises(ValueError, match="Mamba"):
        get_method("pmet").compute(
            loaded["mamba"].model,
            TextTask(loaded["mamba"].model, loaded["mamba"].tokenizer, corpus()),
            request,
            get_method("pmet").config("tiny-pretrained"),
        )


ITEMS = [
    MMLUItem("2 + 2 = ?", ("3", "4", "5", "6"), 1),
    MMLUItem("Capital of France?", ("Rome", "Paris", "Lyon", "Nice"), 1),
    MMLUItem("Largest planet?", ("Mars", "Venus", "Jupiter", "Earth"), 2),
]


def test_mmlu_parser_and_scorer():
    assert parse_answer('{"reasoning": "sum", "answer": "B"}') == "B"
    assert parse_answer('```json\n{"reasoning": "x", "answer": "(C)"}\n```') == "C"
    assert parse_answer('{"reasoning": "cut off... "answer": "D"') == "D"  # malformed JSON
    assert parse_answer('{"reasoning": "x", "answer": "G"}') is None  # not a choice
    assert parse_answer("The answer is probably B.") is None  # no JSON answer
    assert parse_answer("") is None
    gens = ['{"reasoning": "", "answer": "B"}', '{"answer": "A"}', "no idea"]
    result = score(ITEMS, gens)
    assert result.accuracy == pytest.approx(1 / 3)
    assert result.no_answer_rate == pytest.approx(1 / 3)
    assert result.answers == ["B", "A", None]
    assert "(B) Paris" in zeroeval_prompt(ITEMS[1]) and '"answer"' in zeroeval_prompt(ITEMS[1])
    with pytest.raises(ValueError, match="choice letter"):
        MMLUItem.from_dict({"question": "q", "choices": ["a", "b"], "answer": "E"})


def test_mmlu_items_and_generation_with_an_edit(loaded, tmp_path):
    rows = [
        {"question": i.question, "choices": list(i.choices), "answer": "ABCD"[i.answer]}
        for i in ITEMS
    ]
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    items = load_items(path, limit=2)
    assert [i.answer for i in items] == [1, 1]
    pm = loaded["gpt2"]
    plain = evaluate(pm.model, pm.tokenizer, items, max_new_tokens=4, batch_size=2, progress=False)
    assert plain.n == 2 and len(plain.generations) == 2
    task = cyclic_task("months", pm.tokenizer)
    request = task.counterfactuals(1, seed=0, distance=3)[0]
    method = get_method("rome")
    edit = method.compute(
        pm.model, TextTask(pm.model, pm.tokenizer, corpus(), seq_len=32), request,
        method.config("tiny-pretrained"),
    )  # fmt: skip
    with edited(pm.model, edit):
        hooked = evaluate(
            pm.model, pm.tokenizer, items, max_new_tokens=4, batch_size=2, progress=False
        )
    assert hooked.n == 2
    assert not any(p.fwd_hooks for p in pm.model.hook_dict.values())
    with pytest.raises(FileNotFoundError):
        load_items(tmp_path / "missing.jsonl")


def test_months_cli_on_a_tiny_checkpoint(tmp_path, capsys):
    items = tmp_path / "mmlu.jsonl"
    items.write_text(json.dumps({"question": "q?", "choices": ["a", "b", "c", "d"], "answer": 0}))
    out = tmp_path / "months"
    code = main(["months", "--model", "tiny:llama", "--out", str(out), "--distance", "1..2",
                 "--n", "2", "--mmlu", str(items), "--mmlu-tokens", "3", "--quiet"])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["per_distance"]) == {"1", "2"}
    assert summary["random_weights"] and summary["mmlu_before"]["n"] == 1
    assert summary["scoring"] == "first-token"  # "auto" on months with distinct first tokens
    report = (out / "report.md").read_text()
    assert "tiny random checkpoint" in report and (out / "rings.png").is_file()
    # the ring per layer and the causal trace of known facts (a random model knows a few)
    assert (out / "ring_layers.png").is_file() and "ring_layers.png" in report
    assert summary["ability_before"]["perplexity"] > 1
    for claim in summary["claims"].values():  # Spearman of each claimed quantity on d
        assert claim["n"] == 4 and isinstance(claim["holds"], bool)
        assert -1 <= claim["rho"] <= 1 or ("unchanged" in claim and not claim["holds"])
    assert {"R", "accuracy_change", "isomap_after"} <= set(summary["claims"])
    assert 0 <= summary["per_distance"]["1"]["calendar"] <= 1
    assert summary["facts"] == "all" and summary["phrasing"] == "hop"
    assert summary["known"] <= summary["queries"] == 132
    if summary["known"]:
        trace = json.loads((out / "tracing.json").read_text())
        assert len(trace["prompts"]) == min(12, summary["known"]) and "Causal tracing" in report
    rows_path = out / "rows.jsonl"
    rows = rows_path.read_text().splitlines()
    assert len(rows) == 4
    first = json.loads(rows[0])
    for field in ("paraphrase", "neighbourhood", "neighbourhood_before", "fluency",
                  "fluency_before", "perplexity", "calendar"):  # fmt: skip
        assert isinstance(first[field], float), field
    assert "| paraphrase | neighbourhood (change) | fluency (change) |" in report
    assert "it/s" not in capsys.readouterr().err  # --quiet: no progress bars, the loaders' too
    assert main(["months", "--model", "tiny:llama", "--out", str(out), "--distance", "a..b"]) == 2
    assert main(["months", "--model", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    # refused before anything is touched: a bad distance, another task into this folder
    assert main(["months", "--model", "tiny:llama", "--out", str(out), "--distance", "0"]) == 2
    assert main(["months", "--model", "tiny:llama", "--out", str(out), "--task", "days",
                 "--distance", "1..2", "--n", "2", "--quiet"]) == 2  # fmt: skip
    assert "task ('months' there, 'days' now)" in capsys.readouterr().err
    assert rows_path.read_text().splitlines() == rows
    # a kill during the last edit: its row torn, the summary gone; the rerun redoes that edit only
    rows_path.write_text("\n".join(rows[:3]) + "\n" + rows[3][:20])
    (out / "summary.json").unlink()
    rerun = ["months", "--model", "tiny:llama", "--out", str(out), "--distance", "1..2",
             "--n", "2", "--mmlu", str(items), "--mmlu-tokens", "3", "--quiet"]  # fmt: skip
    assert main(rerun) == 0
    again = rows_path.read_text().splitlines()
    assert again[:3] == rows[:3] and len(again) == 4
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
    assert strip(again[3]) == strip(rows[3])
    resumed = json.loads((out / "summary.json").read_text())["per_distance"]
    for d, entry in summary["per_distance"].items():
        for field in ("n", "success", "accuracy_change", "R"):
            assert resumed[d][field] == entry[field]


def test_months_runs_share_their_causal_trace_through_the_cache(tmp_path, monkeypatch):
    """Another method's run of the same model and facts reads the trace from --cache."""
    import kgshatter.pretrained.tracing as tracing

    cache, args = tmp_path / "cache", ["--distance", "1", "--n", "1", "--quiet", "--facts",
                                       "all", "--no-ability", "--fluency-tokens", "0"]  # fmt: skip
    model = str(tiny_checkpoint("gpt2", tmp_path / "tiny"))
    assert main(["months", "--model", model, "--out", str(tmp_path / "a"), "--cache", str(cache),
                 *args]) == 0  # fmt: skip
    first = (tmp_path / "a" / "tracing.json").read_text()

    def no_tracing(*a, **k):
        raise AssertionError("traced again")

    monkeypatch.setattr(tracing, "causal_trace", no_tracing)
    assert main(["months", "--model", model, "--method", "memit", "--out", str(tmp_path / "b"),
                 "--cache", str(cache), *args]) == 0  # fmt: skip
    assert (tmp_path / "b" / "tracing.json").read_text() == first
    assert (tmp_path / "b" / "tracing.png").is_file()


def test_months_without_a_preset_fails_before_loading(tmp_path, capsys, monkeypatch):
    """Which (model, method) pairs have a preset is known from the name: no weight is loaded
    (loading would need the hub here) before the one-line error."""
    import kgshatter.pretrained.loading as pretrained_module

    def no_loading(*a, **k):
        raise AssertionError("load_pretrained was called")

    monkeypatch.setattr(pretrained_module, "load_pretrained", no_loading)
    out = str(tmp_path / "m")
    assert main(["months", "--model", "llama3-8b", "--method", "pmet", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "pmet has no 'llama3-8b' preset" in err
    assert "methods with one: ['alphaedit', 'memit', 'rome']" in err
    assert main(["months", "--model", "gpt2", "--out", out]) == 2  # neither a folder nor cached
    assert "'gpt2' is not a directory here and not in the local" in capsys.readouterr().err
    assert main(["months", "--model", "gpt2-xl", "--preset", "nope", "--out", out]) == 2
    assert "nope" in capsys.readouterr().err
    from kgshatter.studies.months import resolve_preset

    assert resolve_preset("meta-llama/Meta-Llama-3-8B", "rome") == "llama3-8b"  # EasyEdit's
    assert resolve_preset("tiny:gpt2", "memit") == "tiny-pretrained"


@pytest.mark.pretrained
def test_gpt2_xl_months_replication_real_weights(tmp_path):
    """Needs GPT-2-XL in the local Hugging Face cache (or network) and a text corpus."""
    pm = load_pretrained("gpt2-xl")
    task = cyclic_task("months", pm.tokenizer)
    assert task.accuracy(pm.model) > 0.3


def test_run_protocol_serves_text_tasks(loaded, monkeypatch, tmp_path):
    """One protocol loop for graphs and text: single, batch and sequential edits of months
    facts on a tiny GPT-2, scored by FactScorer; a request the model already answers is a
    skipped record, and the months replication writes it as a skipped row."""
    from kgshatter.editing import core
    from kgshatter.editing.protocols import run_protocol
    from kgshatter.pretrained.facts import FactScorer
    from kgshatter.studies.months import MonthsConfig, run_months

    pm = loaded["gpt2"]
    task = cyclic_task("months", pm.tokenizer)
    text_task = TextTask(pm.model, pm.tokenizer, corpus(), seq_len=32)
    scorer = FactScorer(task, pm.model)
    requests = task.counterfactuals(2, seed=3, distance=2)
    before = {k: v.clone() for k, v in pm.model.state_dict().items()}
    for name, protocol in (("rome", "single"), ("memit", "batch"), ("memit", "sequential")):
        method = get_method(name)
        result = run_protocol(pm.model, text_task, method, method.config("tiny-pretrained"),
                              requests, protocol, scorer)  # fmt: skip
        assert len(result.records) == (1 if protocol == "batch" else 2)
        for rec in result.records:
            assert rec.scored and rec.protocol == protocol
            assert {r["distance"] for r in rec.requests} == {2}
            assert rec.efficacy is not None and 0 <= rec.efficacy <= 1
            detail = rec.efficacy_detail[0]
            assert 0 <= detail.prompt_fraction <= 1 and 0 < detail.target_prob < 1
            change = rec.accuracy_change["direct"]["all"]
            assert change == pytest.approx(rec.accuracy["direct"]["all"] - scorer.baseline)
            assert set(rec.neighbourhood) == {"accuracy", "before", "change"}
        if protocol == "sequential":
            assert result.records[-1].retained is not None
        assert sum(r.efficacy for r in result.records) >= 1  # the tiny preset edits months
    after = pm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.fwd_hooks for p in pm.model.hook_dict.values())
    with pytest.raises(ValueError, match="not a candidate"):
        run_protocol(pm.model, text_task, "rome", get_method("rome").config("tiny-pretrained"),
                     [TextRequest("{} is followed 1 month later by", "May", "Paris")], "single",
                     scorer)  # fmt: skip

    # the model "already answers" the first request: a skipped record and a skipped row
    real = core.check_changes_answer
    first = requests[0]

    def already(model, task_, request, prompts, fwd_hooks=()):
        if request == first:
            raise core.AlreadyAnswered(f"the model already answers {request.describe()}")
        return real(model, task_, request, prompts, fwd_hooks)

    monkeypatch.setattr(core, "check_changes_answer", already)
    rome = get_method("rome")
    (rec, _) = run_protocol(pm.model, text_task, rome, rome.config("tiny-pretrained"), requests,
                            "single", scorer).records  # fmt: skip
    assert not rec.scored and "already answers" in rec.skipped
    config = MonthsConfig(distances=(2,), n_edits=2, seed=1, fluency_tokens=0)
    first = task.counterfactuals(2, seed=3, distance=2)[0]  # months seeds requests seed + d
    summary = run_months(pm, config, tmp_path / "m", corpus=corpus(), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "m" / "rows.jsonl").read_text().splitlines()]
    assert [bool(r.get("skipped")) for r in rows] == [True, False]
    assert summary.per_distance["2"].n == 1 and summary.per_distance["2"].skipped == 1
    again = run_months(pm, config, tmp_path / "m", corpus=corpus(), progress=False)
    assert again.per_distance == summary.per_distance  # nothing recomputed on a rerun


@pytest.mark.parametrize("family", FAMILIES)
def test_edits_export_as_merged_weights_and_a_peft_lora_adapter(loaded, family, tmp_path):
    """Both exports, loaded in plain transformers / PEFT, give the bridge's edited logits; two
    edits of one matrix make one adapter of summed rank; a dense (FT-L) delta has no LoRA."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kgshatter.pretrained.export import export_lora, export_merged

    pm = loaded[family]
    task = cyclic_task("months", pm.tokenizer)
    text_task = TextTask(pm.model, pm.tokenizer, corpus(), seq_len=32)
    requests = task.counterfactuals(2, seed=1, distance=3)
    rome = get_method("rome")
    edits = [
        rome.compute(pm.model, text_task, r, rome.config("tiny-pretrained"), model_id=pm.model_id)
        for r in requests
    ]
    tokens = text_task.bare_prompt(requests[0]).tokens
    with torch.no_grad(), edited(pm.model, *edits):
        want = pm.model(tokens)
    extra = {} if family == "mamba" else {"attn_implementation": "eager"}

    merged = export_merged(pm, edits, tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(merged, **extra).eval()
    base = AutoModelForCausalLM.from_pretrained(pm.source, **extra).eval()
    with torch.no_grad():
        assert (hf(tokens).logits - want).abs().max() < 1e-4
        assert (base(tokens).logits - want).abs().max() > 1e-3  # the edit changed something

    if family == "mamba":
        with pytest.raises(ValueError, match="PEFT refuses LoRA on Mamba"):
            export_lora(pm, edits, tmp_path / "lora")
        return
    adapter = export_lora(pm, edits, tmp_path / "lora")
    record = json.loads((adapter / "adapter_config.json").read_text())
    assert record["r"] == 2 and record["lora_alpha"] == 2  # two rank-1 edits of one matrix
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        assert (peft_model(tokens).logits - want).abs().max() < 1e-4

    ft = get_method("ft")
    dense = ft.compute(pm.model, text_task, requests[0], ft.config("tiny-pretrained"))
    with pytest.raises(ValueError, match="dense, not low-rank"):
        export_lora(pm, dense, tmp_path / "ft")
    with pytest.raises(ValueError, match="exists"):
        export_merged(pm, edits, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "merged"]  # nothing half-written
