"""The sharded train step on 8 fake CPU devices equals the single-device step.

Runs in a subprocess (`python tests/test_train_sharding.py`) with
XLA_FLAGS=--xla_force_host_platform_device_count=8, like tests/test_sharding.py: the pytest process
may already hold a one-device JAX. Model: ModelConfig.tiny cut to one CSA layer with a top-k router
(indexer KL, expert loads and the sequence-wise balance loss all in play), float32, remat on (the
`training_model` default). One AdamW step on a batch of 8 with one padded row, on meshes
(data, expert, tensor) = (2, 4, 1) (expert-parallel MoE, batch split in two) and (8, 1, 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
MESHES = [(2, 4, 1), (8, 1, 1)]


def test_sharded_train_step_equals_single_device():
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=1))
    for mesh in MESHES:
        case = result[str(mesh)]
        assert max(case["metrics"].values()) <= TOL, case
        assert case["params"] <= TOL and case["grads"] <= TOL and case["frozen"] <= TOL, case
        assert case["misplaced"] == [], case
    assert result[str((2, 4, 1))]["experts_spec"] == ["expert", None, None]


# -------------------------------------------------------------------------------------- worker


def _global_rel(a, b) -> float:
    """Relative error of the whole tree `a` against `b` (all leaves as one vector)."""
    import jax
    import numpy as np

    a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _one_step(mesh_shape, batch):
    """(state, metrics) after one train step of a fresh model, on one device or sharded on a mesh."""
    import dsv4
    from dsv4 import train
    from dsv4.config import ModelConfig, RuntimeConfig
    from sharding.mesh import make_mesh
    from sharding.placement import shard_model

    cfg = ModelConfig.tiny(num_hidden_layers=1, compress_ratios=(4, 0), num_hash_layers=0, index_topk=4)
    tc = train.TrainConfig(lr=1e-3, warmup_steps=0, total_steps=10, mtp_weight=0.0, seq_balance_weight=0.01,
                           compute_dtype="float32")  # fmt: skip
    model = train.training_model(dsv4.init_model(cfg, RuntimeConfig(dtype="float32", query_block=16), seed=0))
    if mesh_shape is not None:
        model = shard_model(model, make_mesh(*mesh_shape))
    graphdef, state = train.init_train_state(model, tc)
    return train.make_train_step(graphdef, tc)(state, batch)


def worker() -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from dsv4 import train

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 512, (8, 17)).astype(np.int32)
    mask = np.ones(tokens.shape, bool)
    mask[3, 12:] = False
    batch = {"tokens": tokens, "mask": mask}
    ref_state, ref_metrics = _one_step(None, batch)
    out = {}
    for shape in MESHES:
        state, metrics = _one_step(shape, batch)
        mesh = jax.tree.leaves(state.params)[0].sharding.mesh
        want = jax.tree.leaves(train.train_state_shardings(state, mesh))
        misplaced = [str(x.sharding.spec) for x, w in zip(jax.tree.leaves(state), want, strict=True)
                     if not x.sharding.is_equivalent_to(w, x.ndim)]  # fmt: skip
        w1 = state.params["layers"][0]["ffn"]["experts"]["w1"].get_value()
        out[str(shape)] = {
            "metrics": {k: abs(float(metrics[k]) - float(ref_metrics[k])) / max(abs(float(ref_metrics[k])), 1e-30)
                        for k in ref_metrics},  # fmt: skip
            "params": _global_rel(state.params, ref_state.params),
            "grads": _global_rel(state.opt_state[1][0].mu, ref_state.opt_state[1][0].mu),  # (1 - b1) * grad
            "frozen": _global_rel(state.frozen, ref_state.frozen),
            "misplaced": misplaced,
            "experts_spec": list(w1.sharding.spec) + [None] * (3 - len(w1.sharding.spec)),
            "devices": len(w1.sharding.device_set),
        }
        assert isinstance(state.params, nnx.State)
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(worker()))
