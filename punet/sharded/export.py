"""The multi-device module to export: every weight external, on the device of the rank that holds it.

Tensor parallel (`Signature.tp`): `ShardedUNet` with `DeviceComm`; rank r's model lives on IREE
logical device r, its split weights read from `<key>.rank<r>` and its replicated ones from `<key>`
(one global per device, the same archive entry). Data parallel (`Signature.dp`, the CFG step): punet's
`GuidedUNet` around the float UNet twice, on devices 0 and 1 (each its half of the rows), both reading `<key>`. The inputs arrive on device 0 and the
output leaves from it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import UNetConfig
from ..signature import SCOPE, Signature, dtype_from_name
from .archive import rank_key
from .model import DataParallelUNet, DeviceComm, ShardedUNet
from .plan import make_plan


def _place(module: nn.Module, rank: int, name=lambda key: key) -> None:
    """Mark every weight of `module` external under SCOPE as `name(key)`, on logical device `rank`."""
    from iree.turbine.aot import DeviceTensorTrait, ExternalTensorTrait

    for key, t in module.state_dict(keep_vars=True).items():
        ExternalTensorTrait(external_scope=SCOPE, external_name=name(key)).set(t)
        DeviceTensorTrait(rank).set(t)


def multi_device_model(
    config: UNetConfig, sig: Signature, decompose_attention: bool, attention_slices: bool = True
) -> nn.Module:
    """The UNet over `sig.tp` devices, or the CFG step over `sig.dp` devices, on the meta device."""
    from ..model import GuidedUNet, UNet2DConditionModel

    install_mlir_isinstance_shim()
    dtype = dtype_from_name(sig.dtype)
    comm = DeviceComm(sig.devices)
    if sig.tp > 1:
        plan = make_plan(config, sig.tp)
        with torch.device("meta"):
            unet = ShardedUNet(config, plan, comm).to(dtype).eval()
        unet.set_decomposed_attention(decompose_attention, attention_slices)
        for r, local in enumerate(unet.ranks):
            _place(local, r, lambda key, r=r: rank_key(key, r) if plan.is_sharded(key) else key)
        return GuidedUNet(unet) if sig.cfg else unet
    unets = []
    for r in range(sig.dp):
        with torch.device("meta"):
            unet = UNet2DConditionModel(config).to(dtype).eval()
        unet.set_decomposed_attention(decompose_attention, attention_slices)
        _place(unet, r)
        unets.append(unet)
    return GuidedUNet(DataParallelUNet(unets, comm))


def install_mlir_isinstance_shim() -> None:
    """Let iree-turbine 3.9's custom ops (the device transfers) run with IREE 3.13's MLIR bindings.

    turbine expands custom ops with `IntegerType.isinstance(t)`-style static checks, which the MLIR
    Python bindings of iree-base-compiler 3.13 no longer have ("type object 'IntegerType' has no
    attribute 'isinstance'": iree-org/iree-turbine#1267). Put them back, as the same test the
    bindings' constructors make (a cast that raises on another kind). Idempotent; nothing else changes.
    """
    from iree.compiler import ir

    for name in ("IntegerType", "RankedTensorType", "IndexType", "ShapedType", "MemRefType", "VectorType",
                 "FloatType", "OpResult", "BlockArgument"):
        cls = getattr(ir, name, None)
        if cls is None or hasattr(cls, "isinstance"):
            continue

        def check(value, cls=cls) -> bool:
            if isinstance(value, cls):
                return True
            try:
                cls(value)
            except (ValueError, TypeError):
                return False
            return True

        cls.isinstance = staticmethod(check)
