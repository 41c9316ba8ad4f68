"""Console scripts: `dsv4-generate` (text generation) and `dsv4-info` (parameter and cache sizes).

    dsv4-generate --prompt "Hello"                          # the embedded default checkpoint
    dsv4-generate --checkpoint DIR --chat --prompt "Hi"     # a release-layout or converted checkpoint
    dsv4-generate --prompt-ids 0,17,42 --max-new-tokens 8
    dsv4-info --config flash --context 1048576 --cache-format compact

Both are thin: the work is in `dsv4.generate`, `dsv4.tokenizer`, `dsv4.cache` and the abstract
parameter tree (`dsv4.abstract_model`). User errors (bad flags, a missing tokenizer, a malformed
checkpoint, an over-long prompt) print one line `dsv4-...: error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dsv4.config import ConfigError, ModelConfig, RuntimeConfig
from dsv4.xla_flags import program_defaults

CONVERTED_MARKER = "dsv4_checkpoint.json"  # dsv4.convert's manifest: a converted (Orbax) checkpoint
CACHE_FORMATS = ("bfloat16", "compact", "float32")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def default_checkpoint_dir() -> Path:
    """The small trained checkpoint shipped inside the package (see the README's Training section)."""
    return Path(__file__).resolve().parent / "default_checkpoint"


def _user_errors() -> tuple[type[BaseException], ...]:
    from dsv4.safetensors_io import CheckpointError
    from dsv4.tokenizer import TokenizerError

    return (CLIError, ValueError, ConfigError, CheckpointError, TokenizerError, OSError)


def run_command(prog: str, fn, args, exit_on_interrupt: bool = False) -> int:
    """`fn(args)` for the console script `prog`: 0, or 2 after one line `prog: error: ...` on a user error.

    A closed stdout (`prog ... | head`) ends the command quietly with 0; Ctrl-C with one line and
    130 (the shell's status for SIGINT). With DSV4_TRACEBACK=1 in the environment the error
    propagates with its traceback instead (a ValueError from deep inside jax reads as a user error
    too). `exit_on_interrupt` (the entry points of programs that run JAX) ends the process with 130
    right after that line, once `fn`'s own `finally` blocks have run: a Ctrl-C that stops JAX in the
    middle of a compilation left objects whose release, as the interrupt unwound, crashed the
    interpreter (SIGSEGV, exit 139, after "interrupted").
    """
    try:
        fn(args)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as command-line tools do
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        if wants_traceback():
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        if exit_on_interrupt:
            _exit_now(130)
        return 130
    except _user_errors() as err:
        if wants_traceback():
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


def _exit_now(code: int) -> None:
    """Flush the standard streams and end the process with `code`, releasing nothing (os._exit)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of a closed pipe raises nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def flag(dest: str) -> str:
    """The command-line flag of an argparse destination: "max_new_tokens" -> "--max-new-tokens"."""
    return "--" + dest.replace("_", "-")


def wants_traceback() -> bool:
    """DSV4_TRACEBACK=1 (any value but empty or 0): user errors propagate with their traceback."""
    return os.environ.get("DSV4_TRACEBACK", "") not in ("", "0")


# ------------------------------------------------------------------------------------ checkpoints


def checkpoint_kind(path: Path) -> str:
    """The checkpoint's layout: "converted" (dsv4.convert) or "release"; CLIError for anything else."""
    if not path.is_dir():
        raise CLIError(f"{path}: not a directory (expected a checkpoint directory)")
    if (path / CONVERTED_MARKER).is_file():
        return "converted"
    has_weights = (path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors"))
    if (path / "config.json").is_file() and has_weights:
        return "release"
    raise CLIError(
        f"{path}: not a checkpoint: neither a release-layout checkpoint (config.json + *.safetensors) nor a "
        f"converted one ({CONVERTED_MARKER})"
    )


def load_model(path: Path, dtype: str, **placement):
    """Load a release-layout (`dsv4.load_hf`) or converted (`dsv4.restore.load`) checkpoint.

    placement: `mesh=`, `strategy=`, `attention_impl=`, passed to either loader (each creates or
    restores every array directly into its shards of the mesh).
    """
    if checkpoint_kind(path) == "release":
        from dsv4.loading import load_hf

        return load_hf(path, dtype=dtype, **placement)
    from dsv4 import restore

    return restore.load(path, dtype=dtype, **placement)


# ------------------------------------------------------------------------------------ dsv4-generate


def parse_ids(text: str) -> list[int]:
    """'1,2,3' (or '1, 2, 3', or '1 2 3') -> [1, 2, 3]; CLIError on anything else."""
    try:
        ids = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise CLIError(f"--prompt-ids: expected integers separated by commas or spaces (1,2,3), got {text!r}") from None
    if not ids:
        raise CLIError("--prompt-ids: no token ids given")
    return ids


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsv4-generate",
        description="Generate text with a DeepSeek-V4 checkpoint (default: the small trained one inside the package).",
    )
    p.add_argument("--checkpoint", type=Path, help="release-layout or converted checkpoint directory")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer.json)")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 0,17,42")
    p.add_argument("--chat", action="store_true", help="lay the prompt out as a user turn (V4 chat format)")
    p.add_argument("--thinking", action="store_true", help="chat in thinking mode (<think>); implies --chat")
    p.add_argument("--system", default="", help="system prompt for --chat")
    p.add_argument("--no-bos", action="store_true", help="do not prepend BOS to a plain text prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-format", choices=CACHE_FORMATS, default="bfloat16")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="weight dtype")
    p.add_argument("--max-len", type=int,
                   help="cache length per sequence (default: prompt + new tokens, rounded up to a multiple of 128)")
    p.add_argument("--stream-interval", type=int, default=1, help="decode steps between printed chunks")
    p.add_argument("--speculative", action="store_true",
                   help="greedy, with the MTP block guessing every second token (dsv4.generate_speculative): the "
                        "same text, printed at the end with the share of guesses kept; not faster on CPU")
    return p


