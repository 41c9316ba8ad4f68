"""Decode throughput: dsv4's on-device generation loop against transformers' generate with its cache.

    python scripts/bench_decode.py                                   # contexts 1K 8K 32K x batch 1, 8
    python scripts/bench_decode.py --contexts 1024 8192 --batches 1  # a subset
    python scripts/bench_decode.py --one dsv4 8192 1                 # one measurement, printed as JSON

Both sides run the same small DeepSeek-V4 config (below) on this machine, random weights (different
on each side: a speed benchmark; tests/test_generate.py checks the two generate the same tokens),
greedy decoding of `--steps` new tokens after a random prompt of `context` tokens per row, repeated
`--repeats` times (default 3) in the same process; the fastest decode counts (per-step times on a
small shared machine vary by tens of percent from run to run), for both sides alike.

- dsv4: `dsv4.generate.generate_with_stats` (prefill in chunks of `--prefill-chunk`, then the
  `lax.while_loop` decode program); decode time excludes prefill and compilation, as measured by
  generate_with_stats around the compiled programs (`block_until_ready`).
- transformers 5.23: `DeepseekV4ForCausalLM.generate(do_sample=False, min_new_tokens=max_new_tokens)`
  with its default cache, float32, eager attention (the only one the model supports); a streamer
  timestamps every token, and decode time runs from the first to the last new token (prefill
  excluded). Its prefill materialises [B, H, S, ~1.25 S] float32 attention arrays, so contexts
  whose array exceeds `--hf-max-gib` are not run (the table says so).

Each measurement runs in a subprocess of its own (peak RSS is that run's). Decode tokens/s counts
every row: batch x steps / decode seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import BENCH_OVERRIDES as CONFIG  # noqa: E402  (shared with bench_forward, bench_train)
from _bench_common import (  # noqa: E402
    REPO,
    SEED,
    bench_config,
    bench_main,
    check_no_jax,
    hf_config_dict,
    peak_rss_bytes,
    positive_int,
    run_child,
    torch_device,
)


def _prompts(batch: int, context: int):
    import numpy as np

    return np.random.default_rng(SEED).integers(2, CONFIG["vocab_size"], (batch, context))


# ----------------------------------------------------------------------------- one measurement


def measure_dsv4(context: int, batch: int, args) -> dict:
    import jax

    import dsv4
    from dsv4.config import RuntimeConfig
    from dsv4.generate import generate_with_stats

    model = dsv4.init_model(bench_config(), RuntimeConfig(dtype=args.dtype), seed=SEED)
    runs = [
        generate_with_stats(
            model, _prompts(batch, context).tolist(), args.steps + 1, stop_tokens=(),
            cache_format=args.cache_format, prefill_chunk=min(args.prefill_chunk, context),
        )  # fmt: skip
        for _ in range(args.repeats)
    ]
    r = min(runs, key=lambda run: run.decode_seconds / run.decode_steps)  # programs compile once (cached)
    return {
        "decode_tok_s": r.decode_tokens_per_second,
        "ms_per_step": 1e3 * r.decode_seconds / r.decode_steps,
        "prefill_tok_s": r.prefill_tokens_per_second,
        "compile_s": runs[0].compile_seconds,  # later runs reuse the compiled programs
        "cache_bytes": r.cache_bytes,
        "backend": f"jax {jax.__version__} {jax.default_backend()}, weights {args.dtype}",
    }


class _TokenClock:
    """A transformers streamer that only records when each generated token arrives."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def measure_hf(context: int, batch: int, args) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from release_fixture import build_hf_model

    device = torch_device()  # on a GPU machine both sides run on the GPU
    model = build_hf_model(hf_config_dict(), SEED).to(device)
    ids = torch.from_numpy(_prompts(batch, context)).long().to(device)
    with torch.no_grad():  # warm-up: first-call costs are not decode throughput
        model.generate(ids[:, :16], attention_mask=torch.ones_like(ids[:, :16]), max_new_tokens=4,
                       min_new_tokens=4, do_sample=False)  # fmt: skip
    best = None
    for _ in range(args.repeats):
        clock = _TokenClock()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.steps + 1,
                           min_new_tokens=args.steps + 1, do_sample=False, streamer=clock)  # fmt: skip
        first, last = clock.times[1], clock.times[-1]  # times[0]: the prompt; times[1]: token 0
        if best is None or last - first < best[2] - best[1]:
            best = (start, first, last, len(clock.times) - 2)
    start, first, last, steps = best
    check_no_jax("bench_decode")
    return {
        "decode_tok_s": batch * steps / (last - first),
        "ms_per_step": 1e3 * (last - first) / steps,
        "prefill_tok_s": batch * context / (first - start),
        "backend": f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
        f"attn {model.config._attn_implementation}",
    }


