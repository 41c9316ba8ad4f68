"""Helpers shared by the kernels: backend choice, argument checks, padding, pair swaps, online softmax.

Backends: "gpu" (Pallas Triton lowering; gathers are masked vector loads), "tpu" (Pallas Mosaic;
gathers are DMAs addressed by scalars in SMEM) and "reference" (the op's pure-jnp reference, used
on every other platform unless `interpret=True`). With `interpret=True` the chosen kernel runs
through the Pallas interpreter on any platform: the GPU form through the generic interpreter, the
TPU form through the TPU interpreter (`pltpu.InterpretParams`), which also simulates DMAs and SMEM.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
# Finite start value for the running max of an online softmax: a row whose keys are all masked
# keeps m = M_INIT and l = 0, and exp(M_INIT - m) never produces inf - inf = NaN.
M_INIT = -1e30
BACKENDS = ("gpu", "tpu", "reference")
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# ------------------------------------------------------------------------------------------ backend


def resolve_backend(backend: str | None, interpret: bool) -> str:
    """The backend a call runs on: "gpu", "tpu" or "reference".

    None picks the default platform's kernel (CUDA and ROCm both mean "gpu"); on any other platform
    it picks the reference, or the GPU-form kernel when `interpret` is set.
    """
    if backend is None:
        platform = jax.default_backend()
        platform = "gpu" if platform in ("gpu", "cuda", "rocm") else platform
        if platform in ("gpu", "tpu"):
            return platform
        return "gpu" if interpret else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def interpret_param(backend: str, interpret: bool):
    """The `interpret=` value for pallas_call: the TPU interpreter for TPU kernels, else a bool."""
    if interpret and backend == "tpu":
        return pltpu.InterpretParams()
    return bool(interpret)


def gpu_compiler_params(num_warps: int, num_stages: int):
    """Triton compiler params for a GPU-form pallas_call with these warps and pipeline stages."""
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------------- argument checks


def check_shape(name: str, x, expected: Sequence[int | None], what: str = "") -> None:
    """Raise ValueError unless x.shape matches `expected` (None matches any size)."""
    shape = tuple(getattr(x, "shape", ()))
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape, strict=False))
    if not ok:
        want = "[" + ", ".join("?" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name}: expected shape {want}{' ' + what if what else ''}, got {list(shape)}")


def check_dtype(name: str, x, allowed: Sequence) -> None:
    """Raise ValueError unless x.dtype is one of `allowed`."""
    allowed = tuple(jnp.dtype(a) for a in allowed)
    if jnp.dtype(x.dtype) not in allowed:
        raise ValueError(f"{name}: expected dtype in {[a.name for a in allowed]}, got {jnp.dtype(x.dtype).name}")


def check_positive(name: str, value, minimum: int = 1) -> None:
    """Raise ValueError unless `value` is an int (not a bool) >= `minimum`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")


# ------------------------------------------------------------------------------------------- shapes


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers."""
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    """The smallest multiple of b that is >= a."""
    return cdiv(a, b) * b


def next_pow2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1."""
    return 1 << max(0, (n - 1).bit_length())


# Triton's matmul needs every dimension of a dot >= 16. The MLIR path Pallas takes does not check
# it: on an H200 an HCA chunk with 4 entries (a [32, 4] x [4, 512] product) compiled and returned
# wrong values (max error 2.35). The compiled GPU form pads every dot dimension up to this. The
# interpreter has no such limit, and tiles of 1-2 rows keep it fast and exercise the chunk loops;
# tests raise INTERPRET_MIN_DOT to run the padded tiles through the interpreter too.
TRITON_MIN_DOT = 16
INTERPRET_MIN_DOT = 1


def min_dot(interpret: bool) -> int:
    """The smallest dot dimension the GPU form may use: TRITON_MIN_DOT when compiled."""
    return INTERPRET_MIN_DOT if interpret else TRITON_MIN_DOT


def gpu_tile(size: int, block: int, interpret: bool) -> int:
    """A GPU-form tile over `size` items: the power of two >= size, at most `block`, at least `min_dot`."""
    return max(min_dot(interpret), min(block, next_pow2(size)))


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """Pad x at the end of `axis` up to `size` (no copy when it already has that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


# ------------------------------------------------------------------------------ pair swap (x[i ^ d])


def xor_partner_reshape(x: jax.Array, d: int) -> jax.Array:
    """y[..., i] = x[..., i ^ d] along the last axis (length a multiple of 2d), by reshape and split.

    Uses only ops the Triton lowering has (reshape, two-way split, last-axis stack, transpose).
    """
    *lead, n = x.shape
    x4 = x.reshape(*lead, n // (2 * d), 2, d)
    lo, hi = jnp.split(x4, 2, axis=-2)  # [..., n/2d, 1, d] each
    swapped = jnp.stack([hi, lo], axis=-1)  # [..., n/2d, 1, d, 2]
    return jnp.swapaxes(swapped, -1, -2).reshape(*lead, n)


def xor_partner_roll(x: jax.Array, d: int) -> jax.Array:
    """y[..., i] = x[..., i ^ d] along the last axis, by two lane rotations (Mosaic-friendly)."""
    n, axis = x.shape[-1], x.ndim - 1
    lane = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
    return jnp.where((lane & d) == 0, pltpu.roll(x, n - d, axis), pltpu.roll(x, d, axis))


def xor_partner(backend: str):
    """The pair-swap function (x[..., i ^ d]) for `backend`: lane rotations on TPU, reshapes elsewhere."""
    return xor_partner_roll if backend == "tpu" else xor_partner_reshape


# ----------------------------------------------------------------------------------- online softmax


def softmax_init(rows: int, width: int):
    """Running (max m [M, 1], denominator den [M, 1], numerator acc [M, width]) of an online softmax."""
    return jnp.full((rows, 1), M_INIT, F32), jnp.zeros((rows, 1), F32), jnp.zeros((rows, width), F32)


def softmax_step(state, q: jax.Array, keys: jax.Array, valid: jax.Array, scale: float):
    """Fold one chunk of shared K=V keys into the running state.

    q [M, K] (M query rows), keys [C, K] (also the values), valid [M, C] or [1, C] bool.
    Logits are q.k * scale in float32; masked ones are -inf and add nothing.
    """
    m, den, acc = state
    logits = jax.lax.dot_general(q, keys, (((1,), (1,)), ((), ())), preferred_element_type=F32) * scale
    logits = jnp.where(valid, logits, -jnp.inf)  # [M, C]
    m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(logits - m_new)
    den_new = alpha * den + jnp.sum(p, axis=1, keepdims=True)
    pv = jax.lax.dot_general(p.astype(keys.dtype), keys, (((1,), (0,)), ((), ())), preferred_element_type=F32)
    return m_new, den_new, alpha * acc + pv


def softmax_finish(m: jax.Array, den: jax.Array, acc: jax.Array, sink: jax.Array) -> jax.Array:
    """Normalise with a value-less sink logit per row in the denominator: acc / (den + e^sink).

    m, den, sink [M, 1]; acc [M, K].
    """
    top = jnp.maximum(m, sink)
    keep = jnp.exp(m - top)
    return acc * (keep / (den * keep + jnp.exp(sink - top)))
