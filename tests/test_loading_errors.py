"""`dsv4.load_hf` on damaged checkpoints: every bad input raises CheckpointError or ConfigError, and
the message names the file (shard, index, config.json or the checkpoint directory) and the tensor
(or config key) at fault.

Each test copies the session's tiny Flash checkpoint (`flash_ckpt`) into its own tmp dir and damages
the copy through `dsv4.safetensors_io`: shards are read tensor by tensor and rewritten, the index
JSON is edited, or a header is patched byte-wise where a lie must survive the writer.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import dsv4
from dsv4.checkpoint import PROBLEMS_SHOWN
from dsv4.safetensors_io import INDEX_FILE, SafetensorsFile, read_header, write_safetensors

# Tensors of TINY_FLASH used below (layers 0, 1 sliding + hash-routed; 2, 4 CSA; 3 HCA).
NORM = "layers.1.ffn_norm.weight"  # BF16 [64]
HC_FN = "layers.2.hc_attn_fn"  # F32 [24, 256]
FP8 = "layers.2.attn.wq_b.weight"  # F8_E4M3 [256, 48], scale grid [2, 1]
FP4 = "layers.3.ffn.experts.5.w2.weight"  # I8 [64, 16] packed FP4, scale [64, 1]


def names(*parts: str) -> str:
    """A `match` regex that requires every part (literally, in any order) somewhere in the message."""
    return "(?s)" + "".join(f"(?=.*{re.escape(p)})" for p in parts)


def scale_of(weight: str) -> str:
    return weight.removesuffix(".weight") + ".scale"


# ------------------------------------------------------------------------------------ damaging


class Ckpt:
    """A private copy of the tiny Flash checkpoint with helpers to damage it."""

    def __init__(self, src, dst: Path):
        self.dir = Path(shutil.copytree(src, dst))

    @property
    def index_path(self) -> Path:
        return self.dir / INDEX_FILE

    def weight_map(self) -> dict[str, str]:
        return json.loads(self.index_path.read_text())["weight_map"]

    def set_weight_map(self, weight_map: dict[str, str]) -> None:
        index = json.loads(self.index_path.read_text())
        index["weight_map"] = weight_map
        self.index_path.write_text(json.dumps(index, indent=2))

    def shard_of(self, name: str) -> str:
        return self.weight_map()[name]

    def other_shard(self, name: str) -> str:
        return next(s for s in sorted(set(self.weight_map().values())) if s != self.shard_of(name))

    def read_shard(self, shard: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """{name: array} and {name: safetensors dtype} of one shard, in header order."""
        with SafetensorsFile(self.dir / shard) as f:
            return {n: f.read(n) for n in f.names}, {n: f.info(n).dtype for n in f.names}

    def write_shard(self, shard: str, tensors: dict[str, np.ndarray], dtypes: dict[str, str]) -> None:
        write_safetensors(self.dir / shard, tensors, {n: d for n, d in dtypes.items() if n in tensors})

    def replace(self, name: str, value: np.ndarray, dtype: str | None = None) -> str:
        """Store `value` under `name` in its shard (optionally as safetensors `dtype`); returns the shard."""
        shard = self.shard_of(name)
        tensors, dtypes = self.read_shard(shard)
        tensors[name] = value
        dtypes.pop(name)
        if dtype is not None:
            dtypes[name] = dtype
        self.write_shard(shard, tensors, dtypes)
        return shard

    def remove(self, name: str, from_index: bool = True) -> str:
        """Drop `name` from its shard (and from the index); returns the shard."""
        shard = self.shard_of(name)
        tensors, dtypes = self.read_shard(shard)
        del tensors[name]
        self.write_shard(shard, tensors, dtypes)
        if from_index:
            self.set_weight_map({k: v for k, v in self.weight_map().items() if k != name})
        return shard

    def add(self, shard: str, name: str, value: np.ndarray, dtype: str | None = None, index: bool = True):
        """Append a tensor to `shard` (and list it there in the index)."""
        tensors, dtypes = self.read_shard(shard)
        tensors[name] = value
        if dtype is not None:
            dtypes[name] = dtype
        self.write_shard(shard, tensors, dtypes)
        if index:
            self.set_weight_map({**self.weight_map(), name: shard})

    def read(self, name: str) -> np.ndarray:
        with SafetensorsFile(self.dir / self.shard_of(name)) as f:
            return f.read(name)

    def patch_header(self, shard: str, edit) -> None:
        """Rewrite a shard's JSON header with `edit(header)` applied, keeping the data bytes as they are."""
        path = self.dir / shard
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        edit(header)
        body = json.dumps(header).encode()
        body += b" " * (-len(body) % 8)
        path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])

    def load(self):
        return dsv4.load_hf(self.dir)


