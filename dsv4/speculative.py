"""Greedy speculative decoding with the MTP block as the drafter (architecture.md s8).

The MTP block `mtp.0` guesses token t + 2 from the main model's streams at t and token t + 1. Each
step of the loop feeds the main model two tokens, the next token x_p and the block's guess d for
x_{p+1}, and one forward gives its greedy predictions at p and p + 1:

    [x_p, d] --main--> (a_p, a_{p+1}) --> a_p == d ? keep x_{p+1} = d, x_{p+2} = a_{p+1}
                                                   : keep x_{p+1} = a_p
             --mtp (the kept positions)--> the next guess

A rejected guess needs no undo. The cache is addressed by position (`dsv4.cache`: ring slots,
compressor windows and entries) and its `lengths` say which positions are real, so the step sets
each row's length to the positions it kept. What the guess wrote at p + 1 is rewritten by the next
step, which starts at p + 1, before anything reads it: an entry it completed is visible only to
queries at p + 1 and later, and that step emits it again before its queries read it; and the ring
slots it took over held positions no later query reaches back to (p + 1 - W for the window, whose
queries read W - 1 positions back; p + 1 - P for the compressors' raw rings, read from the start
of the current window (HCA, P = m) or the previous one (CSA, P = 2m) on). The MTP block keeps a
one-layer cache of its own, extended only by the kept positions, so always as long as the main one.

The tokens are those of greedy `dsv4.generate` on the same cache format, up to float rounding,
which can resolve a near tie between two logits the other way: a two-token step adds the same
terms as two one-token steps in another order, and in the bfloat16 and compact formats its second
token reads the first one's window key unrounded, where a one-token step reads it back from the
cache (the logits of the embedded default move by ~3e-4 of ~8 there; 3e-6 with a float32 cache).
tests/test_speculative.py compares the tokens in all three formats.

Greedy only (sampling would need the rejection rule of speculative sampling), one device (no mesh).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4 import cache as kv_cache
from dsv4.generate import PAD_ID, _Clock, _is_stop, _padded, _rows_until_stop, _stop_array, check_request
from dsv4.model import DeepseekV4, check_model
from dsv4.xla_flags import jit_whole_sequence


@dataclasses.dataclass(frozen=True)
class SpeculativeResult:
    """New tokens per prompt, how many guesses the main model kept, and the seconds it took."""

    tokens: list[list[int]]
    steps: int  # loop steps (each one two-token forward of the main model and one of the MTP block)
    accepted: int  # guesses kept, all rows
    guessed: int  # guesses checked, all rows
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float

    @property
    def acceptance(self) -> float:
        """Fraction of the MTP block's guesses the main model kept."""
        return self.accepted / self.guessed if self.guessed else float("nan")

    @property
    def loop_tokens(self) -> int:
        """Tokens the loop produced: every row's, its first (from the prefill) excluded."""
        return sum(max(len(t) - 1, 0) for t in self.tokens)

    @property
    def decode_tokens_per_second(self) -> float:
        """`loop_tokens` per second of the loop."""
        return self.loop_tokens / self.decode_seconds if self.decode_seconds else float("nan")


@functools.partial(jax.tree_util.register_dataclass, meta_fields=[],
                   data_fields=["step", "count", "out", "done", "next_token", "guess", "accepted", "guessed",
                                "cache", "mtp_cache"])  # fmt: skip
@dataclasses.dataclass(frozen=True)
class SpecState:
    """Carry of the loop.

    count [B]: tokens in out[b] so far; out [B, max_new + 1] int32 (one spare column: a step may
    make two tokens). next_token [B]: out[b, count - 1], not yet in the cache; guess [B]: the MTP
    block's guess for the token after it. cache and mtp_cache both hold every row's prompt and
    out[b, :count - 1]. accepted / guessed [B]: guesses kept / checked.
    """

    step: jax.Array
    count: jax.Array
    out: jax.Array
    done: jax.Array
    next_token: jax.Array
    guess: jax.Array
    accepted: jax.Array
    guessed: jax.Array
    cache: kv_cache.Cache
    mtp_cache: kv_cache.Cache


def _mtp_guess(model: DeepseekV4, streams, next_ids, n, mtp_cache: kv_cache.Cache):
    """MTP over a chunk: main streams [B, C, N, D] at positions p.., next_ids [B, C] = tokens p+1..;
    row b's first n[b] are real -> (greedy guess [B] for the token after each row's last, mtp_cache)."""
    embed = model.embed.weight.get_value()[next_ids]
    hidden, layer = model.mtp[0].extend(streams, embed, next_ids, mtp_cache.lengths, n, mtp_cache.layers[0])
    last = jnp.clip(n - 1, 0, next_ids.shape[1] - 1)
    hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [B, 1, D]
    guess = jnp.argmax(model.logits(hidden)[:, 0], axis=-1).astype(jnp.int32)
    return guess, kv_cache.Cache(mtp_cache.lengths + n, (layer,), mtp_cache.max_len)


