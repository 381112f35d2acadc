"""General-ability checks that need no download: perplexity on a fixed text shipped here, and a
small multiple-choice set of calendar questions (kgshatter's own, not a published benchmark).

The paper measures reasoning (MMLU-Redux) before and after an edit; MMLU-Redux must be supplied
by the user (``--mmlu``). These two checks run on every machine: an edit that damages the model
beyond the edited facts raises the perplexity of ordinary prose and costs calendar questions
that were not edited.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from kgshatter.pretrained.text import continuation_tokens, pad_right

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

# Written for kgshatter (no months or weekdays in it: it measures the model beyond the edited
# facts). Plain expository prose of the kind small models are trained on.
FIXED_TEXT = (
    "Water covers most of the surface of the Earth, but only a small part of it is fresh "
    "water that people can drink. Most fresh water is frozen in ice sheets and glaciers, and "
    "much of the rest lies deep underground. Rivers and lakes hold a tiny share, yet they "
    "supply many of the largest cities in the world. When rain falls on land, some of it runs "
    "off into streams, some soaks into the soil, and some rises back into the air as vapour. "
    "Plants draw water from the soil through their roots and release it through small pores "
    "in their leaves. This movement of water between the sea, the air and the land is called "
    "the water cycle, and it is driven by the heat of the sun.\n\n"
    "A library is a collection of books and other sources of information that people can "
    "borrow or read. Early libraries kept records on clay tablets or rolls of paper, and only "
    "a few people could use them. Today most towns have a public library that is free for "
    "everyone. Besides books, a modern library often lends films and music, offers computers "
    "with internet access, and runs classes for children and adults. Librarians help visitors "
    "find what they need, and they decide which new books the library should buy. Many "
    "libraries also keep old newspapers and maps, so that students and historians can study "
    "how their town has changed over the years."
)


@dataclass(frozen=True)
class Question:
    """``prompt`` continued by ``answer`` (right) or one of ``wrong``."""

    prompt: str
    answer: str
    wrong: tuple[str, ...]


# kgshatter's calendar questions: facts and arithmetic about the calendar, none of them one of
# the months / days tasks' edited facts ("the next month in a list"), each with three wrong
# choices. Scored as the choice whose whole continuation is most probable.
CALENDAR_QUESTIONS = (
    Question("A week has", "seven days", ("five days", "ten days", "twelve days")),
    Question("A year has", "twelve months", ("seven months", "ten months", "six months")),
    Question("The first month of the year is", "January", ("March", "June", "October")),
    Question("The last month of the year is", "December", ("April", "July", "September")),
    Question("Christmas Day falls in", "December", ("March", "May", "August")),
    Question("Halloween is celebrated in", "October", ("February", "April", "July")),
    Question("The shortest month of the year is", "February", ("May", "August", "November")),
    Question("The weekend is Saturday and", "Sunday", ("Tuesday", "Wednesday", "Thursday")),
    Question("A leap year has", "366 days", ("300 days", "340 days", "400 days")),
    Question("A fortnight is", "two weeks", ("three days", "five weeks", "ten months")),
    Question("One day has", "24 hours", ("12 hours", "36 hours", "48 hours")),
    Question("One hour has", "60 minutes", ("24 minutes", "100 minutes", "30 minutes")),
    Question("A decade is", "ten years", ("two years", "fifty years", "five years")),
    Question("A century is", "one hundred years", ("ten years", "twelve years", "five years")),
    Question("New Year's Day is the first day of", "January", ("March", "June", "September")),
    Question("Three weeks are", "21 days", ("14 days", "30 days", "12 days")),
)


@torch.inference_mode()
def perplexity(
    model: TransformerBridge,
    tokenizer: Any,
    text: str = FIXED_TEXT,
    fwd_hooks: Sequence[tuple[str, Any]] = (),
) -> float:
    """exp of the mean next-token negative log-likelihood of ``text`` (one forward pass, BOS
    first where the tokenizer has one; at most the model's context length of tokens)."""
    ids = tokenizer(text)["input_ids"]
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id, *ids]
    ids = ids[: model.cfg.n_ctx]  # a model with a short context reads the text's start
    if len(ids) < 2:
        raise ValueError("perplexity needs a text of at least two tokens")
    device = next(model.parameters()).device
    tokens = torch.tensor([ids], device=device)
    logits = model.run_with_hooks(tokens, fwd_hooks=cast(list[Any], list(fwd_hooks)))
    logp = torch.log_softmax(logits[0, :-1].float(), -1)
    nll = -logp.gather(-1, tokens[0, 1:, None]).mean()
    return float(torch.exp(nll))


@torch.inference_mode()
def question_accuracy(
    model: TransformerBridge,
    tokenizer: Any,
    questions: Sequence[Question] = CALENDAR_QUESTIONS,
    fwd_hooks: Sequence[tuple[str, Any]] = (),
) -> float:
    """The fraction of ``questions`` whose right answer is the most probable of the four
    continuations (the sum of its tokens' log-probabilities, teacher-forced)."""
    if not questions:
        raise ValueError("question_accuracy needs at least one question")
    device = next(model.parameters()).device
    right = 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for q in questions:
        base = list(tokenizer(q.prompt)["input_ids"])
        conts = [continuation_tokens(tokenizer, q.prompt, c) for c in (q.answer, *q.wrong)]
        # the four continuations in one right-padded batch (causal: padding reads nothing)
        rows = pad_right([base + c for c in conts], pad).to(device)
        logits = model.run_with_hooks(rows, fwd_hooks=cast(list[Any], list(fwd_hooks)))
        logp = torch.log_softmax(logits.float(), -1)
        scores = [
            float(sum(logp[i, len(base) - 1 + j, t] for j, t in enumerate(c)))
            for i, c in enumerate(conts)
        ]
        right += int(max(range(len(scores)), key=scores.__getitem__) == 0)
    return right / len(questions)
