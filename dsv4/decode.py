"""Incremental decoding over the KV cache: chunked prefill and single-token decode steps.

Both are one function, `extend`: append a right-padded chunk of tokens to every sequence of the
cache and return the logits of the chunk. Any split of a sequence into chunks and single steps
gives the logits of one whole-sequence forward (tests/test_decode.py).

On a mesh (`model.rt.mesh`) the jitted steps take the parameters' shardings from the parameters
(placed by `dsv4.load_hf` / `sharding.placement.shard_model`) and pin tokens, cache and logits to
the strategy's batch sharding (`with_sharding_constraint` on the way in and out): the donated cache
comes back in the layout it went in, so every step reuses its buffers and one compiled program
serves every step. Data-parallel strategies run the step per device under `jax.shard_map`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4.cache import Cache, check_cache
from dsv4.model import DeepseekV4, check_integer_ids, check_token_shape, check_vocabulary


def extend(model: DeepseekV4, tokens: jax.Array, lengths: jax.Array, cache: Cache, last_only: bool = False):
    """Append tokens [B, C] (row b: its first lengths[b] are real) -> (logits, cache).

    logits: float32 [B, C, V], or [B, V] at each row's last real token when `last_only` (a row with
    lengths 0 appends nothing, and its [V] logits are those of its padding at position 0: ignore them).
    """
    start = cache.lengths
    streams, layers = model.run(tokens, start, lengths, cache.layers)
    if last_only:
        last = jnp.clip(lengths - 1, 0, tokens.shape[1] - 1)
        streams = jnp.take_along_axis(streams, last[:, None, None, None], axis=1)
        return model.head_logits(streams)[:, 0], Cache(start + lengths, layers, cache.max_len)
    return model.head_logits(streams), Cache(start + lengths, layers, cache.max_len)


def on_mesh(graphdef, state, step, *rows):
    """step(model, *rows) -> batch-first outputs, placed by the model's mesh and strategy.

    `rows` and the outputs are batch-first arrays or pytrees (tokens, lengths, cache, logits).
    Without a mesh this is just the call. On a mesh the inputs and outputs are pinned to the
    strategy's batch sharding, and data-parallel strategies run the step per device
    (`sharding.placement.per_device`).
    """
    rt = nnx.merge(graphdef, state).rt

    def body(state, *rows):
        return step(nnx.merge(graphdef, state), *rows)

    if rt.mesh is None:
        return body(state, *rows)
    from sharding.placement import per_device, pin_rows

    rows = pin_rows(rows, rt.mesh, rt.strategy)
    return pin_rows(per_device(body, rt, state)(state, *rows), rt.mesh, rt.strategy)


# The steps take the model as a pytree argument (jit flattens it far faster than `nnx.split` walks
# the module graph: dsv4.model, above `_forward`); it is split once per trace, for `on_mesh`.


@functools.partial(jax.jit, static_argnums=4, donate_argnums=(3,))
def prefill_fn(model, tokens, lengths, cache, last_only=False):
    """Pure, jitted prefill: (model, tokens [B, C], lengths [B], cache) -> (logits, cache)."""

    def step(model, tokens, lengths, cache):
        return extend(model, tokens, lengths, cache, last_only)

    return on_mesh(*nnx.split(model), step, tokens, lengths, cache)


@functools.partial(jax.jit, donate_argnums=(2,))
def decode_fn(model, tokens, cache):
    """Pure, jitted decode step: (model, tokens [B], cache) -> (logits [B, V], cache)."""

    def step(model, tokens, cache):
        logits, cache = extend(model, tokens[:, None], jnp.ones(tokens.shape, jnp.int32), cache)
        return logits[:, 0], cache

    return on_mesh(*nnx.split(model), step, tokens, cache)


def check_tokens(tokens, lengths, cache: Cache, vocab_size: int) -> None:
    """Host-side validation before any device work: clear errors instead of silent garbage."""
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    check_token_shape(tokens)
    check_integer_ids(tokens)
    if not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be integers, got dtype {lengths.dtype}")
    if lengths.shape != tokens.shape[:1]:
        raise ValueError(f"lengths must have one entry per row ([{tokens.shape[0]}]), got shape {list(lengths.shape)}")
    if tokens.shape[0] != cache.lengths.shape[0]:
        raise ValueError(
            f"tokens have batch {tokens.shape[0]} but the cache was made for {cache.lengths.shape[0]}"
        )
    if np.any(lengths < 0) or np.any(lengths > tokens.shape[1]):
        raise ValueError(f"lengths {lengths.tolist()} must lie in [0, {tokens.shape[1]}]")
    check_vocabulary(tokens, vocab_size, real=np.arange(tokens.shape[1])[None] < lengths[:, None])
    total = _host_rows(cache.lengths) + lengths  # rows held by other processes read as 0 (they check them)
    if np.any(total > cache.max_len):
        row = int(np.argmax(total))
        raise ValueError(
            f"row {row} would reach {total[row]} tokens, past the cache's max_len {cache.max_len}"
        )


def _host_rows(x: jax.Array) -> np.ndarray:
    """A [B] device array on the host; on many hosts, the rows this process holds (others 0)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    out = np.zeros(x.shape, x.dtype)
    for shard in x.addressable_shards:
        out[shard.index] = np.asarray(shard.data)
    return out


