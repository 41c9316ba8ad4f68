"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), as pure jnp functions.

    logits [B, V] --(/ temperature)--> top-k --> top-p --> categorical --> ids [B]

Order and semantics follow the usual convention (`transformers`' logits warpers): the temperature
divides the float32 logits first; top-k keeps the k highest-ranked tokens (exactly k, ties broken
by token id); top-p then keeps the smallest prefix of the remaining tokens, in descending
probability, whose probability mass reaches p (the first token always survives). Temperature 0 is
greedy (argmax, first index on ties); top_k 0 and top_p 1.0 switch their filter off.

Each of `temperature`, `top_k`, `top_p` is either a Python number (static: a disabled filter costs
nothing, and a static top_k uses `lax.top_k` instead of a full sort of the vocabulary) or a traced
array, scalar or one value per row [B] (one compiled program serves every value).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static sampling settings (hashable, usable as a `jax.jit` static argument)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        check_sampling_args(self.temperature, self.top_k, self.top_p)
        for name in ("temperature", "top_k", "top_p"):
            if not _is_static(getattr(self, name)):
                raise ValueError(
                    f"SamplingParams.{name} must be a Python number, got {getattr(self, name)!r} "
                    "(per-row arrays: call dsv4.sampling.sample)"
                )


_INT32_MAX = 2**31 - 1  # top_k travels as an int32 (any k >= the vocabulary keeps every token)


def check_sampling_args(temperature, top_k, top_p) -> None:
    """ValueError for a setting that is neither a number nor an array (a string, None, a bool), or
    a Python number outside its domain; arrays (traced or not) pass."""
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        if not (_is_static(value) or isinstance(value, jax.Array | np.ndarray)):  # a bool is neither
            raise ValueError(f"{name} must be a number or an array, got {value!r}")
    if _is_static(temperature) and not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature!r}")
    if _is_static(top_k) and (not isinstance(top_k, numbers.Integral) or not 0 <= top_k <= _INT32_MAX):
        raise ValueError(f"top_k must be an integer in [0, {_INT32_MAX}] (0 = off), got {top_k!r}")
    if _is_static(top_p) and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")


def _is_static(x) -> bool:
    """A Python (or numpy scalar) number, not a bool: a compile-time setting."""
    return isinstance(x, numbers.Number) and not isinstance(x, bool | np.bool_)


def _per_row(x, dtype) -> jax.Array:
    """A scalar or [B] setting as a [B or 1, 1] array that broadcasts against [B, V]."""
    return jnp.reshape(jnp.asarray(x, dtype), (-1, 1))


def _candidates(logits: jax.Array, top_k) -> tuple[jax.Array, jax.Array]:
    """Tokens in descending order: (values [B, C], token ids [B, C]).

    A static top_k > 0 keeps only the first k (C = k, via lax.top_k); otherwise C = V (full sort).
    """
    v = logits.shape[-1]
    if _is_static(top_k) and 0 < top_k < v:
        values, ids = jax.lax.top_k(logits, int(top_k))
        return values, ids.astype(jnp.int32)
    ids = jnp.argsort(-logits, axis=-1, stable=True).astype(jnp.int32)
    return jnp.take_along_axis(logits, ids, axis=-1), ids


def _top_k_mask(sorted_logits: jax.Array, top_k) -> jax.Array:
    """[B, C] True for ranks < k (all True when k is 0 or already applied by `_candidates`)."""
    rank = jnp.arange(sorted_logits.shape[-1])
    if _is_static(top_k):
        return jnp.ones(sorted_logits.shape, bool) if top_k == 0 else rank < top_k
    k = _per_row(top_k, jnp.int32)
    return (k <= 0) | (rank < k)


def _top_p_mask(sorted_logits: jax.Array, top_p) -> jax.Array:
    """[B, C] True for the smallest descending prefix whose probability mass reaches p."""
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    p = _per_row(top_p, F32)
    first = jnp.arange(sorted_logits.shape[-1]) == 0
    return (mass_before < p) | first | (p >= 1.0)


def filter_sorted(sorted_logits: jax.Array, top_k, top_p) -> jax.Array:
    """Apply top-k then top-p to descending logits [B, C]; removed tokens become -inf."""
    keep = _top_k_mask(sorted_logits, top_k)
    filtered = jnp.where(keep, sorted_logits, -jnp.inf)
    if not (_is_static(top_p) and top_p >= 1.0):
        filtered = jnp.where(_top_p_mask(filtered, top_p), filtered, -jnp.inf)
    return filtered


def _sample_tempered(logits: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Sample from softmax(filtered(logits / temperature)); temperature > 0 here. The row's maximum
    is subtracted first, so that a tiny temperature sends the others to -inf (toward greedy) and
    never the maximum to +inf, where the draw would take the first of several infinities; the
    maximum stays 0 even for a temperature that flushes to zero (subnormal)."""
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    scaled = jnp.where(shifted == 0, 0.0, shifted / _per_row(temperature, F32))
    no_filter = _is_static(top_k) and top_k == 0 and _is_static(top_p) and top_p >= 1.0
    if no_filter:
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    values, ids = _candidates(scaled, top_k)
    choice = jax.random.categorical(key, filter_sorted(values, top_k, top_p), axis=-1)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]


def sample(logits: jax.Array, key: jax.Array, temperature=0.0, top_k=0, top_p=1.0) -> jax.Array:
    """Pick the next token of every row.

    Args:
      logits: [B, V] (any float dtype; filtered in float32).
      key: a PRNG key (unused when `temperature` is a static 0).
      temperature: >= 0; 0 = greedy. Python number or array (scalar or [B]).
      top_k: >= 0; 0 = off. Python int or int array (scalar or [B]).
      top_p: in (0, 1]; 1.0 = off. Python number or array (scalar or [B]).
    Returns:
      int32 [B] token ids.
    """
    check_sampling_args(temperature, top_k, top_p)
    logits = logits.astype(F32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if _is_static(temperature):
        if temperature == 0:
            return greedy
        return _sample_tempered(logits, key, temperature, top_k, top_p)
    t = _per_row(temperature, F32)
    sampled = _sample_tempered(logits, key, jnp.where(t > 0, t, 1.0), top_k, top_p)
    return jnp.where(t[:, 0] > 0, sampled, greedy)


def sample_with(params: SamplingParams, logits: jax.Array, key: jax.Array) -> jax.Array:
    """`sample` with static settings from a SamplingParams."""
    return sample(logits, key, params.temperature, params.top_k, params.top_p)
