"""Check and time the Pallas kernels against their references and the model's XLA path.

    python pallas_kernels/bench.py            # GPU/TPU: Flash sizes; CPU: small sizes, interpret mode
    python pallas_kernels/bench.py --only decode --iters 20
    python pallas_kernels/bench.py --sweep     # GPU: block sizes of the attention kernels

On a GPU or TPU it first checks each kernel against its reference at a moderate size, then times
Flash-sized shapes (64 heads, head_dim 512, top-k 512, window 128; decode batch 1-64 at contexts
8K-1M; prefill 4K-64K; the indexer at the prefill lengths), and prints achieved TFLOP/s and GB/s
next to the measured device ceilings (a large bf16 matmul, a large device copy) and the XLA path's
time (`dsv4.attention.sparse_attention` / `indexer_topk`). Bytes are those an op must move at
least: decode reads its window, its entries (top-k, or all visible for HCA) and q, and writes o;
prefill reads q, kv, entries (and indices) once and writes o. FLOPs count the q.k and p.v
multiply-adds over the keys actually attended (the indexer: its score matmul over visible keys).
On CPU the same checks and table run in interpret mode at small sizes (timings then only show
that everything runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dsv4.attention import indexer_topk as xla_indexer_topk  # noqa: E402
from dsv4.attention import sparse_attention as xla_sparse_attention  # noqa: E402
from pallas_kernels import (  # noqa: E402
    SparseAttentionBlocks,
    indexer_topk,
    indexer_topk_reference,
    sparse_attention,
    sparse_attention_decode,
    sparse_attention_decode_reference,
    sparse_attention_reference,
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Benchmark shapes: attention heads and head dim, window, top-k, indexer heads and dim, the decode
    batches and contexts and prefill lengths to time, and the CSA / HCA compression ratios."""

    heads: int
    head_dim: int
    window: int
    topk: int
    index_heads: int
    index_dim: int
    decode_batches: tuple
    decode_contexts: tuple
    prefill_lengths: tuple
    csa_ratio: int = 4
    hca_ratio: int = 128


FLASH = Sizes(64, 512, 128, 512, 64, 128, (1, 8, 64), (8192, 131072, 1 << 20), (4096, 16384, 65536))
SMALL = Sizes(4, 64, 8, 8, 4, 32, (1, 4), (512,), (64, 128), csa_ratio=4, hca_ratio=16)


