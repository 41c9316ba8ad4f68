"""Where one layer's forward time goes: each part of a CSA layer and of a sliding-window block, jitted alone.

    python scripts/bench_layer_parts.py [--seq 4096] [--repeats 3] [--set KEY=VALUE ...]

Builds the benchmark config of scripts/bench_forward.py (random weights, float32), takes its first
CSA attention and the second block of an all-sliding-window variant, and times (best of `repeats`
after a compile run) the whole part and its pieces on random inputs of one sequence of `--seq`
tokens. The pieces overlap in what XLA would fuse across them, so they need not add up to the whole.
Two rows compare the indexer's selection of one query block (its last, [128, T + k] scores as a
merge sees them) by `dsv4.selection.top_k_ascending` and by `lax.top_k`.
Prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import bench_config, parse_changes  # noqa: E402


def _best_ms(fn, args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def csa_parts(cfg, seq: int, rng) -> list[tuple[str, object, tuple]]:
    """(name, jitted fn, args) for the first CSA layer's attention and its pieces."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsv4 import attention as A
    from dsv4.config import RuntimeConfig
    from dsv4.model import init_model
    from dsv4.selection import top_k_ascending

    model = init_model(cfg, RuntimeConfig(dtype="float32"), 0)
    att = next(m for _, m in nnx.iter_graph(model) if isinstance(m, A.Attention) and m.kind == "csa")
    x = jnp.asarray(rng.standard_normal((1, seq, cfg.hidden_size)), jnp.float32)
    start, n = jnp.zeros((1,), jnp.int32), jnp.full((1,), seq, jnp.int32)
    positions = start[:, None] + jnp.arange(seq)
    cache = att.empty_cache(1, seq, jnp.float32)
    entries = att.compressor.update(x, start, n, cache.compressor).entries.read()
    keys = att.indexer.compressor.update(x, start, n, cache.indexer).entries.read()
    iq, iw = att.indexer.queries(x, att.q_norm(att.wq_a(x)), positions)
    idx = A.indexer_topk(iq, keys, iw, positions, att.ratio, cfg.index_topk, 128)
    # the last query block's scores after the running best's k slots: the longest row a merge selects from
    last = slice(max(0, seq - 128), seq)
    k_sel = min(cfg.index_topk, keys.shape[1])
    block_scores = A.index_scores(iq[:, last], keys, iw[:, last], positions[:, last], att.ratio)
    merge_row = jnp.concatenate([jnp.full((1, block_scores.shape[1], k_sel), -jnp.inf), block_scores], -1)
    h, k, w = cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
    q = jnp.asarray(rng.standard_normal((1, seq, h, k)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((1, seq, k)), jnp.float32)
    prev, sink = jnp.zeros((1, w - 1, k)), jnp.zeros((h,))
    return [
        ("CSA attention layer (whole)", nnx.jit(lambda m, x: m(x, start, n, cache)[0]), (att, x)),
        ("  compressor", nnx.jit(lambda m, x: m.compressor.update(x, start, n, cache.compressor).entries.read()),
         (att, x)),
        ("  indexer compressor", nnx.jit(lambda m, x: m.indexer.compressor.update(x, start, n, cache.indexer)
                                         .entries.read()), (att, x)),
        ("  indexer queries", nnx.jit(lambda m, x: m.indexer.queries(x, m.q_norm(m.wq_a(x)), positions)), (att, x)),
        ("  indexer top-k", jax.jit(lambda a, b, c: A.indexer_topk(a, c, b, positions, att.ratio, cfg.index_topk,
                                                                    128)), (iq, iw, keys)),
        ("    one query block's selection, sort-free", jax.jit(lambda s: top_k_ascending(s, k_sel)), (merge_row,)),
        ("    the same with lax.top_k", jax.jit(lambda s: jax.lax.top_k(s, k_sel)[1]), (merge_row,)),
        ("  window attention alone", jax.jit(lambda q, kv: A.sparse_attention(q, kv, prev, start, sink, w)), (q, kv)),
        ("  window + selected entries", jax.jit(lambda q, kv, e, i: A.sparse_attention(q, kv, prev, start, sink, w,
                                                                                        e, i, att.ratio)),
         (q, kv, entries, idx)),
    ]  # fmt: skip


def block_parts(cfg, seq: int, rng) -> list[tuple[str, object, tuple]]:
    """(name, jitted fn, args) for a sliding-window block and its pieces."""
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    from dsv4.config import RuntimeConfig
    from dsv4.mhc import HyperConnection, collapse
    from dsv4.model import Block, init_model

    sliding = dataclasses.replace(cfg, compress_ratios=(0,) * len(cfg.compress_ratios))
    model = init_model(sliding, RuntimeConfig(dtype="float32"), 0)
    blk = [m for _, m in nnx.iter_graph(model) if isinstance(m, Block)][1]  # block 0 is hash-routed
    streams = jnp.asarray(rng.standard_normal((1, seq, cfg.hc_mult, cfg.hidden_size)), jnp.float32)
    x = streams[:, :, 0]
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, seq)), jnp.int32)
    start, n = jnp.zeros((1,), jnp.int32), jnp.full((1,), seq, jnp.int32)
    cache = blk.attn.empty_cache(1, seq, jnp.float32)

    def mhc(m, s, out):  # one mHC step: weights, collapse, expand
        pre, post, comb = m.hc_attn.weights(s)
        return HyperConnection.expand(out + collapse(s, pre), s, post, comb)

    return [
        ("sliding-window block (whole)", nnx.jit(lambda m, s: m(s, start, n, tokens)[0]), (blk, streams)),
        ("  attention (with its norm)", nnx.jit(lambda m, x: m.attn(m.attn_norm(x), start, n, cache)[0]), (blk, x)),
        ("  MoE (with its norm)", nnx.jit(lambda m, x: m.ffn(m.ffn_norm(x), tokens)), (blk, x)),
        ("  one mHC step (of two)", nnx.jit(mhc), (blk, streams, x)),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096, help="tokens in the one sequence")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the compile run; the best counts")
    parser.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="change config fields (JSON values)")
    args = parser.parse_args(argv)
    import numpy as np

    from dsv4.xla_flags import prefer_plain_cpu_fusions

    prefer_plain_cpu_fusions()  # as the other benchmarks and the console scripts run
    cfg = bench_config(parse_changes(args.set))
    if 4 not in cfg.compress_ratios[: cfg.num_hidden_layers]:
        parser.error("the config has no CSA layer (compress ratio 4)")
    rng = np.random.default_rng(0)
    print(f"S = {args.seq}, {cfg.num_attention_heads} heads, best of {args.repeats} after a compile run\n")
    print("| part | ms |\n|---|---:|")
    for name, fn, fn_args in csa_parts(cfg, args.seq, rng) + block_parts(cfg, args.seq, rng):
        print(f"| {name} | {_best_ms(fn, fn_args, args.repeats):.1f} |", flush=True)


if __name__ == "__main__":
    main()
