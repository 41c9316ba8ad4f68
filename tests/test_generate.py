"""dsv4.generate: greedy tokens equal transformers' generate; sampling, streaming, stops, bad input.

Compilation dominates the run time on CPU (each (batch, prompt length, max_len, sampling
settings) compiles a prefill and a decode program), so the tests share shapes where they can.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dsv4
from dsv4.config import ModelConfig, RuntimeConfig

# the module (dsv4.generate may be re-exported as the function of the same name)
gen = importlib.import_module("dsv4.generate")


def _prompts(vocab, lengths, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, n).tolist() for n in lengths]  # ids 0/1 (bos/eos) avoided


def _hf_greedy(hf_model, prompt, max_new):
    """transformers' greedy generate with its KV cache, one unpadded prompt at a time."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False)
    return out[0, len(prompt) :].tolist()


# Flash-like: row 0 starts inside the first sliding window (32) and decodes across it; row 1 is
# longer than one HCA window (128). Pro-like (HCA first layers): row 0 crosses the HCA window
# edge 128 while decoding, row 1 starts just past the sliding window.
CASES = {"flash_ckpt": ((20, 140), 30), "pro_ckpt": ((100, 33), 40)}


@pytest.mark.parametrize("fixture", sorted(CASES))
def test_greedy_equals_transformers_generate(request, fixture):
    path, hf_model, cfg = request.getfixturevalue(fixture)
    lengths, max_new = CASES[fixture]
    prompts = _prompts(cfg["vocab_size"], lengths, seed=len(fixture))
    model = dsv4.load_hf(path, dtype="float32")
    ours = gen.generate(model, prompts, max_new, temperature=0.0, cache_format="float32")
    for prompt, got in zip(prompts, ours, strict=True):
        expected = _hf_greedy(hf_model, prompt, max_new)
        assert got == expected  # both stop after eos (id 1) if it comes


# ------------------------------------------------------------------ a small random model, shared shapes

SMALL = ModelConfig.tiny(num_hidden_layers=3, compress_ratios=(4, 128, 0, 0), num_hash_layers=1)
PROMPTS = _prompts(SMALL.vocab_size, (12, 5), seed=0)
NEW = 10


@pytest.fixture(scope="module")
def small():
    return dsv4.init_model(SMALL, RuntimeConfig(dtype="float32", query_block=16), seed=2)


def _is_greedy_continuation(model, prompt, new):
    """Teacher-forced check: the whole-sequence forward's argmax at each step is the next new token."""
    logits = np.asarray(dsv4.forward(model, np.array([prompt + new[:-1]])))[0]
    return logits[len(prompt) - 1 :].argmax(-1).tolist() == new


@pytest.fixture(scope="module")
def greedy(small):
    return gen.generate_with_stats(small, PROMPTS, NEW, stop_tokens=(), cache_format="float32")


def test_greedy_equals_whole_sequence_argmax(small, greedy):
    assert all(_is_greedy_continuation(small, p, t) for p, t in zip(PROMPTS, greedy.tokens, strict=True))
    assert greedy.decode_steps == NEW - 1 and greedy.prompt_tokens == 17
    assert greedy.prefill_seconds > 0 and greedy.decode_seconds > 0 and greedy.cache_bytes > 0


def test_chunked_prefill_gives_the_same_tokens(small, greedy):
    # chunks of 4: row 1 (5 tokens) ends in the second chunk, row 0 (12) in the third
    chunked = gen.generate(small, PROMPTS, NEW, stop_tokens=(), cache_format="float32", prefill_chunk=4)
    assert chunked == greedy.tokens


def test_top_k_one_sampling_equals_greedy(small, greedy):
    sampled = gen.generate(small, PROMPTS, NEW, temperature=1.0, top_k=1, seed=5, stop_tokens=(),
                           cache_format="float32")  # fmt: skip
    assert sampled == greedy.tokens


def _sampled(model, seed, **kw):
    return gen.generate(model, PROMPTS, NEW, temperature=1.0, seed=seed, stop_tokens=(),
                        cache_format="float32", **kw)  # fmt: skip


