"""Benchmark `dsv4-convert` on a synthetic release-layout checkpoint with Flash-shaped tensors.

    python scripts/bench_convert.py --out /tmp/dsv4-bench [--layers 1] [--vocab 8192] [--workers N]
                                    [--cache warm|cold|both]

Writes a checkpoint whose every tensor has its Flash shape and release storage (FP8 projections
with E8M0 tile scales, packed FP4 routed experts with per-32 scales, BF16/F32/I64 elsewhere; all
256 experts per layer) filled with random bytes, then times:

  raw read      `cat` of every shard to /dev/null
  plain copy    `cp -r` of the checkpoint, then `sync` (timed: the converter's O_DIRECT writes are on
                the disk when it ends): the ceiling of any conversion that writes as much
  convert       dsv4-convert to bfloat16 and with --keep-quantized, each in a fresh subprocess,
                reporting its throughput (source bytes / second) and peak RSS against the bound.

Each is timed with the source in the page cache ("warm": what a second conversion of the same
files finds) and evicted from it before the run ("cold": `posix_fadvise(DONTNEED)` after a sync,
so every byte comes from the disk, as when converting a freshly downloaded release).

`write_synthetic_release` is also used by the memory-bound test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from dsv4.checkpoint import ReleaseTensor, release_specs  # noqa: E402
from dsv4.config import ModelConfig, RuntimeConfig  # noqa: E402
from dsv4.model import abstract_model  # noqa: E402
from dsv4.safetensors_io import INDEX_FILE, shard_file_name, write_safetensors  # noqa: E402

_FLASH_RATIOS = (0, 4, 128, 0, 4, 128)  # a sliding, a CSA and an HCA layer first


def flash_shaped_config(layers: int = 1, vocab: int = 8192, mtp: bool = False, **overrides) -> ModelConfig:
    """Flash's release config with fewer layers (and a smaller vocabulary): every tensor Flash-shaped."""
    ratios = _FLASH_RATIOS[:layers] + (0,)
    return dataclasses.replace(
        ModelConfig.flash(),
        num_hidden_layers=layers,
        compress_ratios=ratios,
        num_hash_layers=min(1, layers),
        vocab_size=vocab,
        num_nextn_predict_layers=int(mtp),
        **overrides,
    )


def _fp8_bytes(rng, shape) -> np.ndarray:
    b = np.frombuffer(rng.bytes(int(np.prod(shape))), np.uint8).reshape(shape).copy()
    b[(b & 0x7F) == 0x7F] ^= 1  # no NaN codes
    return b.view(ml_dtypes.float8_e4m3fn)


def _e8m0(rng, shape) -> np.ndarray:
    return rng.integers(118, 128, shape, dtype=np.uint8)


