"""Every version-sensitive TransformerLens import lives here.

TransformerLens 4 removed ``HookedTransformer``; its successor is ``TransformerBridge``, built
from scratch with ``TransformerBridge.boot_native(TransformerBridgeConfig(...))``.
"""

from __future__ import annotations

from typing import Any


def bridge_classes() -> tuple[Any, Any]:
    """``(TransformerBridge, TransformerBridgeConfig)``, imported on first use (import is ~4 s)."""
    from transformer_lens import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge, TransformerBridgeConfig
