"""Tokenizer and chat layout, the embedded default checkpoint, and the dsv4-generate / dsv4-info CLIs."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dsv4
from dsv4 import cache as kv_cache
from dsv4 import cli, restore
from dsv4.config import ModelConfig
from dsv4.safetensors_io import CheckpointIndex
from dsv4.tokenizer import SPECIAL_TOKENS, TokenizerError, format_chat, load_tokenizer

DEFAULT = cli.default_checkpoint_dir()


# ------------------------------------------------------------------------------------ chat layout


def test_chat_layouts_literal():
    user = [{"role": "user", "content": "Hi"}]
    assert format_chat(user) == "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>"
    assert format_chat(user, thinking=True) == "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think>"
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add"},
        {"role": "user", "content": "3+3?"},
    ]
    assert format_chat(convo, thinking=True) == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>2+2?<｜Assistant｜></think>4<｜end▁of▁sentence｜>"
        "<｜User｜>3+3?<｜Assistant｜><think>"
    )  # earlier reasoning dropped
    assert format_chat(convo, thinking=True, drop_thinking=False) == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>2+2?<｜Assistant｜><think>add</think>4<｜end▁of▁sentence｜>"
        "<｜User｜>3+3?<｜Assistant｜><think>"
    )
    finished = format_chat(convo[:3])  # ends with an assistant turn: finished, no generation prompt
    assert finished.endswith("<｜Assistant｜></think>4<｜end▁of▁sentence｜>")


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "assistant", "content": "x"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
        [{"role": "tool", "content": "a"}],
        [{"role": "user", "content": 3}],
    ],
)
def test_bad_conversations_are_refused(messages):
    with pytest.raises(ValueError, match="format_chat"):
        format_chat(messages)


# -------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEFAULT)


def test_special_tokens_and_chat_encoding(tok):
    assert [tok.token_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert (tok.bos_id, tok.eos_id, tok.add_bos_token) == (0, 1, False)
    ids = tok.encode(format_chat([{"role": "user", "content": "Hello there"}]))
    assert ids[:2] == [0, 2] and ids[-2:] == [3, 5]  # BOS User ... Assistant </think>
    assert tok.decode(ids) == format_chat([{"role": "user", "content": "Hello there"}])


def test_encode_decode_round_trip_and_bos(tok):
    text = "def f(x):\n    return x  # héllo → 日本 😀"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and ids[0] != tok.bos_id
    assert tok.encode(text, add_bos=True) == [tok.bos_id] + ids
    assert tok.vocab_size == ModelConfig.from_hf_config(DEFAULT).vocab_size


def test_stream_decoder_never_splits_a_character(tok):
    text = "a → 日本 😀!"
    ids = tok.encode(text)
    stream = tok.stream()
    pieces = [stream.push([i]) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_missing_tokenizer_names_the_directory(tmp_path):
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path)) + ".*no tokenizer.json"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------- default checkpoint


def test_default_checkpoint_is_small_complete_and_quantized_as_released():
    files = [p for p in DEFAULT.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 5 * 2**20
    cfg = ModelConfig.from_hf_config(DEFAULT)
    assert set(cfg.layer_kinds) == {"sliding", "csa", "hca"}
    assert 0 < cfg.num_hash_layers < cfg.num_hidden_layers  # hash and top-k routers
    assert cfg.hc_mult == 4 and cfg.num_mtp_layers == 1 and cfg.expert_dtype == "fp4"
    index = CheckpointIndex(DEFAULT)
    dtypes = {index.info(n).dtype for n in index.names()}
    assert dtypes == {"F8_E4M3", "F8_E8M0", "I8", "BF16", "F32", "I64"}
    assert index.info("layers.1.attn.wq_b.weight").dtype == "F8_E4M3"
    assert index.info("mtp.0.ffn.experts.0.w1.weight").dtype == "I8"
    model = dsv4.load_hf(DEFAULT, dtype="float32")
    assert model.cfg == cfg


def _script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts/make_default_checkpoint.py"
    spec = importlib.util.spec_from_file_location("make_default_checkpoint", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_default_checkpoint_follows_its_recipe(tmp_path):
    """Architecture, tokenizer and recorded command are what scripts/make_default_checkpoint.py uses."""
    from dsv4 import cli_train, corpus

    script = _script()
    assert ModelConfig.from_hf_config(DEFAULT) == cli_train.embedded_config()
    record = json.loads((DEFAULT / "training.json").read_text())
    assert record["command"] == "dsv4-train " + " ".join(script.RECIPE)
    assert record["wall_seconds"] <= 30 * 60
    corpus.train_bpe_tokenizer(corpus.builtin_corpus(), cli_train.EMBEDDED_VOCAB, tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (DEFAULT / "tokenizer.json").read_bytes()
    assert (DEFAULT / "loss.png").read_bytes()[:4] == b"\x89PNG"


def _heldout_perplexity(model, tok) -> float:
    """exp(mean next-token loss) on the held-out windows dsv4-train evaluates (5% of pydoc, 16 x 257)."""
    from dsv4 import corpus

    _, heldout = corpus.split_stream(corpus.encode_documents(tok, corpus.builtin_corpus()), 0.05)
    windows = corpus.eval_windows(heldout, 256, 16)
    losses = []
    for chunk in np.split(windows, 2):
        logits = np.asarray(dsv4.forward(model, chunk[:, :-1]), np.float64)  # jitted: eager takes ~7 s a call
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        target = np.take_along_axis(logits, chunk[:, 1:, None], axis=-1)[..., 0]
        losses.append(np.mean(logz - target))
    return float(np.exp(np.mean(losses)))


def _english_fraction(text: str, words: set[str]) -> float:
    found = re.findall(r"[A-Za-z]{2,}", text)
    return sum(w.lower() in words for w in found) / max(len(found), 1)


def test_default_checkpoint_is_trained():
    """Held-out perplexity far below a random model's, and a greedy continuation made of real words."""
    from dsv4 import cli_train, corpus
    from dsv4.config import RuntimeConfig

    tok = load_tokenizer(DEFAULT)
    record = json.loads((DEFAULT / "training.json").read_text())
    trained = dsv4.load_hf(DEFAULT, dtype="float32")
    ppl = _heldout_perplexity(trained, tok)
    # the shipped weights are the FP8/FP4 rounding of the trained ones: perplexity moves a little
    # (99.27 vs the recorded 98.47: +0.8%)
    assert ppl == pytest.approx(record["heldout_perplexity"], rel=0.02)
    random_model = dsv4.init_model(cli_train.embedded_config(), RuntimeConfig(dtype="float32"), seed=0)
    # at least 10x better than a uniform guess; the negative control (random weights) is worse than uniform
    assert ppl < trained.cfg.vocab_size / 10 < _heldout_perplexity(random_model, tok)

    words = {w.lower() for doc in corpus.builtin_corpus() for w in re.findall(r"[A-Za-z]{2,}", doc)}
    prompt = tok.encode("Hello", add_bos=True)  # as dsv4-generate --prompt does
    text = tok.decode(dsv4.generate(trained, [prompt], max_new_tokens=40)[0], skip_special_tokens=True)
    noise = tok.decode(dsv4.generate(random_model, [prompt], max_new_tokens=40)[0], skip_special_tokens=True)
    assert _english_fraction(text, words) >= 0.8 > _english_fraction(noise, words), (text, noise)


