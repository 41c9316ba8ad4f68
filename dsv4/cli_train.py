"""dsv4-train: train a DeepSeek-V4 on a text corpus, from scratch or from a checkpoint's weights (or continue a run).

    dsv4-train --out runs/demo                                   # embedded architecture, built-in corpus
    dsv4-train --config tiny --corpus notes/ --tokenizer tok/ --steps 200 --out runs/tiny
    dsv4-train --init embedded --corpus notes/ --lr 3e-4 --steps 100 --out runs/ft   # fine-tune
    dsv4-train --out runs/demo --resume --steps 2000             # continue from the latest checkpoint

--init starts from a checkpoint's weights (fine-tuning): a release-layout directory (config.json +
safetensors: a Hugging Face download, a dsv4-export or dsv4-train --export), a dsv4-convert
checkpoint, or `embedded` (the checkpoint inside the package). Its config.json is the model's and its
tokenizer.json the run's (unless --tokenizer); neither --out nor --export may overlap it. OUT
receives: tokenizer/ (given, the --init checkpoint's, or a byte-level BPE trained on the corpus),
run.json (the corpus's sha256, --batch, --seq-len, --seed, --heldout-fraction, --eval-windows, --init: --resume
refuses others, and reads the model config from the run's checkpoints, so the --init directory may
have moved), checkpoints/ (Orbax, every --save-every steps, the last --keep kept), metrics.jsonl
(one line per step and per held-out evaluation), loss.png (the loss curve, redrawn at every
evaluation), and with --export DIR a release-layout copy of the final model that `dsv4-generate
--checkpoint DIR` and `dsv4.load_hf` read. Batches depend only on (--seed, step), so --resume
continues exactly where the run stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from dsv4 import corpus, outputs
from dsv4.cli import CLIError, checkpoint_kind, default_checkpoint_dir, flag, run_command
from dsv4.config import ModelConfig
from dsv4.outputs import paths_overlap
from dsv4.xla_flags import program_defaults

# The embedded default's architecture: every layer kind (the last compress_ratios entry is the MTP
# block), layers 0-1 hash-routed, hc_mult 4, about 2.8 million parameters with a 2560-token vocabulary.
EMBEDDED_ARCHITECTURE = {
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
EMBEDDED_VOCAB = 2560


def embedded_config(vocab_size: int = EMBEDDED_VOCAB) -> ModelConfig:
    """The embedded default checkpoint's ModelConfig (FP8 projections and FP4 experts, as released)."""
    return ModelConfig.tiny(
        **EMBEDDED_ARCHITECTURE,
        vocab_size=vocab_size,
        expert_dtype="fp4",
        quantization_config=ModelConfig.flash().quantization_config,
    )


def resolve_config(name: str | None, vocab_size: int | None) -> ModelConfig:
    """embedded (or None) | tiny | flash | pro | a config.json or checkpoint directory; --vocab-size overrides."""
    if name in (None, "embedded"):
        cfg = embedded_config()
    elif name in ("tiny", "flash", "pro"):
        cfg = getattr(ModelConfig, name)()
    elif Path(name).exists():
        cfg = ModelConfig.from_hf_config(Path(name))
    else:
        raise CLIError(f"--config: {name!r} is not embedded, tiny, flash, pro, or an existing config.json / directory")
    return cfg if vocab_size is None else dataclasses.replace(cfg, vocab_size=vocab_size)


def init_dir(args) -> Path | None:
    """The --init checkpoint directory ('embedded': the package's own), or None."""
    if args.init is None:
        return None
    return default_checkpoint_dir() if args.init == "embedded" else Path(os.path.abspath(args.init))