def measure_one(which: str, context: int, batch: int, args) -> dict:
    fn = measure_dsv4 if which == "dsv4" else measure_hf
    load_before = os.getloadavg()[0]
    out = fn(context, batch, args)
    load = max(load_before, os.getloadavg()[0])  # 1-minute load average: above the core count = contention
    out.update(which=which, context=context, batch=batch, peak_rss=peak_rss_bytes(), load=load)
    return out


# ---------------------------------------------------------------------------------- the driver


def measure_in_child(which: str, context: int, batch: int, args) -> dict:
    """One measurement in a fresh interpreter; failures (timeout, OOM kill, exception) become errors."""
    argv = ["--one", which, str(context), str(batch), "--steps", str(args.steps), "--dtype", args.dtype]
    argv += ["--cache-format", args.cache_format, "--prefill-chunk", str(args.prefill_chunk)]
    return run_child(Path(__file__).resolve(), argv + ["--repeats", str(args.repeats)], args.timeout)


def hf_skip_reason(context: int, batch: int, args) -> str | None:
    """Why transformers is not run at this size (its eager prefill attention would not fit), or None."""
    gib = batch * CONFIG["num_attention_heads"] * context * (context * 5 // 4) * 4 / 2**30
    if gib <= args.hf_max_gib:
        return None
    return f"not run: eager prefill attention needs {gib:,.1f} GiB per [B, H, S, 1.25 S] array"


def _cell(r: dict, key: str, fmt: str) -> str:
    return "-" if "error" in r else format(r[key], fmt)


def _row(context: int, batch: int, ours: dict, theirs: dict) -> str:
    speedup = "-" if "error" in ours or "error" in theirs else f"{ours['decode_tok_s'] / theirs['decode_tok_s']:.1f}x"
    cells = [f"{context:,}", str(batch), _cell(ours, "decode_tok_s", ",.1f"), _cell(ours, "ms_per_step", ".1f"),
             _cell(theirs, "decode_tok_s", ",.1f") if "error" not in theirs else theirs["error"].split(":")[0],
             _cell(theirs, "ms_per_step", ".1f"), speedup]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def _note(name: str, r: dict) -> str:
    if "error" in r:
        return f"{name} {r.get('context', '')}: {r['error']}"
    extra = f", cache {r['cache_bytes']:,} bytes, compile {r['compile_s']:.1f} s" if "cache_bytes" in r else ""
    return (f"{name} context {r['context']:,} batch {r['batch']}: prefill {r['prefill_tok_s']:,.0f} tokens/s"
            f"{extra}, peak RSS {r['peak_rss'] / 2**30:.2f} GiB, load average {r.get('load', 0):.1f}; "
            f"{r['backend']}")  # fmt: skip


def main_table(args) -> None:
    rows, notes = [], []
    for context in args.contexts:
        for batch in args.batches:
            ours = measure_in_child("dsv4", context, batch, args)
            print(f"# dsv4 {context} x {batch}: {json.dumps(ours)}", file=sys.stderr, flush=True)
            skip = hf_skip_reason(context, batch, args)
            theirs = {"error": skip} if skip else measure_in_child("hf", context, batch, args)
            print(f"# transformers {context} x {batch}: {json.dumps(theirs)}", file=sys.stderr, flush=True)
            rows.append(_row(context, batch, ours, theirs))
            notes += [
                _note("dsv4", {"context": context, **ours}),
                _note("transformers", {"context": context, **theirs}),
            ]
    cores = len(os.sched_getaffinity(0))
    print(f"Greedy decode, {args.steps} steps after a random prompt, best of {args.repeats}; {cores} CPU cores; "
          f"dsv4 weights {args.dtype}, cache {args.cache_format}; transformers float32")  # fmt: skip
    print(f"config: ModelConfig.tiny({', '.join(f'{k}={v}' for k, v in CONFIG.items())})\n")
    print("| context | batch | dsv4 tokens/s | dsv4 ms/step | transformers tokens/s | transformers ms/step | speedup |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print("\n" + "\n".join(f"- {n}" for n in notes))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=positive_int, default=32, help="decode steps timed (after token 0)")
    p.add_argument(
        "--repeats", type=positive_int, default=3, help="generations per measurement; the fastest decode counts"
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dsv4 weight dtype")
    p.add_argument("--cache-format", choices=["bfloat16", "compact", "float32"], default="bfloat16")
    p.add_argument("--prefill-chunk", type=int, default=4096, help="dsv4 prefill chunk (memory bound)")
    p.add_argument("--hf-max-gib", type=float, default=2.0, help="largest transformers attention array")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per measurement")
    p.add_argument("--one", nargs=3, metavar=("WHICH", "CONTEXT", "BATCH"), help="dsv4|hf, print JSON")
    args = p.parse_args(argv)
    if args.one and args.one[0] not in ("dsv4", "hf"):
        p.error("--one takes dsv4 or hf")
    return args


def main(argv=None) -> None:
    def measure_here(args):
        return measure_one(args.one[0], int(args.one[1]), int(args.one[2]), args)

    bench_main(argv, parse_args, measure_here, main_table)


if __name__ == "__main__":
    main()
