"""Lightning-indexer scoring with a streaming top-k (architecture.md s5).

Letters: B batch, S queries, I indexer heads, J indexer head dim, T compressed keys, k selected.

I(t, s) = sum_h w[t, h] * relu(q[t, h] . key[s]) over the keys visible at the query position
(s < (pos + 1) // ratio); each query keeps the k best. The kernel scores one chunk of keys at a
time and merges it into a running top-k held in the kernel, so no [S, T] score row ever reaches
memory. Slots beyond the visible count hold -1. The order is that of `jax.lax.top_k`: by score,
descending, in IEEE total order (+0 above -0), ties to the lower index; so on random inputs the
kernel returns exactly the reference's indices (up to rounding-order differences of the score sums).

Per chunk of bt >= kp keys (kp = k rounded up to a power of two): score the chunk
([bq * I, J] x [J, bt] matmuls, relu, head-weighted sum), sort it worst-first with a bitonic
network on (score, index) keys, keep its best kp, take the element-wise better of that and the
running best-first list (which is the top kp of both, in bitonic order), and bitonic-merge it back
to best-first. The compare-exchange partner x[i ^ d] is a reshape/split on GPU (Triton) and two
lane rotations on TPU (Mosaic).

GPU form: grid (B, S / bq); the chunk loop runs inside the kernel up to the last chunk any query of
the block can see. TPU form: grid (B, S / bq, T / bt) with the running top-k in VMEM scratch; the
key index map clamps to the block's last visible chunk (scalar-prefetched), so later chunks are
neither fetched nor scored. The top-k has no gradient: inputs pass through `stop_gradient`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import (
    F32,
    FLOAT_DTYPES,
    cdiv,
    check_dtype,
    check_positive,
    check_shape,
    gpu_compiler_params,
    interpret_param,
    min_dot,
    next_pow2,
    pad_axis,
    resolve_backend,
    round_up,
    xor_partner,
)

INT_MAX = jnp.iinfo(jnp.int32).max


@dataclasses.dataclass(frozen=True)
class IndexerTopkBlocks:
    """Block sizes. block_q: queries per grid step. block_t: keys per chunk (raised to k rounded up
    to a power of two). block_h: indexer heads per score matmul (bounds the [bq*block_h, bt] tile).
    num_warps, num_stages: Triton launch parameters."""

    block_q: int = 1
    block_t: int = 16
    block_h: int = 16
    num_warps: int = 8
    num_stages: int = 2

    @classmethod
    def for_backend(cls, backend: str) -> IndexerTopkBlocks:
        """Default blocks for `backend`: tuned for TPU and for a compiled GPU; the small defaults otherwise."""
        if backend == "tpu":
            return cls(block_q=8, block_t=512, block_h=64)
        if backend == "gpu" and jax.default_backend() in ("gpu", "cuda", "rocm"):
            return cls(block_q=2, block_t=128, block_h=16)
        return cls()  # interpret mode


# --------------------------------------------------------------------------------------- reference


def indexer_topk_reference(q, keys, weights, positions, ratio: int, k: int) -> jax.Array:
    """Pure-jnp reference: dense scores [B, S, T], causal mask, lax.top_k. Returns [B, S, min(k, T)]."""
    b, s = positions.shape
    t = keys.shape[1]
    k = min(k, t)
    if k == 0:
        return jnp.zeros((b, s, 0), jnp.int32)
    dots = jnp.einsum("bsij,btj->bsit", q.astype(F32), keys.astype(F32))
    scores = jnp.einsum("bsit,bsi->bst", jax.nn.relu(dots), weights.astype(F32))
    visible = ((positions + 1) // ratio)[..., None]  # [B, S, 1]
    scores = jnp.where(jnp.arange(t) < visible, scores, -jnp.inf)
    idx = jax.lax.top_k(scores, k)[1]
    return jnp.where(idx < visible, idx, -1).astype(jnp.int32)


# ---------------------------------------------------------------------------------- sorting network


def _order_key(scores: jax.Array) -> jax.Array:
    """int32 keys whose signed order is the IEEE total order of float32 scores (-0 below +0)."""
    bits = jax.lax.bitcast_convert_type(scores, jnp.int32)
    return jnp.where(bits < 0, bits ^ INT_MAX, bits)


NEG_KEY = -2139095041  # _order_key(-inf)


def _compare_exchange(v, i, d, best_first, partner):
    """One network stage on [R, n]: pair lane l with l ^ d; in blocks where `best_first` is set
    the lower lane takes the better (score desc, index asc) element, elsewhere the worse."""
    pv, pi = partner(v, d), partner(i, d)
    lane = jax.lax.broadcasted_iota(jnp.int32, v.shape, 1)
    self_better = (v > pv) | ((v == pv) & (i < pi))
    keep = self_better == (((lane & d) == 0) == best_first)
    return jnp.where(keep, v, pv), jnp.where(keep, i, pi)


def _bitonic_sort(v, i, best_first: bool, partner):
    n = v.shape[1]
    lane = jax.lax.broadcasted_iota(jnp.int32, v.shape, 1)
    size = 2
    while size <= n:
        block_best_first = ((lane & size) == 0) == best_first  # alternate, final pass all one way
        d = size // 2
        while d >= 1:
            v, i = _compare_exchange(v, i, d, block_best_first, partner)
            d //= 2
        size *= 2
    return v, i


def _bitonic_merge_best_first(v, i, partner):
    d = v.shape[1] // 2
    while d >= 1:
        v, i = _compare_exchange(v, i, d, True, partner)
        d //= 2
    return v, i


def _merge_chunk(run_v, run_i, chunk_v, chunk_i, partner):
    """Running best-first [R, kp] + unsorted chunk [R, bt] (bt >= kp) -> best-first top kp of both."""
    kp, bt = run_v.shape[1], chunk_v.shape[1]
    chunk_v, chunk_i = _bitonic_sort(chunk_v, chunk_i, False, partner)  # worst-first
    if bt > kp:  # its best kp are the last kp lanes
        chunk_v, chunk_i = jnp.split(chunk_v, bt // kp, axis=1)[-1], jnp.split(chunk_i, bt // kp, axis=1)[-1]
    better = (chunk_v > run_v) | ((chunk_v == run_v) & (chunk_i < run_i))
    v, i = jnp.where(better, chunk_v, run_v), jnp.where(better, chunk_i, run_i)  # bitonic
    return _bitonic_merge_best_first(v, i, partner)


def _chunk_keys(scores, first: int | jax.Array, vis):
    """Order keys and global indices of a chunk of scores [R, bt]; keys >= vis [R, 1] are masked."""
    cols = first + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
    v = jnp.where(cols < vis, _order_key(scores + 0.0), NEG_KEY)  # + 0.0 turns -0 into +0
    return v, cols


# ------------------------------------------------------------------------------------------ kernels


def _gpu_kernel(q_ref, w_ref, vis_ref, keys_ref, o_ref, *, bt: int, hs: int):
    """Grid step (b, query block). q [bq, Ip, Jp]; w [bq, Ip]; vis [bq, 1]; keys [Tp, Jp];
    out [bq, kp] int32."""
    bq, n_heads, jp = q_ref.shape
    kp = o_ref.shape[1]
    vis = vis_ref[...]  # [bq, 1]
    partner = xor_partner("gpu")

    def chunk(c, carry):
        keys = keys_ref[pl.ds(c * bt, bt), :]  # [bt, Jp]
        scores = jnp.zeros((bq, bt), F32)
        for h0 in range(0, n_heads, hs):
            qh = q_ref[:, pl.ds(h0, hs), :].reshape(bq * hs, jp)
            dots = jax.lax.dot_general(qh, keys, (((1,), (1,)), ((), ())), preferred_element_type=F32)
            relu = jnp.maximum(dots, 0.0).reshape(bq, hs, bt)
            scores = scores + jnp.sum(relu * w_ref[:, pl.ds(h0, hs)][:, :, None], axis=1)
        v, i = _chunk_keys(scores, c * bt, vis)
        return _merge_chunk(*carry, v, i, partner)

    init = (jnp.full((bq, kp), NEG_KEY, jnp.int32), jnp.full((bq, kp), INT_MAX, jnp.int32))
    n_chunks = jax.lax.div(jnp.max(vis) + bt - 1, bt)
    _, run_i = jax.lax.fori_loop(0, n_chunks, chunk, init)
    o_ref[...] = jnp.where(run_i < vis, run_i, -1)


def _tpu_kernel(last_ref, q_ref, w_ref, vis_ref, keys_ref, o_ref, run_v, run_i, scores_ref):
    """Grid step (b, query block j, key chunk c). last [B, nq] (SMEM): the block's last visible
    chunk. q [bq, Ip, Jp]; w [bq, Ip]; vis [bq, 1]; keys [bt, Jp]; out [bq, kp]; scratch run_v,
    run_i [bq, kp] int32, scores [bq, bt] f32."""
    b, j, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bt = scores_ref.shape
    vis = vis_ref[...]

    @pl.when(c == 0)
    def _init():
        run_v[...] = jnp.full(run_v.shape, NEG_KEY, jnp.int32)
        run_i[...] = jnp.full(run_i.shape, INT_MAX, jnp.int32)

    @pl.when(c <= last_ref[b, j])
    def _score_and_merge():
        keys = keys_ref[...]
        for qi in range(bq):
            dots = jax.lax.dot_general(q_ref[qi], keys, (((1,), (1,)), ((), ())), preferred_element_type=F32)
            w = w_ref[pl.ds(qi, 1), :].astype(F32)  # [1, Ip]
            scores_ref[pl.ds(qi, 1), :] = jnp.dot(w, jnp.maximum(dots, 0.0), preferred_element_type=F32)
        v, i = _chunk_keys(scores_ref[...], c * bt, vis)
        run_v[...], run_i[...] = _merge_chunk(run_v[...], run_i[...], v, i, xor_partner("tpu"))

    @pl.when(c == pl.num_programs(2) - 1)
    def _write():
        o_ref[...] = jnp.where(run_i[...] < vis, run_i[...], -1)


# ---------------------------------------------------------------------------------------- launch


def _launch(q, keys, weights, vis, k: int, blocks: IndexerTopkBlocks, backend: str, interpret: bool):
    b, s, n_heads, jdim = q.shape
    t = keys.shape[1]
    kp = next_pow2(k)
    bt = max(kp, min(next_pow2(blocks.block_t), next_pow2(t)))
    bq = blocks.block_q
    jp = round_up(jdim, 128) if backend == "tpu" else next_pow2(jdim)
    hs = min(blocks.block_h, n_heads)
    if backend == "gpu":  # Triton: power-of-two tiles, every dot dimension >= 16 ([bq * hs, jp] x [bt, jp])
        least = min_dot(interpret)
        hs = max(next_pow2(hs), next_pow2(cdiv(least, bq)))
        bt, jp = max(bt, least), max(jp, least)
    tp = round_up(t, bt)
    ip = round_up(n_heads, hs)  # padded heads have q = 0 and w = 0
    sp = round_up(s, bq)
    q = pad_axis(pad_axis(pad_axis(q, 1, sp), 2, ip), 3, jp)
    w = pad_axis(pad_axis(weights.astype(F32), 1, sp), 2, ip)
    vis = pad_axis(vis, 1, sp)[:, :, None]  # padded queries see nothing
    keys = pad_axis(pad_axis(keys, 1, tp), 2, jp)
    out_shape = jax.ShapeDtypeStruct((b, sp, kp), jnp.int32)
    if backend == "tpu":
        last = jnp.max(jax.lax.div(vis[:, :, 0] + bt - 1, bt).reshape(b, sp // bq, bq), axis=-1) - 1
        last = jnp.maximum(last, 0).astype(jnp.int32)  # [B, nq]
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, sp // bq, tp // bt),
            in_specs=[
                pl.BlockSpec((None, bq, ip, jp), lambda b_, j, c, last_: (b_, j, 0, 0)),
                pl.BlockSpec((None, bq, ip), lambda b_, j, c, last_: (b_, j, 0)),
                pl.BlockSpec((None, bq, 1), lambda b_, j, c, last_: (b_, j, 0)),
                pl.BlockSpec((None, bt, jp), lambda b_, j, c, last_: (b_, jnp.minimum(c, last_[b_, j]), 0)),
            ],
            out_specs=pl.BlockSpec((None, bq, kp), lambda b_, j, c, last_: (b_, j, 0)),
            scratch_shapes=[
                pltpu.VMEM((bq, kp), jnp.int32),
                pltpu.VMEM((bq, kp), jnp.int32),
                pltpu.VMEM((bq, bt), F32),
            ],
        )
        out = pl.pallas_call(
            _tpu_kernel,
            out_shape=out_shape,
            grid_spec=grid_spec,
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=interpret_param("tpu", interpret),
            name="indexer_topk",
        )(last, q, w, vis, keys)
    else:
        out = pl.pallas_call(
            functools.partial(_gpu_kernel, bt=bt, hs=hs),
            out_shape=out_shape,
            grid=(b, sp // bq),
            in_specs=[
                pl.BlockSpec((None, bq, ip, jp), lambda b_, j: (b_, j, 0, 0)),
                pl.BlockSpec((None, bq, ip), lambda b_, j: (b_, j, 0)),
                pl.BlockSpec((None, bq, 1), lambda b_, j: (b_, j, 0)),
                pl.BlockSpec((None, tp, jp), lambda b_, j: (b_, 0, 0)),
            ],
            out_specs=pl.BlockSpec((None, bq, kp), lambda b_, j: (b_, j, 0)),
            compiler_params=None if interpret else gpu_compiler_params(blocks.num_warps, blocks.num_stages),
            interpret=interpret_param("gpu", interpret),
            name="indexer_topk",
        )(q, w, vis, keys)
    return out[:, :s, :k]


# ----------------------------------------------------------------------------------------- wrapper


@functools.partial(jax.jit, static_argnames=("ratio", "k", "blocks", "backend", "interpret"))
def indexer_topk(
    q: jax.Array,
    keys: jax.Array,
    weights: jax.Array,
    positions: jax.Array,
    ratio: int,
    k: int,
    *,
    blocks: IndexerTopkBlocks | None = None,
    backend: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Top-k compressed entries per query; the arguments of `dsv4.attention.indexer_topk` minus `block`.

    q [B, S, I, J] (RoPE applied); keys [B, T, J]; weights [B, S, I] (scales folded in);
    positions [B, S] int32 (>= 0); ratio: compression ratio; k: entries to keep. backend: "gpu" |
    "tpu" | "reference" | None (from `jax.default_backend()`); interpret runs the kernel in the
    Pallas interpreter. Returns int32 [B, S, min(k, T)], best first, -1 beyond the visible count.
    """
    check_shape("q", q, (None, None, None, None), "[B, S, I, J]")
    b, s, n_heads, jdim = q.shape
    check_dtype("q", q, FLOAT_DTYPES)
    check_shape("keys", keys, (b, None, jdim), "[B, T, J]")
    check_dtype("keys", keys, (q.dtype,))
    check_shape("weights", weights, (b, s, n_heads), "[B, S, I]")
    check_dtype("weights", weights, FLOAT_DTYPES)
    check_shape("positions", positions, (b, s), "[B, S]")
    check_dtype("positions", positions, (jnp.int32,))
    check_positive("ratio", ratio)
    check_positive("k", k)
    backend = resolve_backend(backend, interpret)
    blocks = blocks or IndexerTopkBlocks.for_backend(backend)
    if not isinstance(blocks, IndexerTopkBlocks):
        raise ValueError(f"blocks: expected IndexerTopkBlocks, got {type(blocks).__name__}")
    for name in ("block_q", "block_t", "block_h", "num_warps", "num_stages"):
        check_positive(f"blocks.{name}", getattr(blocks, name))
    if backend == "gpu" and blocks.block_q & (blocks.block_q - 1):
        raise ValueError(f"blocks.block_q: the GPU form needs a power of two, got {blocks.block_q}")
    q, keys, weights = (jax.lax.stop_gradient(a) for a in (q, keys, weights))
    t = keys.shape[1]
    if backend == "reference" or min(k, t) == 0 or s == 0:
        return indexer_topk_reference(q, keys, weights, positions, ratio, k)
    vis = jnp.minimum((positions + 1) // ratio, t).astype(jnp.int32)
    return _launch(q, keys, weights, vis, min(k, t), blocks, backend, interpret)
