"""Load a checkpoint directory in the release layout (config.json + safetensors) into the model."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from dsv4.checkpoint import (
    ParamSpec,
    check_expert_ids,
    problem_report,
    read_dequantized,
    release_specs,
    validate_index,
)
from dsv4.config import ModelConfig, RuntimeConfig
from dsv4.model import DeepseekV4, abstract_model
from dsv4.safetensors_io import CheckpointError, CheckpointIndex
from sharding.rules import check_divisible, get_rules, param_shardings, validate


def weight_block(cfg: ModelConfig) -> tuple[int, int]:
    """FP8 scale tile of the checkpoint (quantization_config.weight_block_size, default 128x128)."""
    qc = cfg.quantization_config
    return tuple(qc.weight_block_size) if qc is not None else (128, 128)


def _assemble(index, spec: ParamSpec, block, shape, dtype, n_experts: int) -> np.ndarray:
    arrays = [read_dequantized(index, t, block) for t in spec.tensors]
    for t, array in zip(spec.tensors, arrays, strict=True):
        if t.kind == "int":  # tid2eid
            check_expert_ids(index, t, array, n_experts)
    value = spec.assemble(arrays)
    if tuple(value.shape) != tuple(shape):  # the table and the model disagree: a bug, not bad input
        raise AssertionError(f"{spec.tensors[0].name}: assembled {value.shape}, parameter is {shape}")
    return value.astype(dtype)


def load_hf(
    path: str | os.PathLike,
    dtype: str = "float32",
    attention_impl: str = "xla",
    query_block: int = 128,
    mesh=None,
    strategy=None,
) -> DeepseekV4:
    """Read a release-layout checkpoint directory and return the model.

    FP8 weights (E8M0 or F32 block scales) and FP4 experts are dequantized exactly
    (checkpoint_format.md s3), then cast to `dtype` (mHC, sinks, ape and router bias stay float32).
    Raises CheckpointError naming the file and tensor on any unknown, missing, duplicated,
    mis-shaped or mis-typed tensor, missing shard or truncated file; all problems are listed at once.

    With `mesh` (axes data, expert, tensor: `sharding.mesh.make_mesh`) every parameter is created
    directly in the sharding `strategy` gives it (default "dp_ep"; see `sharding.rules`), one
    `jax.make_array_from_callback` per parameter: a process only fills its own devices' shards, and
    of a routed-expert stack it reads only the experts its devices hold. The returned model's
    RuntimeConfig carries the mesh and strategy, so its MoE layers run expert-parallel.
    Bad mesh / strategy combinations raise ValueError before anything is read.
    """
    path = os.fspath(path)
    cfg = ModelConfig.from_hf_config(path)
    strategy = strategy if strategy is not None else "dp_ep"
    rt = RuntimeConfig(dtype=dtype, attention_impl=attention_impl, query_block=query_block, mesh=mesh,
                       strategy=strategy)  # fmt: skip
    if mesh is not None:
        validate(cfg, mesh, strategy)
    graphdef, state = nnx.split(abstract_model(cfg, rt))
    specs = release_specs(state)
    block = weight_block(cfg)
    index = CheckpointIndex(path)
    problems = validate_index(index, specs, block)
    if problems:
        raise CheckpointError(
            problem_report(f"checkpoint {path} does not match its config.json ({len(problems)} problem(s)):", problems)
        )
    if mesh is not None:
        check_divisible(state, mesh, get_rules(strategy))
    shardings = param_shardings(state, mesh, get_rules(strategy))
    flat = dict(nnx.to_flat_state(state))
    flat_shardings = dict(nnx.to_flat_state(shardings))
    for spec in specs:
        var = flat[spec.path]
        abstract = var.get_value()
        sharding = _leaf(flat_shardings[spec.path])
        var.set_value(_sharded_param(index, spec, block, abstract, sharding, cfg.n_routed_experts))
    return nnx.merge(graphdef, state)


def _sharded_param(index, spec: ParamSpec, block, abstract, sharding, n_experts: int) -> jax.Array:
    """One parameter as a global array in `sharding`, each process filling only its own shards.

    An expert stack (one release tensor per expert) is read only for the experts of the slice a
    device asks for; any other parameter is assembled once and sliced for each local device.
    """
    shape, stacked = tuple(abstract.shape), len(spec.tensors) > 1
    read: dict = {}  # expert range (or None: the whole parameter) -> host array

    def host(experts: tuple[int, int] | None) -> np.ndarray:
        if experts not in read:
            sub, rows = spec, shape
            if experts is not None:
                sub = dataclasses.replace(spec, tensors=spec.tensors[experts[0] : experts[1]])
                rows = (experts[1] - experts[0],) + shape[1:]
            read[experts] = _assemble(index, sub, block, rows, abstract.dtype, n_experts)
        return read[experts]

    def shard(idx):
        if not stacked:
            return host(None)[idx]
        first, stop, _ = idx[0].indices(shape[0])
        return host((first, stop))[(slice(None),) + tuple(idx[1:])]

    return jax.make_array_from_callback(shape, sharding, shard)


def _leaf(x):
    return x.get_value() if isinstance(x, nnx.Variable) else x
