"""Our own safetensors reader and writer, plus a sharded-checkpoint index.

Why not the `safetensors` package: the release stores E8M0 scales with the `F8_E8M0` dtype, which
many readers cannot map, and a converter wants errors that name the file and the tensor.

File layout: 8-byte little-endian header length N, N bytes of JSON (padded with spaces to a
multiple of 8), then the tensor data. Each JSON entry is
`{"dtype": "F32", "shape": [...], "data_offsets": [start, end]}` with offsets relative to the first
byte after the header. `__metadata__` (str -> str) is optional.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from dsv4 import outputs

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_HEADER_ALIGN = 8

# safetensors dtype string -> numpy dtype of the array `read` returns. F8_E8M0 comes back as the
# raw uint8 bytes (decode them with dsv4.quant.decode_e8m0).
DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E8M0": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "BOOL": np.dtype(np.bool_),
}

# numpy dtype -> default safetensors dtype string when writing (uint8 -> U8 unless told F8_E8M0).
_DEFAULT_CODE: dict[np.dtype, str] = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
    np.dtype(np.bool_): "BOOL",
}
if hasattr(ml_dtypes, "float8_e8m0fnu"):
    _DEFAULT_CODE[np.dtype(ml_dtypes.float8_e8m0fnu)] = "F8_E8M0"


class CheckpointError(ValueError):
    """A checkpoint file or directory is malformed; the message names the file (and tensor)."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry: dtype string, shape, and byte range relative to the data start."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.start


# ------------------------------------------------------------------------------------ reading


def _is_count(x) -> bool:
    """A JSON integer >= 0 (true and false are Python ints, but not sizes)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _parse_entry(path: Path, name: str, entry, data_bytes: int) -> TensorInfo:
    """Validate one header entry against the dtype table and the file size."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name!r} has unsupported dtype {dtype!r} (supported: {sorted(DTYPES)})"
        )
    ok_shape = isinstance(shape, list) and all(_is_count(d) for d in shape)
    ok_offsets = isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
    if not ok_shape or not ok_offsets or not 0 <= offsets[0] <= offsets[1]:
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed shape/data_offsets {entry!r}")
    info = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    expected = math.prod(info.shape) * DTYPES[dtype].itemsize
    if info.nbytes != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} ({dtype} {list(shape)}) spans {info.nbytes} bytes, expected {expected}"
        )
    if info.end > data_bytes:
        raise CheckpointError(
            f"{path}: truncated: tensor {name!r} ends at data byte {info.end} but the file holds only "
            f"{data_bytes} data bytes"
        )
    return info


