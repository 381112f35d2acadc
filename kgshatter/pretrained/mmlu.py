"""MMLU-Redux in the ZeroEval style: zero-shot chain of thought, a JSON answer, accuracy.

The paper (arXiv 2410.17194) measures reasoning before and after an edit with MMLU-Redux
(Gema et al. 2024) as ZeroEval (WildEval/ZeroEval) runs it: the model is asked to reason step
by step and to end with ``{"reasoning": ..., "answer": "C"}``; the answer letter is parsed from
the generation, and a generation with no parsable letter counts as wrong and as "no answer".

Questions come from a local ``.jsonl``/``.json`` file (fields ``question``, ``choices``,
``answer`` as an index or a letter, optional ``subject``), or from the Hugging Face dataset
``edinburgh-dawg/mmlu-redux-2.0`` when online (needs ``datasets``). Generation is greedy and
batched through the Hugging Face model the bridge wraps, so an edit applied as hooks
(``kgshatter.hooks.edited``) is active during generation (the bridge's hooks fire inside it).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

LETTERS = "ABCDEFGHIJ"
HUB_DATASET = "edinburgh-dawg/mmlu-redux-2.0"

PROMPT = """## Question:

{question}

## Choices:

{choices}

## Instruction

Please answer this question by first reasoning and then selecting the correct choice.
Present your reasoning and solution in the following json format.
Please show your final answer in the `answer` field, e.g.,`"answer": "C"`.

