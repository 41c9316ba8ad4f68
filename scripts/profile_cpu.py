"""Where a compiled program's time goes on XLA:CPU, summed by dsv4 source line.

    python scripts/profile_cpu.py forward --seq 4096 --set num_attention_heads=8
    python scripts/profile_cpu.py train --seq 1024 --top 30

The program (`dsv4.forward`, or the `dsv4.train` step with the LM loss in float32, remat off, as
scripts/bench_train.py's default row) on the benchmark config of scripts/_bench_common.py is
compiled, run `--warmup` times, then once under `jax.profiler.trace`. The runtime records one
event per thunk it executes (a fusion, a dot, a copy, a loop); their durations are summed per HLO
instruction, leaving out loops, conditionals and calls (their events contain their bodies'
thunks). Each instruction is charged to the innermost dsv4 (or sharding, pallas_kernels) source
line of its metadata, read from the stack-frame tables of the optimized HLO text; a fusion
without metadata takes the line of its dot, else of its first instruction that has one. YNNPACK's
dot fusions have no metadata anywhere: each is charged to "LINE (read by a dot)", LINE being that
of its first operand that has one. A custom VJP's backward is charged to the line that called the
function. Both cores' events count, so the total exceeds the wall time when the cores work at
once; time outside thunks (dispatch, waiting) is not in it.

Prints the wall time of the timed runs, then the table: milliseconds per source line, the thunks
behind it, and their share of the total. `--by-thunk` lists thunks instead of lines.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import REPO, bench_config, parse_changes, random_tokens  # noqa: E402

_OWN = ("dsv4/", "sharding/", "pallas_kernels/")
_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def containers(hlo_text: str) -> set[str]:
    """Names of the loop, conditional and call instructions: their events include their bodies'."""
    return set(re.findall(r"^\s+(?:ROOT )?%([\w.\-]+) = .*? (?:while|conditional|call)\(", hlo_text, re.M))


def source_lines(hlo_text: str) -> dict[str, str]:
    """Instruction name -> "file:line function" of the innermost frame in this repository."""
    tables = {name: {} for name in _TABLES}
    frame_of, comp_frame, calls, operands = {}, {}, {}, {}
    table, comp = None, None
    for line in hlo_text.splitlines():
        if line in _TABLES:
            table = line
            continue
        entry = re.match(r"^(\d+) (.*)$", line)
        if table and entry:
            tables[table][int(entry.group(1))] = entry.group(2)
            continue
        table = None
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
        if header:
            comp = header.group(1)
        inst = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = .*?stack_frame_id=(\d+)", line)
        if inst:
            frame_of.setdefault(inst.group(1), int(inst.group(2)))
            if " dot(" in line or comp not in comp_frame:
                comp_frame[comp] = int(inst.group(2))
        fused = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = .*calls=%([\w.\-]+)", line)
        if fused:
            calls[fused.group(1)] = fused.group(2)
        operation = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = .*? [\w\-]+\((%[^)]*)\)", line)
        if operation:
            operands[operation.group(1)] = re.findall(r"%([\w.\-]+)", operation.group(2))
    for name, callee in calls.items():
        if name not in frame_of and callee in comp_frame:
            frame_of[name] = comp_frame[callee]
    # YNNPACK's dot fusions carry no metadata, nor do their computations: the first operand's line
    readers = {}
    for name, args in operands.items():
        known = [arg for arg in args if arg in frame_of]
        if name not in frame_of and known:
            readers[name] = frame_of[known[0]]

    def field(text: str, key: str) -> int:
        return int(re.search(rf"{key}=(\d+)", text).group(1))

    def where(frame: int) -> str:
        seen = set()
        while frame in tables["StackFrames"] and frame not in seen:
            seen.add(frame)
            text = tables["StackFrames"][frame]
            loc = tables["FileLocations"][field(text, "file_location_id")]
            path = tables["FileNames"][field(loc, "file_name_id")].strip('"')
            rel = path.replace(str(REPO) + "/", "")
            if rel.startswith(_OWN):
                func = tables["FunctionNames"][field(loc, "function_name_id")].strip('"')
                return f"{rel}:{field(loc, 'line')} {func}"
            frame = field(text, "parent_frame_id")
        return "(outside dsv4)"

    lines = {name: where(frame) for name, frame in frame_of.items()}
    return lines | {name: f"{where(frame)} (read by a dot)" for name, frame in readers.items()}


