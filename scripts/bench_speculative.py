"""Greedy decoding with and without the MTP block guessing every second token, on the embedded default.

    python scripts/bench_speculative.py
    python scripts/bench_speculative.py --batches 1 8 --new 256 --repeats 5

For each batch size: `dsv4.generate` (greedy; one token per step) against
`dsv4.speculative.generate_speculative` (the main model checks two tokens per step, the MTP block
guesses the second), both on the float32 embedded default with a bfloat16 cache, `--new` tokens
after prompts cut from the packaged corpus (no stop token). Prints decode tokens/s (the tokens
after each row's first, per second of the decode loop; compilation excluded; best of
`--repeats`), the speculative loop's steps and the fraction of guesses kept, and whether the two
gave the same tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    from dsv4.corpus import builtin_corpus

    docs = [d for d in builtin_corpus() if len(d) > 8 * length][-batch:]  # the held-out end of the corpus
    return [tokenizer.encode(d)[:length] for d in docs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--new", type=int, default=128, help="new tokens per prompt")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import jax

    import dsv4
    from dsv4.cli import default_checkpoint_dir
    from dsv4.generate import generate_with_stats
    from dsv4.speculative import generate_speculative
    from dsv4.tokenizer import Tokenizer

    path = default_checkpoint_dir()
    model = dsv4.load_hf(path, dtype="float32")
    tokenizer = Tokenizer(path)
    print(f"embedded default, float32 weights, bfloat16 cache; {args.new} new tokens after {args.prompt}-token prompts;"
          f" jax {jax.__version__} {jax.default_backend()}, best of {args.repeats}")  # fmt: skip
    print()
    print("| batch | greedy tokens/s | speculative tokens/s | speedup | steps | guesses kept | same tokens |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for batch in args.batches:
        prompts = _prompts(tokenizer, batch, args.prompt)
        plain = [generate_with_stats(model, prompts, args.new, stop_tokens=()) for _ in range(args.repeats)]
        spec = [generate_speculative(model, prompts, args.new, stop_tokens=()) for _ in range(args.repeats)]
        best_plain = max(r.decode_tokens_per_second for r in plain)
        best_spec = max(r.decode_tokens_per_second for r in spec)
        s = spec[0]
        print(f"| {batch} | {best_plain:,.0f} | {best_spec:,.0f} | {best_spec / best_plain:.2f}x | "
              f"{s.steps} for {args.new - 1} tokens | {s.acceptance:.2f} | {s.tokens == plain[0].tokens} |")


if __name__ == "__main__":
    main()
