"""dsv4-train: corpus handling, an end-to-end run (metrics, loss.png, export), exact resume, bad input."""

import argparse
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import dsv4
from dsv4 import cli, cli_export, cli_train, corpus
from dsv4.cli import CLIError
from dsv4.config import ModelConfig
from dsv4.tokenizer import load_tokenizer

# Two layers (CSA + sliding) and an MTP block: small enough to compile in seconds on two cores.
SMALL = ModelConfig.tiny(num_hidden_layers=2, compress_ratios=(4, 0, 0), num_hash_layers=1, index_topk=4)
RUN = ["--batch", "2", "--seq-len", "32", "--eval-windows", "2", "--no-progress"]


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    return SMALL.save(tmp_path_factory.mktemp("cfg") / "config.json")


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    """A directory of two text files (the pydoc corpus, split), plus a binary file that is ignored."""
    root = tmp_path_factory.mktemp("corpus")
    docs = corpus.builtin_corpus()
    (root / "a.txt").write_text("\n\n".join(docs[:40]))
    (root / "sub").mkdir()
    (root / "sub" / "b.md").write_text("\n\n".join(docs[40:]))
    (root / "image.bin").write_bytes(b"\xff\xfe\x00")
    return root


def train(argv):
    return cli_train.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, small_config, text_corpus):
    out = tmp_path_factory.mktemp("run")
    export = out.parent / (out.name + "_export")
    args = ["--config", small_config, "--corpus", text_corpus, "--out", out / "run", "--steps", 4]
    rc = train([*args, *RUN, "--eval-every", 2, "--save-every", 2, "--export", export])
    assert rc == 0
    return out / "run", export


# ------------------------------------------------------------------------------------------ corpus


def test_read_corpus_forms(text_corpus, tmp_path):
    docs = corpus.read_corpus(text_corpus)
    assert len(docs) == 2 and docs[1].startswith(corpus.builtin_corpus()[40])  # a.txt, then sub/b.md
    assert corpus.read_corpus(text_corpus / "a.txt") == docs[:1]
    assert len(corpus.read_corpus("pydoc")) > 50
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(corpus.CorpusError, match="bad.txt is not UTF-8"):
        corpus.read_corpus(tmp_path / "bad.txt")


def test_split_and_batches_are_deterministic():
    stream = np.arange(20_000, dtype=np.int32)
    train_part, held = corpus.split_stream(stream, 0.1)
    assert len(train_part) + len(held) == len(stream) and not set(train_part) & set(held)
    assert held[0] == 9 * corpus.HELDOUT_BLOCK  # every 10th block of 2048 tokens
    a = corpus.sample_batch(train_part, 4, 16, seed=1, step=7)
    assert a.shape == (4, 17) and np.array_equal(a, corpus.sample_batch(train_part, 4, 16, seed=1, step=7))
    assert not np.array_equal(a, corpus.sample_batch(train_part, 4, 16, seed=1, step=8))
    with pytest.raises(corpus.CorpusError, match="fewer than one window"):
        corpus.sample_batch(stream[:10], 1, 16, 0, 0)


def test_trained_tokenizer_has_special_tokens_first(tmp_path):
    corpus.train_bpe_tokenizer(corpus.builtin_corpus()[:20], 400, tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 400 and (tok.bos_id, tok.eos_id) == (0, 1)
    stream = corpus.encode_documents(tok, ["one", "two"])
    assert stream[0] == 0 and stream[-1] == 1 and tok.decode(stream[1:-1].tolist()).startswith("one")


# -------------------------------------------------------------------------------------- a full run


def test_run_writes_metrics_plot_checkpoints_and_export(full_run):
    run, export = full_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "lm_loss" in r]
    evals = [r for r in records if "heldout_loss" in r]
    assert steps == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in records if "loss" in r)
    assert evals[-1]["heldout_ppl"] == pytest.approx(np.exp(evals[-1]["heldout_loss"]))
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    model = dsv4.load_hf(export, dtype="float32")
    assert model.cfg.vocab_size == SMALL.vocab_size and (export / "tokenizer.json").is_file()
    logits = model(np.asarray([[0, 5, 9, 3]], np.int32))
    assert np.all(np.isfinite(np.asarray(logits)))


def test_resume_continues_exactly(full_run, tmp_path, small_config, text_corpus, capsys):
    run, _ = full_run
    args = ["--config", small_config, "--corpus", text_corpus, "--out", tmp_path / "r", *RUN, "--eval-every", 100]
    assert train([*args, "--steps", 4, "--time-limit", 0]) == 0  # stops (and saves) after step 1
    first = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in first if "loss" in r] == [1]
    capsys.readouterr()
    assert train([*args, "--steps", 4, "--resume"]) == 0
    assert "continuing with" not in capsys.readouterr().err  # the same flags: nothing to report
    resumed = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    uninterrupted = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"], r["grad_norm"]) for r in resumed if "loss" in r]
    assert losses == [(r["step"], r["loss"], r["grad_norm"]) for r in uninterrupted if "loss" in r]


