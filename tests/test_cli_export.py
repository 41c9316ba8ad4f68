"""dsv4-export: training (Orbax), release and refused checkpoints through `cli_export.main`."""

import jax
import numpy as np
import pytest
from flax import nnx
from test_export import _params, rounded_reference

import dsv4
from dsv4 import checkpoint, cli_export, train
from dsv4.config import ModelConfig, RuntimeConfig
from dsv4.safetensors_io import CheckpointIndex

SMALL = ModelConfig.tiny(num_hidden_layers=2, compress_ratios=(4, 0, 0), num_hash_layers=1, index_topk=4)
RT = RuntimeConfig(dtype="float32", train_stats=True, query_block=32)
TC = train.TrainConfig(warmup_steps=2, total_steps=40)


def _shifted(state: train.TrainState, step: int, seed: int) -> train.TrainState:
    """`state` at `step` with every float parameter moved by noise (so a restore cannot pass as a fresh init)."""
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state.params))))
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), state.params)
    return state.replace(step=np.int32(step), params=params)


def _model_of(graphdef, state: train.TrainState):
    return nnx.merge(graphdef, state.params, state.frozen)


@pytest.fixture(scope="module")
def training_ckpt(tmp_path_factory):
    """(Orbax directory with steps 2 and 5, {step: model}) written by train.Checkpointer."""
    graphdef, state = train.init_train_state(dsv4.init_model(SMALL, RT, seed=0), TC)
    path = tmp_path_factory.mktemp("train") / "ckpt"
    ckpt = train.Checkpointer(path, SMALL, TC, every=1, keep=3)
    models = {}
    for step in (2, 5):
        state = _shifted(state, step, seed=step)
        assert ckpt.save(state, force=True)
        models[step] = _model_of(graphdef, state)
    ckpt.close()
    return path, models


def _assert_loads_back_rounded(out, model, include_mtp=True):
    loaded = dsv4.load_hf(out, dtype="float32", query_block=32)
    got, want = _params(loaded), _params(rounded_reference(model))
    if not include_mtp:
        want = {p: v for p, v in want.items() if p[0] != "mtp"}
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))


@pytest.fixture(scope="module")
def exported_latest(training_ckpt, tmp_path_factory):
    """OUT of `dsv4-export CKPT OUT --tokenizer TOK` on the training checkpoint (latest step)."""
    from release_fixture import write_tiny_tokenizer

    path, _ = training_ckpt
    tok = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(tok, SMALL.vocab_size)
    out = tmp_path_factory.mktemp("export") / "latest"
    assert cli_export.main([str(path), str(out), "--tokenizer", str(tok), "--max-shard-size", "200KiB"]) == 0
    return out, tok


def test_training_checkpoint_latest_step_loads_back_as_the_rounded_model(training_ckpt, exported_latest):
    _, models = training_ckpt
    out, tok = exported_latest
    _assert_loads_back_rounded(out, models[5])
    assert (out / "tokenizer.json").read_bytes() == (tok / "tokenizer.json").read_bytes()
    assert len(list(out.glob("*.safetensors"))) > 1  # --max-shard-size 200KiB


def test_a_train_run_directory_exports_its_checkpoints_and_tokenizer(training_ckpt, tmp_path):
    """`dsv4-export RUN OUT` for a dsv4-train --out RUN (checkpoints/ + tokenizer/): RUN/checkpoints'
    latest step, with RUN/tokenizer copied; RUN/checkpoints as CKPT finds RUN/tokenizer too."""
    import shutil

    from release_fixture import write_tiny_tokenizer

    path, models = training_ckpt
    run = tmp_path / "run"
    shutil.copytree(path, run / "checkpoints")
    (run / "tokenizer").mkdir()
    write_tiny_tokenizer(run / "tokenizer", SMALL.vocab_size)
    for ckpt, out in ((run, tmp_path / "a"), (run / "checkpoints", tmp_path / "b")):
        assert cli_export.main([str(ckpt), str(out)]) == 0
        _assert_loads_back_rounded(out, models[5])
        assert (out / "tokenizer.json").read_bytes() == (run / "tokenizer" / "tokenizer.json").read_bytes()


def test_step_option_and_no_mtp(training_ckpt, tmp_path, capsys):
    path, models = training_ckpt
    out = tmp_path / "step2"
    assert cli_export.main([str(path), str(out), "--step", "2", "--no-mtp"]) == 0
    assert "training checkpoint step 2" in capsys.readouterr().out
    _assert_loads_back_rounded(out, models[2], include_mtp=False)
    assert not any(n.startswith("mtp.") for n in CheckpointIndex(out).names())
    assert not (out / "tokenizer.json").exists()