@pytest.fixture
def ckpt(flash_ckpt, tmp_path) -> Ckpt:
    return Ckpt(flash_ckpt[0], tmp_path / "ckpt")


def test_undamaged_copy_loads(ckpt):
    """The control: the copy itself loads, so every failure below comes from the damage."""
    assert isinstance(ckpt.load(), dsv4.DeepseekV4)


# -------------------------------------------------------------------------------- files


def test_missing_shard_file(ckpt):
    shard = ckpt.shard_of(FP8)
    (ckpt.dir / shard).unlink()
    with pytest.raises(dsv4.CheckpointError, match=names(INDEX_FILE, shard, "missing")):
        ckpt.load()


def test_index_that_is_not_utf8_or_not_a_file(ckpt):
    ckpt.index_path.write_bytes(b'{"weight_map": \xff}')  # was a bare UnicodeDecodeError
    with pytest.raises(dsv4.CheckpointError, match=names(INDEX_FILE, "not valid JSON")):
        ckpt.load()
    ckpt.index_path.unlink()
    ckpt.index_path.mkdir()  # was an IsADirectoryError
    with pytest.raises(dsv4.CheckpointError, match=names(INDEX_FILE, "cannot read the index")):
        ckpt.load()


@pytest.mark.parametrize("cut", [1, 100])
def test_truncated_shard(ckpt, cut):
    shard = ckpt.shard_of(FP8)
    path = ckpt.dir / shard
    infos, data_offset = read_header(path)
    data_bytes = path.stat().st_size - cut - data_offset
    cut_short = next(n for n in infos if infos[n].end > data_bytes)  # the first tensor the cut reaches
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(dsv4.CheckpointError, match=names(shard, cut_short, "truncated")):
        ckpt.load()


def test_truncated_inside_header(ckpt):
    shard = ckpt.shard_of(FP8)
    path = ckpt.dir / shard
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(dsv4.CheckpointError, match=names(shard, "header length")):
        ckpt.load()


def test_header_range_beyond_the_file(ckpt):
    """A consistent byte range (shape * itemsize bytes) that starts past the end of the data."""
    shard = ckpt.shard_of(FP8)

    def shift(header):
        start, end = header[FP8]["data_offsets"]
        header[FP8]["data_offsets"] = [start + 10**6, end + 10**6]

    ckpt.patch_header(shard, shift)
    with pytest.raises(dsv4.CheckpointError, match=names(shard, FP8, "truncated")):
        ckpt.load()


def test_header_range_disagrees_with_shape(ckpt):
    """The header claims [256, 48] F8_E4M3 (12,288 bytes) but gives the tensor a 12,287-byte range."""
    shard = ckpt.shard_of(FP8)

    def shrink(header):
        header[FP8]["data_offsets"][1] -= 1

    ckpt.patch_header(shard, shrink)
    with pytest.raises(dsv4.CheckpointError, match=names(shard, FP8, "12287 bytes, expected 12288")):
        ckpt.load()


def test_header_with_unknown_dtype(ckpt):
    shard = ckpt.shard_of(NORM)
    ckpt.patch_header(shard, lambda header: header[NORM].update(dtype="F4"))
    with pytest.raises(dsv4.CheckpointError, match=names(shard, NORM, "'F4'")):
        ckpt.load()


