"""Second-moment statistics ``C = E[k k^T]`` of MLP keys, with an on-disk cache.

Computing C is the slowest step users meet (docs/editing.md); it is done once per
(model, layer, hook, corpus, sample count, dtype) and cached. One eigendecomposition serves every
method: ROME's ``C^-1 k``, MEMIT's ``lambda C`` and AlphaEdit's null-space projector.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

from kgshatter.io import remove_stale_temporaries, write_atomic
from kgshatter.sites import Site

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatsKey:
    """What a cached statistic was computed from; a cache file answers only its own key."""

    model_id: str
    layer: int
    hook: str
    corpus: str
    n_samples: int
    dtype: str = "float64"

    def filename(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return f"mom2-{hashlib.sha256(blob).hexdigest()[:20]}.safetensors"


@dataclass
class SecondMoment:
    """``C = V diag(w) V^T`` stored as its eigendecomposition (w ascending), computed once.

    ROME's ``C^-1 k``, MEMIT's ``(lambda C + K K^T)^-1 K`` and AlphaEdit's null-space projector
    all read ``w`` and ``V``; the matrix itself is rebuilt only on request (``.matrix``), so a
    loaded statistic costs one ``d x d`` float64 array in memory.
    """

    key: StatsKey
    eigenvalues: Float[torch.Tensor, " d"]
    eigenvectors: Float[torch.Tensor, "d d"]
    n_keys: int

    @classmethod
    def from_matrix(cls, key: StatsKey, matrix: torch.Tensor, n_keys: int) -> SecondMoment:
        if not torch.isfinite(matrix).all():
            raise FloatingPointError(f"second moment for {key} has non-finite entries")
        w, v = torch.linalg.eigh(matrix.to(getattr(torch, key.dtype)))
        return cls(key, w.contiguous(), v.contiguous(), n_keys)

    @property
    def matrix(self) -> Float[torch.Tensor, "d d"]:
        v = self.eigenvectors
        return (v * self.eigenvalues) @ v.T

    def solve(self, k: Float[torch.Tensor, "d ..."], ridge: float = 1e-6) -> torch.Tensor:
        """``(C + ridge * mean(eig) * I)^-1 k``; the ridge keeps a singular C usable.

        The regularisation is relative to C's mean eigenvalue, so it is scale-free.
        """
        w = self.eigenvalues.clamp(min=0) + ridge * self.eigenvalues.mean().clamp(min=1e-30)
        v = self.eigenvectors
        k64 = k.to(v.dtype)
        return v @ ((v.T @ k64) / (w[:, None] if k64.dim() == 2 else w))


def second_moment(
    model: TransformerBridge, layer: int, batches: Iterable[torch.Tensor], site: str = "mlp_post"
) -> tuple[torch.Tensor, int]:
    """Uncentred ``E[k k^T]`` over every token position of ``batches`` (float64 accumulation)."""
    name = Site(layer, site).check(model.cfg.n_layers).hook_name
    device = next(model.parameters()).device
    total, count = None, 0
    with torch.inference_mode():
        for tokens in batches:
            _, cache = model.run_with_cache(
                tokens.to(device), names_filter=lambda n: n == name, stop_at_layer=layer + 1
            )
            k = cache[name].reshape(-1, cache[name].shape[-1]).double()
            total = k.T @ k if total is None else total + k.T @ k
            count += k.shape[0]
    if total is None or count == 0:
        raise ValueError("second_moment needs at least one batch of tokens")
    return (total / count).cpu(), count


class CovarianceCache:
    """Second moments stored as safetensors in ``directory``, one file per :class:`StatsKey`.

    A cache file is checked when it is read, like a computed statistic: one that is truncated,
    holds NaN or inf, or has the wrong shape is moved aside to ``NAME.damaged`` with a warning
    and recomputed, never used; one that answers a different key is refused.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0

    def get(self, key: StatsKey, compute: Any) -> SecondMoment:
        """The cached statistic for ``key``, or ``compute() -> (C, n_keys)`` stored first."""
        from safetensors.torch import save_file

        path = self.directory / key.filename()
        if path.is_file():
            stats = self._read(path, key)
            if stats is not None:
                self.hits += 1
                return stats
        log.info(
            "computing the second moment of %s (%d samples, once; cached in %s)",
            key.hook, key.n_samples, self.directory,
        )  # fmt: skip
        start = time.perf_counter()
        matrix, n_keys = compute()
        stats = SecondMoment.from_matrix(key, matrix, n_keys)
        log.info("second moment of %s done in %.0f s", key.hook, time.perf_counter() - start)
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.directory)  # of writers killed mid-write
        meta = {"key": json.dumps(asdict(key), sort_keys=True), "n_keys": str(n_keys)}
        tensors = {"eigenvalues": stats.eigenvalues, "eigenvectors": stats.eigenvectors}
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        self.misses += 1
        return stats

    @staticmethod
    def _read(path: Path, key: StatsKey) -> SecondMoment | None:
        """The statistic stored at ``path``, or ``None`` after moving a damaged file aside."""
        from kgshatter.io import load_safetensors

        try:
            tensors, meta = load_safetensors(path, "cached statistics")
            if "key" not in meta or "n_keys" not in meta:
                raise ValueError(f"cached statistics at {path} lack their key or sample count")
            try:
                stored, n_keys = json.loads(meta["key"]), int(meta["n_keys"])
            except ValueError:
                raise ValueError(f"cached statistics at {path} have unreadable metadata") from None
            w, v = tensors.get("eigenvalues"), tensors.get("eigenvectors")
            if w is None or v is None or v.ndim != 2 or v.shape != (w.numel(), w.numel()):
                raise ValueError(f"cached statistics at {path} are not an eigendecomposition")
            if bool((w < -1e-4 * max(float(w.abs().max()), 1e-30)).any()):
                raise ValueError(f"cached statistics at {path} have negative eigenvalues")
        except ValueError as e:
            aside = path.with_name(path.name + ".damaged")
            os.replace(path, aside)
            log.warning("%s; moved it to %s and recomputing", e, aside)
            return None
        if stored != asdict(key):
            raise ValueError(
                f"cache file {path} holds statistics for {stored}, not for {asdict(key)}"
            )
        return SecondMoment(key, w, v, n_keys)