def _prompt_ids(args, path: Path):
    """(token ids, tokenizer or None) from --prompt / --prompt-ids and the chat flags."""
    from dsv4.tokenizer import format_chat, load_tokenizer

    chat = args.chat or args.thinking
    if args.system and not chat:
        raise CLIError("--system is the system turn of --chat or --thinking; add one of them, or leave --system out")
    if args.no_bos and (chat or args.prompt_ids is not None):
        raise CLIError("--no-bos applies to a plain text --prompt (--chat lays out its own tokens, --prompt-ids "
                       "are used as given)")  # fmt: skip
    if args.prompt_ids is not None:
        if chat:
            raise CLIError("--chat/--thinking need a text --prompt, not --prompt-ids")
        tok = optional_tokenizer(path)
        return parse_ids(args.prompt_ids), tok
    for option, text in (("--prompt", args.prompt), ("--system", args.system)):
        _check_utf8(option, text)
    tok = load_tokenizer(path)
    if chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        return tok.encode(format_chat(messages, thinking=args.thinking), add_bos=False), tok
    return tok.encode(args.prompt, add_bos=not args.no_bos), tok


def _check_utf8(option: str, text: str) -> None:
    """CLIError when a command-line text holds bytes that are not UTF-8 (Python keeps them as
    surrogate escapes, which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise CLIError(f"{option}: not valid UTF-8 (byte {err.object[err.start]!r} at character {err.start})") from None


def optional_tokenizer(path: Path):
    """The checkpoint directory's tokenizer, or None when it has no tokenizer.json."""
    from dsv4.tokenizer import load_tokenizer

    return load_tokenizer(path) if (path / "tokenizer.json").is_file() else None


class _Printer:
    """Streams generated tokens to stdout: decoded text with a tokenizer (the stop token that ends the
    row left out: its text was printed literally), else space-separated ids (all of them)."""

    def __init__(self, tokenizer, stop_ids=()):
        self.decoder = tokenizer.stream() if tokenizer is not None else None
        self.stop_ids = frozenset(stop_ids)

    def __call__(self, new: list[list[int]]) -> None:
        ids = new[0]
        if self.decoder:
            text = self.decoder.push([i for i in ids if i not in self.stop_ids])
        else:
            text = "".join(f" {i}" for i in ids)
        print(text, end="", flush=True)

    def finish(self) -> None:
        print(self.decoder.flush() if self.decoder else "", flush=True)


