"""export_release: a model written in the release layout reads back through load_hf as itself, rounded."""

import json

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import dsv4
from dsv4 import checkpoint, export, quant
from dsv4.config import ModelConfig, RuntimeConfig
from dsv4.safetensors_io import CheckpointIndex

F32_RT = RuntimeConfig(dtype="float32", query_block=32)


def _rounded(t: checkpoint.ReleaseTensor, a: np.ndarray) -> np.ndarray:
    """The release rounding of one tensor, straight from dsv4.quant (independent of export.encode)."""
    if t.kind == "fp8":
        return quant.dequantize_fp8(*quant.quantize_fp8(a))
    if t.kind == "expert":
        return quant.dequantize_fp4(*quant.quantize_fp4(a))
    if t.kind == "float":
        return a.astype(ml_dtypes.bfloat16).astype(np.float32)
    return a


def rounded_reference(model):
    """A copy of `model` whose every parameter went through quantize -> dequantize."""
    graphdef, state = nnx.split(nnx.clone(model))
    flat = dict(nnx.to_flat_state(state))
    for spec in checkpoint.release_specs(state):
        var = flat[spec.path]
        arrays = export.release_arrays(spec, np.asarray(var.get_value()))
        rounded = [_rounded(t, a) for t, a in zip(spec.tensors, arrays, strict=True)]
        var.set_value(np.asarray(spec.assemble(rounded)).astype(var.get_value().dtype))
    return nnx.merge(graphdef, state)


def _params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.split(model)[1])}


def _pro_like():
    from release_fixture import TINY_PRO

    return ModelConfig.from_hf_config(TINY_PRO)  # hidden 160, expert width 48: partial tiles


@pytest.mark.parametrize("make_cfg", [ModelConfig.tiny, _pro_like], ids=["tiny", "pro_like"])
def test_exported_model_loads_back_as_its_rounded_self(tmp_path, make_cfg):
    cfg = make_cfg()
    model = dsv4.init_model(cfg, F32_RT, seed=3)
    out = export.export_release(model, None, tmp_path / "ckpt", max_shard_bytes=64 * 1024)
    loaded = dsv4.load_hf(out, dtype="float32", query_block=32)
    reference = rounded_reference(model)

    got, want = _params(loaded), _params(reference)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 150))
    logits = np.asarray(dsv4.forward(loaded, tokens))
    np.testing.assert_allclose(logits, dsv4.forward(reference, tokens), rtol=1e-6, atol=1e-6)
    # negative control: the unrounded model differs far beyond that tolerance
    assert np.abs(logits - np.asarray(dsv4.forward(model, tokens))).max() > 1e-3


def _stored(path) -> dict:
    index = CheckpointIndex(path)
    return {n: (index.info(n).dtype, tuple(index.info(n).shape)) for n in index.names()}


@pytest.mark.parametrize("fixture", ["flash_ckpt", "pro_ckpt"])
def test_names_dtypes_and_shapes_equal_the_release_fixture(request, tmp_path, fixture):
    path, _, cfg_dict = request.getfixturevalue(fixture)
    cfg = ModelConfig.from_hf_config(cfg_dict)
    out = export.export_release(dsv4.init_model(cfg, F32_RT), cfg, tmp_path / "ckpt")
    assert _stored(out) == _stored(path)
    assert ModelConfig.from_hf_config(out) == ModelConfig.from_hf_config(path)


def test_reexporting_a_release_checkpoint_is_lossless(tmp_path, flash_ckpt):
    path, _, _ = flash_ckpt
    out = export.export_release(dsv4.load_hf(path, dtype="float32"), None, tmp_path / "again")
    src, dst = CheckpointIndex(path), CheckpointIndex(out)
    cfg = ModelConfig.from_hf_config(path)
    block = tuple(cfg.quantization_config.weight_block_size)
    specs = checkpoint.release_specs(nnx.split(dsv4.abstract_model(cfg, F32_RT))[1])
    for t in (t for spec in specs for t in spec.tensors):
        a, b = checkpoint.read_dequantized(src, t, block), checkpoint.read_dequantized(dst, t, block)
        np.testing.assert_array_equal(a, b, err_msg=t.name)


def test_base_style_formats_and_no_mtp(tmp_path):
    cfg = ModelConfig.tiny()
    model = dsv4.init_model(cfg, F32_RT, seed=1)
    out = export.export_release(
        model, cfg, tmp_path / "base", scale_fmt="float", expert_format="fp8", include_mtp=False
    )
    stored = _stored(out)
    assert not any(n.startswith("mtp.") for n in stored)
    assert stored["layers.0.attn.wq_a.scale"][0] == "F32"
    assert stored["layers.0.ffn.experts.0.w1.weight"][0] == "F8_E4M3"
    loaded = dsv4.load_hf(out, dtype="float32")
    assert loaded.cfg.num_mtp_layers == 0 and loaded.cfg.expert_dtype == "fp8"
    np.testing.assert_array_equal(
        np.asarray(loaded.layers[1].attn.attn_sink.get_value()),
        np.asarray(model.layers[1].attn.attn_sink.get_value()),
    )


