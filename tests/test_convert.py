"""dsv4-convert end to end on the tiny release checkpoints (several shards each).

Parity: a float32 conversion restored with `dsv4.restore.load` gives logits equal to `load_hf` on
the source exactly; bfloat16 arrays equal `load_hf(dtype="bfloat16")` exactly; `--keep-quantized`
weights dequantized on the fly give logits within float32 rounding (relative error <= 1e-6;
measured 0). Bad inputs fail before any work with a message naming the file and the tensor.
"""

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import dsv4
from dsv4 import convert
from dsv4.checkpoint import PROBLEMS_SHOWN
from dsv4.cli_convert import main
from dsv4.quantized import QuantizedWeight, materialize
from dsv4.restore import load
from dsv4.safetensors_io import (
    INDEX_FILE,
    CheckpointError,
    CheckpointIndex,
    write_safetensors,
    write_sharded_checkpoint,
)

SEQ = 64


def tokens_for(cfg: dict, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg["vocab_size"], (2, SEQ))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def orbax_numpy(params_dir: Path) -> dict:
    """A generic Orbax restore of DST/params (tree from Orbax's own metadata) as numpy arrays."""
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(params_dir).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(restore_args=args))


def flat_values(model) -> dict:
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.split(model)[1])}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, flash_ckpt, pro_ckpt):
    """{(name, dtype, keep_quantized): DST} converted once per module."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name, (src, _, _) in (("flash", flash_ckpt), ("pro", pro_ckpt)):
        for dtype, keep in (("float32", False), ("float32", True), ("bfloat16", False)):
            dst = root / f"{name}-{dtype}-{keep}"
            convert.convert(src, dst, dtype=dtype, keep_quantized=keep, workers=2, progress=False)
            out[name, dtype, keep] = dst
    return out


# -------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", ["flash", "pro"])
def test_float32_conversion_gives_load_hf_logits_exactly(request, converted, name):
    src, _, cfg = request.getfixturevalue(f"{name}_ckpt")
    assert len(CheckpointIndex(src).shards()) > 3  # the fixture really is sharded
    tokens = tokens_for(cfg)
    expected = np.asarray(dsv4.forward(dsv4.load_hf(src, dtype="float32"), tokens))
    got = np.asarray(dsv4.forward(load(converted[name, "float32", False]), tokens))
    np.save(converted[name, "float32", False].parent / f"{name}-logits.npy", expected)
    assert np.array_equal(got, expected)


def test_bfloat16_conversion_equals_load_hf_bfloat16(flash_ckpt, converted):
    got = flat_values(load(converted["flash", "bfloat16", False]))
    expected = flat_values(dsv4.load_hf(flash_ckpt[0], dtype="bfloat16"))
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert value.dtype == got[name].dtype and np.array_equal(np.asarray(got[name]), np.asarray(value)), name


def test_keep_quantized_logits_within_float32_rounding(pro_ckpt, converted):
    src, _, cfg = pro_ckpt
    model = load(converted["pro", "float32", True])
    values = flat_values(model)
    kinds = {(v.fmt, v.layout) for v in values.values() if isinstance(v, QuantizedWeight)}
    assert kinds == {("fp8", "transpose"), ("fp8", "grouped"), ("fp4", "experts")}
    tokens = tokens_for(cfg)
    expected = np.asarray(dsv4.forward(dsv4.load_hf(src, dtype="float32"), tokens))
    err = rel_err(dsv4.forward(model, tokens), expected)
    print(f"keep-quantized relative error {err:.1e}")
    assert err <= 1e-6


def test_keep_quantized_weights_materialize_to_the_dense_ones(converted):
    quantized = flat_values(load(converted["flash", "float32", True]))
    dense = flat_values(load(converted["flash", "float32", False]))
    assert any(isinstance(v, QuantizedWeight) for v in quantized.values())
    is_q = lambda x: isinstance(x, QuantizedWeight)  # noqa: E731
    materialized = jax.jit(lambda tree: jax.tree.map(materialize, tree, is_leaf=is_q))(quantized)
    for name, value in dense.items():
        assert np.array_equal(np.asarray(materialized[name]), np.asarray(value)), name


def test_keep_quantized_stores_the_release_bytes(flash_ckpt, converted):
    index = CheckpointIndex(flash_ckpt[0])
    params = orbax_numpy(converted["flash", "float32", True] / convert.PARAMS_DIR)
    wq_a = params["layers"]["1"]["attn"]["wq_a"]["weight"]
    assert np.array_equal(
        np.asarray(wq_a["data"]).view(np.uint8), index.read("layers.1.attn.wq_a.weight").view(np.uint8)
    )
    assert np.array_equal(np.asarray(wq_a["scale"]), index.read("layers.1.attn.wq_a.scale"))
    w2 = params["layers"]["2"]["ffn"]["experts"]["w2"]
    assert np.array_equal(np.asarray(w2["data"][3]), index.read("layers.2.ffn.experts.3.w2.weight"))


# ------------------------------------------------------------------------------------ checkpoint


def test_destination_layout_and_generic_orbax_restore(flash_ckpt, converted):
    src, _, cfg = flash_ckpt
    dst = converted["flash", "float32", False]
    assert {p.name for p in dst.iterdir()} == {
        "config.json", "generation_config.json", convert.MANIFEST_FILE, convert.PARAMS_DIR
    }  # fmt: skip
    assert dsv4.ModelConfig.from_hf_config(dst) == dsv4.ModelConfig.from_hf_config(src)
    params = orbax_numpy(dst / convert.PARAMS_DIR)
    experts = params["layers"]["0"]["ffn"]["experts"]["w1"]
    assert experts.shape == (cfg["n_routed_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"])
    manifest = convert.read_manifest(dst)
    assert manifest["options"]["dtype"] == "float32" and not manifest["partial"]


def test_tokenizer_files_are_copied(tmp_path, flash_ckpt):
    src = tmp_path / "src"
    shutil.copytree(flash_ckpt[0], src)
    (src / "tokenizer.json").write_text('{"tok": 1}')
    (src / "tokenizer_config.json").write_text('{"cfg": 2}')
    convert.convert(src, tmp_path / "dst", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "dst" / name).read_bytes() == (src / name).read_bytes()


def test_no_mtp_and_partial_layers(tmp_path, flash_ckpt, converted):
    src = flash_ckpt[0]
    assert main([str(src), str(tmp_path / "nomtp"), "--no-mtp", "--dtype", "float32", "--no-progress"]) == 0
    model = load(tmp_path / "nomtp")
    assert model.cfg.num_nextn_predict_layers == 0 and len(model.mtp) == 0
    assert main([str(src), str(tmp_path / "part"), "--layers", "1:3", "--dtype", "float32", "--no-progress"]) == 0
    assert convert.read_manifest(tmp_path / "part")["partial"]
    with pytest.raises(CheckpointError, match="missing"):
        load(tmp_path / "part")
    partial = flat_values(load(tmp_path / "part", allow_partial=True))
    full = flat_values(load(converted["flash", "float32", False]))
    assert np.array_equal(
        np.asarray(partial["layers.2.attn.wq_a.weight"]), np.asarray(full["layers.2.attn.wq_a.weight"])
    )
    assert not hasattr(partial["layers.0.attn.wq_a.weight"], "addressable_shards")  # left abstract


def test_verify_passes_and_catches_a_corrupted_chunk(tmp_path, capsys, flash_ckpt, converted):
    src, dst = flash_ckpt[0], converted["flash", "float32", False]
    assert main(["--verify", str(src), str(dst), "--samples", "1000"]) == 0
    assert "0 mismatch" in capsys.readouterr().out
    assert main(["--verify", str(src), str(dst), "--samples", "5"]) == 0
    assert capsys.readouterr().out.startswith("verified 5 parameter(s), ")  # --samples counts parameters
    bad = tmp_path / "bad"
    shutil.copytree(dst, bad)
    chunk = bad / convert.PARAMS_DIR / "layers.1.attn.wq_b.weight" / "0.0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x40
    chunk.write_bytes(bytes(data))
    assert main(["--verify", str(src), str(bad), "--samples", "1000"]) == 1
    assert "MISMATCH layers.1.attn.wq_b.weight" in capsys.readouterr().out


def test_overwrite(tmp_path, flash_ckpt):
    src, dst = flash_ckpt[0], tmp_path / "dst"
    assert main([str(src), str(dst), "--no-progress"]) == 0
    assert main([str(src), str(dst), "--no-progress", "--dtype", "float32"]) == 1
    assert main([str(src), str(dst), "--no-progress", "--dtype", "float32", "--overwrite"]) == 0
    assert convert.read_manifest(dst)["options"]["dtype"] == "float32"
    other = tmp_path / "not-a-checkpoint"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    assert main([str(src), str(other), "--no-progress", "--overwrite"]) == 1
    assert (other / "precious.txt").read_text() == "keep me"



def test_a_failed_final_swap_keeps_the_old_checkpoint_and_can_resume(tmp_path, capsys, flash_ckpt, monkeypatch):
    """--overwrite: when renaming the new checkpoint onto DST fails, DST is the old checkpoint again,
    and the finished temporary directory (its progress record kept) completes under --resume."""
    src, dst = flash_ckpt[0], tmp_path / "dst"
    assert main([str(src), str(dst), "--no-progress"]) == 0
    real_replace, failed = os.replace, []

    def flaky(a, b):
        if Path(b) == dst and not failed:  # the new checkpoint onto DST (the old one is aside by now)
            failed.append(a)
            raise OSError(28, "No space left on device")
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", flaky)
    assert main([str(src), str(dst), "--no-progress", "--dtype", "float32", "--overwrite"]) == 1
    monkeypatch.undo()
    assert failed and "No space left on device" in capsys.readouterr().err
    assert convert.read_manifest(dst)["options"]["dtype"] == "bfloat16"  # the old one, whole
    assert (convert.temp_dir(dst) / convert.PROGRESS_FILE).is_file()
    assert main([str(src), str(dst), "--no-progress", "--dtype", "float32", "--overwrite", "--resume"]) == 0
    assert convert.read_manifest(dst)["options"]["dtype"] == "float32"
    assert not (dst / convert.PROGRESS_FILE).exists() and not convert.temp_dir(dst).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


# ------------------------------------------------------------------------------------ bad inputs


def _rewrite(src: Path, dst: Path, mutate) -> Path:
    """Copy of the checkpoint `src` with its tensors passed through `mutate(tensors, dtypes)`."""
    index = CheckpointIndex(src)
    tensors = {name: index.read(name) for name in index.names()}
    dtypes = {name: index.info(name).dtype for name in index.names() if index.info(name).dtype == "F8_E8M0"}
    mutate(tensors, dtypes)
    write_sharded_checkpoint(dst, tensors, dtypes, max_shard_bytes=256 * 1024)
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def _drop(name):
    def mutate(tensors, dtypes):
        del tensors[name]

    return mutate


def _replace(name, value, dtype=None):
    def mutate(tensors, dtypes):
        tensors[name] = value(tensors[name])
        dtypes.pop(name, None)
        if dtype:
            dtypes[name] = dtype

    return mutate


def _add(name, value):
    def mutate(tensors, dtypes):
        tensors[name] = value

    return mutate


def _shard_holding(src: Path, name: str) -> Path:
    return src / CheckpointIndex(src).shard_of(name)


def _delete_shard(src):
    index = CheckpointIndex(src)
    shard = _shard_holding(src, "layers.1.attn.wq_a.weight")
    first = next(n for n in index.names() if index.shard_of(n) == shard.name)
    shard.unlink()
    return [shard.name, f"'{first}'"]


def _truncate_shard(src):
    index = CheckpointIndex(src)
    shard = _shard_holding(src, "layers.1.attn.wq_a.weight")
    last = [n for n in index.names() if index.shard_of(n) == shard.name][-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1)
    return [shard.name, "truncated", last]


def _lie_about_tensor_size(src):
    """A header entry whose data_offsets span less than its shape needs."""
    shard = _shard_holding(src, "layers.1.attn.wq_a.weight")
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["layers.1.attn.wq_a.weight"]["shape"][0] += 1
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    shard.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    return [shard.name, "layers.1.attn.wq_a.weight", "spans"]


def _lie_about_header_size(src):
    shard = _shard_holding(src, "layers.1.attn.wq_a.weight")
    raw = bytearray(shard.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw))
    shard.write_bytes(bytes(raw))
    return [shard.name, "header length"]


def _unknown_config_key(src):
    cfg = json.loads((src / "config.json").read_text())
    cfg["frobnication_depth"] = 3
    (src / "config.json").write_text(json.dumps(cfg))
    return ["config.json", "frobnication_depth"]


def _index_naming_a_number_for_a_shard(src):
    """A shard name that is not a string: a bare TypeError from the convert's own shard check before."""
    index = json.loads((src / INDEX_FILE).read_text())
    index["weight_map"]["layers.1.attn.wq_a.weight"] = 5
    (src / INDEX_FILE).write_text(json.dumps(index))
    return [INDEX_FILE, "malformed 'weight_map'"]