def test_a_run_stopped_before_its_first_save_resumes_from_the_start(
    full_run, tmp_path, small_config, text_corpus, capsys, monkeypatch
):
    """Ctrl-C before the first checkpoint left a run that --resume refused ("no checkpoint") and a
    plain rerun refused ("not empty"); --resume now starts it over, and the steps equal a whole run's."""
    from dsv4 import train as train_module

    run, _ = full_run
    out = tmp_path / "r"
    args = ["--config", small_config, "--corpus", text_corpus, "--out", out, *RUN, "--steps", 4, "--save-every", 2]
    real_save = train_module.Checkpointer.save

    def interrupted(self, state, force=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module.Checkpointer, "save", interrupted)
    monkeypatch.setattr(cli, "_exit_now", lambda code: None)  # dsv4-train's os._exit would end pytest
    assert train(args) == 130
    assert (out / "run.json").is_file() and not any((out / "checkpoints").iterdir())
    monkeypatch.setattr(train_module.Checkpointer, "save", real_save)
    capsys.readouterr()
    assert train([*args, "--resume"]) == 0
    assert f"no checkpoint in {out / 'checkpoints'} yet; starting at step 0" in capsys.readouterr().err
    resumed = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    uninterrupted = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in resumed if "loss" in r]
    assert losses == [(r["step"], r["loss"]) for r in uninterrupted if "loss" in r]


# --------------------------------------------------------------------------------------- bad input


def test_resume_reports_changed_optimisation_flags(capsys):
    """A --resume may change the schedule or loss weights (e.g. train for more --steps); it says so."""
    cli_train._report_changes({"lr": (0.001, 0.002), "total_steps": (4, 8), "b1": (0.9, 0.8)})
    err = capsys.readouterr().err
    expected = "--lr 0.002 (the run's: 0.001); --steps 8 (the run's: 4); TrainConfig.b1 0.8 (the run's: 0.9)"
    assert err == f"--resume: continuing with {expected}\n"
    cli_train._report_changes({})
    assert capsys.readouterr().err == ""


def _error(capsys, argv) -> str:
    assert train(argv) == 2
    return capsys.readouterr().err


def test_empty_corpus_is_refused(tmp_path, capsys, small_config):
    (tmp_path / "empty.txt").write_text("  \n\n")
    err = _error(capsys, ["--config", small_config, "--corpus", tmp_path / "empty.txt", "--out", tmp_path / "o"])
    assert "empty.txt is empty" in err and not (tmp_path / "o").exists()
    (tmp_path / "d").mkdir()
    err = _error(capsys, ["--config", small_config, "--corpus", tmp_path / "d", "--out", tmp_path / "o"])
    assert "has no .txt/.md/.rst/.text files" in err


def test_vocab_mismatch_is_refused(tmp_path, capsys, small_config, text_corpus):
    corpus.train_bpe_tokenizer(corpus.read_corpus(text_corpus), SMALL.vocab_size + 88, tmp_path / "tok")
    argv = ["--config", small_config, "--corpus", text_corpus, "--tokenizer", tmp_path / "tok", "--out", tmp_path / "o"]
    err = _error(capsys, argv)
    v = SMALL.vocab_size
    assert f"has {v + 88} tokens with ids up to {v + 87}, but the config's vocab_size is {v}" in err


def test_a_tokenizer_id_past_the_vocabulary_is_refused(tmp_path, small_tokenizer):
    """The largest id counts, not the number of tokens: a 512-token tokenizer whose eos has id 900
    passed the check and failed at the first batch holding it (after --out was written)."""
    sparse = tmp_path / "sparse"
    shutil.copytree(small_tokenizer, sparse)
    doc = json.loads((sparse / "tokenizer.json").read_text())
    moved = next(t for t in doc["added_tokens"] if t["id"] == 1)  # the eos token, id 1 -> 900
    moved["id"] = doc["model"]["vocab"][moved["content"]] = 900
    (sparse / "tokenizer.json").write_text(json.dumps(doc))
    tok = load_tokenizer(sparse)
    assert tok.vocab_size <= SMALL.vocab_size and tok.id_limit == 901
    with pytest.raises(CLIError, match=f"ids up to 900, but the config's vocab_size is {SMALL.vocab_size}"):
        cli_train._check_vocab(tok, SMALL, sparse)


def test_too_long_sequence_is_refused(tmp_path, capsys, small_config):
    err = _error(capsys, ["--config", small_config, "--seq-len", 2**21, "--out", tmp_path / "o"])
    assert f"--seq-len {2**21} exceeds max_position_embeddings {SMALL.max_position_embeddings}" in err


