"""The scheduled UNet: the SDXL denoising loop around the float UNet (torch alone).

`euler` is diffusers' EulerDiscreteScheduler as tables and tensor math;
`model` wraps the float UNet as shark-ai's serving engine calls it;
`generate` runs a whole loop, eager from an .irpa or compiled from a .vmfb.
"""

from .euler import SchedulerConfig
from .model import ScheduledUNet, ServingUNet

__all__ = ["ScheduledUNet", "SchedulerConfig", "ServingUNet"]
