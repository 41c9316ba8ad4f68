"""Mixture of experts: routing (top-k and hash), routed experts, shared expert.

The routed experts are one grouped product over the token-expert pairs sorted by expert:
`jax.lax.ragged_dot` on GPU and TPU, a loop over fixed-size row tiles on CPU (`impl="auto"`).

Letters: N tokens (B*S flattened), D hidden, E experts, F expert hidden, K experts per token.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4.config import ModelConfig, RuntimeConfig
from dsv4.layers import F32, Linear
from dsv4.params import Buffer, KeyChain, constant, normal, param
from dsv4.probes import record
from dsv4.quantized import materialize


def router_scores(logits: jax.Array) -> jax.Array:
    """The router affinities sqrt(softplus(logits)): [N, E] -> [N, E] float32 (no selection bias)."""
    return jnp.sqrt(jax.nn.softplus(logits.astype(F32)))


def route(
    logits: jax.Array,
    top_k: int,
    scaling: float,
    bias: jax.Array | None = None,
    hashed: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Router: scores = sqrt(softplus(logits)); select by top-k of (scores + bias) or by a hash table.

    logits [N, E] float32; bias [E] (selection only); hashed [N, K] precomputed expert ids of hash
    layers (tid2eid[token]). Weights are the selected scores, normalised to sum 1, times `scaling`.
    Returns (weights [N, K] float32, expert ids [N, K] int32).
    """
    scores = router_scores(logits)
    if hashed is not None:
        idx = hashed.astype(jnp.int32)
    else:
        idx = jax.lax.top_k(scores + bias.astype(F32), top_k)[1]
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * scaling, idx


def clamped_swiglu(gate: jax.Array, up: jax.Array, limit: float) -> jax.Array:
    """silu(min(gate, L)) * clip(up, -L, L): the SwiGLU of routed AND shared experts."""
    return jax.nn.silu(jnp.minimum(gate, limit)) * jnp.clip(up, -limit, limit)