def test_a_mesh_that_cannot_shard_the_model_is_refused_before_out(
    tmp_path, capsys, small_config, text_corpus, monkeypatch
):
    """--mesh expert=3 against 8 experts failed inside JAX's sharding after --out was written
    (tokenizer, run.json), naming neither --mesh nor n_routed_experts; a rerun then found --out taken."""
    from jax.sharding import AbstractMesh

    monkeypatch.setattr(cli_train, "parse_mesh", lambda text: AbstractMesh((1, 3, 1), ("data", "expert", "tensor")))
    argv = ["--config", small_config, "--corpus", text_corpus, "--out", tmp_path / "o", "--mesh", "expert=3"]
    err = _error(capsys, [*argv, *RUN])
    assert "--mesh expert=3: the mesh cannot shard this model: n_routed_experts = 8 is not divisible by 3" in err
    assert not (tmp_path / "o").exists()


def test_resume_with_another_config_is_refused(full_run, capsys, text_corpus, tmp_path):
    run, _ = full_run
    other = SMALL.__class__.tiny(num_hidden_layers=2, compress_ratios=(0, 4, 0), num_hash_layers=1, index_topk=4)
    argv = ["--config", other.save(tmp_path / "other.json"), "--corpus", text_corpus, "--out", run, "--resume"]
    err = _error(capsys, [*argv, *RUN, "--steps", 8])
    assert "written for another model config (differs in: compress_ratios)" in err


def test_resume_on_other_data_is_refused(full_run, capsys, small_config, text_corpus, tmp_path):
    """--resume continues on the run's data (OUT/run.json): another corpus text, batch, sequence length,
    seed or held-out fraction is named, and so is a --tokenizer other than the run's; the run is left
    alone. (Each used to be accepted silently, mixing incomparable losses in one metrics.jsonl.)"""
    run, _ = full_run
    record = json.loads((run / cli_train.RUN_RECORD).read_text())
    assert {k: record[k] for k in ("batch", "seq_len", "seed", "heldout_fraction")} == {
        "batch": 2, "seq_len": 32, "seed": 0, "heldout_fraction": 0.05}  # fmt: skip
    other = tmp_path / "other.txt"
    other.write_text(corpus.builtin_corpus()[3])
    base = ["--config", small_config, "--out", run, "--resume", "--steps", 8, "--no-progress", "--eval-windows", 2]
    before = _tree(run)
    err = _error(capsys, [*base, "--corpus", other, "--batch", 3, "--seq-len", 32, "--seed", 7])
    assert "--resume continues" in err and "--batch 3 (the run's: 2)" in err and "--seed 7 (the run's: 0)" in err
    assert f"--corpus {other} (other text than the run's {text_corpus})" in err and "--seq-len" not in err
    err = _error(capsys, [*base, "--corpus", text_corpus, *RUN[:4], "--eval-windows", 16])  # other held-out windows
    assert "--eval-windows 16 (the run's: 2)" in err
    corpus.train_bpe_tokenizer(corpus.builtin_corpus()[:20], SMALL.vocab_size, tmp_path / "tok")
    err = _error(capsys, [*base, "--corpus", text_corpus, *RUN[:4], "--tokenizer", tmp_path / "tok"])
    assert f"--tokenizer {tmp_path / 'tok'}: not the run's tokenizer" in err
    assert _tree(run) == before


def test_resume_from_a_damaged_step_names_it_and_the_step_before(full_run, capsys, small_config, text_corpus, tmp_path):
    """A pytree-structure error before; dsv4-export named the step, and now a resume does too."""
    run = tmp_path / "run"
    shutil.copytree(full_run[0], run)
    (run / "checkpoints" / "4" / "state" / "_METADATA").unlink()
    argv = ["--config", small_config, "--corpus", text_corpus, "--out", run, "--resume", "--steps", 6, *RUN]
    err = _error(capsys, argv)
    assert f"{run / 'checkpoints'}/4: cannot read this training checkpoint step" in err
    assert f"it is damaged or incomplete; remove {run / 'checkpoints' / '4'} to resume from step 2" in err


@pytest.mark.parametrize("text", ['{"batch": 2,', '[1, 2]'])  # the list: an AttributeError traceback before
def test_a_damaged_run_record_is_named(tmp_path, text):
    (tmp_path / cli_train.RUN_RECORD).write_text(text)
    with pytest.raises(CLIError, match=f"--resume: {tmp_path / 'run.json'} is not the JSON record"):
        cli_train._check_resume_data(tmp_path, {"batch": 2})


def test_unwritable_places_are_refused_first(tmp_path, capsys, small_config, text_corpus, full_run):
    """An --out, --export or OUT that cannot be created is one line naming it, before any work (a
    traceback after loading or training before)."""
    (tmp_path / "file").write_text("x")
    argv = ["--config", small_config, "--corpus", text_corpus, *RUN, "--steps", 1]
    err = _error(capsys, [*argv, "--out", tmp_path / "file" / "run"])
    assert f"--out {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is not a directory" in err
    err = _error(capsys, [*argv, "--out", "/proc/dsv4-run"])  # refused even to root
    assert "--out /proc/dsv4-run: cannot write in /proc" in err
    err = _error(capsys, [*argv, "--out", tmp_path / "run", "--export", "/proc/dsv4-export"])
    assert "--export /proc/dsv4-export: cannot write in /proc" in err and not (tmp_path / "run").exists()
    _, export = full_run
    assert cli_export.main([str(export), "/proc/dsv4-export"]) == 2
    assert "dsv4-export: error: OUT /proc/dsv4-export: cannot write in /proc" in capsys.readouterr().err


