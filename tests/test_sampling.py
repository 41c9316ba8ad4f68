"""Sampling: greedy, reproducibility, and that top-k / top-p never leave their allowed sets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4.sampling import SamplingParams, filter_sorted, sample

DRAWS = 64  # samples per property example (one vmapped call)


def _draws(logits, seed, **kw):
    """[DRAWS, B] samples from DRAWS independent keys."""
    keys = jax.random.split(jax.random.key(seed), DRAWS)
    return np.asarray(jax.vmap(lambda k: sample(jnp.asarray(logits), k, **kw))(keys))


def _allowed_top_k(logits: np.ndarray, k: int) -> list[set]:
    """Per row: tokens whose logit is at least the k-th largest (ties at the boundary included)."""
    kth = np.sort(logits, axis=-1)[:, ::-1][:, k - 1]
    return [set(np.flatnonzero(row >= t)) for row, t in zip(logits, kth, strict=True)]


def _allowed_top_p(logits: np.ndarray, p: float, temperature: float, slack: float = 1e-5) -> list[set]:
    """Per row: the nucleus in float64, widened by `slack` probability mass for float32 rounding."""
    out = []
    for row in logits.astype(np.float64) / temperature:
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        n = max(1, int(np.sum(before < min(p + slack, 1.0))))
        cutoff = probs[order][n - 1]
        out.append(set(np.flatnonzero(probs >= cutoff * (1 - 1e-6))))
    return out


logit_rows = st.lists(
    st.lists(st.floats(-8, 8, allow_nan=False, width=32), min_size=2, max_size=40), min_size=1, max_size=3
).map(lambda rows: [r[: min(len(x) for x in rows)] for r in rows])


@settings(max_examples=40, deadline=None)
@given(rows=logit_rows, k=st.integers(1, 40), temperature=st.floats(0.05, 4.0), seed=st.integers(0, 2**31))
def test_top_k_never_emits_outside_the_k_best(rows, k, temperature, seed):
    logits = np.asarray(rows, np.float32)
    k = min(k, logits.shape[1])
    allowed = _allowed_top_k(logits, k)
    draws = _draws(logits, seed, temperature=temperature, top_k=k)
    for b, ok in enumerate(allowed):
        assert set(draws[:, b]) <= ok


@settings(max_examples=40, deadline=None)
@given(rows=logit_rows, p=st.floats(0.01, 0.99), temperature=st.floats(0.05, 4.0), seed=st.integers(0, 2**31))
def test_top_p_never_emits_outside_the_nucleus(rows, p, temperature, seed):
    logits = np.asarray(rows, np.float32)
    allowed = _allowed_top_p(logits, p, temperature)
    draws = _draws(logits, seed, temperature=temperature, top_p=p)
    for b, ok in enumerate(allowed):
        assert set(draws[:, b]) <= ok


@settings(max_examples=30, deadline=None)
@given(rows=logit_rows, k=st.integers(1, 40), p=st.floats(0.01, 1.0), seed=st.integers(0, 2**31))
def test_traced_settings_respect_both_filters(rows, k, p, seed):
    """Traced (array) settings take the full-sort path; the result must still lie in both sets."""
    logits = np.asarray(rows, np.float32)
    k = min(k, logits.shape[1])
    allowed_k = _allowed_top_k(logits, k)
    draws = _draws(logits, seed, temperature=jnp.float32(1.0), top_k=jnp.int32(k), top_p=jnp.float32(p))
    for b in range(logits.shape[0]):
        assert set(draws[:, b]) <= allowed_k[b]
        # top-p is applied to the top-k survivors: its nucleus is within the top-k set's distribution
        masked = np.where(np.isin(np.arange(logits.shape[1]), list(allowed_k[b])), logits[b], -np.inf)
        assert set(draws[:, b]) <= _allowed_top_p(masked[None], p, 1.0)[0]


def test_filter_sorted_literal_example():
    # probs of [2, 1, 0, -1] (descending): 0.644, 0.237, 0.087, 0.032
    sorted_logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    keep = np.isfinite(np.asarray(filter_sorted(sorted_logits, 0, 0.8)))
    np.testing.assert_array_equal(keep, [[True, True, False, False]])  # 0.644 < 0.8 <= 0.881
    keep = np.isfinite(np.asarray(filter_sorted(sorted_logits, 0, 0.5)))
    np.testing.assert_array_equal(keep, [[True, False, False, False]])
    keep = np.isfinite(np.asarray(filter_sorted(sorted_logits, 3, 1.0)))
    np.testing.assert_array_equal(keep, [[True, True, True, False]])


def test_temperature_zero_is_argmax():
    logits = jax.random.normal(jax.random.key(0), (5, 300))
    expected = np.argmax(np.asarray(logits), axis=-1)
    for kw in ({}, {"top_k": 3, "top_p": 0.5}):
        np.testing.assert_array_equal(sample(logits, jax.random.key(1), 0.0, **kw), expected)
    traced = jax.jit(lambda lg, k, t: sample(lg, k, t, top_k=jnp.int32(4), top_p=jnp.float32(0.9)))
    np.testing.assert_array_equal(traced(logits, jax.random.key(2), jnp.float32(0.0)), expected)


def test_per_row_temperature_mixes_greedy_and_sampling():
    logits = jnp.tile(jnp.linspace(0.0, 0.1, 50)[None], (2, 1))  # nearly flat: sampling rarely hits argmax
    t = jnp.array([0.0, 1.0])
    draws = _draws(logits, 0, temperature=t)
    assert set(draws[:, 0]) == {49}
    assert len(set(draws[:, 1])) > 10


def test_fixed_seed_is_reproducible_and_seeds_differ():
    logits = jax.random.normal(jax.random.key(0), (4, 1000))
    kw = dict(temperature=1.0, top_k=50, top_p=0.9)
    a = [np.asarray(sample(logits, jax.random.key(7), **kw)) for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    others = [np.asarray(sample(logits, jax.random.key(s), **kw)) for s in range(8, 16)]
    assert any((o != a[0]).any() for o in others)


def test_static_and_traced_paths_agree():
    logits = jax.random.normal(jax.random.key(3), (3, 200))
    key = jax.random.key(5)
    static = sample(logits, key, 0.7, 0, 0.8)  # full sort in both: static top_k 0
    traced = jax.jit(sample)(logits, key, jnp.float32(0.7), jnp.int32(0), jnp.float32(0.8))
    np.testing.assert_array_equal(static, traced)


def test_unfiltered_frequencies_follow_softmax():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = np.asarray(jax.vmap(lambda k: sample(logits, k, 1.0))(keys))[:, 0]
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)  # ~4 sigma at n = 20000


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": 2**31}, "top_k"),  # an OverflowError inside jit
        ({"temperature": float("inf")}, "temperature must be finite"),  # sampled uniformly
        ({"temperature": float("nan")}, "temperature must be finite"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": "-1"}, "temperature must be a number or an array, got '-1'"),
        ({"top_k": "-5"}, "top_k must be a number or an array"),
        ({"top_p": None}, "top_p must be a number or an array, got None"),
        ({"temperature": True}, "temperature must be a number or an array, got True"),
        ({"top_k": True}, "top_k must be a number or an array"),
    ],
)
def test_bad_settings_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        sample(jnp.zeros((1, 4)), jax.random.key(0), **kw)
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_sampling_params_take_numbers_only():
    """SamplingParams is a static jit argument: per-row arrays belong to `sample`."""
    with pytest.raises(ValueError, match=r"SamplingParams.temperature must be a Python number.*sample"):
        SamplingParams(temperature=np.array([0.5]))
    assert SamplingParams(np.float32(0.5), np.int64(3), 0.9).top_k == 3  # numpy scalars are numbers


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 1e-38, 1e-45])
@pytest.mark.parametrize("filters", [{}, {"top_k": 2}, {"top_p": 0.9}])
def test_a_tiny_temperature_tends_to_greedy(temperature, filters):
    """logits / 1e-38 overflowed to +inf for every positive logit, and the draw took the first
    infinity (token 0 here) instead of the argmax."""
    logits = jnp.array([[1.0, 5.0, 9.0, -2.0], [-3.0, -1.0, -7.0, -2.0]])
    for seed in range(3):
        got = sample(logits, jax.random.key(seed), temperature, **filters)
        np.testing.assert_array_equal(got, [2, 1])
