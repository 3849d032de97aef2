"""Writes multi-device-data-tiling-N.mlir for N devices (the module of multi-device-data-tiling.md is N=2): python multi-device-data-tiling.py N.

A timestep embedding feeding a Linear on each of N devices, summed on device 0 (see multi-device-data-tiling.md).
"""

import sys

import torch
from iree.turbine import aot
from torch import nn

from punet.model.layers import timestep_embedding
from punet.sharded.export import _place, install_mlir_isinstance_shim
from punet.sharded.model import DeviceComm

install_mlir_isinstance_shim()
devices = int(sys.argv[1])


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.ModuleList(nn.Linear(32, 128) for _ in range(devices))
        self.comm = DeviceComm(devices)

    def forward(self, t):
        ys = [lin(timestep_embedding(t, 32, True, 0)) for lin, t in zip(self.lin, self.comm.replicate(t))]
        return self.comm.gather([sum(self.comm.to(0, y) for y in ys)])


with torch.device("meta"):
    m = M()
for r in range(devices):
    _place(m.lin[r], r, lambda k: "lin." + k)
out = aot.export(m, args=(torch.empty(1, device="meta"),), arg_device={0: aot.DeviceAffinity(0)}, strict_export=False)
out.save_mlir(f"multi-device-data-tiling-{devices}.mlir")