def test_small_corpus_error_names_the_flag():
    with pytest.raises(corpus.CorpusError, match="--heldout-fraction 0 trains on all of it") as err:
        corpus.split_stream(np.zeros(5_000, np.int32), 0.05)
    assert "one block of 2048 tokens in 20 (held-out fraction 0.05; it needs more than 38,912 tokens)" in str(err.value)


def test_existing_out_is_refused_without_resume_or_overwrite(full_run, capsys, small_config):
    run, _ = full_run
    err = _error(capsys, ["--config", small_config, "--out", run])
    assert "exists and is not empty" in err and (run / "metrics.jsonl").is_file()


# ------------------------------------------------------------------- a refused command changes nothing


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory, text_corpus):
    """A BPE with SMALL's vocabulary, trained on the test corpus."""
    return corpus.train_bpe_tokenizer(corpus.read_corpus(text_corpus), SMALL.vocab_size, tmp_path_factory.mktemp("tok"))


def _tree(root) -> dict:
    """Every path under `root` with its bytes (None for a directory): compares a tree before and after."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _old_run(run) -> None:
    """A stand-in for an earlier run's directory."""
    (run / "checkpoints" / "5").mkdir(parents=True)
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "tokenizer.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n')


# Each fails after a check that used to run once --out was created (or, with --overwrite, deleted):
# options changed from _late_failure's base (None drops one; TINY is a corpus of a few words), the error.
LATE_FAILURES = {
    "heldout-fraction": ({"--heldout-fraction": 0.7}, "--heldout-fraction must be in [0, 0.5], got 0.7"),
    "window-length": ({"--corpus": "TINY", "--heldout-fraction": 0}, "fewer than one window of 33"),
    "vocab": ({"--vocab-size": 300}, f"ids up to {SMALL.vocab_size - 1}, but the config's vocab_size is 300"),
    "bpe": ({"--corpus": "TINY", "--tokenizer": None}, "the corpus is too small for a 512-token vocabulary"),
    "lr": ({"--lr": -1}, "--lr: must be a finite number > 0, got -1.0"),
    "weight-decay": ({"--weight-decay": "nan"}, "--weight-decay: must be a finite number >= 0, got nan"),
    "seed": ({"--seed": -1}, "--seed must be >= 0, got -1"),  # was "expected non-negative integer"
    "time-limit": ({"--time-limit": "nan"}, "--time-limit must be a number of minutes >= 0, got nan"),  # ignored
}


def _late_failure(case, tmp_path, small_config, text_corpus, small_tokenizer) -> tuple[list, str]:
    """argv (less --out) of a command refused only after the corpus is tokenized, and its error."""
    changes, message = LATE_FAILURES[case]
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("far too short to train on")
    options = {"--config": small_config, "--corpus": text_corpus, "--tokenizer": small_tokenizer, "--steps": 1}
    options.update({flag: tiny if value == "TINY" else value for flag, value in changes.items()})
    return [x for flag, value in options.items() if value is not None for x in (flag, value)] + RUN, message


@pytest.mark.parametrize("case", LATE_FAILURES)
def test_failed_overwrite_keeps_the_old_run(case, tmp_path, capsys, small_config, text_corpus, small_tokenizer):
    argv, message = _late_failure(case, tmp_path, small_config, text_corpus, small_tokenizer)
    _old_run(tmp_path / "run")
    before = _tree(tmp_path)
    assert message in _error(capsys, [*argv, "--out", tmp_path / "run", "--overwrite"])
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("case", LATE_FAILURES)
def test_failed_fresh_run_leaves_no_directory(case, tmp_path, capsys, small_config, text_corpus, small_tokenizer):
    argv, message = _late_failure(case, tmp_path, small_config, text_corpus, small_tokenizer)
    (tmp_path / "empty").mkdir()
    before = _tree(tmp_path)
    assert message in _error(capsys, [*argv, "--out", tmp_path / "runs" / "new"])
    assert message in _error(capsys, [*argv, "--out", tmp_path / "empty"])
    assert _tree(tmp_path) == before  # no runs/, no runs/new/tokenizer; empty/ still empty


@pytest.mark.parametrize("export", ["run", "run/release", "."])
@pytest.mark.parametrize("overwrite", [False, True])
def test_export_overlapping_out_is_refused_before_training(
    export, overwrite, tmp_path, capsys, monkeypatch, small_config, text_corpus
):
    def read_corpus(_):
        raise AssertionError("the corpus was read: the refusal came too late")

    monkeypatch.setattr(corpus, "read_corpus", read_corpus)
    if overwrite:
        _old_run(tmp_path / "run")
    before = _tree(tmp_path)
    run, export = tmp_path / "run", tmp_path / export
    argv = ["--config", small_config, "--corpus", text_corpus, "--out", run, "--export", export, *RUN, "--steps", 1]
    err = _error(capsys, [*argv, *(["--overwrite"] if overwrite else [])])
    assert f"--export {export} and --out {run} must be separate directories" in err
    assert _tree(tmp_path) == before


