"""Run the whole-sequence forward of a DeepSeek-V4 model and print what it predicts.

    python scripts/forward.py                      # a tiny random-weight model (ModelConfig.tiny())
    python scripts/forward.py --checkpoint DIR     # a checkpoint in the release layout

The tiny default has random weights: its predictions are noise; it shows the pipeline runs.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import dsv4
from dsv4.cli import run_command
from dsv4.config import ModelConfig, RuntimeConfig


def main(argv=None) -> int:
    """Parse the flags and run; 0, or 2 after a one-line error (a bad checkpoint, --seq 0)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="release-layout checkpoint directory (default: tiny random model)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attention-impl", default="xla", choices=["xla", "reference"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    return run_command("forward.py", _run, parser.parse_args(argv))


def _run(args) -> None:
    if args.checkpoint:
        model = dsv4.load_hf(args.checkpoint, dtype=args.dtype, attention_impl=args.attention_impl)
    else:
        rt = RuntimeConfig(dtype=args.dtype, attention_impl=args.attention_impl)
        model = dsv4.init_model(ModelConfig.tiny(), rt, seed=args.seed)
    cfg = model.cfg
    tokens = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (args.batch, args.seq))
    logits = dsv4.forward(model, tokens).block_until_ready()  # compiles
    start = time.perf_counter()
    logits = dsv4.forward(model, tokens).block_until_ready()
    seconds = time.perf_counter() - start
    print(f"layers: {', '.join(cfg.layer_kinds)}; logits {logits.shape} {logits.dtype}")
    print(f"next-token argmax of sequence 0 (last 8 positions): {np.asarray(logits[0, -8:].argmax(-1)).tolist()}")
    print(f"{args.batch * args.seq / seconds:,.0f} tokens/s after compilation")


if __name__ == "__main__":
    sys.exit(main())
