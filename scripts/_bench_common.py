"""Shared pieces of the benchmark scripts: the small benchmark config and subprocess measurement.

`BENCH_OVERRIDES` is the config of scripts/bench_forward.py, scripts/bench_decode.py and
scripts/bench_train.py. Each measurement runs in a fresh
interpreter (`run_child`), which prints one JSON line; its peak RSS and thread pools are its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED = 0

# ModelConfig.tiny with these overrides (every other field: the Flash release value, e.g. hc_mult 4,
# one shared expert, YaRN on CSA/HCA layers, an MTP block of compress ratio 0).
BENCH_OVERRIDES: dict = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "compress_ratios": (4, 128, 4, 128, 0),  # CSA, HCA, CSA, HCA; last = MTP
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 256,
    "num_hash_layers": 1,
    "num_attention_heads": 4,
    "head_dim": 128,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 128,
    "o_groups": 2,
    "o_lora_rank": 128,
    "sliding_window": 128,
    "index_n_heads": 8,
    "index_head_dim": 128,  # > qk_rope_head_dim: the indexer rotates its last 64 channels
    "index_topk": 128,
    "vocab_size": 4096,
}


def bench_config(changes: dict | None = None):
    """The benchmark's ModelConfig: `ModelConfig.tiny(**BENCH_OVERRIDES)`, then `changes` (`--set`).

    Raises SystemExit naming a `--set` key that is not a ModelConfig field.
    """
    import dataclasses

    from dsv4.config import ModelConfig

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in changes or {}:
        if key not in fields:
            raise SystemExit(f"--set {key}=...: {key!r} is not a ModelConfig field")
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in (changes or {}).items()}  # JSON lists
    return ModelConfig.tiny(**{**BENCH_OVERRIDES, **changes})


def hf_config_dict(changes: dict | None = None) -> dict:
    """`bench_config(changes).to_hf_dict()`, computed in a subprocess: a process measuring
    transformers then never imports dsv4, hence JAX (~0.15 GiB of its peak RSS)."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from _bench_common import bench_config; "
        "print(json.dumps(bench_config(json.loads(sys.argv[2])).to_hf_dict()))"
    )
    argv = [sys.executable, "-c", code, str(Path(__file__).resolve().parent), json.dumps(changes or {})]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit((proc.stderr.strip().splitlines() or ["the benchmark config failed"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_no_jax(what: str) -> None:
    """RuntimeError if this process imported JAX: a transformers measurement's peak RSS must be its own."""
    if "jax" in sys.modules:
        raise RuntimeError(f"{what}: JAX was imported in the transformers measurement's process")


def config_text(changes: dict | None = None) -> str:
    items = {**BENCH_OVERRIDES, **(changes or {})}.items()
    return ", ".join(f"{k} {list(v) if isinstance(v, tuple) else v}" for k, v in items)


def parse_changes(pairs: list[str] | None) -> dict:
    """`--set KEY=VALUE ...` -> {KEY: value}: VALUE as JSON (numbers, lists), else the string itself.

    Raises SystemExit naming the pair when it has no "="; `bench_config` refuses a KEY that is not a
    ModelConfig field (this imports no dsv4: a transformers measurement's process never does).
    """
    out = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE with KEY a ModelConfig field")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out[key] = value  # lists become tuples in bench_config (they cross subprocesses as JSON)
    return out


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of timed runs or steps; 0 left nothing to report)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def random_tokens(vocab: int, batch: int, seq: int, seed: int = SEED):
    """int32 [batch, seq] uniform in [0, vocab) (numpy)."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, (batch, seq), dtype=np.int32)


def peak_rss_bytes() -> int:
    """Peak resident set of this process: VmHWM of /proc/self/status on Linux.

    Not getrusage's ru_maxrss: a child started by fork + exec (`run_child`) inherits its parent's
    high-water mark there (a parent holding 800 MB: the child's ru_maxrss 813 MB, VmHWM 13 MB).
    Kept apart from `dsv4.convert.peak_rss_bytes`, the same reading, because the transformers
    measurement's process must not import dsv4 (and with it JAX).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def torch_device() -> str:
    """Where the transformers side runs: $DSV4_BENCH_TORCH_DEVICE, else "cuda" when torch sees a GPU,
    else "cpu" (so on a GPU machine both sides run on the GPU, on a CPU machine both on the CPUs)."""
    import torch

    return os.environ.get("DSV4_BENCH_TORCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def torch_sync() -> None:
    """Wait for queued CUDA work (a no-op on CPU, where torch is synchronous)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def device_peak_bytes(which: str) -> int | None:
    """Peak accelerator memory this process allocated (None on CPU): JAX's `peak_bytes_in_use` of
    device 0, torch's `max_memory_allocated`."""
    if which == "jax":
        import jax

        if jax.default_backend() == "cpu":
            return None
        stats = jax.local_devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")
    import torch

    return torch.cuda.max_memory_allocated() if torch_device().startswith("cuda") else None


def backend_text(which: str) -> str:
    cores = len(os.sched_getaffinity(0))
    if which == "jax":
        import jax

        where = f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
        flags = os.environ.get("XLA_FLAGS", "")
        return f"jax {jax.__version__} {where}, {cores} cores" + (f", XLA_FLAGS {flags!r}" if flags else "")
    import torch

    where = torch_device()
    if where.startswith("cuda"):
        where += f" ({torch.cuda.get_device_name()})"
    return f"torch {torch.__version__} {where}, {torch.get_num_threads()} threads, {cores} cores"


def hf_model_and_release_tensors(cfg, seed: int = SEED, with_mtp: bool = True):
    """(randomised float32 transformers DeepseekV4ForCausalLM, {release name: float32/int64 array}).

    The release tensors hold exactly the HF model's weights (tests/release_fixture.py's name map),
    plus a random `mtp.0.*` block (HF has none) when `with_mtp`.
    """
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))
    from release_fixture import build_hf_model, mtp_tensors, release_tensors_from_hf

    hf_cfg = cfg.to_hf_dict()
    model = build_hf_model(hf_cfg, seed)
    release = release_tensors_from_hf(model.state_dict())
    if with_mtp:
        release.update(mtp_tensors(hf_cfg, seed + 10_000))
    return model, release


def dsv4_from_release(model, release: dict) -> None:
    """Overwrite every variable of the dsv4 `model` in place with its release tensors (float, unquantized)."""
    import jax.numpy as jnp
    from flax import nnx

    from dsv4.checkpoint import param_spec

    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        old = var.get_value()
        spec = param_spec(tuple(path), tuple(old.shape), old.dtype)
        var.set_value(jnp.asarray(spec.assemble([release[t.name] for t in spec.tensors]), old.dtype))
    nnx.update(model, state)


def run_child(script: Path, argv: list[str], timeout: float) -> dict:
    """Run `python script *argv` in a fresh interpreter and return the last JSON line it printed;
    a failure (OOM kill, timeout, exception) becomes {'error': ...}."""
    cmd = [sys.executable, str(script), *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"failed: timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"failed: exit {proc.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def bench_main(argv, parse_args, measure_one, main_table) -> None:
    """The benchmark scripts' entry point: the XLA:CPU flag the console scripts set (before JAX
    starts; not their persistent compile cache, which would hide compile times), then `--one` (one
    measurement in this process, `measure_one(args)`, printed as a JSON line for the parent's
    `run_child`) or the whole table (`main_table(args)`). A transformers measurement (`--one hf`)
    imports no dsv4 or JAX (`check_no_jax`), so its peak RSS is transformers' own."""
    args = parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if not (args.one and args.one[0] == "hf"):
        from dsv4.xla_flags import prefer_plain_cpu_fusions

        prefer_plain_cpu_fusions()
    if args.one:
        print(json.dumps(measure_one(args)))
    else:
        main_table(args)
