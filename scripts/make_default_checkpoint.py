"""Train the embedded default checkpoint `dsv4/default_checkpoint/` with dsv4-train, from a fixed seed.

    python scripts/make_default_checkpoint.py                  # train (~20 min on 2 cores), replace the default
    python scripts/make_default_checkpoint.py --out DIR        # somewhere else
    python scripts/make_default_checkpoint.py --random         # the old random-weight default (seconds)

The recipe (RECIPE below) is one `dsv4-train` command: the embedded architecture (every layer
kind: sliding, CSA, HCA; hash and top-k routers; hc_mult 4; an MTP block; 2.8M parameters), a
2560-token byte-level BPE trained on the corpus, and the documentation text CPython ships in
`pydoc_data.topics` as the corpus, stopped by --time-limit if the machine is slow. The run's final
model is exported in the release layout (FP8 + E8M0 projections, FP4 experts), and its loss curve,
metrics and a sample greedy generation are stored beside it (loss.png, training.json).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "dsv4" / "default_checkpoint"
SAMPLE_PROMPT = "Hello"
RECIPE = [
    "--config", "embedded", "--corpus", "pydoc", "--seed", "0",
    "--batch", "8", "--seq-len", "256", "--steps", "700", "--lr", "2e-3", "--warmup", "30",
    "--eval-every", "100", "--save-every", "100", "--eval-windows", "16", "--time-limit", "27",
]  # fmt: skip


def _recipe(flag: str) -> str:
    """The value RECIPE gives `flag`."""
    return RECIPE[RECIPE.index(flag) + 1]


def _summary(run: Path, seconds: float) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "lm_loss" in r]
    evals = [r for r in records if "heldout_loss" in r]
    return {
        "command": "dsv4-train " + " ".join(RECIPE),
        "wall_seconds": round(seconds),
        "steps": steps[-1]["step"],
        "tokens_seen": steps[-1]["step"] * int(_recipe("--batch")) * int(_recipe("--seq-len")),
        "final_train_loss": steps[-1]["lm_loss"],
        "heldout_loss": evals[-1]["heldout_loss"],
        "heldout_perplexity": math.exp(evals[-1]["heldout_loss"]),
    }


def _sample(out: Path) -> str:
    import dsv4
    from dsv4.tokenizer import load_tokenizer

    tok = load_tokenizer(out)
    model = dsv4.load_hf(out, dtype="float32")
    new = dsv4.generate(model, [tok.encode(SAMPLE_PROMPT, add_bos=True)], max_new_tokens=48)[0]  # as dsv4-generate
    return SAMPLE_PROMPT + tok.decode(new, skip_special_tokens=True)


def build_trained(out: Path) -> dict:
    """Run the recipe in a scratch directory, then move the export (plus loss.png, training.json) to `out`."""
    from dsv4 import cli_train

    scratch = Path(tempfile.mkdtemp(prefix="dsv4-default-"))  # kept if anything below fails
    run, export = scratch / "run", scratch / "export"
    began = time.perf_counter()
    if cli_train.main([*RECIPE, "--out", str(run), "--export", str(export)]) != 0:
        raise SystemExit(f"dsv4-train failed; its run directory is {run}")
    summary = _summary(run, time.perf_counter() - began)
    shutil.copy(run / "loss.png", export / "loss.png")
    summary["sample"] = _sample(export)
    (export / "training.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (export / "README.txt").write_text(
        "Embedded default checkpoint of dsv4, trained by scripts/make_default_checkpoint.py:\n"
        f"  {summary['command']}\n"
        f"{summary['steps']} steps, {summary['tokens_seen']:,} tokens, {summary['wall_seconds']} s; held-out "
        f"perplexity {summary['heldout_perplexity']:.1f}. A 2.8M-parameter model trained on CPython's pydoc "
        "text: it writes Python-documentation-flavoured English, nothing more.\n"
    )
    _replace(export, out)
    shutil.rmtree(scratch)
    return summary


def build_random(out: Path, seed: int = 0) -> None:
    """The random-weight variant: the embedded architecture at init, with a BPE trained on pydoc."""
    import dsv4
    from dsv4 import cli_train, corpus
    from dsv4.config import RuntimeConfig
    from dsv4.export import export_release

    with tempfile.TemporaryDirectory() as scratch:
        tok_dir, export = Path(scratch) / "tokenizer", Path(scratch) / "export"
        corpus.train_bpe_tokenizer(corpus.builtin_corpus(), cli_train.EMBEDDED_VOCAB, tok_dir)
        model = dsv4.init_model(cli_train.embedded_config(), RuntimeConfig(dtype="float32"), seed=seed)
        export_release(model, None, export, tokenizer_dir=tok_dir)
        warning = "RANDOM WEIGHTS (scripts/make_default_checkpoint.py --random): output is noise.\n"
        (export / "README.txt").write_text(warning)
        _replace(export, out)  # the warning goes in with the weights


def _replace(src: Path, out: Path) -> None:
    """Copy `src` to `out`, replacing it only once the copy is complete."""
    from dsv4 import outputs

    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new."))
    try:
        shutil.copytree(src, staged / "copy")
        outputs.replace_dir(staged / "copy", out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--random", action="store_true", help="random weights instead of training")
    args = parser.parse_args(argv)
    if args.random:
        build_random(args.out)
    else:
        print(json.dumps(build_trained(args.out), indent=2, ensure_ascii=False))
    files = sorted(p for p in args.out.iterdir() if p.is_file())
    for p in files:
        print(f"{p.stat().st_size:>10,}  {p.name}")
    print(f"{sum(p.stat().st_size for p in files):>10,}  total in {args.out}")


if __name__ == "__main__":
    main()
