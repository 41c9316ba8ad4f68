"""`dsv4-convert`: the command-line front end of `dsv4.convert` (console script `dsv4-convert`)."""

from __future__ import annotations

import argparse
import os
import sys

_DESCRIPTION = """\
Convert a released DeepSeek-V4 checkpoint directory (config.json, safetensors shards with FP8/FP4
weights) into an Orbax checkpoint that dsv4.load(DST, mesh) restores straight into sharded arrays.

  dsv4-convert SRC DST [options]        convert
  dsv4-convert --verify SRC DST         re-read a sample of tensors from both sides, compare exactly
                                        (with the options DST was converted with: it takes no others)

The whole index is validated against config.json before any heavy work (all problems at once).
DST appears only when complete (assembled in DST.tmp-dsv4-convert, then renamed); an interrupted
run leaves no DST, and --resume continues from the last complete unit. A conversion locks its
temporary directory: a second one to the same DST is refused while the first runs. A DST that is
a symbolic link is written through it (with --overwrite, the link's target is replaced).
"""

_EPILOG = """\
memory: the converter streams in units of about --unit-mb of output (default 1024 MiB): each
layer's non-expert tensors, each layer's routed experts in groups, the embedding and the head in
row ranges, the MTP block. Two units live in memory at a time (one being built, one being
written), so peak host memory stays within about
    2 x the largest unit + 32 MiB per worker + ~0.5 GB fixed overhead (Python, JAX, the plan),
whatever the checkpoint size. With the defaults the largest unit is about 1.07 GB (Flash and Pro
in bfloat16, Flash in float32) or 1.9 GB (Pro in float32: the MTP block), so expect at most
about 2.7 GB (4.3 GB for Pro in float32) plus 32 MiB per worker.
disk: DST needs about 2 bytes (bfloat16) or 4 bytes (float32) per parameter (Flash ~0.58 / 1.2 TB,
Pro ~3.2 / 6.4 TB), or about the size of SRC with --keep-quantized; a conversion that would not fit
in the free space of DST's filesystem stops before writing (--no-space-check to go on anyway). Each
unit is flushed to the disk (syncfs) before the progress record counts it, so --resume is safe
after a crash or power cut. Chunks of 1 MiB or more are written with direct I/O (O_DIRECT: no copy
into the page cache), or buffered where the filesystem refuses it (tmpfs, some network
filesystems). Each worker has two writer threads.
"""


def build_parser() -> argparse.ArgumentParser:
    """The `dsv4-convert` argument parser."""
    p = argparse.ArgumentParser(
        prog="dsv4-convert",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="release checkpoint directory")
    p.add_argument("dst", metavar="DST", help="Orbax checkpoint directory to create")
    p.add_argument("--verify", action="store_true", help="compare a sample of SRC and DST tensors instead")
    p.add_argument("--samples", type=int, default=16, help="parameters compared by --verify (default 16)")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="dequantize to this dtype (default bfloat16; mHC, sinks, ape, norms, router bias stay float32)",
    )
    p.add_argument(
        "--keep-quantized",
        action="store_true",
        help="store FP8 weights and packed FP4 experts with their scales as released",
    )
    p.add_argument("--workers", type=int, default=1, help="parallel reads and conversions (default 1)")
    p.add_argument("--no-mtp", action="store_true", help="leave out the MTP block (config gets 0 MTP layers)")
    p.add_argument("--layers", metavar="A:B", help="convert only main layers A..B-1 (partial, for debugging)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted conversion to DST")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST (a dsv4 checkpoint)")
    p.add_argument("--unit-mb", type=int, default=1024, help="target output size of a unit in MiB (default 1024)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-space-check",
        action="store_true",
        help="convert even when DST's filesystem reports less free space than the output needs",
    )
    return p  # fmt: skip


# Options of a conversion, which --verify (it reads the options DST was converted with) does not take
# (--no-progress it tolerates: it has no progress bar to hide).
_CONVERSION_ONLY = ("dtype", "keep_quantized", "workers", "no_mtp", "layers", "resume", "overwrite", "unit_mb",
                    "no_space_check")  # fmt: skip


def _check_mode(parser: argparse.ArgumentParser, args) -> None:
    """Exit with a usage error when an option of the other mode (convert / --verify) is given."""
    from dsv4.cli import flag

    if args.verify:
        given = [name for name in _CONVERSION_ONLY if getattr(args, name) != parser.get_default(name)]
        if given:
            flags = ", ".join(flag(name) for name in given)
            parser.error(f"--verify compares DST with SRC as DST was converted; it takes no {flags}")
    elif args.samples != parser.get_default("samples"):
        parser.error("--samples applies to --verify only")


def _run(args) -> int:
    from dsv4 import convert

    if args.verify:
        report = convert.verify(args.src, args.dst, samples=args.samples)
        print(report.format())
        return 0 if report.ok else 1
    summary = convert.convert(
        args.src,
        args.dst,
        dtype=args.dtype,
        keep_quantized=args.keep_quantized,
        workers=args.workers,
        include_mtp=not args.no_mtp,
        layers=convert.parse_layers(args.layers),
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        unit_bytes=args.unit_mb << 20,
        space_check=not args.no_space_check,
    )
    print(summary.format())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 failed, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_mode(parser, args)

    from dsv4.cli import wants_traceback
    from dsv4.config import ConfigError
    from dsv4.convert import ConvertError, destination, temp_dir
    from dsv4.safetensors_io import CheckpointError

    tmp = temp_dir(destination(args.dst))
    try:
        return _run(args)
    except KeyboardInterrupt:
        hint = f"; rerun with --resume to continue from {tmp}" if os.path.isdir(tmp) else ""
        print(f"dsv4-convert: interrupted{hint}", file=sys.stderr)
        return 130
    except (ConvertError, CheckpointError, ConfigError, OSError) as err:
        if wants_traceback():
            raise
        print(f"dsv4-convert: error: {_error_text(args, err, tmp)}", file=sys.stderr)
        return 1


def _error_text(args, err: Exception, tmp) -> str:
    """The one-line message: an OSError (a path; the disk full, read-only or gone) names DST; it and
    a damaged source tensor found mid-conversion name the unfinished conversion --resume can continue."""
    from dsv4.safetensors_io import CheckpointError

    hint = ""
    if not args.verify and os.path.isdir(tmp) and isinstance(err, (OSError, CheckpointError)):
        hint = f"; the unfinished conversion is kept in {tmp}: once fixed, rerun with --resume (or remove it)"
    if not isinstance(err, OSError):
        return f"{err}{hint}"
    return f"{'verifying' if args.verify else 'converting to'} {args.dst}: {err}{hint}"


if __name__ == "__main__":
    sys.exit(main())
