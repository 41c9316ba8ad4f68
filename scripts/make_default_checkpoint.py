"""Build the embedded default checkpoint `dsv4/default_checkpoint/` from a fixed seed.

    python scripts/make_default_checkpoint.py                 # rewrite dsv4/default_checkpoint/
    python scripts/make_default_checkpoint.py --out DIR       # somewhere else

What it writes: a small DeepSeek-V4 with RANDOM weights (`dsv4.init_model`, seed 0) in the release
layout (FP8 + E8M0 block scales, packed FP4 experts, BF16 / F32 / I64 elsewhere, via
`dsv4.export.export_release`), and a small byte-level BPE tokenizer trained with `tokenizers` on
the Python documentation text the standard library ships (`pydoc_data.topics`), with the V4
special tokens at ids 0-5 and a release-style tokenizer_config.json. The model has every layer
kind (sliding, CSA, HCA), hash and top-k routers, hc_mult 4 and an MTP block; its output is noise
until a trained checkpoint exists. The directory stays well under 5 MB.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from dsv4.tokenizer import BOS, EOS, SPECIAL_TOKENS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "dsv4" / "default_checkpoint"
SEED = 0
VOCAB_SIZE = 2560

# Every layer kind; layers 0-1 hash-routed; the last compress_ratios entry is the MTP block.
ARCHITECTURE = {
    "hidden_size": 128,
    "num_hidden_layers": 6,
    "compress_ratios": (0, 4, 128, 4, 128, 0, 0),  # sliding, CSA, HCA, CSA, HCA, sliding; MTP sliding
    "num_hash_layers": 2,
    "num_attention_heads": 4,
    "head_dim": 128,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 64,
    "o_groups": 2,
    "o_lora_rank": 64,
    "sliding_window": 128,
    "index_n_heads": 4,
    "index_head_dim": 128,
    "index_topk": 32,
    "hc_mult": 4,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "n_shared_experts": 1,
}


def corpus() -> list[str]:
    """Training text: the pydoc topic pages shipped with CPython (`pydoc_data.topics`)."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def train_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """Byte-level BPE with the V4 special tokens at ids 0-5; writes tokenizer.json and its config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"trained vocabulary has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    for i, special in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(special) != i:
            raise RuntimeError(f"special token {special!r} has id {tok.token_to_id(special)}, wanted {i}")
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "model_max_length": 1048576,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def default_config(vocab_size: int = VOCAB_SIZE):
    """The default checkpoint's ModelConfig (release values where not overridden)."""
    from dsv4.config import ModelConfig

    return ModelConfig.tiny(**ARCHITECTURE, vocab_size=vocab_size, expert_dtype="fp4",
                            quantization_config=ModelConfig.flash().quantization_config)  # fmt: skip


def build(out_dir: Path, seed: int = SEED, vocab_size: int = VOCAB_SIZE) -> Path:
    """Write the tokenizer and the random-weight checkpoint to `out_dir` (replaced if present)."""
    import dsv4
    from dsv4.config import RuntimeConfig
    from dsv4.export import export_release

    with tempfile.TemporaryDirectory() as tok_dir:
        train_tokenizer(Path(tok_dir), vocab_size)
        model = dsv4.init_model(default_config(vocab_size), RuntimeConfig(dtype="float32"), seed=seed)
        export_release(model, None, out_dir, tokenizer_dir=tok_dir, overwrite=True)
    readme = (
        "Embedded default checkpoint of dsv4, written by scripts/make_default_checkpoint.py "
        f"(seed {seed}).\nRANDOM WEIGHTS: the model's output is noise; it exists to run the pipeline.\n"
        "Tokenizer: byte-level BPE trained on CPython's pydoc_data.topics text.\n"
    )
    (out_dir / "README.txt").write_text(readme)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    out = build(args.out, args.seed)
    files = sorted(p for p in out.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    for p in files:
        print(f"{p.stat().st_size:>10,}  {p.name}")
    print(f"{total:>10,}  total in {out}")


if __name__ == "__main__":
    main()