# --------------------------------------------------------------------------------- dsv4-generate

SUMMARY = re.compile(
    r"^\[prefill (\d+) tokens: [\d,.]+ tokens/s \| decode (\d+) tokens: [\d,.]+ tokens/s \| "
    r"cache ([\d,]+) bytes \((\w+)\) \| compile [\d.]+ s\]$"
)


def _run_generate(capsys, *argv):
    code = cli.generate_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_default_checkpoint_streams_text_and_reports(capsys):
    code, out, err = _run_generate(capsys, "--prompt", "Hello", "--max-new-tokens", "6", "--dtype", "float32")
    assert code == 0, err
    lines = out.rstrip("\n").split("\n")
    assert out.startswith("Hello")
    m = SUMMARY.match(lines[-1])
    assert m, lines[-1]
    n_prompt = len(load_tokenizer(DEFAULT).encode("Hello", add_bos=True))
    assert (int(m.group(1)), int(m.group(2)), m.group(4)) == (n_prompt, 5, "bfloat16")  # token 0 + 5 steps
    expected_bytes = kv_cache.cache_bytes(ModelConfig.from_hf_config(DEFAULT), 1, 128)  # n_prompt + 6, rounded
    assert int(m.group(3).replace(",", "")) == expected_bytes


def test_generate_speculative_prints_the_greedy_text(capsys):
    argv = ["--prompt", "The list", "--max-new-tokens", "12", "--dtype", "float32", "--cache-format", "float32"]
    code, plain, err = _run_generate(capsys, *argv)
    assert code == 0, err
    code, spec, err = _run_generate(capsys, *argv, "--speculative")
    assert code == 0, err
    *text, summary = spec.rstrip("\n").split("\n")
    assert "\n".join(text) == "\n".join(plain.rstrip("\n").split("\n")[:-1])  # the same text
    m = re.fullmatch(r"\[speculative: 11 tokens after the first in (\d+) steps \| guesses kept (\d+)/(\d+) \| "
                     r"decode [\d,.]+ tokens/s \| compile [\d.]+ s\]", summary)  # fmt: skip
    assert m, summary
    steps, kept, guessed = map(int, m.groups())
    # each step makes one token, two when its guess is kept; the last step may make one more than asked for
    assert guessed == steps and 11 <= steps + kept <= 12


