"""The DeepSeek-V4 model: blocks, the main stack, the MTP block, and the pure forward functions.

    ids -> embed -> N streams [B,S,N,D] -> blocks -> hc_head -> norm -> head -> logits [B,S,V]
    block: mHC(attn): attn_norm -> attention ; mHC(ffn): ffn_norm -> MoE

Module paths mirror the release tensor names (`layers.3.attn.wq_a.weight`, `mtp.0.e_proj.weight`),
so the checkpoint name table in `dsv4.checkpoint` stays short.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4.attention import Attention
from dsv4.cache import LayerCache
from dsv4.config import ModelConfig, RuntimeConfig
from dsv4.layers import F32, Linear, RMSNorm
from dsv4.mhc import HyperConnection, HyperHead, collapse
from dsv4.moe import MoE
from dsv4.params import KeyChain, normal, param
from dsv4.xla_flags import jit_whole_sequence


class Table(nnx.Module):
    """A [V, D] table: the token embedding, or the output head (logits = h @ weight.T)."""

    def __init__(self, vocab: int, dim: int, dtype, keys: KeyChain, std: float):
        self.weight = param(keys, (vocab, dim), ("vocab", "embed"), dtype, normal(std))


class Block(nnx.Module):
    """One transformer block with mHC around attention and around the MoE."""

    def __init__(self, cfg: ModelConfig, rt: RuntimeConfig, ratio: int, hashed: bool, keys: KeyChain):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, keys)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, keys)
        self.attn = Attention(cfg, rt, ratio, keys)
        self.ffn = MoE(cfg, rt, hashed, keys)
        self.hc_attn = HyperConnection(cfg, keys)
        self.hc_ffn = HyperConnection(cfg, keys)

    def __call__(self, streams, start, n, token_ids, cache: LayerCache | None = None):
        """streams [B, C, N, D] at positions start[b] + i (n[b] real) -> (streams, cache).

        With `cache=None` this is a whole-sequence forward from position 0 (a transient cache).
        """
        if cache is None:
            cache = self.attn.empty_cache(streams.shape[0], streams.shape[1], streams.dtype)
        pre, post, comb = self.hc_attn.weights(streams)
        out, cache = self.attn(self.attn_norm(collapse(streams, pre)), start, n, cache)
        streams = HyperConnection.expand(out, streams, post, comb)
        pre, post, comb = self.hc_ffn.weights(streams)
        out = self.ffn(self.ffn_norm(collapse(streams, pre)), token_ids)
        return HyperConnection.expand(out, streams, post, comb), cache


class MTPBlock(nnx.Module):
    """Multi-token prediction block `mtp.i` of compression ratio `ratio`: `mtp.0` predicts token t+2
    from the streams at t and token t+1."""

    def __init__(self, cfg: ModelConfig, rt: RuntimeConfig, ratio: int, keys: KeyChain):
        d, dtype = cfg.hidden_size, rt.jnp_dtype
        self.enorm = RMSNorm(d, cfg.rms_norm_eps, keys)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps, keys)
        self.e_proj = Linear(d, d, ("embed", None), dtype, keys)
        self.h_proj = Linear(d, d, ("embed", None), dtype, keys)
        self.block = Block(cfg, rt, ratio, False, keys)
        self.hc_head = HyperHead(cfg, keys)
        self.norm = RMSNorm(d, cfg.rms_norm_eps, keys)

    def __call__(self, streams, next_embed, next_ids) -> jax.Array:
        """streams [B,S,N,D] (main model, before hc_head), next_embed [B,S,D] -> hidden [B,S,D]."""
        b, s = next_ids.shape
        start, n = jnp.zeros((b,), jnp.int32), jnp.full((b,), s, jnp.int32)
        return self.extend(streams, next_embed, next_ids, start, n)[0]

    def extend(self, streams, next_embed, next_ids, start, n, cache: LayerCache | None = None):
        """The block over a chunk of positions start[b] .. start[b] + C - 1 -> (hidden [B,C,D], cache).

        As `__call__`, with the block's own cache (None: a whole sequence from position 0); row b's
        first n[b] positions are real (right padding), as in `DeepseekV4.run`.
        """
        e = self.e_proj(self.enorm(next_embed))
        h = self.h_proj(self.hnorm(streams))
        x, cache = self.block(h + e[:, :, None, :], start, n, next_ids, cache)
        return self.norm(self.hc_head(x)), cache


def _block(run_block, layer: Block, streams, start, n, token_ids, cache, remat: bool = False):
    """One block: (streams [B, C, N, D], cache) -> (streams, cache), through `run_block`.

    With `remat` the block runs under `jax.checkpoint`: its activations are recomputed in the
    backward pass (training memory; the same numbers). What the block sows (train stats, probes;
    under `nnx.capture` the capture's own variables travel in the split state) comes back out of
    `run_block` and is put on `layer`, as a plain call would leave it.
    """
    graphdef, state = nnx.split(layer)
    run = functools.partial(run_block, graphdef)
    out, sown = (jax.checkpoint(run) if remat else run)(state, streams, start, n, token_ids, cache)
    nnx.update(layer, sown)
    return out


def _block_body(graphdef, state, streams, start, n, token_ids, cache):
    block = nnx.merge(graphdef, state)
    out = block(streams, start, n, token_ids, cache)
    return out, nnx.state(block, nnx.Intermediate)


def _block_runner(streams):
    """How `DeepseekV4.run` calls its blocks.

    Inside a trace (jit, grad): one `jax.jit` of the block body made for this trace, so layers of
    one kind (equal graphdefs: ratio, router, shapes) share one trace and one lowering; tracing
    and lowering then cost the number of layer kinds, not of layers (43 Flash-pattern layers:
    5.0 -> 1.1 s for a forward, `scripts/bench_compile.py`). XLA still compiles every call. Made
    per trace, never kept: a later trace sees the code as it is then (`probe`'s recording). A
    program already compiled for these shapes is not traced again: after patching a class (not
    an instance), `jax.clear_caches()` makes `dsv4.forward` and the others trace the new code.
    Eagerly (no trace): the plain body, one op at a time as before.
    """
    if not isinstance(streams, jax.core.Tracer):
        return _block_body

    def body(*args):  # a new function each time: JAX keys its trace cache by the function
        return _block_body(*args)

    return jax.jit(body, static_argnums=0)


class DeepseekV4(nnx.Module):
    """DeepSeek-V4 for causal LM. Build from a `ModelConfig` (architecture) and `RuntimeConfig`."""

    def __init__(self, cfg: ModelConfig, rt: RuntimeConfig | None = None, *, keys: KeyChain):
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg must be a dsv4.ModelConfig (e.g. ModelConfig.tiny()), got {type(cfg).__name__}")
        if rt is not None and not isinstance(rt, RuntimeConfig):
            raise TypeError(f"rt must be a dsv4.RuntimeConfig or None, got {type(rt).__name__}")
        rt = rt or RuntimeConfig()
        self.cfg, self._rt = cfg, rt
        d, v, dtype = cfg.hidden_size, cfg.vocab_size, rt.jnp_dtype
        self.embed = Table(v, d, dtype, keys, std=1.0)
        self.layers = nnx.List(
            [
                Block(cfg, rt, cfg.compress_ratios[i], cfg.is_hash_layer(i), keys)
                for i in range(cfg.num_hidden_layers)
            ]
        )
        self.hc_head = HyperHead(cfg, keys)
        self.norm = RMSNorm(d, cfg.rms_norm_eps, keys)
        self.head = Table(v, d, dtype, keys, std=0.02)
        self.mtp = nnx.List([MTPBlock(cfg, rt, cfg.mtp_ratio(i), keys) for i in range(cfg.num_mtp_layers)])

    @property
    def rt(self) -> RuntimeConfig:
        """The runtime choices the model was built with (every layer holds them too)."""
        return self._rt

    @rt.setter
    def rt(self, value):
        """Always raises AttributeError: rebuild with `dsv4.with_runtime` instead."""
        raise AttributeError(
            "model.rt cannot be reassigned: every layer was built with it; "
            "dsv4.with_runtime(model, attention_impl=...) rebuilds the model around the same weights"
        )

    def run(self, tokens, start, n, caches=None):
        """The residual streams after the last block for a chunk: tokens [B, C] -> ([B, C, N, D], caches).

        start [B]: position of each row's first token; n [B]: real tokens per row (right padding).
        `caches` is a tuple of LayerCache, or None for a whole-sequence forward from position 0.
        """
        b, s = tokens.shape
        x = self.embed.weight.get_value()[tokens]
        x = jnp.broadcast_to(x[:, :, None, :], (b, s, self.cfg.hc_mult, x.shape[-1]))
        run_block, new_caches = _block_runner(x), []
        for i, layer in enumerate(self.layers):
            layer_cache = None if caches is None else caches[i]
            x, cache = _block(run_block, layer, x, start, n, tokens, layer_cache, self.rt.remat)
            new_caches.append(cache)
        return x, tuple(new_caches)

    def streams(self, tokens: jax.Array) -> jax.Array:
        """Whole-sequence residual streams after the last block: tokens [B, S] -> [B, S, N, D]."""
        b, s = tokens.shape
        return self.run(tokens, jnp.zeros((b,), jnp.int32), jnp.full((b,), s, jnp.int32))[0]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, S, D] -> float32 logits [B, S, V] through the shared head."""
        head = self.head.weight.get_value()
        return jnp.einsum("bsd,vd->bsv", hidden.astype(head.dtype), head, preferred_element_type=F32)

    def head_logits(self, streams: jax.Array) -> jax.Array:
        """Final streams [B, S, N, D] -> float32 logits [B, S, V] (hc_head, norm, head)."""
        return self.logits(self.norm(self.hc_head(streams)))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens int32 [B, S] -> logits float32 [B, S, V].

        Called outside a trace this runs eagerly, op by op, and compiles every query-block loop
        afresh on each call (seconds even for the embedded default); `dsv4.forward(model, tokens)`
        is the same computation jitted, and `dsv4.probe` the one that also returns what it saw.
        """
        return self.head_logits(self.streams(tokens))

    def forward_with_mtp(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Main logits [B, S, V] and MTP logits [B, S-1, V], where mtp[:, t] predicts token t + 2.

        The MTP block sees the main streams at t and the embedding of token t + 1. Only `mtp.0` runs
        (the releases have one block); further blocks of a config with num_nextn_predict_layers > 1
        are built and loaded but not run here or in training.
        """
        if not len(self.mtp):
            raise ValueError("this config has no MTP block (num_nextn_predict_layers = 0)")
        streams = self.streams(tokens)
        main = self.head_logits(streams)
        b, s = tokens.shape
        if s == 1:  # no token t + 1 to condition on: nothing to predict
            return main, jnp.zeros((b, 0, self.cfg.vocab_size), F32)
        nxt = tokens[:, 1:]
        hidden = self.mtp[0](streams[:, :-1], self.embed.weight.get_value()[nxt], nxt)
        return main, self.logits(hidden)


def init_model(cfg: ModelConfig, rt: RuntimeConfig | None = None, seed: int = 0) -> DeepseekV4:
    """A randomly initialised model. With a mesh in `rt`, each parameter is created straight into its
    shards by one jitted program (`sharding.placement.init_sharded`): no device holds the whole model."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if isinstance(cfg, ModelConfig) and isinstance(rt, RuntimeConfig) and rt.mesh is not None:
        from sharding.placement import init_sharded  # sharding imports dsv4: import when used

        return init_sharded(cfg, rt, seed)
    return DeepseekV4(cfg, rt, keys=KeyChain(seed))  # a wrong type for cfg or rt: a TypeError there


# RuntimeConfig fields `with_runtime` leaves alone: the weights' dtype and placement come with them
_PLACEMENT_FIELDS = {"dtype": "load it anew with dtype=...", "mesh": "sharding.placement.shard_model",
                     "strategy": "sharding.placement.shard_model"}  # fmt: skip


def with_runtime(model: DeepseekV4, **changes) -> DeepseekV4:
    """The same weights under `dataclasses.replace(model.rt, **changes)`: e.g. attention_impl,
    query_block, remat, train_stats. Every layer holds its own copy of the runtime choices, so the
    model is rebuilt around its state (no copy of the weights). dtype, mesh and strategy go with
    the weights and are refused here (`_PLACEMENT_FIELDS` says where they change)."""
    check_model(model)
    for name in changes.keys() & _PLACEMENT_FIELDS.keys():
        if changes[name] != getattr(model.rt, name):
            raise ValueError(f"with_runtime: {name} cannot change here ({_PLACEMENT_FIELDS[name]})")
    return rebuild_model(model, dataclasses.replace(model.rt, **changes))


def rebuild_model(model: DeepseekV4, rt: RuntimeConfig, state: nnx.State | None = None) -> DeepseekV4:
    """`model`'s architecture built under `rt`, holding `state` (default: the model's own variables,
    shared, no data moved). The one rebuild behind `with_runtime`, `sharding.placement.with_mesh`
    and `dsv4.train.training_model`."""
    graphdef, _ = nnx.split(abstract_model(model.cfg, rt))
    return nnx.merge(graphdef, nnx.state(model) if state is None else state)


def abstract_model(cfg: ModelConfig, rt: RuntimeConfig | None = None) -> DeepseekV4:
    """The model with ShapeDtypeStruct leaves: the one abstract tree behind init, loading and restore."""
    return nnx.eval_shape(lambda: DeepseekV4(cfg, rt, keys=KeyChain(0)))


def check_token_shape(tokens) -> None:
    """ValueError unless `tokens` (host or device array, or tracer) are a non-empty [batch, length] array."""
    if tokens.ndim != 2 or 0 in tokens.shape:
        raise ValueError(f"tokens must be a non-empty [batch, length] array, got shape {tokens.shape}")


def check_token_ids(tokens, vocab: int, name: str = "tokens") -> None:
    """ValueError for non-integer ids, or, in a host array, an id outside [0, vocab). The ids of device
    arrays and tracers are not read: that would wait for the device (their dtype is known)."""
    check_integer_ids(tokens, name)
    if not isinstance(tokens, jax.Array):
        check_vocabulary(tokens, vocab)


def check_integer_ids(tokens, name: str = "tokens") -> None:
    """ValueError unless `tokens` have an integer dtype (floats and booleans would be cast silently)."""
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {tokens.dtype}")


def check_vocabulary(tokens: np.ndarray, vocab: int, real: np.ndarray | None = None) -> None:
    """ValueError naming the first id of host `tokens` [B, S] outside [0, vocab) (only where `real`)."""
    bad = (tokens < 0) | (tokens >= vocab)
    if real is not None:
        bad &= real
    if bad.any():
        b, i = np.argwhere(bad)[0]
        raise ValueError(f"token id {tokens[b, i]} at row {b}, position {i} is outside the vocabulary [0, {vocab})")


def check_model(model, name: str = "model") -> None:
    """TypeError unless `model` is a DeepseekV4 (a config passed in its place reads clearly)."""
    if not isinstance(model, DeepseekV4):
        raise TypeError(
            f"{name} must be a dsv4.DeepseekV4 (dsv4.init_model, load_hf or load), got {type(model).__name__}"
        )


def whole_sequence_tokens(model: DeepseekV4, tokens) -> jax.Array:
    """tokens [B, S] as int32, validated first.

    Raises ValueError for a shape other than [B >= 1, S >= 1], S past the config's
    max_position_embeddings, non-integer ids, and, for host tokens (numpy, lists), an id outside
    [0, vocab_size) (XLA would clamp it to the last row of the embedding without a word). The ids of
    device arrays and tracers are not checked: reading them would wait for the device.
    """
    check_model(model)
    if not isinstance(tokens, jax.Array):  # jax.Array: tracers too
        tokens = np.asarray(tokens)
    check_token_shape(tokens)
    limit = model.cfg.max_position_embeddings
    if tokens.shape[1] > limit:
        raise ValueError(f"tokens have {tokens.shape[1]} positions, past the model's max_position_embeddings {limit}")
    check_token_ids(tokens, model.cfg.vocab_size)
    return jnp.asarray(tokens, jnp.int32)


# The jitted entry points take the model itself: an nnx.Module is a pytree, which jit flattens in
# a fraction of the time `nnx.split` walks the module graph (4 layers: 0.8 against 8 ms per call; 43
# layers: 9 against 132 ms), and the program is still a pure function of the weights.


@jit_whole_sequence()
def _forward(model, tokens):
    return model(tokens)


def forward(model: DeepseekV4, tokens: jax.Array) -> jax.Array:
    """Jitted whole-sequence forward: tokens [B, S] -> logits [B, S, V] (a pure function of the weights)."""
    return _forward(model, whole_sequence_tokens(model, tokens))


@jit_whole_sequence()
def _forward_with_mtp(model, tokens):
    return model.forward_with_mtp(tokens)


def forward_with_mtp(model: DeepseekV4, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Jitted main logits [B, S, V] and MTP logits [B, S-1, V] (see DeepseekV4.forward_with_mtp)."""
    return _forward_with_mtp(model, whole_sequence_tokens(model, tokens))