def _rate(tokens_per_second: float) -> str:
    """"1,234.5 tokens/s", or "-" where nothing ran (no prefill or no decode step: NaN)."""
    return "-" if math.isnan(tokens_per_second) else f"{tokens_per_second:,.1f} tokens/s"


def summary_line(result) -> str:
    """The final line: prefill and decode throughput and the cache size."""
    return (
        f"[prefill {result.prompt_tokens} tokens: {_rate(result.prefill_tokens_per_second)} | "
        f"decode {result.decode_steps * len(result.tokens)} tokens: {_rate(result.decode_tokens_per_second)}"
        f" | cache {result.cache_bytes:,} bytes ({result.cache_format}) | "
        f"compile {result.compile_seconds:.1f} s]"
    )


def _check_speculative(args) -> None:
    """CLIError for options --speculative cannot honour (it decodes greedily and prints at the end)."""
    if args.temperature != 0.0 or args.top_k != 0 or args.top_p != 1.0:
        raise CLIError("--speculative decodes greedily: leave out --temperature, --top-k and --top-p")
    if args.stream_interval != 1:
        raise CLIError("--speculative prints the text at the end: leave out --stream-interval")


def speculative_summary_line(result) -> str:
    """The final line of a --speculative run: steps, guesses kept, decode throughput."""
    return (
        f"[speculative: {result.loop_tokens} tokens after the first in {result.steps} steps | guesses kept "
        f"{result.accepted}/{result.guessed} | decode {_rate(result.decode_tokens_per_second)} | "
        f"compile {result.compile_seconds:.1f} s]"
    )


def _generate(args) -> None:
    from dsv4.generate import check_request, generate_with_stats, stop_ids_of
    from dsv4.speculative import generate_speculative

    if args.speculative:
        _check_speculative(args)

    path = args.checkpoint or default_checkpoint_dir()
    checkpoint_kind(path)  # a clear error before anything slow
    ids, tok = _prompt_ids(args, path)
    model = load_model(path, args.dtype)
    sampling = (args.temperature, args.top_k, args.top_p)
    options = {"cache_format": args.cache_format, "max_len": args.max_len, "stream_interval": args.stream_interval}
    check_request(model.cfg, [ids], args.max_new_tokens, sampling, None, prefill_chunk=None, seed=args.seed, **options)
    if args.speculative and not len(model.mtp):
        raise CLIError(f"--speculative needs an MTP block; {path} has none (num_nextn_predict_layers 0)")
    if tok is not None:  # echo the prompt once it is known to be valid; chat keeps its role tokens
        print(tok.decode(ids, skip_special_tokens=not (args.chat or args.thinking)), end="", flush=True)
    else:
        print(",".join(map(str, ids)), end="", flush=True)
    printer = _Printer(tok, stop_ids_of(model.cfg, None))
    if args.speculative:
        result = generate_speculative(model, [ids], args.max_new_tokens, cache_format=args.cache_format,
                                      max_len=args.max_len)  # fmt: skip
        printer(result.tokens)
        printer.finish()
        print(speculative_summary_line(result), flush=True)
        return
    result = generate_with_stats(
        model, [ids], args.max_new_tokens, *sampling, args.seed, on_token=printer, **options
    )  # fmt: skip
    printer.finish()
    print(summary_line(result), flush=True)


def generate_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `dsv4-generate`."""
    program_defaults()
    return run_command("dsv4-generate", _generate, generate_parser().parse_args(argv), exit_on_interrupt=True)


# ---------------------------------------------------------------------------------------- dsv4-info


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Floating-point parameter counts (the hash router's integer tid2eid table is not a parameter)."""

    total: int  # main model (MTP excluded), embedding and head included
    embedding: int
    routed: int  # routed-expert weights of the main model
    active: int  # per token: total - embedding - routed + routed * K / E (head included)
    mtp: int  # the MTP block(s)


