"""Multi-token targets for text edits, and whole-sequence scoring of candidates.

A tiny random GPT-2 with a byte-level BPE trained on a few lines (``tiny_checkpoint``): its
tokenizer splits "New Zealand" into ten tokens, so every path here sees real multi-token
answers. The single-token path is unchanged byte for byte (checked against the previous code
when this landed; the reference tests in ``test_reference.py`` pin it).
"""

from __future__ import annotations

import pytest
import torch
from kgshatter.hooks import edited

from kgshatter.editing import get_method
from kgshatter.editing.core import AlreadyAnswered, Prompts, answer_logits, check_changes_answer
from kgshatter.editing.targets import optimize_targets
from kgshatter.pretrained.facts import TreeTask, cyclic_task
from kgshatter.pretrained.loading import TINY_TEXT, load_pretrained, tiny_checkpoint
from kgshatter.pretrained.text import TextCorpus, TextRequest, TextTask

PROMPT = "{} is a city in the country of"


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return load_pretrained(tiny_checkpoint("gpt2", tmp_path_factory.mktemp("ckpt") / "gpt2"))


def _teacher_forced_nll(model, prompts: Prompts, target: list[int]) -> torch.Tensor:
    """Per prompt, the mean NLL of ``target``'s tokens, one forward pass per token prefix."""
    rows = []
    for i in range(len(prompts)):
        last = int(prompts.last[i])
        ids = prompts.tokens[i, : last + 1].tolist()
        nll = 0.0
        for j, t in enumerate(target):
            with torch.no_grad():
                logits = model(torch.tensor([ids + target[:j]]))[0, -1].float()
            nll -= float(torch.log_softmax(logits, -1)[t])
        rows.append(nll / len(target))
    return torch.tensor(rows)


def test_a_text_target_is_all_its_tokens_unless_asked_otherwise(gpt2):
    request = TextRequest(PROMPT, "Paris", "New Zealand")
    whole = TextTask(gpt2.model, gpt2.tokenizer, seq_len=32).target_tokens(request)
    first = TextTask(gpt2.model, gpt2.tokenizer, seq_len=32, whole_target=False)
    assert len(whole) > 2
    assert gpt2.tokenizer.decode(list(whole)).strip() == "New Zealand"
    assert first.target_tokens(request) == whole[:1] == (first.target_token(request),)


@pytest.mark.ill_typed
def test_whole_target_must_be_a_boolean(gpt2):
    with pytest.raises(ValueError, match="whole_target"):
        TextTask(gpt2.model, gpt2.tokenizer, whole_target="yes")


def test_prompts_continued_by_an_answer_predict_it_in_place(gpt2):
    task = TextTask(gpt2.model, gpt2.tokenizer, seq_len=32)
    request = TextRequest(PROMPT, "Paris", "New Zealand")
    prompts, _ = task.prompts(request, 3, seed=0)
    target = list(task.target_tokens(request))
    forced = prompts.followed_by(target[:-1])
    assert torch.equal(forced.last, prompts.last) and torch.equal(forced.subject, prompts.subject)
    at = forced.answer_positions(len(target))
    for i in range(len(prompts)):
        last = int(prompts.last[i])
        assert forced.tokens[i, : last + 1].tolist() == prompts.tokens[i, : last + 1].tolist()
        assert forced.tokens[i, at[i, 1:]].tolist() == target[:-1]
    assert prompts.followed_by([]) is prompts
    # answer_logits reads what a per-token forward pass reads
    logp = torch.log_softmax(answer_logits(gpt2.model, prompts, target).float(), -1)
    mine = -logp.gather(-1, torch.tensor(target).expand(len(prompts), -1)[..., None])[..., 0]
    assert torch.allclose(mine.mean(1), _teacher_forced_nll(gpt2.model, prompts, target), atol=1e-4)


def test_the_objective_is_the_mean_nll_over_the_targets_tokens(gpt2):
    task = TextTask(gpt2.model, gpt2.tokenizer, seq_len=32)
    request = TextRequest(PROMPT, "Paris", "New Zealand")
    prompts, essence = task.prompts(request, 3, seed=0)
    target = list(task.target_tokens(request))
    options = dict(lr=0.5, kl_factor=0.0, weight_decay=0.0, clamp_norm_factor=4.0)
    result = optimize_targets(
        gpt2.model, ["blocks.2.hook_mlp_out"], prompts, target, essence, steps=1, **options
    )
    expected = float(_teacher_forced_nll(gpt2.model, prompts, target).mean())
    assert result.losses[0] == pytest.approx(expected, rel=1e-4)
    # a one-token target is the same problem whether given as an int or a 1-tuple
    one = optimize_targets(gpt2.model, ["blocks.2.hook_mlp_out"], prompts, target[0], essence,
                           steps=3, **options)  # fmt: skip
    same = optimize_targets(gpt2.model, ["blocks.2.hook_mlp_out"], prompts, target[:1], essence,
                            steps=3, **options)  # fmt: skip
    assert torch.equal(one.delta, same.delta)


