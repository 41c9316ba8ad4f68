"""Parameter declaration: every weight states its shape, dtype and logical axes where it is declared.

Logical axis names (the vocabulary `sharding.rules` maps onto mesh axes; every name below has an
entry in `sharding.rules.REPLICATED_RULES`, and tests/test_sharding.py checks the two lists agree):

    batch          B   sequences of a batch (activations, tokens, the KV cache: `sharding.placement`)
    sequence       S   positions (activations; no strategy splits it)
    vocab          V   vocabulary
    embed          D   hidden size
    q_lora         -   query low-rank width (q_lora_rank)
    heads          H   query heads
    head_dim       K   per-head width (512 in the release)
    kv_dim         -   the single shared K=V head's width
    o_groups       G   output-projection groups
    o_group_in     -   per-group input width of wo_a (H/G * head_dim)
    o_lora         -   per-group output width of wo_a (o_lora_rank)
    compress_slot  -   position inside a compression window (ape rows)
    compress_dim   -   compressor output channels (1 or 2 series of head_dim)
    index_heads    -   lightning-indexer query heads
    experts        E   routed experts (the stacked expert weights: split by expert parallelism)
    router_experts E   the router's expert axis (gate weight and bias: replicated in every strategy)
    expert_hidden  F   expert / shared-expert hidden width
    expert_slot    -   the K routed choices of tid2eid
    hc_mix         -   mHC mixing rows ((2 + n) * n)
    hc_embed       -   mHC flattened streams (n * D)
    hc_stream      -   one of the n residual streams

A `None` axis is never sharded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


class Buffer(nnx.Variable):
    """A non-trainable model array (e.g. the hash router's frozen `tid2eid` table)."""


class KeyChain:
    """Deterministic initialisation keys: the n-th parameter declared gets fold_in(base, n).

    Cheaper to trace than drawing from `nnx.Rngs` once per parameter (which matters when
    `jax.eval_shape` builds the 1.6T-parameter Pro tree). Accepts a seed, a key or an `nnx.Rngs`.
    """

    def __init__(self, seed: int | jax.Array | nnx.Rngs = 0):
        if isinstance(seed, nnx.Rngs):
            seed = seed.params()
        self.base = jax.random.key(seed) if isinstance(seed, int) else seed
        self.count = 0

    def __call__(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.base, self.count)


def normal(std: float) -> Initializer:
    """Initializer drawing from N(0, std^2)."""

    def init(key, shape, dtype):
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


def constant(value: float) -> Initializer:
    """Initializer filling with one value."""

    def init(key, shape, dtype):
        del key
        return jnp.full(shape, value, dtype)

    return init


def param(
    keys: KeyChain,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype,
    init: Initializer,
) -> nnx.Param:
    """Declare a trainable parameter with its logical `axes` (one name or None per dimension)."""
    shape, axes = tuple(int(s) for s in shape), tuple(axes)
    if len(shape) != len(axes):
        raise ValueError(f"parameter of shape {shape} declared with {len(axes)} logical axes {axes}")
    return nnx.Param(init(keys(), shape, jnp.dtype(dtype)), axes=axes)


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axes a variable was declared with (all None when it declared none)."""
    meta = variable.get_metadata()
    axes = meta.get("axes")
    if axes is None:
        return (None,) * len(variable.get_value().shape)
    return tuple(axes)
