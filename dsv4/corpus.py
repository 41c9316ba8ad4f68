"""Training text: reading a corpus, a BPE tokenizer trained on it, token streams, batches.

    docs = read_corpus("pydoc")                      # or a text file, or a directory of them
    train_bpe_tokenizer(docs, 2560, out_dir)         # tokenizer.json + tokenizer_config.json
    stream = encode_documents(load_tokenizer(out_dir), docs)   # int32 [N]: BOS doc EOS BOS doc EOS ...
    train, heldout = split_stream(stream, heldout_fraction=0.05)
    batch = sample_batch(train, batch=8, seq_len=256, seed=0, step=17)     # int32 [8, 257]

`sample_batch` depends only on (seed, step), so a resumed run sees the batches the uninterrupted
run would have seen. The built-in corpus "pydoc" is the documentation text CPython ships in
`pydoc_data.topics` (Python Software Foundation License), about 465,000 characters of English.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dsv4.tokenizer import BOS, EOS, SPECIAL_TOKENS

BUILTIN_CORPUS = "pydoc"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
HELDOUT_BLOCK = 2048  # tokens; every k-th block of the stream is held out


class CorpusError(ValueError):
    """A corpus that cannot be used for training; the message names the file or directory."""


def builtin_corpus() -> list[str]:
    """The pydoc topic pages shipped with CPython, one document per topic, in sorted order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"corpus file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_corpus(source: str | Path) -> list[str]:
    """Documents of a corpus: "pydoc" (built in), a UTF-8 text file, or a directory of text files.

    A directory contributes every file ending in .txt, .md, .rst or .text below it, in sorted path
    order. Raises CorpusError, naming the path, when it is missing or holds no text at all.
    """
    if str(source) == BUILTIN_CORPUS:
        return builtin_corpus()
    path = Path(source)
    if path.is_file():
        docs = [_read_text(path)]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise CorpusError(f"corpus directory {path} has no {'/'.join(TEXT_SUFFIXES)} files")
        docs = [_read_text(p) for p in files]
    else:
        raise CorpusError(f"corpus {path} does not exist (give a text file, a directory, or {BUILTIN_CORPUS!r})")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CorpusError(f"corpus {path} is empty: no non-whitespace text")
    return docs


def train_bpe_tokenizer(docs: Sequence[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Train a byte-level BPE tokenizer with the V4 special tokens at ids 0-5; write it to `out_dir`.

    Writes tokenizer.json and a release-style tokenizer_config.json (bos/eos named, no automatic
    BOS). Raises CorpusError when the corpus is too small to reach `vocab_size` tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
        raise CorpusError(f"vocab size {vocab_size} is below the {len(SPECIAL_TOKENS) + len(alphabet)} base tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(docs, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise CorpusError(
            f"the corpus is too small for a {vocab_size}-token vocabulary (BPE stopped at {tok.get_vocab_size()})"
        )
    for i, special in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(special) != i:  # the trainer puts special tokens first, in order
            raise RuntimeError(f"special token {special!r} has id {tok.token_to_id(special)}, wanted {i}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    return out_dir


def encode_documents(tokenizer, docs: Sequence[str]) -> np.ndarray:
    """One int32 stream [N]: each document as BOS, its tokens, EOS (a `dsv4.tokenizer.Tokenizer`)."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    pieces = [np.asarray([bos, *tokenizer.encode(d, add_bos=False), eos], np.int32) for d in docs]
    return np.concatenate(pieces)


def split_stream(stream: np.ndarray, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out): every k-th block of HELDOUT_BLOCK tokens is held out, k = round(1 / fraction).

    Interleaved blocks keep both parts representative of the whole corpus. fraction 0 holds out
    nothing. Raises CorpusError when a non-zero fraction leaves either part empty.
    """
    if not 0 <= heldout_fraction < 1:
        raise CorpusError(f"held-out fraction must be in [0, 1), got {heldout_fraction}")
    if heldout_fraction == 0:
        return stream, stream[:0]
    every = max(2, round(1 / heldout_fraction))
    blocks = np.arange(len(stream)) // HELDOUT_BLOCK
    held = blocks % every == every - 1
    train, heldout = stream[~held], stream[held]
    if not len(heldout) or not len(train):
        raise CorpusError(
            f"the corpus ({len(stream):,} tokens) is too small to hold out one block of {HELDOUT_BLOCK} tokens "
            f"in {every} (held-out fraction {heldout_fraction}; it needs more than {(every - 1) * HELDOUT_BLOCK:,} "
            "tokens); --heldout-fraction 0 trains on all of it without held-out evaluation"
        )
    return train, heldout


def sample_batch(stream: np.ndarray, batch: int, seq_len: int, seed: int, step: int) -> np.ndarray:
    """int32 [batch, seq_len + 1] windows at random offsets; a function of (seed, step) only."""
    if len(stream) < seq_len + 1:
        raise CorpusError(f"the training text has {len(stream)} tokens, fewer than one window of {seq_len + 1}")
    rng = np.random.default_rng((seed, step))
    starts = rng.integers(0, len(stream) - seq_len, size=batch)
    return np.stack([stream[s : s + seq_len + 1] for s in starts]).astype(np.int32)


def eval_windows(stream: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
    """int32 [n, seq_len + 1] consecutive non-overlapping windows from the start (n <= max_windows)."""
    n = min(max_windows, len(stream) // (seq_len + 1))
    if n == 0:
        raise CorpusError(f"the held-out text has {len(stream)} tokens, fewer than one window of {seq_len + 1}")
    return stream[: n * (seq_len + 1)].reshape(n, seq_len + 1).astype(np.int32)
