"""dsv4-multihost's user errors: one line `dsv4-multihost: error: ...` and exit status 2, before loading.

Each bad input (prompts file, checkpoint, flag, --output) is run through `sharding.serve.main` in
this process against the packaged default checkpoint, with `dsv4.cli.load_model` replaced by a
function that fails the test: every check must happen before the weights are read. Also: text
prompts get BOS as in dsv4-generate (`--no-bos` leaves it out), and the results file is written
atomically. Two subprocess runs check the real exit status and a whole successful run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "dsv4" / "default_checkpoint"  # release layout, tokenizer.json, vocabulary 2560


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    """run(args, prompts=text) -> (exit status, stderr) of main() on DEFAULT, without loading weights."""
    import dsv4.cli
    from sharding.mesh import CLUSTER_MARKERS
    from sharding.serve import main

    for var in ("DSV4_COORDINATOR", "DSV4_NUM_PROCESSES", "DSV4_PROCESS_ID", *CLUSTER_MARKERS):
        monkeypatch.delenv(var, raising=False)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(dsv4.cli, "load_model", no_load)

    def _run(args: list[str], prompts: str | None = '{"id": "a", "tokens": [0, 17, 42]}\n'):
        """args: flag-value pairs; they replace the defaults of --checkpoint, --prompts and --output."""
        path = tmp_path / "p.jsonl"
        if prompts is not None:
            path.write_text(prompts)
        flags = {"--checkpoint": str(DEFAULT), "--prompts": str(path), "--output": str(tmp_path / "out.jsonl"),
                 "--max-new-tokens": "2"}  # fmt: skip
        flags.update(zip(args[::2], args[1::2], strict=True))
        rc = main([x for kv in flags.items() for x in kv])
        return rc, capsys.readouterr().err

    return _run


def _one_error(err: str) -> str:
    """The single `dsv4-multihost: error: ...` line of stderr (no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dsv4-multihost: error: "), err
    return lines[0]


def test_missing_prompts_file(run, tmp_path):
    missing = tmp_path / "missing.jsonl"
    rc, err = run(["--prompts", str(missing)], prompts=None)
    assert rc == 2 and f"--prompts {missing}: no such file" in _one_error(err)


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ("\n  \n", "p.jsonl: no prompts"),
        ('{"id": "a", "text": "Hello"\n', "p.jsonl:1: not valid JSON: Expecting ',' delimiter (column 28)"),
        ('{"tokens": [1]}\n\n{"tokens": [0, 99999]}\n',
         "p.jsonl:3: 'tokens', position 1: token id 99999 is outside the vocabulary [0, 2560)"),
        ('{"tokens": [1]}\n[1, 2]\n', "p.jsonl:2: expected a JSON object"),
        ('{"tokens": ["7"]}\n', "p.jsonl:1: 'tokens', position 0: token ids must be integers, got '7'"),
        ('{"tokens": []}\n', "p.jsonl:1: 'tokens' is empty"),
        ('{"tokens": 5}\n', "p.jsonl:1: 'tokens' must be a list of token ids, got int"),
        ('{"text": 5}\n', "p.jsonl:1: 'text' must be a string, got int"),
        ('{"id": "a"}\n', "p.jsonl:1: each line needs 'tokens' or 'text'"),
    ],
)  # fmt: skip
def test_bad_prompts_file_names_the_line(run, prompts, message):
    rc, err = run([], prompts=prompts)
    assert rc == 2 and message in _one_error(err)


def test_missing_checkpoint_is_named_not_the_prompts(run):
    rc, err = run(["--checkpoint", "/nonexistent"], prompts='{"id": "a", "text": "Hello"}\n')
    assert rc == 2
    assert _one_error(err) == "dsv4-multihost: error: /nonexistent: not a directory (expected a checkpoint directory)"


def test_text_prompt_without_tokenizer_names_the_checkpoint(run, tmp_path):
    ckpt = tmp_path / "no_tokenizer"
    ckpt.mkdir()
    shutil.copy(DEFAULT / "config.json", ckpt / "config.json")
    (ckpt / "model.safetensors").write_bytes(b"")
    rc, err = run(["--checkpoint", str(ckpt)], prompts='{"id": "a", "text": "Hello"}\n')
    assert rc == 2 and f"p.jsonl:1: each line needs a 'tokens' list: 'text' prompts need tokenizer.json, " \
        f"and {ckpt} has none" in _one_error(err)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "bogus"], "--strategy: unknown sharding strategy 'bogus'; known: ['dp_ep', "),
        (["--top-p", "2"], "top_p must be in (0, 1] (1 = off), got 2.0"),
        (["--temperature", "-1"], "temperature must be finite and >= 0"),
        (["--top-k", "-3"], "top_k must be an integer in [0, 2147483647] (0 = off), got -3"),
        (["--coordinator", "nohost"], "coordinator must be host:port, got 'nohost'"),
        (["--seed", str(2**64)], "--seed: seed must be an integer in [0, 2**32), got 18446744073709551616"),
    ],
)
def test_bad_flags(run, args, message):
    rc, err = run(args)
    assert rc == 2 and message in _one_error(err)