def test_overlapping_header_ranges(ckpt):
    """Two tensors given the same bytes: one silently read the other's values."""
    other = "layers.1.attn_norm.weight"  # BF16 [64], the same shard as NORM
    shard = ckpt.shard_of(NORM)
    ckpt.patch_header(shard, lambda header: header[other].update(data_offsets=header[NORM]["data_offsets"]))
    with pytest.raises(dsv4.CheckpointError, match=names(shard, NORM, other, "overlap")):
        ckpt.load()


def _write_raw_header(path: Path, text: str) -> None:
    """Replace a shard's header by `text` as it is (JSON that `json.dumps` would not write)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    body = text.encode() + b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])


def test_tensor_named_twice_in_one_header(ckpt):
    """A name twice in one shard's header: the last entry won, silently."""
    shard = ckpt.shard_of(NORM)
    header, _ = read_header(ckpt.dir / shard)
    text = (ckpt.dir / shard).read_bytes()
    (n,) = struct.unpack("<Q", text[:8])
    body = text[8 : 8 + n].decode().strip()
    other = header["layers.1.attn_norm.weight"]
    entry = json.dumps({"dtype": "BF16", "shape": [64], "data_offsets": [other.start, other.end]})
    _write_raw_header(ckpt.dir / shard, "{" + f"{json.dumps(NORM)}: {entry}, " + body[1:])
    with pytest.raises(dsv4.CheckpointError, match=names(shard, NORM, "appears twice")):
        ckpt.load()


