"""Check that a sharded forward computes the one-device forward's logits on this machine.

    python scripts/check_sharded.py                                   # 2 CPU devices, dp_ep, S = 512
    python scripts/check_sharded.py --seq 2048 --set num_attention_heads=8     # mismatches here (jaxlib 0.10.2)
    python scripts/check_sharded.py --strategy replicated --batch 1 --seq 4096 --set num_attention_heads=8

The benchmark config (`scripts/_bench_common.BENCH_OVERRIDES`, random weights, float32) runs once
on one device and once sharded by `--strategy` over a (data, expert, tensor) mesh of every device;
the two logits must agree to `--rtol` (relative Frobenius error). Prints the error, the largest
absolute difference and, per batch row, the first positions that differ; exits 1 on a mismatch.

On CPU the devices are `--cpu-devices` host devices (XLA_FLAGS
--xla_force_host_platform_device_count, set here before JAX starts unless XLA_FLAGS already
names a count). Why this exists: with jaxlib 0.10.2 on the 2-core CPU machines, the 8-head config
at S = 2,048 and 4,096 on 2 host devices gives wrong logits for the first ~96 positions (dp_ep and
replicated alike), while one device, and S <= 1,024, agree (README, "Running on a mesh").
"""

from __future__ import annotations

import argparse
import os
import sys
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
    return p.parse_args(argv)


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
    ref = np.asarray(dsv4.forward(dsv4.init_model(cfg, rt, seed=0), tokens))
    model = shard_model(dsv4.init_model(cfg, rt, seed=0), mesh, args.strategy)
    out = np.asarray(dsv4.forward(model, put(tokens, batch_sharding(mesh, args.strategy, 2))))
    err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    ok = err <= args.rtol
    print(f"{jax.device_count()} {jax.default_backend()} devices, mesh {dict(mesh.shape)}, strategy "
          f"{args.strategy}, batch {args.batch}, S {args.seq}")  # fmt: skip
    print(f"relative error {err:.2e} (limit {args.rtol:g}), largest difference {np.abs(out - ref).max():.3g}")
    if not ok:
        for row, positions in enumerate(differing_positions(ref, out, atol=1e-3)):
            print(f"  row {row}: first positions differing by > 1e-3: {positions}")
    print("OK: the sharded logits equal the one-device logits" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
