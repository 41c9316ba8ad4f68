"""dsv4-convert in subprocesses: a fake 8-device mesh, an interrupted run and --resume, peak memory.

- Mesh: restoring onto a (data 2, expert 4) mesh of 8 fake CPU devices puts every array in the
  sharding the rules table gives (experts split over "expert", also for keep-quantized data and
  scales) and gives the single-device logits within float32 rounding (relative error <= 1e-6;
  measured 3.5e-7: the MoE runs expert-parallel, which sums in another order), dense or quantized.
- Interruption: a conversion killed (SIGKILL) after a few units leaves no DST; --resume skips the
  recorded units and produces byte-identical arrays to an uninterrupted run.
- Memory: a synthetic checkpoint of ~290 MB (~1 GB of bfloat16 output) converts in 8 MiB units
  while the process grows by no more than 2 units + per-worker scratch + 32 MiB over its footprint
  before the conversion, the bound `--help` states, several times smaller than the checkpoint.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import dsv4
from dsv4 import convert
from dsv4.cli_convert import main
from dsv4.safetensors_io import CheckpointError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "convert_hf.py"


def run_python(code: str, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "scripts"), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def all_arrays(dst: Path) -> dict:
    """Every array of DST/params, read back through tensorstore, by name."""
    manifest = convert.read_manifest(dst)
    store = convert.ArrayStore(dst / convert.PARAMS_DIR)
    arrays = [
        convert.StoredArray(tuple(name.split(".")), tuple(a["shape"]), np.dtype(a["dtype"]), ())
        for name, a in manifest["arrays"].items()
    ]
    store.open_existing(arrays)
    return {a.name: store.read(a) for a in arrays}


def assert_same_arrays(a: Path, b: Path) -> None:
    left, right = all_arrays(a), all_arrays(b)
    assert left.keys() == right.keys()
    for name in left:
        assert np.array_equal(left[name].view(np.uint8), right[name].view(np.uint8)), name


@pytest.fixture(scope="module")
def flash_dsts(tmp_path_factory, flash_ckpt):
    root = tmp_path_factory.mktemp("flash-dsts")
    src = flash_ckpt[0]
    for keep in (False, True):
        convert.convert(src, root / f"kq-{keep}", dtype="float32", keep_quantized=keep, workers=2, progress=False)
    convert.convert(src, root / "bfloat16", dtype="bfloat16", workers=2, progress=False)
    return root


# ----------------------------------------------------------------------------------------- mesh


def test_restore_onto_an_8_device_mesh(tmp_path, flash_ckpt, flash_dsts):
    src, _, cfg = flash_ckpt
    tokens = np.random.default_rng(0).integers(0, cfg["vocab_size"], (2, 64))
    np.save(tmp_path / "tokens.npy", tokens)
    np.save(tmp_path / "expected.npy", np.asarray(dsv4.forward(dsv4.load_hf(src, dtype="float32"), tokens)))
    code = f"""
        import jax, numpy as np
        from flax import nnx
        from jax.sharding import AxisType, PartitionSpec as P
        import dsv4
        from dsv4.quantized import QuantizedWeight
        from dsv4.restore import load
        from sharding.rules import param_shardings

        assert len(jax.devices()) == 8
        mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)
        model = load("{flash_dsts / "kq-False"}", mesh=mesh)
        state = nnx.split(model)[1]
        wanted = dict(nnx.to_flat_state(param_shardings(state, mesh)))
        for path, var in nnx.to_flat_state(state):
            want = wanted[path]
            want = want.get_value() if isinstance(want, nnx.Variable) else want
            assert var.get_value().sharding == want, (path, var.get_value().sharding, want)
        w1 = model.layers[0].ffn.experts.w1.get_value()
        assert w1.sharding.spec == P("expert", None, None), w1.sharding
        assert {{s.data.shape[0] for s in w1.addressable_shards}} == {{w1.shape[0] // 4}}
        tokens = np.load("{tmp_path / "tokens.npy"}")
        got = np.asarray(dsv4.forward(model, tokens))
        expected = np.load("{tmp_path / "expected.npy"}")
        err = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
        print("mesh logits relative error", err, "exact", bool(np.array_equal(got, expected)))
        assert err <= 1e-6

        quantized = load("{flash_dsts / "kq-True"}", mesh=mesh)
        qstate = nnx.split(quantized)[1]
        shardings = jax.tree.leaves(param_shardings(qstate, mesh))
        arrays = jax.tree.leaves(qstate)
        assert len(shardings) == len(arrays)
        for array, sharding in zip(arrays, shardings):
            assert array.sharding == sharding, (array.sharding, sharding)
        q = quantized.layers[0].ffn.experts.w1.get_value()
        assert isinstance(q, QuantizedWeight)
        assert q.data.sharding.spec == P("expert", None, None) and q.scale.sharding.spec == P("expert", None, None)
        got = np.asarray(dsv4.forward(quantized, tokens))  # expert-parallel on the local quantized shards
        err = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
        print("mesh keep-quantized logits relative error", err)
        assert err <= 1e-6
        print("OK")
    """
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"  # as conftest's
    result = run_python(code, {"XLA_FLAGS": flags})
    print(result.stdout)
    assert "OK" in result.stdout


# ------------------------------------------------------------------------------- interruption


def test_interrupted_conversion_leaves_no_destination_and_resumes(tmp_path, flash_ckpt, flash_dsts):
    src, dst = flash_ckpt[0], tmp_path / "dst"
    record = convert.temp_dir(dst) / convert.PROGRESS_FILE
    env = {**os.environ, "JAX_PLATFORMS": "cpu", convert.TEST_DELAY_ENV: "0.4"}
    cmd = [sys.executable, str(SCRIPT), str(src), str(dst), "--dtype", "float32", "--no-progress", "--workers", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    done = []
    while len(done) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)
        if record.exists():  # written to a temporary file and renamed: never seen half-written
            done = json.loads(record.read_text())["completed"]
    proc.kill()
    proc.wait()
    assert not dst.exists()
    assert convert.temp_dir(dst).exists()
    finish = re.escape(f"unfinished conversion: `dsv4-convert SRC {dst} --resume` finishes it")
    for path in (dst, convert.temp_dir(dst)):  # loading either says how to finish it
        with pytest.raises(CheckpointError, match=finish):
            dsv4.load(path)
    assert main([str(src), str(dst), "--dtype", "float32", "--no-progress", "--resume"]) == 0
    summary = convert.read_manifest(dst)["summary"]
    assert summary["units_resumed"] >= 3
    assert not convert.temp_dir(dst).exists()
    assert_same_arrays(dst, flash_dsts / "kq-False")


@pytest.mark.parametrize(
    "dtype, keep, baseline",
    [("float32", False, "kq-False"), ("bfloat16", False, "bfloat16"), ("float32", True, "kq-True")],
)
def test_small_units_and_chunks_give_the_same_checkpoint(
    tmp_path, monkeypatch, flash_ckpt, flash_dsts, dtype, keep, baseline
):
    """Row-range units of the embedding and head (converted, or copied as stored in bfloat16),
    partial last chunks, one-expert groups, row-chunked quantized data."""
    monkeypatch.setattr(convert, "CHUNK_BYTES", 20 * 1024)  # f32 embed: 80 rows per chunk (512 = 6 x 80 + 32)
    convert.convert(flash_ckpt[0], tmp_path / "dst", dtype=dtype, keep_quantized=keep, unit_bytes=32 * 1024,
                    progress=False)  # fmt: skip
    assert convert.read_manifest(tmp_path / "dst")["summary"]["units"] > 20  # default units: 15
    assert_same_arrays(tmp_path / "dst", flash_dsts / baseline)


# ---------------------------------------------------------------------------------------- memory


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_convert", REPO / "scripts" / "bench_convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_memory_stays_within_the_bound(tmp_path):
    bench = _bench_module()
    big = dsv4.ModelConfig.tiny(
        hidden_size=512, moe_intermediate_size=1024, n_routed_experts=80, num_hidden_layers=4,
        compress_ratios=(0, 4, 128, 0, 0), vocab_size=4096, num_hash_layers=1,
    )  # fmt: skip
    total = bench.write_synthetic_release(big, tmp_path / "big", max_shard_bytes=64 << 20)
    bench.write_synthetic_release(dsv4.ModelConfig.tiny(), tmp_path / "warm", max_shard_bytes=1 << 20)
    code = f"""
        import json
        from dsv4 import convert

        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096

        convert.convert("{tmp_path / "warm"}", "{tmp_path / "warm-out"}", workers=2, progress=False)
        before = rss()  # the runtime's footprint, every code path loaded
        s = convert.convert("{tmp_path / "big"}", "{tmp_path / "big-out"}", workers=2, unit_bytes=8 << 20,
                            progress=False)
        print(json.dumps(dict(before=before, peak=s.peak_rss_bytes, unit=s.largest_unit_bytes,
                              bound=s.memory_bound_bytes, written=s.bytes_written)))
    """
    m = json.loads(run_python(code).stdout.strip().splitlines()[-1])
    growth = m["peak"] - m["before"]
    allowed = 2 * m["unit"] + 2 * convert.WORKER_SCRATCH_BYTES + (32 << 20)
    print(f"checkpoint {total / 1e6:.0f} MB, output {m['written'] / 1e6:.0f} MB, largest unit {m['unit'] / 1e6:.1f} MB,"
          f" RSS {m['before'] / 1e6:.0f} -> {m['peak'] / 1e6:.0f} MB (growth {growth / 1e6:.0f} MB, allowed"
          f" {allowed / 1e6:.0f} MB, stated bound {m['bound'] / 1e6:.0f} MB)")  # fmt: skip
    assert total > 3 * allowed and m["written"] > 10 * allowed  # the checkpoint dwarfs the bound
    assert growth <= allowed
    assert m["peak"] <= m["bound"]