def _assert_same_values(a_dir, b_dir):
    """Both release-layout directories hold the same tensors, dtypes and dequantized values."""
    a, b = CheckpointIndex(a_dir), CheckpointIndex(b_dir)
    assert {n: a.info(n).dtype for n in a.names()} == {n: b.info(n).dtype for n in b.names()}
    specs = checkpoint.release_specs(nnx.split(dsv4.abstract_model(SMALL))[1])
    for t in (t for spec in specs for t in spec.tensors):
        want = checkpoint.read_dequantized(a, t, (128, 128))
        np.testing.assert_array_equal(checkpoint.read_dequantized(b, t, (128, 128)), want, err_msg=t.name)


def test_release_checkpoint_reexports_losslessly_with_its_tokenizer(exported_latest, tmp_path):
    """Values, not bytes: FP4/E8M0 encodings of one value are not unique (scale 2x, codes halved)."""
    src, _ = exported_latest
    out = tmp_path / "again"
    assert cli_export.main([str(src), str(out)]) == 0
    _assert_same_values(src, out)
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_converted_checkpoint_exports_losslessly(exported_latest, tmp_path):
    from dsv4 import convert

    src, _ = exported_latest
    convert.convert(src, tmp_path / "converted", dtype="float32", progress=False)
    out = tmp_path / "out"
    assert cli_export.main([str(tmp_path / "converted"), str(out)]) == 0
    _assert_same_values(src, out)


def test_parse_size():
    assert cli_export.parse_size("4GiB") == 4 * 2**30
    assert cli_export.parse_size("500MB") == 500 * 10**6
    assert cli_export.parse_size("1.5 KiB") == 1536
    assert cli_export.parse_size("1024") == 1024
    for bad in ("", "0", "4XB", "GiB"):
        with pytest.raises(cli_export.ExportError, match="--max-shard-size"):
            cli_export.parse_size(bad)


def _error(argv, capsys) -> str:
    """The one-line error of a refused command (exit status 2)."""
    assert cli_export.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv4-export: error: ") and err.count("\n") == 1, err
    return err


def test_bad_inputs_are_refused_naming_the_path(training_ckpt, exported_latest, tmp_path, capsys):
    path, _ = training_ckpt
    release, _ = exported_latest
    missing = tmp_path / "missing"
    assert f"{missing}: no such checkpoint" in _error([missing, tmp_path / "o1"], capsys)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("x")
    err = _error([tmp_path / "plain", tmp_path / "o2"], capsys)
    assert f"{tmp_path / 'plain'}: not a checkpoint" in err and "nor a training checkpoint" in err
    assert "not a directory" in _error([tmp_path / "plain" / "notes.txt", tmp_path / "o3"], capsys)
    assert "no step 7 (steps: 2, 5)" in _error([path, tmp_path / "o4", "--step", "7"], capsys)
    assert "--step applies to training checkpoints" in _error([release, tmp_path / "o5", "--step", "2"], capsys)
    assert "--overwrite" in _error([path, tmp_path / "plain"], capsys)
    assert "not a checkpoint (no config.json)" in _error([path, tmp_path / "plain", "--overwrite"], capsys)
    assert (tmp_path / "plain" / "notes.txt").exists()
    assert "OUT must lie outside CKPT" in _error([path, path / "inside"], capsys)
    assert "no tokenizer.json" in _error([path, tmp_path / "o6", "--tokenizer", tmp_path], capsys)
    assert "--max-shard-size" in _error([path, tmp_path / "o7", "--max-shard-size", "lots"], capsys)
    assert "--max-shard-size" in _error([path, tmp_path / "o7", "--max-shard-size", "inf"], capsys)
    assert "--max-shard-size" in _error([path, tmp_path / "o7", "--max-shard-size", "1e400GB"], capsys)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))


def test_overwrite_replaces_a_checkpoint_at_out(training_ckpt, tmp_path):
    path, models = training_ckpt
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model-00009-of-00009.safetensors").write_text("stale shard")
    assert cli_export.main([str(path), str(out), "--overwrite", "--step", "2"]) == 0
    assert not (out / "model-00009-of-00009.safetensors").exists()
    _assert_loads_back_rounded(out, models[2])


