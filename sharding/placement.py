"""Putting a model, its KV cache and its inputs on a mesh under a strategy.

The cache's logical axes are declared here, one entry per field of `dsv4.cache` (the leaf's
attribute name); every cache array has the batch first and is split only by it:

    lengths              [B]            (batch,)
    window               [B, W, K]      (batch, -, kv_dim)
    raw_kv, raw_gate     [B, P, C_w]    (batch, -, compress_dim)
    values               [B, T, d]      (batch, -, -)       dense entry store
    nope, scales, rope   [B, T, ...]    (batch, -, -)       compact FP8 entry store
    packed               [B, T, J/2]    (batch, -, -)       compact FP4 indexer keys

The entry width stays unsplit in every strategy: with one shared K=V head each query head reads
all of it.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.mesh import axis_size
from sharding.rules import Strategy, check_divisible, get_strategy, logical_to_spec, param_shardings, validate

CACHE_AXES: dict[str, tuple[str | None, ...]] = {
    "lengths": ("batch",),
    "window": ("batch", None, "kv_dim"),
    "raw_kv": ("batch", None, "compress_dim"),
    "raw_gate": ("batch", None, "compress_dim"),
    "values": ("batch", None, None),
    "nope": ("batch", None, None),
    "scales": ("batch", None, None),
    "rope": ("batch", None, None),
    "packed": ("batch", None, None),
}


def _field(path) -> str:
    """The attribute name of a cache leaf (the last GetAttrKey of its path)."""
    names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
    if not names or names[-1] not in CACHE_AXES:
        raise ValueError(f"cache leaf {jax.tree_util.keystr(path)} has no logical axes in CACHE_AXES")
    return names[-1]


def cache_shardings(cache, mesh: Mesh, strategy: str | Strategy | None = None):
    """The cache (concrete or abstract) with every array replaced by its NamedSharding."""
    rules = get_strategy(strategy).rules

    def one(path, _):
        return NamedSharding(mesh, logical_to_spec(CACHE_AXES[_field(path)], rules, mesh))

    return jax.tree_util.tree_map_with_path(one, cache)


def batch_sharding(mesh: Mesh, strategy: str | Strategy | None, ndim: int) -> NamedSharding:
    """Sharding of an activation / token array whose first axis is the batch."""
    rules = get_strategy(strategy).rules
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))


def _spec_tree(state, shardings):
    """The PartitionSpecs of `shardings` in the exact tree structure of `state` (shard_map's in_specs).

    `param_shardings` replaces each variable by its sharding, or by a `QuantizedWeight` of shardings
    where the state has a variable holding a `QuantizedWeight`: a tree that is no prefix of the state.
    Leaf for leaf (data then scale, in both) the two agree.
    """
    return _like_state(state, [s.spec for s in jax.tree.leaves(shardings)])


def _like_state(state, leaves: list):
    """`leaves` (one per array of `state`, in its leaf order) in the exact tree structure of `state`."""
    structure = jax.tree.structure(state)
    if len(leaves) != structure.num_leaves:
        raise ValueError(f"{len(leaves)} shardings for a state of {structure.num_leaves} arrays")
    return jax.tree.unflatten(structure, leaves)


def per_device(fn, rt, state):
    """`fn(state, *batch_first_arrays)` run once per device under `jax.shard_map`, or `fn` itself.

    For data-parallel strategies (`Strategy.data_parallel`) every mesh axis is manual: each device
    runs the model on its own rows of every argument after `state` (tokens, lengths, the cache:
    all batch-first and split only by the batch) with its own experts, and its outputs (logits,
    cache) are its rows of the results. The routed experts then exchange tokens with explicit
    collectives over the expert axes (`sharding.expert_parallel`), and nothing else moves. Other
    strategies (tensor-parallel heads, replicated) leave partitioning to the compiler.
    """
    strat = get_strategy(rt.strategy)
    if rt.mesh is None or not strat.data_parallel:
        return fn
    rows = PartitionSpec(strat.mesh_axes("batch", rt.mesh) or None)
    specs = _spec_tree(state, param_shardings(state, rt.mesh, strat))

    def run(state, *args):
        in_specs = (specs,) + (rows,) * len(args)
        return jax.shard_map(fn, mesh=rt.mesh, in_specs=in_specs, out_specs=rows, check_vma=False)(state, *args)

    return run


def pin_rows(tree, mesh: Mesh, strategy: str | Strategy | None = None):
    """Constrain the batch-first arrays of `tree` (tokens, logits) and any Cache to the strategy's shardings."""
    from dsv4.cache import Cache

    def one(x):
        if isinstance(x, Cache):
            return jax.lax.with_sharding_constraint(x, cache_shardings(x, mesh, strategy))
        return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, strategy, x.ndim))

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, Cache))


