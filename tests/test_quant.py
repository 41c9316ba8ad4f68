"""Exactness tests for dsv4.quant against hand-written literals and round trips."""

import ml_dtypes
import numpy as np
import pytest

from dsv4 import quant

E4M3 = ml_dtypes.float8_e4m3fn


# ------------------------------------------------------------------------------------ E8M0


def test_decode_e8m0_literals():
    got = quant.decode_e8m0(np.array([127, 130, 126, 0, 254, 255], np.uint8))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got[:5], np.array([1.0, 8.0, 0.5, 2.0**-127, 2.0**127], np.float32))
    assert np.isnan(got[5])


def test_decode_e8m0_accepts_ml_dtypes_view():
    raw = np.array([[127, 128]], np.uint8)
    if hasattr(ml_dtypes, "float8_e8m0fnu"):
        np.testing.assert_array_equal(quant.decode_e8m0(raw.view(ml_dtypes.float8_e8m0fnu)), [[1.0, 2.0]])


def test_encode_e8m0_round_trip_all_finite_bytes():
    raw = np.arange(255, dtype=np.uint8)
    np.testing.assert_array_equal(quant.encode_e8m0(quant.decode_e8m0(raw)), raw)


@pytest.mark.parametrize("bad", [3.0, 0.0, -2.0, np.nan, np.inf, 2.0**128])
def test_encode_e8m0_rejects_non_powers_of_two(bad):
    with pytest.raises(ValueError, match="E8M0 can only encode .*powers of two"):
        quant.encode_e8m0(np.array([1.0, bad]))


# ------------------------------------------------------------------------------------ FP8


def test_dequantize_fp8_literal_two_tiles():
    # [1, 130]: tile 0 covers k < 128 (scale 2^3), tile 1 covers k = 128, 129 (scale 2^-1).
    w = np.zeros((1, 130), np.float32)
    w[0, 0], w[0, 127], w[0, 128], w[0, 129] = 1.5, -3.0, 448.0, -0.25
    got = quant.dequantize_fp8(w.astype(E4M3), np.array([[130, 126]], np.uint8))
    assert got.dtype == np.float32 and got.shape == (1, 130)
    assert (got[0, 0], got[0, 127], got[0, 128], got[0, 129]) == (12.0, -24.0, 224.0, -0.125)
    assert np.count_nonzero(got) == 4


def test_dequantize_fp8_float_scales():
    w = np.array([[1.0, 2.0], [-4.0, 0.5]], np.float32).astype(E4M3)
    got = quant.dequantize_fp8(w, np.array([[0.1]], np.float32))
    np.testing.assert_array_equal(got, np.array([[1.0, 2.0], [-4.0, 0.5]], np.float32) * np.float32(0.1))


def test_dequantize_fp8_wrong_grid_names_shapes():
    w = np.zeros((130, 200), E4M3)
    with pytest.raises(ValueError, match=r"\(1, 2\).*expected \(2, 2\)"):
        quant.dequantize_fp8(w, np.zeros((1, 2), np.uint8))


@pytest.mark.parametrize("scale_fmt", ["ue8m0", "float"])
def test_fp8_partial_tiles_round_trip_exact_on_grid(scale_fmt):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(130, 200)).astype(np.float32)
    q, s = quant.quantize_fp8(w, scale_fmt=scale_fmt)
    assert q.dtype == E4M3 and q.shape == (130, 200)
    assert s.shape == (2, 2) and s.dtype == (np.uint8 if scale_fmt == "ue8m0" else np.float32)
    deq = quant.dequantize_fp8(q, s)
    # Already on the grid: a second round trip reproduces the values exactly (the scale itself
    # may halve when rounding pulled the tile max below a power-of-two boundary).
    q2, s2 = quant.quantize_fp8(deq, scale_fmt=scale_fmt)
    np.testing.assert_array_equal(quant.dequantize_fp8(q2, s2), deq)


@pytest.mark.parametrize("scale_fmt", ["ue8m0", "float"])
def test_fp8_of_a_tile_below_float32_range_has_no_nan_codes(scale_fmt):
    """amax / 448 of a tile with amax 1e-43 underflows float32: a zero "float" scale made the zeros'
    codes NaN (0 / 0), an export that load_hf then refused as damaged."""
    w = np.full((2, 3), 1e-43, np.float32)
    w[0, 0] = 0.0  # 0 / 0
    q, s = quant.quantize_fp8(w, scale_fmt=scale_fmt)
    assert not np.isnan(q.astype(np.float32)).any() and quant.damage("F8_E4M3", q, s) is None
    np.testing.assert_allclose(quant.dequantize_fp8(q, s), w, rtol=0, atol=1e-43)  # at worst flushed to 0