def _time(fn, *args, iters: int) -> float:
    """Median wall time in ms of fn(*args) after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def ceilings(small: bool, iters: int) -> tuple[float, float]:
    """Measured bf16 matmul TFLOP/s and device-copy GB/s (bytes read + written)."""
    n = 1024 if small else 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    matmul = jax.jit(lambda x: x @ x)
    tflops = 2 * n**3 / (_time(matmul, a, iters=iters) * 1e-3) / 1e12
    words = (1 << 24) if small else (1 << 30)  # 64 MiB or 4 GiB of float32
    x = jnp.ones((words,), jnp.float32)
    copy = jax.jit(lambda v: v * 1.0)
    gbps = 2 * 4 * words / (_time(copy, x, iters=iters) * 1e-3) / 1e9
    return tflops, gbps


# ------------------------------------------------------------------------------------------ inputs


def _normal(key, shape, dtype=jnp.bfloat16):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _topk_indices(key, lead, n, visible):
    """Random distinct-ish valid indices below `visible` [lead] (-1 where fewer are visible)."""
    raw = jax.random.randint(key, (*lead, n), 0, jnp.maximum(visible, 1)[..., None])
    return jnp.where(jnp.arange(n) < visible[..., None], raw, -1).astype(jnp.int32)


def _ratio(sz: Sizes, kind: str) -> int:
    """The compression ratio of layer kind "csa" or "hca"; ValueError for another kind."""
    if kind not in ("csa", "hca"):
        raise ValueError(f"kind: expected 'csa' or 'hca', got {kind!r}")
    return sz.csa_ratio if kind == "csa" else sz.hca_ratio


def decode_inputs(sz: Sizes, kind: str, batch: int, context: int, dtype=jnp.bfloat16):
    """Keyword arguments of `sparse_attention_decode` for one step at position context - 1 of every row.

    `kind` "csa" adds random top-k entry indices; "hca" reads all entries (no indices).
    """
    ks = jax.random.split(jax.random.key(batch * 7 + context), 6)
    ratio = _ratio(sz, kind)
    t = context // ratio
    pos = jnp.full((batch,), context - 1, jnp.int32)
    slots = jnp.arange(sz.window)
    win_pos = (pos[:, None] - ((pos[:, None] - slots) % sz.window)).astype(jnp.int32)
    idx = _topk_indices(ks[4], (batch,), sz.topk, jnp.full((batch,), t)) if kind == "csa" else None
    return dict(
        q=_normal(ks[0], (batch, sz.heads, sz.head_dim), dtype),
        kv_win=_normal(ks[1], (batch, sz.window, sz.head_dim), dtype),
        win_pos=win_pos,
        sink=jax.random.normal(ks[2], (sz.heads,)),
        pos=pos,
        window=sz.window,
        entries=_normal(ks[3], (batch, t, sz.head_dim), dtype),
        entry_idx=idx,
        ratio=ratio,
    )


def chunk_inputs(sz: Sizes, kind: str, batch: int, length: int, dtype=jnp.bfloat16):
    """Keyword arguments of `sparse_attention` for a prefill chunk of `length` tokens from position 0.

    `kind` "csa" adds random top-k entry indices (among the visible entries); "hca" reads all entries.
    """
    ks = jax.random.split(jax.random.key(length + batch), 7)
    ratio = _ratio(sz, kind)
    t = length // ratio
    visible = jnp.broadcast_to((jnp.arange(length) + 1) // ratio, (batch, length))
    idx = _topk_indices(ks[5], (batch, length), min(sz.topk, max(t, 1)), visible) if kind == "csa" else None
    return dict(
        q=_normal(ks[0], (batch, length, sz.heads, sz.head_dim), dtype),
        kv=_normal(ks[1], (batch, length, sz.head_dim), dtype),
        prev=jnp.zeros((batch, sz.window - 1, sz.head_dim), dtype),
        start=jnp.zeros((batch,), jnp.int32),
        sink=jax.random.normal(ks[2], (sz.heads,)),
        window=sz.window,
        entries=_normal(ks[3], (batch, t, sz.head_dim), dtype),
        entry_idx=idx,
        ratio=ratio,
    )


def indexer_inputs(sz: Sizes, length: int, dtype=jnp.bfloat16):
    """Keyword arguments of `indexer_topk` for one sequence of `length` queries (CSA ratio, top-k `sz.topk`)."""
    ks = jax.random.split(jax.random.key(length), 3)
    t = length // sz.csa_ratio
    return dict(
        q=_normal(ks[0], (1, length, sz.index_heads, sz.index_dim), dtype),
        keys=_normal(ks[1], (1, t, sz.index_dim), dtype),
        weights=jax.random.normal(ks[2], (1, length, sz.index_heads)),
        positions=jnp.arange(length, dtype=jnp.int32)[None],
        ratio=sz.csa_ratio,
        k=sz.topk,
    )


# ------------------------------------------------------------------------------------------ checks


def run_checks(sz: Sizes, small: bool, interpret: bool) -> bool:
    """Kernels vs references at a moderate size; bf16 tolerance 2e-2 (tests measure <= 4e-3)."""
    ok = True
    length, batch = (64, 2) if small else (512, 2)
    cases = [
        ("chunk csa", sparse_attention, sparse_attention_reference, chunk_inputs(sz, "csa", batch, length)),
        ("chunk hca", sparse_attention, sparse_attention_reference, chunk_inputs(sz, "hca", batch, length)),
        # 8x longer: more entries than one entry chunk (the length above gives a few, padded up)
        ("chunk hca x8", sparse_attention, sparse_attention_reference, chunk_inputs(sz, "hca", 1, 8 * length)),
        (
            "decode csa",
            sparse_attention_decode,
            sparse_attention_decode_reference,
            decode_inputs(sz, "csa", batch, length * 4),
        ),
        (
            "decode hca",
            sparse_attention_decode,
            sparse_attention_decode_reference,
            decode_inputs(sz, "hca", batch, length * 16),
        ),
    ]
    for name, kernel, ref, args in cases:
        try:
            out = kernel(**args, interpret=interpret)
            err = float(jnp.max(jnp.abs(out - ref(**args))))
            good = bool(jnp.isfinite(out).all()) and err < 2e-2
        except Exception as e:  # noqa: BLE001 - report and continue: a table with a failed row beats none
            err, good = float("nan"), False
            print(f"  check {name}: raised {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        ok &= good
        print(f"  check {name:12s} max |kernel - reference| = {err:.2e}  {'ok' if good else 'FAIL'}")
    args = indexer_inputs(sz, length)
    try:
        same = bool((indexer_topk(**args, interpret=interpret) == indexer_topk_reference(**args)).all())
    except Exception as e:  # noqa: BLE001
        same = False
        print(f"  check indexer: raised {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    ok &= same
    print(f"  check {'indexer topk':12s} indices equal the reference: {'ok' if same else 'FAIL'}")
    return ok


# ------------------------------------------------------------------------------------------- table


def _attention_cost(sz: Sizes, args, decode: bool):
    """(FLOPs, minimum bytes) of one call."""
    q, entries, idx = args["q"], args["entries"], args["entry_idx"]
    item = q.dtype.itemsize
    h, k = sz.heads, sz.head_dim
    if decode:
        b = q.shape[0]
        read = idx.shape[-1] if idx is not None else entries.shape[1]
        keys = sz.window + read
        flops = 4 * b * h * k * keys
        nbytes = b * (keys * k * item + h * k * (item + 4) + (read * 4 if idx is not None else 0))
        return flops, nbytes
    b, s = q.shape[:2]
    if idx is not None:
        keys = s * (sz.window + idx.shape[-1])
    else:  # HCA: query t reads (t + 1) // ratio entries
        keys = sum(min(sz.window, t + 1) + (t + 1) // args["ratio"] for t in range(s))
    flops = 4 * b * h * k * keys
    nbytes = b * (s * h * k * (item + 4) + s * k * item + entries.shape[1] * k * item)
    nbytes += 0 if idx is None else idx.size * 4
    return flops, nbytes


def _xla_decode(args):
    """The model's XLA path for one decode step: a one-token chunk whose prev comes from the ring."""
    w, pos = args["window"], args["pos"]
    slots = (pos[:, None] - (w - 1) + jnp.arange(w - 1)) % w
    prev = jnp.take_along_axis(args["kv_win"], slots[..., None], axis=1)
    cur = jnp.take_along_axis(args["kv_win"], (pos % w)[:, None, None], axis=1)
    idx = None if args["entry_idx"] is None else args["entry_idx"][:, None]
    out = xla_sparse_attention(
        args["q"][:, None], cur, prev, pos, args["sink"], w, args["entries"], idx, args["ratio"], block=1
    )
    return out[:, 0]


