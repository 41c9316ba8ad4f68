"""dsv4-multihost: generate for a JSONL file of prompts on a mesh that spans one host or many.

Run the same command on every host. Each process joins the cluster (`--coordinator host:port
--num-processes N --process-id I`, the DSV4_COORDINATOR / DSV4_NUM_PROCESSES / DSV4_PROCESS_ID
variables, or JAX's auto-detection on TPU pods, SLURM and Open MPI), builds the global
(data, expert, tensor) mesh, loads the checkpoint straight into its shards (a converted Orbax
checkpoint through `dsv4.load`'s restore, a release directory through `dsv4.load_hf`), and takes
part in one jitted prefill and decode loop. Process 0 writes the results.

Prompts: one JSON object per line, {"id": ..., "tokens": [ids]} or {"id": ..., "text": "..."} (text
needs tokenizer.json in the checkpoint directory, and is encoded with BOS first, as dsv4-generate
encodes --prompt; --no-bos leaves it out). Results: one line per prompt,
{"id": ..., "tokens": [new ids], "text": "..."} (text when a tokenizer is present), written to a
temporary file beside --output and renamed onto it.

User errors (bad flags, a missing or malformed checkpoint or prompts file, a token id outside the
vocabulary, an --output that cannot be written) print one line `dsv4-multihost: error: ...` and
exit with status 2, as dsv4-generate does. Everything but --output (process 0's) is checked on
every process before it joins the cluster; --output before the weights are loaded.

Launch on a TPU slice (every worker runs the same command; JAX finds the coordinator itself):

    gcloud compute tpus tpu-vm ssh my-v5p-32 --zone us-east5-a --worker=all --command \\
      "dsv4-multihost --checkpoint /mnt/dsv4-flash-orbax --prompts prompts.jsonl \\
       --output out.jsonl --expert 16 --strategy dp_ep"

Launch on one multi-GPU host (one process drives all local GPUs; no coordinator needed):

    dsv4-multihost --checkpoint /data/DeepSeek-V4-Flash --prompts prompts.jsonl --output out.jsonl \\
      --expert 8 --strategy dp_ep --dtype bfloat16

Several GPU hosts (one process per host; run on each host with its own --process-id):

    dsv4-multihost --coordinator host0:8476 --num-processes 2 --process-id $RANK \\
      --checkpoint /data/dsv4-flash-orbax --prompts prompts.jsonl --output out.jsonl --data 2 --expert 8

Under SLURM the three cluster flags can be left out; JAX then gives each process only the GPU its
SLURM_LOCALID names, so run one task per GPU (`srun --ntasks-per-node=GPUS_PER_HOST`), or set
JAX_LOCAL_DEVICE_IDS=0,1,... with one task per host. The README's "Running on a mesh" has more.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

PAD_ID = 0  # same convention as dsv4.generate


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(prog="dsv4-multihost", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="converted (Orbax) or release checkpoint directory")
    p.add_argument("--prompts", required=True, help="JSONL file: {'id', 'tokens'} or {'id', 'text'} per line")
    p.add_argument("--no-bos", action="store_true", help="do not prepend BOS to 'text' prompts (as dsv4-generate)")
    p.add_argument("--output", required=True, help="JSONL results, written by process 0")
    p.add_argument("--coordinator", help="host:port of process 0 (else DSV4_COORDINATOR or auto-detect)")
    p.add_argument("--num-processes", type=int, help="processes in the cluster (else DSV4_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, help="this process's index (else DSV4_PROCESS_ID)")
    p.add_argument("--init-timeout", type=int, default=300, help="seconds to wait for every process to join")
    p.add_argument("--data", type=int, help="mesh size of the data axis (default: inferred)")
    p.add_argument("--expert", type=int, help="mesh size of the expert axis (default: the remaining devices)")
    p.add_argument("--tensor", type=int, default=1, help="mesh size of the tensor axis")
    p.add_argument("--strategy", default="dp_ep", help="dp_ep | dp_ep_a2a | tp_ep | replicated")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--attention-impl", default="xla")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-format", default="bfloat16", choices=("bfloat16", "float32", "compact"))
    p.add_argument("--loop", default="auto", choices=("auto", "host"),
                   help="auto: dsv4.generate's on-device loop in one process, a host loop across processes")
    return p.parse_args(argv)


def read_prompts(path, tokenizer=None, *, add_bos=True, vocab=None, checkpoint=None) -> tuple[list, list[list[int]]]:
    """(ids, token lists) from a JSONL file; ValueError naming the file and line of a bad one.

    A 'text' row is encoded with `tokenizer`, BOS first unless `add_bos` is False (as dsv4-generate
    encodes --prompt). Token lists go through `dsv4.generate.check_prompt`: non-empty lists of
    integers, in [0, vocab) when `vocab` is given. `checkpoint` only names the directory whose
    missing tokenizer.json makes a 'text' row unusable.
    """
    from dsv4.generate import check_prompt

    vocab = math.inf if vocab is None else vocab
    ids, prompts = [], []
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        row = _row(path, n, line)
        ids.append(row.get("id", len(ids)))
        tokens = _row_tokens(path, n, row, tokenizer, add_bos, checkpoint)
        try:
            label = "'tokens'" if "tokens" in row else "the encoded 'text'"  # the line number says which prompt
            prompts.append(check_prompt(label, tokens, vocab))
        except ValueError as err:
            raise ValueError(f"{path}:{n}: {err}") from None
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return ids, prompts


def _lines(path) -> list[str]:
    """The prompts file's lines; ValueError naming --prompts when it cannot be read."""
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise ValueError(f"--prompts {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompts {path}: cannot read: {getattr(err, 'strerror', None) or err}") from None