def _read_header_json(path: Path) -> tuple[dict, int, int]:
    """Return (raw JSON header, data offset, file size), validating the length prefix."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: file is {size} bytes, too short for a safetensors header")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise CheckpointError(f"{path}: header length {n} exceeds the file size ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=reject_duplicate_keys(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc})") from exc
    except RecursionError:
        raise CheckpointError(f"{path}: header is not a safetensors header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    return header, 8 + n, size


def read_header(path) -> tuple[dict[str, TensorInfo], int]:
    """Parse and validate a safetensors header.

    Returns:
      ({tensor name: TensorInfo}, data_offset) where data_offset is the file offset of data byte 0.
    Raises:
      CheckpointError naming the file (and tensor) for a short file, a header length beyond the
      file, invalid JSON, an unknown dtype, a byte range that disagrees with shape * itemsize, or a
      tensor extending past the end of the file.
    """
    path = Path(path)
    header, data_offset, size = _read_header_json(path)
    infos = {
        name: _parse_entry(path, name, entry, size - data_offset)
        for name, entry in header.items()
        if name != "__metadata__"
    }
    _check_disjoint(path, infos)
    return infos, data_offset


def _check_disjoint(path: Path, infos: dict[str, TensorInfo]) -> None:
    """CheckpointError naming two tensors whose byte ranges overlap (one would read the other's bytes)."""
    spans = sorted((info.start, info.end, name) for name, info in infos.items() if info.end > info.start)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise CheckpointError(f"{path}: tensors {first!r} and {second!r} overlap in the file's data bytes")


def _read_metadata(path: Path) -> dict[str, str]:
    header, _, _ = _read_header_json(path)
    meta = header.get("__metadata__") or {}
    return dict(meta) if isinstance(meta, dict) else {}


class SafetensorsFile:
    """One safetensors file: validated header on open, per-tensor memory-mapped reads.

    Use as a context manager (or call `close`) to release the memory map.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._infos, self._data_offset = read_header(self.path)
        self._mmap: np.memmap | None = None

    @property
    def names(self) -> list[str]:
        """Tensor names in header order."""
        return list(self._infos)

    @property
    def metadata(self) -> dict[str, str]:
        """The header's `__metadata__` (empty if absent)."""
        return _read_metadata(self.path)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        """Header entry of `name`; CheckpointError if the file has no such tensor."""
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def read(self, name: str) -> np.ndarray:
        """Read one tensor (a copy) with its numpy dtype; F8_E8M0 comes back as raw uint8 bytes."""
        info = self.info(name)
        dtype = DTYPES[info.dtype]
        if info.nbytes == 0:
            return np.empty(info.shape, dtype)
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        lo = self._data_offset + info.start
        raw = self._mmap[lo : lo + info.nbytes]
        return np.array(raw).view(dtype).reshape(info.shape)

    def close(self) -> None:
        """Drop the memory map (reads reopen it)."""
        self._mmap = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------ writing


def _dtype_code(name: str, arr: np.ndarray, requested: str | None) -> str:
    """Safetensors dtype string for `arr`, checking a requested one is compatible."""
    if requested is None:
        try:
            return _DEFAULT_CODE[arr.dtype]
        except KeyError:
            raise ValueError(f"tensor {name!r}: no safetensors dtype for numpy dtype {arr.dtype}") from None
    if requested not in DTYPES:
        raise ValueError(f"tensor {name!r}: unsupported safetensors dtype {requested!r}")
    if _DEFAULT_CODE.get(arr.dtype) != requested and DTYPES[requested] != arr.dtype:
        raise ValueError(f"tensor {name!r}: numpy dtype {arr.dtype} cannot be stored as {requested}")
    return requested


def _build_header(tensors: dict, dtypes: dict, metadata) -> tuple[bytes, list[np.ndarray]]:
    """JSON header bytes (length prefix included, padded to 8) and the arrays in write order."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays, offset = [], 0
    for name, value in tensors.items():
        arr = np.asarray(value)
        code = _dtype_code(name, arr, dtypes.get(name))
        end = offset + arr.nbytes
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, end]}
        offset = end
        arrays.append(arr)
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % _HEADER_ALIGN)
    return struct.pack("<Q", len(body)) + body, arrays


def write_safetensors(
    path,
    tensors: dict[str, np.ndarray],
    dtypes: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `tensors` (in insertion order) to a safetensors file, atomically.

    The dtype string comes from each array's numpy dtype unless `dtypes[name]` gives one (needed to
    store uint8 bytes as "F8_E8M0"). `metadata` becomes the header's `__metadata__`.
    """
    if sys.byteorder != "little":
        raise RuntimeError("write_safetensors assumes a little-endian host")
    path = Path(path)
    head, arrays = _build_header(tensors, dtypes or {}, metadata)

    def write(f):
        f.write(head)
        for arr in arrays:
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)

    outputs.write_file(path, write, binary=True)


