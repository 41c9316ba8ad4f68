"""Converter building blocks: layout detection, block-wise dequantization, on-the-fly QuantizedWeight.

Everything is compared exactly (bit for bit, NaN == NaN) against the reference path `load_hf`
uses: `checkpoint.read_dequantized` + `ParamSpec.assemble` + `astype`, or `dsv4.quant`.
"""

import errno
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from dsv4 import convert, quant
from dsv4.checkpoint import ParamSpec, ReleaseTensor, read_dequantized, release_specs
from dsv4.config import ModelConfig, RuntimeConfig
from dsv4.loading import weight_block
from dsv4.model import abstract_model
from dsv4.quantized import QuantizedWeight, decode_e8m0, materialize
from dsv4.safetensors_io import CheckpointIndex, write_safetensors


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


def _entries(path, dtype, keep_quantized=False):
    cfg = ModelConfig.from_hf_config(path)
    state = nnx.split(abstract_model(cfg, RuntimeConfig(dtype=dtype)))[1]
    index = CheckpointIndex(path)
    return cfg, index, convert.build_entries(state, index, keep_quantized)


# ------------------------------------------------------------------------------------- layouts


def test_layouts_of_the_name_table():
    cfg = ModelConfig.tiny()
    state = nnx.split(abstract_model(cfg, RuntimeConfig(dtype="float32")))[1]
    shapes = {tuple(p): v.get_value().shape for p, v in nnx.to_flat_state(state)}
    layouts = {}
    for spec in release_specs(state):
        layout, groups = convert.detect_layout(spec, shapes[spec.path])
        layouts[".".join(map(str, spec.path))] = (layout, groups)
    assert layouts["embed.weight"] == ("copy", 1)
    assert layouts["head.weight"] == ("copy", 1)
    assert layouts["layers.0.attn.wq_a.weight"] == ("transpose", 1)
    assert layouts["mtp.0.e_proj.weight"] == ("transpose", 1)  # square: told apart from copy by probing
    assert layouts["layers.0.attn.wo_a"] == ("grouped", cfg.o_groups)
    assert layouts["layers.0.ffn.experts.w2"] == ("experts", 1)
    assert layouts["layers.0.ffn.gate.tid2eid"] == ("copy", 1)


def test_layout_detection_refuses_a_transform_it_does_not_know():
    spec = ParamSpec(("x",), (ReleaseTensor("x.weight", (3, 2), "fp8"),), lambda arrays: arrays[0][::-1].T)
    with pytest.raises(AssertionError, match="x.weight"):
        convert.detect_layout(spec, (2, 3))


# ------------------------------------------------------------------------- block-wise conversion


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["flash", "pro"])
def test_convert_tensor_equals_reference_path(request, monkeypatch, name, dtype):
    """Every parameter, converted block by block (tiny blocks: groups split across blocks)."""
    path = request.getfixturevalue(f"{name}_ckpt")[0]
    monkeypatch.setattr(convert, "READ_BLOCK_BYTES", 2048)
    cfg, index, entries = _entries(path, dtype)
    reader, block = convert.SourceReader(index), weight_block(cfg)
    for entry in entries:
        if entry.layout == "experts":
            for e in (0, entry.num_experts - 1):
                t = entry.spec.tensors[e]
                got = np.empty(entry.shape[1:], entry.dtype)
                convert.convert_tensor(reader, t, got, "experts", block)
                expected = entry.spec.assemble([read_dequantized(index, t, block)])[0].astype(entry.dtype)
                assert _same(got, expected), f"{t.name}"
            continue
        (t,) = entry.spec.tensors
        got = np.empty(entry.shape, entry.dtype)
        convert.convert_tensor(reader, t, got, entry.layout, block)
        expected = np.asarray(entry.spec.assemble([read_dequantized(index, t, block)])).astype(entry.dtype)
        assert _same(got, expected), t.name


