"""Sharding: meshes, strategy tables, expert parallelism and sharded decoding on 8 fake CPU devices.

The checks that need 8 devices run in subprocesses (`python tests/test_sharding.py WORKER`) with
XLA_FLAGS=--xla_force_host_platform_device_count=8: the pytest process may already hold a
one-device JAX. Each worker prints one JSON line of measurements; the tests assert on them.

Model: ModelConfig.tiny cut to two layers (a hash-routed CSA layer and an HCA layer: every cache
part, both routers) to keep the (strategy, mesh) compilations affordable; sequences of 136
tokens, so the HCA layer emits an entry (ratio 128) and the CSA layer 34. Of the 13 cases (three
meshes x four strategies, plus tensor-parallel heads on 1x4x2), 9 are compiled and run; the
other 4 place every array exactly like one of those (nothing is split differently), which
test_equivalent_cases_place_identically checks without compiling. The meshes are experts only,
data only, and both (2x4x1); a 4x2x1 mesh splits the same axes as 2x4x1 with other sizes and was
left out to keep CI's time (its three compiled cases took ~50 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
SEQ = 136
MESHES = [(1, 8, 1), (2, 4, 1), (8, 1, 1)]
BATCH = {"dp_ep": 8, "dp_ep_a2a": 8, "tp_ep": 2, "replicated": 2}
# Cases whose placement is identical to another's (same parameter and cache specs, same expert
# plan: the same program) are not recompiled; test_equivalent_cases_place_identically checks that.
SAME_AS = {
    ("replicated", (1, 8, 1)): ("replicated", (2, 4, 1)),
    ("replicated", (8, 1, 1)): ("replicated", (2, 4, 1)),
    ("tp_ep", (8, 1, 1)): ("replicated", (2, 4, 1)),  # tensor 1, expert 1: nothing split
    ("dp_ep_a2a", (8, 1, 1)): ("dp_ep", (8, 1, 1)),  # expert 1: batch over data only
}
ALL_CASES = [(s, m) for s in BATCH for m in MESHES] + [("tp_ep", (1, 4, 2))]
CASES = [c for c in ALL_CASES if c not in SAME_AS]
FORWARD_CASES = {("dp_ep", (2, 4, 1)), ("dp_ep_a2a", (2, 4, 1)), ("tp_ep", (1, 4, 2))}  # model.forward too
GENERATE_CASES = {("dp_ep_a2a", (1, 8, 1)), ("tp_ep", (1, 4, 2))}  # dsv4.generate's on-device loop too
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [3], [100, 101], [4, 4, 4, 4], [9], [10, 11], [12, 13, 14]]


def run_worker(name: str, devices: int = 8, timeout: int = 1200) -> dict:
    """Run a worker of this file in a fresh process with `devices` CPU devices; its JSON result.

    XLA's backend optimisation level 0 halves CPU compile times; reference and sharded results are
    computed in the same process, under the same flags.
    """
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__, name], env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode:
        raise AssertionError(f"worker {name} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------- one-process tests (any device count)


def test_mesh_shape_inference_and_errors():
    from sharding.mesh import mesh_shape

    assert mesh_shape(8) == (1, 8, 1)
    assert mesh_shape(8, data=2) == (2, 4, 1)
    assert mesh_shape(8, expert=2) == (4, 2, 1)
    assert mesh_shape(8, expert=2, tensor=2) == (2, 2, 2)
    assert mesh_shape(8, data=8, expert=1) == (8, 1, 1)
    with pytest.raises(ValueError, match="do not divide the 8 devices"):
        mesh_shape(8, data=3)
    with pytest.raises(ValueError, match="= 4, but there are 8 devices"):
        mesh_shape(8, data=2, expert=2)
    with pytest.raises(ValueError, match="positive integer"):
        mesh_shape(8, data=0)
    with pytest.raises(ValueError, match="a mesh needs at least one device, got n_devices=0"):
        mesh_shape(0)  # was (1, 0, 1)


def test_strategy_tables():
    from sharding.rules import STRATEGIES, get_rules, get_strategy

    assert set(STRATEGIES) == {"dp_ep", "dp_ep_a2a", "tp_ep", "replicated"}
    assert get_strategy(None).name == "dp_ep"
    dp, tp = get_rules("dp_ep"), get_rules("tp_ep")
    assert dp["batch"] == "data" and dp["experts"] == "expert" and dp["heads"] is None
    assert tp["batch"] is None and tp["heads"] == tp["o_groups"] == tp["index_heads"] == "tensor"
    assert get_rules("dp_ep_a2a")["batch"] == ("data", "expert")
    for name in STRATEGIES:  # router, shared expert and mHC replicated everywhere
        rules = get_rules(name)
        assert all(rules[a] is None for a in ("router_experts", "expert_hidden", "hc_mix", "hc_embed", "embed"))
    assert all(v is None for v in get_rules("replicated").values())
    assert get_strategy("dp_ep").data_parallel and not get_strategy("tp_ep").data_parallel


def test_unknown_strategy_and_axis_are_clear_errors():
    import jax
    from jax.sharding import AxisType

    from dsv4.config import ConfigError, RuntimeConfig
    from sharding.rules import Strategy, get_rules, get_strategy, logical_to_spec, single_device_mesh

    with pytest.raises(ValueError, match="unknown sharding strategy 'fsdp'"):
        get_strategy("fsdp")
    with pytest.raises(ConfigError, match="unknown sharding strategy"):
        RuntimeConfig(strategy="fsdp")
    bad = Strategy("mine", {**get_rules("dp_ep"), "heads": "model"})
    with pytest.raises(ConfigError, match="'heads' maps to mesh axis 'model'"):
        RuntimeConfig(mesh=single_device_mesh(), strategy=bad)
    with pytest.raises(ValueError, match="strategy 'mine': table must map logical axis names to mesh axes"):
        Strategy("mine", "dp_ep")  # a name where the table belongs: accepted, then a dict() error with a mesh
    explicit = jax.make_mesh((1, 1, 1), ("data", "expert", "tensor"), axis_types=(AxisType.Explicit,) * 3)
    with pytest.raises(ConfigError, match="mesh: strategy 'dp_ep': mesh axes .* are not of type Auto"):
        RuntimeConfig(mesh=explicit, strategy="dp_ep")
    with pytest.raises(ValueError, match="both map to mesh axis"):
        logical_to_spec(("experts", "batch"), {"experts": "data", "batch": "data"})
    with pytest.raises(ValueError, match="no entry"):
        logical_to_spec(("nope",), get_rules("dp_ep"))


def test_validate_names_every_indivisible_size():
    from jax.sharding import AbstractMesh

    from dsv4.config import ModelConfig
    from sharding.rules import validate

    cfg = ModelConfig.tiny()  # 8 experts, 4 heads, 2 output groups, 4 indexer heads
    validate(cfg, AbstractMesh((2, 4, 1), ("data", "expert", "tensor")), "dp_ep", batch=8)
    with pytest.raises(ValueError, match="batch = 3 is not divisible by 2"):
        validate(cfg, AbstractMesh((2, 4, 1), ("data", "expert", "tensor")), "dp_ep", batch=3)
    with pytest.raises(ValueError, match="batch = 4 is not divisible by 8"):
        validate(cfg, AbstractMesh((2, 4, 1), ("data", "expert", "tensor")), "dp_ep_a2a", batch=4)
    with pytest.raises(ValueError, match="n_routed_experts = 6 is not divisible by 4"):
        validate(ModelConfig.tiny(n_routed_experts=6), AbstractMesh((1, 4, 1), ("data", "expert", "tensor")))
    with pytest.raises(ValueError, match="num_attention_heads = 4 is not divisible by 8") as err:
        validate(cfg, AbstractMesh((1, 1, 8), ("data", "expert", "tensor")), "tp_ep")
    assert "o_groups = 2" in str(err.value) and "index_n_heads = 4" in str(err.value)
    assert "\n" not in str(err.value)  # dsv4-multihost prints it as its one error line
    with pytest.raises(ValueError, match="which the mesh"):
        validate(cfg, AbstractMesh((2, 4), ("data", "expert")), "tp_ep")
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh, got NoneType"):
        validate(cfg, None, "dp_ep")  # e.g. shard_model(model, None): was an AttributeError inside a warning check


def test_a_mesh_axis_the_strategy_never_splits_over_is_named():
    """dp_ep on a mesh with tensor = 2 passed validation without a word: every weight was copied
    across `tensor`, half the devices repeating the others' work (146 GiB per device for Flash)."""
    import warnings

    from jax.sharding import AbstractMesh

    from dsv4.config import ModelConfig
    from sharding import rules
    from sharding.rules import unused_axes, validate

    cfg = ModelConfig.tiny()
    mesh = AbstractMesh((1, 4, 2), ("data", "expert", "tensor"))
    rules._WARNED_UNUSED.clear()
    with pytest.warns(RuntimeWarning, match="strategy 'dp_ep' splits nothing over mesh axis 'tensor' of size 2.*tp_ep"):
        validate(cfg, mesh, "dp_ep")
    with warnings.catch_warnings():  # once per process: validate runs in every load, shard and CLI check
        warnings.simplefilter("error")
        validate(cfg, mesh, "dp_ep")
    assert unused_axes("tp_ep", mesh) == [] and unused_axes("replicated", mesh) == []  # replicated: by design
    assert unused_axes("tp_ep", AbstractMesh((2, 4, 1), ("data", "expert", "tensor"))) == ["data"]
    # a strategy that splits nothing on this mesh is not "replicated": dp_ep on tensor = 8 copies everything
    assert unused_axes("dp_ep", AbstractMesh((1, 1, 8), ("data", "expert", "tensor"))) == ["tensor"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate(cfg, mesh, "tp_ep")
        validate(cfg, AbstractMesh((2, 4, 1), ("data", "expert", "tensor")), "dp_ep", batch=2)


def test_exchange_is_chosen_by_backend():
    from sharding.expert_parallel import exchange_for

    assert exchange_for("cpu") == "padded"
    assert exchange_for("gpu") == exchange_for("cuda") == exchange_for("rocm") == exchange_for("tpu") == "ragged"


def test_distributed_args_validation(monkeypatch):
    from sharding.mesh import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID, distributed_args

    monkeypatch.setenv(ENV_COORDINATOR, "10.0.0.1:1234")
    monkeypatch.setenv(ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(ENV_PROCESS_ID, "3")
    assert distributed_args() == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
    assert distributed_args(num_processes=8)["num_processes"] == 8  # flags win over the environment
    with pytest.raises(ValueError, match="outside \\[0, 4\\)"):
        distributed_args(process_id=4)
    with pytest.raises(ValueError, match="host:port"):
        distributed_args(coordinator="nohost")
    monkeypatch.setenv(ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="is not an integer"):
        distributed_args()


@pytest.mark.parametrize("given", [dict(process_id=3), dict(num_processes=4), dict(num_processes=4, process_id=1)])
def test_a_process_id_or_count_without_a_coordinator_is_refused(monkeypatch, given):
    """`--process-id 3` alone (no coordinator, no detected cluster) was ignored: each host ran alone
    as process 0 of 1 and wrote its own output."""
    import sharding.mesh as mesh_module

    for var in (mesh_module.ENV_COORDINATOR, mesh_module.ENV_NUM_PROCESSES, mesh_module.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(mesh_module, "_cluster_detected", lambda: False)
    with pytest.raises(ValueError, match="without a coordinator \\(--coordinator / DSV4_COORDINATOR\\)"):
        mesh_module.initialize_distributed(**given)
    assert mesh_module.initialize_distributed() is None  # nothing given: one process, left alone
    assert mesh_module.initialize_distributed(num_processes=1, process_id=0) is None


def test_every_logical_axis_has_a_rule_and_is_documented():
    import re

    from flax import nnx

    import dsv4.params
    from dsv4.config import ModelConfig
    from dsv4.model import abstract_model
    from dsv4.params import logical_axes
    from sharding.placement import CACHE_AXES
    from sharding.rules import REPLICATED_RULES, STRATEGIES

    state = nnx.state(abstract_model(ModelConfig.tiny()))
    used = {a for _, v in nnx.to_flat_state(state) for a in logical_axes(v) if a}
    used |= {a for axes in CACHE_AXES.values() for a in axes if a}
    assert "router_experts" in used and "batch" in used
    assert used <= set(REPLICATED_RULES), used - set(REPLICATED_RULES)
    assert all(set(s.rules) == set(REPLICATED_RULES) for s in STRATEGIES.values())
    documented = set(re.findall(r"^    ([a-z_]+) +[A-Z-] ", dsv4.params.__doc__, re.M))
    assert documented == set(REPLICATED_RULES), documented ^ set(REPLICATED_RULES)


def test_multihost_cli_rejects_bad_prompts_and_strategy_before_loading(tmp_path, monkeypatch, capsys):
    from sharding.mesh import CLUSTER_MARKERS
    from sharding.serve import main, padded_batch, read_prompts

    for var in ("DSV4_COORDINATOR", "DSV4_NUM_PROCESSES", "DSV4_PROCESS_ID", *CLUSTER_MARKERS):
        monkeypatch.delenv(var, raising=False)
    good, bad, empty = tmp_path / "good.jsonl", tmp_path / "bad.jsonl", tmp_path / "empty.jsonl"
    good.write_text('{"id": "a", "tokens": [1, 2]}\n\n{"tokens": [3]}\n')
    bad.write_text('{"id": 1, "tokens": [1, 2]}\n{"id": 2, "text": "hi"}\n')
    empty.write_text("\n")
    assert read_prompts(good) == (["a", 1], [[1, 2], [3]])
    with pytest.raises(ValueError, match="bad.jsonl:2: each line needs a 'tokens' list"):
        read_prompts(bad)  # text without a tokenizer
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(empty)
    assert padded_batch([[1], [2], [3]], 2) == [[1], [2], [3], [1]]
    out = tmp_path / "out.jsonl"
    assert main(["--checkpoint", str(tmp_path / "missing"), "--prompts", str(good), "--output", str(out),
                 "--strategy", "fsdp"]) == 2  # fmt: skip  (the checkpoint is never read)
    assert "unknown sharding strategy 'fsdp'" in capsys.readouterr().err
    assert not out.exists()


def test_collective_parser_counts_wire_bytes():
    from sharding.collectives import collectives, expert_weight_gathers

    hlo = "\n".join([
        "%psum.1 = f32[4,64]{1,0} all-reduce(%x), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%r",
        "%ag = f32[8,64,32]{2,1,0} all-gather(%w), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}",
        "%a2a = (f32[1,2]{1,0}, f32[1,2]{1,0}) all-to-all(%a, %b), channel_id=3, replica_groups={{0,1},{2,3}}",
        "%cp = s32[4]{0} collective-permute(%c), source_target_pairs={{0,0},{1,2},{2,1},{3,3}}",
        "%ar = f32[2,1,64]{2,1,0} all-reduce(%y), channel_id=4, replica_groups=mesh['axis_0'=1,'axis_1'=2,"
        "'axis_2'=4], device_ids=([4,2]T(1,0)) {'axis_1'}, use_global_device_ids=true, to_apply=%add",
        "%add = f32[4]{0} add(%p, %q)",
    ])  # fmt: skip
    found = collectives(hlo, 8)
    assert [c.op for c in found] == ["all-reduce", "all-gather", "all-to-all", "collective-permute", "all-reduce"]
    assert [c.group for c in found] == [4, 4, 2, 8, 2]
    assert found[0].wire_bytes == 2 * 3 / 4 * 4 * 64 * 4
    assert found[1].wire_bytes == 3 / 4 * 8 * 64 * 32 * 4
    assert found[2].wire_bytes == 1 / 2 * 16 and found[3].wire_bytes == 16 * 2 / 4
    assert expert_weight_gathers(found, hidden=64, expert_hidden=32) == [found[1]]
    # GPU/TPU programs run these asynchronously; a start's result tuple holds its operand as well
    hlo = "\n".join([
        "%ags = (f32[1,64,32]{2,1,0}, f32[8,64,32]{2,1,0}) all-gather-start(%w), replica_groups=[1,8]<=[8], "
        "dimensions={0}",
        "%agd = f32[8,64,32]{2,1,0} all-gather-done(%ags)",
        "%cps = (s32[4]{0}, s32[4]{0}, u32[], u32[]) collective-permute-start(%c), source_target_pairs={{0,1},{1,0}}",
        "%ars = f32[4,64]{1,0} all-reduce-start(%x), replica_groups={{0,1,2,3}}, to_apply=%r",
        "%agc = ((bf16[1,16]{1,0}, f32[2,4]{1,0}), (bf16[8,16]{1,0}, f32[16,4]{1,0})) all-gather-start(%a, %b), "
        "replica_groups=[1,8]<=[8], dimensions={0}",  # two all-gathers combined into one
    ])  # fmt: skip
    found = collectives(hlo, 8)
    assert [c.op for c in found] == ["all-gather", "collective-permute", "all-reduce", "all-gather"]
    assert found[3].shapes == (("bf16", (8, 16)), ("f32", (16, 4)))
    assert found[0].shapes == (("f32", (8, 64, 32)),) and found[0].wire_bytes == 7 / 8 * 8 * 64 * 32 * 4
    assert found[1].wire_bytes == 16 and found[2].wire_bytes == 2 * 3 / 4 * 4 * 64 * 4


# ------------------------------------------------------------------------ 8-device tests (subprocesses)


@pytest.fixture(scope="module")
def matrix():
    return run_worker("matrix")


@pytest.mark.parametrize("strategy,mesh", CASES, ids=[f"{s}-{'x'.join(map(str, m))}" for s, m in CASES])
def test_sharded_logits_equal_single_device(matrix, strategy, mesh):
    case = matrix[f"{strategy}/{mesh}"]
    assert case["whole"] <= TOL, case
    assert case["prefill_decode"] <= TOL, case
    if "forward" in case:
        assert case["forward"] <= TOL, case
    assert case["greedy_equal"], case
    if (strategy, mesh) in GENERATE_CASES:  # dsv4.generate's on-device loop on the sharded model
        assert case["generated_equal"], case
        assert case["generate_caches"] == 1 and case["generate_cache_mismatches"] == [], case


@pytest.mark.parametrize("strategy,mesh", CASES, ids=[f"{s}-{'x'.join(map(str, m))}" for s, m in CASES])
def test_shardings_follow_the_rules(matrix, strategy, mesh):
    case = matrix[f"{strategy}/{mesh}"]
    assert case["param_mismatches"] == [], case["param_mismatches"]
    assert case["cache_mismatches"] == [], case["cache_mismatches"]  # after a donated decode step too
    spec = case["specs"]
    ep_axes = {"dp_ep": ["expert"], "dp_ep_a2a": ["expert"], "tp_ep": ["expert", "tensor"], "replicated": []}
    sizes = dict(zip(("data", "expert", "tensor"), mesh, strict=True))
    expected_experts = [a for a in ep_axes[strategy] if sizes[a] > 1]
    assert spec["experts"] == expected_experts
    assert spec["router"] == [] and spec["shared_expert"] == []
    assert spec["wq_b_heads"] == (["tensor"] if strategy == "tp_ep" and mesh[2] > 1 else [])


@pytest.mark.parametrize("strategy,mesh", CASES, ids=[f"{s}-{'x'.join(map(str, m))}" for s, m in CASES])
def test_decode_step_never_gathers_expert_weights(matrix, strategy, mesh):
    case = matrix[f"{strategy}/{mesh}"]
    assert case["expert_weight_gathers"] == [], case["expert_weight_gathers"]
    if strategy == "dp_ep":  # data-parallel per device: the experts' psum is the only collective
        assert {c[0] for c in case["collectives"]} <= {"all-reduce"}, case["collectives"]
    if strategy == "replicated":
        assert case["collectives"] == []


def test_equivalent_cases_place_identically():
    result = run_worker("placement")
    assert result and all(result.values()), result


def test_expert_parallel_modes_equal_single_device():
    result = run_worker("experts")
    for name, err in result["errors"].items():
        assert err <= 1e-6, (name, err)
    assert result["cpu_exchange"] == "padded"
    assert result["ragged_lowers_to_ragged_all_to_all"]
    assert result["padded_has_all_to_all"] and not result["padded_has_ragged"]


def test_bad_inputs_fail_before_compiling():
    result = run_worker("errors")
    assert result.pop("source_model_left_alone")
    result = result["errors"]
    for name, (message, compiles) in result.items():
        assert compiles == 0, (name, message)
        assert message, name
    assert "n_routed_experts = 12 is not divisible by 8" in result["experts"][0]
    assert "num_attention_heads = 4 is not divisible by 8" in result["heads"][0]
    for name in ("batch", "generate_batch", "decode_batch"):
        assert "batch 2 is not divisible by 4" in result[name][0], (name, result[name])
    assert "mesh axis 'model'" in result["axis"][0]
    assert "psum needs tokens replicated over the expert axes ('expert',)" in result["psum_split"][0]
    assert "mesh axes {'data': 'Explicit', 'expert': 'Explicit', 'tensor': 'Explicit'} are not of type Auto" in (
        result["explicit_axes"][0]
    )
    assert "n_routed_experts = 12 is not divisible by 8" in result["init_model"][0]


def test_init_model_on_a_mesh_creates_each_parameter_in_its_shards():
    """No device holds the whole model: the routed experts (8) sit 2 per device on an expert axis of 4."""
    result = run_worker("init")
    for strategy in ("dp_ep", "tp_ep"):
        case = result[strategy]
        assert case["mismatches"] == [] and case["same_paths"] and case["mesh_in_rt"], case
        assert case["max_abs_diff"] <= 1e-7, case  # parameters ~N(0, 0.02): a different draw is ~1e-2 away
    assert result["dp_ep"]["expert_rows_per_device"] == [2]
    assert result["tp_ep"]["expert_rows_per_device"] == [1]  # (expert, tensor) = 8 ways


def test_sharded_forward_of_any_batch_shape():
    """The experts' shard_map splits the B x S tokens; [3, 3] or [1, 5] on a data axis of 2 had failed
    inside it. They are padded to the split and the padding dropped."""
    for case, err in run_worker("odd_forward").items():
        assert err <= 1e-6, (case, err)


def test_a_keep_quantized_checkpoint_generates_data_parallel():
    """dp_ep's per-device program took its in_specs from a sharding tree that was no prefix of a
    state holding QuantizedWeights: prefill and generate failed (the forward did not). Placing
    such a model after loading (`shard_model`, `generate(..., mesh=)`) failed the same way."""
    result = run_worker("quantized")
    assert result["sharded"] == result["plain"] and len(result["plain"][0]) == 4
    assert result["placed"] == result["plain"]


# -------------------------------------------------------------------------------------- workers


def _rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _config():
    from dsv4.config import ModelConfig

    return ModelConfig.tiny(num_hidden_layers=2, compress_ratios=(4, 128, 0), num_hash_layers=1)


def _spec_axes(sharding, dim: int = 0) -> list[str]:
    spec = tuple(sharding.spec) + (None,) * 8
    axes = spec[dim]
    return [] if axes is None else [axes] if isinstance(axes, str) else list(axes)


def _param_mismatches(model, mesh, strategy) -> list[str]:
    from flax import nnx

    from sharding.rules import param_shardings

    expected = dict(nnx.to_flat_state(param_shardings(nnx.state(model), mesh, strategy)))
    bad = []
    for path, var in nnx.to_flat_state(nnx.state(model)):
        want = expected[path]
        want = want.get_value() if isinstance(want, nnx.Variable) else want
        value = var.get_value()
        if not value.sharding.is_equivalent_to(want, value.ndim):
            bad.append(f"{'.'.join(map(str, path))}: {value.sharding.spec} != {want.spec}")
    return bad


def _cache_mismatches(cache, mesh, strategy) -> list[str]:
    import jax

    from sharding.placement import cache_shardings

    want = jax.tree.leaves(cache_shardings(cache, mesh, strategy))
    got = jax.tree_util.tree_leaves_with_path(cache)
    return [
        f"{jax.tree_util.keystr(p)}: {getattr(x.sharding, 'spec', x.sharding)} != {w.spec}"
        for (p, x), w in zip(got, want, strict=True)
        if not x.sharding.is_equivalent_to(w, x.ndim)
    ]


def _run_case(model, cfg, strategy, shape, tokens, ref, ref_greedy, ref_generated) -> dict:
    """Shard `model`, run forward / prefill / decode, compare with the single-device `ref` logits."""
    import importlib

    import jax
    import numpy as np

    from dsv4.cache import init_cache
    from dsv4.decode import _device_batch, decode_fn, prefill
    from dsv4.model import forward
    from sharding.collectives import collectives, expert_weight_gathers
    from sharding.mesh import make_mesh
    from sharding.placement import shard_model

    mesh = make_mesh(*shape)
    m = shard_model(model, mesh, strategy)
    b = tokens.shape[0]
    out = {}
    if (strategy, shape) in FORWARD_CASES:
        out["forward"] = _rel(forward(m, tokens), ref)
    logits, _ = prefill(m, tokens, init_cache(cfg, b, SEQ, "float32"))  # one chunk: the whole sequence
    out["whole"] = _rel(logits, ref)
    padded = np.where(np.arange(SEQ) < SEQ - 2, tokens, 0)  # the same program: S - 2 real tokens
    logits, cache = prefill(m, padded, init_cache(cfg, b, SEQ, "float32"), lengths=np.full(b, SEQ - 2))
    compiled = decode_fn.lower(m, _device_batch(m, tokens[:, SEQ - 2]), cache).compile()
    pieces = [np.asarray(logits)[:, : SEQ - 2]]
    for i in (SEQ - 2, SEQ - 1):
        step, cache = compiled(m, _device_batch(m, tokens[:, i]), cache)
        pieces.append(np.asarray(step)[:, None])
    decoded = np.concatenate(pieces, axis=1)
    out["prefill_decode"] = _rel(decoded, ref)
    out["greedy_equal"] = bool(np.array_equal(decoded.argmax(-1), ref_greedy))
    if (strategy, shape) in GENERATE_CASES:
        from dsv4.generate import generate

        # tp_ep: the unsharded model with mesh=/strategy= (generate places it); otherwise the sharded model
        placement = {"mesh": mesh, "strategy": strategy} if strategy == "tp_ep" else {}
        made = []  # the caches generate makes: created in their shards (it had built them on one device)
        module = importlib.import_module("dsv4.generate")  # `dsv4.generate` is the function
        empty_cache = module._empty_cache
        module._empty_cache = lambda *a: made.append(empty_cache(*a)) or made[-1]
        try:
            generated = generate(model if placement else m, PROMPTS[:b], 5, stop_tokens=(), **placement)
        finally:
            module._empty_cache = empty_cache
        out["generated_equal"] = generated == ref_generated[:b]
        out["generate_cache_mismatches"] = [x for c in made for x in _cache_mismatches(c, mesh, strategy)]
        out["generate_caches"] = len(made)
    out["param_mismatches"] = _param_mismatches(m, mesh, strategy)
    out["cache_mismatches"] = _cache_mismatches(cache, mesh, strategy)
    layer = m.layers[0]
    out["specs"] = {
        "experts": _spec_axes(layer.ffn.experts.w1.get_value().sharding),
        "router": _spec_axes(layer.ffn.gate.weight.get_value().sharding, 1),
        "shared_expert": _spec_axes(layer.ffn.shared_experts.w1.weight.get_value().sharding, 1),
        "wq_b_heads": _spec_axes(layer.attn.wq_b.weight.get_value().sharding, 1),
    }
    found = collectives(compiled.as_text(), jax.device_count())
    out["expert_weight_gathers"] = [c.text[:200] for c in expert_weight_gathers(found, cfg.hidden_size,
                                                                               cfg.moe_intermediate_size)]  # fmt: skip
    out["collectives"] = [(c.op, c.result_bytes) for c in found]
    return out


def worker_matrix() -> dict:
    import numpy as np

    from dsv4.config import RuntimeConfig
    from dsv4.generate import generate
    from dsv4.model import forward, init_model

    cfg = _config()
    model = init_model(cfg, RuntimeConfig(dtype="float32", query_block=64), seed=0)
    tokens = np.random.default_rng(0).integers(2, cfg.vocab_size, (8, SEQ)).astype(np.int32)
    ref = np.asarray(forward(model, tokens))
    generated = generate(model, PROMPTS, 5, stop_tokens=())
    results = {}
    for strategy, shape in CASES:
        b = BATCH[strategy]
        out = _run_case(model, cfg, strategy, shape, tokens[:b], ref[:b], ref[:b].argmax(-1), generated)
        results[f"{strategy}/{shape}"] = out
    return results


def _placement(strategy, shape) -> dict:
    """Everything that decides the compiled program, short of compiling: specs and the expert plan."""
    import jax
    from flax import nnx

    from dsv4.cache import init_cache
    from dsv4.model import abstract_model
    from sharding.expert_parallel import ExpertParallel
    from sharding.mesh import make_mesh
    from sharding.placement import cache_shardings
    from sharding.rules import get_strategy, param_shardings

    cfg, mesh = _config(), make_mesh(*shape)
    state = nnx.state(abstract_model(cfg))
    cache = jax.eval_shape(lambda: init_cache(cfg, BATCH[strategy], SEQ, "float32"))
    plan = ExpertParallel.plan(mesh, strategy)
    return {
        "params": [str(x.spec) for x in jax.tree.leaves(param_shardings(state, mesh, strategy))],
        "cache": [str(x.spec) for x in jax.tree.leaves(cache_shardings(cache, mesh, strategy))],
        "plan": None if plan is None else [plan.token_axes, plan.expert_axes, plan.mode],
        "per_device": get_strategy(strategy).data_parallel,
        "batch": BATCH[strategy],
    }


def worker_placement() -> dict:
    """For each case not compiled: whether it places everything exactly like its stand-in."""
    out = {f"{c}": _placement(*c) == _placement(*same) for c, same in SAME_AS.items()}
    control = _placement("dp_ep", (2, 4, 1)) != _placement("dp_ep", (1, 8, 1))
    out["control: dp_ep 2x4x1 is not placed like dp_ep 1x8x1"] = control
    return out


def worker_experts() -> dict:
    """Every exchange of sharding.expert_parallel against the one-device Experts, on random routing."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dsv4.config import ModelConfig
    from dsv4.moe import Experts
    from dsv4.params import KeyChain
    from sharding.expert_parallel import ExpertParallel, emulated_ragged_all_to_all
    from sharding.mesh import make_mesh
    from sharding.rules import Strategy, get_rules

    cfg = ModelConfig.tiny(n_routed_experts=16, num_experts_per_tok=3)
    experts = Experts(cfg, jnp.float32, KeyChain(0))
    rng = np.random.default_rng(0)
    n = 40  # not a multiple of 8 or 16: the split path pads
    x = jnp.asarray(rng.normal(size=(n, cfg.hidden_size)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(16, 3, replace=False) for _ in range(n)]), jnp.int32)
    idx = idx.at[:8].set(jnp.array([0, 1, 2]))  # a crowd on one device: nothing may be dropped
    w = jnp.asarray(rng.random((n, 3)), jnp.float32)
    ref = experts(x, w, idx)
    weights = [v.get_value() for v in (experts.w1, experts.w3, experts.w2)]
    split_tp = Strategy("split_tp", {**get_rules("tp_ep"), "batch": ("expert", "tensor")}, "all_to_all")
    replicated_a2a = Strategy("replicated_a2a", get_rules("dp_ep"), "all_to_all")
    cases = {
        "psum 2x4": ("dp_ep", (2, 4, 1), None),
        "psum over (expert, tensor) 1x2x4": ("tp_ep", (1, 2, 4), None),
        "padded, tokens split 2x4": ("dp_ep_a2a", (2, 4, 1), None),
        "padded, tokens split 1x8": ("dp_ep_a2a", (1, 8, 1), None),
        "padded, replicated tokens split and gathered 2x4": (replicated_a2a, (2, 4, 1), None),
        "ragged (emulated), tokens split 2x4": ("dp_ep_a2a", (2, 4, 1), "ragged"),
        "ragged (emulated), tokens split 1x8": ("dp_ep_a2a", (1, 8, 1), "ragged"),
        "ragged (emulated), replicated tokens 1x8": (replicated_a2a, (1, 8, 1), "ragged"),
        "ragged (emulated), over (expert, tensor) 2x2x2": (split_tp, (2, 2, 2), "ragged"),
    }
    errors = {}
    for name, (strategy, shape, exchange) in cases.items():
        plan = ExpertParallel.plan(make_mesh(*shape), strategy, exchange)
        fn = jax.jit(lambda *a, plan=plan: plan(*a, cfg.swiglu_limit, ragged_all_to_all=emulated_ragged_all_to_all))
        errors[name] = _rel(fn(x, w, idx, *weights), ref)
    mesh = make_mesh(2, 4, 1)
    auto = ExpertParallel.plan(mesh, "dp_ep_a2a")
    ragged = ExpertParallel.plan(mesh, "dp_ep_a2a", "ragged")
    lowered = jax.jit(lambda *a: ragged(*a, cfg.swiglu_limit)).lower(x, w, idx, *weights).as_text()
    padded = jax.jit(lambda *a: auto(*a, cfg.swiglu_limit)).lower(x, w, idx, *weights).compile().as_text()
    return {
        "errors": errors,
        "cpu_exchange": auto.exchange,
        "ragged_lowers_to_ragged_all_to_all": "ragged_all_to_all" in lowered,
        "padded_has_all_to_all": "all-to-all" in padded,
        "padded_has_ragged": "ragged-all-to-all" in padded,
    }


def worker_errors() -> dict:
    """Each bad input raises a clear error; count the compilations that happened before it."""
    import jax
    import numpy as np
    from flax import nnx

    from dsv4.cache import init_cache
    from dsv4.config import RuntimeConfig
    from dsv4.decode import decode_step, prefill
    from dsv4.generate import generate
    from dsv4.model import init_model
    from sharding.mesh import make_mesh
    from sharding.placement import shard_model
    from sharding.rules import Strategy, get_rules

    cfg = _config()
    rt = RuntimeConfig(dtype="float32")
    model = init_model(cfg, rt)
    odd = init_model(cfg.__class__.tiny(n_routed_experts=12, num_hidden_layers=2, compress_ratios=(4, 128, 0),
                                        num_hash_layers=1), rt)  # fmt: skip
    sharded = shard_model(model, make_mesh(4, 2, 1), "dp_ep")
    left_alone = all(len(v.sharding.device_set) == 1 for v in jax.tree.leaves(nnx.state(model)))
    events = []
    jax.monitoring.register_event_duration_secs_listener(lambda name, *_, **__: events.append(name))

    def attempt(fn):
        events.clear()
        try:
            fn()
        except ValueError as err:  # ConfigError is a ValueError
            compiles = sum(e.endswith(("backend_compile_duration", "jaxpr_trace_duration")) for e in events)
            return str(err), compiles
        return "", -1

    bad_axis = Strategy("mine", {**get_rules("dp_ep"), "experts": "model"})
    psum_split = Strategy("psum_split", {**get_rules("dp_ep"), "batch": ("data", "expert")}, "psum")
    explicit = jax.make_mesh((2, 4, 1), ("data", "expert", "tensor"))  # Explicit axes: jax's default
    tokens, cache = np.ones((2, 8), np.int32), init_cache(cfg, 2, 16, "float32")
    errors = {
        "experts": attempt(lambda: shard_model(odd, make_mesh(1, 8, 1), "dp_ep")),
        "heads": attempt(lambda: shard_model(model, make_mesh(1, 1, 8), "tp_ep")),
        "batch": attempt(lambda: prefill(sharded, tokens, cache)),
        "generate_batch": attempt(lambda: generate(sharded, [[1, 2], [3]], 2)),  # was shard_map's error
        "decode_batch": attempt(lambda: decode_step(sharded, [1, 2], cache)),  # was an IndivisibleError
        "axis": attempt(lambda: shard_model(model, make_mesh(2, 4, 1), bad_axis)),
        # the next two were accepted here and failed in the first forward (the first inside JAX)
        "psum_split": attempt(lambda: shard_model(model, make_mesh(2, 4, 1), psum_split)),
        "explicit_axes": attempt(lambda: shard_model(model, explicit, "dp_ep")),
        # init_model under a mesh it cannot use: built, then the first forward failed inside shard_map
        "init_model": attempt(lambda: init_model(odd.cfg, RuntimeConfig(dtype="float32", mesh=make_mesh(1, 8, 1)))),
    }
    return {"errors": errors, "source_model_left_alone": left_alone}  # shard_model had moved its variables


def worker_init() -> dict:
    """`init_model` under a mesh: each parameter created in its sharding (`init_sharded`), equal to the
    one-device init up to float32 rounding (one jitted program against op-by-op execution)."""
    import numpy as np
    from flax import nnx

    import dsv4
    from dsv4.config import RuntimeConfig
    from sharding.mesh import make_mesh

    cfg = _config()
    one = dict(nnx.to_flat_state(nnx.state(dsv4.init_model(cfg, RuntimeConfig(dtype="float32"), seed=3))))
    out = {}
    for strategy, shape in (("dp_ep", (2, 4, 1)), ("tp_ep", (1, 4, 2))):
        mesh = make_mesh(*shape)
        model = dsv4.init_model(cfg, RuntimeConfig(dtype="float32", mesh=mesh, strategy=strategy), seed=3)
        flat = dict(nnx.to_flat_state(nnx.state(model)))
        diff = max(
            float(np.max(np.abs(np.asarray(v.get_value(), np.float64) - np.asarray(one[k].get_value(), np.float64))))
            for k, v in flat.items() if v.get_value().size
        )  # fmt: skip
        w1 = model.layers[0].ffn.experts.w1.get_value()
        out[strategy] = {
            "mismatches": _param_mismatches(model, mesh, strategy),
            "same_paths": sorted(map(str, flat)) == sorted(map(str, one)),
            "max_abs_diff": diff,
            "expert_rows_per_device": sorted({int(sh.data.shape[0]) for sh in w1.addressable_shards}),
            "mesh_in_rt": model.rt.mesh is mesh,
        }
    return out


def worker_odd_forward() -> dict:
    """Sharded forwards of batches whose B x S the token split does not divide: error against one device."""
    import numpy as np

    import dsv4
    from dsv4.config import RuntimeConfig
    from sharding.mesh import make_mesh
    from sharding.placement import shard_model

    base = dsv4.init_model(_config(), RuntimeConfig(dtype="float32"))
    out = {}
    for strategy, mesh in (("dp_ep", (2, 4, 1)), ("dp_ep_a2a", (2, 2, 2))):
        sharded = shard_model(base, make_mesh(*mesh), strategy)
        for shape in ((3, 3), (1, 5)):
            tokens = np.random.default_rng(0).integers(0, base.cfg.vocab_size, shape)
            out[f"{strategy} {shape}"] = _rel(dsv4.forward(sharded, tokens), dsv4.forward(base, tokens))
    return out


def worker_quantized() -> dict:
    """The embedded default converted with keep_quantized: greedy tokens on a dp_ep mesh and on one device."""
    import tempfile
    from pathlib import Path

    import dsv4
    from dsv4 import convert
    from dsv4.cli import default_checkpoint_dir
    from sharding.mesh import make_mesh

    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "quantized"
        convert.convert(default_checkpoint_dir(), dst, dtype="float32", keep_quantized=True, progress=False)
        plain = dsv4.load(dst, dtype="float32")
        sharded = dsv4.load(dst, dtype="float32", mesh=make_mesh(2, 4, 1), strategy="dp_ep")
        prompts = [[0, 5, 6], [0, 7]]
        out = {"plain": dsv4.generate(plain, prompts, 4), "sharded": dsv4.generate(sharded, prompts, 4)}
        out["placed"] = dsv4.generate(plain, prompts, 4, mesh=make_mesh(2, 4, 1), strategy="dp_ep")  # shard_model
        return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    workers = {"matrix": worker_matrix, "experts": worker_experts, "errors": worker_errors}
    workers["placement"] = worker_placement
    workers["quantized"] = worker_quantized
    workers["odd_forward"] = worker_odd_forward
    workers["init"] = worker_init
    print(json.dumps(workers[sys.argv[1]]()))


def test_cluster_detection_asks_jax_cluster_environments(monkeypatch):
    """A plain Cloud TPU VM slice sets none of the marker variables: JAX's own detection must count."""
    from jax._src.clusters import ClusterEnv

    from sharding import mesh

    for var in mesh.CLUSTER_MARKERS:
        monkeypatch.delenv(var, raising=False)

    class Present:
        opt_in_only_method = False
        is_env_present = staticmethod(lambda: True)

    class OptInOnly(Present):  # like mpi4py: only used when asked for by name
        opt_in_only_method = True

    monkeypatch.setattr(ClusterEnv, "_cluster_types", [OptInOnly])
    assert not mesh._cluster_detected()
    monkeypatch.setattr(ClusterEnv, "_cluster_types", [OptInOnly, Present])
    assert mesh._cluster_detected()
    monkeypatch.setattr(ClusterEnv, "_cluster_types", [])
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert mesh._cluster_detected()


def test_check_sharded_script_compares_and_reports():
    """scripts/check_sharded.py with the programs' XLA setting (dsv4.xla_flags.YNN_DOTS_ONLY): the
    forward on 2 host devices, and on one device beside a busy thread, equals the one-device forward
    at S = 2,048 with 8 heads (exit 0). With every YNNPACK fusion off
    (XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=), XLA:CPU's own dots made this same command
    report MISMATCH (both comparisons, relative errors ~1e-2 and 7.4e-3 on the 2-core machine,
    jaxlib 0.10.2: README, "Running on a mesh"); not asserted here, as it depends on XLA's timing."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    script = ROOT / "scripts/check_sharded.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--seq", "2048", "--busy-thread", "--set", "num_attention_heads=8"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "2 cpu devices, mesh {'data': 2, 'expert': 1, 'tensor': 1}, strategy dp_ep, batch 2, S 2048" in proc.stdout
    assert "sharded: relative error" in proc.stdout and "one device beside a busy thread: relative error" in proc.stdout
    assert "OK: the logits equal the one-device logits" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr  # the programs' setting keeps the dots with YNNPACK


def test_check_sharded_lists_the_differing_positions(monkeypatch):
    import numpy as np

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from check_sharded import differing_positions

    ref = np.zeros((2, 6, 3), np.float32)
    out = ref.copy()
    out[0, [1, 4], 2] = 0.5
    out[1, 5, 0] = 1e-4  # below atol
    assert differing_positions(ref, out, atol=1e-3) == [[1, 4], []]


def test_meshes_of_several_cpu_devices_warn_once(monkeypatch):
    """The XLA:CPU wrong-logits setting (README: YNNPACK's dots off) is announced once per process,
    only on CPU meshes, and only when XLA_FLAGS takes the dots away from YNNPACK."""
    import numpy as np

    from dsv4.xla_flags import YNN_DOTS_ONLY, YNN_FLAG
    from sharding import rules

    class Device:
        def __init__(self, platform):
            self.platform = platform

    class FakeMesh:
        def __init__(self, n, platform):
            self.devices = np.array([Device(platform) for _ in range(n)], dtype=object)

    monkeypatch.setattr(rules, "_WARNED", [])
    for flags in ("", YNN_DOTS_ONLY):  # XLA's defaults, dsv4's programs' setting
        monkeypatch.setenv("XLA_FLAGS", flags)
        assert not rules.warn_cpu_multidevice(FakeMesh(2, "cpu"))
    monkeypatch.setenv("XLA_FLAGS", f"{YNN_FLAG}=")
    assert not rules.warn_cpu_multidevice(FakeMesh(1, "cpu"))
    assert not rules.warn_cpu_multidevice(FakeMesh(8, "gpu"))
    with pytest.warns(RuntimeWarning, match="dsv4 on 2 CPU devices with XLA_FLAGS .*wrong logits"):
        assert rules.warn_cpu_multidevice(FakeMesh(2, "cpu"))
    assert not rules.warn_cpu_multidevice(FakeMesh(2, "cpu"))  # once per process