def test_the_stop_token_is_not_printed_as_text(capsys):
    """The row's stop token was decoded with the special tokens kept: " world<｜end▁of▁sentence｜>"."""
    tok = load_tokenizer(DEFAULT)
    eos = tok.eos_id
    printer = cli._Printer(tok, (eos,))
    printer([tok.encode(" world", add_bos=False) + [eos]])
    printer.finish()
    assert capsys.readouterr().out == " world\n"
    ids = cli._Printer(None, (eos,))  # without a tokenizer every id is printed, the stop id included
    ids([[5, eos]])
    assert capsys.readouterr().out == f" 5 {eos}"


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"bos_token": None, "eos_token": None}, ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>")),
        ({"bos_token": {"content": "<｜User｜>"}}, ("<｜User｜>", "<｜end▁of▁sentence｜>")),
        ({"bos_token": {"__type": "AddedToken"}}, "bos_token must be a token string"),
        ({"add_bos_token": "false"}, "add_bos_token must be true or false, got 'false'"),
        (b"\xff\xfe{}", "tokenizer_config.json: not valid JSON"),
    ],
)  # fmt: skip
def test_tokenizer_config_spellings(tmp_path, config, expected):
    """`bos_token: null` became the text "None" (a token of the vocabulary: prompts began with it); an
    AddedToken without content was a KeyError; a string "false" enabled BOS; non-UTF-8 named no file."""
    import shutil

    shutil.copy(DEFAULT / "tokenizer.json", tmp_path / "tokenizer.json")
    path = tmp_path / "tokenizer_config.json"
    path.write_bytes(config) if isinstance(config, bytes) else path.write_text(json.dumps(config))
    if isinstance(expected, tuple):
        tok = load_tokenizer(tmp_path)
        assert (tok.bos_token, tok.eos_token) == expected and tok.add_bos_token is False
    else:
        with pytest.raises(TokenizerError, match=re.escape(expected)):
            load_tokenizer(tmp_path)


def test_summary_line_says_dash_where_nothing_ran():
    from dsv4.generate import GenerationResult

    nothing = GenerationResult([[]], 5, 0.0, 0.0, 0, 0.0, 1024, "bfloat16")  # --max-new-tokens 0
    assert cli.summary_line(nothing) == (
        "[prefill 5 tokens: - | decode 0 tokens: - | cache 1,024 bytes (bfloat16) | compile 0.0 s]"
    )
    ran = GenerationResult([[1, 2]], 4, 2.0, 0.5, 1, 1.5, 2048, "compact")
    assert SUMMARY.match(cli.summary_line(ran)) and "prefill 4 tokens: 2.0 tokens/s" in cli.summary_line(ran)