def test_export_onto_other_files_is_refused_before_training(tmp_path, capsys, monkeypatch, small_config, text_corpus):
    """--overwrite replaces only a checkpoint at --export (dsv4.export.check_out_dir); other files
    are refused before the corpus is read, not after training."""

    def read_corpus(_):
        raise AssertionError("the corpus was read: the refusal came too late")

    monkeypatch.setattr(corpus, "read_corpus", read_corpus)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    argv = ["--config", small_config, "--corpus", text_corpus, "--out", tmp_path / "run", *RUN, "--steps", 1]
    err = _error(capsys, [*argv, "--export", tmp_path / "docs", "--overwrite"])
    assert f"--export {tmp_path / 'docs'}: not empty and not a checkpoint" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]


def _paths_args(out, overwrite=True, resume=False):
    return argparse.Namespace(out=Path(out), export=None, init=None, resume=resume, overwrite=overwrite)


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path):
    """--overwrite deleted whatever --out named (a user's files, the corpus being trained on)."""
    mine = tmp_path / "mine"
    (mine / "thesis").mkdir(parents=True)
    (mine / "thesis" / "chapter1.tex").write_text("my only copy")
    (mine / "notes.txt").write_text("the corpus")
    (mine / "checkpoints").mkdir()
    with pytest.raises(CLIError, match="holds files a dsv4-train run does not write \\(notes.txt, thesis\\)"):
        cli_train._check_paths(_paths_args(mine))
    only_metrics = tmp_path / "metrics-only"
    only_metrics.mkdir()
    (only_metrics / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(CLIError, match="is not a dsv4-train run directory"):
        cli_train._check_paths(_paths_args(only_metrics))
    _old_run(tmp_path / "run")
    cli_train._check_paths(_paths_args(tmp_path / "run"))  # a run's own entries only: replaceable


def test_out_may_be_the_current_directory_when_empty(tmp_path, monkeypatch, small_tokenizer):
    """`--out .` in an empty directory: OUT was renamed away (EBUSY, or the process lost its
    current directory). It is filled in place now; replacing a run there is refused."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    args = _paths_args(".", overwrite=False)
    cli_train._check_paths(args)
    assert args.out == here
    cli_train._install_out(args, small_tokenizer, {"batch": 2})
    assert Path.cwd() == here and sorted(p.name for p in here.iterdir()) == ["run.json", "tokenizer"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]  # no staging directory left
    with pytest.raises(CLIError, match="holds the current directory, which it cannot replace"):
        cli_train._check_paths(_paths_args(".", overwrite=True))
    monkeypatch.chdir(tmp_path)
    cli_train._check_paths(_paths_args("here", overwrite=True))  # from elsewhere it may


def test_overwrite_replaces_the_old_run_whole(tmp_path, small_tokenizer):
    """Once the checks pass, --overwrite swaps in a new OUT holding only tokenizer/ and run.json (no old
    files, no leftovers)."""
    _old_run(tmp_path / "run")
    args = argparse.Namespace(out=tmp_path / "run", resume=False, overwrite=True)
    assert cli_train._install_out(args, small_tokenizer, {"batch": 2}) == tmp_path / "run" / "tokenizer"
    copied = {f"run/tokenizer/{name}": data for name, data in _tree(small_tokenizer).items()}
    record = {"run/run.json": b'{\n "batch": 2\n}\n'}
    assert _tree(tmp_path) == {"run": None, "run/tokenizer": None, **copied, **record}


@pytest.mark.parametrize("n_windows", [1, 3, 4, 10])
def test_heldout_evaluation_counts_every_window_once_in_one_shape(n_windows):
    """The last, shorter chunk is padded at weight 0: 10 windows at batch 4 count 10, not 8."""
    seq = 5
    windows = np.repeat(np.arange(n_windows)[:, None], seq + 1, axis=1)  # window i: loss i per token
    shapes = set()

    def loss_sum(params, frozen, tokens, real):
        shapes.add(tokens.shape)
        return float(np.sum(tokens[:, 0] * real) * seq)

    state = SimpleNamespace(params=None, frozen=None)
    assert cli_train.evaluate(loss_sum, state, windows, batch=4) == pytest.approx(np.mean(np.arange(n_windows)))
    assert shapes == {(4, seq + 1)}


def test_heldout_loss_of_the_real_model_is_the_mean_over_windows():
    """`_eval_fn`'s masked sum: 3 windows at batch 2 (the second chunk padded) give the mean of the
    three windows' own next-token losses."""
    from dsv4 import train

    model = dsv4.init_model(SMALL, dsv4.RuntimeConfig(dtype="float32", train_stats=True, query_block=16), seed=0)
    graphdef, params, frozen = train.split_model(model)
    state = SimpleNamespace(params=params, frozen=frozen)
    windows = np.random.default_rng(0).integers(0, SMALL.vocab_size, (3, 17)).astype(np.int32)
    tc = train.TrainConfig(mtp_weight=0.0, indexer_weight=0.0, compute_dtype="float32")
    each = [float(train.loss_fn(graphdef, tc, params, frozen, {"tokens": w[None]})[1]["lm_loss"]) for w in windows]
    got = cli_train.evaluate(cli_train._eval_fn(graphdef), state, windows, batch=2)
    assert abs(got - np.mean(each)) <= 1e-5 * np.mean(each)
    assert abs(got - np.mean(each[:2])) > 1e-3  # what dropping the short chunk gave


# ------------------------------------------------------------------------------- fine-tuning (--init)

EMBEDDED = cli.default_checkpoint_dir()


@pytest.fixture(scope="module")
def init_run(tmp_path_factory, text_corpus):
    """Two steps of fine-tuning the embedded default (`--init embedded`), exported."""
    root = tmp_path_factory.mktemp("init")
    argv = ["--init", "embedded", "--corpus", text_corpus, "--out", root / "run", "--steps", 2, "--lr", 3e-4]
    assert train([*argv, *RUN, "--eval-every", 2, "--save-every", 2, "--export", root / "export"]) == 0
    return root / "run", root / "export"


def test_init_starts_from_the_checkpoints_weights_and_tokenizer(init_run, text_corpus):
    """The first step's loss is the embedded model's own loss on the first batch (its weights, its
    tokenizer), far below a random model's ln(vocab); the export keeps the checkpoint's config."""
    from dsv4 import train as train_module

    run, export = init_run
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == (EMBEDDED / "tokenizer.json").read_bytes()
    assert json.loads((run / "run.json").read_text())["init"] == "embedded"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "heldout_loss" in r] == [0, 2]  # the starting weights evaluated too
    first = next(r for r in records if "lm_loss" in r)

    tokens = corpus.encode_documents(load_tokenizer(EMBEDDED), corpus.read_corpus(text_corpus))
    batch = corpus.sample_batch(corpus.split_stream(tokens, 0.05)[0], 2, 32, 0, 0)  # --batch 2 --seq-len 32 --seed 0
    model = train_module.training_model(dsv4.load_hf(EMBEDDED, dtype="float32"), remat=False)
    graphdef, params, frozen = train_module.split_model(model)
    tc = train_module.TrainConfig(mtp_weight=0.3, indexer_weight=1.0, compute_dtype="float32")  # the CLI's
    expected = train_module.loss_fn(graphdef, tc, params, frozen, {"tokens": batch})[1]
    for key in ("lm_loss", "mtp_loss", "indexer_loss"):  # the main model, the MTP block, the indexers
        assert abs(first[key] - float(expected[key])) <= 2e-6 * float(expected[key]), key  # measured <= 2.2e-7
    assert float(expected["lm_loss"]) < 0.6 * np.log(model.cfg.vocab_size)  # the trained model, not random weights

    exported = dsv4.load_hf(export, dtype="float32")
    assert exported.cfg == dsv4.ModelConfig.from_hf_config(EMBEDDED)


