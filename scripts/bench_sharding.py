"""Decode-step time and collective volume per sharding strategy, on 8 fake CPU devices.

For each (strategy, mesh): shard a randomly initialised ModelConfig.tiny (optionally with more
experts), prefill a batch, compile one decode step ahead of time, time it, and list every
collective of the compiled program (from its HLO) with the bytes one device sends
(`sharding.collectives`). The analytic minimum (`sharding.collectives.minimum_bytes`) counts only
token activations to and from the experts (and, for tensor-parallel heads, the attention sums);
weights never need to move. The ratio measured / minimum is the figure of merit.

    python scripts/bench_sharding.py                       # tiny: 8 experts, top-2
    python scripts/bench_sharding.py --experts 64 --top-k 6   # Flash-like routing fan-out

CPU timings say little about accelerators (the fake devices share the host's cores); the bytes
are what the compiled program would move on any backend with the padded exchange. On GPU/TPU the
all_to_all strategies use ragged_all_to_all, which moves only the routed rows.

With fewer than 8 devices (one GPU, say) every strategy runs on the 1x1x1 mesh instead: the
single-device decode step each strategy compiles to, with no collectives to count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dsv4.config import ModelConfig, RuntimeConfig  # noqa: E402
from dsv4.decode import _device_batch, decode_fn, prefill  # noqa: E402
from dsv4.model import init_model  # noqa: E402
from sharding.collectives import collectives, expert_weight_gathers, minimum_bytes  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402
from sharding.placement import init_sharded_cache, shard_model  # noqa: E402
from sharding.rules import Strategy, get_rules, get_strategy  # noqa: E402

# dp_ep with the split / all_to_all / all_gather exchange instead of psum: the alternative we measured.
DP_EP_GATHER = Strategy("dp_ep[a2a+gather]", get_rules("dp_ep"), "all_to_all")
RUNS = [
    ("dp_ep", (2, 4, 1)),
    ("dp_ep", (1, 8, 1)),
    (DP_EP_GATHER, (2, 4, 1)),
    ("dp_ep_a2a", (2, 4, 1)),
    ("dp_ep_a2a", (1, 8, 1)),
    ("tp_ep", (1, 4, 2)),
    ("tp_ep", (1, 8, 1)),
    ("replicated", (2, 4, 1)),
]
SINGLE_DEVICE_RUNS = [(name, (1, 1, 1)) for name in ("dp_ep", "dp_ep_a2a", "tp_ep", "replicated")]


def runs_for(device_count: int) -> list:
    """RUNS on 8 or more devices, else every strategy on the one-device mesh."""
    return RUNS if device_count >= 8 else SINGLE_DEVICE_RUNS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--verbose", action="store_true", help="print every collective")
    p.add_argument("--only", nargs="*", help="strategy names to run (default: all)")
    return p.parse_args(argv)


def bench_one(model, cfg, strategy, shape, args) -> dict:
    """Time one decode step and account for its collectives."""
    mesh = make_mesh(*shape)
    m = shard_model(model, mesh, strategy)
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, cfg.vocab_size, (args.batch, args.prompt)).astype(np.int32)
    cache = init_sharded_cache(cfg, args.batch, args.max_len, args.dtype, mesh, strategy)
    logits, cache = prefill(m, tokens, cache, last_only=True)
    step_tokens = _device_batch(m, np.asarray(logits).argmax(-1))
    compiled = decode_fn.lower(m, step_tokens, cache).compile()
    found = collectives(compiled.as_text(), jax.device_count())
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        logits, cache = compiled(m, step_tokens, cache)
        logits.block_until_ready()
        times.append(time.perf_counter() - start)
    act = np.dtype(args.dtype).itemsize
    minimum = minimum_bytes(cfg, mesh, strategy, args.batch, args.max_len, act)
    return {
        "strategy": get_strategy(strategy).name,
        "mesh": "x".join(map(str, shape)),
        "ms": 1e3 * statistics.median(times[2:] or times),
        "found": found,
        "wire": sum(c.wire_bytes for c in found),
        "minimum": sum(minimum.values()),
        "weight_gathers": len(expert_weight_gathers(found, cfg.hidden_size, cfg.moe_intermediate_size)),
    }


def ops_summary(found) -> str:
    counts: dict[str, int] = {}
    for c in found:
        counts[c.op] = counts.get(c.op, 0) + 1
    return ", ".join(f"{n} {op}" for op, n in sorted(counts.items())) or "none"


def main(argv=None) -> None:
    from dsv4.xla_flags import prefer_plain_cpu_fusions

    prefer_plain_cpu_fusions()  # before JAX starts: what the dsv4 console scripts do
    args = parse_args(argv)
    cfg = ModelConfig.tiny(n_routed_experts=args.experts, num_experts_per_tok=args.top_k)
    model = init_model(cfg, RuntimeConfig(dtype=args.dtype), seed=0)
    print(f"ModelConfig.tiny: {cfg.num_hidden_layers} layers, D={cfg.hidden_size}, E={cfg.n_routed_experts}, "
          f"K={cfg.num_experts_per_tok}; batch {args.batch}, cache {args.max_len}, {args.dtype}; "
          f"{jax.device_count()} {jax.devices()[0].platform} devices")  # fmt: skip
    print("| strategy | mesh (d,e,t) | decode step ms | collectives | bytes/device | analytic min | ratio | "
          "expert-weight gathers |")  # fmt: skip
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for strategy, shape in runs_for(jax.device_count()):
        if args.only and get_strategy(strategy).name not in args.only:
            continue
        r = bench_one(model, cfg, strategy, shape, args)
        ratio = f"{r['wire'] / r['minimum']:.2f}" if r["minimum"] else ("-" if not r["wire"] else "inf")
        print(f"| {r['strategy']} | {r['mesh']} | {r['ms']:.2f} | {ops_summary(r['found'])} | {r['wire']:.0f} | "
              f"{r['minimum']:.0f} | {ratio} | {r['weight_gathers']} |", flush=True)  # fmt: skip
        if args.verbose:
            for c in r["found"]:
                print(f"    {c.op:>18} group {c.group} {c.shapes} -> {c.wire_bytes:.0f} B")


if __name__ == "__main__":
    main()
