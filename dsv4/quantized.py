"""Weights as the model reads them: plain arrays, or quantized pytrees dequantized on the fly.

Every weight the model multiplies with goes through `materialize`, so a weight kept in its
release form (FP8 with block scales, FP4 with group scales) is dequantized inside the jitted
forward without the layers knowing. A `QuantizedWeight` holds the release bytes in release
orientation ([out, in] per matrix) plus the static facts needed to turn them into the parameter:

    fmt     "fp8": data float8_e4m3fn [.., N, K], scale [.., ceil(N/bn), ceil(K/bk)]
            "fp4": data int8 [.., N, K/2] (two e2m1 codes per byte, low nibble first),
                   scale [.., N, ceil(K/32)]
            scale: E8M0 bytes (uint8, value 2^(b-127), 255 = NaN) or float32 values.
    layout  how the dequantized [.., N, K] becomes the parameter (the same transforms as the
            release name table in `dsv4.checkpoint`):
            "transpose" [N, K] -> [K, N]                 (linear weights)
            "grouped"   [G*r, K] -> [G, K, r]            (attn.wo_a, G = `groups`)
            "experts"   [E, N, K] -> [E, K, N]           (routed experts, stacked)
    dtype   the parameter dtype the dense weight is cast to.

Dequantization is exact in float32 (a value times a power of two, or one float32 product for
float scales), matching `dsv4.quant` bit for bit before the final cast.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dsv4.quant import E8M0_NAN, FP4_GROUP, FP4_LUT

FORMATS = ("fp8", "fp4")
LAYOUTS = ("transpose", "grouped", "experts")

_F32_NAN_BITS = 0x7FC00000
_F32_MIN_SUBNORMAL_E8M0 = 0x00400000  # 2^-127, what E8M0 byte 0 encodes (a float32 subnormal)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A weight stored as released (FP8 or packed FP4 with scales), dequantized by `materialize`.

    `data` and `scale` are pytree children (they get sharded, jitted, restored); the rest is static.
    """

    data: jax.Array
    scale: jax.Array
    fmt: str = dataclasses.field(metadata=dict(static=True))
    layout: str = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))
    block: tuple[int, int] = dataclasses.field(default=(128, 128), metadata=dict(static=True))
    groups: int = dataclasses.field(default=1, metadata=dict(static=True))

    def __post_init__(self):
        # Only static fields are checked: jax rebuilds the pytree with placeholder leaves.
        if self.fmt not in FORMATS:
            raise ValueError(f"QuantizedWeight.fmt must be one of {FORMATS}, got {self.fmt!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"QuantizedWeight.layout must be one of {LAYOUTS}, got {self.layout!r}")
        object.__setattr__(self, "block", tuple(int(b) for b in self.block))

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense parameter this weight stands for."""
        return implied_shapes(self.data.shape, self.fmt, self.layout, self.groups, self.block)[0]

    def dense(self) -> jax.Array:
        """The dequantized weight in the parameter's layout and dtype."""
        if self.fmt == "fp8":
            w = dequantize_fp8(self.data, self.scale, self.block)
        else:
            w = dequantize_fp4(self.data, self.scale)
        return to_param_layout(w, self.layout, self.groups).astype(self.dtype)


def materialize(value) -> jax.Array:
    """The weight as a dense array in the parameter's layout (identity for plain arrays)."""
    if isinstance(value, QuantizedWeight):
        return value.dense()
    return value


# ------------------------------------------------------------------------------ dequantization


def decode_e8m0(b: jax.Array) -> jax.Array:
    """E8M0 bytes -> float32 2^(b - 127) exactly (built from bits; 255 -> NaN)."""
    b = b.astype(jnp.uint32)
    bits = jnp.where(b == 0, jnp.uint32(_F32_MIN_SUBNORMAL_E8M0), b << 23)
    bits = jnp.where(b == E8M0_NAN, jnp.uint32(_F32_NAN_BITS), bits)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def scale_values(scale: jax.Array) -> jax.Array:
    """Scale tensor (E8M0 bytes or float values) -> float32 multipliers."""
    if scale.dtype == jnp.uint8:
        return decode_e8m0(scale)
    return scale.astype(jnp.float32)


def _expand(values: jax.Array, shape: tuple[int, int], block: tuple[int, int]) -> jax.Array:
    """[.., gN, gK] per-tile values -> [.., N, K] per-element values (partial tiles cropped)."""
    full = jnp.repeat(jnp.repeat(values, block[0], axis=-2), block[1], axis=-1)
    return full[..., : shape[0], : shape[1]]


def dequantize_fp8(data: jax.Array, scale: jax.Array, block: tuple[int, int]) -> jax.Array:
    """float8_e4m3fn [.., N, K] with per-tile scales [.., gN, gK] -> float32 [.., N, K]."""
    n, k = data.shape[-2:]
    return data.astype(jnp.float32) * _expand(scale_values(scale), (n, k), block)


def unpack_fp4(data: jax.Array) -> jax.Array:
    """int8 [.., N, K/2] packed e2m1 codes (low nibble first) -> float32 [.., N, K]."""
    raw = jax.lax.bitcast_convert_type(data, jnp.uint8)
    codes = jnp.stack([raw & 0xF, raw >> 4], axis=-1)  # [.., N, K/2, 2]
    values = jnp.asarray(FP4_LUT)[codes.astype(jnp.int32)]
    return values.reshape(*raw.shape[:-1], 2 * raw.shape[-1])


def dequantize_fp4(data: jax.Array, scale: jax.Array) -> jax.Array:
    """Packed FP4 [.., N, K/2] with per-32 scales [.., N, ceil(K/32)] -> float32 [.., N, K]."""
    values = unpack_fp4(data)
    n, k = values.shape[-2:]
    return values * _expand(scale_values(scale), (n, k), (1, FP4_GROUP))


def implied_shapes(data_shape, fmt: str, layout: str, groups: int, block) -> tuple[tuple, tuple]:
    """(dense parameter shape, scale shape) that quantized data of `data_shape` stands for."""
    *lead, n, k = data_shape
    if fmt == "fp4":
        k *= 2
        scale = (n, -(-k // FP4_GROUP))
    else:
        scale = (-(-n // block[0]), -(-k // block[1]))
    return tuple(lead) + _layout_shape((n, k), layout, groups), tuple(lead) + scale


def _layout_shape(nk: tuple[int, int], layout: str, groups: int) -> tuple[int, ...]:
    n, k = nk
    if layout == "grouped":
        return (groups, k, n // groups)
    return (k, n)


def to_param_layout(w: jax.Array, layout: str, groups: int = 1) -> jax.Array:
    """Release-oriented [.., N, K] -> the parameter layout (see the module docstring)."""
    if layout == "grouped":  # [G*r, K] -> [G, K, r]
        return w.reshape(groups, -1, w.shape[-1]).transpose(0, 2, 1)
    return jnp.swapaxes(w, -1, -2)  # transpose: [N, K] -> [K, N]; experts: [E, N, K] -> [E, K, N]


def to_param_layout_np(w: np.ndarray, layout: str, groups: int = 1) -> np.ndarray:
    """`to_param_layout` for numpy arrays (a view; used to check it against the name table)."""
    if layout == "grouped":
        return w.reshape(groups, -1, w.shape[-1]).transpose(0, 2, 1)
    return np.swapaxes(w, -1, -2)


def quantized_axes(axes: tuple, layout: str) -> tuple[tuple, tuple]:
    """Logical axes of (data, scale) of a quantized weight whose dense parameter has `axes`.

    data is in release orientation: transpose [in, out] -> [out, in]; grouped [G, in, r] -> [G*r, in]
    (rows follow the groups); experts [E, in, out] -> [E, out, in]. Scale grids keep only the
    expert axis (tiles are too coarse to split with the data).
    """
    if layout == "transpose":
        return (axes[1], axes[0]), (None, None)
    if layout == "grouped":
        return (axes[0], axes[1]), (None, None)
    if layout == "experts":
        return (axes[0], axes[2], axes[1]), (axes[0], None, None)
    raise ValueError(f"unknown quantized layout {layout!r}")
