"""Convert a released DeepSeek-V4 checkpoint (safetensors, FP8/FP4) into an Orbax checkpoint, streaming.

The release is far larger than host memory (Flash 160 GB, Pro 865 GB), so the converter works in
units of about `unit_bytes` of output: the top-level tensors, each block's non-expert tensors, each
block's routed experts in groups, the embedding and the head in row ranges, and the MTP block. A
unit is read with plain positional reads (no memory map), dequantized block of rows by block of
rows, laid out as the model wants it, written as zarr chunk files (with direct I/O where the
filesystem allows it) and released. Two units live in host memory at a time: the one being written
and the one being built.

On-disk layout of DST:

    DST/config.json               the ModelConfig (release config.json keys)
    DST/dsv4_checkpoint.json      format version, conversion options, storage of each quantized weight
    DST/tokenizer.json, tokenizer_config.json, generation_config.json   (copied when SRC has them)
    DST/params/                   an Orbax PyTree checkpoint (zarr v2 arrays, no OCDBT): one array per
                                  model parameter, named by its path ("layers.3.attn.wq_a.weight").
                                  Routed experts are stacked per block ([E, D, F] w1/w3, [E, F, D] w2)
                                  with one chunk per expert, so expert groups are written as slices.
                                  With keep_quantized, FP8/FP4 weights are two arrays, `<path>.data`
                                  (release bytes, release orientation) and `<path>.scale`.

The temporary directory `DST.tmp-dsv4-convert` holds a partial conversion and its progress record;
it becomes DST by one rename at the end, so an interrupted run leaves no DST and `resume=True`
continues with the units not yet recorded as complete. A unit is recorded only once its chunk files
are on the disk (`sync_filesystem`), so a resume after a crash or a power cut never skips a unit
whose writes were still in the page cache. Before any heavy work the converter checks that DST's
filesystem has room for what is left to write (`check_space`).

Layouts come from the release name table (`dsv4.checkpoint.release_specs`): each parameter's
`ParamSpec.assemble` is probed once on small arrays to establish which layout it is ("copy",
"transpose", "grouped", "experts"); the converter then applies that layout block by block, and the
keep-quantized model applies it on the fly (`dsv4.quantized.QuantizedWeight`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import functools
import json
import math
import os
import re
import resource
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np
import tensorstore as ts
from flax import nnx

from dsv4 import outputs, quant
from dsv4.checkpoint import (
    ParamSpec,
    ReleaseTensor,
    check_expert_ids,
    check_values,
    problem_report,
    release_specs,
    validate_index,
)
from dsv4.config import ModelConfig, RuntimeConfig
from dsv4.loading import weight_block
from dsv4.model import abstract_model
from dsv4.quantized import to_param_layout_np
from dsv4.safetensors_io import DTYPES, INDEX_FILE, CheckpointError, CheckpointIndex, load_weight_map, read_header

FORMAT = "dsv4-orbax"
FORMAT_VERSION = 1
MANIFEST_FILE = "dsv4_checkpoint.json"
PARAMS_DIR = "params"
PROGRESS_FILE = "convert_progress.json"
TEMP_SUFFIX = ".tmp-dsv4-convert"
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
OUTPUT_DTYPES = ("bfloat16", "float32")
DEFAULT_UNIT_BYTES = 1 << 30
CHUNK_BYTES = 64 << 20  # largest zarr chunk of a non-expert array
READ_BLOCK_BYTES = 4 << 20  # rows of one tensor read and dequantized at a time
DIRECT_IO_ALIGN = 4096  # converted chunks written with O_DIRECT: buffer and length multiples of this
DIRECT_IO_MIN_BYTES = 1 << 20  # smaller chunks are written through the page cache
COPY_BUFFER_BYTES = 8 << 20  # per writer thread: source ranges copied with direct I/O pass through it
# Hidden test hook: seconds to sleep after each unit is recorded complete (to interrupt a run).
TEST_DELAY_ENV = "DSV4_CONVERT_TEST_UNIT_DELAY"


class ConvertError(ValueError):
    """The conversion cannot proceed (destination, options, resume state); the message says why."""


# ------------------------------------------------------------------------------------ options


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """What to convert and how; recorded in the manifest and checked again on resume."""

    dtype: str = "bfloat16"
    keep_quantized: bool = False
    include_mtp: bool = True
    layers: tuple[int, int] | None = None
    unit_bytes: int = DEFAULT_UNIT_BYTES

    def __post_init__(self):
        if self.dtype not in OUTPUT_DTYPES:
            raise ConvertError(f"dtype must be one of {OUTPUT_DTYPES}, got {self.dtype!r}")
        if self.unit_bytes < 1:
            raise ConvertError(f"unit_bytes (--unit-mb) must be positive, got {self.unit_bytes} bytes")
        if self.layers is not None:
            a, b = self.layers
            if not 0 <= a < b:
                raise ConvertError(f"layers must be a non-empty range a:b with 0 <= a < b, got {a}:{b}")
            object.__setattr__(self, "layers", (int(a), int(b)))

    def to_json(self) -> dict:
        """JSON form (recorded in the manifest and the progress file)."""
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers) if self.layers else None
        return d


def parse_layers(text: str | None) -> tuple[int, int] | None:
    """'a:b' -> (a, b) (b exclusive); None stays None."""
    if text is None:
        return None
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConvertError(f"--layers must look like a:b (e.g. 0:4), got {text!r}")
    return int(parts[0]), int(parts[1])


# ------------------------------------------------------------------------------------- layouts


def _probe(shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
    return np.arange(offset, offset + math.prod(shape)).reshape(shape)


def _layout_probe_matches(spec: ParamSpec, layout: str, groups: int, ndim: int) -> bool:
    """Does the name table's `assemble` equal `layout` on small distinct-valued arrays?"""
    if layout == "experts":
        probes = [_probe((2, 3), 6 * i) for i in range(2)]
        expected = to_param_layout_np(np.stack(probes), layout)
    else:
        probes = [_probe((2 * groups, 3) if ndim == 2 else (3,) * ndim)]
        expected = probes[0] if layout == "copy" else to_param_layout_np(probes[0], layout, groups)
    try:
        got = np.asarray(spec.assemble(probes))
    except (ValueError, IndexError):
        return False
    return got.shape == expected.shape and np.array_equal(got, expected)


def layout_shape(release_shape: tuple[int, ...], layout: str, groups: int, experts: int = 1):
    """Parameter shape that `layout` makes of a release tensor shape."""
    if layout == "copy":
        return tuple(release_shape)
    n, k = release_shape
    if layout == "grouped":
        return (groups, k, n // groups)
    if layout == "experts":
        return (experts, k, n)
    return (k, n)


def detect_layout(spec: ParamSpec, param_shape: tuple[int, ...]) -> tuple[str, int]:
    """(layout, groups) of one parameter, established by probing the name table's transform."""
    first = spec.tensors[0]
    if first.kind == "expert":
        candidates = [("experts", 1)]
    elif len(param_shape) == 3 and len(first.shape) == 2:
        candidates = [("grouped", param_shape[0])]
    elif len(param_shape) == 2:
        candidates = [("transpose", 1), ("copy", 1)]
    else:
        candidates = [("copy", 1)]
    for layout, groups in candidates:
        ok = _layout_probe_matches(spec, layout, groups, len(first.shape))
        if ok and layout_shape(first.shape, layout, groups, len(spec.tensors)) == tuple(param_shape):
            return layout, groups
    raise AssertionError(f"{first.name}: the name table's layout is none of {candidates} (converter bug)")


# ---------------------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class StoredArray:
    """One array of the Orbax tree: its key path, shape, numpy dtype and zarr chunk shape."""

    key: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]

    @property
    def name(self) -> str:
        """Orbax's name for the array (its directory under params/)."""
        return ".".join(self.key)

    @property
    def nbytes(self) -> int:
        """Size of the whole array in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class QuantStorage:
    """How a keep-quantized weight is stored: format, per-matrix data/scale shapes and dtypes."""

    fmt: str  # "fp8" | "fp4"
    data_shape: tuple[int, ...]
    data_dtype: np.dtype
    scale_shape: tuple[int, ...]
    scale_dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class Entry:
    """One model parameter: its name-table spec, its shape/dtype, layout, and storage."""

    spec: ParamSpec
    shape: tuple[int, ...]
    dtype: np.dtype
    layout: str
    groups: int
    quant: QuantStorage | None = None

    @property
    def key(self) -> tuple[str, ...]:
        """The parameter's path in the model's parameter tree, as strings."""
        return tuple(str(p) for p in self.spec.path)

    @property
    def name(self) -> str:
        """The dotted parameter path (its `key` joined with dots)."""
        return ".".join(self.key)

    @property
    def num_experts(self) -> int:
        """Experts stacked on the leading axis (one release tensor each) for layout "experts", else 0."""
        return len(self.spec.tensors) if self.layout == "experts" else 0

    def arrays(self) -> list[StoredArray]:
        """The Orbax arrays this parameter is stored as (one dense array, or data + scale)."""
        if self.quant is None:
            return [StoredArray(self.key, self.shape, self.dtype, _chunks(self.shape, self.dtype, self.num_experts))]
        q, e = self.quant, self.num_experts
        lead = (e,) if e else ()
        return [
            StoredArray(self.key + ("data",), lead + q.data_shape, q.data_dtype,
                        _chunks(lead + q.data_shape, q.data_dtype, e)),
            StoredArray(self.key + ("scale",), lead + q.scale_shape, q.scale_dtype,
                        _chunks(lead + q.scale_shape, q.scale_dtype, e)),
        ]  # fmt: skip

    def out_bytes_per_expert(self) -> int:
        """Output bytes (all stored arrays) per stacked expert; the whole parameter's bytes when not experts."""
        return sum(a.nbytes for a in self.arrays()) // max(self.num_experts, 1)


