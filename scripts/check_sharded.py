"""Check that a sharded forward computes the one-device forward's logits on this machine.

    python scripts/check_sharded.py                                   # 2 CPU devices, dp_ep, S = 512
    python scripts/check_sharded.py --seq 2048 --set num_attention_heads=8     # the case CI checks (+ --busy-thread)
    python scripts/check_sharded.py --strategy replicated --batch 1 --seq 4096 --set num_attention_heads=8
    python scripts/check_sharded.py --busy-thread --seq 4096 --set num_attention_heads=8  # one device, busy

The benchmark config (`scripts/_bench_common.BENCH_OVERRIDES`, random weights, float32) runs once
on one device and once sharded by `--strategy` over a (data, expert, tensor) mesh of every device;
the two logits must agree to `--rtol` (relative Frobenius error). Prints the error, the largest
absolute difference and, per batch row, the first positions that differ; exits 1 on a mismatch.
With `--busy-thread` it also runs the one-device forward again while another thread of this
process keeps XLA busy with unrelated products, and compares that too.

On CPU the devices are `--cpu-devices` host devices (XLA_FLAGS
--xla_force_host_platform_device_count, set here before JAX starts unless XLA_FLAGS already
names a count), and XLA:CPU gets dsv4's programs' setting (`dsv4.xla_flags.prefer_plain_cpu_fusions`:
YNNPACK runs the dots) unless XLA_FLAGS chooses one. Why this exists: with jaxlib 0.10.2 and every
YNNPACK fusion off (XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=), the 8-head config at S = 2,048
and 4,096 on 2 host devices gave wrong logits for the first ~96 positions (dp_ep and replicated
alike), and so did one device beside another thread's XLA work (`--busy-thread`), while one device
alone, and S <= 1,024, agreed: XLA's own dots computed them wrong (README, "Running on a mesh").
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COUNT_FLAG = "--xla_force_host_platform_device_count"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", default="dp_ep", help="sharding strategy (sharding.rules.STRATEGIES)")
    p.add_argument("--cpu-devices", type=int, default=2, help="host devices when running on CPU")
    p.add_argument("--data", type=int, help="mesh data size (default: every device)")
    p.add_argument("--expert", type=int, help="mesh expert size (default: the rest)")
    p.add_argument("--tensor", type=int, default=1, help="mesh tensor size")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rtol", type=float, default=1e-5, help="largest relative (Frobenius) error accepted")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="change config fields (JSON values)")
    p.add_argument("--busy-thread", action="store_true", help="also run one device beside a busy thread")
    return p.parse_args(argv)


@contextmanager
def busy_thread():
    """Another thread runs unrelated XLA products ([1024, 1024] matmuls) until the block ends."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((1024, 1024), jnp.float32)
    work = jax.jit(lambda x: jax.lax.fori_loop(0, 20, lambda i, y: jnp.tanh(y @ x), x))
    work(x).block_until_ready()
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            work(x).block_until_ready()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def compare(name: str, ref, out, rtol: float) -> bool:
    """Print how `out` differs from `ref` (relative error, largest difference, first positions)."""
    import numpy as np

    err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    print(f"{name}: relative error {err:.2e} (limit {rtol:g}), largest difference {np.abs(out - ref).max():.3g}")
    if err > rtol:
        for row, positions in enumerate(differing_positions(ref, out, atol=1e-3)):
            print(f"  row {row}: first positions differing by > 1e-3: {positions}")
    return err <= rtol


def differing_positions(ref, out, atol: float, show: int = 8) -> list[list[int]]:
    """Per batch row, the first `show` positions whose logits differ by more than `atol`."""
    import numpy as np

    bad = np.abs(ref - out).max(axis=-1) > atol  # [B, S]
    return [np.nonzero(row)[0][:show].tolist() for row in bad]


def main(argv=None) -> int:
    args = parse_args(argv)
    if COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {COUNT_FLAG}={args.cpu_devices}".strip()
    from dsv4.xla_flags import prefer_plain_cpu_fusions

    prefer_plain_cpu_fusions()
    import jax
    import numpy as np
    from _bench_common import bench_config, parse_changes, random_tokens

    import dsv4
    from dsv4.config import RuntimeConfig
    from sharding import batch_sharding, make_mesh, put, shard_model

    cfg = bench_config(parse_changes(args.set))
    rt = RuntimeConfig(dtype="float32")
    tokens = random_tokens(cfg.vocab_size, args.batch, args.seq)
    data = args.data if args.data is not None or args.expert is not None else jax.device_count() // args.tensor
    mesh = make_mesh(data=data, expert=args.expert, tensor=args.tensor)
    one_device = dsv4.init_model(cfg, rt, seed=0)
    ref = np.asarray(dsv4.forward(one_device, tokens))
    model = shard_model(dsv4.init_model(cfg, rt, seed=0), mesh, args.strategy)
    out = np.asarray(dsv4.forward(model, put(tokens, batch_sharding(mesh, args.strategy, 2))))
    print(f"{jax.device_count()} {jax.default_backend()} devices, mesh {dict(mesh.shape)}, strategy "
          f"{args.strategy}, batch {args.batch}, S {args.seq}")  # fmt: skip
    ok = compare("sharded", ref, out, args.rtol)
    if args.busy_thread:
        with busy_thread():
            busy = np.asarray(dsv4.forward(one_device, tokens))
        ok = compare("one device beside a busy thread", ref, busy, args.rtol) and ok
    print("OK: the logits equal the one-device logits" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
