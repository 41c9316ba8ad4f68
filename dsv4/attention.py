"""Shared-KV attention with sliding window, compressors (HCA, CSA) and the lightning indexer.

Letters: B batch, S sequence (queries), Q query block, H heads, K head dim, T compressed entries,
N selected entries per query (top-k), W sliding window, I indexer heads, J indexer head dim.

Three implementations of the attention core share every projection:
- "xla" (default): query blocks under `lax.map`. Each block reads its W-wide slice of the sliding
  window, and either gathers its top-k compressed entries (CSA; while T <= DENSE_SELECTION * N it
  reads all T under the mask of its selection instead) or reads all entries under a causal mask
  (HCA). Memory is O(S*W + Q*(W+N)); no [S, S] or [S, S/4] array exists.
- "reference": dense masks over the whole sequence, as simple as possible; for tests.
- "pallas": the kernels of `pallas_kernels/` (sparse attention, indexer top-k), each with its own
  reference there; interpret mode on CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from dsv4.cache import CompressorState, DenseStore, LayerCache, _scatter_rows
from dsv4.config import ModelConfig, RuntimeConfig
from dsv4.layers import F32, Linear, RMSNorm, apply_rope, rms_norm, rope_angles, rope_inv_freq
from dsv4.params import KeyChain, constant, normal, param
from dsv4.probes import record
from dsv4.quantized import materialize
from dsv4.selection import top_k_ascending

NEG_INF = -jnp.inf


# ----------------------------------------------------------------------------------------- compressor


def pool_windows(c: jax.Array, z: jax.Array, overlap: bool) -> jax.Array:
    """Gated softmax pooling of complete windows.

    c, z: [B, T, m, C] values and gate logits (ape already added) of T windows of m tokens.
    Without overlap (HCA) C = d and entry w = sum_t softmax_t(z) * c over its own window.
    With overlap (CSA) C = 2d: series A = [:d], B = [d:]; entry w pools 2m slots, the A-series of
    window w-1 and the B-series of window w; window 0 has no A slots (value 0, logit -inf).
    Returns [B, T, d] in float32.
    """
    if overlap:
        d = c.shape[-1] // 2
        prev_c = jnp.pad(c[:, :-1, :, :d], ((0, 0), (1, 0), (0, 0), (0, 0)))
        prev_z = jnp.pad(z[:, :-1, :, :d], ((0, 0), (1, 0), (0, 0), (0, 0)), constant_values=NEG_INF)
        c = jnp.concatenate([prev_c, c[..., d:]], axis=2)  # [B, T, 2m, d]
        z = jnp.concatenate([prev_z, z[..., d:]], axis=2)
    z = z.astype(F32)
    empty = jnp.all(z == NEG_INF, axis=2, keepdims=True)  # a window with no token yet (never emitted)
    z = jnp.where(empty, 0.0, z)  # finite there, so no NaN in gradients
    # softmax over the window axis m, written out: the weighted sum as a batched dot over m (XLA:CPU
    # runs a multiply + reduce over this non-minor axis several times slower than the dot)
    e = jnp.exp(z - jax.lax.stop_gradient(jnp.max(z, axis=2, keepdims=True)))
    return jnp.einsum("btmc,btmc->btc", e, c.astype(F32)) / jnp.sum(e, axis=2)


class Compressor(nnx.Module):
    """Turns every complete window of `ratio` tokens into one `dim`-wide entry (architecture.md s4)."""

    def __init__(self, cfg: ModelConfig, dim: int, ratio: int, overlap: bool, dtype, keys: KeyChain):
        self.cfg, self.ratio, self.overlap = cfg, ratio, overlap
        width = dim * (2 if overlap else 1)
        d = cfg.hidden_size
        self.wkv = Linear(d, width, ("embed", "compress_dim"), dtype, keys)
        self.wgate = Linear(d, width, ("embed", "compress_dim"), dtype, keys)
        self.ape = param(keys, (ratio, width), ("compress_slot", "compress_dim"), F32, normal(0.02))
        self.norm = RMSNorm(dim, cfg.rms_norm_eps, keys, axis="kv_dim")

    @property
    def history(self) -> int:
        """Raw tokens kept between calls: the window filling now, plus the previous one for CSA."""
        return self.ratio * (2 if self.overlap else 1)

    def empty_state(self, batch: int, rows: int, dtype) -> CompressorState:
        """A transient state holding `rows` entries in `dtype` (the whole-sequence forward uses this)."""
        width = self.ape.get_value().shape[-1]
        raw = jnp.zeros((batch, self.history, width), F32)
        dim = self.norm.weight.get_value().shape[0]
        return CompressorState(raw, raw, DenseStore(jnp.zeros((batch, rows, dim), dtype)))

    def update(self, x: jax.Array, start: jax.Array, n: jax.Array, state: CompressorState) -> CompressorState:
        """Consume a chunk and emit every window it completes.

        x [B, C, D] holds tokens at positions start[b] + i, of which the first n[b] are real.
        Window w (positions [w*m, (w+1)*m)) is emitted when its last token arrives: the entry is
        pooled, normalised, RoPE'd (compress table) at position w*m and written to row w.
        """
        m, hist = self.ratio, self.history
        b, c_len, _ = x.shape
        ape = self.ape.get_value()
        pos = start[:, None] + jnp.arange(c_len)  # [B, C]
        c = self.wkv(x).astype(F32)  # [B, C, C_w]
        z = self.wgate(x).astype(F32) + ape[pos % m]
        base = (start // m) * m - (m if self.overlap else 0)  # first position of the aligned span
        span = -(-(hist + c_len) // m) * m
        aligned_kv, aligned_gate = _align_tokens(state.raw_kv, state.raw_gate, c, z, base, start, n, span)
        windows = span // m
        pooled = pool_windows(
            aligned_kv.reshape(b, windows, m, -1), aligned_gate.reshape(b, windows, m, -1), self.overlap
        )
        w_abs = base[:, None] // m + jnp.arange(windows)  # [B, U] absolute window index
        cos, sin = rope_angles(w_abs * m, rope_inv_freq(self.cfg, compressed=True))
        entries = apply_rope(self.norm(pooled.astype(x.dtype)), cos, sin)
        last = w_abs * m + m - 1
        emit = (last >= start[:, None]) & (last < (start + n)[:, None]) & (w_abs >= 0)
        stored = state.entries.write(jnp.where(emit, w_abs, jnp.iinfo(jnp.int32).max), entries)
        keep = (jnp.arange(c_len) < n[:, None]) & (jnp.arange(c_len) >= (n - hist)[:, None])
        slots = jnp.where(keep, pos % hist, hist)  # out of range -> dropped
        return CompressorState(_scatter_rows(state.raw_kv, slots, c), _scatter_rows(state.raw_gate, slots, z), stored)


def _align_tokens(raw_kv, raw_gate, c, z, base, start, n, span):
    """Values and gate logits of positions base[b] .. base[b] + span - 1, window-aligned per row.

    Positions before `start` come from the raw ring, the next n[b] from the chunk; positions
    before 0 or past the real tokens get value 0 and logit -inf. Returns two [B, span, C_w].
    The span is one contiguous slice of [ring in position order, chunk] per row: with a gather per
    position, XLA:CPU fused the gathers into the pooling's reductions, and a CSA compressor's update
    of 4,096 tokens took 14.5 ms instead of 8.9 ms (of which 6.2 ms are its two projections).
    """
    hist, c_len = raw_kv.shape[1], c.shape[1]
    offset = base - (start - hist)  # [B] row of position base in [ring, chunk]; 0 <= offset <= hist
    tail = max(0, span - c_len)  # rows past the chunk the slice may reach
    pos = base[:, None] + jnp.arange(span)  # [B, span]
    valid = ((pos >= 0) & (pos < (start + n)[:, None]))[..., None]
    ring_order = ((start[:, None] + jnp.arange(hist)) % hist)[..., None]  # ring slot of start - hist + i

    def pick(ring, chunk, fill):
        rows = jnp.concatenate([jnp.take_along_axis(ring, ring_order, axis=1), chunk], axis=1)
        rows = jnp.pad(rows, ((0, 0), (0, tail), (0, 0)))
        cut = jax.vmap(lambda r, o: jax.lax.dynamic_slice_in_dim(r, o, span, axis=0))(rows, offset)
        return jnp.where(valid, cut, fill)

    return pick(raw_kv, c, 0.0), pick(raw_gate, z, NEG_INF)


# ------------------------------------------------------------------------------------------- indexer


FEW_QUERIES = 8  # query blocks up to this size score bfloat16 keys without converting them (decode)
# Compressed entries indexer_topk scores at a time (only the chunks a query block can see): 256
# skips more of the last, partly visible chunk than 512 (forward at S = 4,096: 2.4% faster with 4
# heads, 1.5% with 8; S = 16,384 1%); 128 was no faster than 256 (scripts/PERFORMANCE.md).
KEY_CHUNK = 256
MERGE_SPAN = 4096  # entries whose scores are gathered before one merge into the running top-k
FEW_QUERY_DOTS = 1 << 22  # float32 index dots per batch row a block of <= FEW_QUERIES queries may hold


def key_chunk(queries: int, heads: int) -> int:
    """Entries scored at a time by a block of `queries` queries of `heads` indexer heads.

    A prefill block takes KEY_CHUNK, so that it skips the chunks it cannot see. A few queries (a
    decode step) take as many entries as FEW_QUERY_DOTS allows ([B, queries, heads, chunk] float32
    dots, 16 MiB per row): one pass over every entry up to long contexts, no chunk loop.
    """
    return KEY_CHUNK if queries > FEW_QUERIES else max(KEY_CHUNK, FEW_QUERY_DOTS // (queries * heads))


def indexer_topk(
    q: jax.Array, keys: jax.Array, weights: jax.Array, positions: jax.Array, ratio: int, k: int, block: int
) -> jax.Array:
    """Top-k compressed entries per query by I(t,s) = sum_h w[t,h] * relu(q[t,h] . k[s]).

    q [B, S, I, J], keys [B, T, J], weights [B, S, I] (scales folded in), positions [B, S].
    Scores are computed `block` queries at a time. With more than `key_chunk(block, I)` entries, a
    query block scores only the chunks of that many entries its queries can see (causal: about half
    the work of scoring every entry in a prefill) and merges their scores into a running top-k,
    MERGE_SPAN entries (or one chunk, or k entries, if larger) at a time: [B, block, I, chunk] dots
    and [B, block, span] scores exist at once. Entries not yet complete at a query's position are
    excluded. A prefill block none of whose queries sees more than k entries (the first k * ratio
    positions) takes every visible entry without scoring: what scoring would select (the forward at
    S = 1,024 / 4,096: 5% / 3% faster). Returns int32 [B, S, min(k, T)]: each query's entries in
    ascending order, then -1 (invalid) in the slots beyond its visible count. The set is that of
    `lax.top_k` over all entries, ties to the lower index, whichever form computes it.
    """
    b, s = positions.shape
    t = keys.shape[1]
    k = min(k, t)
    if k == 0:
        return jnp.zeros((b, s, 0), jnp.int32)
    # selection is not differentiable; keeping tangents out also keeps the chunk loop out of autodiff
    q, keys, weights = jax.lax.stop_gradient((q, keys, weights))
    chunk_len = key_chunk(min(block, s), q.shape[2])
    if t <= chunk_len:

        def one_block(args):
            q_blk, w_blk, pos_blk = args  # [B, Q, I, J], [B, Q, I], [B, Q]
            scores = index_scores(q_blk, keys, w_blk, pos_blk, ratio)
            return _visible_entries(top_k_entries(scores, k), pos_blk, ratio)

        block_topk = one_block
    else:
        block_topk = _chunked_block_topk(keys, ratio, k, chunk_len)
    if min(block, s) > FEW_QUERIES:  # a decode step's few queries: no second branch to compile
        block_topk = _unscored_when_few_visible(block_topk, ratio, k)
    return _map_query_blocks(block_topk, (q, weights, positions), block)


def _visible_entries(idx: jax.Array, pos_blk: jax.Array, ratio: int) -> jax.Array:
    """Entry indices [B, Q, k] with those not complete at each query's position (or < 0) set to -1."""
    return jnp.where((idx >= 0) & (idx < ((pos_blk + 1) // ratio)[..., None]), idx, -1).astype(jnp.int32)


def _unscored_when_few_visible(block_topk, ratio: int, k: int):
    """`block_topk` for a query block, except that a block none of whose queries sees more than k
    entries selects every visible one without scoring them (the same set)."""
    every = jnp.arange(k, dtype=jnp.int32)

    def select(args):
        pos_blk = args[2]
        return jax.lax.cond(
            (jnp.max(pos_blk) + 1) // ratio <= k,
            lambda a: _visible_entries(jnp.broadcast_to(every, a[2].shape + (k,)), a[2], ratio),
            block_topk,
            args,
        )

    return select


def _chunked_block_topk(keys: jax.Array, ratio: int, k: int, chunk_len: int):
    """A query block's top-k over keys [B, T, J] scored `chunk_len` entries at a time (only the chunks
    the block can see). Chunks are scored into a buffer of up to MERGE_SPAN entries, merged into the
    running top-k once per buffer: each merge selects k of k + span scores, so fewer, longer merges
    do less work."""
    t = keys.shape[1]
    n_chunks = -(-t // chunk_len)
    per_span = max(min(MERGE_SPAN // chunk_len, n_chunks), -(-k // chunk_len))  # chunks per buffer (k >= 1)
    span = per_span * chunk_len  # >= k: the first buffer is selected from alone
    n_spans = -(-t // span)
    keys = jnp.pad(keys, ((0, 0), (0, n_spans * span - t), (0, 0)))

    def block_topk(args):
        q_blk, w_blk, pos_blk = args
        seen = (jnp.max(pos_blk) + 1) // ratio  # entries any query of this block can see
        needed = jnp.minimum(-(-seen // chunk_len), n_spans * per_span)  # chunks with an entry it can see

        def score(c, buf):  # chunk c (absolute) into its slot of the buffer
            offset = c * chunk_len
            chunk = jax.lax.dynamic_slice_in_dim(keys, offset, chunk_len, axis=1)
            scores = index_scores(q_blk, chunk, w_blk, pos_blk - offset * ratio, ratio)
            return jax.lax.dynamic_update_slice_in_dim(buf, scores, (c % per_span) * chunk_len, axis=2)

        def span_scores(i):  # [B, Q, span] scores of span i and their entry indices
            first = i * per_span
            empty = jnp.full(pos_blk.shape + (span,), NEG_INF, F32)
            buf = jax.lax.fori_loop(first, jnp.minimum(first + per_span, needed), score, empty)
            ids = jnp.broadcast_to(i * span + jnp.arange(span, dtype=jnp.int32), buf.shape)
            return jnp.where(ids < t, buf, NEG_INF), ids  # -inf: the padding past the last entry

        def best_of(scores, ids):
            picked = top_k_entries(scores, k)
            return jnp.take_along_axis(scores, picked, axis=-1), jnp.take_along_axis(ids, picked, axis=-1)

        def merge(i, best):  # best: ([B, Q, k] scores, entry indices), ascending by index
            scores, ids = span_scores(i)
            # the running best first: its entries precede the span's, so ties keep the lower index
            return best_of(jnp.concatenate([best[0], scores], -1), jnp.concatenate([best[1], ids], -1))

        best = jax.lax.fori_loop(1, -(-needed // per_span), merge, best_of(*span_scores(0)))
        return _visible_entries(best[1], pos_blk, ratio)

    return block_topk


def top_k_entries(scores: jax.Array, k: int) -> jax.Array:
    """Positions of the k best `scores` [B, Q, n] per query, ascending (`selection.top_k_ascending`).

    A query block of a prefill selects without sorting (bisection for the k-th score: ~2x faster
    than XLA:CPU's TopK on [128, 1,152]); a few queries (a decode step: one row per sequence) take
    `lax.top_k` and sort its k positions, which costs less there than 32 passes over a long row.
    """
    if scores.shape[1] > FEW_QUERIES:
        return top_k_ascending(scores, k)
    return jnp.sort(jax.lax.top_k(scores, k)[1], axis=-1)


def ascending_valid_first(idx: jax.Array) -> jax.Array:
    """Entry indices [..., N] (-1 = invalid) in ascending order, the -1 slots last."""
    last = jnp.iinfo(jnp.int32).max
    ordered = jnp.sort(jnp.where(idx < 0, last, idx), axis=-1)
    return jnp.where(ordered == last, -1, ordered).astype(jnp.int32)


def index_scores(q_blk, keys, w_blk, pos_blk, ratio: int) -> jax.Array:
    """I(t, s) for one query block, -inf where entry s is not complete at t: [B, Q, T] float32."""
    dots = index_dots(q_blk, keys)
    scores = jnp.einsum("bqit,bqi->bqt", jax.nn.relu(dots), w_blk.astype(F32))
    return jnp.where(entry_visible(pos_blk, keys.shape[1], ratio), scores, NEG_INF)


@jax.custom_jvp
def index_dots(q: jax.Array, keys: jax.Array) -> jax.Array:
    """q [B, Q, I, J] . keys [B, T, J] -> [B, Q, I, T], in float32 arithmetic.

    Reading every key is the one per-step cost of decoding that grows with the context. For a few
    queries against bfloat16 keys (a decode step) the keys are used as they are stored: q is split
    exactly into bfloat16 parts (`split_bfloat16`) and one bfloat16 x bfloat16 -> float32 product
    scores all parts, so the store is read once, never converted to a float32 copy. Otherwise (a
    prefill block, where the product dominates; float32 keys) both sides are float32.
    """
    if keys.dtype != jnp.bfloat16 or q.shape[1] > FEW_QUERIES:
        return jnp.einsum("bqij,btj->bqit", q.astype(F32), keys.astype(F32))
    parts = split_bfloat16(q)  # [P, B, Q, I, J]
    dots = jnp.einsum("pbqij,btj->pbqit", parts, keys, preferred_element_type=F32)
    return jnp.sum(dots, axis=0)


@index_dots.defjvp
def _index_dots_jvp(primals, tangents):
    """Tangents (gradients of the indexer's KL loss in training) in float32: the product is bilinear."""
    q, keys = primals
    dq, dk = tangents
    dots = jnp.einsum("bqij,btj->bqit", dq.astype(F32), keys.astype(F32))
    dots = dots + jnp.einsum("bqij,btj->bqit", q.astype(F32), dk.astype(F32))
    return index_dots(q, keys), dots


def split_bfloat16(x: jax.Array) -> jax.Array:
    """x [...] -> [P, ...] bfloat16 with x == the float32 sum of the parts: P = 1 for bfloat16 x, else 3.

    A float32 significand has 24 bits, a bfloat16 one 8: the high part, the remainder's high part
    and the rest cover them (values near the bottom of the float32 range aside, where the
    remainders lose bits below the smallest normal number).
    """
    if x.dtype == jnp.bfloat16:
        return x[None]
    x = x.astype(F32)
    hi = x.astype(jnp.bfloat16)
    rest = x - hi.astype(F32)
    mid = rest.astype(jnp.bfloat16)
    lo = (rest - mid.astype(F32)).astype(jnp.bfloat16)
    return jnp.stack([hi, mid, lo])


def indexer_kl(q, entries, iq, keys, iw, positions, ratio: int, block: int) -> tuple[jax.Array, jax.Array]:
    """The lightning indexer's training loss: KL(main || indexer) over the visible compressed entries.

    The target, held fixed (stop_gradient), is the main attention's distribution over the visible
    entries (per-head softmax of q.e / sqrt(K), averaged over heads); the indexer's distribution is
    softmax_s I(t, s). q [B,S,H,K], entries [B,T,K], iq [B,S,I,J], keys [B,T,J], iw [B,S,I].
    Computed `block` queries at a time: no [S, T] array is kept. Returns (kl [B, S], sees [B, S]),
    float32: each query's KL, 0 where it sees no entry, and 1 where it sees one (the training loss
    averages kl over the real queries that see an entry, `dsv4.train`).
    """
    if entries.shape[1] == 0:  # fewer tokens than one window: no query sees an entry
        return jnp.zeros(q.shape[:2], F32), jnp.zeros(q.shape[:2], F32)
    q, entries = jax.lax.stop_gradient(q.astype(F32)), jax.lax.stop_gradient(entries.astype(F32))
    scale = q.shape[-1] ** -0.5

    def one_block(args):
        q_blk, iq_blk, iw_blk, pos_blk = args
        visible = entry_visible(pos_blk, entries.shape[1], ratio)  # [B, Q, T]
        main = jnp.einsum("bqhk,btk->bqht", q_blk, entries) * scale
        main = main + mask_bias(visible)[:, :, None, :]
        target = jnp.mean(jax.nn.softmax(main, axis=-1), axis=2)  # [B, Q, T]
        log_q = jax.nn.log_softmax(index_scores(iq_blk, keys, iw_blk, pos_blk, ratio), axis=-1)
        terms = jnp.where(visible, target * (jnp.log(jnp.where(visible, target, 1.0)) - log_q), 0.0)
        has_any = visible[..., 0]
        kl = jnp.where(has_any, jnp.sum(terms, axis=-1), 0.0)
        return jnp.stack([kl, has_any.astype(F32)], axis=-1)  # [B, Q, 2]

    out = _map_query_blocks(one_block, (q, iq, iw, positions), block)
    return out[..., 0], out[..., 1]


def _map_query_blocks(fn, arrays, block: int):
    """Apply fn to query blocks of `block` along axis 1 of every array; concatenate the results."""
    s = arrays[0].shape[1]
    block = max(1, min(block, s))
    n = -(-s // block)
    pad = n * block - s

    def split(a):
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        a = a.reshape(a.shape[0], n, block, *a.shape[2:])
        return jnp.moveaxis(a, 1, 0)  # [n, B, block, ...]

    out = jax.lax.map(fn, tuple(split(a) for a in arrays))
    out = jnp.moveaxis(out, 0, 1)
    return out.reshape(out.shape[0], n * block, *out.shape[3:])[:, :s]


class Indexer(nnx.Module):
    """Lightning indexer of CSA layers (architecture.md s5): its own compressor and query heads."""

    def __init__(self, cfg: ModelConfig, ratio: int, dtype, keys: KeyChain):
        self.cfg = cfg
        heads, dim = cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = Linear(cfg.q_lora_rank, heads * dim, ("q_lora", "index_heads"), dtype, keys)
        self.weights_proj = Linear(cfg.hidden_size, heads, ("embed", "index_heads"), dtype, keys)
        self.compressor = Compressor(cfg, dim, ratio, True, dtype, keys)

    def queries(self, x, qr, positions) -> tuple[jax.Array, jax.Array]:
        """Indexer queries [B, S, I, J] (RoPE'd, compress table) and head weights [B, S, I] (scales folded in)."""
        cfg = self.cfg
        b, s, _ = x.shape
        heads, dim = cfg.index_n_heads, cfg.index_head_dim
        cos, sin = rope_angles(positions, rope_inv_freq(cfg, compressed=True))
        q = apply_rope(self.wq_b(qr).reshape(b, s, heads, dim), cos[:, :, None], sin[:, :, None])
        return q, self.weights_proj(x).astype(F32) * (dim**-0.5 * heads**-0.5)

    def select(self, q, w, keys, positions, rt: RuntimeConfig) -> jax.Array:
        """Top-k entry indices [B, S, min(index_topk, T)] (-1 = invalid) against index keys [B, T, J]."""
        ratio, k = self.compressor.ratio, self.cfg.index_topk
        if rt.attention_impl == "pallas":  # the kernel lists by score; sorted, it reads as the XLA path's list
            idx = pallas_kernels.indexer_topk(q, keys.astype(q.dtype), w, positions, ratio, k, interpret=_interpret())
            return ascending_valid_first(idx)
        return indexer_topk(q, keys, w, positions, ratio, k, rt.query_block)


# ------------------------------------------------------------------------------------ attention core


class KeyGroup(NamedTuple):
    """One group of keys of a query block: its logits and how probabilities become outputs.

    logits [B, Q, H, n] (masked keys -inf), or [B, Q, n, H] with `heads_last`; values maps
    probabilities of the same layout to outputs [B, Q, H, K].
    """

    logits: jax.Array
    values: Callable[[jax.Array], jax.Array]
    heads_last: bool = False

    def key_axis(self) -> int:
        """Axis of `logits` that runs over the group's n keys."""
        return -2 if self.heads_last else -1

    def expand(self, per_head: jax.Array) -> jax.Array:
        """[B, Q, H] -> broadcastable against the logits."""
        return per_head[..., None, :] if self.heads_last else per_head[..., None]


def mask_bias(visible: jax.Array) -> jax.Array:
    """0 where visible, -inf elsewhere (float32), to add to logits of finite values.

    Masking by adding this, not by `jnp.where` on logits with more axes than the mask, reads the
    same for finite logits, and XLA:CPU runs the add and the softmax's reductions over it faster
    than a select broadcast over the heads (one layer's window attention at S = 4,096, 8 heads:
    42-50 -> 32-36 ms; scripts/PERFORMANCE.md).
    """
    return jnp.where(visible, 0.0, NEG_INF).astype(F32)


def _dense_group(logits: jax.Array, visible: jax.Array, keys: jax.Array) -> KeyGroup:
    """Keys [B, n, K] read in full: logits [B, Q, H, n], masked where visible [B, Q, n] is False."""
    return KeyGroup(logits + mask_bias(visible)[:, :, None, :], lambda p: jnp.einsum("bqhs,bsk->bqhk", p, keys))


def _combine_with_sink(groups: list[KeyGroup], sink: jax.Array) -> jax.Array:
    """Softmax over several key groups plus a value-less sink logit per head ([H]) -> [B, Q, H, K] float32."""
    m = functools.reduce(jnp.maximum, [jnp.max(g.logits, axis=g.key_axis()) for g in groups], sink)  # [B, Q, H]
    probs = [jnp.exp(g.logits - g.expand(m)) for g in groups]
    denom = sum(jnp.sum(p, axis=g.key_axis()) for g, p in zip(groups, probs, strict=True)) + jnp.exp(sink - m)
    out = sum(g.values(p) for g, p in zip(groups, probs, strict=True))
    return out / denom[..., None]


def window_mask(q_idx: jax.Array, k_idx: jax.Array, window: int) -> jax.Array:
    """[Q, Kn] True where key k is inside query q's sliding window (q-W < k <= q)."""
    q_idx, k_idx = q_idx[:, None], k_idx[None, :]
    return (k_idx <= q_idx) & (k_idx > q_idx - window)


def entry_visible(positions: jax.Array, num_entries: int, ratio: int) -> jax.Array:
    """[..., T] True where entry w is complete at the query position: w < (pos + 1) // ratio."""
    return jnp.arange(num_entries) < ((positions + 1) // ratio)[..., None]


# A CSA query block reads its top-k entries as a masked dense product over all T entries when
# T <= DENSE_SELECTION * N: at most twice the gather form's multiply-adds, but as plain matmuls
# whose backward is two more (the gather form's backward contracts over the H heads per query and
# scatter-adds [Q, N, K] rows). Its [Q, H, T] logits are no larger than the gathered [Q, N, K] rows
# whenever H <= K / DENSE_SELECTION, so memory stays O(Q * N * K) either way.
DENSE_SELECTION = 2


def selection_mask(idx: jax.Array, num_entries: int) -> jax.Array:
    """[..., N] entry indices (-1 = none) -> [..., T] True at the selected entries."""
    lead = idx.shape[:-1]
    rows = jnp.zeros((*lead, num_entries), bool).reshape(-1, num_entries)
    flat = jnp.where(idx >= 0, idx, num_entries).reshape(rows.shape[0], -1)  # -1 -> dropped
    rows = rows.at[jnp.arange(rows.shape[0])[:, None], flat].set(True, mode="drop")
    return rows.reshape(*lead, num_entries)


def _entry_part(q_blk, pos_blk, idx_blk, entries, ratio, scale):
    """Logits and value function for the compressed entries one query block may read.

    entries [B, T, K] in their storage dtype. HCA reads them all (T = S/128) under the causal mask.
    CSA gathers its top-k rows first and converts only those to float32, or, when T is at most
    DENSE_SELECTION x N, reads all T under the mask of its top-k selection.
    """
    t = entries.shape[1]
    if idx_blk is None or t <= DENSE_SELECTION * idx_blk.shape[-1]:
        entries = entries.astype(F32)
        logits = jnp.einsum("bqhk,btk->bqht", q_blk, entries) * scale
        if idx_blk is None:  # HCA: every complete entry
            visible = entry_visible(pos_blk, t, ratio)
        else:  # CSA: the selected ones (the indexer only selects complete entries)
            visible = selection_mask(idx_blk, t)
        return _dense_group(logits, visible, entries)
    # Logits heads last: XLA:CPU runs the per-query [N, K] x [K, H] product ~3x faster into [N, H]
    # than into [H, N]; the value product wants [H, N] (a profile at S = 4096, 8 heads: the two
    # products 104 + 40 -> 30 + 23 ms per CSA layer; the forward 1.38-1.58 -> 1.24-1.36 s).
    gathered = jax.vmap(lambda e, i: e[jnp.maximum(i, 0)])(entries, idx_blk).astype(F32)  # [B, Q, N, K]
    logits = jnp.einsum("bqnk,bqhk->bqnh", gathered, q_blk) * scale
    logits = logits + mask_bias((idx_blk >= 0) & (idx_blk < t))[..., None]  # as the dense forms read it
    return KeyGroup(logits, lambda p: jnp.einsum("bqhn,bqnk->bqhk", p.swapaxes(-1, -2), gathered), heads_last=True)


# A query block's key slice (block + W - 1 keys) is rounded up to a multiple of this; the keys past
# the block's last query are masked. YNNPACK ran the 4-head benchmark's [512, 128] x [128, 255]
# window products on one core and [., 256] ones on both (alone: 0.36 -> 0.32 ms); the forward at
# S = 4,096, 4 heads, 3-5% faster (`scripts/ab_forward.py --attr dsv4.attention:SPAN_MULTIPLE=1`).
SPAN_MULTIPLE = 8


def _uses_entries(entries, entry_idx) -> bool:
    return entries is not None and entries.shape[1] > 0 and (entry_idx is None or entry_idx.shape[-1] > 0)


def sparse_attention(q, kv, prev, start, sink, window, entries=None, entry_idx=None, ratio=1, block=128):
    """Blockwise attention of a chunk over its sliding window and (optionally) compressed entries.

    q [B, S, H, K] and kv [B, S, K] (K = V) of the chunk's tokens at positions start[b] + i;
    prev [B, W-1, K]: the keys of positions start[b]-W+1 .. start[b]-1 (invalid where negative);
    sink [H]. entries [B, T, K] with either entry_idx [B, S, N] (CSA; -1 or any index outside [0, T):
    no entry; a query's valid indices must be distinct, as `indexer_topk` gives them: a repeated one
    counts once or twice depending on the path) or None (HCA: every entry complete at the query
    position). Each query block of `block`
    reads one (block + W - 1)-key slice (rounded up to SPAN_MULTIPLE), so memory is O(S*W), never
    O(S^2). Returns [B, S, H, K] float32.
    """
    b, s, h, dk = q.shape
    scale = dk**-0.5
    block = max(1, min(block, s))
    n_blocks = -(-s // block)
    keys_all = jnp.concatenate([prev.astype(F32), kv.astype(F32)], axis=1)  # key i at start - (W-1) + i
    span = -(-(block + window - 1) // SPAN_MULTIPLE) * SPAN_MULTIPLE  # keys past the block are masked
    keys_all = jnp.pad(keys_all, ((0, 0), (0, (n_blocks - 1) * block + span - keys_all.shape[1]), (0, 0)))
    positions = start[:, None] + jnp.arange(s)
    use_entries = _uses_entries(entries, entry_idx)
    has_idx = use_entries and entry_idx is not None

    def one_block(args):
        j, q_blk, pos_blk, *idx = args
        j = j[0, 0]
        keys = jax.lax.dynamic_slice_in_dim(keys_all, j * block, span, axis=1)  # [B, span, K]
        k_rel = j * block - (window - 1) + jnp.arange(span)  # key index relative to the chunk
        mask = window_mask(j * block + jnp.arange(block), k_rel, window) & (k_rel < s)
        mask = mask[None] & ((start[:, None] + k_rel) >= 0)[:, None, :]  # [B, Q, span]
        logits = jnp.einsum("bqhk,bsk->bqhs", q_blk.astype(F32), keys) * scale
        groups = [_dense_group(logits, mask, keys)]
        if use_entries:
            idx_blk = idx[0] if has_idx else None
            groups.append(_entry_part(q_blk.astype(F32), pos_blk, idx_blk, entries, ratio, scale))
        return _combine_with_sink(groups, sink.astype(F32))

    block_ids = jnp.broadcast_to(jnp.repeat(jnp.arange(n_blocks), block)[None, :s], (b, s))
    arrays = (block_ids, q, positions) + ((entry_idx,) if has_idx else ())
    return _map_query_blocks(one_block, arrays, block)


def dense_attention(q, kv, prev, start, sink, window, entries=None, entry_idx=None, ratio=1):
    """Reference: the same attention with dense [S, W-1+S] and [S, T] masks. Same arguments as above."""
    s, dk = q.shape[1], q.shape[-1]
    scale = dk**-0.5
    q = q.astype(F32)
    keys = jnp.concatenate([prev.astype(F32), kv.astype(F32)], axis=1)
    k_rel = jnp.arange(keys.shape[1]) - (window - 1)
    mask = window_mask(jnp.arange(s), k_rel, window)[None] & ((start[:, None] + k_rel) >= 0)[:, None, :]
    logits = jnp.einsum("bqhk,bsk->bqhs", q, keys) * scale
    groups = [_dense_group(logits, mask, keys)]
    if _uses_entries(entries, entry_idx):
        t = entries.shape[1]
        entries = entries.astype(F32)
        visible = entry_visible(start[:, None] + jnp.arange(s), t, ratio)  # [B, S, T]
        if entry_idx is not None:  # dense selection mask from the top-k indices
            visible = visible & jnp.any(entry_idx[..., None] == jnp.arange(t), axis=-2)
        lg = jnp.einsum("bqhk,btk->bqht", q, entries) * scale
        groups.append(_dense_group(lg, visible, entries))
    return _combine_with_sink(groups, sink.astype(F32))


def _interpret() -> bool:
    """Pallas kernels run compiled on GPU and TPU, in the Pallas interpreter elsewhere (CPU tests)."""
    return jax.default_backend() not in ("gpu", "tpu")


def _pallas_attention(q, kv, prev, start, sink, window, entries=None, entry_idx=None, ratio=1):
    """The fused Pallas kernel with the arguments of `sparse_attention` (inverse RoPE left outside)."""
    dtype = q.dtype
    entries = None if entries is None else entries.astype(dtype)
    return pallas_kernels.sparse_attention(
        q,
        kv.astype(dtype),
        prev.astype(dtype),
        start.astype(jnp.int32),
        sink,
        window,
        entries,
        entry_idx,
        ratio or 1,  # sliding-only layers have no entries; the kernel wants a valid ratio
        interpret=_interpret(),
    )


def window_before(ring: jax.Array, start: jax.Array) -> jax.Array:
    """The W-1 keys before each chunk, oldest first: ring [B, W, K] (slot = pos % W) -> [B, W-1, K]."""
    w = ring.shape[1]
    slots = (start[:, None] - (w - 1) + jnp.arange(w - 1)) % w
    return jnp.take_along_axis(ring, slots[..., None], axis=1)


def write_window(ring: jax.Array, kv: jax.Array, start: jax.Array, n: jax.Array) -> jax.Array:
    """Store the chunk's real keys in the ring (only the last W of them can matter)."""
    w, c_len = ring.shape[1], kv.shape[1]
    i = jnp.arange(c_len)
    keep = (i < n[:, None]) & (i >= (n - w)[:, None])
    return _scatter_rows(ring, jnp.where(keep, (start[:, None] + i) % w, w), kv.astype(ring.dtype))


# ------------------------------------------------------------------------------------------ attention


class Attention(nnx.Module):
    """One layer's attention: sliding window, plus HCA entries or CSA top-k entries by `kind`."""

    def __init__(self, cfg: ModelConfig, rt: RuntimeConfig, ratio: int, keys: KeyChain):
        self.cfg, self.rt, self.ratio = cfg, rt, ratio
        self.kind = {0: "sliding", 4: "csa", 128: "hca"}[ratio]
        d, h, k, dtype = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, rt.jnp_dtype
        g, r = cfg.o_groups, cfg.o_lora_rank
        self.wq_a = Linear(d, cfg.q_lora_rank, ("embed", "q_lora"), dtype, keys)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, keys, axis="q_lora")
        self.wq_b = Linear(cfg.q_lora_rank, h * k, ("q_lora", "heads"), dtype, keys)
        self.wkv = Linear(d, k, ("embed", "kv_dim"), dtype, keys)
        self.kv_norm = RMSNorm(k, cfg.rms_norm_eps, keys, axis="kv_dim")
        self.wo_a = param(keys, (g, h * k // g, r), ("o_groups", "o_group_in", "o_lora"), dtype, normal(0.02))
        self.wo_b = Linear(g * r, d, ("o_groups", "embed"), dtype, keys)
        self.attn_sink = param(keys, (h,), ("heads",), F32, constant(0.0))
        self.compressor = None if ratio == 0 else Compressor(cfg, k, ratio, self.kind == "csa", dtype, keys)
        self.indexer = Indexer(cfg, ratio, dtype, keys) if self.kind == "csa" else None

    def empty_cache(self, batch: int, length: int, dtype) -> LayerCache:
        """Transient per-layer state for a whole-sequence forward of `length` tokens."""
        window = jnp.zeros((batch, self.cfg.sliding_window, self.cfg.head_dim), dtype)
        comp = self.compressor.empty_state(batch, length // self.ratio, dtype) if self.compressor else None
        index = self.indexer.compressor.empty_state(batch, length // self.ratio, dtype) if self.indexer else None
        return LayerCache(window, comp, index)

    def __call__(self, x: jax.Array, start: jax.Array, n: jax.Array, cache: LayerCache) -> tuple:
        """x [B, C, D] (after attn_norm) at positions start[b] + i, n[b] real -> ([B, C, D], cache)."""
        cfg = self.cfg
        b, s, _ = x.shape
        positions = start[:, None] + jnp.arange(s)
        cos, sin = rope_angles(positions, rope_inv_freq(cfg, compressed=self.ratio > 0))
        qr = self.q_norm(self.wq_a(x))
        q = rms_norm(self.wq_b(qr).reshape(b, s, cfg.num_attention_heads, cfg.head_dim), cfg.rms_norm_eps)
        q = apply_rope(q, cos[:, :, None], sin[:, :, None])
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)
        comp = index = entries = entry_idx = None
        if self.compressor is not None:
            comp = self.compressor.update(x, start, n, cache.compressor)
            entries = comp.entries.read()
            record(self, "compressed_kv", entries)
        if self.indexer is not None:  # its inputs are cut from the LM gradient: top-k is not differentiable
            xs, qrs = jax.lax.stop_gradient(x), jax.lax.stop_gradient(qr)
            index = self.indexer.compressor.update(xs, start, n, cache.indexer)
            keys = index.entries.read()
            iq, iw = self.indexer.queries(xs, qrs, positions)
            entry_idx = self.indexer.select(iq, iw, keys, positions, self.rt)
            record(self, "topk", entry_idx)
            if self.rt.train_stats:
                kl = indexer_kl(q, entries, iq, keys, iw, positions, self.ratio, self.rt.query_block)
                self.sow(nnx.Intermediate, "indexer_kl", kl)
        prev = window_before(cache.window, start)
        args = (
            q,
            kv,
            prev,
            start,
            self.attn_sink.get_value(),
            cfg.sliding_window,
            entries,
            entry_idx,
            self.ratio,
        )
        if self.rt.attention_impl == "reference":
            o = dense_attention(*args)
        elif self.rt.attention_impl == "pallas":
            o = _pallas_attention(*args)
        else:
            o = sparse_attention(*args, block=self.rt.query_block)
        o = apply_rope(o.astype(x.dtype), cos[:, :, None], sin[:, :, None], inverse=True)
        return self.project_out(o), LayerCache(write_window(cache.window, kv, start, n), comp, index)

    def project_out(self, o: jax.Array) -> jax.Array:
        """Grouped low-rank output projection: [B, S, H, K] -> [B, S, D].

        The group axis is moved in front of the batched product and back explicitly (with
        [B, S, G, *] operands XLA:CPU transposed them with strided copies: 26 -> 11 ms for this
        projection, inverse RoPE included, at S = 4096 with 8 heads of 128).
        """
        b, s = o.shape[:2]
        g = self.cfg.o_groups
        wo_a = materialize(self.wo_a.get_value())
        by_group = jnp.transpose(o.reshape(b, s, g, -1).astype(wo_a.dtype), (2, 0, 1, 3))  # [G, B, S, I]
        grouped = jnp.einsum("gbsi,gio->gbso", by_group, wo_a)  # [G, B, S, R]
        return self.wo_b(jnp.transpose(grouped, (1, 2, 0, 3)).reshape(b, s, -1))