def put(value, sharding):
    """A global array with `sharding` from a host value every process holds in full.

    Works on one host and many: each process fills only its addressable shards
    (`jax.make_array_from_callback`), so nothing is sent between hosts.
    """
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def with_mesh(model, mesh: Mesh | None, strategy: str | Strategy | None, state=None):
    """A model under a RuntimeConfig carrying `mesh` and `strategy`, holding `state` (default: the
    model's own variables, shared, no data moved). `dsv4.with_runtime` changes the other runtime
    choices."""
    from dsv4.model import rebuild_model

    return rebuild_model(model, dataclasses.replace(model.rt, mesh=mesh, strategy=strategy or "dp_ep"), state)


def shard_model(model, mesh: Mesh, strategy: str | Strategy | None = None):
    """A copy of `model` with its parameters on `mesh` by `strategy` and its MoE layers expert-parallel.

    Raises ValueError (before any compilation) when the mesh lacks an axis the strategy names or
    its sizes do not divide the experts, heads or any sharded parameter dimension.
    """
    validate(model.cfg, mesh, strategy)
    state = nnx.state(model)
    check_divisible(state, mesh, get_strategy(strategy).rules)
    shardings = jax.tree.leaves(param_shardings(state, mesh, strategy))  # QuantizedWeights: see _spec_tree
    placed = jax.device_put(state, _like_state(state, shardings))
    return with_mesh(model, mesh, strategy, placed)  # new variables: `model` itself stays as it was


def init_sharded(cfg, rt, seed: int = 0):
    """`dsv4.init_model(cfg, rt, seed)` for an `rt` with a mesh: one jitted program creates every
    parameter in the sharding its strategy gives it (`out_shardings`), so each device materialises
    only its own shards. Raises ValueError (before compiling) as `shard_model` does."""
    from dsv4.model import DeepseekV4, abstract_model
    from dsv4.params import KeyChain

    validate(cfg, rt.mesh, rt.strategy)
    graphdef, abstract = nnx.split(abstract_model(cfg, rt))
    check_divisible(abstract, rt.mesh, get_strategy(rt.strategy).rules)
    shardings = _like_state(abstract, jax.tree.leaves(param_shardings(abstract, rt.mesh, rt.strategy)))
    build = jax.jit(lambda: nnx.state(DeepseekV4(cfg, rt, keys=KeyChain(seed))), out_shardings=shardings)
    return nnx.merge(graphdef, build())


def shard_cache(cache, mesh: Mesh, strategy: str | Strategy | None = None):
    """Place a KV cache on `mesh` (batch split by the strategy); ValueError if the batch does not divide."""
    check_batch(int(cache.lengths.shape[0]), mesh, strategy)
    return jax.device_put(cache, cache_shardings(cache, mesh, strategy))


def check_batch(batch: int, mesh: Mesh, strategy: str | Strategy | None = None) -> None:
    """ValueError when the strategy's batch split does not divide `batch`."""
    strat = get_strategy(strategy)
    axes = strat.mesh_axes("batch", mesh)
    parts = axis_size(mesh, axes)
    if batch % parts:
        raise ValueError(
            f"batch {batch} is not divisible by {parts} (strategy {strat.name!r} splits the batch over {axes})"
        )


def init_sharded_cache(cfg, batch: int, max_len: int, fmt: str, mesh: Mesh, strategy: str | Strategy | None = None):
    """An empty KV cache created directly in its shards (no host or device holds the whole of it)."""
    from dsv4.cache import init_cache

    abstract = jax.eval_shape(lambda: init_cache(cfg, batch, max_len, fmt))
    check_batch(batch, mesh, strategy)
    shardings = cache_shardings(abstract, mesh, strategy)
    return jax.jit(lambda: init_cache(cfg, batch, max_len, fmt), out_shardings=shardings)()


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps the whole array on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())
