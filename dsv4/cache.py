"""The DeepSeek-V4 KV cache: a functional pytree with fixed shapes for a given (batch, max length).

Per layer (letters: B batch, W sliding window, K head dim, J indexer head dim, m ratio, C_w the
compressor width = K for HCA or 2K for CSA (two series), P = history ring length):

- `window` [B, W, K], storage dtype, axes (batch, -, kv_dim); every layer. A ring: the key of
  position p sits in slot p % W.
- `compressor.raw_kv` / `raw_gate` [B, P, C_w], float32, axes (batch, -, compress_dim); CSA and
  HCA layers. The last P tokens' wkv(x) and wgate(x) + ape, slot = position % P.
- `compressor.entries` [B, max_len // m, K], storage format, axes (batch, -, kv_dim): the
  compressed entries, entry w in row w.
- `indexer.*`: the same for the CSA indexer's own compressor, with K -> J.

P = 2m for CSA (the previous complete window's A-series is needed by the next entry, plus the
window filling now) and m for HCA. `lengths` [B] int32 counts the tokens each sequence consumed;
everything else is derived from it: entry count = lengths // m, ring slots = position % size.

Alignment convention: every sequence has its own positions 0, 1, 2, ... (no left padding). A
prefill chunk is right-padded: row b holds `n[b]` real tokens, the rest is ignored (never written
to the cache, never visible to real tokens). Compression windows are aligned to absolute
positions per sequence (window w covers positions [w*m, (w+1)*m)), as in the release.

Storage formats (runtime choice, `fmt`): "bfloat16" (default), "float32" (exact, for tests) and
"compact": each K-wide entry as K-R FP8 E4M3 values with one E8M0 scale per 64, plus R BF16 RoPE
values (448 + 7 + 128 bytes for K = 512); indexer keys as FP4 (e2m1) with one E8M0 scale per 32.
The raw rings stay float32 in every format: they are constant-size and feed the pooling softmax.

Entry stores in floats narrower than 32 bits (bfloat16, FP8 E4M3) hold their bits as unsigned
integers (uint16, uint8) and are reinterpreted on read (a bitcast, fused into the reader). A decode
step writes one row per sequence; an integer scatter does that in place, while XLA's CPU backend
widens a bfloat16 or FP8 scatter to float32, converting the whole [B, T, d] store to float32 and
back on every step (what made decode time grow with the context at batch 8).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from dsv4.config import ModelConfig
from dsv4.quant import FP4_LUT

FORMATS = ("bfloat16", "float32", "compact")
FP8_GROUP = 64  # compact entries: one E8M0 scale per this many FP8 values of a row
FP4_GROUP = 32  # compact indexer keys: one E8M0 scale per this many FP4 values


def _pytree(cls):
    """Register a dataclass as a pytree whose fields are all children."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


# ------------------------------------------------------------------------------- entry storage


@_pytree
class DenseStore:
    """Entries stored as they are: values [B, T, d]."""

    values: jax.Array

    def read(self) -> jax.Array:
        """The entries [B, T, d] as stored."""
        return self.values

    def write(self, rows: jax.Array, new: jax.Array) -> DenseStore:
        """Set values[b, rows[b, u]] = new[b, u]; rows out of range are dropped."""
        return DenseStore(_scatter_rows(self.values, rows, new.astype(self.values.dtype)))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values"], meta_fields=["dtype"])
@dataclasses.dataclass(frozen=True)
class BitsStore:
    """Entries in a float format narrower than 32 bits, held as their bits: values [B, T, d] uint16 or uint8.

    `dtype` (static) names the format, e.g. "bfloat16"; `read` returns the entries in it.
    """

    values: jax.Array
    dtype: str

    def read(self) -> jax.Array:
        """The entries [B, T, d] in `dtype` (a bitcast of the stored bits)."""
        return from_bits(self.values, self.dtype)

    def write(self, rows: jax.Array, new: jax.Array) -> BitsStore:
        """Set entries[b, rows[b, u]] = new[b, u] (rounded to the format); rows out of range are dropped."""
        return BitsStore(_scatter_rows(self.values, rows, to_bits(new.astype(self.dtype))), self.dtype)