def test_fp8_ue8m0_scale_is_smallest_power_of_two():
    w = np.zeros((2, 3), np.float32)
    w[0, 0] = 448.0  # exactly representable at scale 1
    _, s = quant.quantize_fp8(w)
    assert s.tolist() == [[127]]
    w[0, 0] = 448.5  # needs scale 2
    _, s = quant.quantize_fp8(w)
    assert s.tolist() == [[128]]
    _, s = quant.quantize_fp8(np.zeros((3, 3), np.float32))
    assert s.tolist() == [[127]]  # zero tile -> scale 1


@pytest.mark.parametrize("scale_fmt", ["ue8m0", "float"])
def test_fp8_quantize_error_bounded(scale_fmt):
    rng = np.random.default_rng(1)
    w = (rng.standard_t(3, size=(257, 300)) * 0.05).astype(np.float32)
    q, s = quant.quantize_fp8(w, scale_fmt=scale_fmt)
    err = np.abs(quant.dequantize_fp8(q, s) - w)
    amax = quant._expand_tiles(quant._tile_amax(w, (128, 128)), w.shape, (128, 128))
    # e4m3 has 3 mantissa bits: relative rounding error <= 2^-4 of a value's own binade, and the
    # scale puts the tile max within a factor 2 of 448; subnormals bottom out at 2^-10 * scale.
    assert np.all(err <= amax * 2.0**-4)
    assert np.all(err <= np.abs(w) * 2.0**-4 + amax * 2.0**-9 * 2)


# ------------------------------------------------------------------------------------ FP4


def test_unpack_fp4_literal():
    # byte 0x21: low nibble 1 -> 0.5 (element 0), high nibble 2 -> 1.0 (element 1).
    packed = np.array([[0x21, 0xF8], [0x7A, 0x09]], np.uint8).view(np.int8)
    got = quant.unpack_fp4(packed)
    expected = np.array([[0.5, 1.0, -0.0, -6.0], [-1.0, 6.0, -0.5, 0.0]], np.float32)
    np.testing.assert_array_equal(got, expected)
    assert np.signbit(got[0, 2])


def test_dequantize_fp4_literal_2x4():
    packed = np.array([[0x21, 0xF8], [0x7A, 0x09]], np.uint8).view(np.int8)
    scale = np.array([[128], [125]], np.uint8)  # row 0: x2, row 1: x0.25
    got = quant.dequantize_fp4(packed, scale)
    np.testing.assert_array_equal(got, [[1.0, 2.0, -0.0, -12.0], [-0.25, 1.5, -0.125, 0.0]])


def test_dequantize_fp4_group_boundary_and_partial_group():
    # K = 40: groups [0, 32) and [32, 40); every code is 2 (value 1.0).
    packed = np.full((1, 20), 0x22, np.uint8)
    got = quant.dequantize_fp4(packed, np.array([[127, 129]], np.uint8))
    np.testing.assert_array_equal(got[0, :32], 1.0)
    np.testing.assert_array_equal(got[0, 32:], 4.0)


def test_dequantize_fp4_wrong_grid():
    with pytest.raises(ValueError, match=r"\(3, 1\).*expected \(3, 2\)"):
        quant.dequantize_fp4(np.zeros((3, 20), np.int8), np.zeros((3, 1), np.uint8))


def test_fp4_round_trip_exact_on_grid_partial_group():
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 16, size=(130, 200))
    group_exp = rng.integers(-5, 5, size=(130, 7))
    w = quant.FP4_LUT[codes] * np.repeat(np.exp2(group_exp), 32, axis=1)[:, :200].astype(np.float32)
    packed, scale = quant.quantize_fp4(w)
    assert packed.dtype == np.int8 and packed.shape == (130, 100)
    assert scale.dtype == np.uint8 and scale.shape == (130, 7)
    np.testing.assert_array_equal(quant.dequantize_fp4(packed, scale), w)


def test_fp4_quantize_rounds_to_nearest_with_ties_to_even_code():
    # Scale 1 (amax 6). Ties: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
    x = np.array([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, -2.9, 0.2, -0.3], np.float32)
    row = np.concatenate([x, np.zeros(20, np.float32)])[None]
    packed, scale = quant.quantize_fp4(row)
    assert scale.tolist() == [[127]]
    got = quant.dequantize_fp4(packed, scale)[0, :12]
    np.testing.assert_array_equal(got, [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -3.0, 0.0, -0.5])


def test_fp4_quantize_error_bounded():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(64, 96)).astype(np.float32)
    packed, scale = quant.quantize_fp4(w)
    err = np.abs(quant.dequantize_fp4(packed, scale) - w)
    amax = quant._expand_tiles(quant._tile_amax(w, (1, 32)), w.shape, (1, 32))
    # group scale <= amax / 3; the largest e2m1 gap is 2 (4 -> 6), so error <= scale <= amax / 3.
    assert np.all(err <= amax / 3)


def test_quantize_fp4_rejects_odd_k():
    with pytest.raises(ValueError, match=r"even K, got shape \(2, 3\)"):
        quant.quantize_fp4(np.zeros((2, 3), np.float32))
