"""Editing pretrained models on text: requests, prompts after sampled prefixes, corpus statistics.

:class:`TextTask` is the pretrained counterpart of
:class:`~kgshatter.editing.core.SyntheticTask`: the editors (ROME, MEMIT, AlphaEdit, PMET, FT-L)
call the same methods on it. Following the references (ROME's and MEMIT's context templates):

- a request's rewriting prompts are the plain prompt plus prompts written after prefixes sampled
  from the model itself (top-k 5, seeded; half of them ``prefix_lengths[0]`` tokens long, half
  ``prefix_lengths[1]``), joined as ``"{prefix}. {prompt}"``; the essence prompts are
  ``"{subject} is a"`` after the same prefixes;
- the subject's last token is located from the tokenizer's character offsets, so it works for
  byte-level BPE (GPT-2, Llama 3, GPT-NeoX/Mamba) and SentencePiece tokenizers alike;
- the second moment C comes from a user-supplied :class:`TextCorpus`, tokenised, joined with
  EOS and cut into windows of ``seq_len`` tokens (never the model's ``max_position_embeddings``:
  256 by default, as long as the references' sampled windows and cheap on a CPU).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int

from kgshatter.editing.core import Prompts
from kgshatter.editing.covariance import (
    CovarianceCache,
    SecondMoment,
    StatsKey,
    second_moment,
)
from kgshatter.editing.requests import TextRequest
from kgshatter.io import read_json, read_jsonl, write_json_atomic
from kgshatter.sites import edit_module, edit_sites
from kgshatter.validation import check_bool, check_int

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def subject_last_token(tokenizer: Any, text: str, start: int, end: int) -> tuple[list[int], int]:
    """Token ids of ``text`` and the index of the last token overlapping ``text[start:end]``.

    Uses the fast tokenizer's character offsets (BPE and SentencePiece alike); without offsets,
    the number of tokens of ``text[:end]``.
    """
    if not 0 <= start < end <= len(text):
        raise ValueError(f"subject span {start}:{end} lies outside the text {text!r}")
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        hits = [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
        if not hits:
            raise ValueError(f"no token of {text!r} covers the subject {text[start:end]!r}")
        return list(ids), hits[-1]
    ids = tokenizer(text)["input_ids"]
    return list(ids), len(tokenizer(text[:end])["input_ids"]) - 1


def continuation_tokens(tokenizer: Any, prompt: str, completion: str) -> list[int]:
    """Token ids that ``" " + completion`` adds after ``prompt`` (tokenised in context)."""
    base = tokenizer(prompt)["input_ids"]
    full = tokenizer(f"{prompt} {completion}")["input_ids"]
    if full[: len(base)] != base or len(full) == len(base):
        # some tokenizers merge across the boundary; fall back to the completion alone
        alone = tokenizer(f" {completion}", add_special_tokens=False)["input_ids"]
        if not alone:
            raise ValueError(f"{completion!r} tokenises to nothing")
        return list(alone)
    return list(full[len(base) :])


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> Int[torch.Tensor, "n seq"]:
    seq = max(len(r) for r in rows)
    return torch.tensor([list(r) + [pad_id] * (seq - len(r)) for r in rows], dtype=torch.long)


def encode_prompts(tokenizer: Any, rows: Sequence[tuple[str, str, str]]) -> Prompts:
    """Each ``(head, prompt, subject)`` as the text ``head + prompt.format(subject)``.

    Right-padded (with the pad token, else EOS), with each row's last token and the subject's
    last token located from the tokenizer's offsets.
    """
    ids, last, subj = [], [], []
    for head, prompt, subject in rows:
        start = len(head) + prompt.index("{}")
        row, s = subject_last_token(
            tokenizer, head + prompt.format(subject), start, start + len(subject)
        )
        ids.append(row)
        last.append(len(row) - 1)
        subj.append(s)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Prompts(pad_right(ids, pad), torch.tensor(last), torch.tensor(subj))


@dataclass(frozen=True)
class TextCorpus:
    """Documents for key statistics (the references use Wikipedia; any text the model saw)."""

    texts: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        if not self.texts or not any(t.strip() for t in self.texts):
            raise ValueError(f"corpus {self.name!r} holds no text")

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in self.texts:
            h.update(hashlib.sha256(t.encode()).digest())
        return h.hexdigest()[:16]

    @classmethod
    def from_files(cls, paths: Iterable[str | os.PathLike[str]]) -> TextCorpus:
        """``.txt`` files (one document each), ``.jsonl`` (a ``"text"`` field per line) or
        ``.json`` (a list of strings or of objects with ``"text"``)."""
        texts: list[str] = []
        names = []
        for p in map(Path, paths):
            if not p.is_file():
                raise FileNotFoundError(f"corpus file {p} does not exist")
            names.append(p.name)
            if p.suffix == ".txt":
                try:
                    texts.append(p.read_text(encoding="utf-8"))
                except UnicodeDecodeError:
                    raise ValueError(f"corpus file {p} is not UTF-8 text") from None
            elif p.suffix == ".jsonl":
                texts += [_text_field(row, p) for row in read_jsonl(p, "corpus file")]
            elif p.suffix == ".json":
                data = read_json(p, "corpus file (a list of documents)", expect=list)
                texts += [d if isinstance(d, str) else _text_field(d, p) for d in data]
            else:
                raise ValueError(f"corpus file {p}: allowed suffixes are .txt, .jsonl, .json")
        return cls(tuple(texts), "files:" + ",".join(names))

    @classmethod
    def from_hub(
        cls, dataset: str, config: str | None = None, split: str = "train", n_docs: int = 10_000
    ) -> TextCorpus:
        """The first ``n_docs`` documents of a Hugging Face dataset (needs ``datasets`` and
        network; e.g. ``"wikimedia/wikipedia", "20231101.en"``, the references' corpus)."""
        try:
            import datasets
        except ImportError:
            raise ImportError(
                "loading a corpus from the hub needs `pip install datasets`; or pass local "
                "files to TextCorpus.from_files"
            ) from None
        ds = datasets.load_dataset(dataset, config, split=split, streaming=True)
        texts = tuple(row["text"] for _, row in zip(range(n_docs), ds, strict=False))
        return cls(texts, f"hub:{dataset}:{config}:{split}:{n_docs}")

    def token_windows(
        self, tokenizer: Any, seq_len: int, n_tokens: int
    ) -> Int[torch.Tensor, "window seq_len"]:
        """Up to ``n_tokens`` tokens as ``[window, seq_len]``: documents joined by EOS."""
        check_int("seq_len", seq_len, 2)
        check_int("n_tokens", n_tokens, 1)
        eos = tokenizer.eos_token_id
        stream: list[int] = []
        for t in self.texts:
            stream += tokenizer(t, add_special_tokens=False)["input_ids"]
            if eos is not None:
                stream.append(eos)
            if len(stream) >= n_tokens:
                break
        n = min(len(stream), n_tokens) // seq_len
        if n == 0:
            raise ValueError(
                f"corpus {self.name!r} has {len(stream)} tokens, fewer than one window of "
                f"{seq_len}; lower seq_len or add text"
            )
        return torch.tensor(stream[: n * seq_len]).reshape(n, seq_len)


class SampledCorpus:
    """Text the model writes itself, for C when the user names no corpus (no download).

    Texts of ``length`` tokens are sampled from BOS (top-k 5, as the context prefixes are) in
    batches of ``batch`` texts, batch ``b`` seeded by ``(seed, b)``: asking for more tokens
    extends the same texts, and the same seed gives the same texts. Each batch is written to
    ``cache_dir`` (atomically, under the corpus fingerprint) and read back on the next run.
    The interface is :class:`TextCorpus`'s (``name``, ``fingerprint``, ``token_windows``).
    """

    def __init__(
        self,
        model: TransformerBridge,
        tokenizer: Any,
        model_id: str,
        *,
        length: int = 256,
        batch: int = 64,
        seed: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        check_int("length", length, 2)
        check_int("batch", batch, 1)
        check_int("seed", seed, 0)
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.length, self.batch, self.seed = length, batch, seed
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.name = f"self-sampled (top-k 5, {length}-token texts, seed {seed})"
        blob = f"{model_id}|{length}|{batch}|{seed}|top5".encode()
        self.fingerprint = "sampled-" + hashlib.sha256(blob).hexdigest()[:16]
        self._batches: list[list[str]] = []

    def _batch(self, b: int) -> list[str]:
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / f"{self.fingerprint}-{b:04d}.json"
            if path.is_file():
                texts = read_json(path, "sampled corpus batch", expect=list)
                if len(texts) == self.batch and all(isinstance(t, str) for t in texts):
                    return texts
        texts = sample_text(self.model, self.tokenizer, self.batch, self.length,
                            seed=self.seed * 100_003 + b)  # fmt: skip
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, texts)
        return texts

    def texts_for(self, n_tokens: int) -> tuple[str, ...]:
        """Enough texts for about ``n_tokens`` tokens (sampled or read from the cache)."""
        check_int("n_tokens", n_tokens, 1)
        need = -(-n_tokens // (self.length * self.batch))
        while len(self._batches) < need:
            self._batches.append(self._batch(len(self._batches)))
        return tuple(t for b in self._batches[:need] for t in b)

    def token_windows(
        self, tokenizer: Any, seq_len: int, n_tokens: int
    ) -> Int[torch.Tensor, "window seq_len"]:
        """As :meth:`TextCorpus.token_windows`, over the texts :meth:`texts_for` gives; decoded
        texts re-tokenise to about ``length`` tokens each, so one more batch is sampled when
        they fall short of the windows asked for."""
        full = (n_tokens // seq_len) * seq_len
        asked = n_tokens
        while True:
            texts = self.texts_for(asked)
            windows = TextCorpus(texts, self.name).token_windows(tokenizer, seq_len, n_tokens)
            if windows.numel() >= full or asked >= 4 * n_tokens:
                return windows
            asked += self.length * self.batch


def _text_field(row: Any, path: Path) -> str:
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise ValueError(f"{path}: every document needs a string 'text' field")
    return row["text"]


class TextTask:
    """Prompts and key statistics for editing a pretrained model (module docstring).

    ``model`` and ``tokenizer`` are the loaded checkpoint's (``PretrainedModel.model`` and
    ``.tokenizer``); ``corpus`` and ``cache`` serve C (``mom2_adjustment=False`` in ROME, or
    FT-L, need none). A target of several tokens ("Buenos Aires") is optimised whole, as the
    references do; ``whole_target=False`` optimises its first token only (kgshatter before
    multi-token targets).
    """

    def __init__(
        self,
        model: TransformerBridge,
        tokenizer: Any,
        corpus: TextCorpus | SampledCorpus | None = None,
        cache: CovarianceCache | None = None,
        *,
        prefix_lengths: tuple[int, int] = (5, 10),
        seq_len: int = 256,
        stats_batch: int = 8,
        whole_target: bool = True,
    ) -> None:
        check_int("seq_len", seq_len, 2)
        check_bool("whole_target", whole_target)
        self.whole_target = whole_target
        check_int("stats_batch", stats_batch, 1)
        for n in prefix_lengths:
            check_int("prefix_lengths", n, 1)
        self.model = model
        self.tokenizer = tokenizer
        self.corpus = corpus
        self.cache = cache
        self.prefix_lengths = prefix_lengths
        self.seq_len = min(seq_len, int(model.cfg.n_ctx))
        self.stats_batch = stats_batch
        self._prefixes: dict[tuple[int, int], list[str]] = {}
        self._stats: dict[tuple[str, int, int, int], SecondMoment] = {}

    # -- prompts ---------------------------------------------------------------------------
    def prefixes(self, n: int, seed: int) -> list[str]:
        """``n`` context prefixes sampled from the model (top-k 5), cached per (n, seed)."""
        memo = (n, seed)
        if memo not in self._prefixes:
            half = n // 2
            out = sample_text(self.model, self.tokenizer, half, self.prefix_lengths[0], seed)
            out += sample_text(
                self.model, self.tokenizer, n - half, self.prefix_lengths[1], seed + 1
            )
            self._prefixes[memo] = out
        return self._prefixes[memo]

    def encode(self, prompt: str, subject: str, prefixes: Sequence[str]) -> Prompts:
        """``prompt.format(subject)`` after each prefix (``""``: the plain prompt)."""
        heads = [f"{prefix}. " if prefix else "" for prefix in prefixes]
        return encode_prompts(self.tokenizer, [(h, prompt, subject) for h in heads])

    def prompts(self, request: TextRequest, n_prompts: int, seed: int) -> tuple[Prompts, Prompts]:
        """The plain prompt and ``n_prompts - 1`` prefixed ones; essence ``"{subject} is a"``."""
        check_int("n_prompts", n_prompts, 1)
        prefixes = [""] + self.prefixes(n_prompts - 1, seed)
        return (
            self.encode(request.prompt, request.subject, prefixes),
            self.encode("{} is a", request.subject, prefixes),
        )

    def reference_prompts(
        self, request: TextRequest, n_prompts: int, seed: int
    ) -> tuple[Prompts, Prompts]:
        """The references' layout: the plain prompt and ``n_prompts - 1`` prefixed ones, and one
        bare essence prompt ``"{subject} is a"`` (kmeng01/rome ``compute_v``)."""
        check_int("n_prompts", n_prompts, 1)
        prefixes = [""] + self.prefixes(n_prompts - 1, seed)
        return (
            self.encode(request.prompt, request.subject, prefixes),
            self.encode("{} is a", request.subject, [""]),
        )

    def bare_prompt(self, request: TextRequest) -> Prompts:
        return self.encode(request.prompt, request.subject, [""])

    def target_token(self, request: TextRequest) -> int:
        """The first token of the target after the prompt."""
        return continuation_tokens(self.tokenizer, request.text, request.target)[0]

    def target_tokens(self, request: TextRequest) -> tuple[int, ...]:
        """The target's tokens after the prompt (the editors' objective: all of them, as in
        ROME's and MEMIT's ``compute_v``; with ``whole_target=False`` only the first)."""
        tokens = continuation_tokens(self.tokenizer, request.text, request.target)
        return tuple(tokens if self.whole_target else tokens[:1])

    def fact(self, request: TextRequest) -> tuple[str, str]:
        return (request.prompt, request.subject)

    def describe(self, request: TextRequest) -> str:
        return request.describe()

    def request_from_dict(self, data: Mapping[str, Any]) -> TextRequest:
        return TextRequest(**data)

    # -- statistics ------------------------------------------------------------------------
    def stats(
        self, model: TransformerBridge, layer: int, n_samples: int, seed: int, model_id: str
    ) -> SecondMoment:
        """C at ``layer``'s edited-matrix keys over up to ``n_samples`` corpus tokens."""
        memo = (model_id, layer, n_samples, seed)
        if memo in self._stats:
            return self._stats[memo]
        if self.corpus is None:
            raise ValueError(
                "this edit needs key statistics C, and the task has no text corpus: pass "
                "TextTask(..., corpus=TextCorpus.from_files([...])), or edit without C "
                "(ROME: mom2_adjustment=False)"
            )
        module = edit_module(model)
        key_site = edit_sites(module, layer)[0].check(model.cfg.n_layers)
        key = StatsKey(
            model_id=model_id,
            layer=layer,
            hook=key_site.hook_name,
            corpus=f"text:{self.corpus.fingerprint}:len{self.seq_len}",
            n_samples=n_samples,
        )
        corpus = self.corpus

        def compute() -> tuple[torch.Tensor, int]:
            windows = corpus.token_windows(self.tokenizer, self.seq_len, n_samples)
            batches = windows.split(self.stats_batch)
            return second_moment(model, layer, batches, site=key_site.component)

        if self.cache is None:
            matrix, n = compute()
            stats = SecondMoment.from_matrix(key, matrix, n)
        else:
            stats = self.cache.get(key, compute)
        self._stats[memo] = stats
        return stats


@torch.inference_mode()
def sample_text(
    model: TransformerBridge,
    tokenizer: Any,
    n: int,
    length: int,
    seed: int,
    top_k: int = 5,
    use_cache: bool = True,
) -> list[str]:
    """``n`` texts of ``length`` tokens sampled from the model (top-k), starting from BOS/EOS.

    Seeded by ``seed`` through a local generator (no global RNG); same seed, same texts. With
    ``use_cache`` each step feeds only the new token, with the Hugging Face key/value cache of
    the tokens before it (GPT-2, Llama: logits equal the full pass's to ~1e-6); a model that
    returns no cache (Mamba through TransformerLens) reruns the whole prefix at every step.
    """
    if n == 0:
        return []
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start sampling from")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((n, 1), start, dtype=torch.long)
    past: Any = None
    for _ in range(length):
        if past is not None:  # only the newest token, after the cached ones
            logits, past = model(
                tokens[:, -1:].to(device), past_key_values=past, return_type="logits_and_cache"
            )
        elif use_cache:
            logits, past = model(tokens.to(device), return_type="logits_and_cache")
            use_cache = past is not None
        else:
            logits = model(tokens.to(device))
        logits = logits[:, -1].float().cpu()
        top = logits.topk(top_k, dim=-1)
        pick = torch.multinomial(torch.softmax(top.values, -1), 1, generator=g)
        tokens = torch.cat([tokens, top.indices.gather(1, pick)], 1)
    texts = tokenizer.batch_decode(tokens[:, 1:], skip_special_tokens=True)
    return [t.replace("{", "(").replace("}", ")").strip() or "." for t in texts]