def test_max_new_tokens_checked_against_the_config(run):
    rc, err = run(["--max-new-tokens", "-1"])
    assert rc == 2 and "max_new_tokens must be an integer >= 0, got -1" in _one_error(err)
    rc, err = run(["--max-new-tokens", "100000000"])
    assert rc == 2 and "max_position_embeddings" in _one_error(err)


def test_output_in_a_missing_directory_is_found_before_loading(run, tmp_path):
    out = tmp_path / "nodir" / "out.jsonl"
    rc, err = run(["--output", str(out)])
    assert rc == 2
    assert f"--output {out}: cannot write in {out.parent}: No such file or directory" in _one_error(err)
    assert not out.parent.exists()


@pytest.mark.parametrize("cluster", [["--process-id", "0"], ["--num-processes", "1"]], ids=["process_0", "alone"])
def test_output_is_checked_before_joining_the_cluster(run, tmp_path, monkeypatch, cluster):
    """Process 0 (its id given) refuses a bad --output before it joins: the other processes are
    not left waiting in the cluster for a process that already stopped."""
    import sharding.mesh

    def no_join(*args, **kwargs):
        raise AssertionError("joined the cluster before checking --output")

    monkeypatch.setattr(sharding.mesh, "initialize_distributed", no_join)
    if cluster[0] == "--process-id":
        cluster = [*cluster, "--num-processes", "2", "--coordinator", "localhost:1"]
    rc, err = run(["--output", str(tmp_path / "nodir" / "out.jsonl"), *cluster])
    assert rc == 2 and "cannot write in" in _one_error(err)


def test_output_that_is_a_directory(run, tmp_path):
    rc, err = run(["--output", str(tmp_path)])
    assert rc == 2 and f"--output {tmp_path}: is a directory" in _one_error(err)


# ------------------------------------------------------------------------------------------ BOS


def test_text_prompts_get_bos_as_in_dsv4_generate(tmp_path):
    from dsv4.cli import _prompt_ids, generate_parser
    from sharding.serve import check_request, parse_args

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "text": "Hello"}\n')

    def serve_ids(*flags: str) -> list[int]:
        args = parse_args(["--checkpoint", str(DEFAULT), "--prompts", str(prompts), "--output", "o", *flags])
        return check_request(args).prompts[0]

    def generate_ids(*flags: str) -> list[int]:
        ids, _ = _prompt_ids(generate_parser().parse_args(["--prompt", "Hello", *flags]), DEFAULT)
        return ids

    with_bos, without = serve_ids(), serve_ids("--no-bos")
    assert with_bos == generate_ids() and without == generate_ids("--no-bos")
    assert with_bos == [with_bos[0], *without] and with_bos[0] != without[0]


def test_read_prompts_adds_bos_by_default(tmp_path):
    from dsv4.tokenizer import load_tokenizer
    from sharding.serve import read_prompts

    tok = load_tokenizer(DEFAULT)
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "Hello"}\n{"tokens": [5, 6]}\n')
    assert read_prompts(path, tok) == ([0, 1], [[tok.bos_id, *tok.encode("Hello", add_bos=False)], [5, 6]])
    assert read_prompts(path, tok, add_bos=False)[1][0] == tok.encode("Hello", add_bos=False)


# ------------------------------------------------------------------------------------ atomic output


def test_results_are_written_atomically(tmp_path, monkeypatch):
    from dsv4.cli import CLIError
    from sharding import serve

    out = tmp_path / "out.jsonl"
    serve._write(out, ["a", "b"], [[1, 2], [3]], None)
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"id": "a", "tokens": [1, 2]},
        {"id": "b", "tokens": [3]},
    ]
    assert os.listdir(tmp_path) == ["out.jsonl"]

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(CLIError, match=f"--output {out}: cannot write: No space left on device"):
        serve._write(out, ["c"], [[9]], None)
    assert json.loads(out.read_text().splitlines()[0]) == {"id": "a", "tokens": [1, 2]}  # the old file intact
    assert os.listdir(tmp_path) == ["out.jsonl"]  # no temporary file left


# ---------------------------------------------------------------------------------------- subprocesses


def _serve(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for var in ("DSV4_COORDINATOR", "DSV4_NUM_PROCESSES", "DSV4_PROCESS_ID"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "sharding.serve", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_console_script_exit_status_and_a_whole_run(tmp_path):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    proc = _serve(["--checkpoint", str(DEFAULT), "--prompts", str(prompts), "--output", str(out)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"dsv4-multihost: error: --prompts {prompts}: no such file" in proc.stderr
    assert "Traceback" not in proc.stderr
    prompts.write_text('{"id": "a", "text": "Hello"}\n{"id": "b", "tokens": [0, 17, 42]}\n')
    proc = _serve(["--checkpoint", str(DEFAULT), "--prompts", str(prompts), "--output", str(out),
                   "--max-new-tokens", "2", "--dtype", "float32"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"] and all(1 <= len(r["tokens"]) <= 2 for r in rows)
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "p.jsonl"]  # no temporary file left
