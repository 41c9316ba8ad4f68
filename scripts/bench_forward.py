"""Whole-sequence forward speed and peak memory: dsv4 (JAX, jitted) against transformers (PyTorch eager).

    python scripts/bench_forward.py                      # S = 1024, 4096, 16384
    python scripts/bench_forward.py --seqs 256           # smoke check, a few seconds per run
    python scripts/bench_forward.py --one dsv4 4096      # one measurement, printed as JSON
    python scripts/bench_forward.py --seqs 4096 --set num_attention_heads=16   # another config

Both sides run the same small DeepSeek-V4 config in float32 on this machine's CPUs, batch
`--batch` (default 1), random tokens. dsv4: `dsv4.forward` (the jitted [B, S] -> logits forward,
`--impl xla` blockwise attention or `reference` dense masks), timed after a compile run with
`block_until_ready`. transformers 5.23: `DeepseekV4ForCausalLM` (its eager attention; the model
supports no other), `use_cache=False` under `torch.no_grad()`, timed after a warm-up run. Time is
the best of `--repeats` runs. Each (implementation, S) runs in a subprocess of its own, so its peak
RSS (VmHWM, `_bench_common.peak_rss_bytes`: interpreter, libraries, weights, compilation and
the forward) belongs to that run alone.

Weights are random and differ between the two sides (dsv4 `init_model(cfg, seed=0)`, transformers
`tests/release_fixture.build_hf_model(cfg.to_hf_dict(), seed=0)`): this measures speed, not
agreement; tests/test_parity.py checks that the two compute the same function.

transformers' eager attention materialises [B, H, S, S + S/m] float32 logits, mask and
probabilities (1.8 GiB peak RSS measured at S = 4096; at 16384 each such array is 5 GiB and
several live at once: tens of GiB), so S above `--hf-max-seq` (default 4096 on CPU, 16384 on a
GPU) is not run for it.

On a GPU machine both sides run on the GPU (transformers on `cuda`, synchronised after each
forward; `DSV4_BENCH_TORCH_DEVICE` overrides), and the memory columns report each side's peak
device memory (JAX `peak_bytes_in_use`, torch `max_memory_allocated`) instead of peak RSS.

The config (ModelConfig.tiny with these overrides; everything else is the Flash release value,
e.g. hc_mult 4, one shared expert, YaRN on CSA/HCA layers, an MTP block the forward does not run):

    hidden_size 256, num_hidden_layers 4, compress_ratios (4, 128, 4, 128, 0) (CSA, HCA, CSA, HCA;
    last = MTP), n_routed_experts 8, num_experts_per_tok 2, moe_intermediate_size 256,
    num_hash_layers 1, num_attention_heads 4, head_dim 128, qk_rope_head_dim 64, q_lora_rank 128,
    o_groups 2, o_lora_rank 128, sliding_window 128, index_n_heads 8, index_head_dim 128,
    index_topk 128, vocab_size 4096

(index_head_dim is 128, not 64: the indexer rotates its last qk_rope_head_dim = 64 channels, so
the config validation requires index_head_dim > 64.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402  (the config is shared with bench_decode and bench_train)
    BENCH_OVERRIDES,
    REPO,
    SEED,
    backend_text,
    bench_config,
    bench_main,
    check_no_jax,
    config_text,
    device_peak_bytes,
    hf_config_dict,
    parse_changes,
    peak_rss_bytes,
    positive_int,
    random_tokens,
    run_child,
    torch_device,
    torch_sync,
)

__all__ = ["BENCH_OVERRIDES", "bench_config"]


def _time_best(run, repeats: int) -> dict:
    """Wall seconds of the first call (compile/warm-up) and the best of `repeats` further calls, with
    the process CPU seconds (all threads) of that best call: CPU time well above wall time x cores
    means other processes competed for the cores."""
    t0 = time.perf_counter()
    run()
    out = {"first_s": time.perf_counter() - t0, "best_s": float("inf")}
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if wall < out["best_s"]:
            out.update(best_s=wall, best_cpu_s=cpu)
    return out


# ------------------------------------------------------------------------------ one measurement


def measure_dsv4(seq: int, batch: int, impl: str, query_block: int, repeats: int, changes: dict) -> dict:
    import jax

    import dsv4
    from dsv4.config import RuntimeConfig
    from dsv4.model import init_model

    cfg = bench_config(changes)
    rt = RuntimeConfig(dtype="float32", attention_impl=impl, query_block=query_block)
    model = init_model(cfg, rt, SEED)
    tokens = jax.device_put(random_tokens(cfg.vocab_size, batch, seq))
    rss_before = peak_rss_bytes()
    times = _time_best(lambda: dsv4.forward(model, tokens).block_until_ready(), repeats)
    return {**times, "peak_rss_before_forward": rss_before, "backend": backend_text("jax")}


def measure_hf(seq: int, batch: int, repeats: int, changes: dict) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from release_fixture import build_hf_model

    cfg = hf_config_dict(changes)
    device = torch_device()
    model = build_hf_model(cfg, SEED).to(device)
    tokens = torch.from_numpy(random_tokens(cfg["vocab_size"], batch, seq)).long().to(device)
    rss_before = peak_rss_bytes()

    def run():
        with torch.no_grad():
            model(tokens, use_cache=False)
        torch_sync()

    times = _time_best(run, repeats)
    check_no_jax("bench_forward")
    return {
        **times,
        "peak_rss_before_forward": rss_before,
        "backend": f"{backend_text('torch')}, attn {model.config._attn_implementation}",
    }


def measure_one(which: str, seq: int, args) -> dict:
    if which == "dsv4":
        out = measure_dsv4(seq, args.batch, args.impl, args.query_block, args.repeats, args.changes)
    else:
        out = measure_hf(seq, args.batch, args.repeats, args.changes)
    out.update(
        which=which, seq=seq, batch=args.batch, tokens_per_s=args.batch * seq / out["best_s"],
        peak_rss=peak_rss_bytes(), device_peak=device_peak_bytes("jax" if which == "dsv4" else "torch"),
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------- the driver


def measure_in_child(which: str, seq: int, args) -> dict:
    """Measure in a fresh interpreter; a failure (OOM kill, timeout, exception) becomes {'error': ...}."""
    argv = ["--one", which, str(seq), "--batch", str(args.batch), "--impl", args.impl]
    argv += ["--query-block", str(args.query_block), "--repeats", str(args.repeats)]
    argv += (["--cores", str(args.cores)] if args.cores else []) + (["--set", *args.set] if args.set else [])
    return run_child(Path(__file__).resolve(), argv, args.timeout)


def hf_max_seq(args) -> int:
    """--hf-max-seq, else 4096 on CPU (host RAM) and 16384 on a GPU (tens of GiB of device memory)."""
    if args.hf_max_seq is not None:
        return args.hf_max_seq
    return 16384 if torch_device().startswith("cuda") else 4096


def hf_skip_reason(seq: int, args) -> str | None:
    if seq <= hf_max_seq(args):
        return None
    cfg = bench_config(args.changes)
    per_copy = args.batch * cfg.num_attention_heads * seq * (seq + seq // 4) * 4 / 2**30
    return (
        f"not run: S > --hf-max-seq {hf_max_seq(args)}; its eager attention builds [B, H, S, S + S/4] "
        f"float32 arrays ({per_copy:.1f} GiB each, several at once)"
    )


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _note(seq: int, name: str, r: dict) -> str:
    return (
        f"S={seq} {name}: best {r['best_s'] * 1e3:,.0f} ms wall ({r['best_cpu_s'] * 1e3:,.0f} ms CPU), "
        f"first call (compile/warm-up) {r['first_s']:.1f} s, "
        f"peak RSS before the forward {_gb(r['peak_rss_before_forward'])}; {r['backend']}"
    )


def main_table(args) -> None:
    rows, notes = [], []
    for seq in args.seqs:
        ours = measure_in_child("dsv4", seq, args)
        print(f"# dsv4 S={seq}: {json.dumps(ours)}", file=sys.stderr, flush=True)
        skip = hf_skip_reason(seq, args)
        theirs = {"error": skip} if skip else measure_in_child("hf", seq, args)
        print(f"# transformers S={seq}: {json.dumps(theirs)}", file=sys.stderr, flush=True)
        rows.append((seq, ours, theirs))
    print(f"DeepSeek-V4 forward, float32, batch {args.batch}, dsv4 attention_impl={args.impl}, "
          f"query_block={args.query_block}, best of {args.repeats} after a compile/warm-up run")  # fmt: skip
    print(f"config: ModelConfig.tiny({config_text(args.changes)})")
    print("weights: random, different on each side (a speed benchmark, not a parity check)\n")
    mem = "peak device memory" if any(r.get("device_peak") for _, o, t in rows for r in (o, t)) else "peak RSS"
    print(f"| S | dsv4 tokens/s | dsv4 {mem} | transformers tokens/s | transformers {mem} | speedup |")
    print("|---:|---:|---:|---:|---:|---:|")
    for seq, ours, theirs in rows:
        cells = [str(seq)]
        for r in (ours, theirs):
            if "error" in r:
                cells += [r["error"].split(":")[0], "-"]
            else:
                cells += [f"{r['tokens_per_s']:,.0f}", _gb(r.get("device_peak") or r["peak_rss"])]
        ok = "error" not in ours and "error" not in theirs
        cells.append(f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.1f}x" if ok else "-")
        print("| " + " | ".join(cells) + " |")
        for name, r in (("dsv4", ours), ("transformers", theirs)):
            if "error" in r:
                notes.append(f"S={seq} {name}: {r['error']}")
            else:
                notes.append(_note(seq, name, r))
    print("\n" + "\n".join(f"- {n}" for n in notes))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096, 16384], help="sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--impl", choices=["xla", "reference"], default="xla", help="dsv4 attention_impl")
    p.add_argument("--query-block", type=int, default=128, help="dsv4 query block (attention, indexer)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs after the first; the best counts")
    p.add_argument("--hf-max-seq", type=int, help="longest S to run transformers at (default 4096 CPU, 16384 GPU)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per measurement")
    p.add_argument("--cores", type=int, help="pin each measurement to this many CPUs (default: all)")
    p.add_argument("--one", nargs=2, metavar=("WHICH", "S"), help="measure dsv4|hf at S, print JSON")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="change config fields (JSON values)")
    args = p.parse_args(argv)
    if args.one and args.one[0] not in ("dsv4", "hf"):
        p.error("--one takes dsv4 or hf")
    args.changes = parse_changes(args.set)
    return args


def measure_here(args) -> dict:
    """--one WHICH S: pinned to --cores CPUs first (before jax / torch size their thread pools)."""
    if args.cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    return measure_one(args.one[0], int(args.one[1]), args)


def main(argv=None) -> None:
    bench_main(argv, parse_args, measure_here, main_table)


if __name__ == "__main__":
    main()
