"""The finite check: NaN and Inf in float tensors are caught, nothing else is."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from serialization import PayloadError, check_finite, decode, encode

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INTS = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
BAD = [float("nan"), float("inf"), float("-inf")]


def is_rejected(state: dict[str, torch.Tensor]) -> bool:
    try:
        check_finite(state)
    except PayloadError as exc:
        return exc.reason == "not_finite"
    return False


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 5000), data=st.data())
def test_one_nan_or_inf_anywhere_is_caught(
    dtype: torch.dtype, size: int, data: st.DataObject
) -> None:
    """A single NaN, +Inf or -Inf at any index of a float tensor of any length is rejected."""
    t = torch.randn(size).to(dtype)
    t[data.draw(st.integers(0, size - 1))] = data.draw(st.sampled_from(BAD))
    assert is_rejected({"ok": torch.ones(3, dtype=dtype), "bad": t})


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("bad", BAD, ids=str)
def test_decode_with_finite_rejects_and_without_accepts(dtype: torch.dtype, bad: float) -> None:
    """decode(finite=True) raises not_finite; decode() alone hands the values over."""
    payload = encode({"w": torch.tensor([[1.0, bad], [3.0, 4.0]], dtype=dtype)})
    with pytest.raises(PayloadError, match="not_finite"):
        decode(payload, finite=True)
    state, _ = decode(payload)
    assert not torch.isfinite(state["w"]).all()


@pytest.mark.parametrize(
    ("dtype", "value", "count"),
    [
        (torch.float32, 3e38, 1_000_000),  # a float32 sum overflows after two of them
        (torch.float32, torch.finfo(torch.float32).min, 10_000),
        (torch.float16, 65504.0, 100_000),
        (torch.bfloat16, 3.3e38, 10_000),
        (torch.float64, 1.7e308, 1_000),  # overflows even a float64 sum
    ],
    ids=["f32-huge", "f32-most-negative", "f16-max", "bf16-huge", "f64-huge"],
)
def test_huge_finite_values_whose_sum_overflows_are_not_flagged(
    dtype: torch.dtype, value: float, count: int
) -> None:
    """Values near the dtype's maximum overflow a sum, yet they are finite: no false positive."""
    t = torch.full((count,), value, dtype=dtype)
    assert torch.isfinite(t).all()
    assert not is_rejected({"t": t})
    t[count // 2] = -t[count // 2]  # both signs: partial sums may overflow either way
    assert not is_rejected({"t": t})
    t[-1] = float("nan")
    assert is_rejected({"t": t})


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_edge_finite_values_pass(dtype: torch.dtype) -> None:
    """Zeros of both signs, subnormals, max and min values pass; 0-d and empty tensors too."""
    info = torch.finfo(dtype)
    t = torch.tensor([0.0, -0.0, info.tiny / 4, -info.tiny / 4, info.max, info.min], dtype=dtype)
    assert not is_rejected({"t": t, "scalar": torch.tensor(1.0, dtype=dtype),
                            "empty": torch.empty(0, 3, dtype=dtype)})
    assert is_rejected({"scalar": torch.tensor(float("inf"), dtype=dtype)})


@pytest.mark.parametrize("dtype", INTS, ids=str)
def test_integer_tensors_are_never_flagged(dtype: torch.dtype) -> None:
    """Integers have no NaN: even bit patterns that would be NaN as floats pass."""
    info = torch.iinfo(dtype)
    t = torch.tensor([info.min, info.max, 0, -1 if info.min < 0 else 1], dtype=dtype)
    nan_bits = torch.full((64,), float("nan")).view(torch.int32)
    assert not is_rejected({"t": t, "bits": nan_bits, "bool": torch.ones(5, dtype=torch.bool)})
    state, _ = decode(encode({"t": t, "bits": nan_bits}), finite=True)
    assert torch.equal(state["bits"], nan_bits)


def test_non_contiguous_float_views_are_checked() -> None:
    """check_finite works on strided views (a caller's tensors, not only decoded ones)."""
    t = torch.ones(4, 6)
    t[1, 3] = float("nan")
    assert is_rejected({"t": t.t()})
    assert not is_rejected({"t": t[::2]})