def _row(label, kernel_fn, xla_fn, args, flops, nbytes, ceil, iters):
    tflops_peak, gbps_peak = ceil
    try:
        ms = _time(kernel_fn, args, iters=iters)
        tf, gb = flops / (ms * 1e-3) / 1e12, nbytes / (ms * 1e-3) / 1e9
        kernel_part = f"{ms:9.3f} {tf:7.3g} {100 * tf / tflops_peak:5.0f}% {gb:8.4g} {100 * gb / gbps_peak:5.0f}%"
    except Exception as e:  # noqa: BLE001
        ms, kernel_part = None, f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:60]}"
    try:
        xla_ms = _time(xla_fn, args, iters=iters)
        xla_part = f"{xla_ms:9.3f} {xla_ms / ms:7.2f}x" if ms else f"{xla_ms:9.3f}"
    except Exception as e:  # noqa: BLE001
        xla_part = f"FAILED {type(e).__name__}"
    print(f"{label:34s} {kernel_part}   {xla_part}", flush=True)


def run_table(sz: Sizes, interpret: bool, ceil, iters: int, only: str) -> None:
    """Time the kernels and the XLA path on the decode, prefill and indexer shapes (`only` picks some),
    printing one row per shape with throughput against the `ceil` (TFLOP/s, GB/s) ceilings."""
    print(
        f"{'op / shape':34s} {'ms':>9s} {'TFLOP/s':>7s} {'%peak':>6s} {'GB/s':>8s} {'%copy':>6s}"
        f"   {'XLA ms':>9s} {'speedup':>8s}"
    )
    statics = ("window", "ratio")
    for kind in ("csa", "hca"):
        if "decode" not in only and only:
            break
        for context in sz.decode_contexts:
            for batch in sz.decode_batches:
                args = decode_inputs(sz, kind, batch, context)
                dyn = {k: v for k, v in args.items() if k not in statics}
                st = {k: args[k] for k in statics}
                kernel = jax.jit(lambda a, st=st: sparse_attention_decode(**a, **st, interpret=interpret))
                xla = jax.jit(lambda a, st=st: _xla_decode({**a, **st}))
                flops, nbytes = _attention_cost(sz, args, decode=True)
                label = f"decode {kind} B={batch} ctx={context}"
                _row(label, kernel, xla, dyn, flops, nbytes, ceil, iters)
                del args, dyn
    for kind in ("csa", "hca"):
        if "prefill" not in only and only:
            break
        for length in sz.prefill_lengths:
            args = chunk_inputs(sz, kind, 1, length)
            dyn = {k: v for k, v in args.items() if k not in statics}
            st = {k: args[k] for k in statics}
            kernel = jax.jit(lambda a, st=st: sparse_attention(**a, **st, interpret=interpret))
            xla = jax.jit(lambda a, st=st: xla_sparse_attention(**a, **st, block=128))
            flops, nbytes = _attention_cost(sz, args, decode=False)
            _row(f"prefill {kind} S={length}", kernel, xla, dyn, flops, nbytes, ceil, iters)
            del args, dyn
    if only and "indexer" not in only:
        return
    for length in sz.prefill_lengths:
        args = indexer_inputs(sz, length)
        dyn = {k: v for k, v in args.items() if k not in ("ratio", "k")}
        ratio, k = args["ratio"], args["k"]
        kernel = jax.jit(lambda a, r=ratio, k=k: indexer_topk(**a, ratio=r, k=k, interpret=interpret))
        xla = jax.jit(
            lambda a, r=ratio, k=k: xla_indexer_topk(a["q"], a["keys"], a["weights"], a["positions"], r, k, 128)
        )
        t = length // ratio
        visible_pairs = sum((s + 1) // ratio for s in range(length))
        flops = 2 * sz.index_heads * sz.index_dim * visible_pairs
        nbytes = args["q"].nbytes + args["keys"].nbytes + args["weights"].nbytes + length * min(k, t) * 4
        _row(f"indexer top-{k} S={length}", kernel, xla, dyn, flops, nbytes, ceil, iters)


# Block sizes tried by --sweep (GPU form): heads per program, entries per chunk, warps, pipeline stages.
SWEEP = [
    SparseAttentionBlocks(block_h=bh, block_n=bn, num_splits=0, num_warps=w, num_stages=st)
    for bh in (16, 32, 64)
    for bn in (32, 64)
    for w, st in ((4, 2), (8, 2), (8, 3))
]


def run_sweep(sz: Sizes, iters: int) -> None:
    """Time every SWEEP block choice on one decode and one prefill shape (CSA), checked against the
    reference at the same shape first; prints one row per choice, fastest last per shape."""
    shapes = [
        ("decode csa B=8 ctx=131072", sparse_attention_decode, sparse_attention_decode_reference,
         decode_inputs(sz, "csa", 8, 131072)),
        ("prefill csa S=16384", sparse_attention, sparse_attention_reference, chunk_inputs(sz, "csa", 1, 16384)),
    ]  # fmt: skip
    statics = ("window", "ratio")
    for label, kernel, ref, args in shapes:
        dyn = {k: v for k, v in args.items() if k not in statics}
        st = {k: args[k] for k in statics}
        expected = jax.jit(lambda a, st=st, ref=ref: ref(**a, **st))(dyn)
        rows = []
        for blocks in SWEEP:
            fn = jax.jit(lambda a, st=st, kernel=kernel, blocks=blocks: kernel(**a, **st, blocks=blocks))
            try:
                err = float(jnp.max(jnp.abs(fn(dyn) - expected)))
                rows.append((_time(fn, dyn, iters=iters), err, blocks))
            except Exception as e:  # noqa: BLE001 - a block choice the compiler refuses is a row, not a crash
                print(f"  {label} {blocks}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
        for ms, err, blocks in sorted(rows, key=lambda r: -r[0]):
            print(f"{label:28s} h{blocks.block_h:<3d} n{blocks.block_n:<3d} warps {blocks.num_warps} "
                  f"stages {blocks.num_stages}: {ms:8.3f} ms  max err {err:.1e}", flush=True)  # fmt: skip


def main(argv=None) -> int:
    """Command-line entry point: checks, ceilings and the table (or --sweep); returns 1 if a check failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small sizes even on an accelerator")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per row (median)")
    parser.add_argument("--only", default="", help="rows to time: decode, prefill or indexer")
    parser.add_argument("--skip-checks", action="store_true", help="time only: skip the checks against the references")
    parser.add_argument("--sweep", action="store_true", help="GPU: time the SWEEP block sizes instead of the table")
    opts = parser.parse_args(argv)
    platform = jax.default_backend()
    accelerated = platform in ("gpu", "cuda", "rocm", "tpu")
    small = opts.small or not accelerated
    interpret = not accelerated
    sz = SMALL if small else FLASH
    iters = opts.iters or (2 if interpret else 10)
    print(
        f"device: {jax.devices()[0].device_kind} ({platform}); {'interpret mode, ' if interpret else ''}"
        f"{'small' if small else 'Flash'} sizes"
    )
    if opts.sweep:
        if interpret:
            parser.error("--sweep times compiled GPU kernels: it needs a GPU")
        run_sweep(sz, iters)
        return 0
    ok = True
    if not opts.skip_checks:
        print("checks against the references:")
        ok = run_checks(sz, small, interpret)
    ceil = ceilings(small, iters)
    print(f"ceilings: bf16 matmul {ceil[0]:.3g} TFLOP/s, device copy {ceil[1]:.4g} GB/s (read + write)")
    run_table(sz, interpret, ceil, iters, opts.only)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