def model_config(args) -> ModelConfig:
    """The model's config: the --init checkpoint's config.json, else --config (with --vocab-size).

    CLIError for --config or --vocab-size beside --init, for an --init that is not a checkpoint, and
    for a converted checkpoint that keeps its weights quantized (training needs dense weights).
    """
    init = init_dir(args)
    if init is None:
        return resolve_config(args.config, args.vocab_size)
    for dest in ("config", "vocab_size"):
        if getattr(args, dest) is not None:
            raise CLIError(f"{flag(dest)} cannot be given with --init {args.init}: the model is its config.json's")
    saved = _saved_model_config(args.out) if args.resume else None
    if saved is not None:  # the run's own record: the --init checkpoint may have moved since
        return saved
    try:
        kind = checkpoint_kind(init)
    except CLIError as err:
        raise CLIError(f"--init {err}") from None
    if kind == "converted":
        from dsv4.convert import read_manifest

        if read_manifest(init).get("quantized"):
            raise CLIError(
                f"--init {init}: a dsv4-convert --keep-quantized checkpoint (FP8/FP4 weights kept quantized), "
                "which training cannot update: convert it without --keep-quantized, or start from the release directory"
            )
    return ModelConfig.from_hf_config(init)


def _saved_model_config(out: Path) -> ModelConfig | None:
    """The model config stored with the latest checkpoint of the run in `out` (None: nothing saved yet)."""
    from dsv4 import train
    from dsv4.cli_export import read_meta

    step = train.latest_saved_step(out / "checkpoints")
    return None if step is None else ModelConfig.from_hf_config(read_meta(out / "checkpoints", step)["model_config"])


def parse_mesh(text: str | None):
    """'data=2,expert=4' -> a sharding.mesh mesh over every device; None -> None (one device)."""
    if not text:
        return None
    from sharding.mesh import AXES, make_mesh

    sizes = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in AXES or not value.isdigit():
            raise CLIError(f"--mesh: expected entries like data=2,expert=4, got {part!r}")
        sizes[key] = int(value)
    return make_mesh(**sizes)


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsv4-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, metrics, loss.png)")
    p.add_argument("--config", help="embedded (default) | tiny | flash | pro | config.json | checkpoint dir")
    p.add_argument(
        "--init", metavar="CHECKPOINT",
        help="start from these weights (fine-tune): a release-layout or dsv4-convert checkpoint directory, or "
        "'embedded'; its config.json is the model's, its tokenizer.json the default --tokenizer",
    )  # fmt: skip
    p.add_argument("--corpus", default=corpus.BUILTIN_CORPUS, help="text file, directory of text files, or 'pydoc'")
    p.add_argument(
        "--tokenizer", type=Path,
        help="directory with tokenizer.json (default: the --init checkpoint's, else a BPE trained on the corpus)",
    )  # fmt: skip
    p.add_argument("--vocab-size", type=int, help="override the config's vocab_size (and the BPE's size)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=1000, help="total optimiser steps (the schedule's length)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warmup, then cosine to lr/10)")
    p.add_argument("--warmup", type=int, help="warmup steps (default: min(50, steps // 10))")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--mtp-weight", type=float, default=0.3)
    p.add_argument("--indexer-weight", type=float, default=1.0)
    p.add_argument("--seq-balance-weight", type=float, default=0.0, help="sequence-wise MoE balance loss weight")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--freeze", action="append", default=[], metavar="PATTERN",
        help="keep the parameters this glob matches fixed (no gradient or optimizer state; a router's bias is "
        "not balanced), e.g. 'layers.*.ffn.experts.*' or 'embed.*' (* crosses dots: 'layers.1.*' is layer 1); "
        "names like layers.0.attn.wq_a.weight; repeatable; a --resume repeats the run's",
    )  # fmt: skip
    p.add_argument("--eval-every", type=int, default=100, help="held-out perplexity every N steps")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows of seq-len + 1 tokens")
    p.add_argument("--heldout-fraction", type=float, default=0.05)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    p.add_argument("--remat", action="store_true", help="rematerialise each layer (less memory, ~10%% more compute)")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,expert=4 (default: one device)")
    p.add_argument("--time-limit", type=float, help="minutes; stop early (saving and exporting) past this")
    p.add_argument("--export", type=Path, help="write the final model here in the release layout")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and --export)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ------------------------------------------------------------------------------------- run setup


