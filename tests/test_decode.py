"""Incremental decoding: any split into prefill chunks and decode steps equals the whole-sequence forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4.cache import cache_bytes, check_cache, init_cache
from dsv4.config import ModelConfig, RuntimeConfig
from dsv4.decode import decode_step, prefill
from dsv4.model import forward, init_model

SEQ = 300  # two HCA windows (128), nine sliding windows (32), 75 CSA windows (4)
CHUNK = 64  # every prefill call is padded to this width, so one compilation serves all splits
TOL = 1e-5


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig.tiny()
    model = init_model(cfg, RuntimeConfig(dtype="float32", query_block=32), seed=0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, SEQ))
    return cfg, model, tokens, np.asarray(forward(model, tokens))


def run_splits(model, cfg, tokens, splits, fmt="float32"):
    """Prefill the pieces between split points (each padded to CHUNK wide), return all logits."""
    cache = init_cache(cfg, tokens.shape[0], SEQ, fmt)
    out, bounds = [], [0, *sorted(set(splits)), tokens.shape[1]]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        for lo in range(a, b, CHUNK):
            hi = min(b, lo + CHUNK)
            piece = np.zeros((tokens.shape[0], CHUNK), np.int64)
            piece[:, : hi - lo] = tokens[:, lo:hi]
            logits, cache = prefill(model, piece, cache, lengths=np.full(tokens.shape[0], hi - lo))
            out.append(np.asarray(logits)[:, : hi - lo])
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize(
    "splits",
    [
        [2, 5, 6, 127, 129, 255, 257],  # inside CSA windows, both sides of the HCA window edge (128, 256)
        [31, 32, 33, 96, 130],  # around sliding-window edges (32) with a CSA overlap carried across
        [1, 2, 3, 4],  # the first CSA window built token by token
    ],
)
def test_chunked_prefill_equals_whole_sequence(setup, splits):
    cfg, model, tokens, expected = setup
    assert rel_err(run_splits(model, cfg, tokens, splits), expected) <= TOL


@settings(max_examples=8, deadline=None)
@given(st.lists(st.integers(1, SEQ - 1), min_size=1, max_size=6))
def test_random_splits_equal_whole_sequence(setup, splits):
    cfg, model, tokens, expected = setup
    assert rel_err(run_splits(model, cfg, tokens, splits), expected) <= TOL


def test_decode_steps_after_prefill_equal_whole_sequence(setup):
    cfg, model, tokens, expected = setup
    cache = init_cache(cfg, 2, SEQ, "float32")
    logits, cache = prefill(model, tokens[:, :250], cache)
    steps = [np.asarray(logits)]
    for i in range(250, SEQ):  # crosses the HCA window edge at 256 and several CSA windows
        step, cache = decode_step(model, tokens[:, i], cache)
        steps.append(np.asarray(step)[:, None])
    assert rel_err(np.concatenate(steps, axis=1), expected) <= TOL
    np.testing.assert_array_equal(np.asarray(cache.lengths), [SEQ, SEQ])


def test_entry_points_take_the_model_as_a_pytree(setup, monkeypatch):
    """forward, probe, prefill and decode_step pass the model to jit as a pytree: once compiled, a
    call walks no module graph (`nnx.split` took 12 ms per call at 4 layers, 120 ms at 43, more
    than a decode step), and weights set in place are read on the next call."""
    from flax import nnx

    import dsv4

    cfg, _, tokens, _ = setup
    model = init_model(cfg, RuntimeConfig(dtype="float32", query_block=32), seed=1)
    cache = init_cache(cfg, 2, SEQ, "float32")
    before = np.asarray(forward(model, tokens[:, :40]))
    dsv4.probe(model, tokens[:, :40])
    _, warm = prefill(model, tokens[:, :8], init_cache(cfg, 2, SEQ, "float32"))
    decode_step(model, tokens[:, 8], warm)
    walks = []
    monkeypatch.setattr(nnx, "split", lambda *a, **k: walks.append(1) or pytest.fail("nnx.split per call"))
    _, cache = prefill(model, tokens[:, :8], cache)
    decode_step(model, tokens[:, 8], cache)
    dsv4.probe(model, tokens[:, :40])
    model.head.weight[...] = model.head.weight[...] * 2.0
    after = np.asarray(forward(model, tokens[:, :40]))
    assert not walks
    np.testing.assert_allclose(after, 2.0 * before, rtol=1e-5, atol=1e-5)


def test_rows_of_different_lengths(setup):
    """Right-padded rows advance independently: each row equals its own whole-sequence forward."""
    cfg, model, tokens, expected = setup
    cache = init_cache(cfg, 2, SEQ, "float32")
    padded = tokens[:, :200].copy()
    padded[1, 140:] = 0  # row 1 has 140 real tokens
    logits, cache = prefill(model, padded, cache, lengths=np.array([200, 140]))
    assert rel_err(np.asarray(logits)[1, :140], expected[1, :140]) <= TOL
    rows = [[], []]
    for i in range(60):
        step, cache = decode_step(model, np.array([tokens[0, 200 + i], tokens[1, 140 + i]]), cache)
        rows[0].append(np.asarray(step)[0])
        rows[1].append(np.asarray(step)[1])
    assert rel_err(np.stack(rows[0]), expected[0, 200:260]) <= TOL
    assert rel_err(np.stack(rows[1]), expected[1, 140:200]) <= TOL


def test_storage_formats_error_is_bounded(setup):
    """bfloat16 and compact storage round the cached KV; the error is measured and bounded here.

    Measured on this config: bfloat16 1.6e-4, compact 1.9e-3 against float32. The compact cache
    split into chunks equals a single-chunk compact prefill (same FP8/FP4 rounding of the entries;
    only the window ring's bfloat16 rounding differs) to 1.8e-5.
    """
    cfg, model, tokens, expected = setup
    splits = [7, 130, 131, 260]
    bf16 = run_splits(model, cfg, tokens, splits, "bfloat16")
    compact = run_splits(model, cfg, tokens, splits, "compact")
    one_chunk, _ = prefill(model, tokens, init_cache(cfg, 2, SEQ, "compact"))
    assert rel_err(bf16, expected) < 1e-3
    assert rel_err(compact, expected) < 1e-2
    assert rel_err(compact, one_chunk) < 1e-4
    assert rel_err(compact, expected) > rel_err(bf16, expected)  # the rounding is really applied


def _per_token_bytes(cfg, fmt):
    """Cache bytes per token of context from the entry layout (independent of dsv4.cache)."""
    k, j, r = cfg.head_dim, cfg.index_head_dim, cfg.qk_rope_head_dim
    if fmt == "bfloat16":
        entry, key = 2 * k, 2 * j
    else:  # FP8 nope + one E8M0 per 64 + BF16 rope; FP4 keys + one E8M0 per 32
        entry, key = (k - r) + -(-(k - r) // 64) + 2 * r, j // 2 + -(-j // 32)
    total = 0.0
    for ratio in cfg.compress_ratios[: cfg.num_hidden_layers]:
        total += {0: 0, 4: (entry + key) / 4, 128: entry / 128}[ratio]
    return total


@pytest.mark.parametrize("preset", ["flash", "pro"])
@pytest.mark.parametrize("fmt", ["bfloat16", "compact"])
def test_cache_bytes_follow_the_entry_layout(preset, fmt):
    cfg = getattr(ModelConfig, preset)()
    n, step = 2**20, 2**14
    slope = (cache_bytes(cfg, 1, n, fmt) - cache_bytes(cfg, 1, n - step, fmt)) / step
    assert slope == pytest.approx(_per_token_bytes(cfg, fmt))
    # architecture.md s10 quotes 6,880 / 9,848 B (bfloat16) and about 3,510 / 5,030 B (compact, with a pad byte)
    assert (
        abs(
            slope
            - {"flash": {"bfloat16": 6880, "compact": 3510}, "pro": {"bfloat16": 9848, "compact": 5030}}[preset][fmt]
        )
        < 10
    )


def test_bad_inputs_raise_clear_errors(setup):
    cfg, model, tokens, _ = setup
    cache = init_cache(cfg, 2, 16, "float32")
    with pytest.raises(ValueError, match="max_len 16"):
        prefill(model, tokens[:, :17], cache)
    with pytest.raises(ValueError, match="non-empty"):
        prefill(model, np.zeros((2, 0), np.int32), cache)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        prefill(model, np.full((2, 3), cfg.vocab_size), cache)
    with pytest.raises(ValueError, match="batch 1"):
        decode_step(model, jnp.asarray([1]), cache)
    # float and boolean ids were cast to int32 silently (1.7 read as 1)
    with pytest.raises(ValueError, match="tokens must be integer token ids, got dtype float64"):
        prefill(model, np.full((2, 3), 1.7), cache)
    with pytest.raises(ValueError, match="tokens must be integer token ids, got dtype bool"):
        prefill(model, np.ones((2, 3), bool), cache)
    with pytest.raises(ValueError, match="tokens must be integer token ids, got dtype float32"):
        decode_step(model, jnp.asarray([2.9, 1.0]), cache)
    with pytest.raises(ValueError, match="lengths must be integers, got dtype float64"):
        prefill(model, tokens[:, :3], cache, lengths=np.array([2.5, 3.0]))
    with pytest.raises(ValueError, match=r"lengths must have one entry per row \(\[2\]\), got shape \[\]"):
        prefill(model, tokens[:, :3], cache, lengths=np.int32(3))  # was an IndexError
    limit = cfg.max_position_embeddings  # the cache checks only its own length in prefill and decode_step
    with pytest.raises(ValueError, match=f"cache max_len {limit + 1} exceeds the model's max_position_embeddings"):
        init_cache(cfg, 1, limit + 1, "float32")
    for batch, max_len in ((2, 10.5), (2.0, 16), (2, "16"), (True, 16), (0, 16)):  # were TypeErrors, or batch 1
        with pytest.raises(ValueError, match=rf"integers batch >= 1 and max_len >= 1, got batch={batch!r}, max_len"):
            init_cache(cfg, batch, max_len, "float32")
    assert init_cache(cfg, np.int64(2), 16, "float32").lengths.shape == (2,)


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (dict(sliding_window=16), r"cache.layers\[0\].window is float32\[2, 16, 64\] where this model's config needs "
                                  r"float32\[2, 32, 64\]"),
        (dict(num_hidden_layers=3, compress_ratios=(0, 4, 128, 0)), "the cache has 3 layers, the model 5"),
        (dict(compress_ratios=(0, 0, 128, 4, 4, 0)), "another layer kind"),
    ],
)  # fmt: skip
def test_a_cache_of_another_config_is_refused(setup, other, message):
    """A cache made for another config was used as it was: a sliding window of 16 read by a model of
    32 gave logits off by 4% (its keys read 15 positions off); extra layers were ignored."""
    cfg, model, tokens, _ = setup
    cache = init_cache(ModelConfig.tiny(**other), 2, SEQ, "float32")
    with pytest.raises(ValueError, match=message):
        prefill(model, tokens[:, :8], cache)
    with pytest.raises(ValueError, match=message):
        decode_step(model, tokens[:, 0], cache)
    for fmt in ("bfloat16", "compact"):  # every format of its own config passes
        check_cache(init_cache(cfg, 2, SEQ, fmt), cfg)


@pytest.mark.parametrize("fmt", ["bfloat16", "compact"])
def test_narrow_cache_decode_steps_equal_its_prefill(setup, fmt):
    """Decode steps over a bfloat16 / compact cache (the indexer scores its stored keys without a
    float32 copy) equal one prefill over the same storage format, up to the window ring's rounding
    (the prefill attends to its own keys unrounded): measured 1.3e-5 for both formats."""
    cfg, model, tokens, _ = setup
    one_chunk, _ = prefill(model, tokens, init_cache(cfg, 2, SEQ, fmt))
    logits, cache = prefill(model, tokens[:, :270], init_cache(cfg, 2, SEQ, fmt))
    steps = [np.asarray(logits)]
    for i in range(270, SEQ):
        step, cache = decode_step(model, tokens[:, i], cache)
        steps.append(np.asarray(step)[:, None])
    assert rel_err(np.concatenate(steps, axis=1), one_chunk) < 5e-5


def test_index_dots_of_bfloat16_keys_match_float32():
    """The decode form of the indexer product (q split into bfloat16 parts) and its gradients."""
    from dsv4.attention import index_dots, split_bfloat16

    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 1, 4, 32)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(2, 50, 32)), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(split_bfloat16(q).astype(jnp.float32).sum(0)), np.asarray(q))
    want = jnp.einsum("bqij,btj->bqit", q, keys.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(index_dots(q, keys)), np.asarray(want), rtol=1e-6, atol=1e-5)
    loss = lambda q, k: jnp.sum(jnp.sin(index_dots(q, k)))  # noqa: E731
    ref = lambda q, k: jnp.sum(jnp.sin(jnp.einsum("bqij,btj->bqit", q, k.astype(jnp.float32))))  # noqa: E731
    for got, exp in zip(jax.grad(loss, (0, 1))(q, keys), jax.grad(ref, (0, 1))(q, keys), strict=True):
        # measured: dq 7e-6 abs (float32 tangents), dkeys equal (bfloat16)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(exp, np.float32), rtol=1e-4, atol=5e-5)


def test_decode_step_writes_narrow_stores_in_place():
    """A bfloat16 cache's entry stores are scattered as they are, never widened to float32 in a decode
    step (they were: XLA's CPU backend widens a bfloat16 scatter to float32, a conversion of the
    whole [B, T, d] store there and back on every step)."""
    import re

    from dsv4.decode import decode_fn

    cfg = ModelConfig.tiny()
    model = init_model(cfg, RuntimeConfig(dtype="float32"), seed=0)
    cache = init_cache(cfg, 3, 1000, "bfloat16")
    hlo = decode_fn.lower(model, jnp.zeros((3,), jnp.int32), cache).compile().as_text()
    widened = re.findall(r"= f32\[3,250,\d+\]\{[\d,]*\} scatter\(", hlo)  # 250 = CSA rows
    assert not widened, widened
    assert len(re.findall(r"= u16\[3,250,\d+\]\{[\d,]*\} scatter\(", hlo)) == 4  # 2 CSA layers x 2 stores
    assert cache.layers[cfg.compress_ratios.index(4)].compressor.entries.read().dtype == jnp.bfloat16


def test_scatter_rows_drops_rows_outside_the_store_negative_ones_too():
    """A row index < 0 or >= T is dropped, never counted from the end as JAX's scatter would."""
    from dsv4.cache import _scatter_rows

    values = jnp.zeros((2, 4), jnp.float32)
    rows = jnp.asarray([[-1, 1], [4, 3]], jnp.int32)
    new = jnp.asarray([[7.0, 8.0], [9.0, 6.0]], jnp.float32)
    np.testing.assert_array_equal(_scatter_rows(values, rows, new), [[0, 8, 0, 0], [0, 0, 0, 6]])