def test_scale_columns_handles_rows_not_starting_on_a_tile():
    rng = np.random.default_rng(0)
    n, k, block = 300, 200, (128, 128)
    w, s = quant.quantize_fp8(rng.standard_normal((n, k)).astype(np.float32))
    expected = quant.dequantize_fp8(w, s, block)
    r0, r1 = 100, 290  # spans tile rows 0, 1 and 2, starting mid-tile
    values_t = convert._FP8_VALUES[w.view(np.uint8)[r0:r1].T.copy()]
    got = convert._scale_columns(values_t, s[r0 // 128 : -(-r1 // 128)], r0, block)
    assert _same(got, expected[r0:r1].T)


def test_fp4_tables_decode_like_quant():
    codes = np.arange(256, dtype=np.uint8)
    pairs = quant.unpack_fp4(codes.reshape(1, -1)).reshape(-1, 2)
    assert _same(convert._FP4_LOW, pairs[:, 0]) and _same(convert._FP4_HIGH, pairs[:, 1])
    fp8 = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert _same(convert._FP8_VALUES, fp8)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_scaled_tables_equal_the_reference_product_for_every_scale_and_byte(dtype):
    """Entry (s << 8 | b): value(b) * 2^(s - 127) in float32, cast once, for all 65,536 pairs
    (including the NaN scale 255, overflow to inf and bfloat16 subnormals)."""
    scale = np.repeat(np.arange(256, dtype=np.uint8), 256)  # [65536]
    byte = np.tile(np.arange(256, dtype=np.uint8), 256)
    (fp8,) = convert._scaled_tables("F8_E4M3", np.dtype(dtype))
    with np.errstate(invalid="ignore", over="ignore"):
        expected = quant.dequantize_fp8(byte.view(ml_dtypes.float8_e4m3fn)[:, None], scale[:, None], (1, 1))
    assert _same(fp8.view(dtype), expected[:, 0].astype(dtype))
    low, high = convert._scaled_tables("I8", np.dtype(dtype))
    with np.errstate(invalid="ignore", over="ignore"):
        pairs = quant.dequantize_fp4(byte[:, None], scale[:, None])  # [65536, 2]
    assert _same(low.view(dtype), pairs[:, 0].astype(dtype)) and _same(high.view(dtype), pairs[:, 1].astype(dtype))


def _single_tensor_reader(tmp_path, t: ReleaseTensor, stored, scale, scale_code):
    dtypes = {t.scale_name: scale_code} if scale_code else None
    write_safetensors(tmp_path / "model.safetensors", {t.name: stored, t.scale_name: scale}, dtypes)
    return convert.SourceReader(CheckpointIndex(tmp_path))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scale_fmt", ["ue8m0", "float"])
def test_fp8_transposed_conversion_with_either_scale_format(tmp_path, monkeypatch, scale_fmt, dtype):
    """E8M0 scales take the scaled-table path, float scales the float32 one; blocks start mid-tile."""
    monkeypatch.setattr(convert, "READ_BLOCK_BYTES", 4 * 300 * 50)  # 50 rows a block: tiles split
    w = np.random.default_rng(4).standard_normal((260, 300)).astype(np.float32)  # partial tiles on both axes
    q, s = quant.quantize_fp8(w, scale_fmt=scale_fmt)
    t = ReleaseTensor("x.weight", (260, 300), "fp8")
    reader = _single_tensor_reader(tmp_path, t, q, s, "F8_E8M0" if scale_fmt == "ue8m0" else None)
    got = np.empty((300, 260), dtype)
    convert.convert_tensor(reader, t, got, "transpose", (128, 128))
    assert _same(got, quant.dequantize_fp8(q, s).T.astype(dtype))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp4_expert_conversion_with_a_partial_scale_group(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(convert, "READ_BLOCK_BYTES", 4 * 80 * 7)  # 7 rows a block
    w = np.random.default_rng(5).standard_normal((40, 80)).astype(np.float32)  # 80 % 32: a partial group
    packed, s = quant.quantize_fp4(w)
    t = ReleaseTensor("e.weight", (40, 80), "expert")
    reader = _single_tensor_reader(tmp_path, t, packed, s, "F8_E8M0")
    got = np.empty((80, 40), dtype)
    convert.convert_tensor(reader, t, got, "experts", (128, 128))
    assert _same(got, quant.dequantize_fp4(packed, s).T.astype(dtype))


# --------------------------------------------------------------------------- QuantizedWeight


def test_e8m0_decoding_is_exact_everywhere():
    b = np.arange(256, dtype=np.uint8)
    assert _same(np.asarray(decode_e8m0(jnp.asarray(b))), quant.decode_e8m0(b))


@pytest.mark.parametrize("float_scales", [False, True])
def test_fp8_transpose_materializes_like_quant(float_scales):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((200, 300)).astype(np.float32)  # partial tiles on both axes
    q, s = quant.quantize_fp8(w, scale_fmt="float" if float_scales else "ue8m0")
    qw = QuantizedWeight(jnp.asarray(q), jnp.asarray(s), fmt="fp8", layout="transpose", dtype="float32")
    assert qw.shape == (300, 200)
    assert _same(materialize(qw), quant.dequantize_fp8(q, s).T)
    bf16 = QuantizedWeight(jnp.asarray(q), jnp.asarray(s), fmt="fp8", layout="transpose", dtype="bfloat16")
    assert _same(materialize(bf16), quant.dequantize_fp8(q, s).T.astype(ml_dtypes.bfloat16))


def test_fp4_experts_materialize_like_the_name_table():
    rng = np.random.default_rng(2)
    packed, scales, dense = [], [], []
    for _ in range(3):
        p, s = quant.quantize_fp4(rng.standard_normal((40, 48)).astype(np.float32))  # 48 % 32: partial group
        packed.append(p), scales.append(s), dense.append(quant.dequantize_fp4(p, s))
    qw = QuantizedWeight(
        jnp.asarray(np.stack(packed)), jnp.asarray(np.stack(scales)), fmt="fp4", layout="experts", dtype="float32"
    )
    expected = np.stack([d.T for d in dense])  # checkpoint._stack_experts
    assert qw.shape == expected.shape
    assert _same(materialize(qw), expected)


def test_grouped_wo_a_materializes_like_the_name_table():
    cfg = ModelConfig.tiny()
    state = nnx.split(abstract_model(cfg, RuntimeConfig(dtype="float32")))[1]
    spec = next(s for s in release_specs(state) if s.path[-1] == "wo_a")
    rng = np.random.default_rng(3)
    g, r = cfg.o_groups, cfg.o_lora_rank
    k = cfg.num_attention_heads * cfg.head_dim // g
    q, s = quant.quantize_fp8(rng.standard_normal((g * r, k)).astype(np.float32))
    qw = QuantizedWeight(jnp.asarray(q), jnp.asarray(s), fmt="fp8", layout="grouped", dtype="float32", groups=g)
    assert _same(materialize(qw), spec.assemble([quant.dequantize_fp8(q, s)]))


def test_materialize_passes_plain_arrays_through():
    x = jnp.ones((2, 3))
    assert materialize(x) is x


def test_quantized_weight_refuses_unknown_formats():
    with pytest.raises(ValueError, match="fmt"):
        QuantizedWeight(jnp.zeros(1), jnp.zeros(1), fmt="int4", layout="transpose", dtype="float32")
    with pytest.raises(ValueError, match="layout"):
        QuantizedWeight(jnp.zeros(1), jnp.zeros(1), fmt="fp8", layout="diagonal", dtype="float32")


# ------------------------------------------------------------------------------ chunk writing


def _chunk_bytes(n: int, offset: int = 0) -> np.ndarray:
    """n bytes of data starting `offset` bytes past a direct-I/O boundary."""
    buf = convert._aligned_empty((n + offset,), np.uint8)[offset:]
    buf[:] = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    return buf


@pytest.mark.parametrize("offset", [0, 16])
def test_chunks_written_directly_or_buffered_hold_their_bytes(tmp_path, monkeypatch, offset):
    """Aligned chunks take O_DIRECT, misaligned ones the page cache; both land intact, padded."""
    opened = []
    real_open = convert.os.open
    monkeypatch.setattr(convert.os, "open", lambda *a, **k: opened.append(a[1]) or real_open(*a, **k))
    store = convert.ArrayStore(tmp_path)
    data = _chunk_bytes(2 * convert.DIRECT_IO_MIN_BYTES, offset)
    store.write_chunk(tmp_path / "c", data, data.nbytes + 100)
    on_disk = np.fromfile(tmp_path / "c", np.uint8)
    assert _same(on_disk[: data.nbytes], data) and not on_disk[data.nbytes :].any()
    assert on_disk.nbytes == data.nbytes + 100
    assert bool(opened) == (offset == 0 and hasattr(convert.os, "O_DIRECT"))
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary left behind


def test_chunk_writes_fall_back_when_the_filesystem_refuses_direct_io(tmp_path, monkeypatch):
    def refuse(path, flags, mode=0o777):
        raise OSError(errno.EINVAL, "O_DIRECT not supported", str(path))

    monkeypatch.setattr(convert.os, "open", refuse)
    data = _chunk_bytes(2 * convert.DIRECT_IO_MIN_BYTES)
    convert.ArrayStore(tmp_path).write_chunk(tmp_path / "c", data, data.nbytes)
    assert _same(np.fromfile(tmp_path / "c", np.uint8), data)


def test_unit_buffers_are_aligned_and_reused():
    buffers = convert._Buffers()
    first = buffers.take((3, 5, 7), ml_dtypes.bfloat16)
    assert first.ctypes.data % convert.DIRECT_IO_ALIGN == 0 and first.shape == (3, 5, 7)
    buffers.release([first])
    again = buffers.take((2, 5, 7), ml_dtypes.bfloat16)  # fewer rows: the spare serves
    assert again.ctypes.data == first.ctypes.data and again.shape == (2, 5, 7)


def test_chunk_writes_fall_back_when_a_direct_write_is_refused(tmp_path, monkeypatch):
    """O_DIRECT accepted at open but a write refused (an alignment the filesystem wants): the
    partial file is removed and the chunk written through the page cache."""
    calls = []

    def refuse(fd, data):
        calls.append(len(data))
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(convert.os, "write", refuse)
    data = _chunk_bytes(2 * convert.DIRECT_IO_MIN_BYTES)
    convert.ArrayStore(tmp_path).write_chunk(tmp_path / "c", data, data.nbytes)
    assert _same(np.fromfile(tmp_path / "c", np.uint8), data)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]
    assert calls or not hasattr(os, "O_DIRECT")
