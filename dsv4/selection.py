"""Exact top-k without sorting: the k-th largest score by bisection, then the positions above it.

The lightning indexer picks, for every query, the `index_topk` best of up to T compressed entries.
XLA:CPU's TopK sorts each row's k winners (a `std::partial_sort`): at k = 128 that costs ~16 us per
row whatever the row's length, and a prefill of S tokens selects S rows per CSA layer. The
attention that consumes the selection does not need it sorted by score, so `top_k_ascending`
returns the same set in ascending position order, with batched array operations only:

1. scores become int32 keys with the same order (`order_keys`), and the k-th largest key of each
   row is found bit by bit from the top (`kth_largest_key`: 32 passes of compare-and-count);
2. every key above it is taken, and of the keys equal to it the first ones, as many as are still
   needed (so ties go to the lower position, as `lax.top_k`'s do);
3. the taken positions are listed in order by a running count (`running_count`, two small
   triangular products) and a binary search for the 1st, 2nd, ..., k-th taken position.

On [128, 1,152] rows (a query block at S = 4,096): 1.5 ms against 3.4 ms for `lax.top_k`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4.layers import F32

INT_MIN = jnp.iinfo(jnp.int32).min


def order_keys(x: jax.Array) -> jax.Array:
    """float32 -> int32 keys in the same order (-inf lowest, -0.0 below 0.0; no NaNs expected)."""
    bits = jax.lax.bitcast_convert_type(x.astype(F32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def kth_largest_key(keys: jax.Array, k: int) -> jax.Array:
    """The k-th largest of each row of int32 `keys` [..., n] (k <= n): [..., 1].

    It is the largest t with count(keys >= t) >= k, built one bit at a time from the sign bit down.
    """

    def next_bit(i, best):
        # bit 31 first: INT_MIN ^ INT_MIN = 0 asks "are at least k keys non-negative?"
        candidate = jnp.where(i == 0, best ^ INT_MIN, best + jnp.left_shift(jnp.int32(1), 31 - i))
        count = jnp.sum((keys >= candidate).astype(jnp.int32), axis=-1, keepdims=True)
        return jnp.where(count >= k, candidate, best)

    return jax.lax.fori_loop(0, 32, next_bit, jnp.full(keys.shape[:-1] + (1,), INT_MIN, jnp.int32))


def running_count(flags: jax.Array, group: int = 32) -> jax.Array:
    """Inclusive running count of boolean `flags` [..., n] along the last axis, int32.

    Counts within groups of `group` positions, then the totals of the groups before, as two
    products with triangular 0/1 matrices: exact in float32 (counts < 2**24), and on XLA:CPU
    about twice as fast as an associative scan.
    """
    *lead, n = flags.shape
    groups = -(-n // group)
    padded = jnp.pad(flags.astype(F32), [(0, 0)] * len(lead) + [(0, groups * group - n)])
    exact = jax.lax.Precision.HIGHEST
    within = jnp.matmul(
        padded.reshape(*lead, groups, group), jnp.triu(jnp.ones((group, group), F32)), precision=exact
    )  # [..., groups, group]
    before = jnp.matmul(within[..., -1], jnp.triu(jnp.ones((groups, groups), F32), 1), precision=exact)
    return (within + before[..., None]).reshape(*lead, groups * group)[..., :n].astype(jnp.int32)


def top_k_ascending(scores: jax.Array, k: int) -> jax.Array:
    """Positions [..., k] of the k largest `scores` [..., n] of each row (k <= n), in ascending order.

    The same set as `jax.lax.top_k(scores, k)[1]`, ties included (the lower position wins), listed
    by position instead of by score.
    """
    n = scores.shape[-1]
    if not 0 < k <= n:
        raise ValueError(f"top_k_ascending: k = {k} must be in [1, {n}] (the row length)")
    keys = order_keys(scores)
    kth = kth_largest_key(keys, k)
    above, tied = keys > kth, keys == kth
    still_needed = k - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
    counts = running_count(jnp.stack([above, tied]))  # [2, ..., n]
    taken = counts[0] + jnp.minimum(counts[1], still_needed)  # inclusive count of taken positions
    wanted = jnp.arange(1, k + 1, dtype=jnp.int32)  # the i-th taken position is the first with count >= i
    rows = taken.reshape(-1, n)
    found = jax.vmap(lambda row: jnp.searchsorted(row, wanted, side="left", method="scan"))(rows)
    return found.astype(jnp.int32).reshape(scores.shape[:-1] + (k,))
