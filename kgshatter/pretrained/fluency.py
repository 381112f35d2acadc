"""Fluency of generated text: the n-gram entropy editing papers report (CounterFact).

ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT") measures an edited
model's fluency as the entropy of the bigram and trigram distributions of its generations,
weighted 2/3 and 4/3 and averaged: a model that repeats itself after an edit scores lower.
This is our implementation of that definition, on whitespace-separated lowercased words.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

NGRAM_WEIGHTS = {2: 2 / 3, 3: 4 / 3}


def ngram_entropy(text: str) -> float:
    """The weighted mean entropy (bits) of ``text``'s bigram and trigram distributions.

    >>> round(ngram_entropy("the cat sat on the mat and the dog sat on the rug"), 3)
    3.269
    >>> ngram_entropy("again again again again again again")
    0.0
    >>> ngram_entropy("")
    0.0
    """
    words = text.lower().split()
    values = []
    for n, weight in NGRAM_WEIGHTS.items():
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        entropy = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(weight * entropy)
    return sum(values) / len(values)


def generation_fluency(
    model: TransformerBridge, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 24
) -> float:
    """Mean :func:`ngram_entropy` of greedy continuations of ``prompts`` (hooks on ``model``,
    such as an edit, are active)."""
    from kgshatter.pretrained.mmlu import generate

    texts = generate(model, tokenizer, prompts, max_new_tokens, chat=False, progress=False)
    return sum(ngram_entropy(t) for t in texts) / len(texts)
