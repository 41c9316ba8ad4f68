"""Incremental decoding over the KV cache: chunked prefill and single-token decode steps.

Both are one function, `extend`: append a right-padded chunk of tokens to every sequence of the
cache and return the logits of the chunk. Any split of a sequence into chunks and single steps
gives the logits of one whole-sequence forward (tests/test_decode.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4.cache import Cache
from dsv4.model import DeepseekV4


def extend(model: DeepseekV4, tokens: jax.Array, lengths: jax.Array, cache: Cache, last_only: bool = False):
    """Append tokens [B, C] (row b: its first lengths[b] are real) -> (logits, cache).

    logits: float32 [B, C, V], or [B, V] at each row's last real token when `last_only`.
    """
    start = cache.lengths
    streams, layers = model.run(tokens, start, lengths, cache.layers)
    if last_only:
        last = jnp.clip(lengths - 1, 0, tokens.shape[1] - 1)
        streams = jnp.take_along_axis(streams, last[:, None, None, None], axis=1)
        return model.head_logits(streams)[:, 0], Cache(start + lengths, layers)
    return model.head_logits(streams), Cache(start + lengths, layers)


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=(4,))
def prefill_fn(graphdef, state, tokens, lengths, cache, last_only=False):
    """Pure, jitted prefill: (graphdef, state, tokens [B, C], lengths [B], cache) -> (logits, cache)."""
    return extend(nnx.merge(graphdef, state), tokens, lengths, cache, last_only)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(3,))
def decode_fn(graphdef, state, tokens, cache):
    """Pure, jitted decode step: (graphdef, state, tokens [B], cache) -> (logits [B, V], cache)."""
    ones = jnp.ones(tokens.shape, jnp.int32)
    logits, cache = extend(nnx.merge(graphdef, state), tokens[:, None], ones, cache)
    return logits[:, 0], cache


def prefill(model: DeepseekV4, tokens, cache: Cache, lengths=None, last_only: bool = False):
    """Append a chunk to every sequence: tokens [B, C] int32 -> (logits [B, C, V], cache). Donates `cache`."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if lengths is None:
        lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    graphdef, state = nnx.split(model)
    return prefill_fn(graphdef, state, tokens, jnp.asarray(lengths, jnp.int32), cache, last_only)


def decode_step(model: DeepseekV4, tokens, cache: Cache):
    """One token per sequence: tokens [B] int32 -> (logits [B, V], cache). Donates `cache`."""
    graphdef, state = nnx.split(model)
    return decode_fn(graphdef, state, jnp.asarray(tokens, jnp.int32).reshape(-1), cache)
