"""punet.compare against values worked out by hand: max abs error, relative L2, NaN counts, tolerance."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from punet.compare import TOLERANCE, Comparison, compare_files, compare_tensors
from punet.errors import PunetError


def test_known_values():
    ref = torch.tensor([[3.0, -4.0]])  # norm 5
    c = compare_tensors(torch.tensor([[3.0, -2.0]]), ref, "x")
    assert c == Comparison(key="x", shape=(1, 2), max_abs_error=2.0, max_abs_ref=4.0, rel_l2=0.4, nan_a=0, nan_b=0)
    assert c.to_dict() == {"key": "x", "shape": (1, 2), "max_abs_error": 2.0, "max_abs_ref": 4.0, "rel_l2": 0.4,
                           "nan_a": 0, "nan_b": 0}
    assert compare_tensors(ref, ref).rel_l2 == 0.0 and compare_tensors(ref, ref).key == "sample"


def test_relative_l2_is_against_the_reference():
    """rel_l2 = |a - b| / |b|, with b the reference (the second argument)."""
    a, b = torch.tensor([6.0, 8.0]), torch.tensor([3.0, 4.0])
    assert compare_tensors(a, b).rel_l2 == pytest.approx(1.0)
    assert compare_tensors(b, a).rel_l2 == pytest.approx(0.5)


def test_computed_in_fp64():
    """A 1e-9 difference on values near 1 survives (fp32 would round it away)."""
    b = torch.ones(4, dtype=torch.float64)
    c = compare_tensors(b + 1e-9, b)
    assert c.max_abs_error == pytest.approx(1e-9, rel=1e-3) and c.rel_l2 == pytest.approx(1e-9, rel=1e-3)
    half = torch.tensor([1.5, -2.25], dtype=torch.bfloat16)  # exact in bf16
    assert compare_tensors(half, half.float()).rel_l2 == 0.0


def test_small_reference_is_still_relative():
    """A reference of norm below 1 is divided by too (only a zero reference is not)."""
    c = compare_tensors(torch.tensor([0.3, 0.2]), torch.tensor([0.3, 0.4]))  # |diff| 0.2, |ref| 0.5
    assert c.rel_l2 == pytest.approx(0.4)


def test_zero_reference_gives_the_absolute_norm():
    c = compare_tensors(torch.tensor([3.0, 4.0]), torch.zeros(2))
    assert c.rel_l2 == 5.0 and c.max_abs_ref == 0.0 and c.max_abs_error == 4.0


def test_empty_tensors():
    c = compare_tensors(torch.zeros(0, 3), torch.zeros(0, 3))
    assert c.max_abs_error == 0.0 and c.max_abs_ref == 0.0 and c.rel_l2 == 0.0 and c.shape == (0, 3)


def test_nans_are_counted_and_fail():
    nan = float("nan")
    a, b = torch.tensor([1.0, nan, nan, 2.0]), torch.tensor([1.0, 2.0, nan, 2.0])
    c = compare_tensors(a, b)
    assert (c.nan_a, c.nan_b) == (2, 1)
    assert math.isinf(c.rel_l2) and math.isinf(c.max_abs_error)
    assert c.max_abs_ref == 2.0  # NaNs in the reference do not hide its magnitude
    assert not c.ok(1e9)
    only_b = compare_tensors(torch.tensor([1.0, 2.0]), torch.tensor([1.0, nan]))
    assert only_b.nan_a == 0 and only_b.nan_b == 1 and not only_b.ok(1e9)
    only_a = compare_tensors(torch.tensor([1.0, nan]), torch.tensor([1.0, 2.0]))
    assert only_a.nan_a == 1 and only_a.nan_b == 0 and not only_a.ok(1e9)


def test_ok_is_inclusive():
    c = compare_tensors(torch.tensor([3.0, -2.0]), torch.tensor([3.0, -4.0]))  # rel_l2 exactly 0.4
    assert c.ok(0.4) and c.ok(0.5) and not c.ok(0.39)


def test_shape_mismatch_names_the_key():
    with pytest.raises(PunetError, match=r"noise: shapes differ: \[2, 3\] vs \[3, 2\]"):
        compare_tensors(torch.zeros(2, 3), torch.zeros(3, 2), "noise")


def test_compare_files(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"sample": torch.tensor([3.0, -2.0]), "extra": torch.ones(2)}, str(a))
    save_file({"sample": torch.tensor([3.0, -4.0]), "extra": torch.ones(2)}, str(b))
    got = compare_files(a, b)
    assert [c.key for c in got] == ["extra", "sample"]
    assert got[0].rel_l2 == 0.0 and got[1].rel_l2 == pytest.approx(0.4)
    save_file({"sample": torch.ones(2)}, str(b))
    with pytest.raises(PunetError, match=r"hold different keys: \['extra', 'sample'\] vs \['sample'\]"):
        compare_files(a, b)


def test_tolerances():
    """fp32 is held to 1e-4; fp16 and bf16 to 1e-2 (punet demo's bounds)."""
    assert TOLERANCE == {"float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}