def test_seed_reproducible_and_streaming_matches(small, greedy):
    first = _sampled(small, 0)
    assert _sampled(small, 0) == first
    assert _sampled(small, 1) != first
    assert first != greedy.tokens
    chunks = []
    streamed = _sampled(small, 0, on_token=chunks.append, stream_interval=3)
    assert streamed == first  # chunking does not change the tokens
    assert len(chunks) == 1 + -(-(NEW - 1) // 3)  # token 0 after prefill, then one call per chunk
    joined = [sum((c[b] for c in chunks), []) for b in range(len(PROMPTS))]
    assert joined == first


def test_each_row_stops_at_its_first_stop_token(small, greedy):
    stop = greedy.tokens[0][3]
    out = gen.generate(small, PROMPTS, NEW, stop_tokens=[stop], cache_format="float32")
    for full, got in zip(greedy.tokens, out, strict=True):
        end = full.index(stop) + 1 if stop in full else len(full)
        assert got == full[:end]
    assert out[0][-1] == stop and len(out[0]) == 4


def test_stop_defaults_to_eos_and_streaming_stops_with_the_row(small, greedy):
    assert gen.stop_ids_of(SMALL, None) == (1,)
    assert gen.stop_ids_of(dsv4.ModelConfig.tiny(eos_token_id=(1, 7)), None) == (1, 7)
    stop = greedy.tokens[1][0]  # row 1 stops at once; row 0 goes on
    chunks = []
    out = gen.generate(small, PROMPTS, NEW, stop_tokens=stop, cache_format="float32", on_token=chunks.append)
    assert out[1] == [stop]
    assert all(c[1] == [] for c in chunks[1:])


def test_compact_cache_generates_and_is_smaller(small, greedy):
    res = gen.generate_with_stats(small, PROMPTS, NEW, stop_tokens=(), cache_format="compact")
    assert [len(t) for t in res.tokens] == [NEW, NEW]
    assert all(0 <= t < SMALL.vocab_size for row in res.tokens for t in row)
    assert res.cache_bytes == gen.kv_cache.cache_bytes(SMALL, 2, 128, "compact")
    assert res.cache_bytes < gen.kv_cache.cache_bytes(SMALL, 2, 128, "bfloat16")


def test_default_cache_length_is_rounded_up_to_128_within_the_position_limit():
    assert gen.cache_length(SMALL, [[3] * 12, [3] * 5], NEW, None) == 128
    assert gen.cache_length(SMALL, [[3] * 120], 9, None) == 256
    assert gen.cache_length(SMALL, [[3] * 12], NEW, 30) == 30  # an explicit length is kept
    short = dsv4.ModelConfig.tiny(max_position_embeddings=100, rope_scaling=None)
    assert gen.cache_length(short, [[3] * 12], NEW, None) == 100


def test_one_new_token_compiles_no_decode_program(small, greedy, monkeypatch):
    """The first token comes from the prefill: with max_new_tokens 1 no decode step runs, and the
    decode loop's program (more than half the compile time) is not built."""
    built, compiled = [], gen._Clock.compiled

    def spy(clock, fn, *args):
        built.append(fn.__name__)
        return compiled(clock, fn, *args)

    monkeypatch.setattr(gen._Clock, "compiled", spy)
    res = gen.generate_with_stats(small, PROMPTS, 1, stop_tokens=(), cache_format="float32")
    assert res.tokens == [t[:1] for t in greedy.tokens] and res.decode_steps == 0
    assert built == ["_prefill_program", "_first_token_program"]


def test_zero_new_tokens():
    model = dsv4.abstract_model(SMALL)  # never run: nothing to compute
    assert gen.generate(model, PROMPTS, 0) == [[], []]


# ----------------------------------------------------------------------------------- bad input


@pytest.fixture
def no_device_work(monkeypatch):
    """Fail the test if generate reaches the cache or the compiled programs."""

    def boom(*args, **kwargs):
        raise AssertionError("device work started before the input was checked")

    monkeypatch.setattr(gen.kv_cache, "init_cache", boom)
    monkeypatch.setattr(gen, "_prefill_program", boom)


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([[3, 4], []], {}, "prompt 1 is empty"),
        ([], {}, "non-empty list of token-id lists, got an empty one"),
        ("hello", {}, "non-empty list"),
        ({3: 4}, {}, "non-empty list of token-id lists, got dict"),
        (np.array([[3, 4.5]]), {}, "must be integers"),
        ([[3, 512]], {}, r"token id 512 is outside the vocabulary \[0, 512\)"),
        ([[3, -1]], {}, "token id -1"),
        ([[3, 4.0]], {}, "must be integers"),
        ([list(range(2, 40))], {"max_len": 32}, "prompt of 38 tokens is longer than the cache max length 32"),
        ([[3, 4]], {"max_len": 8, "max_new_tokens": 7}, "needs 9 cache positions"),
        ([[3, 4]], {"max_new_tokens": -1}, "max_new_tokens"),
        ([[3, 4]], {"temperature": -0.5}, "temperature"),
        ([[3, 4]], {"top_p": 0.0}, "top_p"),
        ([[3, 4]], {"stop_tokens": [600]}, "stop tokens"),
        ([[3, 4]], {"cache_format": "int8"}, "cache_format"),
        ([[3, 4]], {"prefill_chunk": 0}, "prefill_chunk"),
        ([[3, 4]], {"strategy": "tp_ep"}, "strategy='tp_ep' needs a mesh"),
        ([[3, 4]], {"seed": 2**32}, r"seed must be an integer in \[0, 2\*\*32\), got 4294967296"),
        ([[3, 4]], {"seed": -1}, "seed must be an integer"),
        ([[3, 4]], {"seed": 1.5}, "seed must be an integer"),
        ([[3, 4]], {"seed": None}, "seed must be an integer"),
        ([[3, 4]], {"temperature": None}, "temperature must be a number or an array, got None"),
        ([[3, 4]], {"temperature": np.array([0.5])}, "SamplingParams.temperature must be a Python number"),
        ([[3, 4]], {"stop_tokens": [1.5]}, r"stop_tokens must be integers, got \[1.5\]"),
        ([[3, 4]], {"stop_tokens": "eos"}, "stop_tokens must be an int or a list of ints"),
        ([[3, 4]], {"max_new_tokens": True}, "max_new_tokens must be an integer"),
        ([[3, 4]], {"max_len": 1.5}, "max_len must be a positive integer, got 1.5"),
        ([[3, 4]], {"max_len": "64"}, "max_len must be a positive integer"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_device_work(no_device_work, prompts, kwargs, match):
    model = dsv4.abstract_model(SMALL)
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        gen.generate(model, prompts, **kwargs)


def test_context_beyond_max_position_embeddings_is_refused(no_device_work):
    model = dsv4.abstract_model(dsv4.ModelConfig.tiny(max_position_embeddings=64, rope_scaling=None))
    with pytest.raises(ValueError, match="prompt of 60 tokens plus max_new_tokens 10 needs 70 positions, more "
                                         "than the model's max_position_embeddings 64"):  # fmt: skip
        gen.generate(model, [[3] * 60], 10)
    with pytest.raises(ValueError, match="a prompt of 70 tokens needs 70 positions"):
        gen.generate(model, [[3] * 70], 0)
    with pytest.raises(ValueError, match="cache max length 128 exceeds the model's max_position_embeddings 64"):
        gen.generate(model, [[3] * 6], 2, max_len=128)


def test_prompts_may_be_a_jax_array(no_device_work):
    """A [B, S] jax.Array of ids is read like the numpy array it holds (it was refused as 'not a list')."""
    model = dsv4.abstract_model(SMALL)
    assert gen.check_prompts(jnp.array([[3, 4, 5]]), SMALL.vocab_size) == [[3, 4, 5]]
    with pytest.raises(ValueError, match=r"prompt 0, position 1: token id 600 is outside"):
        gen.generate(model, jnp.array([[3, 600]]), 2)


def test_loop_state_is_a_pytree():
    leaves = jax.tree.leaves(gen.LoopState(np.int32(1), np.zeros((1, 2)), np.zeros(1, bool), None))
    assert len(leaves) == 3
