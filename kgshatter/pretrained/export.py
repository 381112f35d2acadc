"""Edits of a pretrained model, exported for the tools outside TransformerLens.

An :class:`~kgshatter.editing.Edit` computed on a model from
:func:`~kgshatter.pretrained.loading.load_pretrained` leaves as

- **merged weights** (:func:`export_merged`): the checkpoint with every delta added to its
  matrix, written by ``save_pretrained`` with the tokenizer: any Hugging Face tool loads it;
- **a PEFT LoRA adapter** (:func:`export_lora`), for the low-rank methods (ROME, MEMIT,
  AlphaEdit, PMET): a rank-r delta ``W += a @ b.T`` of a linear layer is exactly a LoRA of rank
  r, ``lora_A = a.T`` and ``lora_B = b`` with ``lora_alpha = r`` (scaling 1), so
  ``PeftModel.from_pretrained(base, adapter)`` (or vLLM with LoRA) serves the edited model from
  the unchanged base checkpoint. Several edits of one matrix become one adapter whose rank is
  the sum of theirs (their factors side by side). FT-L's dense delta has no such form, and PEFT
  refuses LoRA on Mamba's mixer ``out_proj``: both are refused with one line (export merged).

Both read the edited matrices' names from the model itself (the Hugging Face module whose
weight the bridge's edited matrix is), so GPT-2 (``Conv1D``, stored ``[in, out]``), Llama and
Mamba (``nn.Linear``, ``[out, in]``) need no table. Each export is written through a temporary
folder renamed into place when complete, with ``kgshatter-export.json`` naming the edits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from kgshatter.io import write_dir_atomic
from kgshatter.sites import edit_weight

if TYPE_CHECKING:
    from kgshatter.editing.edit import Edit
    from kgshatter.pretrained.loading import PretrainedModel

RECORD = "kgshatter-export.json"
WRAPPER = "._original_component"  # how TransformerLens's bridge nests the Hugging Face modules


def hf_module_name(pm: PretrainedModel, layer: int, module: str) -> tuple[str, bool]:
    """The Hugging Face name of the matrix an edit of ``layer`` writes, and whether it is stored
    ``[in, out]`` (GPT-2's ``Conv1D``, PEFT's ``fan_in_fan_out``) rather than ``[out, in]``."""
    target = edit_weight(pm.model, layer, module)
    for name, mod in pm.model.original_model.named_modules():
        weight = getattr(mod, "weight", None)
        if (
            isinstance(weight, torch.Tensor)
            and name.split(".")[-1] != "_original_component"
            and weight.data_ptr() == target.data_ptr()
            and weight.numel() == target.numel()
        ):
            return name.replace(WRAPPER, ""), type(mod).__name__ == "Conv1D" or (
                type(getattr(mod, "_original_component", None)).__name__ == "Conv1D"
            )
    raise ValueError(
        f"layer {layer}'s {module} matrix is not a weight of the Hugging Face model "
        f"{pm.name} (an offloaded or converted model?): it cannot be exported"
    )


def _check(pm: PretrainedModel, edits: Sequence[Edit], out: Path) -> None:
    if not edits:
        raise ValueError("give at least one edit to export")
    if out.exists():
        raise ValueError(f"{out} exists; exports are written to a new folder")
    for edit in edits:
        edit.check_model(pm.model)  # computed on this model (fingerprint), one line if not


def _write(out: Path, fill: Any, pm: PretrainedModel, edits: Sequence[Edit], kind: str) -> Path:
    record = {
        "kind": kind,
        "base": pm.source,
        "base_model_id": pm.model_id,
        "edits": [{"method": e.method, "requests": [dict(r) for r in e.requests]} for e in edits],
    }

    def fill_with_record(folder: Path) -> None:
        fill(folder)
        (folder / RECORD).write_text(json.dumps(record, indent=1, default=str))

    out.parent.mkdir(parents=True, exist_ok=True)
    return write_dir_atomic(out, fill_with_record)  # _check refused an existing out


def export_merged(
    pm: PretrainedModel, edits: Edit | Sequence[Edit], out: str | os.PathLike[str]
) -> Path:
    """The base checkpoint with ``edits`` added to its weights, as a ``save_pretrained`` folder.

    The base is read afresh from ``pm.source`` (the loaded model is not touched), in ``pm``'s
    dtype; each delta is added in float32 and cast once.
    """
    from transformers import AutoModelForCausalLM

    from kgshatter.pretrained.loading import DTYPES

    edits = [edits] if not isinstance(edits, Sequence) else list(edits)
    out = Path(out)
    _check(pm, edits, out)
    targets = [
        (hf_module_name(pm, d.layer, e.module), d) for e in edits for d in e.deltas
    ]  # fmt: skip

    def fill(folder: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(pm.source, dtype=DTYPES[pm.dtype])
        with torch.no_grad():
            for (name, in_out), d in targets:
                weight = cast(torch.Tensor, model.get_submodule(name).weight)
                delta = d.dense.detach().to(device=weight.device, dtype=torch.float32)
                delta = delta if in_out else delta.T  # the edit's delta is [in, out]
                weight.copy_((weight.float() + delta).to(weight.dtype))
        model.save_pretrained(folder, safe_serialization=True)
        pm.tokenizer.save_pretrained(folder)

    return _write(out, fill, pm, edits, "merged")


def export_lora(
    pm: PretrainedModel, edits: Edit | Sequence[Edit], out: str | os.PathLike[str]
) -> Path:
    """A PEFT LoRA adapter equal to ``edits`` (low-rank methods only); base: ``pm.source``."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError("exporting a LoRA adapter needs PEFT: pip install peft") from None
    from safetensors.torch import save_file

    edits = [edits] if not isinstance(edits, Sequence) else list(edits)
    out = Path(out)
    _check(pm, edits, out)
    if any(e.module == "mixer" for e in edits):
        raise ValueError(
            "PEFT refuses LoRA on Mamba's mixer out_proj, the matrix Mamba edits write: export "
            "them with export_merged"
        )
    factors: dict[str, tuple[list[torch.Tensor], list[torch.Tensor], bool]] = {}
    for e in edits:
        for d in e.deltas:
            if d.b is None:
                raise ValueError(
                    f"a {e.method} edit's delta is dense, not low-rank: it has no LoRA form; "
                    f"export it with export_merged"
                )
            d.check_unchanged()
            name, in_out = hf_module_name(pm, d.layer, e.module)
            a_list, b_list, _ = factors.setdefault(name, ([], [], in_out))
            a_list.append(d.a.detach().float().cpu())
            b_list.append(d.b.detach().float().cpu())
    tensors, ranks = {}, {}
    for name, (a_list, b_list, _) in factors.items():
        a, b = torch.cat(a_list, dim=1), torch.cat(b_list, dim=1)  # [in, r], [out, r]
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.T.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
        ranks[name] = a.shape[1]
    orientations = {v[2] for v in factors.values()}
    if len(orientations) > 1:
        raise ValueError("edits of Conv1D and Linear matrices cannot share one adapter")
    r = max(ranks.values())
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(ranks),
        rank_pattern={n: k for n, k in ranks.items() if k != r},
        alpha_pattern={n: k for n, k in ranks.items() if k != r},  # scaling alpha / r = 1
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=orientations.pop(),
        base_model_name_or_path=pm.source,
        task_type="CAUSAL_LM",
    )

    def fill(folder: Path) -> None:
        config.save_pretrained(str(folder))
        save_file(tensors, str(folder / "adapter_model.safetensors"))

    return _write(out, fill, pm, edits, "lora")
