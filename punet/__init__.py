"""punet: the SD-family UNet from a Hugging Face checkpoint to a compiled IREE binary.

Lightweight at import: the torch model loads on first use of
`punet.UNet2DConditionModel`; IREE stages live in `punet.export`,
`punet.compile` and `punet.runtime`.
"""

from __future__ import annotations

from .config import ConfigError, UNetConfig

__version__ = "0.1.0"
__all__ = ["ConfigError", "UNetConfig", "UNet2DConditionModel", "__version__"]


def __getattr__(name: str):
    if name == "UNet2DConditionModel":
        from .model import UNet2DConditionModel

        return UNet2DConditionModel
    raise AttributeError(f"module 'punet' has no attribute {name!r}")
