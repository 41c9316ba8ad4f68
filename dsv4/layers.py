"""Small building blocks: linear layers, RMSNorm and DeepSeek-V4's interleaved partial RoPE."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4.config import ModelConfig
from dsv4.params import KeyChain, constant, normal, param
from dsv4.quantized import materialize

F32 = jnp.float32


class Linear(nnx.Module):
    """y = x @ weight, weight stored [in, out] (the release stores [out, in]; the loader transposes)."""

    def __init__(self, d_in: int, d_out: int, axes: Sequence[str | None], dtype, keys: KeyChain, std=0.02):
        self.weight = param(keys, (d_in, d_out), axes, dtype, normal(std))

    def __call__(self, x: jax.Array) -> jax.Array:
        w = materialize(self.weight.get_value())
        return jnp.matmul(x.astype(w.dtype), w)


class RMSNorm(nnx.Module):
    """Weighted RMSNorm, computed in float32; the weight is kept in float32 and the result cast back."""

    def __init__(self, dim: int, eps: float, keys: KeyChain, axis: str | None = "embed"):
        self.eps = eps
        self.weight = param(keys, (dim,), (axis,), F32, constant(1.0))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.eps, self.weight.get_value())


def inv_rms(xf: jax.Array, eps: float) -> jax.Array:
    """rsqrt(mean(x^2) + eps) over the last axis, kept as a size-1 axis: [..., D] -> [..., 1]."""
    return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def rms_norm(x: jax.Array, eps: float, weight: jax.Array | None = None) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) [* weight] over the last axis, in float32, cast back to x.dtype."""
    xf = x.astype(F32)
    y = xf * inv_rms(xf, eps)
    if weight is not None:
        y = y * weight.astype(F32)
    return y.astype(x.dtype)


# ---------------------------------------------------------------------------------------------- RoPE


def _default_inv_freq(base: float, dim: int) -> np.ndarray:
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(base) ** exponents)).astype(np.float32)


def _yarn_inv_freq(base: float, dim: int, factor, original_len, beta_fast, beta_slow) -> np.ndarray:
    """YaRN-interpolated inverse frequencies (architecture.md section 2); no attention scaling."""

    def correction_dim(rotations):
        return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / np.float32(high - low), 0, 1)
    extrapolated = _default_inv_freq(base, dim)
    interpolated = (np.float32(1.0) / (np.float32(factor) / extrapolated)).astype(np.float32)
    return (interpolated * ramp + extrapolated * (1 - ramp)).astype(np.float32)


def rope_inv_freq(cfg: ModelConfig, compressed: bool) -> np.ndarray:
    """Inverse frequencies [R/2] of one of the two RoPE tables.

    Sliding-only layers and the MTP block use base `rope_theta` without scaling; CSA and HCA layers
    (their queries, keys, compressors and indexer) use `compress_rope_theta` with YaRN.
    """
    dim = cfg.qk_rope_head_dim
    if not compressed:
        return _default_inv_freq(cfg.rope_theta, dim)
    rs = cfg.rope_scaling
    if rs is None:
        return _default_inv_freq(cfg.compress_rope_theta, dim)
    return _yarn_inv_freq(
        cfg.compress_rope_theta,
        dim,
        rs.factor,
        rs.original_max_position_embeddings,
        rs.beta_fast,
        rs.beta_slow,
    )


def rope_angles(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [*positions.shape, R/2] (float32)."""
    freqs = positions.astype(F32)[..., None] * jnp.asarray(inv_freq, F32)
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, inverse: bool = False) -> jax.Array:
    """Rotate the last 2*cos.shape[-1] channels of x as interleaved pairs (x[2i], x[2i+1]).

    x: [..., K]; cos, sin: broadcastable to [..., R/2]. `inverse` rotates by the negated angle.
    This is the interleaved layout of DeepSeek, not Llama's half-split `rotate_half`:
    out[2i] = x[2i] cos_i - x[2i+1] sin_i, out[2i+1] = x[2i+1] cos_i + x[2i] sin_i.

    Computed as x * c + swap_pairs(x) * s over all K channels, with c = (1.., cos_0, cos_0, ..)
    and s = (0.., -sin_0, sin_0, ..) per position: one elementwise pass that XLA fuses, where
    splitting the pairs, stacking the halves and concatenating the unrotated channels back
    copied x three times (4x slower on CPU).
    """
    half, k = cos.shape[-1], x.shape[-1]
    if k % 2:
        raise ValueError(f"apply_rope: the last axis of x must be even (pairs), got shape {x.shape}")
    sin = -sin if inverse else sin
    unrotated = [(0, 0)] * (cos.ndim - 1) + [(k - 2 * half, 0)]
    c = jnp.pad(jnp.repeat(cos, 2, axis=-1), unrotated, constant_values=1.0)
    s = jnp.pad(jnp.stack([-sin, sin], axis=-1).reshape(*sin.shape[:-1], 2 * half), unrotated)
    xf = x.astype(F32)
    swapped = xf.reshape(*x.shape[:-1], k // 2, 2)[..., ::-1].reshape(x.shape)  # (x[2i+1], x[2i])
    return (xf * c + swapped * s).astype(x.dtype)