def _check_args(args, cfg: ModelConfig) -> None:
    for name in ("batch", "seq_len", "steps", "eval_every", "eval_windows", "save_every", "keep"):
        if getattr(args, name) < 1:
            raise CLIError(f"{flag(name)} must be positive, got {getattr(args, name)}")
    if args.seq_len > cfg.max_position_embeddings:
        raise CLIError(
            f"--seq-len {args.seq_len} exceeds max_position_embeddings {cfg.max_position_embeddings} of the config"
        )
    if args.warmup is None:
        args.warmup = min(50, args.steps // 10)
    if not 0 <= args.warmup <= args.steps:
        raise CLIError(f"--warmup must be in [0, --steps {args.steps}], got {args.warmup}")
    if not 0 <= args.heldout_fraction <= 0.5:  # every k-th block held out, k >= 2 (corpus.split_stream)
        raise CLIError(f"--heldout-fraction must be in [0, 0.5], got {args.heldout_fraction}")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    if args.time_limit is not None and not args.time_limit >= 0:  # NaN too
        raise CLIError(f"--time-limit must be a number of minutes >= 0, got {args.time_limit}")


# TrainConfig's fields and the flags that set them
_TRAIN_FLAGS = {
    "lr": "lr", "warmup_steps": "warmup", "total_steps": "steps", "weight_decay": "weight_decay",
    "mtp_weight": "mtp_weight", "indexer_weight": "indexer_weight",
    "seq_balance_weight": "seq_balance_weight", "compute_dtype": "compute_dtype", "freeze": "freeze",
}  # fmt: skip


def _train_config(args):
    """The TrainConfig of the flags; CLIError naming the flag of a value it refuses."""
    from dsv4 import train

    try:
        return train.TrainConfig(**{field: getattr(args, dest) for field, dest in _TRAIN_FLAGS.items()})
    except ValueError as err:
        field, _, reason = str(err).partition(": ")
        dest = _TRAIN_FLAGS.get(field)
        raise CLIError(f"{flag(dest)}: {reason}" if dest else str(err)) from None


def _report_changes(changes: dict[str, tuple]) -> None:
    """One stderr line naming the optimisation flags a --resume changed (allowed: e.g. more --steps)."""
    named = []
    for field, (old, new) in changes.items():
        dest = _TRAIN_FLAGS.get(field)
        named.append(f"{flag(dest) if dest else 'TrainConfig.' + field} {new} (the run's: {old})")
    if named:
        print(f"--resume: continuing with {'; '.join(named)}", file=sys.stderr)


def _has_entries(path: Path) -> bool:
    """Whether the directory `path` exists and is not empty."""
    return path.is_dir() and any(path.iterdir())


RUN_ENTRIES = ("tokenizer", "run.json", "checkpoints", "metrics.jsonl", "loss.png")  # what a run writes in OUT


def _check_paths(args) -> None:
    """Refuse an unusable --out / --export before anything is read, trained or written (both made
    absolute in `args` first)."""
    for dest in ("out", "export"):  # absolute: "." gets a name and a parent for the staging sibling
        if getattr(args, dest) is not None:
            setattr(args, dest, Path(os.path.abspath(getattr(args, dest))))
    out, export = args.out, args.export
    for option, path in (("--out", out), ("--export", export)):
        if path is not None and path.exists() and not path.is_dir():
            raise CLIError(f"{option} {path} exists and is not a directory")
    if export is not None and paths_overlap(out, export):
        raise CLIError(f"--export {export} and --out {out} must be separate directories, neither inside the other")
    init = init_dir(args)
    for option, path in (("--out", out), ("--export", export)):
        if init is not None and path is not None and paths_overlap(path, init):
            raise CLIError(f"{option} {path} and --init {init} must be separate directories, neither inside the other")
    for option, path in (("--out", out), ("--export", export)):
        if path is not None:
            outputs.check_creatable(path, option)  # a ValueError: one line, as every user error
    if args.resume:
        if not (out / "checkpoints").is_dir():
            raise CLIError(f"--resume: no checkpoints in {out}")
    elif _has_entries(out):
        if not args.overwrite:
            raise CLIError(f"--out {out} exists and is not empty (use --resume to continue or --overwrite)")
        _check_replaceable_run(out)
    if export is not None:  # the exporter's own rule, checked before training rather than after
        from dsv4.export import check_out_dir

        try:
            check_out_dir(export, args.overwrite, option="--overwrite")
        except FileExistsError as err:
            raise CLIError(f"--export {err}") from None


def _check_replaceable_run(out: Path) -> None:
    """CLIError unless --overwrite may delete `out`: a dsv4-train run directory (run.json or
    checkpoints/) holding nothing a run does not write, and not the directory this command runs in."""
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_ENTRIES)
    if foreign:
        raise CLIError(
            f"--overwrite: --out {out} holds files a dsv4-train run does not write ({outputs.some_names(foreign)}); "
            "it replaces only a run directory: move them away or choose another --out"
        )
    if not ((out / RUN_RECORD).is_file() or (out / "checkpoints").is_dir()):
        raise CLIError(f"--overwrite: --out {out} is not a dsv4-train run directory (no run.json, no checkpoints/)")
    if outputs.holds_cwd(out):
        raise CLIError(f"--overwrite: --out {out} holds the current directory, which it cannot replace: run elsewhere")


