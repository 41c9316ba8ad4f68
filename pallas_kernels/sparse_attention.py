"""Sparse compressed attention (architecture.md s3-5): sliding window + compressed entries + sink.

Letters: B batch, S queries, H heads, K head dim, W window, T compressed entries, N selected entries
per query (CSA top-k), R rope channels.

Each query attends, in one online-softmax pass, to
- its sliding window, keys at positions pos-W+1 .. pos (>= 0). Chunk form (`sparse_attention`, the
  arguments of `dsv4.attention.sparse_attention`): a chunk of S queries at positions start + i reads
  the W-1 keys before the chunk (`prev`) and the chunk's own keys. Decode form
  (`sparse_attention_decode`): one query reads the slots of a window buffer whose position p
  satisfies pos-W < p <= pos (a ring buffer works as is);
- compressed entries: CSA reads the N entries named by `entry_idx` (-1 or out of range: skipped); HCA
  reads every entry w with w < (pos + 1) // ratio;
- a value-less sink logit per head, in the denominator only.
One K=V head is shared by all H query heads (MQA): each key chunk is read once per head block and
used for both logits and values. Optionally the inverse RoPE of the query position is applied to
the last R output channels (interleaved pairs, negated angle). Outputs are float32.

Backends (see `_common.py`): on GPU (Triton) a grid step is one query x one head block; window
keys and entries are gathered from HBM by masked vector loads of their row indices. On TPU (Mosaic)
a grid step is one query x all heads; the window rows arrive by one DMA and the entries by one DMA
per row, addressed by indices in SMEM (scalar-prefetched positions, SMEM-blocked `entry_idx`).
Everything else runs the pure-jnp reference in this file unless `interpret=True`.

Gradients: the kernels are forward-only; `jax.grad` goes through a custom VJP whose backward pass
recomputes the forward with the reference below and uses the reference's VJP.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    F32,
    FLOAT_DTYPES,
    cdiv,
    check_dtype,
    check_positive,
    check_shape,
    gpu_compiler_params,
    gpu_tile,
    interpret_param,
    min_dot,
    next_pow2,
    pad_axis,
    resolve_backend,
    round_up,
    softmax_finish,
    softmax_init,
    softmax_step,
    xor_partner,
    xor_partner_reshape,
)

INT_DTYPES = (jnp.int32,)


@dataclasses.dataclass(frozen=True)
class SparseAttentionBlocks:
    """Block sizes. Sizes larger than the problem are clipped to it; the GPU form then raises each
    tile (heads, window keys, entries, head_dim) to at least TRITON_MIN_DOT = 16 when compiled.

    block_q: chunk-form queries per grid step (GPU; TPU uses 1). block_h: heads per grid step (GPU;
    TPU uses all). block_w: window keys per chunk (GPU; TPU reads the window as one chunk).
    block_n: compressed entries per chunk. num_splits (GPU): programs per (query block, head block)
    that share out the entry chunks (flash-decoding; split 0 also takes the window), merged outside
    the kernel; 0 = enough to give the grid ~128 programs (the default on a GPU), 1 = no split.
    num_warps, num_stages: Triton launch parameters.
    """

    block_q: int = 1
    block_h: int = 32
    block_w: int = 32
    block_n: int = 32
    num_splits: int = 1
    num_warps: int = 8
    num_stages: int = 2

    @classmethod
    def for_backend(cls, backend: str) -> SparseAttentionBlocks:
        """Default blocks for `backend`: tuned for TPU and for a compiled GPU; the small defaults otherwise."""
        if backend == "tpu":
            return cls(block_q=1, block_h=0, block_w=0, block_n=128, num_splits=1)
        if backend == "gpu" and jax.default_backend() in ("gpu", "cuda", "rocm"):
            return cls(num_splits=0)
        return cls()  # interpret mode: small blocks keep the interpreter fast


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one call (hashable: it is a non-differentiable custom_vjp argument)."""

    mode: str  # "chunk" | "decode"
    kind: str  # "window" | "hca" | "csa"
    window: int
    ratio: int
    backend: str
    interpret: bool
    blocks: SparseAttentionBlocks


# --------------------------------------------------------------------------------------- reference