def _stored(t: ReleaseTensor, cfg: ModelConfig, rng, expert_format: str):
    """({name: array}, {name: safetensors dtype}) of one release tensor in release storage."""
    n, *rest = t.shape
    fmt = expert_format if t.kind == "expert" else t.kind
    if fmt == "fp4":
        k = rest[0]
        packed = np.frombuffer(rng.bytes(n * (k // 2)), np.int8).reshape(n, k // 2)
        return {t.name: packed, t.scale_name: _e8m0(rng, (n, -(-k // 32)))}, {t.scale_name: "F8_E8M0"}
    if fmt == "fp8":
        k = rest[0]
        grid = (-(-n // 128), -(-k // 128))
        return {t.name: _fp8_bytes(rng, t.shape), t.scale_name: _e8m0(rng, grid)}, {t.scale_name: "F8_E8M0"}
    if fmt == "int":
        return {t.name: rng.integers(0, cfg.n_routed_experts, t.shape, dtype=np.int64)}, {}
    values = (0.05 * rng.standard_normal(t.shape, dtype=np.float32)).astype(np.float32)
    return {t.name: values if fmt == "f32" else values.astype(ml_dtypes.bfloat16)}, {}


def write_synthetic_release(
    cfg: ModelConfig, out_dir, max_shard_bytes: int = 1 << 30, expert_format: str = "fp4", seed: int = 0
) -> int:
    """Write a random release-layout checkpoint for `cfg`, one shard in memory at a time.

    Every tensor the name table expects is present with its release shape and storage dtype.
    Returns the total bytes of tensor data written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
          "weight_block_size": [128, 128]}  # fmt: skip
    cfg = dataclasses.replace(cfg, quantization_config=qc, expert_dtype=expert_format)
    rng = np.random.default_rng(seed)
    state = abstract_model(cfg, RuntimeConfig(dtype="bfloat16"))
    from flax import nnx

    tensors = [t for spec in release_specs(nnx.split(state)[1]) for t in spec.tensors]
    shards, current, dtypes, size, total = [], {}, {}, 0, 0
    for t in tensors:
        arrays, codes = _stored(t, cfg, rng, expert_format)
        nbytes = sum(a.nbytes for a in arrays.values())
        if current and size + nbytes > max_shard_bytes:
            shards.append(_write_shard(out_dir, len(shards), current, dtypes))
            current, dtypes, size = {}, {}, 0
        current.update(arrays)
        dtypes.update(codes)
        size += nbytes
        total += nbytes
    if current:
        shards.append(_write_shard(out_dir, len(shards), current, dtypes))
    _name_shards(out_dir, shards, total)
    cfg.save(out_dir / "config.json")
    return total


def _write_shard(out_dir: Path, i: int, tensors: dict, dtypes: dict) -> tuple[str, list[str]]:
    tmp = f"shard-{i:05d}.tmp.safetensors"
    write_safetensors(out_dir / tmp, tensors, dtypes)
    return tmp, list(tensors)


def _name_shards(out_dir: Path, shards: list, total: int) -> None:
    """Rename the shards to the release names and write the index."""
    weight_map = {}
    for i, (tmp, names) in enumerate(shards):
        final = shard_file_name(i + 1, len(shards))
        os.replace(out_dir / tmp, out_dir / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))


# ---------------------------------------------------------------------------------------- timing


def evict_from_page_cache(src: Path) -> None:
    """Drop the shards' pages from the page cache (written back first), so the next read hits the disk."""
    os.sync()
    for path in src.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _prepare(src: Path, cache: str) -> None:
    if cache == "cold":
        evict_from_page_cache(src)
    else:
        subprocess.run(["cat", *sorted(map(str, src.glob("*.safetensors")))], stdout=subprocess.DEVNULL, check=True)


def raw_read_seconds(src: Path, cache: str = "warm") -> float:
    """Seconds for `cat` to read every shard to /dev/null (from the page cache or, cold, the disk)."""
    shards = sorted(str(p) for p in src.glob("*.safetensors"))
    _prepare(src, cache)
    start = time.perf_counter()
    subprocess.run(["cat", *shards], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def copy_seconds(src: Path, dst: Path, cache: str = "warm") -> float:
    """Seconds for `cp -r` of the checkpoint and `sync` (the ceiling of any conversion that writes it all).

    The sync is timed too: `cp` returns once its bytes are in the page cache, while the converter
    writes with O_DIRECT, so its seconds include putting them on the disk.
    """
    shutil.rmtree(dst, ignore_errors=True)
    _prepare(src, cache)
    os.sync()  # nothing else left to write back inside the timing
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    os.sync()
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return seconds


def run_convert(src: Path, dst: Path, extra: list[str], cache: str = "warm") -> dict:
    """One conversion in a fresh subprocess; its summary (from the manifest) plus wall and CPU seconds."""
    shutil.rmtree(dst, ignore_errors=True)
    _prepare(src, cache)
    cmd = [sys.executable, str(_REPO / "scripts" / "convert_hf.py"), str(src), str(dst), "--no-progress", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = json.loads((dst / "dsv4_checkpoint.json").read_text())["summary"]
    summary["wall"] = wall
    summary["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    shutil.rmtree(dst, ignore_errors=True)
    return summary


def _cache_rows(src: Path, dst: Path, total: int, workers: int, cache: str) -> list[str]:
    """Table rows of the raw read, the copy and the conversions with the source `cache` (warm/cold)."""
    cat = min(raw_read_seconds(src, cache) for _ in range(3))
    cp = min(copy_seconds(src, dst, cache) for _ in range(2))
    rows = [
        ("raw read (`cat` to /dev/null)", total / cat, total / cat, cat, None, None, None),
        ("plain copy (`cp -r` + `sync`)", total / cp, total / cp, cp, None, None, None),
    ]
    runs = (
        (f"convert to bfloat16, --workers {workers}", ["--workers", str(workers)]),
        ("convert to bfloat16, --workers 1", ["--workers", "1"]),
        (f"convert --keep-quantized, --workers {workers}", ["--workers", str(workers), "--keep-quantized"]),
    )
    for label, extra in runs:
        s = run_convert(src, dst, extra, cache)
        streaming = s["seconds"] - s["setup_seconds"]
        rows.append((label, s["bytes_read"] / s["seconds"], s["bytes_read"] / streaming, s["seconds"], s["cpu"],
                     s["peak_rss_bytes"], s["memory_bound_bytes"]))  # fmt: skip
    raw = total / cat

    def fmt(v, scale=1e9):
        return f"{v / scale:.2f}" if v else "-"

    return [
        f"| {cache} | {label} | {rate / 1e9:.2f} | {stream / 1e9:.2f} | {100 * stream / raw:.0f}% | {secs:.1f} |"
        f" {fmt(cpu, 1)} | {fmt(rss)} | {fmt(bound)} |"
        for label, rate, stream, secs, cpu, rss, bound in rows
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/dsv4-bench"), help="work directory")
    parser.add_argument("--layers", type=int, default=1, help="main layers (each 256 experts, ~3.3 GiB)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    parser.add_argument("--cache", choices=("warm", "cold", "both"), default="both",
                        help="source in the page cache, evicted before each run, or both (default)")  # fmt: skip
    args = parser.parse_args(argv)
    src, dst = args.out / "src", args.out / "dst"
    shutil.rmtree(args.out, ignore_errors=True)
    start = time.perf_counter()
    total = write_synthetic_release(flash_shaped_config(args.layers, args.vocab), src)
    print(f"synthetic checkpoint: {total / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s ({src})")
    print("\n| cache | run | GB/s (whole run) | GB/s (streaming) | streaming % of raw read | seconds |"
          " CPU seconds | peak RSS GB | bound GB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for cache in ("warm", "cold") if args.cache == "both" else (args.cache,):
        for row in _cache_rows(src, dst, total, args.workers, cache):
            print(row, flush=True)
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
