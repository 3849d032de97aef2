"""Tensor- and data-parallel punet: the plan as data (`plan`), the sharded forward (`model`), rank archives (`archive`).

Imports with torch alone; IREE is imported inside the functions that use it.
"""

from .model import DataParallelUNet, DeviceComm, EagerComm, ShardedUNet, local_unet
from .plan import RULES, Plan, Split, make_plan, split_tensor

__all__ = [
    "RULES", "DataParallelUNet", "DeviceComm", "EagerComm", "Plan", "ShardedUNet", "Split", "local_unet", "make_plan",
    "split_tensor",
]
