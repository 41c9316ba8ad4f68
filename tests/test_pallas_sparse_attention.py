"""Pallas sparse attention (chunk and decode forms) against its references, in interpret mode on CPU.

Both kernel forms run here: the GPU form through the generic Pallas interpreter, the TPU form
(DMA gathers, SMEM indices) through the TPU interpreter. Each case draws fresh inputs from its own
seed. The interpreter fills kernel outputs with NaN before the call (checked by
`test_interpreter_poisons_unwritten_outputs`), so `_check` asserting finiteness catches any
output element a kernel fails to write.

Tolerances (kernel vs reference, |kernel - ref| <= atol + rtol * |ref|), from the largest errors
measured over 12 seeds at K = 64 and 512, CSA and HCA: float32 7.2e-7 -> atol 5e-6, rtol 1e-5;
bfloat16 3.7e-3 (the kernel rounds probabilities to bfloat16 before the value matmul, the
reference works in float32) -> atol 1e-2, rtol 1e-2.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dsv4.attention import sparse_attention as model_sparse_attention
from pallas_kernels import (
    SparseAttentionBlocks,
    _common,
    sparse_attention,
    sparse_attention_decode,
    sparse_attention_decode_reference,
    sparse_attention_reference,
)

TOL = {"float32": dict(atol=5e-6, rtol=1e-5), "bfloat16": dict(atol=1e-2, rtol=1e-2)}
SMALL = SparseAttentionBlocks(block_q=4, block_h=2, block_w=2, block_n=2)


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # "window" | "hca" | "csa"
    b: int
    s: int  # chunk length (decode: ignored)
    h: int
    k: int
    window: int
    t: int = 0  # compressed entries
    n: int = 0  # selected entries per query (CSA)
    ratio: int = 2
    dtype: str = "float32"
    rope: int = 0  # rope channels R (0 = no fused inverse RoPE)
    start: tuple = (0,)  # per-sequence chunk start (decode: query position)
    idx_mode: str = "random"  # "random": any of -1..T-1 (repeats too); "indexer": valid first, -1 after
    blocks: SparseAttentionBlocks | None = None
    backend: str = "gpu"


def _normal(rng, shape, dtype="float32"):
    return jnp.asarray(rng.standard_normal(shape, np.float32), jnp.dtype(dtype))


def _entry_idx(rng, case, positions):
    """[B, (S,) N] int32 indices; 'indexer' mode mimics the indexer: visible entries first, then -1."""
    positions = np.asarray(positions)
    if case.idx_mode == "random":
        return jnp.asarray(rng.integers(-1, case.t, (*positions.shape, case.n)), jnp.int32)
    if case.idx_mode == "out_of_range":  # distinct in-range indices, about half replaced by < -1 or >= T
        shape = (*positions.shape, case.n)
        idx = np.argsort(rng.random((*positions.shape, case.t)), axis=-1)[..., : case.n]
        wild = rng.choice([-7, -2, case.t, case.t + 3, 10**6], shape)
        return jnp.asarray(np.where(rng.random(shape) < 0.5, wild, idx), jnp.int32)
    vis = np.minimum((positions + 1) // case.ratio, case.t)[..., None]
    order = np.argsort(rng.random((*positions.shape, case.t)), axis=-1)[..., : case.n]
    ranked = np.sort(np.where(order < vis, order, case.t), axis=-1)  # visible ones first
    return jnp.asarray(np.where(ranked < case.t, ranked, -1), jnp.int32)


def _rope(rng, lead, rope):
    angles = rng.uniform(0.0, 6.0, (*lead, rope // 2)).astype(np.float32)
    return jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))


def _chunk_inputs(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    b, s, h, k = case.b, case.s, case.h, case.k
    start = np.asarray(case.start, np.int32)
    assert start.shape == (b,)
    args = dict(
        q=_normal(rng, (b, s, h, k), case.dtype),
        kv=_normal(rng, (b, s, k), case.dtype),
        prev=_normal(rng, (b, case.window - 1, k), case.dtype),
        start=jnp.asarray(start),
        sink=_normal(rng, (h,)),
        window=case.window,
        entries=None if case.kind == "window" else _normal(rng, (b, case.t, k), case.dtype),
        entry_idx=_entry_idx(rng, case, start[:, None] + np.arange(s)) if case.kind == "csa" else None,
        ratio=case.ratio,
    )
    if case.rope:
        args["rope"] = _rope(rng, (b, s), case.rope)
    return args


reference = jax.jit(sparse_attention_reference, static_argnames=("window", "ratio"))
decode_reference = jax.jit(sparse_attention_decode_reference, static_argnames=("window", "ratio"))


def _check(out, ref, dtype: str):
    assert out.dtype == jnp.float32 and out.shape == ref.shape
    assert bool(jnp.isfinite(out).all()), "an output element was left unwritten (NaN poison survived)"
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **TOL[dtype])


CHUNK_CASES = {
    # S = 13 is no multiple of block_q = 4; H = 4 in head blocks of 2; chunk starts 0 and 7.
    "csa_f32_blocks_rope": Case("csa", 2, 13, 4, 32, 5, t=9, n=4, start=(0, 7), rope=8, blocks=SMALL),
    "hca_bf16_odd_heads_rope": Case("hca", 2, 11, 3, 64, 4, t=8, dtype="bfloat16", start=(0, 3), rope=16),
    "window_only_f32": Case("window", 1, 9, 2, 16, 3, blocks=SparseAttentionBlocks(block_q=2)),
    "csa_k1_bf16": Case("csa", 2, 6, 2, 32, 2, t=5, n=1, ratio=1, dtype="bfloat16", start=(0, 2)),
    "csa_k_above_visible": Case("csa", 1, 10, 2, 32, 3, t=4, n=8, ratio=4, idx_mode="indexer"),
    "csa_headdim512_bf16": Case("csa", 1, 4, 2, 512, 4, t=6, n=3, dtype="bfloat16", start=(3,), rope=64),
    "hca_splits": Case(
        "hca", 1, 3, 2, 32, 2, t=7, ratio=1, start=(4,), rope=8, blocks=SparseAttentionBlocks(block_n=2, num_splits=3)
    ),
    "hca_splits_rows_past_s": Case(  # S = 3 in blocks of 2 query rows: the rope undone on S rows, not 4
        "hca", 1, 3, 2, 8, 4, t=6, ratio=1, rope=4, blocks=SparseAttentionBlocks(block_q=2, block_n=2, num_splits=2)
    ),
    "tpu_csa_f32_rope": Case("csa", 2, 5, 4, 32, 4, t=7, n=3, start=(0, 5), rope=8, backend="tpu"),
    "tpu_hca_bf16": Case("hca", 1, 6, 2, 32, 3, t=5, dtype="bfloat16", start=(2,), backend="tpu"),
}


@pytest.mark.parametrize("name", list(CHUNK_CASES))
def test_chunk_kernel_matches_reference(name):
    case = CHUNK_CASES[name]
    args = _chunk_inputs(case, seed=len(name) * 101 + 7)
    out = sparse_attention(**args, blocks=case.blocks, backend=case.backend, interpret=True)
    _check(out, reference(**args), case.dtype)


@pytest.mark.parametrize(
    "case",
    [
        Case("hca", 2, 12, 2, 32, 4, t=6, ratio=2, start=(0, 0)),  # whole sequence: prev unused
        Case("csa", 2, 12, 2, 32, 4, t=6, n=3, ratio=2, start=(0, 0), idx_mode="indexer"),
        Case("csa", 2, 7, 2, 32, 4, t=9, n=3, ratio=2, start=(3, 11)),  # a later chunk, random indices
    ],
    ids=["hca_whole", "csa_whole", "csa_chunk"],
)
def test_chunk_kernel_matches_model_xla_path(case):
    """Direct comparison with `dsv4.attention.sparse_attention` (the model's XLA path), same args."""
    args = _chunk_inputs(case, seed=case.s * 13 + case.n)
    if not any(case.start):
        args["prev"] = jnp.zeros_like(args["prev"])
    model = model_sparse_attention(*args.values(), block=4)
    out = sparse_attention(*args.values(), blocks=SMALL, interpret=True)
    _check(out, model, case.dtype)


@pytest.mark.parametrize("t", [9, 13], ids=["masked_dense_selection", "gathered_selection"])
def test_out_of_range_entry_indices_select_nothing(t):
    """An index outside [0, T) selects no entry, as -1 does, on every path: both kernels, their
    reference, and the model's XLA path in both of its forms (T <= 2N reads all T under a selection
    mask; otherwise it gathers, which would clamp an index >= T to the last entry)."""
    from dsv4.attention import DENSE_SELECTION

    case = Case("csa", 2, 7, 2, 32, 4, t=t, n=5, ratio=2, start=(0, 9), idx_mode="out_of_range")
    assert (t <= DENSE_SELECTION * case.n) == (t == 9)
    args = _chunk_inputs(case, seed=t)
    idx = np.asarray(args["entry_idx"])
    assert ((idx < -1) | (idx >= t)).any() and ((idx >= 0) & (idx < t)).any()
    expected = reference(**{**args, "entry_idx": jnp.asarray(np.where((idx >= 0) & (idx < t), idx, -1))})
    _check(reference(**args), expected, case.dtype)
    for backend in ("gpu", "tpu"):
        _check(sparse_attention(**args, blocks=SMALL, backend=backend, interpret=True), expected, case.dtype)
    _check(model_sparse_attention(*args.values(), block=4), expected, case.dtype)


PADDED_TILE_CASES = {  # problems smaller than 16 in every dimension: all padded when compiled for a GPU
    "chunk_hca_4_entries": Case("hca", 1, 9, 3, 8, 4, t=4, ratio=2, start=(3,)),
    "chunk_csa_rope": Case("csa", 2, 5, 2, 16, 3, t=6, n=3, start=(0, 4), rope=8),
    "decode_hca_splits": Case(
        "hca", 2, 1, 2, 8, 4, t=5, ratio=1, start=(3, 9), blocks=SparseAttentionBlocks(num_splits=2)
    ),
    "decode_csa": Case("csa", 2, 1, 4, 16, 5, t=7, n=4, ratio=2, start=(2, 20)),
}


@pytest.mark.parametrize("name", list(PADDED_TILE_CASES))
def test_tiles_padded_to_the_triton_minimum_match_reference(name, monkeypatch):
    """The compiled GPU form pads heads, keys, entries and head_dim to >= 16 (TRITON_MIN_DOT); run
    those padded tiles (rows beyond the data masked) through the interpreter."""
    monkeypatch.setattr(_common, "INTERPRET_MIN_DOT", _common.TRITON_MIN_DOT)
    case = PADDED_TILE_CASES[name]
    if case.s == 1:
        args = _decode_inputs(case, seed=len(name))
        out, ref = sparse_attention_decode(**args, blocks=case.blocks, interpret=True), decode_reference(**args)
    else:
        args = _chunk_inputs(case, seed=len(name))
        out, ref = sparse_attention(**args, blocks=case.blocks, interpret=True), reference(**args)
    _check(out, ref, case.dtype)


def test_chunk_kernel_negative_control():
    """The comparison above can fail: dropping the sink changes the output beyond tolerance."""
    args = _chunk_inputs(Case("hca", 1, 6, 2, 32, 3, t=4), seed=3)
    out = sparse_attention(**args, interpret=True)
    wrong = reference(**{**args, "sink": jnp.full_like(args["sink"], -1e9)})
    assert not np.allclose(np.asarray(out), np.asarray(wrong), **TOL["float32"])


# ------------------------------------------------------------------------------------------ decode


def _decode_inputs(case: Case, seed: int):
    """Window slots form a ring buffer of `window` slots (slot = position % W) holding positions <= pos."""
    rng = np.random.default_rng(seed)
    b, h, k = case.b, case.h, case.k
    pos = np.asarray(case.start, np.int32)
    win_pos = pos[:, None] - ((pos[:, None] - np.arange(case.window)) % case.window)
    args = dict(
        q=_normal(rng, (b, h, k), case.dtype),
        kv_win=_normal(rng, (b, case.window, k), case.dtype),
        win_pos=jnp.asarray(np.where(win_pos >= 0, win_pos, -1), jnp.int32),
        sink=_normal(rng, (h,)),
        pos=jnp.asarray(pos),
        window=case.window,
        entries=None if case.kind == "window" else _normal(rng, (b, case.t, k), case.dtype),
        entry_idx=_entry_idx(rng, case, pos) if case.kind == "csa" else None,
        ratio=case.ratio,
    )
    if case.rope:
        args["rope"] = _rope(rng, (b,), case.rope)
    return args


SPLITS2 = SparseAttentionBlocks(block_n=2, num_splits=2)
DECODE_CASES = {
    "csa_f32": Case("csa", 3, 1, 4, 32, 5, t=9, n=4, ratio=4, start=(2, 7, 40), blocks=SMALL),
    "hca_bf16_splits_rope": Case("hca", 2, 1, 4, 64, 4, t=12, dtype="bfloat16", start=(1, 30), rope=16, blocks=SPLITS2),
    "window_f32": Case("window", 2, 1, 2, 16, 3, start=(0, 9)),
    "tpu_csa_bf16_rope": Case(
        "csa", 2, 1, 4, 32, 4, t=10, n=5, dtype="bfloat16", start=(3, 25), rope=8, idx_mode="indexer", backend="tpu"
    ),
}


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_kernel_matches_reference(name):
    case = DECODE_CASES[name]
    args = _decode_inputs(case, seed=len(name) * 31 + 1)
    out = sparse_attention_decode(**args, blocks=case.blocks, backend=case.backend, interpret=True)
    _check(out, decode_reference(**args), case.dtype)


def test_decode_reference_equals_chunk_of_one():
    """Decode over a ring buffer means the same as a one-token chunk whose prev comes from the ring."""
    case = Case("csa", 2, 1, 2, 16, 4, t=8, n=3, ratio=2, start=(2, 13))
    args = _decode_inputs(case, seed=5)
    pos, w = np.asarray(args["pos"]), case.window
    ring = np.asarray(args["kv_win"])
    prev = np.stack([ring[i, (pos[i] - (w - 1) + np.arange(w - 1)) % w] for i in range(case.b)])
    cur = ring[np.arange(case.b), pos % w][:, None]
    chunk = reference(
        args["q"][:, None],
        jnp.asarray(cur),
        jnp.asarray(prev),
        args["pos"],
        args["sink"],
        w,
        args["entries"],
        args["entry_idx"][:, None],
        case.ratio,
    )
    np.testing.assert_allclose(chunk[:, 0], decode_reference(**args), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------- gradient


def test_gradient_uses_reference_vjp():
    case = Case("csa", 1, 6, 2, 16, 3, t=5, n=2, rope=8, start=(2,))
    args = _chunk_inputs(case, seed=11)
    diff = ("q", "kv", "prev", "sink", "entries", "rope")
    cot = _normal(np.random.default_rng(0), (1, 6, 2, 16))

    def loss(fn, **kw):
        return lambda *xs: jnp.sum(fn(**{**args, **dict(zip(diff, xs, strict=True))}, **kw) * cot)

    primals = [args[n] for n in diff]
    grads = jax.jit(jax.grad(loss(sparse_attention, blocks=SMALL, interpret=True), argnums=range(6)))(*primals)
    ref = jax.jit(jax.grad(loss(sparse_attention_reference), argnums=range(6)))(*primals)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ interpreter


def test_interpreter_poisons_unwritten_outputs():
    """Control for `_check`: an output element a kernel never writes comes back NaN, and an int32
    one as INT_MIN (generic interpreter) or INT_MAX (TPU interpreter), never a valid index."""

    def half_writer(o_ref, i_ref):
        o_ref[pl.ds(0, 4)] = jnp.ones((4,), jnp.float32)
        i_ref[pl.ds(0, 4)] = jnp.ones((4,), jnp.int32)

    shapes = (jax.ShapeDtypeStruct((8,), jnp.float32), jax.ShapeDtypeStruct((8,), jnp.int32))
    for interpret in (True, pltpu.InterpretParams()):
        out, idx = pl.pallas_call(half_writer, out_shape=shapes, interpret=interpret)()
        assert bool(jnp.isnan(out[4:]).all()) and bool((out[:4] == 1).all())
        poison = idx[4:]
        assert bool((idx[:4] == 1).all()) and bool(((poison < -1) | (poison >= 2**30)).all())


# ------------------------------------------------------------------------------------------ errors


def _valid_chunk():
    return _chunk_inputs(Case("csa", 2, 5, 2, 16, 3, t=4, n=2, rope=8, start=(0, 0)), seed=0)


def _bad(**changes):
    args = _valid_chunk()
    args.update(changes)
    return args


ERRORS = {
    "q_rank": (lambda a: _bad(q=a["q"][0]), r"q: expected shape \[\?, \?, \?, \?\] \[B, S, H, K\], got"),
    "kv_length": (lambda a: _bad(kv=a["kv"][:, :4]), r"kv: expected shape \[2, 5, 16\]"),
    "prev_length": (lambda a: _bad(prev=a["prev"][:, :1]), r"prev: expected shape \[2, 2, 16\]"),
    "start_dtype": (lambda a: _bad(start=a["start"].astype(jnp.float32)), "start: expected dtype"),
    "sink_heads": (lambda a: _bad(sink=jnp.zeros((3,))), r"sink: expected shape \[2\]"),
    "kv_dtype": (lambda a: _bad(kv=a["kv"].astype(jnp.bfloat16)), "kv: expected dtype"),
    "idx_dtype": (lambda a: _bad(entry_idx=a["entry_idx"].astype(jnp.float32)), "entry_idx: expected dtype"),
    "idx_shape": (lambda a: _bad(entry_idx=a["entry_idx"][:, :3]), "entry_idx: expected shape"),
    "idx_without_entries": (lambda a: _bad(entries=None), "entry_idx: given without entries"),
    "entries_width": (lambda a: _bad(entries=a["entries"][..., :8]), "entries: expected shape"),
    "rope_width": (lambda a: _bad(rope=(a["rope"][0], a["rope"][1][..., :2])), "rope sin: expected shape"),
    "window": (lambda a: _bad(window=0), "window: expected an integer >= 1"),
    "q_integer": (lambda a: _bad(q=a["q"].astype(jnp.int32)), "q: expected dtype"),  # was blamed on prev
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_chunk_wrapper_errors(name):
    make, message = ERRORS[name]
    with pytest.raises(ValueError, match=message):
        sparse_attention(**make(_valid_chunk()), interpret=True)


def test_decode_and_option_errors():
    args = _decode_inputs(DECODE_CASES["csa_f32"], seed=0)
    with pytest.raises(ValueError, match=r"win_pos: expected shape \[3, 5\]"):
        sparse_attention_decode(**{**args, "win_pos": args["win_pos"][:, :2]}, interpret=True)
    with pytest.raises(ValueError, match=r"entry_idx: expected shape \[3, \?\] \[B, N\]"):
        sparse_attention_decode(**{**args, "entry_idx": args["entry_idx"][:, None]}, interpret=True)
    with pytest.raises(ValueError, match="backend: must be one of"):
        sparse_attention_decode(**args, backend="cuda", interpret=True)
    with pytest.raises(ValueError, match="blocks.block_h: the GPU form needs a power of two"):
        sparse_attention_decode(**args, blocks=SparseAttentionBlocks(block_h=3), interpret=True)


# ---------------------------------------------------------------------------------------- lowering


def _lower(fn, args, platform):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert ("triton" if platform == "cuda" else "tpu_custom_call") in text


def _lower_all_forms(backend: str, blocks, b=2, s=64, h=64, k=512, w=128, t=1024, n=512):
    """Lower the chunk form (window only, CSA with fused RoPE) and the decode form (HCA, CSA)."""
    sd, bf, i32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.int32
    platform = "cuda" if backend == "gpu" else "tpu"
    rope = (sd((b, s, min(32, k // 2)), jnp.float32),) * 2
    chunk = (sd((b, s, h, k), bf), sd((b, s, k), bf), sd((b, w - 1, k), bf), sd((b,), i32), sd((h,), jnp.float32))
    ent, idx = sd((b, t, k), bf), sd((b, s, n), i32)
    _lower(lambda *a: sparse_attention(*a, w, blocks=blocks, backend=backend), chunk, platform)
    csa = lambda q, kv, p, st, sk, e, i, r: sparse_attention(  # noqa: E731
        q, kv, p, st, sk, w, e, i, 4, r, blocks=blocks, backend=backend
    )
    _lower(csa, (*chunk, ent, idx, rope), platform)
    dec = (sd((b, h, k), bf), sd((b, w, k), bf), sd((b, w), i32), sd((h,), jnp.float32), sd((b,), i32), ent)
    hca = lambda q, kw, wp, sk, p, e: sparse_attention_decode(  # noqa: E731
        q, kw, wp, sk, p, w, e, None, 128, blocks=blocks, backend=backend
    )
    _lower(hca, dec, platform)
    dcsa = lambda q, kw, wp, sk, p, e, i: sparse_attention_decode(  # noqa: E731
        q, kw, wp, sk, p, w, e, i, 4, blocks=blocks, backend=backend
    )
    _lower(dcsa, (*dec, sd((b, n), i32)), platform)


def test_flash_sized_kernels_lower_for_tpu():
    """The Mosaic (TPU) form lowers at Flash sizes on a CPU host: ops and shapes only, nothing runs."""
    _lower_all_forms("tpu", None)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_gpu_kernels_lower_to_valid_triton(num_splits, verify_triton_modules):
    """The Triton (CUDA) form lowers at Flash sizes and at sizes below 16 and no power of two
    (head_dim 24), and MLIR's verifier accepts every module, with and without flash-decoding splits
    (the split form once built a loop the GPU's Triton parser rejected). Nothing is compiled to
    device code."""
    blocks = SparseAttentionBlocks(num_splits=num_splits)
    _lower_all_forms("gpu", blocks)
    _lower_all_forms("gpu", blocks, b=1, s=5, h=3, k=24, w=4, t=6, n=3)
    assert len(verify_triton_modules) == 8