def test_init_from_a_converted_checkpoint_loads_the_same_weights(tmp_path, capsys):
    """A dense dsv4-convert checkpoint starts from the release directory's weights exactly; one that
    keeps FP8/FP4 weights quantized is refused (training cannot update them), naming --keep-quantized."""
    from dsv4 import cli_convert

    assert cli_convert.main([str(EMBEDDED), str(tmp_path / "dense"), "--dtype", "float32", "--no-progress"]) == 0
    assert cli_convert.main([str(EMBEDDED), str(tmp_path / "kept"), "--keep-quantized", "--no-progress"]) == 0
    models = []
    for init in (EMBEDDED, tmp_path / "dense"):
        args = cli_train.train_parser().parse_args(["--init", str(init), "--out", str(tmp_path / "o")])
        models.append(cli_train._initial_model(args, cli_train.model_config(args), None))
    flat = [dict(nnx_flat(m)) for m in [*models, dsv4.load_hf(EMBEDDED, dtype="float32")]]
    assert flat[0].keys() == flat[1].keys() == flat[2].keys()
    for name, value in flat[0].items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat[1][name]), err_msg=name)
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat[2][name]), err_msg=name)

    err = _error(capsys, ["--init", tmp_path / "kept", "--out", tmp_path / "o"])
    assert "--keep-quantized checkpoint (FP8/FP4 weights kept quantized)" in err and not (tmp_path / "o").exists()


def nnx_flat(model):
    from flax import nnx

    return [(".".join(map(str, path)), var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model))]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config", "tiny"], "--config cannot be given with --init embedded: the model is its config.json's"),
        (["--vocab-size", "300"], "--vocab-size cannot be given with --init embedded"),
    ],
)
def test_init_beside_another_model_choice_is_refused(extra, message, tmp_path, capsys):
    err = _error(capsys, ["--init", "embedded", *extra, "--out", tmp_path / "o"])
    assert message in err and not (tmp_path / "o").exists()