def _mesh(args, cfg: ModelConfig):
    """The --mesh device mesh (None: one device), refused when --batch does not split over its data
    axis or the mesh cannot shard the model (the default strategy, as the train step uses)."""
    from sharding.placement import check_batch
    from sharding.rules import validate

    mesh = parse_mesh(args.mesh)
    if mesh is not None:
        try:
            check_batch(args.batch, mesh)
        except ValueError as err:
            raise CLIError(f"--batch: {err}") from None
        try:
            validate(cfg, mesh)
        except ValueError as err:
            raise CLIError(f"--mesh {args.mesh}: {err}") from None
    return mesh


def _tokenizer_source(args, cfg: ModelConfig, docs: list[str], scratch: Path) -> Path:
    """The directory whose tokenizer.json the run uses; nothing is written under --out here.

    OUT/tokenizer on --resume, else --tokenizer, else the --init checkpoint's, else a byte-level BPE
    trained on the corpus into `scratch`.
    """
    kept = args.out / "tokenizer"
    source = None
    if args.tokenizer is not None:
        source = args.tokenizer.parent if args.tokenizer.name == "tokenizer.json" else args.tokenizer
        if not (source / "tokenizer.json").is_file():
            raise CLIError(f"--tokenizer: no tokenizer.json in {source}")
    if args.resume and (kept / "tokenizer.json").is_file():
        if source is not None and (source / "tokenizer.json").read_bytes() != (kept / "tokenizer.json").read_bytes():
            raise CLIError(f"--tokenizer {source}: not the run's tokenizer ({kept}), which --resume keeps")
        return kept
    if source is not None:
        return source
    if args.init is not None:
        source = init_dir(args)
        if not (source / "tokenizer.json").is_file():
            raise CLIError(
                f"--init {source} has no tokenizer.json: give the tokenizer its weights were trained with (--tokenizer)"
            )
        return source
    print(f"training a {cfg.vocab_size}-token byte-level BPE on the corpus ...", file=sys.stderr)
    return corpus.train_bpe_tokenizer(docs, cfg.vocab_size, scratch)


RUN_RECORD = "run.json"  # OUT/run.json: what a --resume must train on to continue exactly
_DATA_FLAGS = ("batch", "seq_len", "seed", "heldout_fraction", "eval_windows")


