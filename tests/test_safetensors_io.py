"""Tests for dsv4.safetensors_io: round trips, interop with `safetensors`, precise errors."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from dsv4.safetensors_io import (
    INDEX_FILE,
    CheckpointError,
    CheckpointIndex,
    SafetensorsFile,
    read_header,
    write_safetensors,
    write_sharded_checkpoint,
)


def _all_dtype_tensors():
    rng = np.random.default_rng(0)
    return {
        "f32": rng.normal(size=(3, 5)).astype(np.float32),
        "f16": rng.normal(size=(4,)).astype(np.float16),
        "bf16": rng.normal(size=(2, 3)).astype(ml_dtypes.bfloat16),
        "fp8": rng.normal(size=(2, 130)).astype(ml_dtypes.float8_e4m3fn),
        "e8m0": np.array([[127, 130], [0, 255]], np.uint8),
        "i8": rng.integers(-128, 128, size=(5, 2)).astype(np.int8),
        "u8": rng.integers(0, 256, size=(7,)).astype(np.uint8),
        "i32": rng.integers(-(2**31), 2**31, size=(2, 2)).astype(np.int32),
        "i64": np.array([[2**40, -3]], np.int64),
        "bool": np.array([True, False, True]),
        "scalar": np.array(1.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def _write_raw(path, header: dict, data: bytes, header_len: int | None = None):
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    n = len(body) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + body + data)


def test_round_trip_all_dtypes(tmp_path):
    tensors = _all_dtype_tensors()
    path = tmp_path / "all.safetensors"
    write_safetensors(path, tensors, dtypes={"e8m0": "F8_E8M0"}, metadata={"format": "pt"})
    with SafetensorsFile(path) as f:
        assert f.names == list(tensors)
        assert f.metadata == {"format": "pt"}
        assert f.info("e8m0").dtype == "F8_E8M0" and f.info("u8").dtype == "U8"
        assert f.info("fp8").dtype == "F8_E4M3" and f.info("bf16").dtype == "BF16"
        for name, arr in tensors.items():
            got = f.read(name)
            assert got.dtype == arr.dtype and got.shape == arr.shape, name
            assert got.tobytes() == arr.tobytes(), name
    _, data_offset = read_header(path)
    assert data_offset % 8 == 0


def test_header_padding_and_offsets(tmp_path):
    path = tmp_path / "a.safetensors"
    write_safetensors(path, {"x": np.arange(3, dtype=np.int64), "y": np.ones((2,), np.float16)})
    infos, data_offset = read_header(path)
    assert (data_offset - 8) % 8 == 0
    assert (infos["x"].start, infos["x"].end, infos["y"].start, infos["y"].end) == (0, 24, 24, 28)
    assert path.stat().st_size == data_offset + 28


def test_readable_by_safetensors_numpy(tmp_path):
    from safetensors.numpy import load_file

    tensors = {k: v for k, v in _all_dtype_tensors().items() if k in ("f32", "f16", "i8", "u8", "i32", "i64")}
    path = tmp_path / "np.safetensors"
    write_safetensors(path, tensors)
    loaded = load_file(str(path))
    for name, arr in tensors.items():
        np.testing.assert_array_equal(loaded[name], arr)


def test_readable_by_safetensors_torch_fp8_bf16(tmp_path):
    import torch
    from safetensors.torch import load_file

    tensors = _all_dtype_tensors()
    path = tmp_path / "pt.safetensors"
    write_safetensors(path, {"fp8": tensors["fp8"], "bf16": tensors["bf16"]})
    loaded = load_file(str(path))
    assert loaded["fp8"].dtype == torch.float8_e4m3fn and loaded["bf16"].dtype == torch.bfloat16
    np.testing.assert_array_equal(loaded["fp8"].float().numpy(), tensors["fp8"].astype(np.float32))
    np.testing.assert_array_equal(loaded["bf16"].float().numpy(), tensors["bf16"].astype(np.float32))


def test_reads_file_written_by_safetensors_torch(tmp_path):
    import torch
    from safetensors.torch import save_file

    x = torch.randn(3, 130).to(torch.float8_e4m3fn)
    y = torch.randn(4).to(torch.bfloat16)
    path = tmp_path / "theirs.safetensors"
    save_file({"x": x, "y": y}, str(path))
    with SafetensorsFile(path) as f:
        np.testing.assert_array_equal(f.read("x").astype(np.float32), x.float().numpy())
        np.testing.assert_array_equal(f.read("y").astype(np.float32), y.float().numpy())


def test_write_rejects_incompatible_dtype(tmp_path):
    with pytest.raises(ValueError, match="'x'"):
        write_safetensors(tmp_path / "bad.safetensors", {"x": np.zeros(2, np.int8)}, dtypes={"x": "F8_E8M0"})
    assert not list(tmp_path.iterdir())  # nothing half-written


# ------------------------------------------------------------------------------- header errors


def test_too_short_file(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="short.safetensors"):
        read_header(path)


def test_header_length_exceeds_file(tmp_path):
    path = tmp_path / "long_header.safetensors"
    header = {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    _write_raw(path, header, b"\0" * 4, header_len=10**6)
    with pytest.raises(CheckpointError, match="long_header.safetensors.*header length"):
        read_header(path)


def test_invalid_json(tmp_path):
    path = tmp_path / "badjson.safetensors"
    path.write_bytes(struct.pack("<Q", 8) + b"{notjson")
    with pytest.raises(CheckpointError, match="badjson.safetensors.*JSON"):
        read_header(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "trunc.safetensors"
    write_safetensors(path, {"a": np.ones((4, 4), np.float32), "w": np.ones((8, 8), np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"trunc\.safetensors.*truncated.*'w'"):
        read_header(path)


def test_byte_range_disagrees_with_shape(tmp_path):
    path = tmp_path / "range.safetensors"
    _write_raw(path, {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"range\.safetensors.*'w'.*expected 16"):
        read_header(path)


def test_unknown_dtype(tmp_path):
    path = tmp_path / "dtype.safetensors"
    _write_raw(path, {"w": {"dtype": "F8_E5M2", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2)
    with pytest.raises(CheckpointError, match=r"dtype\.safetensors.*'w'.*F8_E5M2"):
        read_header(path)


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}, 7, None])
def test_dtype_that_is_not_a_string(tmp_path, dtype):
    """A list or object where the dtype name belongs was a bare TypeError (unhashable)."""
    path = tmp_path / "dtype.safetensors"
    _write_raw(path, {"w": {"dtype": dtype, "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"dtype\.safetensors.*'w'.*unsupported dtype"):
        read_header(path)


def test_unknown_tensor_name(tmp_path):
    path = tmp_path / "one.safetensors"
    write_safetensors(path, {"a": np.ones(2, np.float32)})
    with SafetensorsFile(path) as f, pytest.raises(CheckpointError, match="one.safetensors.*'b'"):
        f.read("b")


# ------------------------------------------------------------------------------ sharded index


def _sharded(tmp_path, max_bytes=150):
    tensors = {f"layers.{i}.w": np.full((5, 5), i, np.float32) for i in range(4)}
    tensors["scale"] = np.array([[127]], np.uint8)
    files = write_sharded_checkpoint(tmp_path, tensors, {"scale": "F8_E8M0"}, max_shard_bytes=max_bytes)
    return tensors, files


def test_sharded_round_trip(tmp_path):
    tensors, files = _sharded(tmp_path)
    assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    assert list(index["weight_map"]) == list(tensors)
    with CheckpointIndex(tmp_path) as ckpt:
        assert ckpt.names() == list(tensors)
        assert ckpt.shards() == files
        assert ckpt.shard_of("layers.3.w") == files[3] and ckpt.shard_of("scale") == files[3]
        assert ckpt.info("scale").dtype == "F8_E8M0"
        for name, arr in tensors.items():
            np.testing.assert_array_equal(ckpt.read(name), arr)


def test_single_file_and_unindexed_directory(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    write_safetensors(single / "model.safetensors", {"a": np.ones(3, np.float32)})
    assert CheckpointIndex(single).names() == ["a"]

    loose = tmp_path / "loose"
    loose.mkdir()
    write_safetensors(loose / "x.safetensors", {"a": np.ones(3, np.float32)})
    write_safetensors(loose / "y.safetensors", {"b": np.zeros(2, np.int8)})
    ckpt = CheckpointIndex(loose)
    assert ckpt.names() == ["a", "b"] and ckpt.shard_of("b") == "y.safetensors"


def test_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no .*safetensors"):
        CheckpointIndex(tmp_path)


def test_missing_shard(tmp_path):
    _, files = _sharded(tmp_path)
    (tmp_path / files[2]).unlink()
    with pytest.raises(CheckpointError, match=files[2]):
        CheckpointIndex(tmp_path)


def test_tensor_listed_but_absent_from_shard(tmp_path):
    _, files = _sharded(tmp_path)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["weight_map"]["layers.9.w"] = files[1]
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"'layers\.9\.w'.*{files[1]}.*absent"):
        CheckpointIndex(tmp_path)


def test_tensor_duplicated_in_two_shards(tmp_path):
    _, files = _sharded(tmp_path)
    write_safetensors(
        tmp_path / files[1],
        {"layers.1.w": np.ones((5, 5), np.float32), "layers.0.w": np.ones((5, 5), np.float32)},
    )
    with pytest.raises(CheckpointError, match=rf"'layers\.0\.w'.*duplicated.*{files[0]}.*{files[1]}"):
        CheckpointIndex(tmp_path)


def test_duplicated_in_unindexed_directory(tmp_path):
    write_safetensors(tmp_path / "x.safetensors", {"a": np.ones(3, np.float32)})
    write_safetensors(tmp_path / "y.safetensors", {"a": np.ones(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"'a'.*x\.safetensors.*y\.safetensors"):
        CheckpointIndex(tmp_path)


def test_duplicate_key_in_index_json(tmp_path):
    _, files = _sharded(tmp_path)
    text = (tmp_path / INDEX_FILE).read_text()
    text = text.replace('"weight_map": {', f'"weight_map": {{"scale": "{files[0]}", ', 1)
    (tmp_path / INDEX_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=rf"{INDEX_FILE}.*'scale'.*twice"):
        CheckpointIndex(tmp_path)


def test_tensor_in_shard_but_not_in_index(tmp_path):
    _, files = _sharded(tmp_path)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    del index["weight_map"]["scale"]  # its shard stays referenced through layers.3.w
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"'scale'.*{files[3]}.*not listed"):
        CheckpointIndex(tmp_path)


def test_unknown_dtype_in_shard_names_file_and_tensor(tmp_path):
    _, files = _sharded(tmp_path)
    _write_raw(
        tmp_path / files[0], {"layers.0.w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8
    )
    with pytest.raises(CheckpointError, match=rf"{files[0]}.*'layers\.0\.w'.*C64"):
        CheckpointIndex(tmp_path)


def test_truncated_shard_in_index(tmp_path):
    _, files = _sharded(tmp_path)
    data = (tmp_path / files[1]).read_bytes()
    (tmp_path / files[1]).write_bytes(data[:-4])
    with pytest.raises(CheckpointError, match=rf"{files[1]}.*truncated.*'layers\.1\.w'"):
        CheckpointIndex(tmp_path)


def test_unknown_name_in_index(tmp_path):
    _sharded(tmp_path)
    with pytest.raises(CheckpointError, match="'nope'"):
        CheckpointIndex(tmp_path).read("nope")