def test_no_mtp_of_a_model_with_two_mtp_blocks(tmp_path):
    """One compress_ratios entry per MTP block (n + 2 entries) was kept with num_nextn_predict_layers
    0, a config that refused itself (expected n + 0 or n + 1 entries)."""
    cfg = ModelConfig.tiny(num_nextn_predict_layers=2, compress_ratios=(0, 0, 4, 128, 4, 0, 0))
    model = dsv4.init_model(cfg, F32_RT, seed=1)
    out = export.export_release(model, cfg, tmp_path / "c", include_mtp=False)
    loaded = dsv4.load_hf(out, dtype="float32")
    assert loaded.cfg.num_mtp_layers == 0 and loaded.cfg.compress_ratios == (0, 0, 4, 128, 4, 0)
    assert loaded.cfg.layer_kinds == cfg.layer_kinds


def test_config_reads_as_a_release_config(tmp_path):
    out = export.export_release(dsv4.init_model(ModelConfig.tiny(), F32_RT), None, tmp_path / "c")
    raw = json.loads((out / "config.json").read_text())
    assert raw["expert_dtype"] == "fp4"
    assert raw["quantization_config"] == {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
    }  # fmt: skip
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 1


def test_tokenizer_files_are_copied(tmp_path):
    from release_fixture import write_tiny_tokenizer

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    write_tiny_tokenizer(tok_dir, 512)
    out = export.export_release(dsv4.init_model(ModelConfig.tiny(), F32_RT), None, tmp_path / "c",
                                tokenizer_dir=tok_dir)  # fmt: skip
    assert (out / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert (out / "tokenizer_config.json").is_file()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        export.export_release(dsv4.init_model(ModelConfig.tiny(), F32_RT), None, tmp_path / "d",
                              tokenizer_dir=tmp_path)  # fmt: skip
    assert not (tmp_path / "d").exists()


def test_refuses_a_non_empty_directory_and_replaces_a_checkpoint_with_overwrite(tmp_path):
    model = dsv4.init_model(ModelConfig.tiny(), F32_RT)
    target = tmp_path / "c"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        export.export_release(model, None, target)
    with pytest.raises(FileExistsError, match="not a checkpoint"):  # not someone's other files
        export.export_release(model, None, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    (target / "config.json").write_text("{}")  # a checkpoint beside other files: they are named, not deleted
    with pytest.raises(FileExistsError, match=r"holds files an export does not write \(keep.txt\)"):
        export.export_release(model, None, target, overwrite=True)
    (target / "keep.txt").unlink()
    (target / "model-00007-of-00007.safetensors").write_text("stale")  # an (earlier) checkpoint: replaced
    export.export_release(model, None, target, overwrite=True)
    assert not (target / "model-00007-of-00007.safetensors").exists()
    assert (target / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary directories left


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_sharded_checkpoint", boom)
    with pytest.raises(OSError, match="disk full"):
        export.export_release(dsv4.init_model(ModelConfig.tiny(), F32_RT), None, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("param", "release", "value"),
    [
        ("layers.0.attn.wq_a.weight", "layers.0.attn.wq_a.weight", np.nan),  # FP8: an AssertionError before
        ("layers.1.ffn.experts.w2", "layers.1.ffn.experts.0.w2.weight", np.inf),  # FP4: a ValueError naming nothing
        ("norm.weight", "norm.weight", -np.inf),  # BF16: written as it was
    ],
)
def test_a_non_finite_weight_is_named_and_nothing_written(tmp_path, param, release, value):
    model = dsv4.init_model(ModelConfig.tiny(), F32_RT)
    _, state = nnx.split(model)
    var = dict(nnx.to_flat_state(state))[tuple(int(k) if k.isdigit() else k for k in param.split("."))]
    var.set_value(var.get_value().at[(0,) * var.get_value().ndim].set(value))
    with pytest.raises(ValueError, match=rf"parameter {param} \(release tensor {release}\) holds 1 NaN or infinite"):
        export.export_release(model, None, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_state_without_cfg_is_refused():
    _, state = nnx.split(dsv4.init_model(ModelConfig.tiny(), F32_RT))
    with pytest.raises(ValueError, match="cfg"):
        export.export_release(state, None, "unused")


def test_inverse_covers_every_assemble_function():
    """Full-size table, shapes only (jax.eval_shape): for every spec of the Flash tree the
    inverse of its assemble function gives each release tensor's shape. (That assemble undoes it is
    checked on values by release_arrays in every export test.)"""
    import jax

    cfg = ModelConfig.flash()
    state = nnx.split(dsv4.abstract_model(cfg))[1]
    flat = dict(nnx.to_flat_state(state))
    checked = set()  # layers repeat: one trace per (assemble, parameter shape, release shapes)
    for spec in checkpoint.release_specs(state):
        param = flat[spec.path].get_value()
        want = [tuple(t.shape) for t in spec.tensors]
        key = (spec.assemble, tuple(param.shape), tuple(want))
        if key in checked:
            continue
        checked.add(key)
        inverse = export._disassemble_fn(spec, tuple(param.shape))  # NotImplementedError if unknown
        arrays = jax.eval_shape(inverse, jax.ShapeDtypeStruct(param.shape, param.dtype))
        assert [tuple(a.shape) for a in arrays] == want, spec.path