def sort_by_expert(idx: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Order the N*K (token, choice) pairs by expert.

    Returns (order [N*K] positions into the flattened pairs, token of each sorted pair [N*K],
    group sizes [E] int32 for ragged_dot).
    """
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, order // idx.shape[-1], group_sizes


def _resolve(impl: str) -> str:
    """"auto" -> "tiled" on CPU, "ragged_dot" elsewhere; any other value as it is."""
    if impl != "auto":
        return impl
    return "tiled" if jax.default_backend() == "cpu" else "ragged_dot"


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, impl: str = "auto") -> jax.Array:
    """Rows of x [M, D] sorted by group times their group's matrix w [E, D, F] -> [M, F] float32.

    "ragged_dot" is `jax.lax.ragged_dot` (a grouped GEMM on GPU and TPU). Its CPU lowering
    multiplies every row by every expert and masks, so "auto" uses "tiled" on CPU: each group is
    padded to whole tiles of `tile_rows(M, E)` rows and every tile multiplies by its own expert only.
    """
    impl = _resolve(impl)
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=F32)
    return _tiled_grouped_matmul(x, w, group_sizes)


# Rows per tile once there are enough rows per expert. XLA:CPU's batched [tile, 256] x [256, 256]
# products: ~110 GFLOP/s with 64 rows, ~170 with 128 (2 cores), which outweighs the extra padding.
TILE = 128


def tile_rows(m: int, e: int) -> int:
    """Rows per tile for M rows over E experts: TILE, or the power of two >= M/E when that is smaller.

    Every group is padded to whole tiles, so up to E * (tile - 1) rows are padding: at decode
    (M = batch * K, a handful of rows) 128-row tiles would multiply 8 experts x 128 rows for 2 real
    ones. Small tiles keep the padding proportional to M.
    """
    per_expert = max(1, -(-m // e))
    return min(TILE, 1 << (per_expert - 1).bit_length())


TILE_BATCH = 16  # tiles per step of the tile loop: at most 16 expert matrices gathered at once


class _TileLayout(NamedTuple):
    """Rows sorted by group, each group padded to whole tiles (tile_rows(M, E) rows).

    dest [M]: padded row of each row (P for rows past the last group, which no tile holds and which
    read back as zero, as `ragged_dot` leaves them); src [P]: row of each padded row (M where
    padding); tile_group [P / tile]: the group of each tile (tiles past the last group: E - 1, zero
    rows).
    """

    tile: int
    batch: int  # tiles per loop step
    dest: jax.Array
    src: jax.Array
    tile_group: jax.Array

    def pad(self, rows: jax.Array) -> jax.Array:
        """[M, D] -> [steps, batch, tile, D] (padding rows zero)."""
        padded = rows.at[self.src].get(mode="fill", fill_value=0)
        return padded.reshape(-1, self.batch, self.tile, rows.shape[-1])

    def unpad(self, tiles: jax.Array) -> jax.Array:
        """[steps, batch, tile, F] -> [M, F]."""
        return tiles.reshape(-1, tiles.shape[-1]).at[self.dest].get(mode="fill", fill_value=0)

    def groups(self) -> jax.Array:
        return self.tile_group.reshape(-1, self.batch)


def _tile_layout(m: int, e: int, group_sizes: jax.Array) -> _TileLayout:
    tile = tile_rows(m, e)
    n_tiles = -(-(m + e * (tile - 1)) // tile)  # static bound on sum(padded sizes) / tile
    steps = -(-n_tiles // TILE_BATCH)
    batch = -(-n_tiles // steps)  # at most TILE_BATCH, with the fewest empty tiles
    n_tiles = steps * batch
    padded_sizes = -(-group_sizes // tile) * tile
    starts = jnp.cumsum(group_sizes) - group_sizes
    padded_starts = jnp.cumsum(padded_sizes) - padded_sizes
    group = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(m), side="right")  # [M]
    dest = (padded_starts[group] + jnp.arange(m) - starts[group]).astype(jnp.int32)
    dest = jnp.where(jnp.arange(m) < jnp.sum(group_sizes), dest, n_tiles * tile)  # rows past the groups
    src = jnp.full((n_tiles * tile,), m, jnp.int32).at[dest].set(jnp.arange(m, dtype=jnp.int32), mode="drop")
    tile_group = jnp.searchsorted(jnp.cumsum(padded_sizes), jnp.arange(n_tiles) * tile, side="right")
    return _TileLayout(tile, batch, dest, src, jnp.minimum(tile_group, e - 1))


def _tiles_times(tiles: jax.Array, w: jax.Array, groups: jax.Array, transpose: bool = False) -> jax.Array:
    """[steps, batch, tile, D] tiles times their group's w [E, D, F] -> [steps, batch, tile, F] float32;
    with `transpose`, [..., tile, F] tiles times w^T -> [..., tile, D]."""
    spec = "btf,bdf->btd" if transpose else "btd,bdf->btf"

    def step(args):
        rows, g = args
        return jnp.einsum(spec, rows, w[g], preferred_element_type=F32)

    return jax.lax.map(step, (tiles, groups))


@jax.custom_vjp
def _tiled_grouped_matmul(x, w, group_sizes):
    layout = _tile_layout(x.shape[0], w.shape[0], group_sizes)
    return layout.unpad(_tiles_times(layout.pad(x), w, layout.groups()))


def _tiled_fwd(x, w, group_sizes):
    return _tiled_grouped_matmul(x, w, group_sizes), (x, w, group_sizes)


def _tiled_bwd(res, dy):
    """dx: the tiles of dy times w^T; dw: per tile x^T dy, summed per group. Written out because
    autodiff of the forward scatter-adds every tile's weight gradient inside the tile loop
    (`scripts/bench_train.py`'s experts, forward + backward per layer at 1,024 tokens: 52 -> 29 ms)."""
    x, w, group_sizes = res
    layout = _tile_layout(x.shape[0], w.shape[0], group_sizes)
    dy_tiles, groups = layout.pad(jnp.asarray(dy, x.dtype)), layout.groups()
    dx = layout.unpad(_tiles_times(dy_tiles, w, groups, transpose=True))

    def add_step(dw, args):
        x_tiles, dy_b, g = args
        per_tile = jnp.einsum("btd,btf->bdf", x_tiles, dy_b, preferred_element_type=F32)
        return dw + jax.ops.segment_sum(per_tile, g, w.shape[0], indices_are_sorted=True), None

    dw, _ = jax.lax.scan(add_step, jnp.zeros(w.shape, F32), (layout.pad(x), dy_tiles, groups))
    return dx.astype(x.dtype), dw.astype(w.dtype), None


_tiled_grouped_matmul.defvjp(_tiled_fwd, _tiled_bwd)


def expert_ffn(x_sorted, w1, w3, w2, group_sizes, limit, impl: str = "auto"):
    """Per-expert clamped SwiGLU over expert-sorted rows: [M, D] -> [M, D] float32 (no dense all-experts product).

    On CPU ("tiled") the three products run in one loop over the tiles (`_fused_tiled_ffn`);
    with "ragged_dot" they are three grouped products.
    """
    if _resolve(impl) == "tiled":
        return _fused_tiled_ffn(x_sorted, w1, w3, w2, group_sizes, limit)
    return _expert_ffn_by_products(x_sorted, w1, w3, w2, group_sizes, limit, impl)


def _expert_ffn_by_products(x_sorted, w1, w3, w2, group_sizes, limit, impl):
    """expert_ffn as three grouped products (gate, up, down), each a pass over all rows."""
    dtype = w1.dtype
    x_sorted = x_sorted.astype(dtype)
    gate = grouped_matmul(x_sorted, w1, group_sizes, impl)
    up = grouped_matmul(x_sorted, w3, group_sizes, impl)
    hidden = clamped_swiglu(gate, up, limit).astype(dtype)
    return grouped_matmul(hidden, w2, group_sizes, impl)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused_tiled_ffn(x_sorted, w1, w3, w2, group_sizes, limit):
    """The clamped SwiGLU experts in one loop over tiles: each step takes TILE_BATCH tiles through
    gate, up, SwiGLU and down with its experts' three matrices, so only the input and output tiles
    span all rows (the three-product form keeps about ten [P, D]-sized arrays alive, each touched
    for the first time in every call). Its derivative is that of the three-product form
    (`_expert_ffn_by_products`, whose tile products have their own backward), which training runs."""
    dtype = w1.dtype
    layout = _tile_layout(x_sorted.shape[0], w1.shape[0], group_sizes)

    def step(args):
        rows, g = args  # [batch, tile, D], [batch]
        gate = jnp.einsum("btd,bdf->btf", rows, w1[g], preferred_element_type=F32)
        up = jnp.einsum("btd,bdf->btf", rows, w3[g], preferred_element_type=F32)
        hidden = clamped_swiglu(gate, up, limit).astype(dtype)
        return jnp.einsum("btf,bfd->btd", hidden, w2[g], preferred_element_type=F32)

    return layout.unpad(jax.lax.map(step, (layout.pad(x_sorted.astype(dtype)), layout.groups())))


def _fused_tiled_ffn_fwd(x_sorted, w1, w3, w2, group_sizes, limit):
    y, backward = jax.vjp(
        lambda *a: _expert_ffn_by_products(*a, group_sizes, limit, "tiled"), x_sorted, w1, w3, w2
    )
    return y, backward


def _fused_tiled_ffn_bwd(limit, backward, dy):
    return (*backward(dy), None)


_fused_tiled_ffn.defvjp(_fused_tiled_ffn_fwd, _fused_tiled_ffn_bwd)


def combine(y_sorted, order, rows, weights, num_tokens):
    """Weighted scatter-add of expert outputs back to their tokens (rows of x): [N*K, D] -> [N, D] float32."""
    w = weights.reshape(-1)[order]
    return jax.ops.segment_sum(y_sorted * w[:, None], rows, num_segments=num_tokens)


class Experts(nnx.Module):
    """Routed experts stacked along E: w1 (gate) [E, D, F], w3 (up) [E, D, F], w2 (down) [E, F, D]."""

    def __init__(self, cfg: ModelConfig, dtype, keys: KeyChain, rt: RuntimeConfig | None = None):
        self.limit = cfg.swiglu_limit
        self.rt = rt
        e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.w1 = param(keys, (e, d, f), ("experts", "embed", "expert_hidden"), dtype, normal(0.02))
        self.w3 = param(keys, (e, d, f), ("experts", "embed", "expert_hidden"), dtype, normal(0.02))
        self.w2 = param(keys, (e, f, d), ("experts", "expert_hidden", "embed"), dtype, normal(0.02))

    def __call__(self, x: jax.Array, weights: jax.Array, idx: jax.Array) -> jax.Array:
        """x [N, D], weights/idx [N, K] -> [N, D] float32; every (token, choice) pair is computed.

        With a mesh whose expert axes have more than one device (`rt.mesh`, `rt.strategy`), the
        experts run expert-parallel (`sharding.expert_parallel`); otherwise on one device here.
        """
        plan = self._expert_parallel()
        if plan is not None:
            values = (w.get_value() for w in (self.w1, self.w3, self.w2))
            return plan(x, weights, idx, *values, self.limit)
        w1, w3, w2 = (materialize(w.get_value()) for w in (self.w1, self.w3, self.w2))
        order, rows, group_sizes = sort_by_expert(idx, w1.shape[0])
        y = expert_ffn(x[rows], w1, w3, w2, group_sizes, self.limit)
        return combine(y, order, rows, weights, x.shape[0])

    def _expert_parallel(self):
        """The expert-parallel plan of this runtime's mesh, or None (no mesh, or experts not split)."""
        if self.rt is None or self.rt.mesh is None:
            return None
        from sharding.expert_parallel import ExpertParallel  # sharding imports dsv4: import when used

        return ExpertParallel.plan(self.rt.mesh, self.rt.strategy)


class SharedExpert(nnx.Module):
    """The always-on expert: w2 . clamped_swiglu(w1 . x, w3 . x)."""

    def __init__(self, cfg: ModelConfig, dtype, keys: KeyChain):
        self.limit = cfg.swiglu_limit
        d, f = cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts
        self.w1 = Linear(d, f, ("embed", "expert_hidden"), dtype, keys)
        self.w3 = Linear(d, f, ("embed", "expert_hidden"), dtype, keys)
        self.w2 = Linear(f, d, ("expert_hidden", "embed"), dtype, keys)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = self.w1(x).astype(F32), self.w3(x).astype(F32)
        return self.w2(clamped_swiglu(gate, up, self.limit).astype(x.dtype))


class Gate(nnx.Module):
    """Router parameters: `weight` [D, E]; `bias` [E] (top-k layers) or `tid2eid` [V, K] (hash layers).

    With `report` (training, top-k layers) each call sows the `nnx.Intermediate` "routing":
    (affinities s / sum_j s_j [N, E] float32, selected expert ids [N, K] int32), the inputs of the
    sequence-wise balance loss (`dsv4.train.seq_balance_loss`).
    """

    def __init__(self, cfg: ModelConfig, hashed: bool, dtype, keys: KeyChain, report: bool = False):
        self.cfg, self.hashed, self.report = cfg, hashed, report and not hashed
        self.weight = param(
            keys, (cfg.hidden_size, cfg.n_routed_experts), ("embed", "router_experts"), dtype, normal(0.02)
        )
        if hashed:
            table = jax.random.randint(
                keys(), (cfg.vocab_size, cfg.num_experts_per_tok), 0, cfg.n_routed_experts, jnp.int32
            )
            self.tid2eid = Buffer(table, axes=("vocab", "expert_slot"))
        else:
            self.bias = param(keys, (cfg.n_routed_experts,), ("router_experts",), F32, constant(0.0))

    def __call__(self, x: jax.Array, token_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [N, D], token_ids [N] -> (weights [N, K], expert ids [N, K])."""
        logits = jnp.matmul(x.astype(F32), self.weight.get_value().astype(F32))
        cfg = self.cfg
        if self.hashed:
            return route(
                logits,
                cfg.num_experts_per_tok,
                cfg.routed_scaling_factor,
                hashed=self.tid2eid.get_value()[token_ids],
            )
        weights, idx = route(logits, cfg.num_experts_per_tok, cfg.routed_scaling_factor, bias=self.bias.get_value())
        if self.report:
            scores = router_scores(logits)  # [N, E]; the same values route selected from
            self.sow(nnx.Intermediate, "routing", (scores / jnp.sum(scores, axis=-1, keepdims=True), idx))
        return weights, idx


class MoE(nnx.Module):
    """y = sum_k w_k * expert_k(x) + shared_expert(x); no token is dropped."""

    def __init__(self, cfg: ModelConfig, rt: RuntimeConfig, hashed: bool, keys: KeyChain):
        dtype = rt.jnp_dtype
        self.gate = Gate(cfg, hashed, dtype, keys, report=rt.train_stats)
        self.experts = Experts(cfg, dtype, keys, rt)
        self.shared_experts = SharedExpert(cfg, dtype, keys) if cfg.n_shared_experts else None

    def __call__(self, x: jax.Array, token_ids: jax.Array) -> jax.Array:
        """x [B, S, D], token_ids [B, S] -> [B, S, D]."""
        b, s, d = x.shape
        flat = x.reshape(b * s, d)
        weights, idx = self.gate(flat, token_ids.reshape(-1))
        record(self, "expert_ids", idx.reshape(b, s, -1))
        record(self, "expert_weights", weights.reshape(b, s, -1))
        y = self.experts(flat, weights, idx)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat).astype(F32)
        return y.astype(x.dtype).reshape(b, s, d)