def test_init_that_is_not_a_checkpoint_is_refused(tmp_path, capsys):
    err = _error(capsys, ["--init", tmp_path / "missing", "--out", tmp_path / "o"])
    assert f"--init {tmp_path / 'missing'}: not a directory" in err
    (tmp_path / "cfg").mkdir()
    shutil.copy(EMBEDDED / "config.json", tmp_path / "cfg")
    err = _error(capsys, ["--init", tmp_path / "cfg", "--out", tmp_path / "o"])
    assert f"--init {tmp_path / 'cfg'}: not a checkpoint" in err and not (tmp_path / "o").exists()


def _embedded_copy(where: Path, tokenizer: bool = True) -> Path:
    shutil.copytree(EMBEDDED, where, ignore=None if tokenizer else shutil.ignore_patterns("tokenizer*"))
    return where


def test_init_without_a_tokenizer_needs_one(tmp_path, capsys, text_corpus, small_tokenizer):
    init = _embedded_copy(tmp_path / "ckpt", tokenizer=False)
    err = _error(capsys, ["--init", init, "--corpus", text_corpus, "--out", tmp_path / "o", *RUN])
    assert f"--init {init} has no tokenizer.json: give the tokenizer its weights were trained with (--tokenizer)" in err
    assert not (tmp_path / "o").exists()
    # a tokenizer too large for the checkpoint's vocabulary is the usual vocabulary error
    big = corpus.train_bpe_tokenizer(corpus.read_corpus(text_corpus), 4096, tmp_path / "big")
    err = _error(capsys, ["--init", init, "--tokenizer", big, "--corpus", text_corpus, "--out", tmp_path / "o", *RUN])
    assert "but the config's vocab_size is 2560" in err and "(a --tokenizer whose ids fit the checkpoint's)" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_damaged_init_checkpoint_changes_nothing(overwrite, tmp_path, capsys, text_corpus):
    """The weights are read before OUT is made: a truncated shard is named, and a new OUT is not
    created, nor an old run replaced."""
    init = _embedded_copy(tmp_path / "ckpt")
    shard = init / "model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    out = tmp_path / "run"
    if overwrite:
        _old_run(out)
    before = _tree(tmp_path)
    argv = ["--init", init, "--corpus", text_corpus, "--out", out, *RUN] + (["--overwrite"] if overwrite else [])
    err = _error(capsys, argv)
    assert "model-00001-of-00001.safetensors" in err
    assert _tree(tmp_path) == before


def test_resume_with_another_init_is_refused(full_run, init_run, capsys, text_corpus):
    """run.json records --init: a run from random weights does not continue from the embedded
    checkpoint's, nor the reverse."""
    run, _ = full_run
    err = _error(capsys, ["--init", "embedded", "--corpus", text_corpus, "--out", run, "--resume", *RUN, "--steps", 8])
    assert "--init embedded (the run's: none, random weights)" in err
    run, _ = init_run
    err = _error(capsys, ["--corpus", text_corpus, "--out", run, "--resume", *RUN, "--steps", 8])
    assert "--init (none) (the run's: embedded)" in err


def test_init_on_a_mesh_equals_one_device(init_run, text_corpus, tmp_path):
    """`--init embedded --mesh data=2,expert=4` on 8 host devices (a subprocess: this process holds
    a one-device JAX) loads the weights into their shards and takes the one-device run's first step."""
    import os
    import subprocess
    import sys

    run, _ = init_run
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    argv = ["--init", "embedded", "--corpus", text_corpus, "--out", tmp_path / "r", "--steps", 1, "--lr", 3e-4]
    argv += [*RUN, "--mesh", "data=2,expert=4", "--eval-every", 1]
    cmd = [sys.executable, "-m", "dsv4.cli_train", *map(str, argv)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    def first_step(path):
        return next(json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines() if "lm_loss" in x)

    sharded, single = first_step(tmp_path / "r"), first_step(run)
    for key in ("lm_loss", "mtp_loss", "indexer_loss", "grad_norm"):
        assert abs(sharded[key] - single[key]) <= 2e-6 * abs(single[key]), key  # measured <= 4.4e-7

    placed = (  # where _initial_model puts the routed experts of the last layer under that mesh
        "from dsv4 import cli_train; args = cli_train.train_parser().parse_args("
        "['--init', 'embedded', '--out', 'unused', '--mesh', 'data=2,expert=4', '--batch', '2']); "
        "cfg = cli_train.model_config(args); model = cli_train._initial_model(args, cfg, cli_train._mesh(args, cfg)); "
        "w = model.layers[-1].ffn.experts.w1.get_value(); "
        "print(w.shape[0], sorted({s.data.shape[0] for s in w.addressable_shards}))"
    )
    proc = subprocess.run([sys.executable, "-c", placed], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split("\n")[-2] == "8 [2]", proc.stdout  # 8 experts, 2 per device on an expert axis of 4


def test_an_init_run_resumes_exactly(init_run, text_corpus, tmp_path):
    """Stopped after step 1 (saved), then resumed: the steps equal the uninterrupted run's. The resume
    keeps OUT/tokenizer without --tokenizer being repeated, and takes the embedded checkpoint spelled
    as its path for `embedded`."""
    run, _ = init_run
    base = ["--corpus", text_corpus, "--out", tmp_path / "r", "--lr", 3e-4, *RUN, "--eval-every", 2]
    assert train(["--init", "embedded", "--tokenizer", EMBEDDED, *base, "--steps", 2, "--time-limit", 0]) == 0
    assert train(["--init", EMBEDDED, *base, "--steps", 2, "--resume"]) == 0

    def steps(path):
        records = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["grad_norm"]) for r in records if "loss" in r]

    assert steps(tmp_path / "r") == steps(run) and len(steps(run)) == 2


