"""dsv4-multihost across two local processes (4 CPU devices each, gloo collectives) vs one process.

The one-process, one-device run loads a tiny release-layout checkpoint (tests/release_fixture.py,
FP8/FP4 weights dequantized to float32); the two-process run (mesh data=2 x expert=4 over both
processes, dp_ep) restores the same checkpoint converted by `dsv4.convert` to Orbax (float32), each
process reading its own shards. Both generate greedily for the same prompts, and the two-process
run must write exactly the tokens of the one-process run. A cluster whose processes disagree on
--num-processes fails on every process with a clear message before anything is compiled.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 17, 99, 3], [200, 201, 202, 203, 204, 205, 206], [42], [7, 7, 7, 300, 301]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"  # conftest's
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _serve(args: list[str], devices: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sharding.serve", *args]
    return subprocess.Popen(cmd, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen], timeout: int = 600) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        out.append((p.returncode, err))
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from release_fixture import TINY_FLASH, write_release_checkpoint

    from dsv4 import convert

    root = tmp_path_factory.mktemp("multihost_ckpt")
    release, converted = root / "release", root / "orbax"
    write_release_checkpoint(TINY_FLASH, release, seed=3)
    convert.convert(release, converted, dtype="float32", progress=False)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "tokens": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return release, converted, prompts


def _common(checkpoint, prompts, output) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--prompts", str(prompts), "--output", str(output),
            "--dtype", "float32", "--cache-format", "float32", "--max-new-tokens", "6"]  # fmt: skip


def _read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_two_processes_generate_the_single_process_tokens(checkpoint, tmp_path):
    release, converted, prompts = checkpoint
    single = _serve(_common(release, prompts, tmp_path / "single.jsonl") + ["--data", "1", "--expert", "1"], 1)
    [(rc, err)] = _finish([single])
    assert rc == 0, err[-4000:]
    port = _free_port()
    procs = [
        _serve(_common(converted, prompts, tmp_path / f"multi{i}.jsonl")
               + ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i),
                  "--data", "2", "--expert", "4"], 4)
        for i in range(2)
    ]  # fmt: skip
    results = _finish(procs)
    for rc, err in results:
        assert rc == 0, err[-4000:]
    assert "2 process(es), mesh {'data': 2, 'expert': 4, 'tensor': 1}" in results[0][1]
    expected = _read(tmp_path / "single.jsonl")
    assert [r["id"] for r in expected] == ["p0", "p1", "p2", "p3"]
    assert all(len(r["tokens"]) >= 1 for r in expected)
    assert _read(tmp_path / "multi0.jsonl") == expected
    assert not (tmp_path / "multi1.jsonl").exists()  # only process 0 writes


def test_process_count_mismatch_fails_on_every_process_before_compiling(checkpoint, tmp_path):
    _, ckpt, prompts = checkpoint
    port = _free_port()
    procs = [
        _serve(_common(ckpt, prompts, tmp_path / "out.jsonl")
               + ["--coordinator", f"localhost:{port}", "--num-processes", str(n), "--process-id", str(i)], 4)
        for i, n in ((0, 2), (1, 3))
    ]  # fmt: skip
    for rc, err in _finish(procs, timeout=120):
        assert rc != 0
        assert "were started with --num-processes [3]: every host must pass the same count" in err, err[-3000:]
    assert not (tmp_path / "out.jsonl").exists()


def test_load_hf_creates_parameters_in_their_shards(checkpoint):
    ckpt, _, _ = checkpoint
    cmd = [sys.executable, __file__, str(ckpt)]
    proc = subprocess.run(cmd, env=_env(8), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mismatched_shardings"] == [] and result["mismatched_values"] == []
    assert result["expert_spec"][0] == "expert" and result["expert_spec"][1:] in ([], [None, None])
    assert result["expert_reads"] == result["experts"] > 0  # every expert read once, not once per device


def _load_worker(path: str) -> dict:
    """load_hf on a 2x4 mesh (dp_ep) against load_hf on one device: shardings and values."""
    import numpy as np
    from flax import nnx

    import dsv4.loading as loading
    from sharding.mesh import make_mesh
    from sharding.rules import param_shardings

    reads = []
    read = loading.read_dequantized
    loading.read_dequantized = lambda index, t, block: reads.append(t.name) or read(index, t, block)
    mesh = make_mesh(2, 4, 1)
    sharded = loading.load_hf(path, dtype="float32", mesh=mesh, strategy="dp_ep")
    loading.read_dequantized = read
    plain = loading.load_hf(path, dtype="float32")
    want = dict(nnx.to_flat_state(param_shardings(nnx.state(sharded), mesh, "dp_ep")))
    bad_sharding, bad_value = [], []
    plain_flat = dict(nnx.to_flat_state(nnx.state(plain)))
    for path_, var in nnx.to_flat_state(nnx.state(sharded)):
        value, name = var.get_value(), ".".join(map(str, path_))
        target = want[path_].get_value() if isinstance(want[path_], nnx.Variable) else want[path_]
        if not value.sharding.is_equivalent_to(target, value.ndim):
            bad_sharding.append(name)
        if not np.array_equal(np.asarray(value), np.asarray(plain_flat[path_].get_value())):
            bad_value.append(name)
    experts = [n for n in reads if ".experts." in n and n.endswith(".weight")]
    return {
        "mismatched_shardings": bad_sharding,
        "mismatched_values": bad_value,
        "expert_spec": list(sharded.layers[0].ffn.experts.w1.get_value().sharding.spec),
        "expert_reads": len(experts),
        "experts": len(set(experts)),
    }


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(_load_worker(sys.argv[1])))