@jit_whole_sequence(static_argnums=(0, 1), donate_argnums=(5, 6))
def _prefill_program(graphdef, max_new, state, tokens, lengths, cache, mtp_cache, stop_ids) -> SpecState:
    """Prompts [B, P] (row b: lengths[b] real) -> first token, the MTP guess after it, both caches."""
    model = nnx.merge(graphdef, state)
    streams, layers = model.run(tokens, cache.lengths, lengths, cache.layers)
    last = jnp.clip(lengths - 1, 0, tokens.shape[1] - 1)
    last_streams = jnp.take_along_axis(streams, last[:, None, None, None], axis=1)
    first = jnp.argmax(model.head_logits(last_streams)[:, 0], axis=-1).astype(jnp.int32)  # [B]
    cache = kv_cache.Cache(cache.lengths + lengths, layers, cache.max_len)
    rows = jnp.arange(tokens.shape[0])
    next_ids = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1).at[rows, last].set(first)
    guess, mtp_cache = _mtp_guess(model, streams, next_ids, lengths, mtp_cache)
    out = jnp.full((tokens.shape[0], max_new + 1), PAD_ID, jnp.int32).at[:, 0].set(first)
    done = _is_stop(first, stop_ids) | (max_new <= 1)
    zeros = jnp.zeros_like(lengths)
    return SpecState(jnp.int32(0), jnp.ones_like(lengths), out, done, first, guess, zeros, zeros, cache, mtp_cache)


def _step(model: DeepseekV4, s: SpecState, max_new: int, stop_ids) -> SpecState:
    """One step: the main model checks [next_token, guess]; keep one or two tokens; guess again."""
    n = jnp.where(s.done, 0, 2)
    chunk = jnp.stack([s.next_token, s.guess], axis=1)  # [B, 2]
    streams, layers = model.run(chunk, s.cache.lengths, n, s.cache.layers)
    pred = jnp.argmax(model.head_logits(streams), axis=-1).astype(jnp.int32)  # [B, 2]
    hit = (pred[:, 0] == s.guess) & ~s.done
    kept = jnp.where(s.done, 0, 1 + hit.astype(jnp.int32))
    cache = kv_cache.Cache(s.cache.lengths + kept, layers, s.cache.max_len)  # a missed guess falls off
    guess, mtp_cache = _mtp_guess(model, streams, pred, kept, s.mtp_cache)
    rows = jnp.arange(pred.shape[0])
    out = s.out.at[rows, jnp.where(s.done, max_new + 1, s.count)].set(pred[:, 0], mode="drop")
    out = out.at[rows, jnp.where(hit, s.count + 1, max_new + 1)].set(pred[:, 1], mode="drop")
    count = s.count + kept
    stopped = _is_stop(pred[:, 0], stop_ids) | (hit & _is_stop(pred[:, 1], stop_ids))
    return SpecState(
        s.step + 1, count, out, s.done | stopped | (count >= max_new), jnp.where(hit, pred[:, 1], pred[:, 0]),
        guess, s.accepted + hit, s.guessed + ~s.done, cache, mtp_cache,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _decode_program(graphdef, max_new, state, loop: SpecState, stop_ids) -> SpecState:
    """Steps until every row has max_new tokens or stopped."""
    model = nnx.merge(graphdef, state)
    return jax.lax.while_loop(lambda s: ~jnp.all(s.done), lambda s: _step(model, s, max_new, stop_ids), loop)


def generate_speculative(
    model: DeepseekV4,
    prompts,
    max_new_tokens: int,
    *,
    stop_tokens=None,
    cache_format: str = "bfloat16",
    max_len: int | None = None,
) -> SpeculativeResult:
    """Greedy generation with the MTP block guessing every second token (see the module docstring).

    The keyword arguments are `dsv4.generate`'s (greedy, no streaming, one device). Returns a
    SpeculativeResult: the new tokens of each prompt (each row cut after its first stop token), the
    number of loop steps and of guesses kept, and timings (compilation excluded). ValueError, before
    any device work, for a model without an MTP block or on a mesh, and for every input
    `dsv4.generate` refuses.
    """
    check_model(model)
    cfg = model.cfg
    if not len(model.mtp):
        raise ValueError("speculative decoding needs an MTP block; this config has none (num_nextn_predict_layers = 0)")
    if model.rt.mesh is not None:
        raise ValueError("speculative decoding runs on one device: this model is placed on a mesh")
    req = check_request(cfg, prompts, max_new_tokens, (0.0, 0, 1.0), stop_tokens, cache_format, max_len, 1, None)
    if req.max_new == 0:
        return SpeculativeResult([[] for _ in req.prompts], 0, 0, 0, 0.0, 0.0, 0.0)
    tokens, lengths = _padded(req.prompts, None)
    batch = tokens.shape[0]
    cache = kv_cache.init_cache(cfg, batch, req.max_len, req.cache_format)
    mtp_layer = kv_cache.layer_cache(cfg, cfg.mtp_ratio(0), batch, req.max_len, req.cache_format)
    mtp_cache = kv_cache.Cache(jnp.zeros((batch,), jnp.int32), (mtp_layer,), req.max_len)
    graphdef, state = nnx.split(model)
    stop = _stop_array(req.stop_ids)
    clock, static = _Clock(), (graphdef, req.max_new)
    args = (state, tokens, lengths, cache, mtp_cache, stop)
    loop = clock.run("prefill", clock.compiled(_prefill_program, *static, *args), *args)
    if not bool(np.all(loop.done)):  # max_new_tokens 1, or every first token a stop: no step to run
        loop = clock.run("decode", clock.compiled(_decode_program, *static, state, loop, stop), state, loop, stop)
    out = np.asarray(loop.out)[:, : req.max_new]
    rows = _rows_until_stop(out, req.max_new, req.stop_ids)
    return SpeculativeResult(rows, int(loop.step), int(np.sum(loop.accepted)), int(np.sum(loop.guessed)),
                             clock.prefill, clock.decode, clock.compile)  # fmt: skip