ON_DISK = {  # corruptions applied to a copy in place -> words the message must contain
    "missing shard": _delete_shard,
    "truncated shard": _truncate_shard,
    "header lies about a tensor's size": _lie_about_tensor_size,
    "header lies about its own size": _lie_about_header_size,  # no tensor can be named here
    "unknown config key": _unknown_config_key,  # a key, not a tensor
    "index naming a number for a shard": _index_naming_a_number_for_a_shard,
}

REWRITES = {  # tensors rewritten -> (mutation, words the message must contain)
    "tensor missing from the index": (
        _drop("layers.1.attn.wq_a.weight"),
        ["model.safetensors.index.json", "missing tensor 'layers.1.attn.wq_a.weight'"],
    ),
    "wrong shape": (
        _replace("layers.0.attn.wkv.weight", lambda w: w[:-1]),
        ["layers.0.attn.wkv.weight", "model-", "shape"],
    ),
    "wrong dtype": (
        _replace("layers.0.attn.attn_sink", lambda w: w.astype(np.float16)),
        ["layers.0.attn.attn_sink", "model-", "dtype F16"],
    ),
    "unknown tensor": (
        _add("layers.0.attn.bogus.weight", np.zeros(3, np.float32)),
        ["unknown tensor 'layers.0.attn.bogus.weight'", "model-"],
    ),
    "hash router naming an expert the model lacks": (
        _replace("layers.0.ffn.gate.tid2eid", lambda t: np.where(np.arange(t.size).reshape(t.shape) == 7, 8, t), "I64"),
        ["layers.0.ffn.gate.tid2eid", "model-", "outside [0, n_routed_experts 8)"],
    ),
    "scale grid of the wrong shape": (
        _replace("layers.0.attn.wq_a.scale", lambda s: np.concatenate([s, s[:, :1]], axis=1), "F8_E8M0"),
        ["layers.0.attn.wq_a.scale", "model-", "scale grid"],
    ),
}