def _row(path, n: int, line: str) -> dict:
    """One line's JSON object; ValueError naming the line when it is not one."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{n}: not valid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{n}: expected a JSON object like {{\"id\": ..., \"tokens\": [...]}}, "
                         f"got {type(row).__name__}")  # fmt: skip
    return row


def _row_tokens(path, n: int, row: dict, tokenizer, add_bos: bool, checkpoint):
    """A row's 'tokens', or its encoded 'text' (unchecked: the caller checks it)."""
    if "tokens" in row:
        return row["tokens"]
    if "text" not in row:
        need = "a 'tokens' list" if tokenizer is None else "'tokens' or 'text'"
        raise ValueError(f"{path}:{n}: each line needs {need}")
    if tokenizer is None:
        where = f"{checkpoint} has" if checkpoint is not None else "the checkpoint directory has"
        raise ValueError(f"{path}:{n}: each line needs a 'tokens' list: 'text' prompts need tokenizer.json, "
                         f"and {where} none")  # fmt: skip
    if not isinstance(row["text"], str):
        raise ValueError(f"{path}:{n}: 'text' must be a string, got {type(row['text']).__name__}")
    return tokenizer.encode(row["text"], add_bos=add_bos)


def padded_batch(prompts: list[list[int]], multiple: int) -> list[list[int]]:
    """The prompts plus copies of the first, up to a multiple of `multiple` rows (the batch split)."""
    extra = -len(prompts) % multiple
    return prompts + [prompts[0]] * extra


def generate_on_mesh(model, prompts, max_new_tokens: int, sampling, seed: int, stop_ids, cache_format: str):
    """Prefill, then one jitted decode step per token from a host loop that works across hosts.

    Same tokens as `dsv4.generate.generate` (step t samples with fold_in(key(seed), t)); the
    sampled ids are gathered to every process each step, so every host drives the same loop.
    """
    import jax

    from dsv4.cache import init_cache
    from dsv4.decode import decode_step, prefill
    from dsv4.sampling import sample_with
    from sharding.placement import init_sharded_cache, replicated

    cfg, rt = model.cfg, model.rt
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.full((len(prompts), lengths.max()), PAD_ID, np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    max_len = int(lengths.max()) + max_new_tokens
    if rt.mesh is None:
        cache = init_cache(cfg, len(prompts), max_len, cache_format)
    else:
        cache = init_sharded_cache(cfg, len(prompts), max_len, cache_format, rt.mesh, rt.strategy)
    key = jax.random.key(seed)
    out_sharding = replicated(rt.mesh) if rt.mesh is not None else None
    sample = jax.jit(lambda logits, step: sample_with(sampling, logits, jax.random.fold_in(key, step)),
                     out_shardings=out_sharding)  # fmt: skip
    logits, cache = prefill(model, tokens, cache, lengths, last_only=True)
    out, done = [], np.zeros(len(prompts), bool)
    for step in range(max_new_tokens):
        if step:
            logits, cache = decode_step(model, np.where(done, PAD_ID, out[-1]), cache)
        token = np.asarray(sample(logits, np.int32(step)))
        token = np.where(done, PAD_ID, token)
        out.append(token)
        done |= np.isin(token, stop_ids)
        if done.all():
            break
    rows = np.stack(out, axis=1).tolist() if out else [[] for _ in prompts]
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))] for row in rows]


def main(argv=None) -> int:
    """Entry point of `dsv4-multihost`: 0, or 2 after a one-line `dsv4-multihost: error: ...` (as dsv4-generate)."""
    args = parse_args(argv)
    from dsv4.cli import run_command
    from dsv4.xla_flags import program_defaults

    program_defaults()
    return run_command("dsv4-multihost", _serve, args, exit_on_interrupt=True)


@dataclasses.dataclass(frozen=True)
class Request:
    """The inputs of a run, checked on every process before it joins the cluster or loads weights."""

    checkpoint: Path
    cfg: object  # dsv4.config.ModelConfig
    strategy: object  # sharding.rules.Strategy
    sampling: object  # dsv4.sampling.SamplingParams
    tokenizer: object  # dsv4.tokenizer.Tokenizer or None
    ids: list
    prompts: list[list[int]]


