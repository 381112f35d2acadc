"""Edit requests: a fact of the synthetic graph, "x r -> y'" (:class:`EditRequest`, with the
prompts that express it), and a fact in text (:class:`TextRequest`, for pretrained models; its
prompts come from :class:`kgshatter.pretrained.text.TextTask`).

A request's prompt is ``... x r`` written after random-walk contexts that lead into ``x``
(the paper's editing protocol); the subject's last (only) token is ``x``, one position before
the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int

from kgshatter.kg.graph import KnowledgeGraph
from kgshatter.kg.walks import WalkSampler, step_generator


@dataclass(frozen=True)
class EditRequest:
    """Make the model answer ``target`` to the query ``subject relation`` (indices)."""

    subject: int
    relation: int
    target: int

    @classmethod
    def parse(cls, graph: KnowledgeGraph, fact: str, target: str | int) -> EditRequest:
        """``EditRequest.parse(graph, "e003 I_C1", "e042")``, names checked against the graph."""
        parts = fact.split()
        if len(parts) != 2:
            raise ValueError(
                f"a fact to edit is 'SUBJECT RELATION' (e.g. 'e003 I_C1'), got {fact!r}"
            )
        return cls(graph.entity(parts[0]), graph.relation(parts[1]).index, graph.entity(target))

    def validate(self, graph: KnowledgeGraph) -> EditRequest:
        """Check that subject, relation and target exist and the fact is defined.

        A target equal to the graph's answer is allowed (a corrective edit); editors refuse a
        target the *model* already answers.
        """
        graph.entity(self.subject)
        graph.relation(self.relation)
        graph.entity(self.target)
        if graph.multi_valued[self.relation]:
            raise ValueError(
                f"{graph.relations[self.relation].name} has several answers per subject (a "
                f"tree's step down); edit a relation with one answer (a step up)"
            )
        if graph.table[self.relation, self.subject] < 0:
            raise ValueError(
                f"{graph.relations[self.relation].name} is not defined for "
                f"{graph.entity_name(self.subject)} in this graph; nothing to edit"
            )
        return self

    def old_target(self, graph: KnowledgeGraph) -> int:
        return int(graph.table[self.relation, self.subject])

    def describe(self, graph: KnowledgeGraph) -> str:
        return (
            f"{graph.entity_name(self.subject)} {graph.relations[self.relation].name} -> "
            f"{graph.entity_name(self.target)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "relation": self.relation, "target": self.target}


def request_prompts(
    sampler: WalkSampler, subject: int, relation: int, n_prompts: int, seed: int = 0
) -> Int[torch.Tensor, "prompt n_ctx"]:
    """``n_prompts`` full-length prompts ``<context leading into subject> subject relation``."""
    return request_prompts_many(sampler, [(subject, relation)], n_prompts, seed)


def request_prompts_many(
    sampler: WalkSampler, facts: Sequence[tuple[int, int]], n_prompts: int, seed: int = 0
) -> Int[torch.Tensor, "fact_prompt n_ctx"]:
    """:func:`request_prompts` of every ``(subject, relation)`` fact, concatenated: the same
    bytes, sampled in one walk (each fact keeps its own seeded generator)."""
    n_rel = sampler.graph.n_relations
    generators = [step_generator(seed, 1 << 22 | x * n_rel + r) for x, r in facts]
    subjects = torch.tensor([x for x, _ in facts], dtype=torch.long).repeat_interleave(n_prompts)
    relations = torch.tensor([r for _, r in facts], dtype=torch.long).repeat_interleave(n_prompts)
    return sampler.query_tokens(subjects, relations[:, None], generators, [n_prompts] * len(facts))


@dataclass(frozen=True)
class TextRequest:
    """Make the model complete ``prompt.format(subject)`` with ``target``.

    ``prompt`` holds ``{}`` where the subject goes (``"{} is followed 8 months later by"``);
    ``target`` is the new completion without its leading space (``"September"``); ``old`` the
    completion being replaced, when known.
    """

    prompt: str
    subject: str
    target: str
    old: str | None = None

    def __post_init__(self) -> None:
        if self.prompt.count("{}") != 1:
            raise ValueError(
                f"a request prompt holds exactly one '{{}}' for the subject, got {self.prompt!r}"
            )
        if not self.subject.strip() or not self.target.strip():
            raise ValueError(f"subject and target must be non-empty, got {self!r}")
        if self.prompt.endswith(" "):
            raise ValueError(f"a request prompt must not end in a space: {self.prompt!r}")

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)

    def describe(self) -> str:
        old = f" (was {self.old})" if self.old else ""
        return f"{self.text} -> {self.target}{old}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "target": self.target,
            "old": self.old,
        }
