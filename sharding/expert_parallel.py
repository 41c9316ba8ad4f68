"""Expert-parallel routed experts: tokens meet their experts across the mesh's expert axes.

Inside `jax.shard_map` every device holds E_l = E / ep of the experts (ep: the product of the mesh
axes the `experts` logical axis maps to) and its block of the tokens. Every (token, choice) pair is
computed exactly once, by `dsv4.moe.expert_ffn` over the device's local experts (`jax.lax.ragged_dot`;
on CPU its loop over row tiles); nothing is dropped.
Two ways to bring tokens and experts together (the strategy's `moe` field):

psum: the tokens are replicated over the expert axes (dp_ep, tp_ep), so every expert device already
  holds every token of its data shard. Each applies its own experts to the pairs that chose them
  and one psum over the expert axes adds the partial outputs. Nothing is dispatched; the psum (an
  all-reduce of [n, D] float32) is the whole exchange.

all_to_all: the tokens are split over the expert axes (dp_ep_a2a; or, for replicated tokens, each
  device takes 1/ep of them and an all_gather restores them afterwards). Each device sends each of
  its tokens once to every device that holds one of its chosen experts, with the local expert ids
  and routing weights; the receiver applies its experts, adds the token's contributions, and the
  sums travel back. Two exchanges, picked by backend (`exchange_for`):
  - ragged: `jax.lax.ragged_all_to_all` moves exactly the rows that must move (GPU, TPU);
  - padded: `jax.lax.all_to_all` of a fixed [ep, n, D] buffer with a slot for every (device, token),
    the worst case, so no token can overflow a capacity (CPU: XLA:CPU has no ragged-all-to-all).

Letters: n local tokens, K choices per token, D hidden, E_l local experts, R rows received.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dsv4.quantized import materialize
from sharding.mesh import axis_size
from sharding.rules import Strategy, check_expert_exchange, get_strategy

EXCHANGES = ("ragged", "padded")
_RAGGED_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")


def exchange_for(platform: str) -> str:
    """The token exchange for a backend: ragged where XLA implements ragged-all-to-all (GPU, TPU), else padded."""
    return "ragged" if platform.lower() in _RAGGED_PLATFORMS else "padded"


# --------------------------------------------------------------------------- the per-device math


def local_expert_ffn(x, ids, weights, w1, w3, w2, limit):
    """Apply this device's experts: x [R, D], ids [R, K] local expert or -1, weights [R, K] -> [R, D] f32.

    Pairs with id -1 (expert elsewhere, or padding) are sorted past the last group: ragged_dot never
    reads them and they are zeroed before the weighted sum.
    """
    from dsv4.moe import combine, expert_ffn, sort_by_expert

    e_local = w1.shape[0]
    key = jnp.where(ids >= 0, ids, e_local)  # [R, K]
    order, rows, sizes = sort_by_expert(key, e_local + 1)
    y = expert_ffn(x[rows], w1, w3, w2, sizes[:e_local], limit)  # [R*K, D]
    valid = (key.reshape(-1) < e_local)[order]
    y = jnp.where(valid[:, None], y, 0.0)
    return combine(y, order, rows, jnp.where(ids >= 0, weights, 0.0), x.shape[0])


def _exclusive_cumsum(x: jax.Array, axis: int = 0) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def _padded_exchange(x, weights, dest, local, valid, ep, axes, ffn):
    """all_to_all with a slot for every (device, token): x [n, D] -> this device's tokens' outputs [n, D]."""
    n, d = x.shape
    k = dest.shape[1]
    mine = (dest[None] == jnp.arange(ep)[:, None, None]) & valid[None, :, None]  # [ep, n, K]
    ids = jnp.where(mine, local[None], -1)  # [ep, n, K]
    w = jnp.where(mine, weights[None], 0.0)
    xs = jnp.where(jnp.any(mine, axis=-1)[..., None], x[None], jnp.zeros((), x.dtype))  # [ep, n, D]
    swap = functools.partial(jax.lax.all_to_all, axis_name=axes, split_axis=0, concat_axis=0, tiled=True)
    rx, rids, rw = swap(xs), swap(ids), swap(w)  # [ep, n, ...]: row block s came from device s
    y = ffn(rx.reshape(ep * n, d), rids.reshape(ep * n, k), rw.reshape(ep * n, k))
    back = swap(y.reshape(ep, n, d))  # [ep, n, D]: block s = device s's experts' sum for my tokens
    return jnp.sum(back, axis=0)


def _ragged_exchange(x, weights, dest, local, valid, ep, axes, ffn, ragged_all_to_all):
    """ragged_all_to_all of exactly the (token, device) rows that must move: x [n, D] -> [n, D]."""
    n, d = x.shape
    me = jax.lax.axis_index(axes)
    hit = jnp.any(dest[None] == jnp.arange(ep)[:, None, None], axis=-1) & valid[None]  # [ep, n]
    device_of = jnp.repeat(jnp.arange(ep), n)  # [ep*n] device-major
    order = jnp.argsort(jnp.where(hit.reshape(-1), device_of, ep), stable=True)  # hits first, by device
    tok, dev = order % n, order // n  # [ep*n] token and destination of each send row
    here = dest[tok] == dev[:, None]  # [ep*n, K]: choice k of the row's token lives on its destination
    send_ids, send_w = jnp.where(here, local[tok], -1), jnp.where(here, weights[tok], 0.0)
    counts = jnp.sum(hit, axis=1).astype(jnp.int32)  # [ep] rows to each device
    table = jax.lax.all_gather(counts, axes)  # [ep source, ep destination]
    in_off, recv = _exclusive_cumsum(counts), table[:, me]
    out_off = _exclusive_cumsum(table, axis=0)[me]  # where my rows land on each destination
    recv_off = _exclusive_cumsum(recv)
    rows = ep * n  # worst case: every token to every device

    def move(a, fill, offsets, sizes, dst_offsets, dst_sizes):
        out = jnp.full((rows,) + a.shape[1:], fill, a.dtype)
        return ragged_all_to_all(a, out, offsets, sizes, dst_offsets, dst_sizes, axis_name=axes)

    rx = move(x[tok], 0, in_off, counts, out_off, recv)
    rids = move(send_ids, -1, in_off, counts, out_off, recv)
    rw = move(send_w, 0, in_off, counts, out_off, recv)
    y = ffn(rx, rids, rw)  # [rows, D]; rows past the received ones have ids -1 -> 0
    back_off = _exclusive_cumsum(table, axis=1)[:, me]  # where each source keeps its rows for me
    back = move(y, 0, recv_off, recv, back_off, counts)  # [rows, D] in my send order
    back = jnp.where((jnp.arange(rows) < jnp.sum(counts))[:, None], back, 0.0)
    return jax.ops.segment_sum(back, tok, num_segments=n)


# ------------------------------------------------------------------------------ the shard_map plan


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """How the routed experts run on a mesh: which axes split tokens and experts, and the exchange.

    token_axes: mesh axes (size > 1) the tokens are split over; expert_axes: those the experts are.
    mode: "psum" | "all_to_all"; exchange: "ragged" | "padded" (all_to_all only).
    """

    mesh: Mesh
    token_axes: tuple[str, ...]
    expert_axes: tuple[str, ...]
    mode: str
    exchange: str

    @classmethod
    def plan(cls, mesh: Mesh | None, strategy: str | Strategy | None, exchange: str | None = None):
        """The plan for `strategy` on `mesh`, or None when the experts are not split (ep == 1)."""
        if mesh is None:
            return None
        strat = get_strategy(strategy)
        experts, tokens = strat.mesh_axes("experts", mesh), strat.mesh_axes("batch", mesh)
        if not experts:
            return None
        check_expert_exchange(strat, mesh)
        exchange = exchange or exchange_for(mesh.devices.flat[0].platform)
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
        return cls(mesh, tokens, experts, strat.moe, exchange)

    @property
    def ep(self) -> int:
        """Devices the experts are split over."""
        return axis_size(self.mesh, self.expert_axes)

    @property
    def tokens_split(self) -> bool:
        """Whether each expert device holds different tokens (else they are replicated over experts)."""
        return bool(set(self.expert_axes) & set(self.token_axes))

    def __call__(self, x, weights, idx, w1, w3, w2, limit, ragged_all_to_all=None):
        """x [N, D], weights/idx [N, K], stacked expert weights [E, ...] -> [N, D] float32.

        `ragged_all_to_all` replaces `jax.lax.ragged_all_to_all` (tests emulate it on CPU).
        """
        ragged_all_to_all = ragged_all_to_all or jax.lax.ragged_all_to_all
        if set(self.expert_axes) <= set(jax.sharding.get_abstract_mesh().manual_axes):
            # already per device (`sharding.placement.per_device`): x, idx and weights are local
            return self._body(x, weights, idx.astype(jnp.int32), w1, w3, w2, limit=limit,
                              ragged_all_to_all=ragged_all_to_all)  # fmt: skip
        tok = P(self.token_axes or None)
        exp = P(self.expert_axes)
        body = functools.partial(self._body, limit=limit, ragged_all_to_all=ragged_all_to_all)
        fn = jax.shard_map(
            body, mesh=self.mesh, in_specs=(tok, tok, tok, exp, exp, exp), out_specs=tok, check_vma=False
        )
        n, idx = x.shape[0], idx.astype(jnp.int32)
        pad = -n % axis_size(self.mesh, self.token_axes)  # B x S need not divide the split
        if not pad:
            return fn(x, weights, idx, w1, w3, w2)
        x, weights, idx = (jnp.pad(a, ((0, pad), (0, 0))) for a in (x, weights, idx))
        return fn(x, weights, idx, w1, w3, w2)[:n]  # padded rows: expert 0 at weight 0, then dropped

    def _body(self, x, weights, idx, w1, w3, w2, *, limit, ragged_all_to_all):
        """Per device: x [n, D], weights/idx [n, K], local experts [E_l, ...] -> [n, D] float32."""
        w1, w3, w2 = materialize(w1), materialize(w3), materialize(w2)
        e_local = w1.shape[0]
        ffn = functools.partial(local_expert_ffn, w1=w1, w3=w3, w2=w2, limit=limit)
        if self.mode == "psum":
            local = idx - jax.lax.axis_index(self.expert_axes) * e_local
            ids = jnp.where((local >= 0) & (local < e_local), local, -1)
            return jax.lax.psum(ffn(x, ids, weights), self.expert_axes)
        x = x.astype(w1.dtype)  # what expert_ffn casts to first: the same numbers, fewer bytes to send
        return self._all_to_all(x, weights, idx, e_local, ffn, ragged_all_to_all)

    def _all_to_all(self, x, weights, idx, e_local, ffn, ragged_all_to_all):
        """Dispatch to the expert owners and back; replicated tokens are split first and gathered after."""
        ep, axes = self.ep, self.expert_axes
        n_all = x.shape[0]
        valid = jnp.ones((n_all,), bool)
        if not self.tokens_split:  # take this device's 1/ep of the (replicated) tokens
            n = -(-n_all // ep)
            pad = ((0, n * ep - n_all), (0, 0))
            start = jax.lax.axis_index(axes) * n
            x, weights, idx = (jax.lax.dynamic_slice_in_dim(jnp.pad(a, pad), start, n) for a in (x, weights, idx))
            valid = jax.lax.dynamic_slice_in_dim(jnp.arange(n * ep) < n_all, start, n)
        dest, local = idx // e_local, idx % e_local
        if self.exchange == "ragged":
            y = _ragged_exchange(x, weights, dest, local, valid, ep, axes, ffn, ragged_all_to_all)
        else:
            y = _padded_exchange(x, weights, dest, local, valid, ep, axes, ffn)
        if not self.tokens_split:
            y = jax.lax.all_gather(y, axes, tiled=True)[:n_all]
        return y


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """`jax.lax.ragged_all_to_all` (one slice per device) built from all_gather: for tests on CPU.

    Gathers every device's operand and offsets and copies, for each source s, its slice for this
    device to where s said it goes. Same result as the real collective; ep times the traffic.
    """
    del recv_sizes
    me = jax.lax.axis_index(axis_name)
    ops = jax.lax.all_gather(operand, axis_name)  # [ep, rows, ...]
    starts, sizes, dsts = (jax.lax.all_gather(a, axis_name)[:, me] for a in (input_offsets, send_sizes, output_offsets))
    j = jnp.arange(operand.shape[0])
    for s in range(ops.shape[0]):
        src = jnp.take(ops[s], jnp.clip(starts[s] + j, 0, operand.shape[0] - 1), axis=0)
        pos = jnp.where(j < sizes[s], dsts[s] + j, output.shape[0])  # out of range -> dropped
        output = output.at[pos].set(src, mode="drop")
    return output
