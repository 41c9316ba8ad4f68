"""Exact (de)quantization of the DeepSeek-V4 release weight formats, in plain numpy.

Formats (section 3 of the project notes `../shared/docs/checkpoint_format.md`, outside this repository):

- E8M0 scale byte b: the value 2^(b - 127); b = 255 is NaN.
- FP8 weights: float8_e4m3fn [N, K] with one scale per 128x128 tile,
  W[n, k] = fp8(Wq[n, k]) * s[n // 128, k // 128]. Scales are E8M0 bytes or float32 values.
- FP4 weights (routed experts): int8 [N, K/2], two e2m1 codes per byte along K (element 2j in the
  low nibble, 2j+1 in the high nibble), one E8M0 scale per row per 32 inputs,
  W[n, k] = lut[code(n, k)] * 2^(S[n, k // 32] - 127).

Grids are ceil-division grids, so partial tiles (N or K not a multiple of the block) are allowed.
Everything here is exact: no value passes through a lower precision than the format defines.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP4_MAX = 6.0  # largest e2m1 magnitude
FP8_BLOCK = 128
FP4_GROUP = 32
E8M0_BIAS = 127
E8M0_NAN = 255

# e2m1 code -> value; codes 8..15 are the negatives of 0..7 (code 8 is -0).
FP4_LUT = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)
_FP4_MAGNITUDES = FP4_LUT[:8].astype(np.float64)
_FP4_MIDPOINTS = (_FP4_MAGNITUDES[1:] + _FP4_MAGNITUDES[:-1]) / 2  # [7] decision boundaries

_E8M0_DTYPE = getattr(ml_dtypes, "float8_e8m0fnu", None)


# ----------------------------------------------------------------------------------------- E8M0


def _as_e8m0_bytes(b: np.ndarray) -> np.ndarray:
    """View E8M0 data (uint8 bytes or ml_dtypes float8_e8m0fnu) as uint8 bytes."""
    b = np.asarray(b)
    if _E8M0_DTYPE is not None and b.dtype == _E8M0_DTYPE:
        return b.view(np.uint8)
    if b.dtype != np.uint8:
        raise ValueError(f"E8M0 scales must be uint8 bytes or float8_e8m0fnu, got dtype {b.dtype}")
    return b


def decode_e8m0(b: np.ndarray) -> np.ndarray:
    """Decode E8M0 bytes to float32: 2^(b - 127) exactly, NaN where b == 255."""
    raw = _as_e8m0_bytes(b)
    is_nan = raw == E8M0_NAN
    exps = np.where(is_nan, E8M0_BIAS, raw.astype(np.int32)) - E8M0_BIAS
    out = np.ldexp(np.float32(1.0), exps).astype(np.float32)
    out[is_nan] = np.nan
    return out


def encode_e8m0(scale) -> np.ndarray:
    """Encode finite positive powers of two in [2^-127, 2^127] as E8M0 bytes (uint8).

    Raises ValueError for anything else (non powers of two, zero, negatives, NaN, out of range).
    """
    s = np.asarray(scale, dtype=np.float64)
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError("E8M0 can only encode finite, positive powers of two")
    mant, exp = np.frexp(s)  # s = mant * 2^exp, mant in [0.5, 1)
    if np.any(mant != 0.5):
        raise ValueError("E8M0 can only encode exact powers of two")
    biased = exp.astype(np.int64) - 1 + E8M0_BIAS
    if np.any(biased < 0) or np.any(biased > E8M0_NAN - 1):
        raise ValueError("E8M0 can only encode powers of two between 2^-127 and 2^127")
    return biased.astype(np.uint8)


def damage(code: str, raw: np.ndarray, scale: np.ndarray | None = None) -> tuple[str, str] | None:
    """Why quantized release data cannot be what a release holds: ("weight" | "scale", reason), or None.

    raw: the stored weight (`code` "F8_E4M3", "I8" or another dtype string), scale: its scale
    tensor or rows of it. Refused: an FP8 (E4M3FN) byte that is a NaN code (0x7F, 0xFF), an E8M0
    scale byte 255 (NaN), a float scale that is not finite. Each would dequantize to NaN or
    infinity without a word; FP4 (E2M1) has no such codes.
    """
    if code == "F8_E4M3" and np.any((np.asarray(raw).view(np.uint8) & 0x7F) == 0x7F):
        return "weight", "an FP8 weight byte is a NaN code (0x7F or 0xFF)"
    if scale is None:
        return None
    scale = np.asarray(scale)
    if scale.dtype.itemsize == 1:  # E8M0 or U8 bytes
        if np.any(scale.view(np.uint8) == E8M0_NAN):
            return "scale", "a scale byte is 255, E8M0's NaN"
    elif not np.all(np.isfinite(scale.astype(np.float32))):
        return "scale", "a scale is not a finite number"
    return None


def _scale_values(scale: np.ndarray) -> np.ndarray:
    """Scale tensor (E8M0 bytes or float values) -> float32 multipliers."""
    scale = np.asarray(scale)
    if scale.dtype == np.uint8 or (_E8M0_DTYPE is not None and scale.dtype == _E8M0_DTYPE):
        return decode_e8m0(scale)
    if scale.dtype.kind == "f" or scale.dtype == ml_dtypes.bfloat16:
        return scale.astype(np.float32)
    raise ValueError(f"scales must be E8M0 bytes (uint8) or floats, got dtype {scale.dtype}")


def _pow2_exponent_at_least(amax: np.ndarray, limit: float) -> np.ndarray:
    """Smallest integer e (clamped to the E8M0 range) with amax <= limit * 2^e; amax 0 -> e = 0."""
    amax = np.asarray(amax, dtype=np.float64)
    safe = np.where(amax > 0, amax, limit)
    e = np.ceil(np.log2(safe / limit))
    # log2 may be off by one ulp near powers of two: make e exactly the smallest valid exponent.
    e = e + (safe > limit * np.exp2(e))
    e = e - (safe <= limit * np.exp2(e - 1))
    return np.clip(e, -E8M0_BIAS, E8M0_BIAS).astype(np.int64)


# ------------------------------------------------------------------------------------------- FP8


def _grid_shape(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))


def _expand_tiles(tile_values: np.ndarray, shape: tuple[int, int], block: tuple[int, int]) -> np.ndarray:
    """[gN, gK] per-tile values -> [N, K] per-element values (partial last tiles cropped)."""
    full = np.repeat(np.repeat(tile_values, block[0], axis=0), block[1], axis=1)
    return full[: shape[0], : shape[1]]


def _tile_amax(w: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """Max |w| per tile of a [N, K] array -> [gN, gK] (partial tiles zero-padded)."""
    gn, gk = _grid_shape(w.shape, block)
    padded = np.zeros((gn * block[0], gk * block[1]), dtype=np.float64)
    padded[: w.shape[0], : w.shape[1]] = np.abs(w)
    return padded.reshape(gn, block[0], gk, block[1]).max(axis=(1, 3))


def _check_grid(kind: str, actual: tuple[int, ...], expected: tuple[int, ...], shape) -> None:
    if tuple(actual) != tuple(expected):
        raise ValueError(
            f"{kind} scale grid has shape {tuple(actual)}, expected {tuple(expected)} "
            f"for a weight of shape {tuple(shape)}"
        )


def _as_block(block) -> tuple[int, int]:
    return (block, block) if isinstance(block, int) else (int(block[0]), int(block[1]))


def dequantize_fp8(w: np.ndarray, scale: np.ndarray, block=(FP8_BLOCK, FP8_BLOCK)) -> np.ndarray:
    """Dequantize a block-scaled FP8 weight.

    Args:
      w: float8_e4m3fn [N, K].
      scale: [ceil(N/bn), ceil(K/bk)] E8M0 bytes (uint8) or float32 values.
      block: tile shape (bn, bk), or one int for square tiles.
    Returns:
      float32 [N, K] with W[n, k] = float(w[n, k]) * s[n // bn, k // bk].
    """
    w = np.asarray(w)
    if w.dtype != ml_dtypes.float8_e4m3fn:
        raise ValueError(f"FP8 weight must be float8_e4m3fn, got dtype {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"FP8 weight must be 2-D, got shape {w.shape}")
    block = _as_block(block)
    scale = np.asarray(scale)
    _check_grid("FP8", scale.shape, _grid_shape(w.shape, block), w.shape)
    return w.astype(np.float32) * _expand_tiles(_scale_values(scale), w.shape, block)


def quantize_fp8(w: np.ndarray, scale_fmt: str = "ue8m0", block: int | tuple[int, int] = FP8_BLOCK):
    """Quantize a float [N, K] weight to block-scaled FP8.

    Per tile: "ue8m0" uses the power-of-two scale 2^ceil(log2(amax / 448)) returned as E8M0 bytes
    (uint8); "float" uses amax / 448 returned as float32 (at least float32's smallest subnormal). An
    all-zero tile gets scale 1. Values are divided by their scale and rounded to nearest float8_e4m3fn.

    Returns:
      (float8_e4m3fn [N, K], scale [ceil(N/bn), ceil(K/bk)]) for block (bn, bk); an int is (block, block).
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"FP8 quantization needs a 2-D weight, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("cannot quantize non-finite values to FP8")
    blk = _as_block(block)
    amax = _tile_amax(w, blk)
    if scale_fmt == "ue8m0":
        exps = _pow2_exponent_at_least(amax, FP8_MAX)
        tile_scale = np.exp2(exps.astype(np.float64))
        scale_out = encode_e8m0(tile_scale)
    elif scale_fmt == "float":
        scale_out = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
        # a tile below ~6e-43 has amax / 448 under float32's range: a zero scale made its codes NaN
        scale_out = np.maximum(scale_out, np.finfo(np.float32).smallest_subnormal)
        tile_scale = scale_out.astype(np.float64)
    else:
        raise ValueError(f"scale_fmt must be 'ue8m0' or 'float', got {scale_fmt!r}")
    scaled = w.astype(np.float64) / _expand_tiles(tile_scale, w.shape, blk)
    # float scales may leave amax/scale a rounding error above 448; e4m3fn overflows to NaN.
    scaled = np.clip(scaled, -FP8_MAX, FP8_MAX)
    return scaled.astype(ml_dtypes.float8_e4m3fn), scale_out


# ------------------------------------------------------------------------------------------- FP4


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
    """Unpack int8/uint8 [N, K/2] (two e2m1 codes per byte, low nibble first) -> float32 [N, K]."""
    raw = _fp4_bytes(packed)
    codes = np.stack([raw & 0xF, raw >> 4], axis=-1)  # [N, K/2, 2]
    return FP4_LUT[codes.reshape(raw.shape[0], 2 * raw.shape[1])]


def _fp4_bytes(packed: np.ndarray) -> np.ndarray:
    packed = np.asarray(packed)
    if packed.dtype not in (np.int8, np.uint8):
        raise ValueError(f"packed FP4 must be int8 or uint8, got dtype {packed.dtype}")
    if packed.ndim != 2:
        raise ValueError(f"packed FP4 must be 2-D [N, K/2], got shape {packed.shape}")
    return packed.view(np.uint8)


def dequantize_fp4(packed: np.ndarray, scale_e8m0: np.ndarray) -> np.ndarray:
    """Dequantize packed FP4 [N, K/2] with E8M0 scales [N, ceil(K/32)] -> float32 [N, K].

    W[n, k] = lut[code(n, k)] * 2^(S[n, k // 32] - 127). Float scales are accepted as well.
    """
    raw = _fp4_bytes(packed)
    n, k = raw.shape[0], 2 * raw.shape[1]
    scale_e8m0 = np.asarray(scale_e8m0)
    _check_grid("FP4", scale_e8m0.shape, (n, math.ceil(k / FP4_GROUP)), (n, k))
    per_elem = _expand_tiles(_scale_values(scale_e8m0), (n, k), (1, FP4_GROUP))
    return unpack_fp4(raw) * per_elem


def _round_to_e2m1_codes(x: np.ndarray) -> np.ndarray:
    """Round values with |x| <= 6 to the nearest e2m1 code; ties go to the even code (as RNE)."""
    mag = np.abs(x)
    lo = np.searchsorted(_FP4_MIDPOINTS, mag, side="left")  # ties -> smaller magnitude
    hi = np.searchsorted(_FP4_MIDPOINTS, mag, side="right")  # ties -> larger magnitude
    idx = np.where((lo != hi) & (lo % 2 == 1), hi, lo)
    sign = np.signbit(x).astype(np.int64) << 3
    return (idx | sign).astype(np.uint8)


def quantize_fp4(w: np.ndarray):
    """Quantize a float [N, K] weight (K even) to packed FP4 with E8M0 scales per 32 inputs.

    Per (row, 32-group) scale 2^ceil(log2(amax / 6)) (1 for an all-zero group); values are divided
    by the scale and rounded to the nearest e2m1 value (ties to the even code).

    Returns:
      (packed int8 [N, K/2], scale uint8 [N, ceil(K/32)]).
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % 2:
        raise ValueError(f"FP4 quantization needs a 2-D weight with an even K, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("cannot quantize non-finite values to FP4")
    amax = _tile_amax(w, (1, FP4_GROUP))  # [N, ceil(K/32)]
    exps = _pow2_exponent_at_least(amax, FP4_MAX)
    group_scale = np.exp2(exps.astype(np.float64))
    scaled = w.astype(np.float64) / _expand_tiles(group_scale, w.shape, (1, FP4_GROUP))
    codes = _round_to_e2m1_codes(scaled)  # [N, K]
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.astype(np.uint8).view(np.int8), encode_e8m0(group_scale)
