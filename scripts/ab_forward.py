"""A/B timing of the whole-sequence forward in one process: the code as it is against one change.

    python scripts/ab_forward.py --seq 4096 --attr dsv4.attention:KEY_CHUNK=128
    python scripts/ab_forward.py --seq 4096 --old dsv4.attention:indexer_topk@HEAD~1 --set num_attention_heads=8
    chrt -f 10 python scripts/ab_forward.py ...   # real-time priority when other work shares the cores

Both versions of `dsv4.forward` on the benchmark config (scripts/_bench_common.py, `--set` changes
it) are compiled ahead of time, then run alternately, `--rounds` times each (A first in even rounds,
B first in odd ones). Printed: the largest logit difference relative to the largest logit, both
medians, and the median of the per-round ratios B / A, which cancels the drift of a shared machine
better than two separate runs do. A is the working tree; B applies the changes: `--attr
MODULE:NAME=VALUE` sets a module constant (a Python literal), `--old MODULE:FUNCTION@REV` puts back
a top-level function or assignment as it was at git revision REV. Both take effect at trace time,
so they reach everything the forward traces afterwards.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import REPO, bench_config, parse_changes, positive_int, random_tokens  # noqa: E402


def set_attr(spec: str) -> None:
    """MODULE:NAME=VALUE -> setattr(module, NAME, literal VALUE)."""
    target, _, value = spec.partition("=")
    module, _, name = target.partition(":")
    if not (module and name and value):
        raise SystemExit(f"ab_forward.py: error: --attr wants MODULE:NAME=VALUE, got {spec!r}")
    setattr(importlib.import_module(module), name, ast.literal_eval(value))


def put_back(spec: str) -> None:
    """MODULE:NAME@REV -> the top-level definition NAME of MODULE as it was at git revision REV."""
    target, _, rev = spec.partition("@")
    module_name, _, name = target.partition(":")
    if not (module_name and name and rev):
        raise SystemExit(f"ab_forward.py: error: --old wants MODULE:NAME@REV, got {spec!r}")
    path = module_name.replace(".", "/") + ".py"
    show = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], capture_output=True, text=True)
    if show.returncode:
        raise SystemExit(f"ab_forward.py: error: git show {rev}:{path}: {show.stderr.strip()}")

    def defines(node) -> bool:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            return node.name == name
        return isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets)

    nodes = [n for n in ast.parse(show.stdout).body if defines(n)]
    if not nodes:
        raise SystemExit(f"ab_forward.py: error: {path} at {rev} defines no top-level {name}")
    module = importlib.import_module(module_name)
    exec(compile(ast.Module(nodes, []), f"{path}@{rev}", "exec"), module.__dict__)


def main(argv=None) -> None:
    from dsv4.xla_flags import prefer_plain_cpu_fusions

    prefer_plain_cpu_fusions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=positive_int, default=4096)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--rounds", type=positive_int, default=10)
    p.add_argument("--attr", action="append", default=[], metavar="MODULE:NAME=VALUE")
    p.add_argument("--old", action="append", default=[], metavar="MODULE:NAME@REV")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="change config fields (JSON values)")
    args = p.parse_args(argv)
    if not args.attr and not args.old:
        p.error("nothing to compare: give --attr or --old")

    import jax
    import jax.numpy as jnp

    import dsv4
    from dsv4.config import RuntimeConfig
    from dsv4.model import _forward

    cfg = bench_config(parse_changes(args.set))
    model = dsv4.init_model(cfg, RuntimeConfig(dtype="float32"), 0)
    tokens = jax.device_put(random_tokens(cfg.vocab_size, args.batch, args.seq))
    programs = {"A": _forward.lower(model, tokens).compile()}
    for spec in args.attr:
        set_attr(spec)
    for spec in args.old:
        put_back(spec)
    jax.clear_caches()
    programs["B"] = _forward.lower(model, tokens).compile()
    out = {name: f(model, tokens) for name, f in programs.items()}
    diff = float(jnp.max(jnp.abs(out["A"] - out["B"])) / jnp.max(jnp.abs(out["A"])))
    print(f"max |A - B| / max |A| = {diff:.3g}")
    times = {"A": [], "B": []}
    for r in range(args.rounds):
        for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
            start = time.perf_counter()
            programs[name](model, tokens).block_until_ready()
            times[name].append(time.perf_counter() - start)
    ratios = [b / a for a, b in zip(times["A"], times["B"], strict=True)]
    a_ms, b_ms = (statistics.median(times[name]) * 1e3 for name in ("A", "B"))
    print(
        f"A median {a_ms:.0f} ms, B median {b_ms:.0f} ms, median ratio B / A {statistics.median(ratios):.3f} "
        f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})"
    )


if __name__ == "__main__":
    main()
