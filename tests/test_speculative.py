"""Greedy speculative decoding with the MTP block as the drafter (dsv4/speculative.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv4
from dsv4 import cli
from dsv4.cache import Cache, layer_cache
from dsv4.config import ModelConfig
from dsv4.speculative import generate_speculative
from dsv4.tokenizer import Tokenizer

TEXTS = [
    "Hello",
    "The Python interpreter",
    # long enough that generation crosses the first HCA window (128 positions): entries are emitted
    # by verify chunks, and some by guesses that are then rejected
    "A list is a sequence of values. " * 14,
]


@pytest.fixture(scope="module")
def trained():
    """The embedded default (every layer kind, hash and top-k routers, a trained MTP block) and prompts."""
    path = cli.default_checkpoint_dir()
    tokenizer = Tokenizer(path)
    prompts = [tokenizer.encode(t) for t in TEXTS]
    assert 100 < len(prompts[2]) < 128
    return dsv4.load_hf(path, dtype="float32"), prompts


@pytest.mark.parametrize("cache_format", ["float32", "bfloat16", "compact"])
def test_tokens_equal_greedy_generate_and_most_guesses_are_kept(trained, cache_format):
    model, prompts = trained
    want = dsv4.generate(model, prompts, 40, cache_format=cache_format, stop_tokens=())
    got = generate_speculative(model, prompts, 40, cache_format=cache_format, stop_tokens=())
    assert got.tokens == want
    # measured 0.72 on this model: the trained block guesses most tokens, so fewer steps than tokens
    assert got.acceptance > 0.4
    assert got.steps < 39
    # each step makes one token per running row, two when its guess is kept; rows may overshoot by one
    made = len(prompts) + got.guessed + got.accepted
    assert 0 <= made - sum(len(t) for t in got.tokens) <= len(prompts)


def test_a_drafter_that_guesses_wrong_still_gives_the_greedy_tokens(trained):
    """With the MTP block's projections zeroed almost every guess is rejected: each rejected guess's
    cache writes must then be invisible, or the tokens would drift from greedy's."""
    model, prompts = trained
    broken = nnx.clone(model)
    for proj in (broken.mtp[0].e_proj, broken.mtp[0].h_proj):
        proj.weight.set_value(jnp.zeros_like(proj.weight.get_value()))
    got = generate_speculative(broken, prompts, 40, cache_format="float32", stop_tokens=())
    assert got.acceptance < 0.2
    assert got.tokens == dsv4.generate(model, prompts, 40, cache_format="float32", stop_tokens=())


@pytest.mark.parametrize("max_new", [1, 2])
def test_one_or_two_new_tokens(trained, max_new):
    model, prompts = trained
    got = generate_speculative(model, prompts, max_new, cache_format="float32", stop_tokens=())
    assert got.tokens == dsv4.generate(model, prompts, max_new, cache_format="float32", stop_tokens=())
    assert got.steps == max_new - 1  # one new token comes from the prompt's last logits, without a step


def test_rows_stop_at_their_first_stop_token_like_generate(trained):
    model, prompts = trained
    free = dsv4.generate(model, prompts, 30, cache_format="float32", stop_tokens=())
    stop = free[1][12]  # a token row 1 makes: rows stop at different steps, or run to the end
    want = dsv4.generate(model, prompts, 30, cache_format="float32", stop_tokens=[stop])
    got = generate_speculative(model, prompts, 30, cache_format="float32", stop_tokens=[stop])
    assert got.tokens == want
    assert len(want[1]) <= 13 and want[1][-1] == stop


@pytest.mark.parametrize("mtp_ratio", [0, 4, 128])
def test_mtp_block_over_ragged_chunks_with_its_cache_equals_the_whole_sequence(mtp_ratio):
    """As the loop runs it: chunks of width 2, each row taking 0, 1 or 2 of its next positions; 140
    positions cross the first 128-token window of a compressed MTP block."""
    cfg = ModelConfig.tiny(compress_ratios=(0, 0, 4, 128, 4, mtp_ratio))
    model = dsv4.init_model(cfg, dsv4.RuntimeConfig(dtype="float32"), seed=3)
    length, width, max_len = 140, 2, 256
    tokens = jax.random.randint(jax.random.key(0), (2, length + 1), 0, cfg.vocab_size)
    streams, nxt = model.streams(tokens)[:, :-1], tokens[:, 1:]
    embed = model.embed.weight.get_value()[nxt]
    block = model.mtp[0]
    whole = np.asarray(block(streams, embed, nxt))
    graphdef, state = nnx.split(block)
    extend = jax.jit(lambda state, *args: nnx.merge(graphdef, state).extend(*args))  # one compile: equal shapes
    cache = Cache(jnp.zeros((2,), jnp.int32), (layer_cache(cfg, mtp_ratio, 2, max_len, "float32"),), max_len)
    got, pos, rng = np.zeros_like(whole), np.zeros(2, np.int32), np.random.default_rng(mtp_ratio)
    while pos.min() < length:
        n = np.minimum(rng.integers(0, width + 1, 2), length - pos).astype(np.int32)
        at = jnp.asarray(np.minimum(pos[:, None] + np.arange(width), length - 1))  # [2, width]

        def take(x, at=at):
            return jnp.take_along_axis(x, at.reshape(at.shape + (1,) * (x.ndim - 2)), axis=1)

        hidden, layer = extend(state, take(streams), take(embed), take(nxt), cache.lengths, jnp.asarray(n),
                               cache.layers[0])  # fmt: skip
        cache = Cache(cache.lengths + n, (layer,), max_len)
        for b in range(2):
            got[b, pos[b] : pos[b] + n[b]] = np.asarray(hidden[b, : n[b]])
        pos += n
    np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-5)  # measured: at most 7e-7 apart


def test_no_new_tokens_and_bad_input():
    cfg = ModelConfig.tiny()
    model = dsv4.init_model(cfg)
    empty = generate_speculative(model, [[1, 2]], 0)
    assert empty.tokens == [[]] and empty.steps == 0
    with pytest.raises(ValueError, match="is empty"):
        generate_speculative(model, [[]], 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate_speculative(model, [[cfg.vocab_size]], 4)
    no_mtp = dsv4.init_model(ModelConfig.tiny(num_nextn_predict_layers=0, compress_ratios=(0, 0, 4, 128, 4)))
    with pytest.raises(ValueError, match="needs an MTP block"):
        generate_speculative(no_mtp, [[1, 2]], 4)