def _expect_failure(capsys, src: Path, dst: Path, words: list[str]) -> None:
    assert main([str(src), str(dst), "--no-progress"]) == 1
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)
    assert not dst.exists() and not convert.temp_dir(dst).exists()


@pytest.mark.parametrize("case", sorted(ON_DISK))
def test_bad_files_fail_before_any_work(tmp_path, capsys, flash_ckpt, case):
    src = tmp_path / "src"
    shutil.copytree(flash_ckpt[0], src)
    words = ON_DISK[case](src)
    _expect_failure(capsys, src, tmp_path / "dst", words)


@pytest.mark.parametrize("case", sorted(REWRITES))
def test_bad_tensors_fail_before_any_work(tmp_path, capsys, flash_ckpt, case):
    mutate, words = REWRITES[case]
    src = _rewrite(flash_ckpt[0], tmp_path / "src", mutate)
    _expect_failure(capsys, src, tmp_path / "dst", words)


def _nan_code(w):
    w = w.copy()
    w.view(np.uint8)[0, 0] = 0xFF  # E4M3FN's negative NaN
    return w


DAMAGED_VALUES = {  # quantized bytes no release holds: they dequantized to NaN without a word
    "FP8 NaN code": (_replace("layers.2.attn.wq_b.weight", _nan_code), "'layers.2.attn.wq_b.weight': an FP8 weight"),
    "E8M0 NaN scale": (
        _replace("layers.2.attn.wq_b.scale", lambda s: np.full(s.shape, 255, np.uint8), "F8_E8M0"),
        "'layers.2.attn.wq_b.scale': a scale byte is 255",
    ),
    "FP4 NaN scale": (
        _replace("layers.3.ffn.experts.5.w2.scale", lambda s: np.full(s.shape, 255, np.uint8), "F8_E8M0"),
        "'layers.3.ffn.experts.5.w2.scale': a scale byte is 255",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_VALUES))