@pytest.mark.parametrize("method", ["rome", "memit", "ft"])
def test_a_multi_token_edit_makes_the_model_continue_with_the_whole_target(gpt2, method):
    # an untrained tiny model can carry an edit from the prompt's last token only a little way
    # forward; "Spain Spain" (two tokens, the second its own continuation) is within its reach
    task = TextTask(gpt2.model, gpt2.tokenizer, TextCorpus(TINY_TEXT * 20, "tiny"), seq_len=32)
    request = TextRequest(PROMPT, "Paris", "Spain Spain", old="France")
    target = list(task.target_tokens(request))
    assert len(target) == 2
    spec = get_method(method)
    bare = task.bare_prompt(request)
    tokens = bare.tokens[:, : int(bare.last[0]) + 1]
    assert answer_logits(gpt2.model, bare, target).argmax(-1)[0].tolist() != target
    edit = spec.compute(gpt2.model, task, request, spec.config("tiny-pretrained"))
    with edited(gpt2.model, edit):
        assert answer_logits(gpt2.model, bare, target).argmax(-1)[0].tolist() == target
        for _ in target:  # nothing forced: greedy decoding writes the target out
            tokens = torch.cat([tokens, gpt2.model(tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    assert tokens[0, -len(target) :].tolist() == target


def test_a_target_the_model_already_continues_with_is_refused(gpt2):
    task = TextTask(gpt2.model, gpt2.tokenizer, seq_len=32)
    request = TextRequest(PROMPT, "Paris", "New Zealand")
    prompts, _ = task.prompts(request, 3, seed=0)
    own: list[int] = []  # the model's greedy continuation under prompt-averaged softmax
    for _ in range(3):
        probs = torch.softmax(answer_logits(gpt2.model, prompts, [*own, 0]).float(), -1)
        own.append(int(probs.mean(0)[len(own)].argmax()))

    class Fixed:  # a task whose target is fixed token ids
        def __init__(self, tokens):
            self.tokens = tuple(tokens)

        def target_tokens(self, request):
            return self.tokens

        def describe(self, request):
            return request.describe()

    for answered in (own, own[:1]):
        with pytest.raises(AlreadyAnswered, match="already answers"):
            check_changes_answer(gpt2.model, Fixed(answered), request, prompts)
    other = (own[2] + 1) % gpt2.model.cfg.d_vocab
    check_changes_answer(gpt2.model, Fixed([*own[:2], other]), request, prompts)  # no error


def test_candidates_sharing_a_first_token_are_scored_whole(gpt2):
    groups = {"New Zealand": ("Paris", "Lyon"), "New York": ("Rome", "Milan")}
    with pytest.raises(ValueError, match="scoring='sequence'"):
        TreeTask("cities", groups, PROMPT, gpt2.tokenizer, scoring="first-token")
    task = TreeTask("cities", groups, PROMPT, gpt2.tokenizer)
    assert task.scoring == "sequence"
    assert task.first_tokens[0] == task.first_tokens[1]
    scores = task.sequence_logprobs(gpt2.model, task.queries[:2])
    assert scores.shape == (2, 2)
    prompts = task.encode_queries(task.queries[:1])
    for j, tokens in enumerate(task.candidate_tokens):
        nll = _teacher_forced_nll(gpt2.model, prompts, list(tokens))
        assert float(scores[0, j]) == pytest.approx(-float(nll[0]) * len(tokens), rel=1e-4)
    preds = task.predictions(gpt2.model, task.queries[:2])
    assert preds == [task.candidates[int(j)] for j in scores.argmax(-1)]
    # the months' candidates start with distinct tokens: first-token scoring, as before
    assert cyclic_task("months", gpt2.tokenizer).scoring == "first-token"
    sequence = cyclic_task("months", gpt2.tokenizer, scoring="sequence")
    assert 0.0 <= sequence.accuracy(gpt2.model) <= 1.0
    with pytest.raises(ValueError, match="scoring"):
        cyclic_task("months", gpt2.tokenizer, scoring="best")
