"""``Edit`` values: low-rank (or dense) weight deltas with their provenance, applied reversibly.

An edit never changes a model by itself. ``kgshatter.hooks.edited(model, edit)`` applies it as
hooks for the duration of a ``with`` block; ``edit.apply_to_weights(model)`` writes it into the
weights and returns a handle whose ``restore()`` puts the exact original bytes back
(README, "Editing").
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from kgshatter.io import read_json, write_atomic, write_json_atomic
from kgshatter.sites import edit_sites, edit_weight

EDIT_FORMAT = "kgshatter.edit/1"


def model_identity(model: Any) -> str:
    """Content hash of a model's shape and weights (keys caches and edits to one model)."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                k: str(getattr(model.cfg, k))
                for k in ("n_layers", "d_model", "d_mlp", "d_vocab", "n_heads", "n_ctx")
            },
            sort_keys=True,
        ).encode()
    )
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class LayerDelta:
    """``W_out[layer] += a @ b.T``; ``a`` [d_mlp, rank], ``b`` [d_model, rank].

    ``b=None`` marks a dense delta: ``a`` is the full ``[d_mlp, d_model]`` matrix (FT-L).
    """

    layer: int
    a: Float[torch.Tensor, "d_mlp rank"]
    b: Float[torch.Tensor, "d_model rank"] | None

    @property
    def dense(self) -> Float[torch.Tensor, "d_mlp d_model"]:
        return self.a if self.b is None else self.a @ self.b.T

    @property
    def rank(self) -> int | None:
        """The factor rank, ``None`` for a dense delta."""
        return None if self.b is None else self.a.shape[1]


@dataclass
class Edit:
    """One edit (one method applied to one or more requests), as per-layer weight deltas.

    ``module`` names the edited matrix: ``"mlp"`` (``W_out``) or ``"mixer"`` (Mamba's
    ``out_proj``); see :func:`kgshatter.sites.edit_sites`.
    """

    method: str
    deltas: list[LayerDelta]
    requests: list[dict[str, Any]]
    config: dict[str, Any]
    model_id: str
    info: dict[str, Any] = field(default_factory=dict)
    module: str = "mlp"

    def hooks(self) -> list[tuple[str, Any]]:
        """Forward hooks adding each layer's delta to the matrix's output (weights untouched)."""
        from kgshatter.hooks import low_rank_delta

        pairs: list[tuple[str, Any]] = []
        for d in self.deltas:
            key, out = edit_sites(self.module, d.layer)
            pairs += low_rank_delta(key.hook_name, out.hook_name, d.a, d.b)
        return pairs

    def apply_to_weights(self, model: Any) -> WeightPatch:
        """Add the deltas to the weights in place; ``restore()`` on the handle undoes it exactly."""
        return WeightPatch(model, self.deltas, self.module)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """``PATH.safetensors`` (factors) and ``PATH.json`` (everything else), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, d in enumerate(self.deltas):
            tensors[f"{i}.a"] = d.a.contiguous().cpu()
            if d.b is not None:
                tensors[f"{i}.b"] = d.b.contiguous().cpu()
        write_atomic(path.with_suffix(".safetensors"), lambda tmp: save_file(tensors, str(tmp)))
        meta = {
            "format": EDIT_FORMAT,
            "method": self.method,
            "layers": [d.layer for d in self.deltas],
            "requests": self.requests,
            "config": self.config,
            "model_id": self.model_id,
            "module": self.module,
            "info": self.info,
        }
        write_json_atomic(path.with_suffix(".json"), meta)
        return path.with_suffix(".json")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Edit:
        from safetensors.torch import load_file

        path = Path(path)
        meta = read_json(path.with_suffix(".json"), "edit metadata")
        if meta.get("format") != EDIT_FORMAT:
            raise ValueError(f"{path.with_suffix('.json')} is not a kgshatter edit")
        tensors = load_file(str(path.with_suffix(".safetensors")))
        deltas = [
            LayerDelta(layer, tensors[f"{i}.a"], tensors.get(f"{i}.b"))
            for i, layer in enumerate(meta["layers"])
        ]
        return cls(
            meta["method"],
            deltas,
            meta["requests"],
            meta["config"],
            meta["model_id"],
            meta.get("info", {}),
            meta.get("module", "mlp"),
        )


class WeightPatch:
    """An edit written into the weights; ``restore()`` (or leaving ``with``) undoes it exactly."""

    def __init__(self, model: Any, deltas: list[LayerDelta], module: str = "mlp") -> None:
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        weights = [edit_weight(model, d.layer, module) for d in deltas]  # all checked first
        for d, w in zip(deltas, weights, strict=True):
            if tuple(d.dense.shape) != tuple(w.shape):
                raise ValueError(
                    f"edit delta {tuple(d.dense.shape)} does not fit layer {d.layer}'s "
                    f"{module} matrix {tuple(w.shape)}; was it computed on another model?"
                )
        with torch.no_grad():
            for d, w in zip(deltas, weights, strict=True):  # w: [d_key, d_out], a view
                self._saved.append((w, w.detach().clone()))
                w += d.dense.to(w.dtype).to(w.device)
        self.active = True

    def restore(self) -> None:
        if not self.active:
            return
        with torch.no_grad():
            for w, original in reversed(self._saved):
                w.copy_(original)
        self.active = False

    def __enter__(self) -> WeightPatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
