"""Generation: prefill the right-padded prompts, then a decode loop that runs on the device.

    prompts --pad right--> prefill (whole, or in chunks of `prefill_chunk`) --> sample token 0
        --> lax.while_loop { decode_fn(previous token) -> sample -> stop? } until every row
            stopped or max_new_tokens are out

The loop is one compiled program (`jax.lax.while_loop` over `dsv4.decode.decode_fn` and
`dsv4.sampling.sample`): no host round trip per token. Streaming (`on_token`) runs the same
program in chunks of `stream_interval` steps and hands each chunk's tokens to the callback between
chunks; the tokens do not depend on the chunking (step t samples with `fold_in(key(seed), t)`).

Conventions: each row stops at its first stop token (default: the config's eos ids), which is
included in its output; rows that stopped keep feeding a pad token (their output is cut there),
so every step has the same shapes. The cache holds `max_len` tokens per row (default: the
longest prompt + max_new_tokens, rounded up to a multiple of 128). Programs are compiled ahead of
time (`jit.lower().compile()`, cached by JAX), so the reported prefill and decode times exclude
compilation.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4 import cache as kv_cache
from dsv4 import decode
from dsv4.config import ModelConfig
from dsv4.model import DeepseekV4, check_model
from dsv4.sampling import SamplingParams, sample_with
from dsv4.xla_flags import jit_whole_sequence

CACHE_ALIGN = 128  # the default cache length is rounded up to a multiple of this
PAD_ID = 0  # fed to padded prompt slots and to rows that already stopped; never visible to real tokens
OnToken = Callable[[list[list[int]]], None]


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """New tokens per prompt, and where the time went (seconds, compilation excluded)."""

    tokens: list[list[int]]
    prompt_tokens: int  # real prompt tokens, all rows
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int  # loop iterations run (each advances every row by one token)
    compile_seconds: float
    cache_bytes: int
    cache_format: str

    @property
    def new_tokens(self) -> int:
        """Generated tokens, all rows (stop tokens included)."""
        return sum(len(t) for t in self.tokens)

    @property
    def prefill_tokens_per_second(self) -> float:
        """Real prompt tokens (all rows) prefilled per second; NaN when `prefill_seconds` is 0."""
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens produced by the decode loop (batch x steps) per second."""
        rows = len(self.tokens)
        return rows * self.decode_steps / self.decode_seconds if self.decode_seconds else float("nan")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["step", "out", "done", "cache"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class LoopState:
    """Carry of the decode loop.

    step: int32 scalar, the next column of `out` to fill (token `step - 1` is fed to the model).
    out: int32 [B, N] generated tokens (PAD_ID after a row stopped). done: bool [B].
    cache: the KV cache, holding every row's prompt and out[:, :step - 1].
    """

    step: jax.Array
    out: jax.Array
    done: jax.Array
    cache: kv_cache.Cache


# ------------------------------------------------------------------------------ device programs


def _is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
    """tokens [B], stop_ids [S] (-1 = unused slot) -> [B] bool."""
    return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)


@jit_whole_sequence(static_argnums=0, donate_argnums=(4, 5))
def _prefill_program(graphdef, state, tokens, lengths, cache, last_logits):
    """Append one prompt chunk; keep each row's logits at its latest real token.

    tokens [B, P], lengths [B] (real tokens of each row in this chunk, 0..P), last_logits [B, V].
    """
    logits, cache = decode.prefill_fn(nnx.merge(graphdef, state), tokens, lengths, cache, True)  # [B, V]
    return jnp.where((lengths > 0)[:, None], logits, last_logits), cache


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(4,))
def _first_token_program(params, max_new, last_logits, stop_ids, cache, key) -> LoopState:
    """Sample token 0 from the prompts' last logits -> the decode loop's initial state."""
    first = sample_with(params, last_logits, jax.random.fold_in(key, 0))
    out = jnp.full((first.shape[0], max_new), PAD_ID, jnp.int32).at[:, 0].set(first)
    return LoopState(jnp.int32(1), out, _is_stop(first, stop_ids), cache)


@functools.partial(jax.jit, static_argnums=(0, 3), donate_argnums=(2,))
def _decode_program(graphdef, state, loop: LoopState, params, stop_ids, limit, key) -> LoopState:
    """Decode until step == limit or every row stopped."""

    def cond(s: LoopState):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: LoopState) -> LoopState:
        previous = jax.lax.dynamic_index_in_dim(s.out, s.step - 1, axis=1, keepdims=False)  # [B]
        logits, cache = decode.decode_fn(nnx.merge(graphdef, state), previous, s.cache)
        token = sample_with(params, logits, jax.random.fold_in(key, s.step))
        token = jnp.where(s.done, PAD_ID, token)
        out = jax.lax.dynamic_update_index_in_dim(s.out, token, s.step, axis=1)
        return LoopState(s.step + 1, out, s.done | _is_stop(token, stop_ids), cache)

    return jax.lax.while_loop(cond, body, loop)


