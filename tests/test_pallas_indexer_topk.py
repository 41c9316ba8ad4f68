"""Pallas indexer top-k against its reference (exact indices), in interpret mode on CPU.

The GPU form runs through the generic Pallas interpreter, the TPU form (chunk grid axis, VMEM
running top-k, clamped key index map) through the TPU interpreter. Indices must equal the
reference exactly, order included: both rank by score in IEEE total order with ties to the lower
index. Few indexer heads make exact ties (all relu terms zero) common, so tie-breaking is exercised
on random inputs too. Unwritten outputs would hold the interpreter's INT_MIN / INT_MAX poison, which
the exact comparison and the range check reject.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4.attention import ascending_valid_first
from dsv4.attention import indexer_topk as model_indexer_topk
from pallas_kernels import IndexerTopkBlocks, _common, indexer_topk, indexer_topk_reference

reference = jax.jit(indexer_topk_reference, static_argnames=("ratio", "k"))


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    s: int
    heads: int
    dim: int
    t: int
    k: int
    ratio: int
    start: tuple  # per-sequence first query position
    dtype: str = "float32"
    blocks: IndexerTopkBlocks | None = None
    backend: str = "gpu"


def _inputs(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(case.dtype)
    positions = np.asarray(case.start, np.int32)[:, None] + np.arange(case.s, dtype=np.int32)
    return dict(
        q=jnp.asarray(rng.standard_normal((case.b, case.s, case.heads, case.dim), np.float32), dt),
        keys=jnp.asarray(rng.standard_normal((case.b, case.t, case.dim), np.float32), dt),
        weights=jnp.asarray(rng.standard_normal((case.b, case.s, case.heads), np.float32)),
        positions=jnp.asarray(positions),
        ratio=case.ratio,
        k=case.k,
    )


CASES = {
    # S = 13 (several query blocks of 1), T = 9 in one 16-key chunk, some queries see < k entries.
    "f32_default_blocks": Case(2, 13, 3, 8, 9, 3, 4, (0, 20)),
    "k1_bf16": Case(1, 7, 2, 16, 6, 1, 1, (0,), dtype="bfloat16"),
    # k = 20 > visible for most queries (positions 0..11, ratio 1): many -1 slots.
    "k_above_visible": Case(1, 12, 2, 8, 17, 20, 1, (0,), blocks=IndexerTopkBlocks(block_q=4, block_t=8, block_h=2)),
    # S = 10 not a multiple of block_q = 4; 3 heads in sub-blocks of 2 (padded); 5 chunks of 8 keys.
    "multi_chunk_bf16": Case(
        2, 10, 3, 8, 40, 5, 2, (30, 61), dtype="bfloat16", blocks=IndexerTopkBlocks(block_q=4, block_t=8, block_h=2)
    ),
    "tiny_flash_shape": Case(1, 12, 16, 32, 24, 16, 4, (90,)),
    "tpu_multi_chunk": Case(2, 9, 2, 8, 20, 6, 1, (0, 9), backend="tpu", blocks=IndexerTopkBlocks(8, 8, 2)),
    "tpu_k1_bf16": Case(1, 5, 2, 8, 7, 1, 2, (6,), dtype="bfloat16", backend="tpu", blocks=IndexerTopkBlocks(8, 8, 2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference_exactly(name):
    case = CASES[name]
    args = _inputs(case, seed=len(name) * 17 + 3)
    out = indexer_topk(**args, blocks=case.blocks, backend=case.backend, interpret=True)
    ref = reference(**args)
    assert out.dtype == jnp.int32 and out.shape == (case.b, case.s, min(case.k, case.t))
    assert bool(((out >= -1) & (out < case.t)).all()), "poison or out-of-range index in the output"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_reference_matches_model_indexer():
    """The in-file reference selects what the model's `indexer_topk` (its XLA path) selects without
    query blocking; the reference lists by score (as the kernel does), the model by entry index."""
    case = CASES["tiny_flash_shape"]
    args = _inputs(case, seed=1)
    model = model_indexer_topk(*args.values(), 5)
    ref = reference(**args)
    np.testing.assert_array_equal(np.asarray(ascending_valid_first(ref)), np.asarray(model))
    assert not np.array_equal(np.asarray(ref), np.asarray(model))  # the orders differ: the sort above is needed


def test_ties_prefer_lower_index():
    """Hand-written expectation: every score is exactly 0, so the top-k is the lowest visible indices."""
    q = -jnp.ones((1, 3, 2, 4))  # q . key < 0 for positive keys -> relu = 0 everywhere
    keys = jnp.ones((1, 6, 4))
    weights = jnp.asarray([[[1.0, -2.0], [0.5, 0.5], [-1.0, -1.0]]])
    positions = jnp.asarray([[1, 7, 23]], jnp.int32)  # visible counts at ratio 4: 0, 2, 6
    out = indexer_topk(q, keys, weights, positions, 4, 3, interpret=True)
    np.testing.assert_array_equal(np.asarray(out), [[[-1, -1, -1], [0, 1, -1], [0, 1, 2]]])


def test_no_gradient_and_no_error_under_grad():
    args = _inputs(CASES["k1_bf16"], seed=0)
    args["q"] = args["q"].astype(jnp.float32)
    args["keys"] = args["keys"].astype(jnp.float32)

    def loss(q):
        idx = indexer_topk(q, args["keys"], args["weights"], args["positions"], 1, 2, interpret=True)
        return jnp.sum(q) * 0.0 + jnp.sum(idx.astype(jnp.float32))

    assert bool((jax.grad(loss)(args["q"]) == 0).all())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "q": a["q"][0]}, r"q: expected shape \[\?, \?, \?, \?\] \[B, S, I, J\]"),
        (lambda a: {**a, "keys": a["keys"][..., :4]}, r"keys: expected shape \[1, \?, 16\]"),
        (lambda a: {**a, "keys": a["keys"].astype(jnp.float32)}, "keys: expected dtype"),
        (lambda a: {**a, "weights": a["weights"][:, :3]}, r"weights: expected shape \[1, 7, 2\]"),
        (lambda a: {**a, "positions": a["positions"].astype(jnp.float32)}, "positions: expected dtype"),
        (lambda a: {**a, "k": 0}, "k: expected an integer >= 1"),
        (lambda a: {**a, "ratio": 0}, "ratio: expected an integer >= 1"),
    ],
)
def test_wrapper_errors(change, message):
    with pytest.raises(ValueError, match=message):
        indexer_topk(**change(_inputs(CASES["k1_bf16"], seed=0)), interpret=True)


def test_blocks_type_error():
    with pytest.raises(ValueError, match="blocks: expected IndexerTopkBlocks"):
        indexer_topk(**_inputs(CASES["k1_bf16"], seed=0), blocks=(1, 2, 3), interpret=True)


def _lower(backend: str, s=64, heads=64, dim=128, t=2048, k=512):
    sd = jax.ShapeDtypeStruct
    args = (
        sd((1, s, heads, dim), jnp.bfloat16),
        sd((1, t, dim), jnp.bfloat16),
        sd((1, s, heads), jnp.float32),
        sd((1, s), jnp.int32),
    )
    blocks = IndexerTopkBlocks(block_q=2, block_t=128, block_h=16) if backend == "gpu" else None
    platform = "cuda" if backend == "gpu" else "tpu"
    fn = jax.jit(lambda *a: indexer_topk(*a, 4, k, blocks=blocks, backend=backend))
    text = fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert ("triton" if backend == "gpu" else "tpu_custom_call") in text


def test_flash_sized_kernel_lowers_for_tpu():
    """Mosaic (TPU) lowering at Flash sizes (64 heads x 128, top-512) on a CPU host: ops and shapes only."""
    _lower("tpu")


def test_gpu_kernel_lowers_to_valid_triton(verify_triton_modules):
    """Triton (CUDA) lowering at Flash sizes and at sizes below 16 (3 heads x 8, top-4 of 6 keys),
    with MLIR's verifier run on each module; nothing is compiled to device code."""
    _lower("gpu")
    _lower("gpu", s=5, heads=3, dim=8, t=6, k=4)
    assert len(verify_triton_modules) == 2


def test_tiles_padded_to_the_triton_minimum_match_reference(monkeypatch):
    """The compiled GPU form pads heads x queries, keys and the head dim to >= 16; run those padded
    tiles through the interpreter (3 heads x 8 dims, 6 keys, top-4)."""
    monkeypatch.setattr(_common, "INTERPRET_MIN_DOT", _common.TRITON_MIN_DOT)
    rng = np.random.default_rng(4)
    b, s, heads, dim, t = 2, 9, 3, 8, 6
    args = dict(
        q=jnp.asarray(rng.standard_normal((b, s, heads, dim)), jnp.float32),
        keys=jnp.asarray(rng.standard_normal((b, t, dim)), jnp.float32),
        weights=jnp.asarray(rng.standard_normal((b, s, heads)), jnp.float32),
        positions=jnp.asarray(np.arange(s)[None].repeat(b, 0) + [[0], [3]], jnp.int32),
        ratio=2,
        k=4,
    )
    got = indexer_topk(**args, interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(indexer_topk_reference(**args)))