def check_request(args) -> Request:
    """Every check that needs neither the cluster nor the weights; CLIError / ValueError naming the culprit.

    Order: flags, then the checkpoint directory and its config.json (named before the prompts, whose
    text rows need its tokenizer), then the prompts file against the config's vocabulary and context.
    """
    from dsv4.cli import CLIError, checkpoint_kind, optional_tokenizer
    from dsv4.config import ModelConfig
    from dsv4.generate import cache_length, check_seed
    from dsv4.sampling import SamplingParams
    from sharding.rules import get_strategy

    try:
        strategy = get_strategy(args.strategy)
    except ValueError as err:
        raise CLIError(f"--strategy: {err}") from None
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    try:
        check_seed(args.seed)
    except ValueError as err:
        raise CLIError(f"--seed: {err}") from None
    checkpoint = Path(args.checkpoint)
    checkpoint_kind(checkpoint)
    cfg = ModelConfig.from_hf_config(checkpoint)
    tokenizer = optional_tokenizer(checkpoint)
    ids, prompts = read_prompts(args.prompts, tokenizer, add_bos=not args.no_bos, vocab=cfg.vocab_size,
                                checkpoint=checkpoint)  # fmt: skip
    try:
        cache_length(cfg, prompts, args.max_new_tokens, None)
    except ValueError as err:
        raise CLIError(f"--max-new-tokens {args.max_new_tokens}, --prompts {args.prompts}: {err}") from None
    return Request(checkpoint, cfg, strategy, sampling, tokenizer, ids, prompts)


def _serve(args) -> None:
    """Check, join the cluster, load, generate, write (process 0). Process 0 checks --output before
    joining when its id is given (or it runs alone): its refusal then stops no other process midway."""
    from sharding.mesh import distributed_args, initialize_distributed

    req = check_request(args)
    known = distributed_args(args.coordinator, args.num_processes, args.process_id)
    checked_early = known["process_id"] == 0 or known["num_processes"] == 1
    if checked_early:
        check_output(args.output)
    initialize_distributed(args.coordinator, args.num_processes, args.process_id, args.init_timeout)
    import jax

    from dsv4.cli import load_model
    from dsv4.generate import stop_ids_of
    from sharding.mesh import make_mesh
    from sharding.rules import validate

    writer = jax.process_index() == 0
    if writer and not checked_early:  # its id came from the cluster (e.g. a TPU slice)
        check_output(args.output)
    mesh = make_mesh(args.data, args.expert, args.tensor)
    rows = 1
    for a in req.strategy.mesh_axes("batch", mesh):
        rows *= mesh.shape[a]
    batch = padded_batch(req.prompts, rows)
    validate(req.cfg, mesh, req.strategy, batch=len(batch))
    start = time.perf_counter()
    model = load_model(req.checkpoint, args.dtype, mesh=mesh, strategy=args.strategy,
                       attention_impl=args.attention_impl)  # fmt: skip
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    if jax.process_count() == 1 and args.loop != "host":  # the on-device loop of dsv4.generate
        from dsv4.generate import generate

        new = generate(model, batch, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                       cache_format=args.cache_format)  # fmt: skip
    else:  # across hosts: a host loop every process drives identically
        new = generate_on_mesh(model, batch, args.max_new_tokens, req.sampling, args.seed,
                               stop_ids_of(model.cfg, None), args.cache_format)  # fmt: skip
    new = new[: len(req.prompts)]
    gen_s = time.perf_counter() - start
    if writer:
        _write(args.output, req.ids, new, req.tokenizer)
        print(f"dsv4-multihost: {jax.process_count()} process(es), mesh {dict(mesh.shape)}, strategy "
              f"{req.strategy.name}; load {load_s:.1f}s, generate {gen_s:.1f}s (incl. compile), "
              f"{sum(map(len, new))} tokens -> {args.output}", file=sys.stderr)  # fmt: skip


def check_output(path) -> None:
    """CLIError or ValueError naming --output when its file cannot be created: checked by creating a
    scratch file in its directory, before the model is loaded (a bad path used to surface after
    generation)."""
    from dsv4.cli import CLIError
    from dsv4.outputs import check_creatable

    path = Path(path)
    if path.is_dir():
        raise CLIError(f"--output {path}: is a directory")
    check_creatable(path, "--output", parents=False)  # the results go beside it, no directory made


def _write(path, ids, tokens, tokenizer) -> None:
    """The results as JSONL, atomically: a temporary file beside `path`, renamed onto it when complete."""
    from dsv4 import outputs
    from dsv4.cli import CLIError

    path = Path(path)
    records = []
    for i, row in zip(ids, tokens, strict=True):
        record = {"id": i, "tokens": row}
        if tokenizer is not None:
            record["text"] = tokenizer.decode(row)
        records.append(json.dumps(record) + "\n")
    try:
        outputs.write_text(path, "".join(records))
    except OSError as err:
        raise CLIError(f"--output {path}: cannot write: {err.strerror or err}") from None


if __name__ == "__main__":
    sys.exit(main())
