"""`dsv4-export`: write a checkpoint in the release layout (console script `dsv4-export`).

    dsv4-export CKPT OUT [--step N] [--tokenizer DIR] [--no-mtp] [--overwrite] [--max-shard-size SIZE]
                [--scale-fmt ue8m0|float] [--expert-format fp4|fp8]

CKPT is one of
  * a training checkpoint directory written by `dsv4.train.Checkpointer` (Orbax, one folder per
    step): the latest step, or `--step N`, is restored; the architecture comes from the checkpoint's
    own meta (`model_config`), the optimizer state is read and dropped; a `dsv4-train --out` RUN
    directory stands for RUN/checkpoints;
  * a release-layout checkpoint (config.json + safetensors, read with `dsv4.load_hf`);
  * a converted checkpoint (`dsv4-convert` output, read with `dsv4.load`).
OUT gets what `dsv4.export.export_release` writes: config.json with the release quantization_config,
generation_config.json, FP8 projections with E8M0 128x128 block scales, FP4 routed experts, BF16/F32
rest, sharded safetensors with their index, and the tokenizer files (from `--tokenizer`, else from
CKPT when it holds a tokenizer.json, or RUN/tokenizer for a dsv4-train RUN or RUN/checkpoints). It
appears only when complete. `dsv4.load_hf(OUT)` and `transformers` (FineGrainedFP8Config(dequantize=True))
read it back.
User errors (a missing or unrecognised CKPT, an unknown step, a non-empty OUT without --overwrite,
or one that is not a checkpoint) print one line `dsv4-export: error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

from dsv4.cli import CLIError, run_command
from dsv4.cli import checkpoint_kind as layout_kind
from dsv4.outputs import check_creatable, paths_overlap


class ExportError(CLIError):
    """A user error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The `dsv4-export` argument parser."""
    p = argparse.ArgumentParser(
        prog="dsv4-export",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("ckpt", metavar="CKPT", type=Path, help="training, release-layout or converted checkpoint")
    p.add_argument("out", metavar="OUT", type=Path, help="release-layout directory to write")
    p.add_argument("--step", type=int, help="training checkpoint step to export (default: the latest)")
    p.add_argument("--tokenizer", type=Path, metavar="DIR", help="copy tokenizer.json (+ config files) from DIR")
    p.add_argument("--no-mtp", action="store_true", help="leave out the MTP block (config gets 0 MTP layers)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a checkpoint at OUT (a config.json, shards, index and tokenizer files, nothing else)")
    p.add_argument(
        "--max-shard-size",
        default="4GiB",
        metavar="SIZE",
        help="shard size bound: bytes, or with a unit K/M/G (x1000) or KiB/MiB/GiB (x1024); default 4GiB",
    )
    p.add_argument(
        "--scale-fmt",
        choices=("ue8m0", "float"),
        default="ue8m0",
        help="FP8 block scales as F8_E8M0 (default, as released) or F32 (as Base; re-quantizes E8M0-scaled weights)",
    )
    p.add_argument(
        "--expert-format",
        choices=("fp4", "fp8"),
        default="fp4",
        help="routed experts as packed FP4 (default, instruct release) or FP8 (Base release; re-quantizes FP4 experts)",
    )
    return p  # fmt: skip


_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}  # fmt: skip


def parse_size(text: str) -> int:
    """'4GiB' -> 4294967296, '500MB' -> 500000000, '1024' -> 1024; ExportError for anything else."""
    number = text.strip().rstrip("BbIiKkMmGg ")
    unit = text.strip()[len(number) :].strip().upper()
    try:
        size = int(float(number) * _UNITS[unit])
    except (KeyError, ValueError, OverflowError):  # OverflowError: inf, 1e400
        raise ExportError(f"--max-shard-size: expected a size like 4GiB, 500MB or 1048576, got {text!r}") from None
    if size < 1:
        raise ExportError(f"--max-shard-size: must be at least 1 byte, got {text!r}")
    return size


# ------------------------------------------------------------------------------------ checkpoint kinds


def training_steps(path: Path) -> list[int]:
    """The steps of an Orbax training checkpoint directory (step folders holding `meta`), sorted."""
    return sorted(int(d.name) for d in path.iterdir() if d.is_dir() and d.name.isdigit() and (d / "meta").exists())


def checkpoint_kind(path: Path) -> str:
    """The kind of checkpoint: "training", "converted" or "release"; CLIError naming `path` for anything else."""
    if not path.exists():
        raise ExportError(f"{path}: no such checkpoint directory")
    if path.is_dir() and training_steps(path):
        return "training"
    try:
        return layout_kind(path)  # "converted" | "release", as dsv4-generate reads them
    except CLIError as err:
        if not path.is_dir():
            raise
        raise ExportError(f"{err}, nor a training checkpoint (step folders, or a dsv4-train --out RUN)") from None


def _pick_step(path: Path, step: int | None) -> int:
    steps = training_steps(path)
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ExportError(f"{path}: no step {step} (steps: {', '.join(map(str, steps))})")
    return step


def read_meta(path: Path, step: int) -> dict:
    """The {model_config, train_config} meta that train.Checkpointer stored with `step`."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(path.resolve(), options=ocp.CheckpointManagerOptions(create=False))
    try:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        manager.close()