def shard_file_name(i: int, n: int) -> str:
    """Release shard naming: model-00001-of-00005.safetensors (i is 1-based)."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _split_shards(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[list[str]]:
    """Group names in insertion order; start a new shard when the next tensor would overflow."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, arr in tensors.items():
        nbytes = np.asarray(arr).nbytes
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def write_sharded_checkpoint(
    out_dir, tensors: dict[str, np.ndarray], dtypes: dict[str, str] | None, max_shard_bytes: int
) -> list[str]:
    """Write `tensors` as model-XXXXX-of-YYYYY.safetensors shards plus model.safetensors.index.json.

    Tensors keep their insertion order; a shard is closed when the next tensor would push it past
    `max_shard_bytes` (a single larger tensor gets a shard of its own). Returns the shard file names.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtypes = dtypes or {}
    groups = _split_shards(tensors, max_shard_bytes)
    files = [shard_file_name(i + 1, len(groups)) for i in range(len(groups))]
    weight_map: dict[str, str] = {}
    for fname, names in zip(files, groups, strict=True):
        shard_dtypes = {k: dtypes[k] for k in names if k in dtypes}
        write_safetensors(out_dir / fname, {k: tensors[k] for k in names}, shard_dtypes)
        weight_map.update(dict.fromkeys(names, fname))
    total = sum(np.asarray(a).nbytes for a in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    outputs.write_json(out_dir / INDEX_FILE, index, indent=2)
    return files


# ------------------------------------------------------------------------------ checkpoint index


def reject_duplicate_keys(path: Path, error: type[Exception] = CheckpointError):
    """A json `object_pairs_hook` raising `error` naming `path` for a key that appears twice in one
    object (json.loads would keep the last value silently)."""

    def hook(pairs):
        seen: dict = {}
        for key, value in pairs:
            if key in seen:
                raise error(f"{path}: key {key!r} appears twice")
            seen[key] = value
        return seen

    return hook


def load_weight_map(path: Path) -> dict[str, str]:
    """The index file's weight_map (tensor name -> shard file name), duplicates rejected."""
    try:
        index = json.loads(path.read_text("utf-8"), object_pairs_hook=reject_duplicate_keys(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    except OSError as exc:  # a directory of that name, unreadable
        raise CheckpointError(f"{path}: cannot read the index ({exc.strerror or exc})") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: missing or malformed 'weight_map'")
    for name, shard in weight_map.items():  # shards lie beside the index: no path may lead elsewhere
        if shard in ("", ".", "..") or "/" in shard or "\\" in shard:
            raise CheckpointError(f"{path}: tensor {name!r} names shard {shard!r}, not a file name beside the index")
    return weight_map


class CheckpointIndex:
    """A release checkpoint directory: shards plus (optionally) model.safetensors.index.json.

    Layouts: an index file mapping tensor names to shards; else a single model.safetensors; else
    every *.safetensors in the directory. Every shard header is read on open (headers only, no
    data) and the directory is checked: each shard the index names exists,
    each indexed tensor is in its shard's header, no shard holds a tensor the index does not list,
    and no tensor appears in two shards. Tensor data is read lazily, one tensor at a time.
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a checkpoint directory")
        self._files: dict[str, SafetensorsFile] = {}
        index_path = self.directory / INDEX_FILE
        if index_path.exists():
            self._shard_of = load_weight_map(index_path)
            self._check_shards_exist(index_path)
            self._validate_against_headers(index_path)
        else:
            self._shard_of = self._map_from_headers(self._unindexed_shards())

    # -- opening

    def _unindexed_shards(self) -> list[str]:
        if (self.directory / SINGLE_FILE).exists():
            return [SINGLE_FILE]
        shards = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.directory}: no {INDEX_FILE} and no *.safetensors files")
        return shards

    def _check_shards_exist(self, index_path: Path) -> None:
        missing = sorted({s for s in self._shard_of.values() if not (self.directory / s).is_file()})
        if missing:
            raise CheckpointError(f"{index_path}: shard file(s) missing from {self.directory}: {missing}")

    def _map_from_headers(self, shards: list[str]) -> dict[str, str]:
        """name -> shard from the shards' own headers; a name in two shards is an error."""
        owner: dict[str, str] = {}
        for shard in shards:
            for name in self._file(shard).names:
                if name in owner:
                    raise CheckpointError(
                        f"{self.directory}: tensor {name!r} is duplicated in shards {owner[name]} and {shard}"
                    )
                owner[name] = shard
        return owner

    def _validate_against_headers(self, index_path: Path) -> None:
        shards = list(dict.fromkeys(self._shard_of.values()))
        owner = self._map_from_headers(shards)
        for name, shard in self._shard_of.items():
            if name not in owner:
                raise CheckpointError(
                    f"{index_path}: tensor {name!r} is listed in shard {shard} but absent there"
                )
            if owner[name] != shard:
                raise CheckpointError(
                    f"{index_path}: tensor {name!r} is listed in shard {shard} but stored in {owner[name]}"
                )
        extra = sorted(set(owner) - set(self._shard_of))
        if extra:
            raise CheckpointError(
                f"{index_path}: tensor {extra[0]!r} in shard {owner[extra[0]]} is not listed in the index"
                f" ({len(extra)} unlisted)"
            )

    def _file(self, shard: str) -> SafetensorsFile:
        if shard not in self._files:
            self._files[shard] = SafetensorsFile(self.directory / shard)
        return self._files[shard]

    # -- queries

    def names(self) -> list[str]:
        """All tensor names, in index (or header) order."""
        return list(self._shard_of)

    def shards(self) -> list[str]:
        """Shard file names, in order of first appearance."""
        return list(dict.fromkeys(self._shard_of.values()))

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def __len__(self) -> int:
        return len(self._shard_of)

    def shard_of(self, name: str) -> str:
        """File name (relative to the directory) of the shard holding `name`."""
        try:
            return self._shard_of[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: checkpoint has no tensor named {name!r}") from None

    def info(self, name: str) -> TensorInfo:
        """Header entry (dtype, shape, byte range) of `name`."""
        return self._file(self.shard_of(name)).info(name)

    def read(self, name: str) -> np.ndarray:
        """Read one tensor; see SafetensorsFile.read for the returned dtypes."""
        return self._file(self.shard_of(name)).read(name)

    def close(self) -> None:
        """Release every shard's memory map."""
        for f in self._files.values():
            f.close()

    def __enter__(self) -> CheckpointIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