def prefill(model: DeepseekV4, tokens, cache: Cache, lengths=None, last_only: bool = False):
    """Append a chunk to every sequence: tokens [B, C] int32 -> (logits [B, C, V], cache). Donates `cache`.

    `lengths` [B] gives each row's real tokens (right padding; default: all C). With `last_only` the
    logits are [B, V], each row's at its last real token (meaningless for a row of length 0, which
    appends nothing). Raises ValueError on an empty chunk, an out-of-vocabulary id or a chunk that
    would overflow the cache.
    """
    tokens = np.asarray(tokens)
    if lengths is None:
        lengths = np.full((tokens.shape[0],) if tokens.ndim else (1,), tokens.shape[-1] if tokens.ndim else 0)
    check_tokens(tokens, lengths, cache, model.cfg.vocab_size)
    cache = _placed_cache(model, cache)
    tokens, lengths = _device_batch(model, tokens), _device_batch(model, lengths)
    check_cache(cache, model.cfg)  # last: its shapes come from tracing init_cache (no compilation)
    return prefill_fn(model, tokens, lengths, cache, last_only)


def decode_step(model: DeepseekV4, tokens, cache: Cache):
    """One token per sequence: tokens [B] int32 -> (logits [B, V], cache). Donates `cache`."""
    tokens = np.asarray(tokens).reshape(-1)
    check_tokens(tokens[:, None], np.ones_like(tokens), cache, model.cfg.vocab_size)
    tokens = _device_batch(model, tokens)
    check_cache(cache, model.cfg)  # last: its shapes come from tracing init_cache (no compilation)
    return decode_fn(model, tokens, cache)


def _placed_cache(model: DeepseekV4, cache: Cache) -> Cache:
    """The cache in its strategy shardings (ValueError when the batch does not divide the mesh)."""
    if model.rt.mesh is None:
        return cache
    from sharding.placement import shard_cache

    return shard_cache(cache, model.rt.mesh, model.rt.strategy)


def _device_batch(model: DeepseekV4, x) -> jax.Array:
    """Host int32 [B, ...] -> a device array, split over the batch axes on a mesh (any number of hosts)."""
    x = np.asarray(x, np.int32)
    if model.rt.mesh is None:
        return jnp.asarray(x)
    from sharding.placement import batch_sharding, check_batch, put

    check_batch(int(x.shape[0]), model.rt.mesh, model.rt.strategy)  # a ValueError, not JAX's
    return put(x, batch_sharding(model.rt.mesh, model.rt.strategy, x.ndim))
