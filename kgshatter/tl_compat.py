"""Every version-sensitive TransformerLens import lives here.

TransformerLens 4 removed ``HookedTransformer``; its successor is ``TransformerBridge``, built
from scratch with ``TransformerBridge.boot_native(TransformerBridgeConfig(...))``.

kgshatter also reaches a few TransformerLens internals: the native attention and block modules
(the lean attention forward, the frozen prefix and last-columns readouts), the normalization
bridge (the lean LayerNorm), the soft-cap switch and ``HookPoint``. They are named here, and
only here, so that a TransformerLens release that moves one breaks this file alone. Each is
imported on first use (``from kgshatter.tl_compat import NativeAttention`` inside a function):
importing TransformerLens takes seconds, and ``import kgshatter`` imports none of it.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (module, attribute) of the TransformerLens internals kgshatter uses (TL 4.3)
INTERNALS: dict[str, tuple[str, str]] = {
    "NativeAttention": ("transformer_lens.model_bridge.sources.native.model", "NativeAttention"),
    "NativeBlock": ("transformer_lens.model_bridge.sources.native.model", "NativeBlock"),
    "NormalizationBridge": (
        "transformer_lens.model_bridge.generalized_components.normalization",
        "NormalizationBridge",
    ),
    "softcap_enabled": ("transformer_lens.utilities.activation_functions", "softcap_enabled"),
    "HookPoint": ("transformer_lens.hook_points", "HookPoint"),
}


def bridge_classes() -> tuple[Any, Any]:
    """``(TransformerBridge, TransformerBridgeConfig)``, imported on first use (import is ~4 s)."""
    from transformer_lens import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge, TransformerBridgeConfig


def __getattr__(name: str) -> Any:
    """One of :data:`INTERNALS`, imported on first use."""
    if name not in INTERNALS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = INTERNALS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value
