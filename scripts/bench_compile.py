"""Compile time against depth, and what the persistent compilation cache saves.

    python scripts/bench_compile.py                       # 4, 12 and 43 layers (Flash's count)
    python scripts/bench_compile.py --layers 4 --seq 256  # a quick check

For each depth, the benchmark config's widths (scripts/_bench_common.py) with the first `layers`
entries of Flash's layer pattern (sliding, sliding, then CSA/HCA pairs; 3 hash-routed layers), in
bfloat16 (dsv4's default runtime dtype). Three fresh interpreters per depth:

1. the jitted whole-sequence forward at [1, --seq]: seconds to trace and lower, then to compile;
2. `generate_with_stats` on a --prompt-len prompt for --new tokens with an empty persistent cache
   (`dsv4.xla_flags.enable_compile_cache` in a temporary directory): its compile seconds
   (prefill and decode programs: tracing, lowering, compiling), prefill and decode seconds;
3. the same generation again, with the cache the previous run filled;
4. per-call costs that grow with depth: `dsv4.decode.decode_step` at batch 1 once compiled (the
   median of 20 calls, milliseconds), and `nnx.split(model)` alone, which every call of the jitted
   entry points paid until they took the model as a pytree argument.

Each run is a subprocess of its own, so no in-memory cache of an earlier run helps it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import bench_config, bench_main, run_child  # noqa: E402


def depth_changes(layers: int) -> dict:
    """The benchmark config changed to `layers` layers of Flash's pattern (its MTP block: ratio 0)."""
    from dsv4.config import ModelConfig

    flash = ModelConfig.flash()
    pattern = flash.compress_ratios[: flash.num_hidden_layers]
    if not 1 <= layers <= len(pattern):
        raise SystemExit(f"--layers: each must be in 1..{len(pattern)}, got {layers}")
    return {
        "num_hidden_layers": layers,
        "compress_ratios": tuple(pattern[:layers]) + (0,),
        "num_hash_layers": min(flash.num_hash_layers, layers),
    }


def measure_forward(layers: int, seq: int) -> dict:
    import jax.numpy as jnp

    from dsv4.config import RuntimeConfig
    from dsv4.model import _forward, init_model

    model = init_model(bench_config(depth_changes(layers)), RuntimeConfig(dtype="bfloat16"), 0)
    t0 = time.perf_counter()
    lowered = _forward.lower(model, jnp.zeros((1, seq), jnp.int32))
    t1 = time.perf_counter()
    lowered.compile()
    return {"lower_s": t1 - t0, "compile_s": time.perf_counter() - t1}


def measure_generate(layers: int, prompt_len: int, new: int, cache_dir: str) -> dict:
    from dsv4.config import RuntimeConfig
    from dsv4.generate import generate_with_stats
    from dsv4.model import init_model
    from dsv4.xla_flags import enable_compile_cache

    enable_compile_cache({"DSV4_COMPILE_CACHE": cache_dir})
    model = init_model(bench_config(depth_changes(layers)), RuntimeConfig(dtype="bfloat16"), 0)
    r = generate_with_stats(model, [[5] * prompt_len], new, stop_tokens=())
    return {"compile_s": r.compile_seconds, "prefill_s": r.prefill_seconds, "decode_s": r.decode_seconds}


CALLS = 20
KINDS = ("forward", "generate", "calls")


def measure_calls(layers: int) -> dict:
    import statistics

    import numpy as np
    from flax import nnx

    from dsv4.cache import init_cache
    from dsv4.config import RuntimeConfig
    from dsv4.decode import decode_step
    from dsv4.model import init_model

    cfg = bench_config(depth_changes(layers))
    model = init_model(cfg, RuntimeConfig(dtype="bfloat16"), 0)
    cache = init_cache(cfg, 1, CALLS + 1, "bfloat16")
    token = np.zeros(1, np.int32)
    logits, cache = decode_step(model, token, cache)  # compiles
    steps, splits = [], []
    for _ in range(CALLS):
        t0 = time.perf_counter()
        logits, cache = decode_step(model, token, cache)
        logits.block_until_ready()
        t1 = time.perf_counter()
        nnx.split(model)
        steps.append(t1 - t0)
        splits.append(time.perf_counter() - t1)
    return {"decode_step_ms": 1e3 * statistics.median(steps), "split_ms": 1e3 * statistics.median(splits)}


def measure_one(args) -> dict:
    import jax

    if jax.config.jax_compilation_cache_dir:
        raise SystemExit("JAX_COMPILATION_CACHE_DIR is set: cached programs would not be compiled; unset it")
    kind, layers = args.one[0], int(args.one[1])
    if kind == "forward":
        return measure_forward(layers, args.seq)
    if kind == "calls":
        return measure_calls(layers)
    return measure_generate(layers, args.prompt_len, args.new, args.cache_dir)


def main_table(args) -> None:
    script = Path(__file__).resolve()
    common = ["--seq", str(args.seq), "--prompt-len", str(args.prompt_len), "--new", str(args.new)]
    rows = []
    for layers in args.layers:
        depth_changes(layers)  # validate before any run
        fwd = run_child(script, ["--one", "forward", str(layers), *common], args.timeout)
        with tempfile.TemporaryDirectory(prefix="dsv4-compile-cache-") as cache:
            gen = ["--one", "generate", str(layers), "--cache-dir", cache, *common]
            cold = run_child(script, gen, args.timeout)
            warm = run_child(script, gen, args.timeout)
        calls = run_child(script, ["--one", "calls", str(layers)], args.timeout)
        rows.append((layers, fwd, cold, warm, calls))
        print(f"# layers {layers}: forward {fwd}, generate {cold}, cached {warm}, calls {calls}", file=sys.stderr)

    def cell(r: dict, key: str) -> str:
        return r["error"].split(":")[0] if "error" in r else f"{r[key]:.1f}"

    print(f"\nforward at [1, {args.seq}]; generation: {args.prompt_len}-token prompt, {args.new} new tokens; seconds\n")
    print("| layers | forward: trace + lower | forward: compile | generate: compile | prefill | decode "
          "| generate from the cache: compile | decode_step: ms per call | nnx.split: ms |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for layers, fwd, cold, warm, calls in rows:
        print(f"| {layers} | {cell(fwd, 'lower_s')} | {cell(fwd, 'compile_s')} | {cell(cold, 'compile_s')} "
              f"| {cell(cold, 'prefill_s')} | {cell(cold, 'decode_s')} | {cell(warm, 'compile_s')} "
              f"| {cell(calls, 'decode_step_ms')} | {cell(calls, 'split_ms')} |")
    for layers, *runs in rows:
        for name, r in zip(("forward", "generate", "generate from the cache", "calls"), runs, strict=True):
            if "error" in r:
                print(f"- layers {layers} {name}: {r['error']}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 12, 43], help="depths to measure")
    p.add_argument("--seq", type=int, default=1024, help="forward sequence length")
    p.add_argument("--prompt-len", type=int, default=1000, help="generation prompt length")
    p.add_argument("--new", type=int, default=8, help="generated tokens")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run")
    p.add_argument("--one", nargs=2, metavar=("KIND", "LAYERS"), help="forward|generate|calls at LAYERS, print JSON")
    p.add_argument("--cache-dir", help="with --one generate: the persistent cache directory")
    args = p.parse_args(argv)
    if args.one and (args.one[0] not in KINDS or (args.one[0] == "generate" and not args.cache_dir)):
        p.error("--one takes forward, generate (with --cache-dir) or calls")
    return args


def main(argv=None) -> None:
    bench_main(argv, parse_args, measure_one, main_table)


if __name__ == "__main__":
    main()