# ------------------------------------------------------------------------------ input checks


def check_prompt(name: int | str, prompt, vocab: int | float) -> list[int]:
    """A prompt as a list of ints; ValueError for a non-list, an empty prompt or an id outside
    [0, vocab) (`math.inf`: any id >= 0, when no model says). The message names the prompt by
    `name`: an index i reads "prompt i", a string is used as it is."""
    label = f"prompt {name}" if isinstance(name, int) else name
    if isinstance(prompt, str | bytes) or not isinstance(prompt, Sequence | np.ndarray):
        raise ValueError(f"{label} must be a list of token ids, got {type(prompt).__name__}")
    ids = list(prompt)
    if not ids:
        raise ValueError(f"{label} is empty: generation needs at least one prompt token")
    for j, t in enumerate(ids):
        if not isinstance(t, numbers.Integral) or isinstance(t, bool):
            raise ValueError(f"{label}, position {j}: token ids must be integers, got {t!r}")
        if not 0 <= t < vocab:
            raise ValueError(f"{label}, position {j}: token id {t} is outside the vocabulary [0, {vocab})")
    return [int(t) for t in ids]


def check_prompts(prompts, vocab: int) -> list[list[int]]:
    """Prompts as lists of ints; ValueError for a non-list, an empty prompt or an out-of-range id."""
    if isinstance(prompts, jax.Array):
        prompts = np.asarray(prompts)  # its rows' elements then read as numpy integers
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence | np.ndarray):
        raise ValueError(f"prompts must be a non-empty list of token-id lists, got {type(prompts).__name__}")
    if not len(prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists, got an empty one")
    return [check_prompt(i, p, vocab) for i, p in enumerate(prompts)]


def stop_ids_of(cfg: ModelConfig, stop_tokens) -> tuple[int, ...]:
    """The stop ids: `stop_tokens` if given (an int or a sequence), else the config's eos ids."""
    if stop_tokens is None:
        eos = cfg.eos_token_id
        stop_tokens = () if eos is None else (eos,) if isinstance(eos, int) else eos
    elif _is_int(stop_tokens):
        stop_tokens = (stop_tokens,)
    if isinstance(stop_tokens, str | bytes) or not isinstance(stop_tokens, Sequence | np.ndarray):
        raise ValueError(f"stop_tokens must be an int or a list of ints, got {stop_tokens!r}")
    floats = [t for t in stop_tokens if not _is_int(t)]
    if floats:
        raise ValueError(f"stop_tokens must be integers, got {floats}")
    ids = tuple(int(t) for t in stop_tokens)
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"stop tokens {bad} are outside the vocabulary [0, {cfg.vocab_size})")
    return ids


