"""``Edit`` values: low-rank (or dense) weight deltas with their provenance, applied reversibly.

An edit never changes a model by itself. ``kgshatter.hooks.edited(model, edit)`` applies it as
hooks for the duration of a ``with`` block; ``edit.apply_to_weights(model)`` writes it into the
weights and returns a handle whose ``restore()`` puts the exact original bytes back
(docs/editing.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

from kgshatter.io import read_json, write_atomic, write_json_atomic
from kgshatter.sites import OffloadedWeight, edit_sites, edit_weight

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

EDIT_FORMAT = "kgshatter.edit/1"


def model_identity(model: TransformerBridge) -> str:
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
        if p.is_meta:  # offloaded to disk (device_map): its shape only
            h.update(f"offloaded{tuple(p.shape)}{p.dtype}".encode())
            continue
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# model -> {weight key -> (tensor version, digest)}: fingerprints recomputed only after a write
_DIGESTS: weakref.WeakKeyDictionary[Any, dict[tuple, tuple[int, bytes]]] = (
    weakref.WeakKeyDictionary()
)


def _digest(model: TransformerBridge, w: torch.Tensor) -> bytes:
    """SHA-256 of ``w``'s bytes as they are without kgshatter's weight patches, memoised
    until the tensor is next written in place."""
    key = _weight_key(w)
    memo = _DIGESTS.setdefault(model, {})
    version = w._version
    if key in memo and memo[key][0] == version:
        return memo[key][1]
    patched = _PATCHED.get(model, {}).get(key)
    source = patched.original if patched is not None else w
    h = hashlib.sha256(f"{tuple(source.shape)}{source.dtype}".encode())
    if source.is_meta:  # offloaded to disk (device_map): known by its shape and dtype only
        h.update(b"offloaded")
    else:
        h.update(source.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    memo[key] = (version, h.digest())
    return memo[key][1]


def edit_fingerprint(model: TransformerBridge, layers: Any, module: str = "mlp") -> str:
    """A cheap identity of what an edit depends on: the embedding and the matrices it edits
    (``layers``), each as it is without kgshatter's own patches, so edits computed on one model
    compose however they are applied. Not a hash of the whole model (``model_identity``)."""
    h = hashlib.sha256(module.encode())
    h.update(_digest(model, model.W_E))
    for layer in sorted(set(layers)):
        h.update(f"|{layer}|".encode())
        try:
            h.update(_digest(model, edit_weight(model, layer, module)))
        except OffloadedWeight:  # on disk (device_map): known by its place only
            h.update(b"offloaded")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class LayerDelta:
    """``W_out[layer] += a @ b.T``; ``a`` [d_mlp, rank], ``b`` [d_model, rank].

    ``b=None`` marks a dense delta: ``a`` is the full ``[d_mlp, d_model]`` matrix (FT-L).
    """

    layer: int
    a: Float[torch.Tensor, "d_mlp rank"]
    b: Float[torch.Tensor, "d_model rank"] | None

    def __post_init__(self) -> None:
        a, b = self.a, self.b
        if not isinstance(a, torch.Tensor) or a.ndim != 2:
            raise ValueError(f"LayerDelta.a must be a 2-D tensor, got {getattr(a, 'shape', a)!r}")
        if b is not None and (
            not isinstance(b, torch.Tensor) or b.ndim != 2 or b.shape[1] != a.shape[1]
        ):
            raise ValueError(
                f"LayerDelta.b must be a 2-D tensor with a's rank {a.shape[1]} columns, got "
                f"{getattr(b, 'shape', b)!r}"
            )
        # torch has no read-only tensors: the factors' version counters (bumped by every in-place
        # write) are recorded here and checked wherever the edit is used
        object.__setattr__(self, "_versions", self._version_now())

    def _version_now(self) -> tuple[int, int | None]:
        return self.a._version, None if self.b is None else self.b._version

    def check_unchanged(self) -> None:
        """Refuse factors written in place since this delta was made (an edit is a value)."""
        if self._version_now() != getattr(self, "_versions", None):
            raise ValueError(
                f"the layer-{self.layer} delta's factors were written in place after the edit was "
                f"made (e.g. a.mul_()); an Edit is a value: build a new LayerDelta and Edit instead"
            )

    @property
    def dense(self) -> Float[torch.Tensor, "d_mlp d_model"]:
        return self.a if self.b is None else self.a @ self.b.T

    @property
    def rank(self) -> int | None:
        """The factor rank, ``None`` for a dense delta."""
        return None if self.b is None else self.a.shape[1]


def _read_only(value: Any) -> Any:
    """A read-only view of nested JSON-like data (mappings and lists)."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _read_only(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_read_only(v) for v in value)
    return value