def parameter_counts(cfg: ModelConfig) -> ParamCounts:
    """Counts from the abstract parameter tree (jax.eval_shape: nothing allocated)."""
    import jax.numpy as jnp
    from flax import nnx

    from dsv4.model import abstract_model

    _, state = nnx.split(abstract_model(cfg, RuntimeConfig(dtype="bfloat16")))
    total = routed = mtp = embedding = 0
    for path, var in nnx.to_flat_state(state):
        x = var.get_value()
        if not jnp.issubdtype(x.dtype, jnp.floating):
            continue
        n = int(np.prod(x.shape))
        names = [str(p) for p in path]
        if names[0] == "mtp":
            mtp += n
            continue
        total += n
        embedding += n if names[0] == "embed" else 0
        routed += n if "experts" in names and names[-1] in ("w1", "w2", "w3") else 0
    active = total - embedding - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    return ParamCounts(total, embedding, routed, active, mtp)


def resolve_config(name: str) -> ModelConfig:
    """flash | pro | a config.json path | a checkpoint directory."""
    if name in ("flash", "pro"):
        return getattr(ModelConfig, name)()
    path = Path(name)
    if not path.exists():
        raise CLIError(f"--config: {name!r} is not flash, pro, or an existing config.json / checkpoint directory")
    return ModelConfig.from_hf_config(path)


def info_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv4-info", description="Parameter counts and KV cache size of a config.")
    p.add_argument("--config", default="flash", help="flash | pro | path to config.json or a checkpoint dir")
    p.add_argument("--context", type=int, default=1 << 20, help="tokens per sequence (default 1048576)")
    p.add_argument("--cache-format", choices=CACHE_FORMATS, default="bfloat16")
    p.add_argument("--batch", type=int, default=1, help="sequences: the cache line adds their total (default 1)")
    return p


def _billions(n: int) -> str:
    return f"{n / 1e9:,.2f}B ({n:,})"


def info_lines(cfg: ModelConfig, context: int, cache_format: str, batch: int = 1) -> list[str]:
    """The report of `dsv4-info`, one string per line."""
    from dsv4.cache import cache_bytes

    if context < 1 or batch < 1:
        raise CLIError(f"--context and --batch must be >= 1, got {context} and {batch}")
    if context > cfg.max_position_embeddings:
        raise CLIError(
            f"--context {context:,}: the model takes at most {cfg.max_position_embeddings:,} tokens per sequence "
            "(max_position_embeddings)"
        )
    counts = parameter_counts(cfg)
    kinds = cfg.layer_kinds
    nbytes = cache_bytes(cfg, batch, context, cache_format)
    per_seq = nbytes / batch
    return [
        f"layers: {len(kinds)} ({', '.join(f'{kinds.count(k)} {k}' for k in ('sliding', 'csa', 'hca'))}), "
        f"{cfg.num_hash_layers} hash-routed; MTP blocks: {cfg.num_mtp_layers}",
        f"parameters (main model): {_billions(counts.total)}",
        f"  routed experts:        {_billions(counts.routed)}",
        f"  active per token:      {_billions(counts.active)} "
        f"({cfg.num_experts_per_tok} of {cfg.n_routed_experts} experts; head in, embedding out)",
        f"parameters (MTP):        {_billions(counts.mtp)}",
        f"KV cache ({cache_format}) at context {context:,}: {per_seq:,.0f} bytes per sequence "
        f"({per_seq / 2**30:,.3f} GiB; {per_seq / context:,.1f} bytes per token of context)",
    ] + ([f"  for a batch of {batch}:   {nbytes:,} bytes ({nbytes / 2**30:,.3f} GiB)"] if batch > 1 else [])


def _info(args) -> None:
    for line in info_lines(resolve_config(args.config), args.context, args.cache_format, args.batch):
        print(line)


def info_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `dsv4-info`."""
    return run_command("dsv4-info", _info, info_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(generate_main())