def _run_record(args, docs: list[str]) -> dict:
    """The run's data: the corpus (its text's sha256) and the flags that choose batches and held-out text."""
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(doc.encode("utf-8") + b"\0")
    flags = {f: getattr(args, f) for f in _DATA_FLAGS}
    init = None if args.init is None else os.path.realpath(init_dir(args))
    init = "embedded" if init == os.path.realpath(default_checkpoint_dir()) else init
    return {"corpus": str(args.corpus), "corpus_sha256": digest.hexdigest(), **flags, "init": init}


def _check_resume_data(out: Path, record: dict) -> None:
    """CLIError naming every data flag of a --resume that differs from the run's (OUT/run.json; a run
    from before the record is not checked). --lr, --steps and the loss weights may change."""
    path = out / RUN_RECORD
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CLIError(f"--resume: {path} is not the JSON record dsv4-train writes ({err})") from None
    if not isinstance(old, dict):
        raise CLIError(f"--resume: {path} is not the JSON record dsv4-train writes (a {type(old).__name__})")
    changed = [f for f in _DATA_FLAGS if old.get(f, record[f]) != record[f]]
    diffs = [f"{flag(f)} {record[f]} (the run's: {old[f]})" for f in changed]
    if old.get("corpus_sha256", record["corpus_sha256"]) != record["corpus_sha256"]:
        diffs.append(f"--corpus {record['corpus']} (other text than the run's {old.get('corpus')})")
    if old.get("init") != record["init"]:  # a record from before --init: a run from random weights
        diffs.append(f"--init {record['init'] or '(none)'} (the run's: {old.get('init') or 'none, random weights'})")
    if diffs:
        raise CLIError(
            f"--resume continues {out} on the data it trained on, but: {'; '.join(diffs)}. "
            "Give the run's values, or start a new --out"
        )