def test_generate_prompt_ids_without_tokenizer_prints_ids(capsys, flash_ckpt):
    path, _, _ = flash_ckpt
    code, out, err = _run_generate(capsys, "--checkpoint", str(path), "--prompt-ids", "5,6,7",
                                   "--max-new-tokens", "3", "--dtype", "float32")  # fmt: skip
    assert code == 0, err
    first = out.split("\n")[0]
    assert re.fullmatch(r"5,6,7( \d+){3}", first), first


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--prompt", "hi"], "no tokenizer.json"),
        (["--prompt-ids", "1,x"], "separated by commas or spaces"),
        (["--prompt-ids", "3", "--temperature", "inf"], "temperature must be finite"),  # sampled uniformly
        (["--prompt-ids", "3", "--temperature", "1", "--top-k", str(2**31)], r"top_k must be an integer in"),
        (["--prompt-ids", "3", "--no-bos"], "--no-bos applies to a plain text --prompt"),  # was ignored
        (["--prompt", "hi", "--system", "be terse"], "--system is the system turn of --chat"),  # was ignored
        (["--prompt", "caf\udce9"], r"--prompt: not valid UTF-8 \(byte '\\udce9' at character 3\)"),
        (["--prompt-ids", "3,9999"], "outside the vocabulary"),
        (["--prompt-ids", "0,-1"], "outside the vocabulary"),  # was an OverflowError echoing the prompt
        (["--prompt-ids", "3,4", "--chat"], "need a text --prompt"),
        (["--prompt-ids", "3,4,5,6", "--max-len", "3"], "longer than the cache max length 3"),
        (["--prompt-ids", "3", "--top-p", "0"], "top_p"),
        (["--prompt-ids", "3", "--temperature", "-1"], "temperature"),
        (["--prompt-ids", "3", "--seed", str(2**64)], r"seed must be an integer in \[0, 2\*\*32\)"),  # a traceback
        (["--prompt-ids", "3", "--speculative", "--top-k", "5"], "--speculative decodes greedily"),
        (["--prompt-ids", "3", "--speculative", "--stream-interval", "2"], "--speculative prints the text at the end"),
    ],
)
def test_generate_user_errors_are_one_line(capsys, flash_ckpt, argv, match):
    path, _, _ = flash_ckpt
    code, out, err = _run_generate(capsys, "--checkpoint", str(path), "--dtype", "float32", *argv)
    assert code == 2 and out == ""  # checked before the prompt is echoed
    assert err.startswith("dsv4-generate: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(match, err), err
    if match == "no tokenizer.json":
        assert str(path) in err


def test_prompt_ids_take_commas_or_spaces():
    assert cli.parse_ids("1 2 3") == cli.parse_ids("1,2,3") == cli.parse_ids(" 1, 2 ,3 ") == [1, 2, 3]
    assert cli.parse_ids("12, 34 5") == [12, 34, 5]  # was [12, 345]: the spaces were removed first


def test_a_closed_pipe_ends_quietly_and_ctrl_c_in_one_line(capsys, monkeypatch, tmp_path):
    """`dsv4-generate ... | head` ended with "error: [Errno 32] Broken pipe" and status 2; Ctrl-C with a
    traceback."""

    def closed(args):
        raise BrokenPipeError(32, "Broken pipe")

    def interrupted(args):
        raise KeyboardInterrupt

    stdout = (tmp_path / "out").open("w")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert cli.run_command("dsv4-x", closed, None) == 0
    stdout.close()
    assert cli.run_command("dsv4-x", interrupted, None) == 130
    assert capsys.readouterr().err == "dsv4-x: interrupted\n"


_INTERRUPTED = """
import sys
from dsv4.cli import run_command

def fn(args):
    try:
        raise KeyboardInterrupt
    finally:
        print("cleaned up", flush=True)

sys.exit(run_command("dsv4-x", fn, None, exit_on_interrupt=True))
"""


def test_exit_on_interrupt_ends_the_process_after_the_cleanup():
    """The JAX programs' entry points end at once after "interrupted" (releasing what a Ctrl-C
    left mid-compilation crashed the interpreter with SIGSEGV); fn's finally blocks run first."""
    proc = subprocess.run([sys.executable, "-c", _INTERRUPTED], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert proc.returncode == 130
    assert proc.stdout == "cleaned up\n" and proc.stderr == "dsv4-x: interrupted\n"


def test_generate_refuses_a_directory_that_is_no_checkpoint(capsys, tmp_path):
    code, _, err = _run_generate(capsys, "--checkpoint", str(tmp_path), "--prompt", "x")
    assert code == 2 and "neither a release-layout checkpoint" in err


def test_traceback_on_request(capsys, monkeypatch):
    def fail(args):
        raise ValueError("deep inside")

    assert cli.run_command("dsv4-x", fail, None) == 2
    assert capsys.readouterr().err == "dsv4-x: error: deep inside\n"
    monkeypatch.setenv("DSV4_TRACEBACK", "1")
    with pytest.raises(ValueError, match="deep inside"):
        cli.run_command("dsv4-x", fail, None)


def test_converted_checkpoints_go_through_restore(tmp_path, monkeypatch):
    (tmp_path / cli.CONVERTED_MARKER).write_text("{}")
    assert cli.checkpoint_kind(tmp_path) == "converted"
    calls = []

    class FakeRestore:
        @staticmethod
        def load(path, dtype):
            calls.append((path, dtype))
            return "model"

    monkeypatch.setattr(restore, "load", FakeRestore.load)
    assert cli.load_model(tmp_path, "bfloat16") == "model" and calls == [(tmp_path, "bfloat16")]


# ------------------------------------------------------------------------------------- dsv4-info


@pytest.mark.parametrize(
    "preset, total, active, mtp",
    [("flash", "284.33", "13.27", "6.61"), ("pro", "1,573.00", "48.85", "25.84")],  # checkpoint_format s6
)
def test_parameter_counts_match_the_published_figures(preset, total, active, mtp):
    counts = cli.parameter_counts(getattr(ModelConfig, preset)())
    assert f"{counts.total / 1e9:,.2f}" == total
    assert f"{counts.active / 1e9:,.2f}" == active
    assert f"{counts.mtp / 1e9:,.2f}" == mtp


def test_info_reports_counts_and_cache_bytes(capsys):
    assert cli.info_main(["--config", "flash", "--context", "65536", "--cache-format", "compact"]) == 0
    out = capsys.readouterr().out
    assert "284.33B" in out and "13.27B" in out and "6.61B" in out
    nbytes = kv_cache.cache_bytes(ModelConfig.flash(), 1, 65536, "compact")
    assert f"{nbytes:,} bytes per sequence" in out and "for a batch" not in out
    assert cli.info_main(["--config", "flash", "--context", "65536", "--cache-format", "compact", "--batch", "3"]) == 0
    out = capsys.readouterr().out
    total = kv_cache.cache_bytes(ModelConfig.flash(), 3, 65536, "compact")
    assert f"{nbytes:,} bytes per sequence" in out and f"for a batch of 3:   {total:,} bytes" in out


def test_info_reads_a_config_path_and_refuses_nonsense(capsys, flash_ckpt):
    path, _, cfg = flash_ckpt
    assert cli.info_main(["--config", str(path / "config.json"), "--context", "300"]) == 0
    out = capsys.readouterr().out
    assert f"layers: {cfg['num_hidden_layers']} " in out
    assert cli.info_main(["--config", "nonexistent-preset", "--context", "10"]) == 2
    assert "--config" in capsys.readouterr().err
    assert cli.info_main(["--config", "flash", "--context", "0"]) == 2
    capsys.readouterr()
    assert cli.info_main(["--config", "flash", "--context", str(4 * 2**20)]) == 2  # reported cache bytes before
    assert "--context 4,194,304: the model takes at most 1,048,576 tokens" in capsys.readouterr().err


def test_default_checkpoint_json_files_are_valid():
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        json.loads((DEFAULT / name).read_text())
    assert np.isfinite(np.asarray(dsv4.load_hf(DEFAULT).embed.weight.get_value(), np.float32)).all()


def test_generate_on_a_converted_checkpoint_matches_the_release_one(capsys, tmp_path):
    from dsv4 import convert

    dst = tmp_path / "converted"
    convert.convert(DEFAULT, dst, dtype="float32", progress=False)
    argv = ["--prompt", "Hello", "--max-new-tokens", "6", "--dtype", "float32"]
    outputs = []
    for path in (DEFAULT, dst):
        code, out, err = _run_generate(capsys, "--checkpoint", str(path), *argv)
        assert code == 0, err
        outputs.append(out.split("\n")[:-2])  # all but the summary line
    assert cli.checkpoint_kind(dst) == "converted"
    assert outputs[0] == outputs[1]