def test_an_init_run_resumes_without_its_init_directory(init_run, text_corpus, tmp_path):
    """The resume reads the model config from the run's checkpoints: the --init copy, removed after
    the first step was saved, is not needed to continue, and the steps equal the uninterrupted run's."""
    run, _ = init_run
    init = _embedded_copy(tmp_path / "ckpt")
    argv = ["--init", init, "--corpus", text_corpus, "--out", tmp_path / "r", "--lr", 3e-4, *RUN, "--eval-every", 2]
    assert train([*argv, "--steps", 2, "--time-limit", 0]) == 0
    shutil.rmtree(init)
    assert train([*argv, "--steps", 2, "--resume"]) == 0

    def steps(path):
        records = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["grad_norm"]) for r in records if "loss" in r]

    assert steps(tmp_path / "r") == steps(run) and len(steps(run)) == 2


def test_out_or_export_overlapping_init_is_refused(tmp_path, capsys, text_corpus):
    init = _embedded_copy(tmp_path / "ckpt")
    before = _tree(tmp_path)
    for option, path in (("--export", init), ("--export", init / "sub"), ("--out", init / "run")):
        argv = ["--init", init, "--corpus", text_corpus, "--out", tmp_path / "o", *RUN, option, path, "--overwrite"]
        err = _error(capsys, argv)
        assert f"{option} {path} and --init {init} must be separate directories" in err
    assert _tree(tmp_path) == before


def test_a_run_starting_over_keeps_no_old_metrics(tmp_path):
    """A --resume with nothing saved starts at step 0: its step-0 evaluation is not written twice."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "heldout_loss": 4.0}\n{"step": 1, "loss": 3.0}\n')
    assert cli_train.MetricsLog(path, 0).records == [] and path.read_text() == ""
    path.write_text('{"step": 0, "heldout_loss": 4.0}\n{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n')
    assert [r["step"] for r in cli_train.MetricsLog(path, 1).records] == [0, 1]


def test_freeze_keeps_the_init_checkpoints_experts(tmp_path, text_corpus, capsys):
    """--init embedded --freeze 'layers.*.ffn.experts.*': one step later, dsv4-export of the run holds
    the checkpoint's routed experts unchanged (the same FP4 values) and other weights moved."""
    out = tmp_path / "r"
    argv = ["--init", "embedded", "--freeze", "layers.*.ffn.experts.*", "--corpus", text_corpus, "--out", out]
    assert train([*argv, "--steps", 1, "--lr", 1e-3, *RUN, "--save-every", 1, "--eval-every", 1]) == 0
    assert "more frozen by --freeze" in capsys.readouterr().err
    assert cli_export.main([str(out), str(tmp_path / "export")]) == 0  # the frozen layout read back from meta
    before = dict(nnx_flat(dsv4.load_hf(EMBEDDED, dtype="float32")))
    after = dict(nnx_flat(dsv4.load_hf(tmp_path / "export", dtype="float32")))
    experts = [n for n in before if ".ffn.experts." in n and n.startswith("layers.")]
    assert len(experts) == 3 * 6
    for name in experts:
        np.testing.assert_array_equal(np.asarray(after[name]), np.asarray(before[name]), err_msg=name)
    moved = "layers.0.attn.wq_b.weight"
    assert not np.array_equal(np.asarray(after[moved]), np.asarray(before[moved]))
    err = _error(capsys, [*argv[:2], *argv[4:], "--resume", "--steps", 2, *RUN])  # without its --freeze
    assert "trained with freeze ['layers.*.ffn.experts.*'], not [] (18 parameter(s) differ, e.g. layers." in err
    assert "a resume needs the run's frozen parameters" in err


def test_a_freeze_pattern_that_matches_nothing_is_refused(tmp_path, capsys, text_corpus):
    argv = ["--init", "embedded", "--freeze", "layers.*.expert.*", "--corpus", text_corpus, "--out", tmp_path / "o"]
    err = _error(capsys, [*argv, *RUN])
    assert "--freeze: pattern 'layers.*.expert.*' matches no parameter" in err
    assert not (tmp_path / "o").exists()