def test_header_nested_too_deeply(ckpt):
    shard = ckpt.shard_of(NORM)
    _write_raw_header(ckpt.dir / shard, '{"__metadata__": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(dsv4.CheckpointError, match=names(shard, "nested too deeply")):
        ckpt.load()  # was a RecursionError


def test_header_shape_of_booleans(ckpt):
    shard = ckpt.shard_of(NORM)
    ckpt.patch_header(shard, lambda header: header[NORM].update(shape=[True], data_offsets=[0, 2]))
    with pytest.raises(dsv4.CheckpointError, match=names(shard, NORM, "malformed shape")):
        ckpt.load()  # was a TypeError from the read


def test_index_naming_a_shard_outside_the_directory(ckpt):
    (ckpt.dir.parent / "elsewhere.safetensors").write_bytes((ckpt.dir / ckpt.shard_of(NORM)).read_bytes())
    ckpt.set_weight_map({**ckpt.weight_map(), NORM: "../elsewhere.safetensors"})
    with pytest.raises(dsv4.CheckpointError, match=names(INDEX_FILE, NORM, "'../elsewhere.safetensors'")):
        ckpt.load()


def _nan_fp8_code(value: np.ndarray) -> np.ndarray:
    value = value.copy()
    value.view(np.uint8)[0, 0] = 0x7F
    return value


@pytest.mark.parametrize(
    "name, damage, dtype, message",
    [
        (FP8, _nan_fp8_code, None, "an FP8 weight byte is a NaN code"),
        (scale_of(FP8), lambda v: np.full(v.shape, 255, np.uint8), "F8_E8M0", "scale byte is 255"),
        (scale_of(FP4), lambda v: np.full(v.shape, 255, np.uint8), "F8_E8M0", "scale byte is 255"),
        (scale_of(FP8), lambda v: np.full(v.shape, np.nan, np.float32), "F32", "not a finite number"),
        (scale_of(FP8), lambda v: np.full(v.shape, np.inf, np.float32), "F32", "not a finite number"),
    ],
)
def test_quantized_values_that_decode_to_nan(ckpt, name, damage, dtype, message):
    """Bytes no release holds (NaN codes, E8M0's NaN scale, a non-finite float scale) loaded as NaN
    weights without a word; each names its shard and tensor now."""
    shard = ckpt.replace(name, damage(ckpt.read(name)), dtype)
    with pytest.raises(dsv4.CheckpointError, match=names(shard, name, message)):
        ckpt.load()


@pytest.mark.parametrize("bad", [8, -1, 2**32 + 3])  # the last wrapped to expert 3 in an int32 cast
def test_hash_router_table_naming_missing_experts(ckpt, bad):
    """tid2eid ids outside [0, n_routed_experts) loaded as they were, and the forward gave NaN logits."""
    name = "layers.0.ffn.gate.tid2eid"
    table = ckpt.read(name).astype(np.int64)
    table[3, 1] = bad  # n_routed_experts is 8
    shard = ckpt.replace(name, table, "I64")
    with pytest.raises(dsv4.CheckpointError, match=names(shard, name, "outside [0, n_routed_experts 8)")):
        ckpt.load()


def test_packed_fp4_of_an_odd_input_size(tmp_path):
    """FP4 packs two codes per byte: an expert of input size 33 stored as 17 bytes per row passed
    the shape check and failed later with a bare numpy broadcast error."""
    from dsv4 import quant
    from dsv4.export import export_release

    model = dsv4.init_model(dsv4.ModelConfig.tiny(moe_intermediate_size=33), dsv4.RuntimeConfig(dtype="float32"))
    ckpt = Ckpt(export_release(model, None, tmp_path / "src", expert_format="fp8"), tmp_path / "ckpt")
    name = "layers.0.ffn.experts.0.w2.weight"  # [hidden, 33]
    w = quant.dequantize_fp8(ckpt.read(name), ckpt.read(scale_of(name)))
    packed, scale = quant.quantize_fp4(np.pad(w, ((0, 0), (0, 1))))  # padded to 34 inputs: [hidden, 17]
    shard = ckpt.replace(name, packed, "I8")
    ckpt.replace(scale_of(name), scale, "F8_E8M0")
    with pytest.raises(dsv4.CheckpointError, match=names(shard, name, "packed FP4, which needs an even input size")):
        ckpt.load()


# -------------------------------------------------------------------- missing, unknown, duplicated


def test_missing_tensor(ckpt):
    ckpt.remove(NORM)
    with pytest.raises(dsv4.CheckpointError, match=names(str(ckpt.dir), NORM, "missing tensor")):
        ckpt.load()


def test_tensor_in_index_but_absent_from_its_shard(ckpt):
    shard = ckpt.remove(NORM, from_index=False)
    with pytest.raises(dsv4.CheckpointError, match=names(INDEX_FILE, shard, NORM, "absent")):
        ckpt.load()


def test_tensor_in_shard_but_not_in_index(ckpt):
    shard = ckpt.shard_of(NORM)
    ckpt.set_weight_map({k: v for k, v in ckpt.weight_map().items() if k != NORM})
    with pytest.raises(dsv4.CheckpointError, match=names(INDEX_FILE, shard, NORM, "not listed")):
        ckpt.load()


def test_unknown_extra_tensor(ckpt):
    bogus, shard = "layers.2.attn.bogus.weight", ckpt.shard_of(FP8)
    ckpt.add(shard, bogus, np.zeros((4, 4), np.float32))
    with pytest.raises(dsv4.CheckpointError, match=names(str(ckpt.dir), shard, bogus, "unknown tensor")):
        ckpt.load()


def test_orphan_scale_of_a_dequantized_weight(ckpt):
    """The weight is stored as BF16 (allowed) but its FP8 `.scale` was left behind: an unknown tensor."""
    shard = ckpt.shard_of(scale_of(FP8))
    ckpt.replace(FP8, np.zeros((256, 48), ml_dtypes.bfloat16))
    with pytest.raises(dsv4.CheckpointError, match=names(shard, scale_of(FP8), "unknown tensor")):
        ckpt.load()


def test_tensor_duplicated_in_two_shards(ckpt):
    first, second = ckpt.shard_of(NORM), ckpt.other_shard(NORM)
    ckpt.add(second, NORM, ckpt.read(NORM), index=False)  # the index still says `first`
    with pytest.raises(dsv4.CheckpointError, match=names(NORM, first, second, "duplicated")):
        ckpt.load()


def test_tensor_duplicated_without_an_index(ckpt):
    """No index file: shards are discovered by glob, and a name in two of them is refused."""
    first, second = ckpt.shard_of(NORM), ckpt.other_shard(NORM)
    ckpt.add(second, NORM, ckpt.read(NORM), index=False)
    ckpt.index_path.unlink()
    with pytest.raises(dsv4.CheckpointError, match=names(NORM, first, second, "duplicated")):
        ckpt.load()


def test_tensor_listed_twice_in_the_index(ckpt):
    first, second = ckpt.shard_of(NORM), ckpt.other_shard(NORM)
    ckpt.add(second, NORM, ckpt.read(NORM), index=False)
    text = ckpt.index_path.read_text()
    entry = f'"{NORM}": "{first}",'
    assert entry in text
    ckpt.index_path.write_text(text.replace(entry, f'{entry}\n    "{NORM}": "{second}",'))
    with pytest.raises(dsv4.CheckpointError, match=names(INDEX_FILE, NORM, "twice")):
        ckpt.load()


# ---------------------------------------------------------------------------- shape and dtype


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        (NORM, (63,), "[64]"),
        (FP8.replace("wq_b", "wq_a"), (48, 32), "[48, 64]"),  # F8_E4M3 [out, in], [in] halved
        ("layers.3.attn.compressor.ape", (4, 64), "[128, 64]"),  # HCA ape has `ratio` rows
        ("head.weight", (64, 512), "[512, 64]"),  # transposed
    ],
)
def test_wrong_shape(ckpt, name, shape, expected):
    old = ckpt.read(name)
    ckpt.replace(name, np.zeros(shape, old.dtype), ckpt.read_shard(ckpt.shard_of(name))[1][name])
    shard = ckpt.shard_of(name)
    got = str(list(shape))
    with pytest.raises(dsv4.CheckpointError, match=names(shard, name, f"shape {got}, expected {expected}")):
        ckpt.load()


