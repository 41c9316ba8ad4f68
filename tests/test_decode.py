"""Incremental decoding: any split into prefill chunks and decode steps equals the whole-sequence forward."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4.cache import cache_bytes, init_cache
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