```json
{{
    "reasoning": "___",
    "answer": "___"
}}
```
"""


@dataclass(frozen=True)
class MMLUItem:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    subject: str = ""

    def __post_init__(self) -> None:
        if not 2 <= len(self.choices) <= len(LETTERS):
            raise ValueError(f"an item needs 2..{len(LETTERS)} choices, got {len(self.choices)}")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer index {self.answer} outside 0..{len(self.choices) - 1}")

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> MMLUItem:
        try:
            question, choices, answer = row["question"], tuple(row["choices"]), row["answer"]
        except KeyError as err:
            raise ValueError(
                f"an MMLU item needs 'question', 'choices' and 'answer'; missing {err}"
            ) from None
        if isinstance(answer, str):
            if answer.strip().upper() not in LETTERS[: len(choices)]:
                raise ValueError(f"answer {answer!r} is not a choice letter")
            answer = LETTERS.index(answer.strip().upper())
        return cls(
            str(question), tuple(map(str, choices)), int(answer), str(row.get("subject", ""))
        )


def zeroeval_prompt(item: MMLUItem) -> str:
    """The ZeroEval multiple-choice prompt for ``item``."""
    choices = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(item.choices))
    return PROMPT.format(question=item.question.strip(), choices=choices)


_JSON = re.compile(r"\{[^{}]*\}", re.S)
_FIELD = re.compile(r'"answer"\s*:\s*"\s*\(?([A-J])\)?', re.I)


def parse_answer(text: str, n_choices: int = 4) -> str | None:
    """The answer letter of a generation, or ``None`` when there is none.

    The last JSON object with an ``answer`` field wins; a truncated JSON still yields its
    ``"answer": "X"`` field. A letter outside the item's choices counts as no answer.

    >>> parse_answer('{"reasoning": "...", "answer": "B"}')
    'B'
    >>> parse_answer('```json\\n{"reasoning": "x", "answer": "(c) Paris"}') is None
    False
    >>> parse_answer("I think it is B.") is None
    True
    """
    valid = LETTERS[:n_choices]
    for blob in reversed(_JSON.findall(text)):
        try:
            data = json.loads(blob)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and isinstance(data.get("answer"), str):
            letter = _letter(data["answer"])
            return letter if letter and letter in valid else None
    found = _FIELD.findall(text)
    if found:
        letter = found[-1].upper()
        return letter if letter in valid else None
    return None


def _letter(answer: str) -> str | None:
    m = re.match(r"\s*\(?([A-Ja-j])(?:\)|\b)", answer)
    return m.group(1).upper() if m else None


def load_items(
    source: str | os.PathLike[str], limit: int | None = None, subjects: Sequence[str] = ()
) -> list[MMLUItem]:
    """Items from a local ``.jsonl``/``.json`` file, or the hub dataset (online).

    ``source`` is a path, or ``"hub"`` / ``"hub:CONFIG"`` (an MMLU-Redux subject config such
    as ``"hub:anatomy"``). ``limit`` keeps the first items.
    """
    text = str(source)
    if text == "hub" or text.startswith("hub:"):
        items = _from_hub(text.partition(":")[2] or None)
    else:
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(
                f"no MMLU-Redux file at {path}; pass a .jsonl/.json file of items "
                f"(question, choices, answer) or 'hub:SUBJECT' when online"
            )
        from kgshatter.io import read_json, read_jsonl

        if path.suffix == ".jsonl":
            rows = read_jsonl(path, "MMLU-Redux items")
        elif path.suffix == ".json":
            rows = read_json(path, "MMLU-Redux items", expect=list)
        else:
            raise ValueError(f"{path}: allowed suffixes are .jsonl and .json")
        items = []
        for i, row in enumerate(rows):
            try:
                items.append(MMLUItem.from_dict(row))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                why = f"lacks {e}" if isinstance(e, KeyError) else str(e)
                raise ValueError(f"MMLU-Redux item {i + 1} in {path}: {why}") from None
    if subjects:
        items = [i for i in items if i.subject in set(subjects)]
    return items[:limit] if limit is not None else items


def _from_hub(config: str | None) -> list[MMLUItem]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "loading MMLU-Redux from the hub needs `pip install datasets`; or pass a local file"
        ) from None
    ds = datasets.load_dataset(HUB_DATASET, config or "anatomy", split="test")
    # MMLU-Redux marks items whose labelled answer is wrong; keep the ones judged correct
    return [
        MMLUItem(r["question"], tuple(r["choices"]), int(r["answer"]), config or "")
        for r in ds
        if r.get("error_type", "ok") == "ok"
    ]


@dataclass
class MMLUResult:
    accuracy: float
    no_answer_rate: float
    n: int
    answers: list[str | None] = field(default_factory=list)
    generations: list[str] = field(default_factory=list)

    def to_dict(self, with_generations: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "accuracy": self.accuracy,
            "no_answer_rate": self.no_answer_rate,
            "n": self.n,
        }
        out["answers"] = self.answers
        if with_generations:
            out["generations"] = self.generations
        return out


def score(items: Sequence[MMLUItem], generations: Sequence[str]) -> MMLUResult:
    """Accuracy and no-answer rate of ``generations`` (one per item)."""
    if len(items) != len(generations) or not items:
        raise ValueError(f"need one generation per item, got {len(generations)} for {len(items)}")
    answers = [parse_answer(g, len(i.choices)) for i, g in zip(items, generations, strict=True)]
    right = [
        a is not None and LETTERS.index(a) == i.answer for a, i in zip(answers, items, strict=True)
    ]
    return MMLUResult(
        accuracy=sum(right) / len(items),
        no_answer_rate=sum(a is None for a in answers) / len(items),
        n=len(items),
        answers=answers,
        generations=list(generations),
    )


def generate(
    model: TransformerBridge,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 512,
    batch_size: int = 8,
    chat: bool | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy generations, batched with left padding through the bridge's wrapped HF model.

    ``chat``: wrap each prompt in the tokenizer's chat template (default: when it has one, as
    for Llama 3 Instruct). Hooks on ``model`` (edits) are active during generation.
    """
    import torch

    chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        if chat
        else p
        for p in prompts
    ]
    hf: Any = model.original_model  # the Hugging Face model under the bridge
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="mmlu")
        for start in starts:
            enc = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=not chat,
            ).to(device)
            with torch.inference_mode():
                ids = hf.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            out += tokenizer.batch_decode(
                ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
    finally:
        tokenizer.padding_side = side
    return out


def evaluate(
    model: TransformerBridge,
    tokenizer: Any,
    items: Sequence[MMLUItem],
    max_new_tokens: int = 512,
    batch_size: int = 8,
    progress: bool = True,
) -> MMLUResult:
    """Generate for every item and score (run inside ``edited(model, edit)`` for "after")."""
    prompts = [zeroeval_prompt(i) for i in items]
    return score(
        items, generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress=progress)
    )