@pytest.mark.parametrize("options", [["--dtype", "bfloat16"], ["--dtype", "float32"], ["--keep-quantized"]])
def test_damaged_quantized_values_are_named(tmp_path, capsys, flash_ckpt, case, options):
    """Found while converting (the values are read only then): one error naming the tensor, no DST.
    Kept quantized too, whose bytes are copied undecoded (they were copied unchecked, and the
    restored model's logits were NaN)."""
    mutate, reason = DAMAGED_VALUES[case]
    src = _rewrite(flash_ckpt[0], tmp_path / "src", mutate)
    assert main([str(src), str(tmp_path / "dst"), "--no-progress", *options]) == 1
    err = capsys.readouterr().err
    assert reason in err and "the file is damaged" in err and "Traceback" not in err, err
    assert not (tmp_path / "dst").exists()
    # stopped mid-conversion: the unfinished one is kept, and the message says where and how to resume
    assert (tmp_path / "dst.tmp-dsv4-convert").is_dir()
    assert f"the unfinished conversion is kept in {tmp_path / 'dst.tmp-dsv4-convert'}" in err and "--resume" in err, err


def test_every_problem_is_reported_at_once(tmp_path, capsys, flash_ckpt):
    def mutate(tensors, dtypes):
        _replace("layers.0.attn.wkv.weight", lambda w: w[:-1])(tensors, dtypes)
        _drop("layers.2.attn.wq_b.weight")(tensors, dtypes)
        _drop("layers.2.attn.wq_b.scale")(tensors, dtypes)
        _add("layers.3.extra", np.zeros(2, np.float32))(tensors, dtypes)

    src = _rewrite(flash_ckpt[0], tmp_path / "src", mutate)
    words = ["3 problem(s)", "layers.0.attn.wkv.weight", "layers.2.attn.wq_b.weight", "layers.3.extra"]
    _expect_failure(capsys, src, tmp_path / "dst", words)