def _chunks(shape: tuple[int, ...], dtype: np.dtype, experts: int) -> tuple[int, ...]:
    """One chunk per expert for stacked experts; else row blocks of at most CHUNK_BYTES."""
    if experts:
        return (1,) + tuple(shape[1:])
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    rows = max(1, min(shape[0], CHUNK_BYTES // max(row_bytes, 1)))
    return (rows,) + tuple(shape[1:])


@dataclasses.dataclass(frozen=True)
class Unit:
    """A unit of work: whole parameters, or a range [a, b) of the leading axis of its parameters.

    A range covers experts [a, b) of a block's stacked expert parameters, or rows [a, b) of one
    large plain parameter (the embedding, the head), so no unit outgrows `unit_bytes` by much.
    """

    name: str
    entries: tuple[Entry, ...]
    span: tuple[int, int] | None = None

    @property
    def is_experts(self) -> bool:
        """Whether the unit's span is a range of stacked experts (rather than rows of one plain parameter)."""
        return self.span is not None and self.entries[0].num_experts > 0

    def tensors(self) -> list[tuple[ReleaseTensor, float]]:
        """(release weight tensor, fraction of it read) for every tensor the unit reads."""
        if self.span is None:
            return [(t, 1.0) for e in self.entries for t in e.spec.tensors]
        a, b = self.span
        if self.is_experts:
            return [(t, 1.0) for e in self.entries for t in e.spec.tensors[a:b]]
        (entry,) = self.entries
        return [(entry.spec.tensors[0], (b - a) / entry.shape[0])]

    def out_bytes(self) -> int:
        """Bytes of output this unit holds in memory."""
        if self.span is None:
            return sum(a.nbytes for e in self.entries for a in e.arrays())
        a, b = self.span
        if self.is_experts:
            return sum(e.out_bytes_per_expert() * (b - a) for e in self.entries)
        (entry,) = self.entries
        return entry.arrays()[0].nbytes * (b - a) // entry.shape[0]


def _block_of(entry: Entry) -> str:
    """Unit family of a parameter: embed, head, top, layers.i or mtp.j."""
    key = entry.key
    if key[0] in ("layers", "mtp"):
        return f"{key[0]}.{key[1]}"
    return key[0] if key[0] in ("embed", "head") else "top"


def _block_selected(block: str, options: ConvertOptions) -> bool:
    if block.startswith("mtp."):
        return options.include_mtp
    if block.startswith("layers.") and options.layers is not None:
        a, b = options.layers
        return a <= int(block.split(".")[1]) < b
    return True


def plan_units(entries: Sequence[Entry], options: ConvertOptions) -> list[Unit]:
    """Split the parameters into units of about `options.unit_bytes` of output (see `Unit`)."""
    families: dict[str, tuple[list[Entry], list[Entry]]] = {}
    for entry in entries:
        dense, experts = families.setdefault(_block_of(entry), ([], []))
        (experts if entry.num_experts else dense).append(entry)
    units = []
    for block, (dense, experts) in families.items():
        if not _block_selected(block, options):
            continue
        large = [e for e in dense if _splits_by_rows(e, options.unit_bytes)]
        rest = [e for e in dense if e not in large]
        if rest:
            units.append(Unit(block, tuple(rest)))
        for entry in large:
            units += _row_units(entry, options.unit_bytes)
        units += _expert_units(block, experts, options.unit_bytes)
    return units


def _splits_by_rows(entry: Entry, unit_bytes: int) -> bool:
    """A plain (copy-layout, dense) parameter larger than a unit is converted in row ranges."""
    return entry.layout == "copy" and entry.quant is None and entry.arrays()[0].nbytes > unit_bytes


def _row_units(entry: Entry, unit_bytes: int) -> list[Unit]:
    """Row ranges of one large parameter, each a whole number of its chunks."""
    array = entry.arrays()[0]
    chunk_rows = array.chunks[0]
    row_bytes = array.nbytes // array.shape[0]
    rows = max(chunk_rows, unit_bytes // row_bytes // chunk_rows * chunk_rows)
    n = array.shape[0]
    return [
        Unit(f"{entry.name}.rows.{r}-{min(r + rows, n) - 1}", (entry,), (r, min(r + rows, n)))
        for r in range(0, n, rows)
    ]


def _expert_units(block: str, experts: list[Entry], unit_bytes: int) -> list[Unit]:
    if not experts:
        return []
    count = experts[0].num_experts
    per_expert = sum(e.out_bytes_per_expert() for e in experts)
    group = max(1, min(count, unit_bytes // max(per_expert, 1)))
    return [
        Unit(f"{block}.experts.{e0}-{min(e0 + group, count) - 1}", tuple(experts), (e0, min(e0 + group, count)))
        for e0 in range(0, count, group)
    ]


def _quant_storage(index: CheckpointIndex, spec: ParamSpec) -> QuantStorage | None:
    """The release storage of a weight when every tensor of it is FP8 or FP4; None when float."""
    infos = [index.info(t.name) for t in spec.tensors]
    dtypes = {i.dtype for i in infos}
    if not dtypes & {"F8_E4M3", "I8"}:
        return None
    scales = [index.info(t.scale_name) for t in spec.tensors]
    scale_dtypes = {"F32" if s.dtype == "F32" else "E8M0" for s in scales}
    if len(dtypes) > 1 or len(scale_dtypes) > 1:
        raise ConvertError(
            f"{spec.tensors[0].name}: its {len(infos)} tensors mix storage formats {sorted(dtypes)} / scales "
            f"{sorted(scale_dtypes)}; convert without --keep-quantized"
        )
    dtype = dtypes.pop()
    return QuantStorage(
        fmt="fp8" if dtype == "F8_E4M3" else "fp4",
        data_shape=tuple(infos[0].shape),
        data_dtype=DTYPES[dtype],
        scale_shape=tuple(scales[0].shape),
        scale_dtype=np.dtype(np.float32) if scale_dtypes.pop() == "F32" else np.dtype(np.uint8),
    )


def build_entries(state: nnx.State, index: CheckpointIndex | None, keep_quantized: bool):
    """One Entry per parameter of the abstract state, in tree order."""
    shapes = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(state)}
    entries = []
    for spec in release_specs(state):
        abstract = shapes[spec.path]
        layout, groups = detect_layout(spec, tuple(abstract.shape))
        quant_storage = None
        if keep_quantized and layout != "copy":
            quant_storage = _quant_storage(index, spec)
        entries.append(Entry(spec, tuple(abstract.shape), np.dtype(abstract.dtype), layout, groups, quant_storage))
    return entries


# -------------------------------------------------------------------------------------- source


def _missing_shard_problems(src: Path) -> list[str]:
    """Shards the index names but SRC lacks, each with the tensors it should hold."""
    index_path = src / INDEX_FILE
    if not index_path.is_file():
        return []
    weight_map = load_weight_map(index_path)  # CheckpointError for a malformed index, naming it
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    return [
        f"{index_path}: shard {shard} is missing from {src}; it should hold {len(names)} tensor(s), e.g. {names[:3]}"
        for shard, names in by_shard.items()
        if not (src / shard).is_file()
    ]


def open_source(src: Path, cfg: ModelConfig, specs: list[ParamSpec]) -> CheckpointIndex:
    """Open SRC's index and check every tensor against the config, raising all problems at once."""
    problems = _missing_shard_problems(src)
    if problems:
        raise CheckpointError("\n".join(problems))
    index = CheckpointIndex(src)  # validates shard headers: truncation, sizes, duplicates, listing
    problems = validate_index(index, specs, weight_block(cfg))
    if problems:
        where = src / INDEX_FILE if (src / INDEX_FILE).is_file() else src  # or a single file's directory
        raise CheckpointError(
            problem_report(f"{where}: {len(problems)} problem(s) against {src / 'config.json'}:", problems)
        )
    for t in (t for spec in specs for t in spec.tensors if t.kind == "int"):  # tid2eid: a few MB each
        check_expert_ids(index, t, index.read(t.name), cfg.n_routed_experts)
    return index


@dataclasses.dataclass(frozen=True)
class FileRange:
    """`rows` rows of `row_bytes` bytes at `offset` of a source file: some rows of a release tensor
    whose stored bytes are exactly what an output array holds (copied file to file, in the kernel)."""

    path: Path
    offset: int
    rows: int
    row_bytes: int

    @property
    def nbytes(self) -> int:
        """Bytes in the range."""
        return self.rows * self.row_bytes

    def sub(self, r0: int, r1: int) -> FileRange:
        """Rows [r0, r1) of this range (relative to its first row)."""
        return FileRange(self.path, self.offset + r0 * self.row_bytes, r1 - r0, self.row_bytes)

    def as_one_row(self) -> FileRange:
        """The whole range as one row (one expert of a stacked array)."""
        return FileRange(self.path, self.offset, 1, self.nbytes)


class SourceReader:
    """Reads row ranges of release tensors with positional reads (no memory map), counting bytes.

    A memory map would keep every page it touched in the resident set until unmapped; plain reads
    leave the data in the page cache only, so the converter's memory stays bounded by its units.
    """

    def __init__(self, index: CheckpointIndex, on_read: Callable[[int], None] | None = None):
        self.index = index
        self._on_read = on_read or (lambda n: None)
        self._data_offsets: dict[str, int] = {}
        self._lock = threading.Lock()

    def _data_offset(self, shard: str) -> int:
        with self._lock:
            if shard not in self._data_offsets:
                self._data_offsets[shard] = read_header(self.index.directory / shard)[1]
            return self._data_offsets[shard]

    def rows(self, name: str, r0: int, r1: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [r0, r1) of tensor `name` (the whole tensor when 0-d/1-d rows are elements)."""
        info = self.index.info(name)
        shard = self.index.shard_of(name)
        dtype = DTYPES[info.dtype]
        tail = tuple(info.shape[1:])
        row_bytes = math.prod(tail) * dtype.itemsize
        if out is None:
            out = np.empty((r1 - r0,) + tail, dtype)
        path = self.index.directory / shard
        offset = self._data_offset(shard) + info.start + r0 * row_bytes
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(path, "rb", buffering=0) as f:
            got = os.preadv(f.fileno(), [view], offset)
        if got != view.nbytes:
            raise CheckpointError(f"{path}: short read of tensor {name!r} ({got} of {view.nbytes} bytes)")
        self._on_read(got)
        return out

    def range(self, name: str, r0: int = 0, r1: int | None = None) -> FileRange:
        """Where rows [r0, r1) of tensor `name` lie in its shard."""
        info, shard = self.index.info(name), self.index.shard_of(name)
        rows = info.shape[0] if info.shape else 1
        row_bytes = info.nbytes // max(rows, 1)
        whole = FileRange(self.index.directory / shard, self._data_offset(shard) + info.start, rows, row_bytes)
        return whole.sub(r0, rows if r1 is None else r1)

    def tensor(self, name: str) -> np.ndarray:
        """The whole tensor with its stored dtype and shape."""
        shape = tuple(self.index.info(name).shape)
        return self.rows(name, 0, shape[0] if shape else 1).reshape(shape)


# ----------------------------------------------------------------------------- dequantize + place
#
# Linear weights and experts are stored [out, in] and wanted [in, out]. Transposing the output
# (2-4 bytes per element) is what numpy does worst, so the transposed paths transpose the *source*
# bytes (1 byte per FP8 element, half a byte per FP4 element) in cache-sized strips and then decode
# with lookup tables straight into rows of the output. With E8M0 scales (the release's), one table
# lookup does all of it: the table is indexed by (scale byte << 8 | element byte) and holds the
# element's value times the scale, already cast to the output dtype, so every value is still the
# float32 product `dsv4.quant` computes, cast once. Work arrays are per-thread scratch reused block
# after block: faulting in fresh (huge) pages for temporaries otherwise costs more than the
# arithmetic.

_STRIP = 16  # rows per strip of a transposing copy (keeps both sides in cache)
_FP8_VALUES = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
_FP4_LOW = quant.FP4_LUT[np.arange(256) & 0xF]  # byte -> value of its low nibble (even element)
_FP4_HIGH = quant.FP4_LUT[np.arange(256) >> 4]  # byte -> value of its high nibble (odd element)
_ELEMENT_VALUES = {"F8_E4M3": (_FP8_VALUES,), "I8": (_FP4_LOW, _FP4_HIGH)}


@functools.cache
def _scaled_tables(code: str, dtype: np.dtype) -> tuple[np.ndarray, ...]:
    """Per element of a byte (FP8: one, FP4: low then high nibble), a table of 65,536 entries:
    entry (s << 8 | b) holds the bits of float32(value(b) * 2^(s - 127)) cast to `dtype`."""
    scales = quant.decode_e8m0(np.arange(256, dtype=np.uint8))
    with np.errstate(invalid="ignore", over="ignore"):
        return tuple(
            _bits((values[None, :] * scales[:, None]).astype(dtype)).reshape(-1)
            for values in _ELEMENT_VALUES[code]
        )


class _Scratch(threading.local):
    """Per-thread work arrays, grown on demand and reused (at most a few READ_BLOCK_BYTES each)."""

    def __init__(self):
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        buf = self.buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            buf = self.buffers[name] = _aligned_empty((max(nbytes, 1),), np.uint8)
        return buf[:nbytes].view(dtype).reshape(shape)


_SCRATCH = _Scratch()


def _bits(a: np.ndarray) -> np.ndarray:
    """`a` viewed as unsigned integers of its item size: numpy copies ml_dtypes element by element
    through a Python-level function when strided, but integers with its fast loops."""
    return a.view(f"u{a.dtype.itemsize}")


def _transposed(src: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """src [m, C] -> contiguous [C, m] (into `out` if given), copied in strips of rows."""
    out = np.empty(src.shape[::-1], src.dtype) if out is None else out
    out_bits, src_bits = _bits(out), _bits(src)
    for c in range(0, src.shape[0], _STRIP):
        out_bits[:, c : c + _STRIP] = src_bits[c : c + _STRIP].T
    return out


def _scale_values(scale: np.ndarray) -> np.ndarray:
    """E8M0 bytes or float scales -> float32 multipliers."""
    return quant.decode_e8m0(scale) if scale.dtype == np.uint8 else scale.astype(np.float32)


def _scale_columns(values_t: np.ndarray, scale_rows: np.ndarray, first: int, block: tuple[int, int]):
    """Multiply transposed values [K, m] (release rows first..first+m as columns) by their scales.

    scale_rows [g, gK]: scale rows covering those release rows, the first covering row `first`
    rounded down to a multiple of block[0]; block = (rows, columns) of one scale tile.
    """
    k, m = values_t.shape
    bn, bk = block
    rows = (np.arange(first, first + m) // bn) - first // bn
    scale_t = np.ascontiguousarray(_scale_values(scale_rows)[rows].T)  # [gK, m]
    if k % bk == 0:
        values_t.reshape(k // bk, bk, m)[...] *= scale_t[:, None, :]
    else:
        values_t *= np.repeat(scale_t, bk, axis=0)[:k]
    return values_t


def _read_rows(reader: SourceReader, name: str, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of `name` read into this thread's scratch."""
    info = reader.index.info(name)
    shape = (r1 - r0,) + tuple(info.shape[1:])
    return reader.rows(name, r0, r1, out=_SCRATCH.get("raw", shape, DTYPES[info.dtype]))


def _decode_transposed(reader: SourceReader, t: ReleaseTensor, code: str, r0: int, r1: int, block, dtype):
    """Release rows [r0, r1) of `t` as columns [K, r1 - r0] in scratch.

    Quantized with E8M0 scales (FP4 always: the index validation allows no other): dequantized
    straight into `dtype`; FP8 with float scales: float32; anything else: as stored.
    """
    raw = _read_rows(reader, t.name, r0, r1)
    m, width = raw.shape
    if code not in ("F8_E4M3", "I8"):
        return _transposed(raw, _SCRATCH.get("values_t", (width, m), raw.dtype))
    bytes_t = _transposed(raw.view(np.uint8), _SCRATCH.get("bytes_t", (width, m), np.uint8))
    if code == "F8_E4M3":
        scale = reader.rows(t.scale_name, r0 // block[0], -(-r1 // block[0]))
        check_values(reader.index, t, code, raw, scale)
        if scale.dtype == np.uint8:
            rows = (np.arange(r0, r1) // block[0]) - r0 // block[0]
            return _lookup_scaled(code, bytes_t, scale[rows].T, block[1], dtype)
        values_t = np.take(_FP8_VALUES, bytes_t, out=_SCRATCH.get("values_t", (width, m), np.float32))
        return _scale_columns(values_t, scale, r0, block)
    scale = reader.rows(t.scale_name, r0, r1).view(np.uint8)  # E8M0 or U8 bytes
    check_values(reader.index, t, code, raw, scale)
    # byte row j holds elements 2j and 2j + 1: one scale per 16 byte rows
    return _lookup_scaled(code, bytes_t, scale.T, quant.FP4_GROUP // 2, dtype)


_CHECK_BYTES = 16 << 20  # bytes of FP8 weight read at a time by _check_kept


def _check_kept(reader: SourceReader, t: ReleaseTensor) -> None:
    """CheckpointError if a tensor kept quantized holds a value no release holds (`quant.damage`).

    Its bytes are copied file to file, never decoded, so its scales, and an FP8 weight's bytes, are
    read here for the check (FP4 has no invalid codes): a second read of a small share of the source.
    """
    info = reader.index.info(t.name)
    check_values(reader.index, t, info.dtype, np.zeros(0, np.uint8), reader.tensor(t.scale_name))
    if info.dtype != "F8_E4M3":
        return
    rows = info.shape[0]
    step = max(1, _CHECK_BYTES // max(1, info.nbytes // max(rows, 1)))
    for r0 in range(0, rows, step):
        check_values(reader.index, t, info.dtype, _read_rows(reader, t.name, r0, min(r0 + step, rows)), None)


def _lookup_scaled(code: str, bytes_t: np.ndarray, scale_t: np.ndarray, rows_per_scale: int, dtype) -> np.ndarray:
    """Dequantize transposed element bytes [W, m] with E8M0 scales [ceil(W / rows_per_scale), m]
    (byte row j scaled by scale row j // rows_per_scale) into scratch of `dtype`: [W, m] for FP8,
    [2W, m] for FP4 (contiguous: `np.take` copies a strided `out` in and back out)."""
    width, m = bytes_t.shape
    index = _SCRATCH.get("index_t", (width, m), np.uint16)
    full = width // rows_per_scale * rows_per_scale
    groups = index[:full].reshape(-1, rows_per_scale, m)
    np.left_shift(scale_t[: full // rows_per_scale, None, :], 8, out=groups, dtype=np.uint16, casting="unsafe")
    if full < width:  # a last, partial scale group
        np.left_shift(scale_t[full // rows_per_scale], 8, out=index[full:], dtype=np.uint16, casting="unsafe")
    np.bitwise_or(index, bytes_t, out=index)
    tables = _scaled_tables(code, np.dtype(dtype))
    out = _SCRATCH.get("values_t", (width, len(tables), m), dtype)
    if len(tables) == 1:
        np.take(tables[0], index, out=_bits(out).reshape(width, m), mode="clip")  # "clip": no bounds pass
        return out.reshape(width, m)
    for i, table in enumerate(tables):  # FP4: byte row j -> elements 2j, 2j + 1
        element = _SCRATCH.get("element", (width, m), table.dtype)
        _bits(out)[:, i] = np.take(table, index, out=element, mode="clip")
    return out.reshape(width * len(tables), m)


def _decode_rows(reader: SourceReader, t: ReleaseTensor, code: str, r0: int, r1: int, block) -> np.ndarray:
    """Release rows [r0, r1) of `t` as rows, dequantized by `dsv4.quant` (floats and ints as stored)."""
    raw = _read_rows(reader, t.name, r0, r1)
    if code == "F8_E4M3":
        if r0 % block[0]:
            raise AssertionError(f"{t.name}: FP8 rows must start on a scale tile (row {r0})")
        scale = reader.rows(t.scale_name, r0 // block[0], -(-r1 // block[0]))
        check_values(reader.index, t, code, raw, scale)
        return quant.dequantize_fp8(raw, scale, block)
    if code == "I8":
        scale = reader.rows(t.scale_name, r0, r1)
        check_values(reader.index, t, code, raw, scale)
        return quant.dequantize_fp4(raw, scale)
    return raw


def _place_columns(dst: np.ndarray, values_t: np.ndarray, r0: int, layout: str) -> None:
    """Put release rows [r0, r0 + m), given as columns [K, m], into the parameter `dst`.

    transpose (and one expert's slot): dst [K, N]; grouped: dst [G, K, r] with release row i in
    group i // r, column i % r.
    """
    m = values_t.shape[1]
    if values_t.dtype != dst.dtype:  # a contiguous cast, then a plain copy of integers
        cast = _SCRATCH.get("cast", values_t.shape, dst.dtype)
        np.copyto(cast, values_t, casting="unsafe")
        values_t = cast
    values_t, dst = _bits(values_t), _bits(dst)
    if layout != "grouped":
        dst[:, r0 : r0 + m] = values_t
        return
    per_group, row = dst.shape[2], r0
    while row < r0 + m:
        g, j = divmod(row, per_group)
        take = min(per_group - j, r0 + m - row)
        dst[g, :, j : j + take] = values_t[:, row - r0 : row - r0 + take]
        row += take


def _row_step(shape: tuple[int, ...], code: str, block: tuple[int, int]) -> int:
    """Rows per block: about READ_BLOCK_BYTES of float32, a whole number of FP8 tile rows."""
    rows = max(1, READ_BLOCK_BYTES // max(4 * math.prod(shape[1:]), 1))
    if code == "F8_E4M3":
        rows = max(block[0], rows // block[0] * block[0])
    return rows


def convert_tensor(
    reader: SourceReader, t: ReleaseTensor, dst: np.ndarray, layout: str, block, rows: tuple[int, int] | None = None
) -> None:
    """Dequantize release tensor `t` (or its `rows` [a, b), copy layout only) into `dst`, by row blocks.

    `dst` is the parameter (for routed experts one expert's [K, N] slot of the stacked parameter;
    with `rows`, just those rows) in its dtype; values are dequantized in float32 and cast once on
    placement, exactly as `checkpoint.read_dequantized` + `ParamSpec.assemble` + `astype` would.
    """
    info = reader.index.info(t.name)
    if len(info.shape) < 2:
        dst[...] = reader.tensor(t.name)
        return
    start, stop = rows or (0, info.shape[0])
    if rows is not None and layout != "copy":
        raise AssertionError(f"{t.name}: row ranges are only converted for the copy layout")
    step = _row_step(tuple(info.shape), info.dtype, block)
    for r0 in range(start, stop, step):
        r1 = min(stop, r0 + step)
        if layout == "copy":
            dst[r0 - start : r1 - start] = _decode_rows(reader, t, info.dtype, r0, r1, block)
        else:
            _place_columns(dst, _decode_transposed(reader, t, info.dtype, r0, r1, block, dst.dtype), r0, layout)


# ---------------------------------------------------------------------------------- the store


def _param_info(directory: Path, name: str, context: ts.Context):
    """Orbax's description of one array of a non-OCDBT zarr v2 PyTree checkpoint."""
    from orbax.checkpoint import type_handlers

    return type_handlers.ParamInfo(
        name=name, parent_dir=Path(directory), is_ocdbt_checkpoint=False, use_zarr3=False, ts_context=context
    )


class ArrayStore:
    """DST/params: one zarr v2 array per stored array, in the layout Orbax's PyTree handler reads.

    Tensorstore creates the arrays (their `.zarray` metadata, through Orbax's own spec builder) and
    reads them back; the converter writes the chunk files itself. The arrays are uncompressed, so a
    zarr v2 chunk file is just the chunk's bytes in C order (edge chunks padded to the full chunk
    shape), and writing it straight from the unit's buffer avoids tensorstore's copy of every byte
    into freshly allocated chunk buffers (which dominated conversion time).
    """

    def __init__(self, directory: Path, on_copy: Callable[[int], None] | None = None):
        self.directory = Path(directory)
        self.on_copy = on_copy or (lambda n: None)
        self._context = ts.Context()
        self._arrays: dict[str, ts.TensorStore] = {}

    def _write_spec(self, a: StoredArray) -> dict:
        from orbax.checkpoint import type_handlers

        spec = type_handlers.get_json_tspec_write(
            _param_info(self.directory, a.name, self._context),
            use_ocdbt=False,
            global_shape=a.shape,
            local_shape=a.chunks,
            dtype=a.dtype,
        )
        spec["metadata"].update(compressor=None, filters=None, order="C", dimension_separator=".")
        return spec

    def create(self, arrays: Iterable[StoredArray]) -> None:
        """Create (or, resuming, reopen) every array; metadata only, no data."""
        self.directory.mkdir(parents=True, exist_ok=True)
        pending = {a.name: ts.open(self._write_spec(a), create=True, open=True, context=self._context) for a in arrays}
        for name, future in pending.items():
            self._arrays[name] = future.result()

    def open_existing(self, arrays: Iterable[StoredArray]) -> None:
        """Open arrays of a finished checkpoint for reading."""
        from orbax.checkpoint import type_handlers

        pending = {}
        for a in arrays:
            info = _param_info(self.directory, a.name, self._context)
            pending[a.name] = ts.open(type_handlers.get_json_tspec_read(info, False), context=self._context)
        for name, future in pending.items():
            self._arrays[name] = future.result()

    def chunk_writes(self, a: StoredArray, index: tuple | None, value) -> list[tuple]:
        """(file, chunk content, full chunk size) for `value` written to `a` whole or at `index`.

        `value` is an array, or a FileRange holding exactly the array's bytes. `index` is None (the
        whole array) or (slice(a, b),) along the leading axis (experts or rows); either way it
        covers whole chunks of the leading axis, and the other axes are one chunk.
        """
        rows = a.chunks[0]
        first = 0 if index is None else index[0].start
        count = value.rows if isinstance(value, FileRange) else value.shape[0]
        if first % rows or (count % rows and first + count != a.shape[0]):
            raise AssertionError(f"{a.name}: write of rows {first}..{first + count} does not cover whole chunks")
        if isinstance(value, FileRange) and value.row_bytes * a.shape[0] != a.nbytes:
            raise AssertionError(f"{a.name}: source rows of {value.row_bytes} bytes do not match the array")
        full = math.prod(a.chunks) * a.dtype.itemsize
        tail = ".0" * (len(a.shape) - 1)
        if not isinstance(value, FileRange):
            value = np.ascontiguousarray(value)
        pieces = [
            value.sub(r, min(r + rows, count)) if isinstance(value, FileRange) else value[r : r + rows]
            for r in range(0, count, rows)
        ]
        return [
            (self.directory / a.name / f"{(first + r) // rows}{tail}", piece, full)
            for r, piece in zip(range(0, count, rows), pieces, strict=True)
        ]

    def write_chunk(self, path: Path, content, full_nbytes: int) -> None:
        """Write one zarr chunk file atomically (temp + rename), zero-padded to `full_nbytes`.

        Converted arrays, and source byte ranges read into an aligned buffer, go to disk with
        direct I/O where the filesystem and the alignment allow it (see `_write_direct`); other
        writes go through the page cache (source ranges copied in the kernel).
        """
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
        if isinstance(content, FileRange):
            if not (_direct_io_fits(content.nbytes) and _write_direct(tmp, _range_pieces(content))):
                with open(tmp, "wb", buffering=0) as f:
                    _copy_range(content, f)
            self.on_copy(content.nbytes)
        else:
            data = memoryview(content.reshape(-1).view(np.uint8))
            address = content.ctypes.data
            if not (_direct_io_fits(data.nbytes, address) and _write_direct(tmp, [data])):
                with open(tmp, "wb", buffering=0) as f:
                    _write_all(f, data)
        if tmp.stat().st_size < full_nbytes:
            os.truncate(tmp, full_nbytes)
        os.replace(tmp, path)

    def read(self, a: StoredArray, index: tuple | None = None) -> np.ndarray:
        """Array `a` (or `a[index]`) read back from disk; `a` must have been created or opened first."""
        target = self._arrays[a.name]
        return (target[index] if index is not None else target).read().result()


def _direct_io_fits(nbytes: int, address: int = 0) -> bool:
    """Whether `nbytes` at `address` can be written with direct I/O (and are worth it)."""
    aligned = (address | nbytes) % DIRECT_IO_ALIGN == 0
    return bool(getattr(os, "O_DIRECT", 0)) and nbytes >= DIRECT_IO_MIN_BYTES and aligned


def _write_direct(path: Path, pieces: Iterable[memoryview]) -> bool:
    """Write `pieces` (aligned buffers) one after another to the new file `path` with O_DIRECT.

    Copying gigabytes into the page cache is most of a buffered writer's CPU time (the kernel's
    copy ran at ~0.6 GB/s during conversions here, against 3 GB/s written directly). Returns False,
    leaving no file, when the filesystem refuses O_DIRECT (tmpfs, some network filesystems) or the
    alignment it needs; the caller then writes through the page cache.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    try:
        for piece in pieces:
            done = 0
            while done < piece.nbytes:
                done += os.write(fd, piece[done:])
    except BaseException as err:
        os.close(fd)
        os.unlink(path)
        if isinstance(err, OSError) and err.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    os.close(fd)
    return True


def _range_pieces(src: FileRange):
    """A source byte range read piece by piece into this thread's aligned copy buffer."""
    buffer = _SCRATCH.get("copy", (min(COPY_BUFFER_BYTES, src.nbytes),), np.uint8)
    with open(src.path, "rb", buffering=0) as f:
        for start in range(0, src.nbytes, buffer.nbytes):
            view = memoryview(buffer)[: min(buffer.nbytes, src.nbytes - start)]
            got = os.preadv(f.fileno(), [view], src.offset + start)
            if got != view.nbytes:
                raise CheckpointError(f"{src.path}: short read at byte {src.offset + start + got}")
            yield view


def _write_all(f, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += f.write(data[done:])


def _copy_range(src: FileRange, dst) -> None:
    """Copy a source byte range to the file `dst` (at its position): in the kernel when it can."""
    with open(src.path, "rb", buffering=0) as f:
        done = 0
        try:
            while done < src.nbytes:
                n = os.copy_file_range(f.fileno(), dst.fileno(), src.nbytes - done, src.offset + done)
                if n == 0:
                    break
                done += n
        except OSError as err:  # another filesystem, or no copy_file_range: plain reads and writes
            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
        while done < src.nbytes:
            data = os.pread(f.fileno(), min(8 << 20, src.nbytes - done), src.offset + done)
            if not data:
                break
            _write_all(dst, memoryview(data))
            done += len(data)
    if done != src.nbytes:
        raise CheckpointError(f"{src.path}: short read at byte {src.offset + done} ({done} of {src.nbytes} bytes)")


def write_orbax_metadata(directory: Path, arrays: Sequence[StoredArray]) -> None:
    """The PyTree `_METADATA` Orbax reads: every array a dict-keyed `jax.Array` leaf, zarr v2, no OCDBT."""
    tree = {
        str(a.key): {
            "key_metadata": [{"key": k, "key_type": 2} for k in a.key],  # 2: a dict key
            "value_metadata": {
                "value_type": "jax.Array",
                "skip_deserialize": False,
                "write_shape": list(a.chunks),
            },
        }
        for a in arrays
    }
    doc = {
        "tree_metadata": tree,
        "use_ocdbt": False,
        "use_zarr3": False,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None,
    }
    outputs.write_json(directory / "_METADATA", doc)


# ------------------------------------------------------------------------------- unit building


@dataclasses.dataclass(frozen=True)
class WriteOp:
    """Write `value` (an array, or source bytes to copy) into `array` (at `index`, or whole)."""

    array: StoredArray
    index: tuple | None
    value: np.ndarray | FileRange


class _Pool:
    """`map` over a thread pool (inline with one worker); exceptions propagate to the caller."""

    def __init__(self, workers: int):
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="dsv4-convert") if workers > 1 else None

    def map(self, fn, items) -> list:
        if self._executor is None:
            return [fn(x) for x in items]
        return list(self._executor.map(fn, items))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


class _Buffers:
    """Output arrays handed from one unit to a later one.

    Touching fresh pages is slow (very slow in VMs), and units mostly repeat shapes, so the arrays
    of a unit whose writes finished are reused by the next unit built. Only the arrays of the last
    released unit are kept spare, so spares never exceed one unit. Arrays start on a
    `DIRECT_IO_ALIGN` boundary, so their chunks can be written with direct I/O.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._free: dict[tuple, list[np.ndarray]] = {}
        self._taken: dict[int, np.ndarray] = {}  # start address -> the whole array behind a take

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An array of `shape`: a spare one with the same trailing shape and enough rows, or new."""
        key = (tuple(shape[1:]), np.dtype(dtype))
        with self._lock:
            free = self._free.get(key, [])
            fits = [i for i, a in enumerate(free) if a.shape[0] >= shape[0]]
            if fits:
                array = free.pop(fits[0])
            else:  # a unit of another kind: free the spares before allocating (two units at most)
                self._free = {}
                array = _aligned_empty(shape, dtype)
            self._taken[array.ctypes.data] = array
        return array[: shape[0]] if shape else array

    def release(self, arrays: list[np.ndarray]) -> None:
        """`arrays` (from `take`) may be reused; spares from earlier units are dropped."""
        free: dict[tuple, list[np.ndarray]] = {}
        with self._lock:
            for a in arrays:
                whole = self._taken.pop(a.ctypes.data)
                free.setdefault((tuple(whole.shape[1:]), whole.dtype), []).append(whole)
            self._free = free


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """`np.empty(shape, dtype)` starting on a `DIRECT_IO_ALIGN` boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + DIRECT_IO_ALIGN, np.uint8)
    start = -raw.ctypes.data % DIRECT_IO_ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


class UnitBuilder:
    """Turns one unit into write operations: converted host arrays, or source byte ranges to copy.

    A release tensor whose stored bytes are exactly the output (kept-quantized data and scales, a
    plain tensor already in the output dtype and layout) is copied file to file; everything else is
    converted into arrays reused from unit to unit.
    """

    def __init__(self, reader: SourceReader, block: tuple[int, int], pool: _Pool, on_tensor=None):
        self.reader, self.block, self.pool = reader, block, pool
        self.buffers = _Buffers()
        self._on_tensor = on_tensor or (lambda n: None)

    def build(self, unit: Unit) -> list[WriteOp]:
        """The write operations that produce `unit`'s output (whole parameters, an expert range or a row range)."""
        if unit.span is None:
            return [op for ops in self.pool.map(self._entry_ops, unit.entries) for op in ops]
        if unit.is_experts:
            return self._expert_ops(unit)
        return self._row_ops(unit)

    def _tensors_read(self, t: ReleaseTensor) -> int:
        return 1 + (self.reader.index.info(t.name).dtype in ("F8_E4M3", "I8"))

    def _copies_as_stored(self, entry: Entry) -> bool:
        """A plain parameter whose release bytes already are its output (same layout and dtype)."""
        t = entry.spec.tensors[0]
        return (
            entry.layout == "copy"
            and entry.quant is None
            and DTYPES[self.reader.index.info(t.name).dtype] == entry.dtype
        )

    def _entry_ops(self, entry: Entry) -> list[WriteOp]:
        (t,) = entry.spec.tensors
        arrays = entry.arrays()
        if entry.quant is not None:
            _check_kept(self.reader, t)
            self._on_tensor(2)
            return [WriteOp(arrays[0], None, self.reader.range(t.name)),
                    WriteOp(arrays[1], None, self.reader.range(t.scale_name))]  # fmt: skip
        self._on_tensor(self._tensors_read(t))
        if self._copies_as_stored(entry):
            return [WriteOp(arrays[0], None, self.reader.range(t.name))]
        out = self.buffers.take(entry.shape, entry.dtype)
        convert_tensor(self.reader, t, out, entry.layout, self.block)
        return [WriteOp(arrays[0], None, out)]

    def _row_ops(self, unit: Unit) -> list[WriteOp]:
        """Rows [r0, r1) of one large plain parameter, copied or converted in parallel pieces."""
        (entry,), (r0, r1) = unit.entries, unit.span
        (t,), array = entry.spec.tensors, entry.arrays()[0]
        if r1 == array.shape[0]:
            self._on_tensor(self._tensors_read(t))
        if self._copies_as_stored(entry):
            return [WriteOp(array, (slice(r0, r1),), self.reader.range(t.name, r0, r1))]
        out = self.buffers.take((r1 - r0,) + array.shape[1:], array.dtype)
        step = _row_step(array.shape, "", self.block)
        pieces = [(a, min(a + step, r1)) for a in range(r0, r1, step)]
        self.pool.map(
            lambda p: convert_tensor(self.reader, t, out[p[0] - r0 : p[1] - r0], "copy", self.block, p), pieces
        )
        return [WriteOp(array, (slice(r0, r1),), out)]

    def _expert_ops(self, unit: Unit) -> list[WriteOp]:
        """Experts [e0, e1) of a block: converted into stacked arrays, or (kept quantized) copied."""
        e0, e1 = unit.span
        ops = []
        for entry in unit.entries:
            if entry.quant is not None:
                for e in range(e0, e1):
                    t = entry.spec.tensors[e]
                    _check_kept(self.reader, t)
                    for a, name in zip(entry.arrays(), (t.name, t.scale_name), strict=True):
                        ops.append(WriteOp(a, (slice(e, e + 1),), self.reader.range(name).as_one_row()))
                self._on_tensor(2 * (e1 - e0))
        dense = [entry for entry in unit.entries if entry.quant is None]
        buffers = {entry.name: self.buffers.take((e1 - e0,) + entry.shape[1:], entry.dtype) for entry in dense}

        def fill(task):
            entry, e = task
            t = entry.spec.tensors[e]
            convert_tensor(self.reader, t, buffers[entry.name][e - e0], "experts", self.block)
            self._on_tensor(self._tensors_read(t))

        self.pool.map(fill, [(entry, e) for e in range(e0, e1) for entry in dense])
        return ops + [WriteOp(entry.arrays()[0], (slice(e0, e1),), buffers[entry.name]) for entry in dense]


def unit_tensor_count(unit: Unit, index: CheckpointIndex) -> int:
    """Release tensors (weights and scales) a unit completes (a row-split tensor counts in its last unit)."""
    if unit.span is not None and not unit.is_experts and unit.span[1] != unit.entries[0].shape[0]:
        return 0
    return sum(1 + (index.info(t.name).dtype in ("F8_E4M3", "I8")) for t, _ in unit.tensors())


def unit_source_bytes(unit: Unit, index: CheckpointIndex) -> int:
    """Bytes a unit reads from SRC (weights and scales)."""
    total = 0.0
    for t, fraction in unit.tensors():
        info = index.info(t.name)
        total += info.nbytes * fraction
        if info.dtype in ("F8_E4M3", "I8"):
            total += index.info(t.scale_name).nbytes * fraction
    return round(total)


# ---------------------------------------------------------------------------- progress record


class ProgressRecord:
    """The temp dir's record of the conversion: options, source fingerprint, finished units."""

    def __init__(self, path: Path, header: dict, completed: Iterable[str] = ()):
        self.path, self.header, self.completed = path, header, list(completed)

    @classmethod
    def load(cls, path: Path) -> ProgressRecord:
        """Read the record at `path`; ConvertError when it is missing or malformed."""
        try:
            doc = json.loads(path.read_text())
            return cls(path, doc["header"], doc["completed"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConvertError(f"{path}: unreadable progress record ({err}); rerun without --resume") from None

    def save(self) -> None:
        """Write the record (header and completed units) to its path, atomically."""
        outputs.write_json(self.path, {"header": self.header, "completed": self.completed})

    def mark(self, unit: str) -> None:
        """Record `unit` as completely written."""
        self.completed.append(unit)
        self.save()


def _progress_header(src: Path, index: CheckpointIndex, options: ConvertOptions) -> dict:
    shards = {s: (src / s).stat().st_size for s in index.shards()}
    return {
        "format": "dsv4-convert-progress",
        "version": FORMAT_VERSION,
        "source": str(src.resolve()),
        "shards": shards,
        "options": options.to_json(),
    }


def _libc_syncfs():
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _libc_syncfs()


def sync_filesystem(path: Path) -> None:
    """Put everything written to the filesystem holding `path` on the disk: file data, sizes and
    renames (syncfs(2); sync(2) where the C library lacks it or refuses). Direct I/O skips the page
    cache but not the filesystem's journal, so a chunk file's size and name need this too."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS is None or _SYNCFS(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def check_space(where: Path, needed: int, dst: Path) -> None:
    """ConvertError naming DST when the filesystem holding `where` has less than `needed` bytes free."""
    free = shutil.disk_usage(where).free
    if needed > free:
        raise ConvertError(
            f"{dst}: not enough disk space: the conversion has about {needed / 1e9:.2f} GB left to write and "
            f"the filesystem holding {where} has {free / 1e9:.2f} GB free; free some space, or pass "
            "--no-space-check (space_check=False) if the filesystem reports less than it can hold"
        )


def destination(dst) -> Path:
    """DST as a conversion writes it: a symbolic link is followed to its target, which is replaced
    (replacing the link itself would leave the target holding the old checkpoint)."""
    dst = Path(dst)
    return dst.resolve() if dst.is_symlink() else dst


def temp_dir(dst: Path) -> Path:
    """Where a conversion to `dst` is assembled (a sibling, so the final rename stays on one disk)."""
    return dst.parent / (dst.name + TEMP_SUFFIX)


def _lock_dir(path: Path) -> int:
    """An exclusive flock on the directory `path` (its open descriptor; closing it releases the lock,
    as does the process's death). ConvertError when another conversion holds it; on a filesystem
    that has no flock the descriptor comes back unlocked."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConvertError(
            f"{path}: another dsv4-convert is writing this conversion now; wait for it to finish, or stop it"
        ) from None
    except OSError as err:  # a filesystem without flock: convert unguarded, as before the lock
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            os.close(fd)
            raise
    return fd


def _changed_options(header: dict, old: dict) -> list[str]:
    """The header keys that differ, with the option names inside "options"."""
    diff = []
    for key in sorted(set(header) | set(old)):
        if key == "options" and isinstance(old.get(key), dict):
            new_opts, old_opts = header[key], old[key]
            diff += [f"{k} ({old_opts.get(k)!r} -> {new_opts.get(k)!r})" for k in sorted(set(new_opts) | set(old_opts))
                     if new_opts.get(k) != old_opts.get(k)]  # fmt: skip
        elif header.get(key) != old.get(key):
            diff.append(key)
    return diff


def _start_or_resume(tmp: Path, header: dict, resume: bool, log) -> tuple[ProgressRecord, int]:
    """A fresh temp dir with an empty record, or (resume) the existing record if it matches; with the
    descriptor of the temp dir's lock (`_lock_dir`), which the caller holds until the conversion ends."""
    record_path = tmp / PROGRESS_FILE
    lock = _lock_dir(tmp) if tmp.is_dir() else None  # refuses while another run writes it
    try:
        if resume and record_path.exists():
            record = ProgressRecord.load(record_path)
            if record.header != header:
                raise ConvertError(
                    f"{tmp}: cannot resume: the unfinished conversion differs in "
                    f"{', '.join(_changed_options(header, record.header))}; rerun without --resume to start over"
                )
            for stale in (tmp / PARAMS_DIR).glob("*/.*.tmp"):  # chunk writes cut short by the interruption
                stale.unlink()
            log(f"resuming {tmp}: {len(record.completed)} unit(s) already complete")
            return record, lock
        if tmp.exists():
            if not record_path.exists():
                raise ConvertError(f"{tmp}: exists and is not a dsv4-convert temporary directory; remove it")
            log(f"removing the unfinished conversion {tmp} (pass --resume to continue it instead)")
            shutil.rmtree(tmp)
        elif resume:
            log(f"nothing to resume at {tmp}: starting from scratch")
        tmp.mkdir(parents=True)
        if lock is not None:  # the removed directory's
            os.close(lock)
            lock = None
        lock = _lock_dir(tmp)
        record = ProgressRecord(record_path, header)
        record.save()
        return record, lock
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise


class _Progress:
    """tqdm bar over source bytes, with the tensor count as postfix (thread-safe)."""

    def __init__(self, total_bytes: int, total_tensors: int, done_bytes: int, done_tensors: int, enabled: bool):
        from tqdm.auto import tqdm

        self._lock = threading.Lock()
        self.total_tensors, self.tensors = total_tensors, done_tensors
        self.bytes_read = 0
        self._bar = tqdm(
            total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, unit_divisor=1024,
            desc="dsv4-convert", disable=not enabled, dynamic_ncols=True, smoothing=0.1, mininterval=0.5,
        )  # fmt: skip

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n
            self._bar.update(n)

    def add_tensors(self, n: int) -> None:
        with self._lock:
            self.tensors += n
            self._bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)

    def close(self) -> None:
        self._bar.close()


# ---------------------------------------------------------------------------------- conversion

FIXED_OVERHEAD_BYTES = 512 << 20  # Python, JAX, Orbax, tensorstore and the plan: measured 0.23-0.26 GB
WRITERS_PER_WORKER = 2
# One row block (READ_BLOCK_BYTES of float32) and its temporaries, and the writers' copy buffers.
WORKER_SCRATCH_BYTES = (16 << 20) + WRITERS_PER_WORKER * COPY_BUFFER_BYTES


def memory_bound(largest_unit_bytes: int, workers: int) -> int:
    """Peak host memory the converter stays within: 2 units + per-worker scratch + fixed overhead."""
    return 2 * largest_unit_bytes + workers * WORKER_SCRATCH_BYTES + FIXED_OVERHEAD_BYTES


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    Linux: VmHWM of /proc/self/status. Not getrusage's ru_maxrss, which a process started by
    fork + exec inherits from its parent's high-water mark.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclasses.dataclass
class ConvertSummary:
    """What a conversion did."""

    dst: str
    units: int
    units_resumed: int
    tensors: int
    parameters: int
    bytes_read: int
    bytes_written: int
    seconds: float
    setup_seconds: float
    peak_rss_bytes: int
    largest_unit_bytes: int
    memory_bound_bytes: int

    def format(self) -> str:
        """A multi-line human-readable report (sizes in GB of 10^9 bytes)."""
        gb = 1e9
        rate = self.bytes_read / max(self.seconds, 1e-9) / gb
        return (
            f"converted {self.units} unit(s) ({self.units_resumed} resumed) into {self.dst}\n"
            f"  tensors read   {self.tensors:,}\n"
            f"  parameters     {self.parameters:,}\n"
            f"  bytes read     {self.bytes_read / gb:.3f} GB ({rate:.3f} GB/s)\n"
            f"  bytes written  {self.bytes_written / gb:.3f} GB\n"
            f"  seconds        {self.seconds:.1f} ({self.setup_seconds:.1f} validating and planning)\n"
            f"  peak RSS       {self.peak_rss_bytes / gb:.3f} GB"
            f" (bound {self.memory_bound_bytes / gb:.3f} GB,"
            f" largest unit {self.largest_unit_bytes / gb:.3f} GB)"
        )


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    if outputs.paths_overlap(src, dst):
        raise ConvertError(f"{dst}: destination must lie outside the source {src} (and not contain it)")
    above = next((p for p in dst.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ConvertError(f"{dst}: cannot be created, {above} is not a directory")
    if not dst.exists():
        return
    if not overwrite:
        raise ConvertError(f"{dst}: destination exists; pass --overwrite to replace it")
    if not dst.is_dir() or (any(dst.iterdir()) and not (dst / MANIFEST_FILE).exists()):
        raise ConvertError(f"{dst}: exists and is not a dsv4 checkpoint; refusing to replace it even with --overwrite")


def _output_config(cfg: ModelConfig, options: ConvertOptions) -> ModelConfig:
    if options.layers is not None and options.layers[1] > cfg.num_hidden_layers:
        raise ConvertError(
            f"--layers {options.layers[0]}:{options.layers[1]}: the model has {cfg.num_hidden_layers} layers"
        )
    if options.include_mtp:
        return cfg
    return cfg.without_mtp()


def _run_units(todo: list[Unit], builder: UnitBuilder, store: ArrayStore, record: ProgressRecord, writers):
    """Build unit k+1 while unit k's chunks are written; record each unit once written.

    Two units live in memory: the one being written and the one being built (whose buffers are
    those of unit k-1, released when its writes finished).
    """
    delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
    inflight = None
    for unit in todo:
        ops = builder.build(unit)
        if inflight is not None:
            _finish(*inflight, builder, record, delay)
        jobs = [job for op in ops for job in store.chunk_writes(op.array, op.index, op.value)]
        buffers = [op.value for op in ops if isinstance(op.value, np.ndarray)]
        inflight = (unit, [writers.submit(store.write_chunk, *job) for job in jobs], buffers)
    if inflight is not None:
        _finish(*inflight, builder, record, delay)


def _finish(unit: Unit, futures: list, buffers: list, builder: UnitBuilder, record: ProgressRecord, delay):
    for f in futures:
        f.result()
    builder.buffers.release(buffers)
    sync_filesystem(record.path.parent)  # the unit's chunks on the disk before the record says so
    record.mark(unit.name)
    if delay:
        time.sleep(delay)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def convert(
    src,
    dst,
    dtype: str = "bfloat16",
    keep_quantized: bool = False,
    workers: int = 1,
    include_mtp: bool = True,
    layers: tuple[int, int] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    unit_bytes: int = DEFAULT_UNIT_BYTES,
    log: Callable[[str], None] | None = None,
    space_check: bool = True,
) -> ConvertSummary:
    """Convert the release checkpoint SRC into the Orbax checkpoint DST (see the module docstring).

    Everything is validated before any heavy work: the destination, the config, and every tensor
    of the index against the config (all problems reported at once), then (`space_check`) the free
    space on DST's filesystem against the output still to write. Raises ConvertError,
    CheckpointError or ConfigError with a message naming the file (and tensor).
    """
    start = time.monotonic()
    log = log or (lambda msg: print(msg, flush=True))
    src, dst = Path(src), destination(dst)
    options = ConvertOptions(dtype, keep_quantized, include_mtp, layers, unit_bytes)
    if workers < 1:
        raise ConvertError(f"workers (--workers) must be >= 1, got {workers}")
    _check_destination(src, dst, overwrite)
    cfg = ModelConfig.from_hf_config(src)
    out_cfg = _output_config(cfg, options)
    state = nnx.split(abstract_model(cfg, RuntimeConfig(dtype=options.dtype)))[1]
    index = open_source(src, cfg, release_specs(state))
    units = plan_units(build_entries(state, index, keep_quantized), options)
    entries = list({e.name: e for u in units for e in u.entries}.values())
    tmp = temp_dir(dst)
    record, lock = _start_or_resume(tmp, _progress_header(src, index, options), resume, log)
    try:  # the heavy part, in the locked temporary directory; then the rename to DST
        done = set(record.completed)
        todo = [u for u in units if u.name not in done]
        if space_check:
            _check_space_or_clean(tmp, dst, sum(u.out_bytes() for u in todo), fresh=not done)
        store = ArrayStore(tmp / PARAMS_DIR)
        store.create(a for e in entries for a in e.arrays())
        bar = _Progress(
            total_bytes=sum(unit_source_bytes(u, index) for u in units),
            total_tensors=sum(unit_tensor_count(u, index) for u in units),
            done_bytes=sum(unit_source_bytes(u, index) for u in units if u.name in done),
            done_tensors=sum(unit_tensor_count(u, index) for u in units if u.name in done),
            enabled=progress,
        )
        pool = _Pool(workers)
        # Direct I/O writes wait for the disk without using the CPU: two writer threads per worker.
        writers = ThreadPoolExecutor(WRITERS_PER_WORKER * workers, thread_name_prefix="dsv4-convert-write")
        try:
            reader = SourceReader(index, on_read=bar.add_bytes)
            store.on_copy = bar.add_bytes
            builder = UnitBuilder(reader, weight_block(cfg), pool, bar.add_tensors)
            setup_seconds = time.monotonic() - start
            _run_units(todo, builder, store, record, writers)
        finally:
            writers.shutdown(wait=True, cancel_futures=True)
            pool.close()
            bar.close()
        largest = max(u.out_bytes() for u in units)
        summary = ConvertSummary(
            dst=str(dst), units=len(units), units_resumed=len(units) - len(todo), tensors=bar.tensors,
            parameters=sum(math.prod(e.shape) for e in entries), bytes_read=bar.bytes_read,
            bytes_written=_dir_bytes(tmp / PARAMS_DIR), seconds=0.0, setup_seconds=setup_seconds, peak_rss_bytes=0,
            largest_unit_bytes=largest, memory_bound_bytes=memory_bound(largest, workers),
        )  # fmt: skip
        summary.seconds = time.monotonic() - start
        summary.peak_rss_bytes = peak_rss_bytes()
        _finalize(tmp, dst, src, out_cfg, options, entries, summary)
        return summary
    finally:  # also when the space check stops the run before the work starts
        index.close()
        os.close(lock)


def _check_space_or_clean(tmp: Path, dst: Path, needed: int, fresh: bool) -> None:
    """`check_space`; a fresh run it stops leaves no temporary directory behind (a resumed one keeps its work)."""
    try:
        check_space(tmp, needed, dst)
    except ConvertError:
        if fresh:
            shutil.rmtree(tmp)
        raise


def _manifest(src: Path, cfg: ModelConfig, options: ConvertOptions, entries: list[Entry]) -> dict:
    converted_layers = options.layers or (0, cfg.num_hidden_layers)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "source": str(src.resolve()),
        "options": options.to_json(),
        "partial": tuple(converted_layers) != (0, cfg.num_hidden_layers),
        "params_dir": PARAMS_DIR,
        "arrays": {a.name: {"shape": list(a.shape), "dtype": a.dtype.name} for e in entries for a in e.arrays()},
        "quantized": {
            e.name: {
                "fmt": e.quant.fmt,
                "layout": e.layout,
                "groups": e.groups,
                "block": list(weight_block(cfg)),
            }
            for e in entries
            if e.quant is not None
        },
    }


def _finalize(tmp, dst, src, cfg, options, entries, summary) -> None:
    """Write the metadata, copy the tokenizer files, and move the finished checkpoint to DST."""
    write_orbax_metadata(tmp / PARAMS_DIR, [a for e in entries for a in e.arrays()])
    manifest = _manifest(src, cfg, options, entries)
    manifest["summary"] = {k: v for k, v in dataclasses.asdict(summary).items() if k not in ("dst",)}
    outputs.write_json(tmp / MANIFEST_FILE, manifest)
    cfg.save(tmp / "config.json")
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, tmp / name)
    sync_filesystem(tmp)  # the metadata on the disk before DST names it
    # --overwrite: the old checkpoint is swapped out, and put back should the swap fail. The progress
    # record goes last, so a failed swap leaves a temporary directory that --resume can still finish.
    outputs.replace_dir(tmp, dst)
    (dst / PROGRESS_FILE).unlink()


# What Orbax's and TensorStore's errors say when an array's files are missing, cut or garbled.
_READ_FAILURES = ("NOT_FOUND", "DATA_LOSS", "FAILED_PRECONDITION", "OUT_OF_RANGE", "not found", "while reading",
                  "Invalid", "does not exist")  # fmt: skip


def unreadable(err: Exception) -> bool:
    """Whether `err`, raised reading a converted checkpoint's arrays, says their files are damaged
    (not, say, that device memory ran out)."""
    return isinstance(err, FileNotFoundError) or any(word in str(err) for word in _READ_FAILURES)


_TENSORSTORE_TAIL = re.compile(r"\s*(?:See full TensorStore details|\[source locations|\[tensorstore_spec)")


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception `err` was raised from (TensorStore's says which chunk file is wrong;
    Orbax's wrappers quote a whole TensorStore spec)."""
    while (inner := err.__cause__ or err.__context__) is not None:
        err = inner
    return err


def short_reason(err: BaseException) -> str:
    """`err`'s message on one line, without TensorStore's spec and source locations."""
    return _TENSORSTORE_TAIL.split(" ".join(str(err).split()))[0]


DAMAGED = "the checkpoint is damaged or incomplete: convert it again"


def damaged(where: Path, err: Exception, name: str | None = None) -> CheckpointError:
    """A one-line CheckpointError for an array of a converted checkpoint that cannot be read (Orbax
    and TensorStore raise long multi-line errors of several types): the array, the innermost
    reason (without TensorStore's spec and source locations), and what to do."""
    root = root_cause(err)
    if name is None:
        found = re.search(rf"{PARAMS_DIR}/([\w.\-]+)", f"{root} {err}")
        name = found.group(1).rstrip(".") if found else None
    reason = short_reason(root)
    array = f"array {name}: " if name else ""
    return CheckpointError(f"{where}: cannot read {array}{type(root).__name__}: {reason[:300]}; {DAMAGED}")


@contextlib.contextmanager
def reporting_damage(where: Path, name: str | None = None):
    """Reading the arrays of a converted checkpoint under `where`: an error that says their files are
    missing or cut (`unreadable`; Orbax's and TensorStore's several types) becomes `damaged`'s
    one-line CheckpointError; any other passes unchanged."""
    try:
        yield
    except Exception as err:
        if not unreadable(err):
            raise
        raise damaged(where, err, name) from err


def _unfinished_hint(path: Path) -> str:
    """What to say when `path` is, or has beside it, a conversion that did not finish."""
    if path.name.endswith(TEMP_SUFFIX):
        dst = path.parent / path.name[: -len(TEMP_SUFFIX)]
        return f"; {path} is an unfinished conversion: `dsv4-convert SRC {dst} --resume` finishes it"
    if temp_dir(path).is_dir():
        return f"; {temp_dir(path)} holds an unfinished conversion: `dsv4-convert SRC {path} --resume` finishes it"
    return ""


def read_manifest(path) -> dict:
    """DST's dsv4_checkpoint.json, checked for format and version."""
    file = Path(path) / MANIFEST_FILE
    try:
        manifest = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: not a dsv4 Orbax checkpoint ({err}){_unfinished_hint(Path(path))}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        found = manifest if isinstance(manifest, dict) else {}
        raise CheckpointError(
            f"{file}: format {found.get('format')!r} version {found.get('version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    for key in ("arrays", "options"):
        if not isinstance(manifest.get(key), dict):
            raise CheckpointError(f"{file}: no {key!r} record; the checkpoint is damaged: convert it again")
    if "dtype" not in manifest["options"]:
        raise CheckpointError(f"{file}: its options name no dtype; the checkpoint is damaged: convert it again")
    return manifest


# ------------------------------------------------------------------------------------ verification


@dataclasses.dataclass
class VerifyReport:
    """Which arrays were compared and which differed: `parameters` sampled (`--samples`), each one
    array, or two for a quantized weight (data and scale), or one such per expert of two sampled
    experts of a stacked expert parameter."""

    checked: list[str]
    mismatches: list[str]
    parameters: int = 0

    @property
    def ok(self) -> bool:
        """Whether no compared array differed."""
        return not self.mismatches

    def format(self) -> str:
        """A one-line summary followed by one `MISMATCH` line per differing array."""
        lines = [f"verified {self.parameters} parameter(s), {len(self.checked)} array(s) or expert slices: "
                 f"{len(self.mismatches)} mismatch(es)"]  # fmt: skip
        lines += [f"  MISMATCH {m}" for m in self.mismatches]
        return "\n".join(lines)


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _expected_dense(index, spec: ParamSpec, tensors: list[ReleaseTensor], block, dtype) -> np.ndarray:
    """The reference path of `load_hf`: read_dequantized + the name table's assemble + astype."""
    from dsv4.checkpoint import read_dequantized

    return np.asarray(spec.assemble([read_dequantized(index, t, block) for t in tensors])).astype(dtype)


def _verify_entry(entry: Entry, index, store: ArrayStore, block, rng) -> list[tuple[str, bool]]:
    """Compare one parameter (two random experts of a stacked one) between SRC and DST."""
    arrays = entry.arrays()
    picks = [None] if not entry.num_experts else sorted(rng.choice(entry.num_experts, 2, replace=False).tolist())
    results = []
    for e in picks:
        tensors = list(entry.spec.tensors) if e is None else [entry.spec.tensors[e]]
        where = entry.name if e is None else f"{entry.name}[expert {e}]"
        index_ = None if e is None else (e,)
        if entry.quant is None:
            expected = _expected_dense(index, entry.spec, tensors, block, entry.dtype)
            got = store.read(arrays[0], index_)
            results.append((where, _same_bytes(expected[0] if e is not None else expected, got)))
        else:
            for a, name in zip(arrays, (tensors[0].name, tensors[0].scale_name), strict=True):
                results.append((f"{where}.{a.key[-1]}", _same_bytes(index.read(name), store.read(a, index_))))
        index.close()
    return results


def verify(src, dst, samples: int = 16, seed: int = 0) -> VerifyReport:
    """Re-read `samples` random parameters from SRC and DST and compare them exactly.

    The SRC side goes through `load_hf`'s reference path (read_dequantized + the name table's
    assemble), independent of the converter's block-wise kernels; stacked experts are compared on
    two random experts each.
    """
    if samples < 1:
        raise ConvertError(f"--samples: verify needs at least 1 sample, got {samples}")
    src, dst = Path(src), Path(dst)
    manifest = read_manifest(dst)
    opts = manifest["options"]
    options = ConvertOptions(**{**opts, "layers": tuple(opts["layers"]) if opts["layers"] else None})
    cfg = ModelConfig.from_hf_config(src)
    if ModelConfig.from_hf_config(dst) != _output_config(cfg, options):
        raise ConvertError(f"{dst} was not converted from {src}: their configs differ")
    state = nnx.split(abstract_model(cfg, RuntimeConfig(dtype=options.dtype)))[1]
    index = open_source(src, cfg, release_specs(state))
    entries = [e for u in plan_units(build_entries(state, index, options.keep_quantized), options)
               for e in u.entries]  # fmt: skip
    entries = list({e.name: e for e in entries}.values())
    missing = [a.name for e in entries for a in e.arrays() if a.name not in manifest["arrays"]]
    if missing:
        raise CheckpointError(f"{dst / MANIFEST_FILE}: {len(missing)} array(s) missing, e.g. {missing[:3]}")
    rng = np.random.default_rng(seed)
    picked = [entries[i] for i in sorted(rng.choice(len(entries), min(samples, len(entries)), replace=False))]
    store = ArrayStore(dst / PARAMS_DIR)
    checked, mismatches = [], []
    for entry in picked:
        with reporting_damage(dst / PARAMS_DIR, entry.name):  # a missing or cut chunk, a bad .zarray
            store.open_existing(entry.arrays())
            results = list(_verify_entry(entry, index, store, weight_block(cfg), rng))
        for where, ok in results:
            checked.append(where)
            if not ok:
                mismatches.append(where)
    return VerifyReport(checked, mismatches, len(picked))