def _train_config(raw: dict):
    """TrainConfig from the stored meta (unknown keys dropped: only the optimizer's structure matters here)."""
    from dsv4 import train

    names = {f.name for f in dataclasses.fields(train.TrainConfig)}
    return train.TrainConfig(**{k: v for k, v in raw.items() if k in names})


def _abstract_train_state(cfg, tc):
    """(graphdef, TrainState of ShapeDtypeStructs) for `cfg`, shaped as train.init_train_state makes it."""
    import jax
    import jax.numpy as jnp

    from dsv4 import train
    from dsv4.config import RuntimeConfig
    from dsv4.model import abstract_model

    model = abstract_model(cfg, RuntimeConfig(dtype="float32", train_stats=True))
    graphdef, params, frozen = train.split_model(model, tc.freeze)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
    opt_state = jax.eval_shape(train.optimizer(tc).init, params)
    return graphdef, train.TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, frozen, opt_state)


def load_training_checkpoint(path: Path, step: int | None = None):
    """(model, step) restored from a train.Checkpointer directory; the config comes from its meta."""
    from flax import nnx

    from dsv4 import train
    from dsv4.config import ModelConfig

    step = _pick_step(path, step)
    with reporting_damage(path, step):
        meta = read_meta(path, step)
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise ExportError(f"{path}/{step}: the checkpoint's meta has no model_config")
    cfg = ModelConfig.from_hf_config(meta["model_config"])
    tc = _train_config(meta.get("train_config") or {})
    graphdef, like = _abstract_train_state(cfg, tc)
    ckpt = train.Checkpointer(path, cfg, tc)
    try:
        with reporting_damage(path, step):
            state = ckpt.restore(like, step)
    finally:
        ckpt.close()
    return nnx.merge(graphdef, state.params, state.frozen), step


@contextlib.contextmanager
def reporting_damage(path: Path, step: int, resume: bool = False):
    """Orbax's errors for a step whose files are missing, cut or garbled (a KeyError for a missing
    item, a ValueError for bad JSON, TensorStore's several types) as one CLIError naming the step
    and the other steps to try (`resume`: a dsv4-train --resume, which takes the latest step, so
    the remedy is to remove the damaged one)."""
    from dsv4.convert import root_cause, short_reason, unreadable

    try:
        yield
    except Exception as err:
        from dsv4.train import CheckpointMismatch

        if isinstance(err, CheckpointMismatch) or not (isinstance(err, KeyError | ValueError) or unreadable(err)):
            raise
        others = [s for s in training_steps(path) if s != step]
        if resume:
            hint = f"; remove {path / str(step)} to resume from step {others[-1]}" if others else ""
        else:
            hint = f"; try --step {others[-1]} (steps: {', '.join(map(str, others))})" if others else ""
        root = root_cause(err)
        raise ExportError(
            f"{path}/{step}: cannot read this training checkpoint step ({type(root).__name__}: "
            f"{short_reason(root)[:200]}); it is damaged or incomplete{hint}"
        ) from err