def test_a_single_file_source_with_many_problems(tmp_path, capsys, flash_ckpt):
    """A source without an index (one model.safetensors) is named as the directory, not as an index
    it does not have, and thousands of problems are counted past the first PROBLEMS_SHOWN."""
    src = tmp_path / "src"
    src.mkdir()
    index = CheckpointIndex(flash_ckpt[0])
    names = [n for n in index.names() if not n.startswith("layers.")]
    dtypes = {n: index.info(n).dtype for n in names if index.info(n).dtype == "F8_E8M0"}
    write_safetensors(src / "model.safetensors", {n: index.read(n) for n in names}, dtypes)
    shutil.copy(flash_ckpt[0] / "config.json", src / "config.json")
    assert main([str(src), str(tmp_path / "dst"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    total = int(re.search(rf"error: {re.escape(str(src))}: (\d+) problem\(s\)", err).group(1))
    assert total > PROBLEMS_SHOWN and INDEX_FILE not in err
    assert err.rstrip().endswith(f"... and {total - PROBLEMS_SHOWN} more")


def test_existing_destination_is_refused(tmp_path, capsys, flash_ckpt):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "something").write_text("x")
    assert main([str(flash_ckpt[0]), str(dst), "--no-progress"]) == 1
    assert f"{dst}: destination exists" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["something"]


def test_bad_options(tmp_path, capsys, flash_ckpt):
    src = str(flash_ckpt[0])
    assert main([src, str(tmp_path / "a"), "--layers", "3:9", "--no-progress"]) == 1
    assert "the model has 5 layers" in capsys.readouterr().err
    assert main([src, str(tmp_path / "b"), "--layers", "x", "--no-progress"]) == 1
    assert main([src, str(Path(src) / "inside"), "--no-progress"]) == 1
    assert "outside the source" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main([src, str(tmp_path / "file" / "dst"), "--no-progress"]) == 1  # was a NotADirectoryError
    assert f"{tmp_path / 'file'} is not a directory" in capsys.readouterr().err
    for samples in ("0", "-3"):  # 0 had passed, checking nothing; -3 was a numpy traceback
        assert main(["--verify", src, str(tmp_path / "a"), "--samples", samples]) == 1
        err = capsys.readouterr().err
        assert err.startswith("dsv4-convert: error: --samples") and "Traceback" not in err


def test_help_states_the_memory_bound(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "2 x the largest unit" in out and "--resume" in out


# ------------------------------------------------------------- concurrent runs, damage, links


def test_a_second_conversion_to_the_same_destination_is_refused(tmp_path, capsys, flash_ckpt):
    """While one conversion writes DST.tmp-dsv4-convert (it holds a lock on it), another to the same
    DST is refused instead of removing or resuming it under the first; once released, it proceeds."""
    import fcntl

    src, dst = flash_ckpt[0], tmp_path / "dst"
    tmp = convert.temp_dir(dst)
    tmp.mkdir()
    (tmp / convert.PROGRESS_FILE).write_text("{}")
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running conversion holds
    try:
        for flags in ([], ["--resume"]):
            assert main([str(src), str(dst), "--no-progress", *flags]) == 1
            assert "another dsv4-convert is writing this conversion" in capsys.readouterr().err
            assert (tmp / convert.PROGRESS_FILE).read_text() == "{}" and not dst.exists()
    finally:
        os.close(fd)
    assert main([str(src), str(dst), "--no-progress"]) == 0  # the unfinished one is replaced
    assert not tmp.exists() and convert.read_manifest(dst)


def test_a_damaged_destination_is_named_on_load_and_verify(tmp_path, capsys, flash_ckpt, converted):
    """A chunk file deleted or cut short, or an array's directory gone: `load` and `--verify` raise
    one CheckpointError naming the array (they raised Orbax's and TensorStore's errors, and verify
    printed a traceback)."""
    src, dst = flash_ckpt[0], converted["flash", "float32", False]
    name = "layers.1.attn.wq_b.weight"
    for damage in ("delete", "truncate", "rmdir"):
        bad = tmp_path / damage
        shutil.copytree(dst, bad)
        array = bad / convert.PARAMS_DIR / name
        if damage == "delete":
            (array / "0.0").unlink()
        elif damage == "truncate":
            (array / "0.0").write_bytes(b"0123456789")
        else:
            shutil.rmtree(array)
        with pytest.raises(CheckpointError, match=f"cannot read array {name}: .*damaged or incomplete") as err:
            load(bad)
        assert "TensorStore details" not in str(err.value) and "tensorstore_spec" not in str(err.value)
        if damage == "delete":  # the innermost reason: which chunk file is missing
            assert f'{name}/0.0" is missing' in str(err.value), err.value
        assert main(["--verify", str(src), str(bad), "--samples", "1000"]) == 1
        err = capsys.readouterr().err
        assert f"cannot read array {name}" in err and "Traceback" not in err, err


def test_a_cut_chunk_is_named_before_orbax_reads_anything(tmp_path, converted):
    """A cut chunk failed inside Orbax's restore, whose other reads were left as abandoned coroutines:
    the one-line error came with "Event loop is closed" tracebacks on stderr (and ~180 pytest warnings
    wherever the coroutines were collected). Checked in a fresh process, which prints what it leaves."""
    bad = tmp_path / "cut"
    shutil.copytree(converted["flash", "float32", False], bad)
    name = "layers.1.attn.wq_b.weight"
    (bad / convert.PARAMS_DIR / name / "0.0").write_bytes(b"0123456789")
    code = "import sys, dsv4\ntry:\n    dsv4.load(sys.argv[1])\nexcept dsv4.CheckpointError as err:\n    print(err)"
    proc = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-2000:]
    assert f'cannot read array {name}: chunk file "' in proc.stdout and "holds 10 bytes, not" in proc.stdout


@pytest.mark.parametrize("keep", [False, True], ids=["dense", "keep_quantized"])
def test_a_config_that_does_not_fit_the_arrays_is_refused_on_load(tmp_path, converted, keep):
    """DST's config.json edited (wider experts): each array is checked against the model, a kept-
    quantized one through the shape its data stands for (it loaded, then computed with the wrong
    config)."""
    dst = tmp_path / "dst"
    shutil.copytree(converted["flash", "float32", keep], dst)
    config = json.loads((dst / "config.json").read_text())
    config["moe_intermediate_size"] *= 2
    (dst / "config.json").write_text(json.dumps(config))
    wants = "stands for shape" if keep else "has shape"
    with pytest.raises(CheckpointError, match=rf"'layers\.0\.ffn\.experts\.w1'.* {wants} .*the model wants"):
        load(dst)


def test_arrays_of_layers_the_config_no_longer_has_are_named_on_load(tmp_path, converted):
    """Orbax refused them with a long 'tree structures do not match' error."""
    dst = tmp_path / "dst"
    shutil.copytree(converted["flash", "float32", False], dst)
    config = json.loads((dst / "config.json").read_text())
    last = config["num_hidden_layers"] - 1
    config["num_hidden_layers"] = last
    del config["compress_ratios"][last]
    (dst / "config.json").write_text(json.dumps(config))
    said = rf"array\(s\) the model of its config\.json has no parameter for, e\.g\. \['layers\.{last}\."
    with pytest.raises(CheckpointError, match=said):
        load(dst)


def test_an_array_stored_with_another_shape_is_named_on_load(tmp_path, converted):
    """Orbax refused it with a long ValueError naming no array and advising strict=False."""
    dst = tmp_path / "dst"
    shutil.copytree(converted["flash", "float32", False], dst)
    meta = dst / "params" / "norm.weight" / ".zarray"
    zarray = json.loads(meta.read_text())
    wanted = zarray["shape"][0]
    zarray["shape"] = zarray["chunks"] = [wanted // 2]
    meta.write_text(json.dumps(zarray))
    said = rf"norm\.weight holds \[{wanted // 2}\], dsv4_checkpoint\.json says \[{wanted}\]"
    with pytest.raises(CheckpointError, match=said):
        load(dst)


@pytest.mark.parametrize("drop", ["arrays", "options"])
def test_a_manifest_missing_a_record_is_named(tmp_path, converted, drop):
    """A bare KeyError before."""
    dst = tmp_path / "dst"
    shutil.copytree(converted["flash", "float32", False], dst)
    manifest = json.loads((dst / convert.MANIFEST_FILE).read_text())
    del manifest[drop]
    (dst / convert.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"dsv4_checkpoint\.json: no '{drop}' record"):
        load(dst)


def test_verify_refuses_a_destination_of_another_model(tmp_path, capsys, flash_ckpt, pro_ckpt, converted):
    assert main(["--verify", str(pro_ckpt[0]), str(converted["flash", "float32", False])]) == 1
    err = capsys.readouterr().err
    assert "was not converted from" in err and "Traceback" not in err


def test_overwrite_through_a_symbolic_link_replaces_its_target(tmp_path, flash_ckpt):
    src, target, link = flash_ckpt[0], tmp_path / "target", tmp_path / "link"
    assert main([str(src), str(target), "--no-progress"]) == 0
    link.symlink_to(target, target_is_directory=True)
    assert main([str(src), str(link), "--no-progress", "--dtype", "float32", "--overwrite"]) == 0
    assert link.is_symlink() and convert.read_manifest(target)["options"]["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]


def test_a_disk_error_names_the_destination_and_the_resume(tmp_path, capsys, flash_ckpt, monkeypatch):
    """An OSError mid-run (a full disk) names DST and keeps the unfinished conversion for --resume."""
    src, dst = flash_ckpt[0], tmp_path / "dst"
    real = convert.ArrayStore.create

    def full(self, arrays):
        real(self, arrays)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert.ArrayStore, "create", full)
    assert main([str(src), str(dst), "--no-progress"]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert f"converting to {dst}: [Errno 28] No space left on device" in err
    assert f"kept in {convert.temp_dir(dst)}: once fixed, rerun with --resume" in err
    assert main([str(src), str(dst), "--no-progress", "--resume"]) == 0 and convert.read_manifest(dst)


def test_dsv4_traceback_shows_the_error(tmp_path, flash_ckpt, monkeypatch):
    monkeypatch.setenv("DSV4_TRACEBACK", "1")
    with pytest.raises(convert.ConvertError, match="the model has 5 layers"):
        main([str(flash_ckpt[0]), str(tmp_path / "a"), "--layers", "3:9", "--no-progress"])


def test_a_resume_with_other_options_names_them():
    new = {"source": "/s", "options": {"dtype": "bfloat16", "unit_bytes": 1, "keep_quantized": False}}
    old = {"source": "/t", "options": {"dtype": "float32", "unit_bytes": 1, "keep_quantized": False}}
    assert convert._changed_options(new, old) == ["dtype ('float32' -> 'bfloat16')", "source"]


def test_too_little_disk_space_stops_before_writing(tmp_path, capsys, flash_ckpt, monkeypatch):
    """A conversion that would not fit stops before any chunk is written, naming DST, what is left to
    write and what is free; it leaves no temporary directory. --no-space-check converts anyway."""
    src, dst = flash_ckpt[0], tmp_path / "dst"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(convert.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    assert main([str(src), str(dst), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"dsv4-convert: error: {dst}: not enough disk space" in err and "0.00 GB free" in err
    assert "--no-space-check" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert main([str(src), str(dst), "--no-progress", "--no-space-check"]) == 0 and convert.read_manifest(dst)


def _spy(fn, note):
    """fn, calling note(*args) before each call."""

    def wrapper(*args):
        note(*args)
        return fn(*args)

    return wrapper


def test_a_resume_checks_space_for_the_units_left_and_keeps_its_work(tmp_path, flash_ckpt, monkeypatch):
    src, dst = flash_ckpt[0], tmp_path / "dst"
    small = {"progress": False, "unit_bytes": 1 << 16, "log": lambda msg: None}

    def stop_after_two(record, unit):
        if len(record.completed) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(convert.ProgressRecord, "mark", _spy(convert.ProgressRecord.mark, stop_after_two))
    with pytest.raises(KeyboardInterrupt):
        convert.convert(src, dst, **small)
    monkeypatch.undo()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(convert.shutil, "disk_usage", lambda path: usage._replace(free=1))
    with pytest.raises(convert.ConvertError, match="not enough disk space"):
        convert.convert(src, dst, resume=True, **small)
    assert len(convert.ProgressRecord.load(convert.temp_dir(dst) / convert.PROGRESS_FILE).completed) == 2
    monkeypatch.undo()
    needs = []
    monkeypatch.setattr(convert, "check_space", _spy(convert.check_space, lambda where, n, d: needs.append(n)))
    assert convert.convert(src, dst, resume=True, **small).units_resumed == 2
    assert convert.convert(src, tmp_path / "fresh", **small).units > 2
    assert 0 < needs[0] < needs[1]  # the resume counts only the units left


def test_a_unit_is_on_the_disk_before_the_record_counts_it(tmp_path, flash_ckpt, monkeypatch):
    """Every unit's chunk files are flushed (syncfs) after its writes finish and before it is marked
    complete, and once more before the rename to DST: a resume after a power cut skips no unit
    whose writes were still in the page cache."""
    events = []
    for owner, name in ((convert, "sync_filesystem"), (convert.ProgressRecord, "mark"),
                        (convert.ArrayStore, "write_chunk")):  # fmt: skip
        monkeypatch.setattr(owner, name, _spy(getattr(owner, name), lambda *a, name=name: events.append(name)))
    summary = convert.convert(flash_ckpt[0], tmp_path / "dst", progress=False, unit_bytes=1 << 16)
    marks = [i for i, e in enumerate(events) if e == "mark"]
    assert len(marks) == summary.units > 2
    assert all(events[i - 1] == "sync_filesystem" for i in marks)  # no write between a flush and its record
    assert events[marks[-1] + 1 :] == ["sync_filesystem"]  # and the last flush before the rename


def test_verify_takes_no_conversion_options(capsys, tmp_path):
    """--verify reads DST's own conversion options: giving it others (which it used to ignore) is a
    usage error naming them, as --samples is without --verify."""
    for extra in (["--dtype", "float32"], ["--resume", "--overwrite"], ["--workers", "2"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--verify", "src", str(tmp_path / "dst"), *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--verify compares DST with SRC as DST was converted; it takes no" in err
        assert all(flag in err for flag in extra if flag.startswith("--"))
    with pytest.raises(SystemExit):
        main(["src", str(tmp_path / "dst"), "--samples", "3"])
    assert "--samples applies to --verify only" in capsys.readouterr().err
