"""Numerical comparison of two outputs: max abs error, relative L2, NaN counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import PunetError
from .signature import OUTPUT_NAME
from .tensors import load_tensors


@dataclass(frozen=True)
class Comparison:
    key: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_abs_ref: float
    rel_l2: float
    nan_a: int
    nan_b: int

    def ok(self, rtol: float) -> bool:
        return self.nan_a == 0 and self.nan_b == 0 and self.rel_l2 <= rtol

    def to_dict(self) -> dict:
        return asdict(self)


def compare_tensors(a: torch.Tensor, b: torch.Tensor, key: str = OUTPUT_NAME) -> Comparison:
    """Compare `a` against the reference `b` (both upcast to fp64)."""
    if a.shape != b.shape:
        raise PunetError(f"{key}: shapes differ: {list(a.shape)} vs {list(b.shape)}")
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    nan_a, nan_b = int(torch.isnan(a64).sum()), int(torch.isnan(b64).sum())
    diff = (a64 - b64).nan_to_num(nan=float("inf"))
    ref_norm = b64.nan_to_num().norm().item()
    rel = diff.norm().item() / ref_norm if ref_norm > 0 else float(diff.norm().item())
    return Comparison(
        key=key,
        shape=tuple(a.shape),
        max_abs_error=diff.abs().max().item() if diff.numel() else 0.0,
        max_abs_ref=b64.nan_to_num().abs().max().item() if b64.numel() else 0.0,
        rel_l2=rel,
        nan_a=nan_a,
        nan_b=nan_b,
    )


def compare_files(a: str | Path, b: str | Path) -> list[Comparison]:
    """Compare every tensor of file `a` with the same key in reference file `b`."""
    ta, tb = load_tensors(a), load_tensors(b)
    if set(ta) != set(tb):
        raise PunetError(f"{a} and {b} hold different keys: {sorted(ta)} vs {sorted(tb)}")
    return [compare_tensors(ta[k], tb[k], k) for k in sorted(ta)]


# Relative L2 bound of an output against fp32 torch eager, by compute dtype.
TOLERANCE: dict[str, float] = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}
