"""Export a UNet with every Linear/Conv2d bias folded into its contraction, to try inner_tiled on the whole model.

    python docs/repro/cpu-inner-tiled-fold.py check                    # the folded forms vs the plain ones (float64)
    python docs/repro/cpu-inner-tiled-fold.py export unet_f32.irpa out.mlir [SIZE] [--per-head]
        # full model, SIZE x SIZE (default 256), attention decomposed; --per-head: its QK^T and PV as 2-D
        # matmuls, one (batch row, head) at a time (inner_tiled takes no batch_matmul)

Linear: y = [x, 1] @ [W, b]^T on x flattened to 2-D (inner_tiled takes matmul, not batch_matmul);
Conv2d (odd kernel, centred padding): a ones input channel whose kernel holds the bias at the centre
tap, which always lands inside the image. Both exact (0.0 difference in float64). The weights'
concatenations are constant expressions: `punet pack` computes them once. What it showed
(docs/cpu-tuning.md): with attention as batch matmuls the whole UNet does not compile with inner_tiled in
IREE 3.13; with --per-head it compiles and runs right, but slower than the packed set at 256x256.
"""

import sys
import torch
import torch.nn.functional as F
from torch import nn


def linear_forward(self, x):
    w = self.weight if self.bias is None else torch.cat([self.weight, self.bias[:, None]], 1)
    x2 = x.reshape(-1, x.shape[-1])  # 2-D: inner_tiled takes matmul, not batch_matmul
    if self.bias is not None:
        x2 = torch.cat([x2, torch.ones(x2.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
    return (x2 @ w.T).reshape(*x.shape[:-1], w.shape[0])


def conv_forward(self, x):
    kh, kw = self.kernel_size
    pad = self.padding if isinstance(self.padding, tuple) else (self.padding, self.padding)
    if self.bias is None or self.groups != 1 or kh % 2 == 0 or kw % 2 == 0 or pad != (kh // 2, kw // 2):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
    ones = torch.ones_like(x[:, :1])
    wb = F.pad(self.bias.view(-1, 1, 1, 1), (kw // 2, kw // 2, kh // 2, kh // 2))  # bias at the centre tap
    return F.conv2d(torch.cat([x, ones], 1), torch.cat([self.weight, wb], 1), None, self.stride, self.padding)


nn.Linear.forward = linear_forward
nn.Conv2d.forward = conv_forward

if sys.argv[1] == "check":  # the folded forms against the plain ones, float64
    torch.manual_seed(0)
    lin = nn.Linear(8, 5).double()
    x = torch.randn(2, 3, 8).double()
    print("linear", (lin(x) - F.linear(x, lin.weight, lin.bias)).abs().max().item())
    for stride in (1, 2):
        for k in (1, 3):
            c = nn.Conv2d(4, 6, k, stride=stride, padding=k // 2).double()
            x = torch.randn(2, 4, 9, 9).double()
            print("conv", k, stride, (c(x) - F.conv2d(x, c.weight, c.bias, stride, k // 2)).abs().max().item())
else:
    import punet.model.layers as layers
    from punet.export import export_mlir
    from punet.signature import Signature

    def per_head(q, k, v, scores_per_slice=None):
        b, h, n, d = q.shape
        qs, ks, vs = (t.reshape(b * h, -1, d) for t in (q, k, v))
        return torch.stack([layers._softmax_attention(qs[i], ks[i], vs[i]) for i in range(b * h)]).reshape(q.shape)

    args = [a for a in sys.argv[2:] if a != "--per-head"]
    if "--per-head" in sys.argv:
        layers.decomposed_attention = per_head
    size = int(args[2]) if len(args) > 2 else 256
    r = export_mlir(args[0], args[1], sig=Signature(1, size, size, "float32"), decompose_attention=True, force=True)
    print(r)
