"""Load a checkpoint directory in the release layout (config.json + safetensors) into the model."""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from dsv4.checkpoint import ParamSpec, read_dequantized, release_specs, validate_index
from dsv4.config import ModelConfig, RuntimeConfig
from dsv4.model import DeepseekV4, abstract_model
from dsv4.safetensors_io import CheckpointError, CheckpointIndex
from sharding.rules import param_shardings


def weight_block(cfg: ModelConfig) -> tuple[int, int]:
    """FP8 scale tile of the checkpoint (quantization_config.weight_block_size, default 128x128)."""
    qc = cfg.quantization_config
    return tuple(qc.weight_block_size) if qc is not None else (128, 128)


def _assemble(index, spec: ParamSpec, block, shape, dtype) -> np.ndarray:
    arrays = [read_dequantized(index, t, block) for t in spec.tensors]
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
) -> DeepseekV4:
    """Read a release-layout checkpoint directory and return the model.

    FP8 weights (E8M0 or F32 block scales) and FP4 experts are dequantized exactly
    (checkpoint_format.md s3), then cast to `dtype` (mHC, sinks, ape and router bias stay float32).
    Raises CheckpointError naming the file and tensor on any unknown, missing, duplicated,
    mis-shaped or mis-typed tensor, missing shard or truncated file; all problems are listed at once.
    """
    path = os.fspath(path)
    cfg = ModelConfig.from_hf_config(path)
    rt = RuntimeConfig(dtype=dtype, attention_impl=attention_impl, query_block=query_block)
    graphdef, state = nnx.split(abstract_model(cfg, rt))
    specs = release_specs(state, cfg)
    block = weight_block(cfg)
    index = CheckpointIndex(path)
    problems = validate_index(index, specs, block)
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not match its config.json:\n  " + "\n  ".join(problems)
        )
    shardings = param_shardings(state, mesh)
    flat = dict(nnx.to_flat_state(state))
    flat_shardings = dict(nnx.to_flat_state(shardings)) if isinstance(shardings, nnx.State) else None
    for spec in specs:
        var = flat[spec.path]
        abstract = var.get_value()
        host = _assemble(index, spec, block, abstract.shape, abstract.dtype)
        sharding = _leaf(flat_shardings[spec.path]) if flat_shardings else None
        var.set_value(jax.device_put(host, sharding))
    return nnx.merge(graphdef, state)


def _leaf(x):
    return x.get_value() if isinstance(x, nnx.Variable) else x