def load_any(path: Path, step: int | None = None):
    """(model, description) from any checkpoint kind; `step` only applies to training checkpoints."""
    kind = checkpoint_kind(path)
    if step is not None and kind != "training":
        raise ExportError(f"{path}: --step applies to training checkpoints, this one is {kind}")
    if kind == "training":
        model, step = load_training_checkpoint(path, step)
        return model, f"training checkpoint step {step}"
    from dsv4.cli import load_model

    return load_model(path, "float32"), f"{kind} checkpoint"


# ------------------------------------------------------------------------------------------ command


def check_paths(args) -> Path | None:
    """Refuse bad OUT / --tokenizer before any loading; returns the tokenizer directory to copy, if any."""
    from dsv4.export import check_out_dir

    if paths_overlap(args.ckpt, args.out):
        raise ExportError(f"{args.out}: OUT must lie outside CKPT {args.ckpt} (and not contain it)")
    if args.out.exists() and not args.out.is_dir():
        raise ExportError(f"{args.out}: exists and is not a directory")
    try:
        check_out_dir(args.out, args.overwrite, option="--overwrite")
    except FileExistsError as err:
        raise ExportError(str(err)) from None
    check_creatable(args.out, "OUT")
    parse_size(args.max_shard_size)
    if args.tokenizer is not None:
        if not (args.tokenizer / "tokenizer.json").is_file():
            raise ExportError(f"--tokenizer {args.tokenizer}: no tokenizer.json there")
        return args.tokenizer
    return next((d for d in _tokenizer_candidates(args.ckpt) if (d / "tokenizer.json").is_file()), None)


def check_tokenizer(directory: Path, vocab_size: int) -> None:
    """ExportError unless `directory`'s tokenizer loads and its ids fit the model's vocabulary (a
    smaller tokenizer is fine: released vocabularies are padded)."""
    from dsv4.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(directory)  # TokenizerError naming the file when unreadable
    if tokenizer.id_limit > vocab_size:  # the largest id, not the count: ids may have gaps
        raise ExportError(
            f"{directory / 'tokenizer.json'}: {tokenizer.vocab_size} tokens with ids up to {tokenizer.id_limit - 1}, "
            f"past the model's vocab_size {vocab_size}: not this model's tokenizer"
        )


def _tokenizer_candidates(ckpt: Path) -> tuple[Path, ...]:
    """Where CKPT's tokenizer may be: CKPT itself, or for a dsv4-train RUN/checkpoints, RUN/tokenizer."""
    return (ckpt, ckpt.parent / "tokenizer") if ckpt.name == "checkpoints" else (ckpt,)


def run_directory_checkpoints(ckpt: Path) -> Path:
    """CKPT, or RUN/checkpoints when CKPT is a dsv4-train run directory (holding checkpoints/)."""
    inner = ckpt / "checkpoints"
    if ckpt.is_dir() and not training_steps(ckpt) and inner.is_dir() and training_steps(inner):
        return inner
    return ckpt


def run(args) -> Path:
    """Load CKPT, write OUT; returns OUT."""
    from dsv4 import export

    args.ckpt = run_directory_checkpoints(args.ckpt)
    tokenizer_dir = check_paths(args)
    model, source = load_any(args.ckpt, args.step)
    if tokenizer_dir is not None:
        check_tokenizer(tokenizer_dir, model.cfg.vocab_size)
    out = export.export_release(
        model,
        None,
        args.out,
        max_shard_bytes=parse_size(args.max_shard_size),
        scale_fmt=args.scale_fmt,
        include_mtp=not args.no_mtp,
        tokenizer_dir=tokenizer_dir,
        expert_format=args.expert_format,
        overwrite=args.overwrite,
    )
    tok = f", tokenizer from {tokenizer_dir}" if tokenizer_dir is not None else ", no tokenizer"
    print(f"dsv4-export: wrote {out} from {args.ckpt} ({source}{tok})")
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 a user error, 130 interrupted: `run_command`)."""
    return run_command("dsv4-export", run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