def test_fp4_expert_with_unpacked_shape(ckpt):
    """I8 experts hold two FP4 codes per byte: [out, in/2]. An unpacked [out, in] I8 array is refused."""
    ckpt.replace(FP4, np.zeros((64, 32), np.int8))
    with pytest.raises(dsv4.CheckpointError, match=names(ckpt.shard_of(FP4), FP4, "expected [64, 16]")):
        ckpt.load()


@pytest.mark.parametrize(
    ("name", "value", "dtype", "allowed"),
    [
        (NORM, np.zeros(64, np.int8), "I8", "F32, BF16, F16"),
        (HC_FN, np.zeros((24, 256), ml_dtypes.bfloat16), "BF16", "F32"),  # mHC must stay float32
        ("layers.2.attn.attn_sink", np.zeros(4, np.float16), "F16", "F32"),
        ("layers.4.attn.indexer.compressor.ape", np.zeros((4, 64), ml_dtypes.bfloat16), "BF16", "F32"),
        ("layers.2.ffn.gate.bias", np.zeros(8, ml_dtypes.bfloat16), "BF16", "F32"),
        ("layers.0.ffn.gate.tid2eid", np.zeros((512, 2), np.float32), "F32", "I64, I32"),
        ("embed.weight", np.zeros((512, 64), ml_dtypes.float8_e4m3fn), "F8_E4M3", "F32, BF16, F16"),
    ],
)
def test_wrong_dtype(ckpt, name, value, dtype, allowed):
    shard = ckpt.replace(name, value)
    with pytest.raises(
        dsv4.CheckpointError, match=names(shard, name, f"dtype {dtype}, expected one of {allowed}")
    ):
        ckpt.load()


# --------------------------------------------------------------------------------- scales


@pytest.mark.parametrize(
    ("weight", "shape", "grid"),
    [
        (FP8, (1, 1), "[2, 1]"),  # one 128x128 tile per [128, 128] block of [256, 48]
        (FP8, (2, 2), "[2, 1]"),
        (FP4, (64, 2), "[64, 1]"),  # one scale per row per 32 inputs
    ],
)
def test_scale_grid_with_wrong_shape(ckpt, weight, shape, grid):
    scale = scale_of(weight)
    shard = ckpt.replace(scale, np.full(shape, 127, np.uint8), "F8_E8M0")
    with pytest.raises(
        dsv4.CheckpointError, match=names(shard, scale, f"{list(shape)}, expected scale grid {grid}")
    ):
        ckpt.load()


def test_fp8_weight_with_scale_missing(ckpt):
    ckpt.remove(scale_of(FP8))
    with pytest.raises(dsv4.CheckpointError, match=names(str(ckpt.dir), scale_of(FP8), "missing scale")):
        ckpt.load()


