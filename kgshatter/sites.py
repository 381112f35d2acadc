"""``Site(layer, component)``: the one place hook names are spelled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

COMPONENTS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "mlp_pre": "blocks.{layer}.mlp.hook_pre",
    "mlp_post": "blocks.{layer}.mlp.hook_post",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "resid_post": "blocks.{layer}.hook_resid_post",
    # Mamba: the mixer's output projection, the matrix ROME edits on Mamba (its key and value)
    "mixer_key": "blocks.{layer}.mixer.out_proj.hook_in",
    "mixer_out": "blocks.{layer}.mixer.out_proj.hook_out",
}
GLOBAL_COMPONENTS = {"embed": "hook_embed", "ln_final": "ln_final.hook_normalized"}


@dataclass(frozen=True, order=True)
class Site:
    """A place in the model: a layer's component, or a model-wide one (``embed``, ``ln_final``).

    >>> Site(1, "resid_post").hook_name
    'blocks.1.hook_resid_post'
    >>> Site.parse("0.mlp_post")
    Site(layer=0, component='mlp_post')
    >>> str(Site(None, "embed"))
    'embed'
    """

    layer: int | None
    component: str

    def __post_init__(self) -> None:
        if self.component in GLOBAL_COMPONENTS:
            if self.layer is not None:
                raise ValueError(f"site component {self.component!r} takes no layer (use None)")
        elif self.component in COMPONENTS:
            if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
                raise ValueError(
                    f"site {self.component!r} needs a layer index >= 0, got {self.layer!r}"
                )
        else:
            raise ValueError(
                f"unknown site component {self.component!r}; allowed: "
                f"{sorted(COMPONENTS) + sorted(GLOBAL_COMPONENTS)}"
            )

    @property
    def hook_name(self) -> str:
        if self.layer is None:
            return GLOBAL_COMPONENTS[self.component]
        return COMPONENTS[self.component].format(layer=self.layer)

    def check(self, n_layers: int) -> Site:
        """Raise unless the site exists in a model of ``n_layers`` layers; returns itself."""
        if self.layer is not None and self.layer >= n_layers:
            raise ValueError(
                f"site {self} needs layer {self.layer}, but the model has layers 0..{n_layers - 1}"
            )
        return self

    @classmethod
    def parse(cls, text: str) -> Site:
        """``"1.resid_post"`` or ``"embed"``."""
        layer, dot, component = text.partition(".")
        if not dot:
            return cls(None, text)
        if not layer.isdigit():
            raise ValueError(f"site must look like 'LAYER.COMPONENT' or 'embed', got {text!r}")
        return cls(int(layer), component)

    def __str__(self) -> str:
        return self.component if self.layer is None else f"{self.layer}.{self.component}"


# the matrix an editor rewrites, per kind of block: (key component, value component)
EDIT_MODULES = {"mlp": ("mlp_post", "mlp_out"), "mixer": ("mixer_key", "mixer_out")}


def edit_module(model: TransformerBridge) -> str:
    """``"mixer"`` for state-space (Mamba) blocks, whose ``out_proj`` is edited; else ``"mlp"``."""
    return "mixer" if COMPONENTS["mixer_key"].format(layer=0) in model.hook_dict else "mlp"


def edit_sites(module: str, layer: int) -> tuple[Site, Site]:
    """The key (matrix input) and value (matrix output) sites of the edited matrix at ``layer``.

    >>> [str(s) for s in edit_sites("mixer", 15)]
    ['15.mixer_key', '15.mixer_out']
    """
    if module not in EDIT_MODULES:
        raise ValueError(f"unknown edit module {module!r}; allowed: {sorted(EDIT_MODULES)}")
    key, out = EDIT_MODULES[module]
    return Site(layer, key), Site(layer, out)


def edit_weight(model: TransformerBridge, layer: int, module: str) -> Any:
    """The edited matrix as a writable ``[d_in, d_out]`` view (``out = key @ W``).

    MLP: ``blocks[layer].mlp.W_out``. Mamba: ``mixer.out_proj.weight`` is an ``nn.Linear``
    weight ``[d_out, d_in]``, so its transpose (a view: in-place writes reach the weight).
    """
    edit_sites(module, layer)[1].check(model.cfg.n_layers)
    try:
        if module == "mlp":
            weight = model.blocks[layer].mlp.W_out
        else:
            weight = model.blocks[layer].mixer.out_proj.weight.T
    except NotImplementedError:  # TransformerLens refuses to read an offloaded matrix
        weight = None
    if weight is None or weight.is_meta:
        raise OffloadedWeight(
            f"layer {layer}'s {module} matrix is offloaded (a device_map with disk offload): "
            f"its weights cannot be read or patched; apply edits as hooks, edited(model, edit)"
        )
    return weight


class OffloadedWeight(ValueError):
    """The edited matrix lives on disk (accelerate offload): only hooks can reach it."""


def all_sites(n_layers: int, components: tuple[str, ...] = ("resid_post",)) -> list[Site]:
    """Every layer's ``components``, plus the embedding: a layer sweep in one list."""
    return [Site(None, "embed")] + [Site(layer, c) for layer in range(n_layers) for c in components]