def _plain(value: Any) -> Any:
    """The JSON-ready form of :func:`_read_only` data."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class Edit:
    """One edit (one method applied to one or more requests), as per-layer weight deltas.

    A value: frozen, its ``requests``, ``config`` and ``info`` read-only (a protocol's run
    metadata lives in its records, not in the edit). ``dataclasses.replace(edit, info=...)``
    makes a changed copy. ``module`` names the edited matrix: ``"mlp"`` (``W_out``) or
    ``"mixer"`` (Mamba's ``out_proj``); see :func:`kgshatter.sites.edit_sites`.
    """

    method: str
    deltas: Sequence[LayerDelta]  # stored as a tuple
    requests: Sequence[Mapping[str, Any]]  # stored as a tuple of read-only mappings
    config: Mapping[str, Any]
    model_id: str
    info: Mapping[str, Any] = field(default_factory=dict)
    module: str = "mlp"
    # edit_fingerprint of the model it was computed on ("": unknown, e.g. an older file)
    fingerprint: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "deltas", tuple(self.deltas))
        for d in self.deltas:
            if not isinstance(d, LayerDelta):
                raise ValueError(f"Edit.deltas must hold LayerDelta values, got {type(d).__name__}")
        for name in ("requests", "config", "info"):
            object.__setattr__(self, name, _read_only(getattr(self, name)))

    def check_model(self, model: TransformerBridge, force: bool = False) -> None:
        """Refuse ``model`` unless it is the one this edit was computed on, judged by
        :func:`edit_fingerprint` (its embedding and edited matrices, ignoring kgshatter's own
        reversible weight patches); ``force=True`` applies it anyway."""
        if force or not self.fingerprint:
            return
        found = edit_fingerprint(model, [d.layer for d in self.deltas], self.module)
        if found != self.fingerprint:
            raise ValueError(
                f"this {self.method} edit was computed on another model (fingerprint "
                f"{self.fingerprint}, this model {found}: its embedding or edited matrices "
                f"differ); pass force=True to apply it anyway"
            )

    def hooks(self) -> list[tuple[str, Any]]:
        """Forward hooks adding each layer's delta to the matrix's output (weights untouched)."""
        from kgshatter.hooks import low_rank_delta

        pairs: list[tuple[str, Any]] = []
        for d in self.deltas:
            d.check_unchanged()
            key, out = edit_sites(self.module, d.layer)
            # the hooks hold copies: a write to the factors while they run cannot reach them
            b = None if d.b is None else d.b.clone()
            pairs += low_rank_delta(key.hook_name, out.hook_name, d.a.clone(), b)
        return pairs

    def apply_to_weights(self, model: TransformerBridge, force: bool = False) -> WeightPatch:
        """Add the deltas to the weights in place; ``restore()`` on the handle undoes it exactly.
        Refused on another model than the edit's own unless ``force`` (:meth:`check_model`)."""
        self.check_model(model, force)
        for d in self.deltas:
            d.check_unchanged()
        return WeightPatch(model, self.deltas, self.module)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """``PATH.safetensors`` (factors) and ``PATH.json`` (everything else, with the factors'
        SHA-256, checked by :meth:`load`), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, d in enumerate(self.deltas):
            d.check_unchanged()
            tensors[f"{i}.a"] = d.a.detach().contiguous().cpu()
            if d.b is not None:
                tensors[f"{i}.b"] = d.b.detach().contiguous().cpu()
        write_atomic(path.with_suffix(".safetensors"), lambda tmp: save_file(tensors, str(tmp)))
        meta = {
            "format": EDIT_FORMAT,
            "method": self.method,
            "layers": [d.layer for d in self.deltas],
            "requests": _plain(self.requests),
            "config": _plain(self.config),
            "model_id": self.model_id,
            "module": self.module,
            "info": _plain(self.info),
            "fingerprint": self.fingerprint,
            "sha256": _factors_digest(tensors),
        }
        write_json_atomic(path.with_suffix(".json"), meta)
        return path.with_suffix(".json")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Edit:
        """The edit saved at ``PATH`` (``.json`` + ``.safetensors``), checked as it is read: a
        truncated or non-finite factor file, metadata lacking a field, or factors that disagree
        with the metadata fail with one line naming the file."""
        from kgshatter.io import load_safetensors

        path = Path(path)
        meta_path, tensor_path = path.with_suffix(".json"), path.with_suffix(".safetensors")
        meta = read_json(
            meta_path, "edit metadata", required=("format", "method", "layers", "requests",
                                                  "config", "model_id"),
        )  # fmt: skip
        if meta["format"] != EDIT_FORMAT:
            raise ValueError(f"{meta_path} is not a kgshatter edit (format {meta['format']!r})")
        layers = meta["layers"]
        if not isinstance(layers, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers
        ):
            raise ValueError(
                f"edit metadata at {meta_path}: layers must be a list of layer indices"
            )
        tensors, _ = load_safetensors(tensor_path, "edit factors")
        if "sha256" in meta and meta["sha256"] != _factors_digest(tensors):
            raise ValueError(
                f"edit factors at {tensor_path} do not match the SHA-256 in {meta_path}: changed "
                f"or replaced since the edit was saved"
            )
        expected = {f"{i}.a" for i in range(len(layers))}
        allowed = expected | {f"{i}.b" for i in range(len(layers))}
        if not expected <= set(tensors) or not set(tensors) <= allowed:
            raise ValueError(
                f"edit factors at {tensor_path} do not match {meta_path}: {len(layers)} layer(s) "
                f"need {sorted(expected)}, the file has {sorted(tensors)}"
            )
        try:
            deltas = [
                LayerDelta(layer, tensors[f"{i}.a"], tensors.get(f"{i}.b"))
                for i, layer in enumerate(layers)
            ]
            return cls(
                meta["method"],
                deltas,
                meta["requests"],
                meta["config"],
                meta["model_id"],
                meta.get("info", {}),
                meta.get("module", "mlp"),
                meta.get("fingerprint", ""),
            )
        except (ValueError, TypeError) as e:
            raise ValueError(f"edit at {meta_path} is inconsistent: {e}") from None


def _factors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# model -> {weight key -> _PatchedWeight}: every patch written into one of the model's matrices
_PATCHED: weakref.WeakKeyDictionary[Any, dict[tuple, _PatchedWeight]] = weakref.WeakKeyDictionary()


def _weight_key(w: torch.Tensor) -> tuple:
    """Identity of a weight view: the same matrix gives the same key however it was reached."""
    return (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), tuple(w.stride()))


class _PatchedWeight:
    """One matrix under patches: its bytes before the first, and the active deltas in order.

    The matrix always holds ``original + d1 + d2 + ...`` summed in application order, rewritten
    from ``original`` whenever a patch comes or goes, so restoring any patch leaves exactly the
    bytes that applying only the others would have given, and restoring all gives back the
    original bytes, whatever the order.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.original = weight.detach().clone()
        self.active: list[tuple[WeightPatch, torch.Tensor]] = []

    def expected(self) -> torch.Tensor:
        out = self.original.clone()
        for _, dense in self.active:
            out += dense
        return out


class WeightPatch:
    """An edit written into the weights; ``restore()`` (or leaving ``with``) undoes it exactly.

    Patches may be restored in any order (docs/editing.md). A restore that finds the matrix
    changed by something else since the patches were written (an optimiser step, a manual
    write) is refused with an error instead of overwriting that change.
    """

    def __init__(
        self, model: TransformerBridge, deltas: Sequence[LayerDelta], module: str = "mlp"
    ) -> None:
        weights = [edit_weight(model, d.layer, module) for d in deltas]  # all checked first
        for d, w in zip(deltas, weights, strict=True):
            if tuple(d.dense.shape) != tuple(w.shape):
                raise ValueError(
                    f"edit delta {tuple(d.dense.shape)} does not fit layer {d.layer}'s "
                    f"{module} matrix {tuple(w.shape)}; was it computed on another model?"
                )
        registry = _PATCHED.setdefault(model, {})
        self._model = weakref.ref(model)
        self._entries: list[_PatchedWeight] = []
        with torch.no_grad():
            for d, w in zip(deltas, weights, strict=True):  # w: [d_key, d_out], a view
                entry = registry.get(_weight_key(w))
                if entry is None:
                    entry = registry[_weight_key(w)] = _PatchedWeight(w)
                else:
                    _check_untouched(entry)
                entry.active.append((self, d.dense.to(w.dtype).to(w.device)))
                entry.weight.add_(entry.active[-1][1])
                self._entries.append(entry)
        self.active = True

    def restore(self) -> None:
        """Take this patch's deltas out of the weights (a second call does nothing)."""
        if not self.active:
            return
        for entry in self._entries:
            _check_untouched(entry)
        model = self._model()
        registry = _PATCHED.get(model, {}) if model is not None else {}
        with torch.no_grad():
            for entry in self._entries:
                entry.active = [(p, d) for p, d in entry.active if p is not self]
                entry.weight.copy_(entry.expected())
                if not entry.active:
                    registry.pop(_weight_key(entry.weight), None)
        self.active = False

    def __enter__(self) -> WeightPatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _check_untouched(entry: _PatchedWeight) -> None:
    if not torch.equal(entry.weight, entry.expected()):
        raise ValueError(
            "the edited matrix was changed by something other than kgshatter's patches since "
            "they were written; refusing to restore over that change (reload the model)"
        )
