"""Torch modules of the punet UNet. Imports need torch alone."""

from .guided import GuidedUNet
from .unet import UNet2DConditionModel

__all__ = ["GuidedUNet", "UNet2DConditionModel"]