def thunk_times(run) -> dict[str, tuple[float, int]]:
    """Thunk name -> (milliseconds, events) of one call of `run` under the profiler."""
    from jax.profiler import ProfileData, trace

    with tempfile.TemporaryDirectory() as logdir:
        with trace(logdir):
            run()
        data = ProfileData.from_file(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0])
    total, count = collections.Counter(), collections.Counter()
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                total[event.name] += event.duration_ns / 1e6
                count[event.name] += 1
    return {name: (ms, count[name]) for name, ms in total.items()}


def forward_program(args):
    import jax

    import dsv4
    from dsv4.config import RuntimeConfig
    from dsv4.model import _forward

    cfg = bench_config(parse_changes(args.set))
    model = dsv4.init_model(cfg, RuntimeConfig(dtype="float32"), 0)
    tokens = jax.device_put(random_tokens(cfg.vocab_size, args.batch, args.seq))
    hlo = _forward.lower(model, tokens).compile().as_text()
    return hlo, lambda: dsv4.forward(model, tokens).block_until_ready()


def train_program(args):
    import jax
    import jax.numpy as jnp

    import dsv4
    from dsv4 import train
    from dsv4.config import RuntimeConfig

    cfg = bench_config(parse_changes(args.set))
    model = train.training_model(dsv4.init_model(cfg, RuntimeConfig(dtype="float32"), 0), remat=False)
    tc = train.TrainConfig(mtp_weight=0.0, indexer_weight=0.0, compute_dtype="float32")
    graphdef, state = train.init_train_state(model, tc)
    step = train.make_train_step(graphdef, tc)
    batch = {"tokens": jnp.asarray(random_tokens(cfg.vocab_size, args.batch, args.seq + 1))}
    hlo = step.lower(state, batch).compile().as_text()
    box = [state]

    def run():
        box[0], metrics = step(box[0], batch)
        jax.block_until_ready(metrics)

    return hlo, run


def main(argv=None) -> None:
    from dsv4.xla_flags import prefer_plain_cpu_fusions

    prefer_plain_cpu_fusions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("program", choices=("forward", "train"))
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3, help="timed runs before the profiled one")
    p.add_argument("--top", type=int, default=40, help="rows to print")
    p.add_argument("--by-thunk", action="store_true", help="list thunks, not source lines")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="change config fields (JSON values)")
    args = p.parse_args(argv)
    hlo, run = (forward_program if args.program == "forward" else train_program)(args)
    run()
    walls = []
    for _ in range(args.warmup):
        start = time.perf_counter()
        run()
        walls.append(time.perf_counter() - start)
    lines, skip = source_lines(hlo), containers(hlo)
    rows, thunks = collections.Counter(), collections.defaultdict(set)
    for name, (ms, _) in thunk_times(run).items():
        if name in lines and name not in skip:
            rows[name if args.by_thunk else lines[name]] += ms
            thunks[lines[name]].add(name)
    total = sum(rows.values())
    print(f"{args.program}, batch {args.batch} x {args.seq}: wall {', '.join(f'{w * 1e3:.0f}' for w in walls)} ms; "
          f"thunk time {total:.0f} ms (both cores)\n")  # fmt: skip
    print("| ms | share | " + ("thunk | source line |" if args.by_thunk else "thunks | source line |"))
    print("|---:|---:|---|---|")
    for key, ms in rows.most_common(args.top):
        label = f"{key} | {lines[key]}" if args.by_thunk else f"{len(thunks[key])} | {key}"
        print(f"| {ms:.1f} | {ms / total:.1%} | {label} |")


if __name__ == "__main__":
    main()