@_pytree
class Fp8Store:
    """Compact entries: [B, T, d-R] FP8 E4M3, [B, T, ceil((d-R)/64)] E8M0 scales, [B, T, R] BF16 RoPE.

    The FP8 values and the BF16 RoPE values are held as their bits (uint8, uint16).
    """

    nope: jax.Array
    scales: jax.Array
    rope: jax.Array

    def read(self) -> jax.Array:
        """The entries [B, T, d] in float32: the dequantized FP8 part followed by the BF16 RoPE part."""
        nope = from_bits(self.nope, jnp.float8_e4m3fn).astype(jnp.float32)
        nope = _blockwise(nope, FP8_GROUP) * _e8m0(self.scales)[..., None]
        nope = nope.reshape(*nope.shape[:-2], nope.shape[-2] * nope.shape[-1])[..., : self.nope.shape[-1]]
        return jnp.concatenate([nope, from_bits(self.rope, jnp.bfloat16).astype(jnp.float32)], axis=-1)

    def write(self, rows, new) -> Fp8Store:
        """Set entries[b, rows[b, u]] = new[b, u] (last R values as BF16, the rest as FP8 with fresh scales).

        Rows out of range are dropped.
        """
        r = self.rope.shape[-1]
        q, s = quantize_fp8_blocks(new[..., :-r].astype(jnp.float32))
        return Fp8Store(
            _scatter_rows(self.nope, rows, to_bits(q)),
            _scatter_rows(self.scales, rows, s),
            _scatter_rows(self.rope, rows, to_bits(new[..., -r:].astype(jnp.bfloat16))),
        )


@_pytree
class Fp4Store:
    """Compact indexer keys: [B, T, J/2] packed e2m1 codes (low nibble first) + [B, T, J/32] E8M0 scales."""

    packed: jax.Array
    scales: jax.Array

    def read(self) -> jax.Array:
        """The keys in bfloat16, exactly: an e2m1 value (2 significant bits) times a power of two fits."""
        codes = jnp.stack([self.packed & 0xF, self.packed >> 4], axis=-1)
        codes = codes.reshape(*self.packed.shape[:-1], 2 * self.packed.shape[-1])
        values = jnp.asarray(FP4_LUT)[codes.astype(jnp.int32)]
        scaled = _blockwise(values, FP4_GROUP) * _e8m0(self.scales)[..., None]
        scaled = scaled.reshape(*values.shape[:-1], scaled.shape[-2] * FP4_GROUP)[..., : values.shape[-1]]
        return scaled.astype(jnp.bfloat16)

    def write(self, rows, new) -> Fp4Store:
        """Set keys[b, rows[b, u]] = new[b, u], quantized to FP4 with fresh scales; rows out of range are dropped."""
        packed, scales = quantize_fp4_groups(new.astype(jnp.float32))
        return Fp4Store(_scatter_rows(self.packed, rows, packed), _scatter_rows(self.scales, rows, scales))


def _scatter_rows(values: jax.Array, rows: jax.Array, new: jax.Array) -> jax.Array:
    """values [B, T, ...], rows [B, U] int32, new [B, U, ...]: per-row scatter, rows outside [0, T) dropped.

    A negative row is dropped too (JAX's scatter would count it from the end, even with mode="drop").
    """
    if values.shape[1] == 0:  # nothing can land (a sequence shorter than one window)
        return values
    batch = jnp.broadcast_to(jnp.arange(values.shape[0])[:, None], rows.shape)
    rows = jnp.where(rows < 0, values.shape[1], rows)
    return values.at[batch, rows].set(new, mode="drop")


def _bits_dtype(dtype) -> np.dtype:
    """The unsigned integer dtype of the same width as `dtype`."""
    return np.dtype(f"uint{8 * np.dtype(dtype).itemsize}")


def to_bits(x: jax.Array) -> jax.Array:
    """x's bits as unsigned integers of its width (bfloat16 -> uint16, FP8 -> uint8)."""
    return jax.lax.bitcast_convert_type(x, _bits_dtype(x.dtype))


def from_bits(bits: jax.Array, dtype) -> jax.Array:
    """The inverse of `to_bits`: unsigned integers reinterpreted as `dtype` of the same width."""
    return jax.lax.bitcast_convert_type(bits, jnp.dtype(dtype))