def test_overwrite_keeps_files_an_export_does_not_write(training_ckpt, tmp_path, capsys):
    """--overwrite onto a directory with a config.json beside other files (a project, a downloaded
    release with its README and code) used to delete them all; now it names them and writes nothing."""
    path, _ = training_ckpt
    out = tmp_path / "project"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "NOTES.md").write_text("mine")
    (out / "src").mkdir()
    err = _error([path, out, "--overwrite"], capsys)
    assert f"{out}: holds files an export does not write (NOTES.md, src); --overwrite would delete them" in err
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.md", "config.json", "src"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_a_mount_point_out_is_refused_before_loading(training_ckpt, tmp_path, capsys, monkeypatch):
    """A mount point cannot be renamed over: the export failed at the end with EBUSY (and left an
    attic directory beside it)."""
    import os

    path, _ = training_ckpt
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: str(p) == str(tmp_path / "mnt") or real(p))
    (tmp_path / "mnt").mkdir()
    assert "a mount point, which an export cannot replace" in _error([path, tmp_path / "mnt"], capsys)


def test_a_keep_quantized_conversion_exports_as_the_dense_one(exported_latest, tmp_path):
    """A `dsv4-convert --keep-quantized` checkpoint (FP8/FP4 weights kept with their scales) exported
    with a traceback; it now exports the same values as the float32 conversion."""
    from dsv4 import convert

    src, _ = exported_latest
    for keep in (False, True):
        convert.convert(src, tmp_path / f"conv-{keep}", dtype="float32", keep_quantized=keep, progress=False)
        assert cli_export.main([str(tmp_path / f"conv-{keep}"), str(tmp_path / f"out-{keep}")]) == 0
    _assert_same_values(tmp_path / "out-False", tmp_path / "out-True")


def test_a_tokenizer_that_does_not_fit_is_refused(training_ckpt, tmp_path, capsys):
    """An unreadable tokenizer.json, or one with more tokens than the model's vocabulary, was copied
    into OUT and failed only later, in dsv4-generate."""
    from release_fixture import write_tiny_tokenizer

    path, _ = training_ckpt
    big = tmp_path / "big"
    big.mkdir()
    write_tiny_tokenizer(big, SMALL.vocab_size + 300)
    err = _error([path, tmp_path / "o1", "--tokenizer", big], capsys)
    v = SMALL.vocab_size
    assert f"{big / 'tokenizer.json'}: {v + 300} tokens with ids up to {v + 299}, past the model's vocab_size" in err
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "tokenizer.json").write_text("garbage")
    assert str(garbage) in _error([path, tmp_path / "o2", "--tokenizer", garbage], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "garbage"]


def test_a_damaged_training_step_is_named_with_the_steps_to_try(training_ckpt, tmp_path, capsys):
    import shutil

    path, _ = training_ckpt
    broken = tmp_path / "ckpt"
    shutil.copytree(path, broken)
    shutil.rmtree(broken / "5" / "state")
    err = _error([broken, tmp_path / "o1"], capsys)
    assert f"{broken}/5: cannot read this training checkpoint step" in err and "try --step 2 (steps: 2)" in err
    (broken / "5" / "meta" / "metadata").write_text("{not json")
    assert f"{broken}/5: cannot read this training checkpoint step" in _error([broken, tmp_path / "o2"], capsys)
    assert cli_export.main([str(broken), str(tmp_path / "o3"), "--step", "2"]) == 0


def test_a_full_disk_names_the_export(training_ckpt, tmp_path, capsys, monkeypatch):
    from dsv4 import export

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_sharded_checkpoint", full)
    err = _error([training_ckpt[0], tmp_path / "out"], capsys)
    assert f"cannot write the export {tmp_path / 'out'}: No space left on device" in err
    assert list(tmp_path.iterdir()) == []


def test_a_symlinked_out_is_written_through(training_ckpt, tmp_path):
    """OUT a symbolic link: its target gets the export (the link was replaced by a directory, the
    target left as it was), as dsv4-convert does."""
    path, models = training_ckpt
    target, link = tmp_path / "target", tmp_path / "link"
    assert cli_export.main([str(path), str(target), "--step", "5"]) == 0
    link.symlink_to(target, target_is_directory=True)
    assert cli_export.main([str(path), str(link), "--step", "2", "--overwrite"]) == 0
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]
    _assert_loads_back_rounded(target, models[2])
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "new", target_is_directory=True)
    assert cli_export.main([str(path), str(dangling)]) == 0 and (tmp_path / "new" / "config.json").is_file()