def _install_out(args, tok_source: Path, record: dict) -> Path:
    """Make --out the run directory, holding tokenizer/ (copied from `tok_source`); returns OUT/tokenizer.

    Called only once every check on the user's input has passed. --resume keeps OUT as it is (adding
    tokenizer/ when missing). Otherwise the new OUT is assembled in a hidden sibling directory and
    renamed into place, replacing an empty OUT or, with --overwrite, the old run in one step.
    """
    from dsv4.export import copy_tokenizer

    out = args.out
    target = out / "tokenizer"
    if args.resume:
        if tok_source != target:
            target.mkdir(parents=True, exist_ok=True)
            copy_tokenizer(tok_source, target)
        return target
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new."))
    try:
        fresh = stage / "run"
        (fresh / "tokenizer").mkdir(parents=True)  # mkdir, not mkdtemp: the usual permissions
        copy_tokenizer(tok_source, fresh / "tokenizer")
        (fresh / RUN_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        outputs.replace_dir(fresh, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def _prepare(args, cfg: ModelConfig):
    """Check the whole input, build the initial model, then create --out: returns (OUT/tokenizer,
    Data, model, TrainConfig).

    Every user error (an unreadable --init checkpoint too) is raised before --out is touched, so a
    refused command leaves no new directory behind and an existing run (even with --overwrite) as it was.
    """
    from dsv4 import train
    from dsv4.tokenizer import load_tokenizer

    _check_args(args, cfg)
    tc = _train_config(args)
    _check_paths(args)
    docs = corpus.read_corpus(args.corpus)
    record = _run_record(args, docs)
    if args.resume:
        _check_resume_data(args.out, record)
    mesh = _mesh(args, cfg)
    with tempfile.TemporaryDirectory(prefix="dsv4-train-tokenizer.") as scratch:
        source = _tokenizer_source(args, cfg, docs, Path(scratch))
        tokenizer = load_tokenizer(source)
        _check_vocab(tokenizer, cfg, source, args.init is not None)
        data = _data(args, tokenizer, docs)
        model = _initial_model(args, cfg, mesh)
        try:
            train.check_freeze(model, tc.freeze)
        except ValueError as err:
            raise CLIError(f"--{err}") from None
        return _install_out(args, source, record), data, model, tc


def _initial_model(args, cfg: ModelConfig, mesh):
    """The float32 model training starts from: the --init checkpoint's weights (loaded straight into
    their shards of the mesh), else random ones (--seed). A --resume that will restore a checkpoint
    gets random ones: only their structure is used."""
    import dsv4
    from dsv4 import train
    from dsv4.cli import load_model
    from dsv4.config import RuntimeConfig

    init = init_dir(args)
    if init is None or (args.resume and train.latest_saved_step(args.out / "checkpoints") is not None):
        return dsv4.init_model(cfg, RuntimeConfig(dtype="float32", mesh=mesh), seed=args.seed)
    print(f"loading the --init weights from {init} ...", file=sys.stderr)
    return load_model(init, "float32", mesh=mesh)


def _check_vocab(tokenizer, cfg: ModelConfig, tok_dir: Path, init: bool = False) -> None:
    """CLIError when a tokenizer id (the largest, not only the count: ids may have gaps) falls outside
    the config's vocabulary (`init`: the config is an --init checkpoint's, which --vocab-size cannot change)."""
    if tokenizer.id_limit > cfg.vocab_size:
        remedy = "a --tokenizer whose ids fit the checkpoint's" if init else "use --vocab-size or a matching tokenizer"
        raise CLIError(
            f"tokenizer {tok_dir / 'tokenizer.json'} has {tokenizer.vocab_size} tokens with ids up to "
            f"{tokenizer.id_limit - 1}, but the config's vocab_size is {cfg.vocab_size}: ids would fall outside "
            f"the embedding ({remedy})"
        )


@dataclasses.dataclass
class Data:
    train: object  # int32 [N_train] token stream
    heldout: object  # int32 [n, seq_len + 1] evaluation windows (n may be 0)


def _data(args, tokenizer, docs) -> Data:
    stream = corpus.encode_documents(tokenizer, docs)
    train_stream, heldout = corpus.split_stream(stream, args.heldout_fraction)
    windows = corpus.eval_windows(heldout, args.seq_len, args.eval_windows) if len(heldout) else heldout[:0]
    corpus.sample_batch(train_stream, 1, args.seq_len, args.seed, 0)  # refuses a stream shorter than a window
    print(
        f"corpus: {len(docs)} documents, {len(stream):,} tokens ({len(train_stream):,} train, "
        f"{len(heldout):,} held out; {len(windows)} evaluation windows of {args.seq_len + 1})",
        file=sys.stderr,
    )
    return Data(train_stream, windows)


# ------------------------------------------------------------------------------------ metrics, plot


class MetricsLog:
    """OUT/metrics.jsonl: {"step", "loss", ...} per step, {"step", "heldout_loss", ...} per evaluation."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        self.noted_no_plot = False  # the missing-matplotlib notice, printed once per run
        kept = [r for r in _read_records(path) if r["step"] <= resume_step]  # drop what is redone
        self.records = kept if resume_step else []  # a run starting over keeps not even its step-0 evaluation
        outputs.write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def add(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _read_records(path: Path) -> list[dict]:
    """The records of an earlier run's metrics.jsonl. A last line without its newline (the run was
    killed while appending it) is dropped; any other unreadable line is a CLIError naming it."""
    if not path.exists():
        return []
    complete = path.read_text("utf-8", errors="replace").split("\n")[:-1]  # drops "" or a torn last line
    records = []
    for number, line in enumerate(complete, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no integer step")
        except ValueError as err:
            raise CLIError(f"{path}:{number}: not a metrics record ({err}); move the file away to resume") from None
        records.append(record)
    return records


def plot_losses(records: list[dict], path: Path) -> bool:
    """Draw train and held-out loss against step into `path` (PNG). False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["lm_loss"]) for r in records if "lm_loss" in r]
    held = [(r["step"], r["heldout_loss"]) for r in records if "heldout_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="train (next-token CE)")
        ax.plot(steps, _ema(losses, 0.95), color="tab:blue", lw=1.5, label="train, smoothed")
    if held:
        steps, losses = zip(*held, strict=True)
        ax.plot(steps, losses, "o-", color="tab:orange", lw=1.5, label="held out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    outputs.write_file(path, lambda f: fig.savefig(f, format="png"), binary=True)
    plt.close(fig)
    return True


def _ema(values: Sequence[float], decay: float) -> list[float]:
    out, acc = [], values[0]
    for v in values:
        acc = decay * acc + (1 - decay) * v
        out.append(acc)
    return out


# ----------------------------------------------------------------------------------------- training


def _progress(args, start: int):
    if args.no_progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=args.steps, initial=start, unit="step", dynamic_ncols=True, desc="dsv4-train")


def _eval_fn(graphdef):
    """A jitted held-out loss: summed next-token CE over the rows of [n, S + 1] windows whose `real`
    flag is set (language-model head only)."""
    import jax
    import jax.numpy as jnp

    from dsv4 import train

    tc = train.TrainConfig(mtp_weight=0.0, indexer_weight=0.0, compute_dtype="float32")

    @jax.jit
    def lm_loss_sum(params, frozen, tokens, real):
        mask = jnp.broadcast_to(real[:, None], tokens.shape)
        mean = train.loss_fn(graphdef, tc, params, frozen, {"tokens": tokens, "mask": mask})[1]["lm_loss"]
        return mean * jnp.sum(real) * (tokens.shape[1] - 1)

    return lm_loss_sum


def evaluate(lm_loss_sum, state, windows, batch: int) -> float:
    """Mean held-out next-token loss over all `windows` [n, S + 1], `batch` windows at a time.

    A last, shorter chunk is filled up with the first windows at weight 0, so every call has one
    compiled shape and every window counts once.
    """
    import numpy as np

    windows = np.asarray(windows)
    total = 0.0
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        real = np.arange(batch) < len(chunk)
        chunk = np.concatenate([chunk, np.resize(windows, (batch - len(chunk), windows.shape[1]))])
        total += float(lm_loss_sum(state.params, state.frozen, chunk, real))
    return total / (len(windows) * (windows.shape[1] - 1))


def _train(args) -> None:
    """dsv4-train: check the input and install OUT (`_prepare`), build or restore the train state,
    run the steps with checkpoints and held-out evaluations, then export when --export is given."""
    import jax
    import numpy as np
    from flax import nnx

    from dsv4 import train

    cfg = model_config(args)
    tok_dir, data, model, tc = _prepare(args, cfg)

    model = train.training_model(model, remat=args.remat)
    graphdef, state = train.init_train_state(model, tc)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    ckpt = train.Checkpointer(args.out / "checkpoints", cfg, tc, every=args.save_every, keep=args.keep)
    try:  # closed however the run ends (a save in flight completes): Ctrl-C leaves no half-written step
        if args.resume and ckpt.latest_step() is not None:
            from dsv4.cli_export import reporting_damage

            with reporting_damage(args.out / "checkpoints", ckpt.latest_step(), resume=True):
                state = ckpt.restore(state)
            _report_changes(ckpt.train_config_changes)
        elif args.resume:  # stopped before its first save: nothing to continue, so the run starts over
            print(f"--resume: no checkpoint in {args.out / 'checkpoints'} yet; starting at step 0", file=sys.stderr)
        start = int(state.step)
        if start >= args.steps:
            raise CLIError(f"--resume: the checkpoint is at step {start}, not below --steps {args.steps}")
        n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, train.TRAINABLE))) - n_params
        frozen = f" ({n_frozen:,} more frozen by --freeze)" if args.freeze else ""
        steps = f"training steps {start} -> {args.steps}"
        print(f"model: {n_params:,} trainable parameters{frozen}; {steps}", file=sys.stderr)
        state = _run_steps(args, graphdef, tc, state, data, ckpt)
    finally:
        ckpt.close()
    if args.export is not None:
        from dsv4.export import export_release

        model = nnx.merge(graphdef, state.params, state.frozen)
        export_release(model, None, args.export, tokenizer_dir=tok_dir, overwrite=args.overwrite)
        print(f"exported the release layout to {args.export}", file=sys.stderr)