def _blockwise(x: jax.Array, block: int) -> jax.Array:
    """[..., d] -> [..., ceil(d/block), block] (zero-padded)."""
    d = x.shape[-1]
    n = -(-d // block)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n * block - d)])
    return x.reshape(*x.shape[:-1], n, block)


def _e8m0(b: jax.Array) -> jax.Array:
    return jnp.exp2(b.astype(jnp.float32) - 127.0)


def _pow2_scale(amax: jax.Array, top: float) -> jax.Array:
    """E8M0 byte of the smallest power of two s with amax / s <= top (1.0 for an all-zero block)."""
    exponent = jnp.ceil(jnp.log2(jnp.maximum(amax, 1e-30) / top))
    exponent = jnp.where(amax > 0, exponent, 0.0)
    return jnp.clip(exponent + 127, 0, 254).astype(jnp.uint8)


def quantize_fp8_blocks(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., d] -> (FP8 E4M3 [..., d], E8M0 scale bytes [..., ceil(d/64)]), power-of-two scales."""
    blocks = _blockwise(x, FP8_GROUP)
    scales = _pow2_scale(jnp.max(jnp.abs(blocks), axis=-1), 448.0)
    q = jnp.clip(blocks / _e8m0(scales)[..., None], -448, 448).astype(jnp.float8_e4m3fn)
    return q.reshape(*q.shape[:-2], q.shape[-2] * q.shape[-1])[..., : x.shape[-1]], scales


def quantize_fp4_groups(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., J] (J even) -> (packed e2m1 codes uint8 [..., J/2], E8M0 scale bytes [..., ceil(J/32)])."""
    groups = _blockwise(x, FP4_GROUP)
    scales = _pow2_scale(jnp.max(jnp.abs(groups), axis=-1), 6.0)
    scaled = (groups / _e8m0(scales)[..., None]).reshape(*x.shape[:-1], groups.shape[-2] * FP4_GROUP)
    scaled = scaled[..., : x.shape[-1]]
    codes = jnp.argmin(jnp.abs(scaled[..., None] - jnp.asarray(FP4_LUT)), axis=-1).astype(jnp.uint8)
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(jnp.uint8), scales


def empty_store(batch: int, rows: int, dim: int, rope: int, fmt: str, is_index_key: bool):
    """An all-zero entry store of `rows` entries of width `dim` in the given format."""
    if fmt == "compact" and is_index_key:
        return Fp4Store(
            jnp.zeros((batch, rows, dim // 2), jnp.uint8),
            jnp.full((batch, rows, -(-dim // FP4_GROUP)), 127, jnp.uint8),
        )
    if fmt == "compact":
        return Fp8Store(
            jnp.zeros((batch, rows, dim - rope), jnp.uint8),  # FP8 E4M3 bits (0 = +0.0)
            jnp.full((batch, rows, -(-(dim - rope) // FP8_GROUP)), 127, jnp.uint8),
            jnp.zeros((batch, rows, rope), jnp.uint16),  # bfloat16 bits
        )
    if np.dtype(fmt).itemsize < 4:
        return BitsStore(jnp.zeros((batch, rows, dim), _bits_dtype(fmt)), fmt)
    return DenseStore(jnp.zeros((batch, rows, dim), jnp.dtype(fmt)))


# ------------------------------------------------------------------------------------ the cache


@_pytree
class CompressorState:
    """One compressor's running state: raw-token ring and the compressed entries emitted so far."""

    raw_kv: jax.Array  # [B, P, C_w] float32, slot = position % P
    raw_gate: jax.Array  # [B, P, C_w] float32 (ape included)
    entries: DenseStore | BitsStore | Fp8Store | Fp4Store  # [B, max_len // m, d]


@_pytree
class LayerCache:
    """One layer: the sliding-window ring, plus compressor (CSA/HCA) and indexer (CSA) states."""

    window: jax.Array  # [B, W, K], slot = position % W
    compressor: CompressorState | None
    indexer: CompressorState | None


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["lengths", "layers"], meta_fields=["max_len"]
)
@dataclasses.dataclass(frozen=True)
class Cache:
    """The whole model's cache: `lengths` [B] int32, one LayerCache per main layer, and `max_len`."""

    lengths: jax.Array
    layers: tuple[LayerCache, ...]
    max_len: int


def compressor_state(batch, max_len, ratio, dim, overlap, rope, fmt, is_index_key) -> CompressorState:
    """An empty compressor state able to hold `max_len // ratio` entries."""
    width = dim * (2 if overlap else 1)
    history = ratio * (2 if overlap else 1)
    return CompressorState(
        jnp.zeros((batch, history, width), jnp.float32),
        jnp.zeros((batch, history, width), jnp.float32),
        empty_store(batch, max_len // ratio, dim, rope, fmt, is_index_key),
    )


def layer_cache(cfg: ModelConfig, ratio: int, batch: int, max_len: int, fmt: str) -> LayerCache:
    """An empty cache for one layer of compression ratio `ratio` (0, 4 or 128)."""
    window_dtype = jnp.float32 if fmt == "float32" else jnp.bfloat16
    window = jnp.zeros((batch, cfg.sliding_window, cfg.head_dim), window_dtype)
    comp = index = None
    r = cfg.qk_rope_head_dim
    if ratio:
        overlap = ratio == 4
        comp = compressor_state(batch, max_len, ratio, cfg.head_dim, overlap, r, fmt, False)
        if overlap:
            index = compressor_state(batch, max_len, ratio, cfg.index_head_dim, True, r, fmt, True)
    return LayerCache(window, comp, index)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, fmt: str = "bfloat16") -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` tokens each."""
    if fmt not in FORMATS:
        raise ValueError(f"cache format {fmt!r} is not one of {FORMATS}")
    sizes_ok = all(isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_) for v in (batch, max_len))
    if not sizes_ok or batch < 1 or max_len < 1:
        raise ValueError(f"cache needs integers batch >= 1 and max_len >= 1, got batch={batch!r}, max_len={max_len!r}")
    batch, max_len = int(batch), int(max_len)
    limit = cfg.max_position_embeddings  # prefill and decode_step check only the cache's length
    if max_len > limit:
        raise ValueError(f"cache max_len {max_len} exceeds the model's max_position_embeddings {limit}")
    layers = tuple(
        layer_cache(cfg, cfg.compress_ratios[i], batch, max_len, fmt) for i in range(cfg.num_hidden_layers)
    )
    return Cache(jnp.zeros((batch,), jnp.int32), layers, max_len)


@functools.lru_cache(maxsize=16)
def _layouts(cfg: ModelConfig, batch: int, max_len: int) -> dict:
    """{format: (tree structure, leaf shapes and dtypes)} of `init_cache(cfg, batch, max_len, format)`."""
    out = {}
    for fmt in FORMATS:
        leaves, tree = jax.tree_util.tree_flatten(jax.eval_shape(lambda fmt=fmt: init_cache(cfg, batch, max_len, fmt)))
        out[fmt] = tree, [(tuple(x.shape), np.dtype(x.dtype)) for x in leaves]
    return out


def check_cache(cache: Cache, cfg: ModelConfig) -> None:
    """ValueError when `cache` is not one `init_cache(cfg, ...)` makes (a cache of another config: its
    window, compressed stores or layers would be read with the wrong shapes, giving wrong logits)."""
    if not isinstance(cache, Cache):
        raise ValueError(f"cache must be a dsv4.cache.Cache (init_cache), got {type(cache).__name__}")
    if len(cache.layers) != cfg.num_hidden_layers:
        raise ValueError(f"the cache has {len(cache.layers)} layers, the model {cfg.num_hidden_layers}: "
                         "it was made for another config")  # fmt: skip
    batch = int(cache.lengths.shape[0])
    got_leaves, got_tree = jax.tree_util.tree_flatten_with_path(cache)
    got = [(tuple(x.shape), np.dtype(x.dtype)) for _, x in got_leaves]
    layouts = _layouts(cfg, batch, cache.max_len)
    if any(layout == (got_tree, got) for layout in layouts.values()):
        return
    same_tree = [layout for layout in layouts.values() if layout[0] == got_tree]
    if not same_tree:
        raise ValueError("the cache's layers are not those of this model's config (another layer kind or cache "
                         "format): it was made for another config")  # fmt: skip
    want = min(same_tree, key=lambda layout: sum(w != g for w, g in zip(layout[1], got, strict=True)))[1]
    path, (shape, dtype), (w_shape, w_dtype) = next(
        (p, g, w) for (p, _), g, w in zip(got_leaves, got, want, strict=True) if g != w
    )
    raise ValueError(
        f"cache{jax.tree_util.keystr(path)} is {dtype}{list(shape)} where this model's config needs "
        f"{w_dtype}{list(w_shape)}: the cache was made for another config (init_cache(model.cfg, ...))"
    )


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, fmt: str = "bfloat16") -> int:
    """Bytes of the cache for (batch, max_len), from the field shapes (jax.eval_shape; nothing allocated)."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, batch, max_len, fmt))
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))
