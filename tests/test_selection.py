"""dsv4.selection: exact top-k by bisection, against numpy and `lax.top_k`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4.selection import kth_largest_key, order_keys, running_count, top_k_ascending

top_k_ascending_jit = jax.jit(top_k_ascending, static_argnames="k")


def numpy_top_k_ascending(x: np.ndarray, k: int) -> np.ndarray:
    """The k largest per row, ties to the lower position (a stable sort), listed by position.
    Ordered as lax.top_k orders: by the float's bits, so -0.0 ranks below 0.0."""
    bits = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
    keys = np.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)
    order = np.argsort(-keys, axis=-1, kind="stable")[..., :k]
    return np.sort(order, axis=-1)


def _rows(seed: int, n: int) -> np.ndarray:
    """[2, 6, n] rows covering the cases the indexer meets and a few it should survive."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 6, n)).astype(np.float32)
    x[0, 1] = np.round(x[0, 1])  # integers: many ties, some at the k-th value
    x[0, 2, n // 3 :] = -np.inf  # fewer visible entries than k: -inf ties fill the rest
    x[0, 3] = 0.0  # all tied
    x[0, 4, ::2] = -0.0  # signed zeros: -0.0 ranks below 0.0, as in lax.top_k
    x[0, 5] = -np.abs(x[0, 5]) * 1e-30  # negative and tiny
    x[1, 0] = np.float32(3e38) * np.sign(x[1, 0])  # near the float32 extremes
    x[1, 1, 5:] = np.inf
    return x


@pytest.mark.parametrize("n,k", [(40, 1), (40, 7), (40, 40), (100, 33), (1152, 128), (97, 64)])
def test_top_k_ascending_is_lax_top_k_sorted_by_position(n, k):
    x = _rows(n * 7 + k, n)
    got = np.asarray(top_k_ascending_jit(jnp.asarray(x), k=k))
    assert got.dtype == np.int32 and got.shape == (2, 6, k)
    np.testing.assert_array_equal(got, numpy_top_k_ascending(x, k))
    np.testing.assert_array_equal(got, np.sort(np.asarray(jax.lax.top_k(jnp.asarray(x), k)[1]), axis=-1))


def test_tie_rows_reach_the_tie_rule():
    """Integer scores put ties at the k-th value, so the tie rule (lower position first) is what
    decides them: taking every tied entry, or the last ones, would give other positions."""
    x = np.round(np.random.default_rng(7).standard_normal(100) * 2).astype(np.float32) + np.float32(0.0)  # no -0.0
    k = 33
    kth = np.sort(x)[-k]
    assert (x > kth).sum() < k < (x >= kth).sum()
    got = np.asarray(top_k_ascending_jit(jnp.asarray(x), k=k))
    tied = np.flatnonzero(x == kth)
    taken_tied = np.intersect1d(got, tied)
    np.testing.assert_array_equal(taken_tied, tied[: k - (x > kth).sum()])  # the first tied positions


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_top_k_ascending_property(data):
    n = data.draw(st.integers(1, 70), label="n")
    k = data.draw(st.integers(1, n), label="k")
    values = data.draw(st.lists(st.integers(-3, 3), min_size=2 * n, max_size=2 * n), label="values")
    x = np.asarray(values, np.float32).reshape(2, n) * np.float32(0.5)
    np.testing.assert_array_equal(np.asarray(top_k_ascending(jnp.asarray(x), k)), numpy_top_k_ascending(x, k))


def test_order_keys_keep_the_float_order():
    x = np.asarray([-np.inf, -3e38, -1.5, -1e-30, -0.0, 0.0, 1e-45, 2.0, 3e38, np.inf], np.float32)
    keys = np.asarray(order_keys(jnp.asarray(x)))
    assert np.all(np.diff(keys.astype(np.int64)) > 0)


def test_kth_largest_key_across_the_int32_range():
    rng = np.random.default_rng(3)
    keys = rng.integers(-(2**31), 2**31, size=(5, 50), dtype=np.int64).astype(np.int32)
    keys[1, :3] = [np.iinfo(np.int32).min, np.iinfo(np.int32).max, 0]
    keys[2] = np.iinfo(np.int32).min  # all equal to the smallest key
    for k in (1, 17, 50):
        got = np.asarray(kth_largest_key(jnp.asarray(keys), k))[:, 0]
        np.testing.assert_array_equal(got, np.sort(keys, axis=-1)[:, -k])


@pytest.mark.parametrize("n", [1, 31, 32, 33, 1000])
def test_running_count_is_cumsum(n):
    flags = np.random.default_rng(n).random((3, 2, n)) < 0.4
    np.testing.assert_array_equal(np.asarray(running_count(jnp.asarray(flags))), np.cumsum(flags, axis=-1))


def test_k_outside_the_row_is_an_error():
    with pytest.raises(ValueError, match=r"top_k_ascending: k = 5 must be in \[1, 4\]"):
        top_k_ascending(jnp.zeros((2, 4)), 5)
    with pytest.raises(ValueError, match=r"k = 0"):
        top_k_ascending(jnp.zeros((2, 4)), 0)