def _run_steps(args, graphdef, tc, state, data: Data, ckpt):
    """Steps from `state`'s to --steps (or --time-limit) with evaluations and saves; returns the last state."""
    from dsv4 import train

    start = step = int(state.step)
    log = MetricsLog(args.out / "metrics.jsonl", start)
    step_fn = train.make_train_step(graphdef, tc)
    heldout_loss_sum = _eval_fn(graphdef)
    tokens_per_step = args.batch * args.seq_len
    began, bar, stopped_early, heldout = time.perf_counter(), _progress(args, start), False, None
    if args.init is not None and start == 0:  # the starting weights' held-out loss: what fine-tuning changes
        heldout = _record_eval(log, 0, heldout_loss_sum, state, data, args, bar)
    try:
        while step < args.steps:
            tick = time.perf_counter()
            batch = corpus.sample_batch(data.train, args.batch, args.seq_len, args.seed, step)
            state, metrics = step_fn(state, {"tokens": batch})
            metrics = {k: float(v) for k, v in metrics.items()}
            step += 1
            rate = tokens_per_step / (time.perf_counter() - tick)
            log.add({"step": step, **metrics, "tokens_per_s": rate})
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['lm_loss']:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
                bar.update(1)
            late = args.time_limit is not None and time.perf_counter() - began > 60 * args.time_limit
            if step % args.eval_every == 0 or step == args.steps or late:
                heldout = _record_eval(log, step, heldout_loss_sum, state, data, args, bar)
            ckpt.save(state, force=step == args.steps or late)
            if late:
                stopped_early = True
                break
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - began
    done = step - start
    print(
        f"trained {done} steps ({done * tokens_per_step:,} tokens) in {seconds:,.0f} s "
        f"({done * tokens_per_step / max(seconds, 1e-9):,.0f} tokens/s incl. compilation)"
        + (f"; stopped by --time-limit at step {step} of {args.steps}" if stopped_early else ""),
        file=sys.stderr,
    )
    if heldout is not None:
        print(f"held-out loss {heldout:.4f}, perplexity {math.exp(heldout):.2f}", file=sys.stderr)
    return state


def _record_eval(log: MetricsLog, step: int, loss_sum, state, data: Data, args, bar) -> float | None:
    """Held-out loss and perplexity into the log, the loss curve redrawn; None without held-out text."""
    heldout = None
    if len(data.heldout):
        heldout = evaluate(loss_sum, state, data.heldout, args.batch)
        log.add({"step": step, "heldout_loss": heldout, "heldout_ppl": math.exp(heldout)})
        message = f"step {step}: held-out loss {heldout:.4f}, perplexity {math.exp(heldout):.2f}"
        (bar.write if bar is not None else print)(message)
    if not plot_losses(log.records, args.out / "loss.png") and not log.noted_no_plot:
        log.noted_no_plot = True
        print("matplotlib is not installed: no loss.png (pip install 'dsv4[train]')", file=sys.stderr)
    return heldout


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `dsv4-train`; returns the exit status (2 on a user error)."""
    program_defaults()
    return run_command("dsv4-train", _train, train_parser().parse_args(argv), exit_on_interrupt=True)


if __name__ == "__main__":
    sys.exit(main())