def test_fp4_scale_with_wrong_dtype(ckpt):
    """FP4 scales must be E8M0 bytes; F32 scales are allowed for FP8 weights only."""
    scale = scale_of(FP4)
    shard = ckpt.replace(scale, np.ones((64, 1), np.float32))
    with pytest.raises(dsv4.CheckpointError, match=names(shard, scale, "dtype F32")):
        ckpt.load()


# ---------------------------------------------------------------------------------- config


def _edit_config(ckpt: Ckpt, **changes) -> Path:
    path = ckpt.dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg, indent=2))
    return path


def test_unknown_config_key(ckpt):
    path = _edit_config(ckpt, attention_chunk_size=4096)
    with pytest.raises(dsv4.ConfigError, match=names(str(path), "attention_chunk_size", "unknown")):
        ckpt.load()


def test_invalid_config_value(ckpt):
    path = _edit_config(ckpt, compress_ratios=[0, 0, 4, 128, 4])  # one short: the MTP entry is gone
    with pytest.raises(dsv4.ConfigError, match=names(str(path), "compress_ratios")):
        ckpt.load()


def test_missing_config(ckpt):
    path = ckpt.dir / "config.json"
    path.unlink()
    with pytest.raises(dsv4.ConfigError, match=names(str(path))):
        ckpt.load()


def test_config_that_is_not_utf8(ckpt):
    path = ckpt.dir / "config.json"
    path.write_bytes(b'{"vocab_size": \xff}')  # was a bare UnicodeDecodeError naming no file
    with pytest.raises(dsv4.ConfigError, match=names(str(path), "utf-8")):
        ckpt.load()


def test_config_disagrees_with_tensors(ckpt):
    """A valid config for a different model: every mismatching tensor is reported, naming the first."""
    _edit_config(ckpt, vocab_size=1024)
    shard = ckpt.shard_of("embed.weight")
    with pytest.raises(
        dsv4.CheckpointError, match=names(shard, "embed.weight", "expected [1024, 64]")
    ) as err:
        ckpt.load()
    assert "head.weight" in str(err.value) and "tid2eid" in str(err.value)


# ------------------------------------------------------------------------------- all at once


def test_several_problems_reported_together(ckpt):
    bad_dtype = ckpt.replace(HC_FN, np.zeros((24, 256), ml_dtypes.bfloat16))
    missing_shard = ckpt.remove(scale_of(FP8))
    bogus = "layers.0.attn.bogus"
    ckpt.add(missing_shard, bogus, np.zeros(3, np.float32))
    with pytest.raises(dsv4.CheckpointError, match=names(bad_dtype, HC_FN, "dtype BF16")) as err:
        ckpt.load()
    message = str(err.value)
    assert re.search(names(str(ckpt.dir), scale_of(FP8), "missing scale"), message)
    assert re.search(names(missing_shard, bogus, "unknown tensor"), message)
    assert len(message.splitlines()) == 1 + 3, message  # a heading, then one line per problem


def test_thousands_of_problems_are_counted_not_all_listed(ckpt):
    """A checkpoint far from its config (here: every main-layer tensor gone) lists the first
    PROBLEMS_SHOWN problems and counts the rest, instead of a message of thousands of lines."""
    before = ckpt.weight_map()
    gone = [name for name in before if name.startswith("layers.")]
    weight_map = {name: shard for name, shard in before.items() if name not in gone}
    for shard in set(before.values()):
        tensors, dtypes = ckpt.read_shard(shard)
        ckpt.write_shard(shard, {k: v for k, v in tensors.items() if k not in gone}, dtypes)
    ckpt.set_weight_map(weight_map)
    with pytest.raises(dsv4.CheckpointError) as err:
        ckpt.load()
    lines = str(err.value).splitlines()
    total = int(re.search(r"\((\d+) problem\(s\)\)", lines[0]).group(1))
    assert total > PROBLEMS_SHOWN and "missing" in lines[1]
    assert len(lines) == 1 + PROBLEMS_SHOWN + 1 and lines[-1] == f"  ... and {total - PROBLEMS_SHOWN} more"