def cache_length(cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int, max_len: int | None) -> int:
    """The cache's max length; ValueError when the prompts plus max_new_tokens do not fit in it."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    _positive("max_len", max_len, allow_none=True)
    longest = max(len(p) for p in prompts)
    needed, limit = longest + max_new_tokens, cfg.max_position_embeddings
    if needed > limit:
        extra = f" plus max_new_tokens {max_new_tokens}" if max_new_tokens else ""
        raise ValueError(
            f"a prompt of {longest} tokens{extra} needs {needed} positions, more than the model's "
            f"max_position_embeddings {limit}"
        )
    if max_len is None:  # rounded up: fewer distinct cache shapes (compiles), whole HCA windows
        max_len = min(-(-needed // CACHE_ALIGN) * CACHE_ALIGN, limit)
    if longest > max_len:
        raise ValueError(f"a prompt of {longest} tokens is longer than the cache max length {max_len}")
    if needed > max_len:
        raise ValueError(
            f"a prompt of {longest} tokens plus max_new_tokens {max_new_tokens} needs {needed} cache "
            f"positions, more than the cache max length {max_len}"
        )
    if max_len > limit:
        raise ValueError(f"cache max length {max_len} exceeds the model's max_position_embeddings {limit}")
    return max_len


def _stop_array(stop_ids: tuple[int, ...]) -> np.ndarray:
    """Stop ids as int32 [S], S a multiple of 4 (padded with -1, which no token equals): few shapes."""
    size = max(4, -(-len(stop_ids) // 4) * 4)
    return np.array(stop_ids + (-1,) * (size - len(stop_ids)), np.int32)


def _padded(prompts: list[list[int]], chunk: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded tokens [B, C] int32 (C a multiple of `chunk` when given) and lengths [B] int32."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = int(lengths.max())
    if chunk:
        width = -(-width // chunk) * chunk
    tokens = np.full((len(prompts), width), PAD_ID, np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    return tokens, lengths


def _is_int(value) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_seed(seed) -> None:
    """ValueError unless `seed` is an integer in [0, 2**32), where distinct seeds give distinct
    streams (with JAX's 64-bit mode off, `jax.random.key(2**32)` is `key(0)`)."""
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")


# ------------------------------------------------------------------------------------ host loop


def _rows_until_stop(out: np.ndarray, steps: int, stop_ids: tuple[int, ...]) -> list[list[int]]:
    """Each row's tokens up to and including its first stop token, within the first `steps`."""
    rows = []
    for row in out[:, :steps].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        rows.append(row[:end])
    return rows


class _Streamer:
    """Calls on_token with each row's tokens that are new since the last call (none after a stop)."""

    def __init__(self, on_token: OnToken | None, batch: int, stop_ids: tuple[int, ...]):
        self.on_token, self.stop_ids = on_token, stop_ids
        self.sent = [0] * batch

    def __call__(self, loop: LoopState) -> None:
        if self.on_token is None:
            return
        steps = int(loop.step)
        rows = _rows_until_stop(np.asarray(loop.out), steps, self.stop_ids)
        new = [row[s:] for row, s in zip(rows, self.sent, strict=True)]
        self.sent = [len(r) for r in rows]
        if any(new):
            self.on_token(new)


@dataclasses.dataclass(frozen=True)
class _Request:
    """Validated generation inputs."""

    prompts: list[list[int]]
    max_new: int
    params: SamplingParams
    stop_ids: tuple[int, ...]
    max_len: int
    cache_format: str
    prefill_chunk: int | None


def check_request(cfg, prompts, max_new_tokens, sampling, stop_tokens, cache_format, max_len,
                  stream_interval, prefill_chunk, seed=0) -> _Request:  # fmt: skip
    """Every input check, on the host, before any device work."""
    check_seed(seed)
    prompts = check_prompts(prompts, cfg.vocab_size)
    params = SamplingParams(*sampling)
    stop_ids = stop_ids_of(cfg, stop_tokens)
    max_len = cache_length(cfg, prompts, max_new_tokens, max_len)
    if cache_format not in kv_cache.FORMATS:
        raise ValueError(f"cache_format must be one of {kv_cache.FORMATS}, got {cache_format!r}")
    _positive("stream_interval", stream_interval)
    _positive("prefill_chunk", prefill_chunk, allow_none=True)
    return _Request(prompts, int(max_new_tokens), params, stop_ids, max_len, cache_format, prefill_chunk)


class _Clock:
    """Accumulates compile and run seconds; `run` blocks until the result is ready."""

    def __init__(self):
        self.compile = self.prefill = self.decode = 0.0

    def compiled(self, jitted, *args):
        start = time.perf_counter()
        exe = jitted.lower(*args).compile()
        self.compile += time.perf_counter() - start
        return exe

    def run(self, phase: str, exe, *args):
        start = time.perf_counter()
        out = jax.block_until_ready(exe(*args))
        setattr(self, phase, getattr(self, phase) + time.perf_counter() - start)
        return out


def _empty_cache(cfg: ModelConfig, batch: int, req: _Request, rt):
    """The KV cache, created in its shards on a mesh (no device holds the whole of it)."""
    if rt.mesh is None:
        return kv_cache.init_cache(cfg, batch, req.max_len, req.cache_format)
    from sharding.placement import init_sharded_cache

    return init_sharded_cache(cfg, batch, req.max_len, req.cache_format, rt.mesh, rt.strategy)


def _prefill(cfg: ModelConfig, rt, graphdef, state, req: _Request, key, clock: _Clock) -> LoopState:
    """Prefill every prompt (in chunks of req.prefill_chunk) and sample token 0."""
    tokens, lengths = _padded(req.prompts, req.prefill_chunk)
    batch, width = tokens.shape
    chunk = req.prefill_chunk or width
    cache = _empty_cache(cfg, batch, req, rt)
    last = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
    exe = None
    for offset in range(0, width, chunk):
        piece = tokens[:, offset : offset + chunk]
        n = np.clip(lengths - offset, 0, chunk).astype(np.int32)
        if exe is None:  # every chunk has the same shapes: one program
            exe = clock.compiled(_prefill_program, graphdef, state, piece, n, cache, last)
        last, cache = clock.run("prefill", exe, state, piece, n, cache, last)
    stop = _stop_array(req.stop_ids)
    first = clock.compiled(_first_token_program, req.params, req.max_new, last, stop, cache, key)
    return clock.run("prefill", first, last, stop, cache, key)


def _decode(graphdef, state, loop: LoopState, req: _Request, key, clock: _Clock, stream, interval) -> LoopState:
    """Run the decode loop to max_new tokens or until every row stopped, `interval` steps per call."""
    stop, exe = _stop_array(req.stop_ids), None
    while int(loop.step) < req.max_new and not bool(np.all(loop.done)):
        if exe is None:  # compiled only when a step runs (not for max_new_tokens 1, or rows that all stopped)
            exe = clock.compiled(_decode_program, graphdef, state, loop, req.params, stop, np.int32(1), key)
        limit = np.int32(min(int(loop.step) + interval, req.max_new))
        loop = clock.run("decode", exe, state, loop, stop, limit, key)
        stream(loop)
    return loop


def _on_mesh(model: DeepseekV4, mesh, strategy) -> DeepseekV4:
    """`model` placed on `mesh` by `strategy`; unchanged without a mesh (a strategy alone is an error)."""
    if mesh is None:
        if strategy is not None:
            raise ValueError(f"strategy={strategy!r} needs a mesh= to apply to")
        return model
    from sharding.placement import shard_model

    return shard_model(model, mesh, strategy if strategy is not None else "dp_ep")


def generate_with_stats(
    model: DeepseekV4,
    prompts,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_tokens=None,
    cache_format: str = "bfloat16",
    on_token: OnToken | None = None,
    max_len: int | None = None,
    stream_interval: int = 1,
    prefill_chunk: int | None = None,
    mesh=None,
    strategy=None,
) -> GenerationResult:
    """`generate`, returning a GenerationResult with timings (see `generate` for the arguments)."""
    check_model(model)
    req = check_request(model.cfg, prompts, max_new_tokens, (temperature, top_k, top_p), stop_tokens,
                         cache_format, max_len, stream_interval, prefill_chunk, seed)  # fmt: skip
    model = _on_mesh(model, mesh, strategy)
    batch = len(req.prompts)
    if model.rt.mesh is not None:  # a ValueError before compiling, not shard_map's
        from sharding.placement import check_batch

        check_batch(batch, model.rt.mesh, model.rt.strategy)
    nbytes = kv_cache.cache_bytes(model.cfg, batch, req.max_len, cache_format)
    prompt_tokens = sum(len(p) for p in req.prompts)
    if req.max_new == 0:
        return GenerationResult([[] for _ in req.prompts], prompt_tokens, 0.0, 0.0, 0, 0.0, nbytes, cache_format)
    graphdef, state = nnx.split(model)
    key, clock = jax.random.key(seed), _Clock()
    stream = _Streamer(on_token, batch, req.stop_ids)
    loop = _prefill(model.cfg, model.rt, graphdef, state, req, key, clock)
    stream(loop)
    interval = stream_interval if on_token is not None else req.max_new
    loop = _decode(graphdef, state, loop, req, key, clock, stream, interval)
    rows = _rows_until_stop(np.asarray(loop.out), int(loop.step), req.stop_ids)
    return GenerationResult(rows, prompt_tokens, clock.prefill, clock.decode, int(loop.step) - 1, clock.compile,
                            nbytes, cache_format)  # fmt: skip


def generate(
    model: DeepseekV4,
    prompts,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_tokens=None,
    cache_format: str = "bfloat16",
    on_token: OnToken | None = None,
    max_len: int | None = None,
    stream_interval: int = 1,
    prefill_chunk: int | None = None,
    mesh=None,
    strategy=None,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` tokens after each prompt.

    Args:
      model: a DeepseekV4 (e.g. from `dsv4.load_hf`).
      prompts: list of non-empty token-id lists (any lengths; right-padded internally).
      max_new_tokens: per prompt (>= 0).
      temperature, top_k, top_p: sampling (`dsv4.sampling.sample`); temperature 0 = greedy.
      seed: PRNG seed in [0, 2**32); the same seed and inputs give the same tokens.
      stop_tokens: ids that end a row (included in its output); None = the config's eos ids,
        () = never stop early.
      cache_format: "bfloat16" | "compact" | "float32" (`dsv4.cache`).
      on_token: optional callback, called with a list (one entry per prompt) of the tokens each
        row produced since the previous call; every `stream_interval` decode steps.
      max_len: cache capacity per row (default: longest prompt + max_new_tokens, rounded up to a
        multiple of 128).
      prefill_chunk: prefill the prompts this many positions at a time (bounds the prefill's
        activation memory; default: all at once).
      mesh, strategy: run on this `jax.sharding.Mesh` with this `sharding.rules` strategy (default
        "dp_ep"): the model is placed by `sharding.placement.shard_model` first. None keeps the
        model where it is (a model loaded with mesh= is already sharded).
    Returns:
      The new tokens of each prompt.
    Raises:
      ValueError (before any device work) for an empty prompt, a token id outside the vocabulary,
      a prompt (plus max_new_tokens) longer than the cache, or a bad sampling setting.
    """
    return generate_with_stats(
        model, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, cache_format,
        on_token, max_len, stream_interval, prefill_chunk, mesh, strategy,
    ).tokens  # fmt: skip