def _inverse_rope_reference(o: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate pairs (o[2i], o[2i+1]) of the last 2*cos.shape[-1] channels by minus the angle."""
    half = cos.shape[-1]
    head, tail = o[..., : o.shape[-1] - 2 * half], o[..., o.shape[-1] - 2 * half :]
    even, odd = tail[..., 0::2], tail[..., 1::2]
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    rotated = jnp.stack([even * cos + odd * sin, odd * cos - even * sin], axis=-1)
    return jnp.concatenate([head, rotated.reshape(tail.shape)], axis=-1)


def _attend_reference(q, sink, groups, rope):
    """Softmax over the concatenated key groups plus a sink column; the sink's probability is dropped.

    q [B, S, H, K]; groups: list of (keys [B, S, n, K] or [B, n, K], valid [B, S, n]).
    """
    q = q.astype(F32)
    scale = q.shape[-1] ** -0.5
    logits, values = [], []
    for keys, valid in groups:
        keys = keys.astype(F32)
        spec = "bshk,bsnk->bshn" if keys.ndim == 4 else "bshk,bnk->bshn"
        lg = jnp.einsum(spec, q, keys) * scale
        logits.append(jnp.where(valid[:, :, None, :], lg, -jnp.inf))
        values.append(keys)
    sink_col = jnp.broadcast_to(sink.astype(F32)[:, None], (*q.shape[:3], 1))
    probs = jax.nn.softmax(jnp.concatenate([*logits, sink_col], axis=-1), axis=-1)
    out, start = 0.0, 0
    for lg, keys in zip(logits, values, strict=True):
        p = probs[..., start : start + lg.shape[-1]]
        start += lg.shape[-1]
        spec = "bshn,bsnk->bshk" if keys.ndim == 4 else "bshn,bnk->bshk"
        out = out + jnp.einsum(spec, p, keys)
    if rope is not None:
        out = _inverse_rope_reference(out, rope[0].astype(F32), rope[1].astype(F32))
    return out


def _selected(entry_idx: jax.Array, num_entries: int) -> jax.Array:
    """entry_idx with every index outside [0, num_entries) as -1 (no entry): the kernels read only
    what this leaves, and a gather would otherwise clamp an index >= T to the last entry."""
    return jnp.where((entry_idx >= 0) & (entry_idx < num_entries), entry_idx, -1).astype(jnp.int32)


def _entry_group(positions, entries, entry_idx, ratio, kind):
    if kind == "csa":  # gather (a repeated index would count twice; the indexer gives distinct ones)
        entry_idx = _selected(entry_idx, entries.shape[1])
        gathered = jax.vmap(lambda e, i: e[jnp.maximum(i, 0)])(entries, entry_idx)  # [B, S, N, K]
        return gathered, entry_idx >= 0
    visible = jnp.arange(entries.shape[1]) < ((positions + 1) // ratio)[..., None]  # [B, S, T]
    return entries, visible


def _kind(entries, entry_idx) -> str:
    if entries is None or entries.shape[1] == 0 or (entry_idx is not None and entry_idx.shape[-1] == 0):
        return "window"
    return "hca" if entry_idx is None else "csa"


def sparse_attention_reference(
    q, kv, prev, start, sink, window, entries=None, entry_idx=None, ratio=1, rope=None
) -> jax.Array:
    """Pure-jnp chunk-form reference; same arguments as `sparse_attention`. Returns [B, S, H, K] f32."""
    b, s = q.shape[:2]
    keys_all = jnp.concatenate([prev, kv], axis=1)  # row r holds position start - (W-1) + r
    off = jnp.arange(window)
    win_keys = keys_all[:, jnp.arange(s)[:, None] + off]  # [B, S, W, K]
    positions = start[:, None] + jnp.arange(s)  # [B, S]
    valid = positions[..., None] - (window - 1) + off >= 0  # [B, S, W]
    groups = [(win_keys, valid)]
    kind = _kind(entries, entry_idx)
    if kind != "window":
        groups.append(_entry_group(positions, entries, entry_idx, ratio, kind))
    return _attend_reference(q, sink, groups, rope)


def sparse_attention_decode_reference(
    q, kv_win, win_pos, sink, pos, window, entries=None, entry_idx=None, ratio=1, rope=None
) -> jax.Array:
    """Pure-jnp decode reference; same arguments as `sparse_attention_decode`. Returns [B, H, K]."""
    valid = (win_pos >= 0) & (win_pos <= pos[:, None]) & (win_pos > pos[:, None] - window)  # [B, Wn]
    groups = [(kv_win, valid[:, None])]
    kind = _kind(entries, entry_idx)
    if kind != "window":
        idx = None if entry_idx is None else entry_idx[:, None]
        groups.append(_entry_group(pos[:, None], entries, idx, ratio, kind))
    rope = None if rope is None else (rope[0][:, None], rope[1][:, None])
    return _attend_reference(q[:, None], sink, groups, rope)[:, 0]


# ------------------------------------------------------------------------------------ rope tables


def _rope_tables(cos: jax.Array, sin: jax.Array, k: int, k_pad: int):
    """Full-width tables so that inverse RoPE is o * c + o[i ^ 1] * s (identity outside the R channels).

    cos, sin [..., R/2] -> c, s [..., k_pad] float32.
    """
    lead, half = cos.shape[:-1], cos.shape[-1]
    cos, sin = cos.astype(F32), sin.astype(F32)
    c = jnp.repeat(cos, 2, axis=-1)
    s = jnp.stack([sin, -sin], axis=-1).reshape(*lead, 2 * half)
    nope = k - 2 * half
    c = jnp.concatenate([jnp.ones((*lead, nope), F32), c, jnp.ones((*lead, k_pad - k), F32)], axis=-1)
    s = jnp.concatenate([jnp.zeros((*lead, nope), F32), s, jnp.zeros((*lead, k_pad - k), F32)], axis=-1)
    return c, s


# ------------------------------------------------------------------------------------- GPU kernel


def _gpu_kernel(*refs, names, plan: _Plan, scale: float, n_rows: int, n_entries: int, n_slots: int):
    """One grid step (b, query block j, head block, split s) of the GPU form.

    Refs (blocks): q [bq, bh, Kp]; kv [rows, Kp] (chunk: prev then the chunk's keys, W-1+S rows;
    decode: the window buffer) and, for decode, win_pos [Wn]; pos [bq]; entries [T, Kp];
    idx [bq, Np]; sink [bh, 1]; rope_c, rope_s [bq, Kp]. Outputs: o [bq, bh, Kp], or with splits
    acc [bq, bh, Kp], m, den [bq, bh, 1]. For each query of the block: window chunks of bw keys,
    then entry chunks of bn rows (this split's share), each gathered by row index and folded into
    one online softmax; then the sink and the inverse RoPE.
    """
    r = dict(zip(names, refs, strict=True))
    blk = plan.blocks
    bq, _, kp = r["q"].shape
    bw, bn, ns = blk.block_w, blk.block_n, blk.num_splits
    j, split = pl.program_id(1), pl.program_id(3)
    cols = jnp.arange(kp)[None, :]

    def gather(ref, rows, valid, size):  # rows [C] of a [size, Kp] ref; invalid rows read as 0
        rows = jnp.clip(rows, 0, size - 1)
        return plgpu.load(ref.at[rows[:, None], cols], mask=valid[:, None], other=0)

    def one_query(i, carry):
        pos = r["pos"][i]
        q = r["q"][i]  # [bh, Kp]
        state = softmax_init(q.shape[0], kp)

        def window_chunk(c, st):
            off = c * bw + jnp.arange(bw)
            if plan.mode == "chunk":  # kv row r holds position start - (W-1) + r
                rows = j * bq + i + off
                valid = (off < plan.window) & (pos - (plan.window - 1) + off >= 0) & (rows < n_rows)
                return softmax_step(st, q, gather(r["kv"], rows, valid, n_rows), valid[None, :], scale)
            in_buf = off < n_slots
            wp = plgpu.load(r["win_pos"].at[jnp.clip(off, 0, n_slots - 1)], mask=in_buf, other=-1)
            valid = in_buf & (wp >= 0) & (wp <= pos) & (wp > pos - plan.window)
            return softmax_step(st, q, gather(r["kv"], off, valid, n_slots), valid[None, :], scale)

        n_win = cdiv(plan.window if plan.mode == "chunk" else n_slots, bw)

        def window(st):  # a loop of static length: Triton needs a loop's bounds to share one type
            return jax.lax.fori_loop(0, n_win, window_chunk, st)

        # with splits, split 0 owns the window
        state = window(state) if ns == 1 else jax.lax.cond(split == 0, window, lambda st: st, state)

        if plan.kind != "window":
            if plan.kind == "csa":
                n_chunks = r["idx"].shape[1] // bn
            else:
                count = jnp.minimum(jax.lax.div(pos + 1, plan.ratio), n_entries)  # pos >= 0
                n_chunks = jax.lax.div(count + bn - 1, bn)

            def entry_chunk(c, st):
                if plan.kind == "csa":
                    rows = r["idx"][i, pl.ds(c * bn, bn)]
                    valid = rows >= 0
                else:
                    rows = c * bn + jnp.arange(bn)
                    valid = rows < count
                return softmax_step(st, q, gather(r["entries"], rows, valid, n_entries), valid[None, :], scale)

            per = jax.lax.div(n_chunks + ns - 1, ns)
            lo = split * per
            state = jax.lax.fori_loop(lo, jnp.minimum(lo + per, n_chunks), entry_chunk, state)

        m, den, acc = state
        if ns > 1:
            r["acc"][i], r["m"][i], r["den"][i] = acc, m, den
            return carry
        o = softmax_finish(m, den, acc, r["sink"][...])
        if "rope_c" in r:
            o = o * r["rope_c"][i][None, :] + xor_partner_reshape(o, 1) * r["rope_s"][i][None, :]
        r["o"][i] = o.astype(r["o"].dtype)
        return carry

    jax.lax.fori_loop(0, bq, one_query, 0)


# ------------------------------------------------------------------------------------- TPU kernel


def _tpu_kernel(pos_sref, *refs, names, plan: _Plan, scale: float, n_rows: int, n_entries: int):
    """One grid step (b, query t) of the TPU form: all heads of one query.

    pos_sref [B, S] (SMEM, scalar-prefetched). Refs: q [Hp, Kp]; chunk kv [B, rows, Kp] in HBM
    (prev then the chunk's keys) or decode kv [Wn, Kp] with win_pos [1, Wn]; entries [B, T, Kp] in
    HBM; idx_s [1, Np] (SMEM) and idx_v [1, Np] (VMEM) for CSA; sink [Hp, 1]; rope_c, rope_s
    [1, Kp]; output o [Hp, Kp]; scratch win_buf [Wp, Kp], ent_buf [bn, Kp], DMA semaphores [2].
    """
    r = dict(zip(names, refs, strict=True))
    b, t = pl.program_id(0), pl.program_id(1)
    pos = pos_sref[b, t]
    q = r["q"][...]
    hp, kp = q.shape
    bn = plan.blocks.block_n
    sem = r["sem"]
    state = softmax_init(hp, kp)

    if plan.mode == "chunk":  # W (rounded up) rows from row t, which holds position pos - (W-1)
        wp = r["win_buf"].shape[0]
        copy = pltpu.make_async_copy(r["kv"].at[b, pl.ds(t, wp)], r["win_buf"], sem.at[0])
        copy.start()
        copy.wait()
        off = jax.lax.broadcasted_iota(jnp.int32, (1, wp), 1)
        valid = (off < plan.window) & (pos - (plan.window - 1) + off >= 0) & (t + off < n_rows)
        state = softmax_step(state, q, r["win_buf"][...], valid, scale)
    else:
        wpos = r["win_pos"][...]  # [1, Wn]
        valid = (wpos >= 0) & (wpos <= pos) & (wpos > pos - plan.window)
        state = softmax_step(state, q, r["kv"][...], valid, scale)

    if plan.kind != "window":
        lane = jax.lax.broadcasted_iota(jnp.int32, (1, bn), 1)
        if plan.kind == "csa":
            n_chunks = r["idx_s"].shape[1] // bn
        else:
            count = jnp.minimum(jax.lax.div(pos + 1, plan.ratio), n_entries)  # pos >= 0
            n_chunks = jax.lax.div(count + bn - 1, bn)

        def entry_chunk(c, st):
            buf = r["ent_buf"]
            if plan.kind == "csa":

                def start_row(n, carry):
                    row = jnp.maximum(r["idx_s"][0, c * bn + n], 0)
                    src = r["entries"].at[b, pl.ds(row, 1)]
                    pltpu.make_async_copy(src, buf.at[pl.ds(n, 1)], sem.at[1]).start()
                    return carry

                def wait_row(n, carry):
                    src = r["entries"].at[b, pl.ds(0, 1)]
                    pltpu.make_async_copy(src, buf.at[pl.ds(n, 1)], sem.at[1]).wait()
                    return carry

                jax.lax.fori_loop(0, bn, start_row, 0)
                jax.lax.fori_loop(0, bn, wait_row, 0)
                valid = r["idx_v"][:, pl.ds(c * bn, bn)] >= 0
            else:  # one contiguous DMA; the last chunk is shifted back to stay inside the array
                start = jnp.minimum(c * bn, r["entries"].shape[1] - bn)
                copy = pltpu.make_async_copy(r["entries"].at[b, pl.ds(start, bn)], buf, sem.at[1])
                copy.start()
                copy.wait()
                rows = start + lane
                valid = (rows >= c * bn) & (rows < count)
            return softmax_step(st, q, buf[...], valid, scale)

        state = jax.lax.fori_loop(0, n_chunks, entry_chunk, state)

    o = softmax_finish(*state, r["sink"][...])
    if "rope_c" in r:
        o = o * r["rope_c"][...] + xor_partner("tpu")(o, 1) * r["rope_s"][...]
    r["o"][...] = o.astype(r["o"].dtype)


# ---------------------------------------------------------------------------------------- launch


def _gpu_call(plan, q, kv, win_pos, sink, pos, entries, entry_idx, rope):
    """Pad to the GPU form's blocks, launch, combine splits. q [B, Sq, H, K], pos [B, Sq]."""
    b, s, h, k = q.shape
    blk = plan.blocks
    kp = max(min_dot(plan.interpret), next_pow2(k))  # head_dim: every channel, padded to a power of two
    bh = gpu_tile(h, blk.block_h, plan.interpret)
    bq = blk.block_q if plan.mode == "chunk" else 1
    sp, hp = round_up(s, bq), round_up(h, bh)
    n_slots = kv.shape[1]
    bw = gpu_tile(plan.window if plan.mode == "chunk" else n_slots, blk.block_w, plan.interpret)
    n_entries = 0 if entries is None else entries.shape[1]
    if plan.kind == "csa":
        bn = gpu_tile(entry_idx.shape[-1], blk.block_n, plan.interpret)
    else:
        bn = gpu_tile(n_entries, blk.block_n, plan.interpret)
    nh = hp // bh
    ns = 1 if plan.kind == "window" else blk.num_splits
    if ns == 0:  # enough programs to fill a GPU, but not more splits than entry chunks
        n_chunks = cdiv(entry_idx.shape[-1] if plan.kind == "csa" else n_entries, bn)
        ns = max(1, min(cdiv(128, b * (sp // bq) * nh), n_chunks))
    blk = dataclasses.replace(blk, block_q=bq, block_h=bh, block_w=bw, block_n=bn, num_splits=ns)
    plan = dataclasses.replace(plan, blocks=blk)

    args = {"q": pad_axis(pad_axis(pad_axis(q, 1, sp), 2, hp), 3, kp), "kv": pad_axis(kv, 2, kp)}
    specs = {
        "q": pl.BlockSpec((None, bq, bh, kp), lambda b_, j, hh, sl: (b_, j, hh, 0)),
        "kv": pl.BlockSpec((None, n_slots, kp), lambda b_, j, hh, sl: (b_, 0, 0)),
    }
    if plan.mode == "decode":
        args["win_pos"] = win_pos
        specs["win_pos"] = pl.BlockSpec((None, n_slots), lambda b_, j, hh, sl: (b_, 0))
    args["pos"] = pad_axis(pos, 1, sp)
    specs["pos"] = pl.BlockSpec((None, bq), lambda b_, j, hh, sl: (b_, j))
    if plan.kind != "window":
        args["entries"] = pad_axis(entries, 2, kp)
        specs["entries"] = pl.BlockSpec((None, n_entries, kp), lambda b_, j, hh, sl: (b_, 0, 0))
    if plan.kind == "csa":
        n_pad = round_up(entry_idx.shape[-1], bn)
        args["idx"] = pad_axis(pad_axis(entry_idx, 1, sp, -1), 2, n_pad, -1)
        specs["idx"] = pl.BlockSpec((None, bq, n_pad), lambda b_, j, hh, sl: (b_, j, 0))
    args["sink"] = pad_axis(sink.astype(F32), 0, hp)[:, None]
    specs["sink"] = pl.BlockSpec((bh, 1), lambda b_, j, hh, sl: (hh, 0))
    if rope is not None and ns == 1:
        for name, table in zip(("rope_c", "rope_s"), _rope_tables(*rope, k, kp), strict=True):
            args[name] = pad_axis(table, 1, sp)
            specs[name] = pl.BlockSpec((None, bq, kp), lambda b_, j, hh, sl: (b_, j, 0))

    if ns == 1:
        out_shape = jax.ShapeDtypeStruct((b, sp, hp, kp), F32)
        out_specs = pl.BlockSpec((None, bq, bh, kp), lambda b_, j, hh, sl: (b_, j, hh, 0))
        out_names = ("o",)
    else:
        out_shape = (
            jax.ShapeDtypeStruct((b, ns, sp, hp, kp), F32),
            jax.ShapeDtypeStruct((b, ns, sp, hp, 1), F32),
            jax.ShapeDtypeStruct((b, ns, sp, hp, 1), F32),
        )
        vec = pl.BlockSpec((None, None, bq, bh, 1), lambda b_, j, hh, sl: (b_, sl, j, hh, 0))
        out_specs = (pl.BlockSpec((None, None, bq, bh, kp), lambda b_, j, hh, sl: (b_, sl, j, hh, 0)), vec, vec)
        out_names = ("acc", "m", "den")
    kernel = functools.partial(
        _gpu_kernel,
        names=tuple(args) + out_names,
        plan=plan,
        scale=k**-0.5,
        n_rows=kv.shape[1],
        n_entries=n_entries,
        n_slots=n_slots,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(b, sp // bq, nh, ns),
        in_specs=list(specs.values()),
        out_specs=out_specs,
        compiler_params=None if plan.interpret else gpu_compiler_params(blk.num_warps, blk.num_stages),
        interpret=interpret_param("gpu", plan.interpret),
        name=f"sparse_attention_{plan.mode}_{plan.kind}",
    )(*args.values())
    if ns > 1:
        acc, m, den = out
        out = _combine_splits(acc, m, den, args["sink"][None, None, :, :])[:, :s]  # the rope tables have S rows
        if rope is not None:
            c, sn = _rope_tables(*rope, k, kp)
            out = out * c[:, :, None] + xor_partner_reshape(out, 1) * sn[:, :, None]
    return out[:, :s, :h, :k]


def _combine_splits(acc, m, den, sink):
    """Merge flash-decoding partials acc [B, ns, S, H, K], m, den [B, ns, S, H, 1] with the sink."""
    top = jnp.maximum(jnp.max(m, axis=1), sink)  # [B, S, H, 1]
    keep = jnp.exp(m - top[:, None])
    denom = jnp.sum(den * keep, axis=1) + jnp.exp(sink - top)
    return jnp.sum(acc * keep, axis=1) / denom


def _tpu_call(plan, q, kv, win_pos, sink, pos, entries, entry_idx, rope):
    """Pad to the TPU form's tiles and launch: grid (B, Sq), one query with all heads per step."""
    b, s, h, k = q.shape
    kp = round_up(k, 128)
    hp = round_up(h, 16)
    n_entries = 0 if entries is None else entries.shape[1]
    bn = round_up(min(plan.blocks.block_n, entry_idx.shape[-1] if plan.kind == "csa" else max(n_entries, 1)), 16)
    plan = dataclasses.replace(plan, blocks=dataclasses.replace(plan.blocks, block_n=bn))
    idx_map4 = lambda b_, t, p: (b_, t, 0, 0)  # noqa: E731
    args = {"q": pad_axis(pad_axis(q, 2, hp), 3, kp)}
    specs = {"q": pl.BlockSpec((None, None, hp, kp), idx_map4)}
    scratch = []
    if plan.mode == "chunk":
        wp = round_up(plan.window, 16)
        args["kv"] = pad_axis(pad_axis(kv, 2, kp), 1, s + wp - 1)
        specs["kv"] = pl.BlockSpec(memory_space=pl.ANY)
        scratch.append(pltpu.VMEM((wp, kp), kv.dtype))
    else:
        n_slots = round_up(kv.shape[1], 16)
        args["kv"] = pad_axis(pad_axis(kv, 1, n_slots), 2, kp)
        specs["kv"] = pl.BlockSpec((None, n_slots, kp), lambda b_, t, p: (b_, 0, 0))
        args["win_pos"] = pad_axis(win_pos, 1, n_slots, -1)[:, None, :]
        specs["win_pos"] = pl.BlockSpec((None, 1, n_slots), lambda b_, t, p: (b_, 0, 0))
    if plan.kind != "window":
        args["entries"] = pad_axis(pad_axis(entries, 2, kp), 1, max(n_entries, bn))
        specs["entries"] = pl.BlockSpec(memory_space=pl.ANY)
        scratch.append(pltpu.VMEM((bn, kp), entries.dtype))
    if plan.kind == "csa":
        idx = pad_axis(entry_idx, 2, round_up(entry_idx.shape[-1], bn), -1)[:, :, None, :]  # [B, S, 1, Np]
        args["idx_s"], args["idx_v"] = idx, idx
        specs["idx_s"] = pl.BlockSpec((None, None, 1, idx.shape[-1]), idx_map4, memory_space=pltpu.SMEM)
        specs["idx_v"] = pl.BlockSpec((None, None, 1, idx.shape[-1]), idx_map4)
    args["sink"] = pad_axis(sink.astype(F32), 0, hp)[:, None]
    specs["sink"] = pl.BlockSpec((hp, 1), lambda b_, t, p: (0, 0))
    if rope is not None:
        for name, table in zip(("rope_c", "rope_s"), _rope_tables(*rope, k, kp), strict=True):
            args[name] = table[:, :, None, :]
            specs[name] = pl.BlockSpec((None, None, 1, kp), idx_map4)
    names = [*args, "o"]
    if plan.mode == "chunk":
        names.append("win_buf")
    if plan.kind != "window":
        names.append("ent_buf")
    scratch.append(pltpu.SemaphoreType.DMA((2,)))
    names.append("sem")
    kernel = functools.partial(
        _tpu_kernel, names=tuple(names), plan=plan, scale=k**-0.5, n_rows=kv.shape[1], n_entries=n_entries
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, s),
        in_specs=list(specs.values()),
        out_specs=pl.BlockSpec((None, None, hp, kp), idx_map4),
        scratch_shapes=scratch,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, s, hp, kp), F32),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret_param("tpu", plan.interpret),
        name=f"sparse_attention_{plan.mode}_{plan.kind}",
    )(pos, *args.values())
    return out[:, :, :h, :k]


def _forward(plan, q, kv, win_pos, sink, pos, entries, entry_idx, rope):
    """Kernel forward in the common [B, Sq, ...] form (decode has Sq = 1)."""
    call = _tpu_call if plan.backend == "tpu" else _gpu_call
    return call(plan, q, kv, win_pos, sink, pos, entries, entry_idx, rope)


def _reference(plan, q, kv, win_pos, sink, pos, entries, entry_idx, rope):
    if plan.mode == "chunk":  # kv = concat(prev, chunk keys), pos = start + i
        w = plan.window - 1
        args = (q, kv[:, w:], kv[:, :w], pos[:, 0], sink, plan.window, entries, entry_idx, plan.ratio, rope)
        return sparse_attention_reference(*args)
    rope = None if rope is None else (rope[0][:, 0], rope[1][:, 0])
    idx = None if entry_idx is None else entry_idx[:, 0]
    out = sparse_attention_decode_reference(
        q[:, 0], kv, win_pos, sink, pos[:, 0], plan.window, entries, idx, plan.ratio, rope
    )
    return out[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(plan, q, kv, win_pos, sink, pos, entries, entry_idx, rope):
    return _forward(plan, q, kv, win_pos, sink, pos, entries, entry_idx, rope)


def _attend_fwd(plan, *args):
    return _forward(plan, *args), args


def _attend_bwd(plan, res, g):
    """Backward through the reference: recompute its forward, pull back g. Integers get no cotangent."""
    q, kv, win_pos, sink, pos, entries, entry_idx, rope = res

    def ref(q_, kv_, sink_, entries_, rope_):
        return _reference(plan, q_, kv_, win_pos, sink_, pos, entries_, entry_idx, rope_)

    _, vjp = jax.vjp(ref, q, kv, sink, entries, rope)
    dq, dkv, dsink, dentries, drope = vjp(g)
    return dq, dkv, None, dsink, None, dentries, None, drope


_attend.defvjp(_attend_fwd, _attend_bwd)


def _run(plan, q, kv, win_pos, sink, pos, entries, entry_idx, rope):
    if plan.backend == "reference":
        return _reference(plan, q, kv, win_pos, sink, pos, entries, entry_idx, rope)
    if entries is not None and plan.kind == "window":
        entries, entry_idx = None, None
    if entry_idx is not None:
        entry_idx = _selected(entry_idx, entries.shape[1])
    return _attend(plan, q, kv, win_pos, sink, pos, entries, entry_idx, rope)


# ---------------------------------------------------------------------------------------- wrappers


def _check_common(q, kv, sink, window, entries, entry_idx, ratio, lead, rope, rope_lead):
    """Shared checks; `lead` is the batch(+sequence) shape of a query row, e.g. (B, S) or (B,)."""
    h, k = q.shape[-2:]
    check_dtype("q", q, FLOAT_DTYPES)
    check_dtype("kv", kv, (q.dtype,))
    check_shape("sink", sink, (h,), "(one logit per head)")
    check_dtype("sink", sink, FLOAT_DTYPES)
    check_positive("window", window)
    check_positive("ratio", ratio)
    if entries is None and entry_idx is not None:
        raise ValueError("entry_idx: given without entries")
    if entries is not None:
        check_shape("entries", entries, (lead[0], None, k), "[B, T, K]")
        check_dtype("entries", entries, (q.dtype,))
    if entry_idx is not None:
        check_shape("entry_idx", entry_idx, (*lead, None), "[" + ", ".join(["B", "S"][: len(lead)]) + ", N]")
        check_dtype("entry_idx", entry_idx, INT_DTYPES)
    if rope is not None:
        if not isinstance(rope, tuple | list) or len(rope) != 2:
            raise ValueError("rope: expected a (cos, sin) pair or None")
        for name, table in zip(("rope cos", "rope sin"), rope, strict=True):
            check_shape(name, table, (*rope_lead, None), "[..., R/2]")
        half = rope[0].shape[-1]
        check_shape("rope sin", rope[1], (*rope_lead, half))
        if not 0 < 2 * half <= k:
            raise ValueError(f"rope: expected 0 < R <= K = {k} rope channels, got R = {2 * half}")


@functools.partial(jax.jit, static_argnames=("window", "ratio", "blocks", "backend", "interpret"))
def sparse_attention(
    q: jax.Array,
    kv: jax.Array,
    prev: jax.Array,
    start: jax.Array,
    sink: jax.Array,
    window: int,
    entries: jax.Array | None = None,
    entry_idx: jax.Array | None = None,
    ratio: int = 1,
    rope: tuple[jax.Array, jax.Array] | None = None,
    *,
    blocks: SparseAttentionBlocks | None = None,
    backend: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Chunk-form sparse attention: the arguments and semantics of `dsv4.attention.sparse_attention`.

    q [B, S, H, K] and kv [B, S, K] (K = V) of a chunk of tokens at positions start[b] + i;
    prev [B, W-1, K]: the keys of positions start-W+1 .. start-1 (ignored where negative);
    start [B] int32; sink [H]; window W; entries [B, T, K] with entry_idx [B, S, N] int32 (CSA;
    -1, or any index outside [0, T): no entry) or None (HCA: entry w visible iff w < (pos + 1) // ratio); rope: optional
    (cos, sin), each [B, S, R/2], the query position's angles, undone on the last R output
    channels (omit it to get the un-rotated output). The whole-sequence forward is start = 0 with
    prev = zeros. backend: "gpu" | "tpu" | "reference" | None (from `jax.default_backend()`);
    interpret runs the kernel in the Pallas interpreter. Returns [B, S, H, K] float32.
    """
    check_shape("q", q, (None, None, None, None), "[B, S, H, K]")
    b, s, h, k = q.shape
    check_shape("kv", kv, (b, s, k), "[B, S, K]")
    check_positive("window", window)
    check_shape("prev", prev, (b, window - 1, k), "[B, W-1, K]")
    check_shape("start", start, (b,), "[B]")
    check_dtype("start", start, INT_DTYPES)
    _check_common(q, kv, sink, window, entries, entry_idx, ratio, (b, s), rope, (b, s))
    check_dtype("prev", prev, (q.dtype,))  # after q's own dtype check: an integer q is named as q
    backend = resolve_backend(backend, interpret)
    blocks = blocks or SparseAttentionBlocks.for_backend(backend)
    _check_blocks(blocks, backend)
    if s == 0:
        return jnp.zeros(q.shape, F32)
    plan = _Plan("chunk", _kind(entries, entry_idx), window, ratio, backend, interpret, blocks)
    keys_all = jnp.concatenate([prev, kv], axis=1)  # row r holds position start - (W-1) + r
    positions = (start[:, None] + jnp.arange(s)).astype(jnp.int32)
    return _run(plan, q, keys_all, None, sink, positions, entries, entry_idx, rope)


@functools.partial(jax.jit, static_argnames=("window", "ratio", "blocks", "backend", "interpret"))
def sparse_attention_decode(
    q: jax.Array,
    kv_win: jax.Array,
    win_pos: jax.Array,
    sink: jax.Array,
    pos: jax.Array,
    window: int,
    entries: jax.Array | None = None,
    entry_idx: jax.Array | None = None,
    ratio: int = 1,
    rope: tuple[jax.Array, jax.Array] | None = None,
    *,
    blocks: SparseAttentionBlocks | None = None,
    backend: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """One query per sequence against a window buffer and compressed entries.

    q [B, H, K]; kv_win [B, Wn, K] window slots and win_pos [B, Wn] int32 their positions (-1 =
    empty; a slot counts iff pos - window < p <= pos, so a ring buffer of Wn = window slots needs no
    reordering); sink [H]; pos [B] int32 query positions; entries [B, T, K] with entry_idx [B, N]
    (CSA) or None (HCA: the first (pos + 1) // ratio entries); rope: optional (cos, sin), each
    [B, R/2]. Returns [B, H, K] float32.
    """
    check_shape("q", q, (None, None, None), "[B, H, K]")
    b, h, k = q.shape
    check_shape("kv_win", kv_win, (b, None, k), "[B, Wn, K]")
    check_shape("win_pos", win_pos, (b, kv_win.shape[1]), "[B, Wn]")
    check_dtype("win_pos", win_pos, INT_DTYPES)
    check_shape("pos", pos, (b,), "[B]")
    check_dtype("pos", pos, INT_DTYPES)
    _check_common(q, kv_win, sink, window, entries, entry_idx, ratio, (b,), rope, (b,))
    backend = resolve_backend(backend, interpret)
    blocks = blocks or SparseAttentionBlocks.for_backend(backend)
    _check_blocks(blocks, backend)
    plan = _Plan("decode", _kind(entries, entry_idx), window, ratio, backend, interpret, blocks)
    idx = None if entry_idx is None else entry_idx[:, None]
    rope = None if rope is None else (rope[0][:, None], rope[1][:, None])
    return _run(plan, q[:, None], kv_win, win_pos, sink, pos[:, None], entries, idx, rope)[:, 0]


def _check_blocks(blocks: SparseAttentionBlocks, backend: str) -> None:
    if not isinstance(blocks, SparseAttentionBlocks):
        raise ValueError(f"blocks: expected SparseAttentionBlocks, got {type(blocks).__name__}")
    check_positive("blocks.block_n", blocks.block_n)
    check_positive("blocks.num_splits", blocks.num_splits, 0)
    if backend != "gpu":
        return
    for name in ("block_q", "block_h", "block_w", "block_n"):
        value = getattr(blocks, name)
        check_positive(f"blocks.{name}", value)
        if name != "block_q" and value & (value - 1):
            raise ValueError(f"blocks.{name}: the GPU form needs a power of two, got {value}")
