"""Restore a converted checkpoint (`dsv4.convert`) straight into sharded device arrays.

`load(path, mesh)` builds the abstract model from DST's config.json, asks the sharding rules for
each parameter's NamedSharding, and lets Orbax read every array directly into that sharding: each
device reads only its own slice, so no host ever holds an unsharded copy of a sharded weight.
Weights kept quantized (`--keep-quantized`) come back as `QuantizedWeight` pytrees whose data and
scales are sharded like the parameter they stand for.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from dsv4.config import ModelConfig, RuntimeConfig
from dsv4.convert import DAMAGED, MANIFEST_FILE, PARAMS_DIR, read_manifest, reporting_damage
from dsv4.model import DeepseekV4, abstract_model
from dsv4.params import logical_axes
from dsv4.quantized import QuantizedWeight, implied_shapes, quantized_axes
from dsv4.safetensors_io import CheckpointError
from sharding.rules import (
    check_divisible,
    get_rules,
    logical_to_spec,
    param_shardings,
    single_device_mesh,
    validate,
)


def _named(mesh: Mesh, axes: tuple, rules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh))


def _leaf(x):
    return x.get_value() if isinstance(x, nnx.Variable) else x


def _array_info(manifest: dict, name: str, where: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        info = manifest["arrays"][name]
    except KeyError:
        raise CheckpointError(f"{where}: array {name!r} is not in the checkpoint") from None
    return tuple(info["shape"]), np.dtype(info["dtype"])


class _Targets:
    """The Orbax `item` (abstract arrays with their shardings) and `restore_args` trees, built per array."""

    def __init__(self):
        self.item: dict = {}
        self.args: dict = {}

    def add(self, key: tuple[str, ...], shape, dtype, sharding) -> None:
        import orbax.checkpoint as ocp

        item, args = self.item, self.args
        for k in key[:-1]:
            item, args = item.setdefault(k, {}), args.setdefault(k, {})
        item[key[-1]] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        args[key[-1]] = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=shape, dtype=dtype)


def _get(tree: dict, key: tuple[str, ...]):
    for k in key:
        tree = tree[k]
    return tree


def _check_quantized(name: str, q: dict, data_shape, scale_shape, wanted, where: Path) -> None:
    """CheckpointError unless a kept-quantized weight stands for the parameter's shape, with its scales."""
    dense, scale = implied_shapes(data_shape, q["fmt"], q["layout"], q["groups"], q["block"])
    if dense != wanted:
        raise CheckpointError(f"{where}: quantized array {name!r} ({q['fmt']} data {list(data_shape)}) stands "
                              f"for shape {list(dense)}, the model wants {list(wanted)}")  # fmt: skip
    if tuple(scale_shape) != scale:
        raise CheckpointError(f"{where}: array '{name}.scale' has shape {list(scale_shape)}, its data "
                              f"{list(data_shape)} needs {list(scale)}")  # fmt: skip


def _plan_restore(state, shardings, manifest, mesh, rules, where, allow_partial):
    """Orbax targets for every parameter DST holds (dense, or data + scale); missing ones are refused
    unless `allow_partial`."""
    flat_shardings = dict(nnx.to_flat_state(shardings))
    targets, missing, quantized = _Targets(), [], manifest.get("quantized", {})
    for path, var in nnx.to_flat_state(state):
        key = tuple(str(p) for p in path)
        name = ".".join(key)
        abstract = var.get_value()
        if name in quantized:
            q = quantized[name]
            data_axes, scale_axes = quantized_axes(logical_axes(var), q["layout"])
            parts = {part: _array_info(manifest, f"{name}.{part}", where) for part in ("data", "scale")}
            _check_quantized(name, q, parts["data"][0], parts["scale"][0], tuple(abstract.shape), where)
            for part, axes in (("data", data_axes), ("scale", scale_axes)):
                shape, dtype = parts[part]
                targets.add(key + (part,), shape, dtype, _named(mesh, axes, rules))
        elif name in manifest["arrays"]:
            shape, _ = _array_info(manifest, name, where)
            if shape != tuple(abstract.shape):
                raise CheckpointError(f"{where}: array {name!r} has shape {list(shape)}, the model wants "
                                      f"{list(abstract.shape)}")  # fmt: skip
            targets.add(key, shape, abstract.dtype, _leaf(flat_shardings[tuple(path)]))
        else:
            missing.append(name)
    extra = sorted(set(manifest["arrays"]) - set(_names(targets.item)))
    if extra:
        raise CheckpointError(
            f"{where}: {len(extra)} array(s) the model of its config.json has no parameter for, e.g. "
            f"{extra[:3]}; was config.json changed after conversion?"
        )
    if missing and not allow_partial:
        raise CheckpointError(
            f"{where}: {len(missing)} parameter(s) missing (partial conversion?), e.g. {missing[:3]}; "
            "a partial (dsv4-convert --layers) checkpoint loads only from Python, with "
            "dsv4.load(..., allow_partial=True); convert without --layers for the console scripts"
        )
    return targets


def _names(item: dict) -> list[str]:
    """The array names (dotted keys) of an Orbax item tree."""
    return [".".join(p.key for p in path) for path, _ in jax.tree_util.tree_leaves_with_path(item)]


def _check_stored_arrays(where: Path, item: dict) -> None:
    """CheckpointError before Orbax reads anything, from each array's zarr `.zarray` and chunk files:
    first naming every array whose stored shape differs from the manifest's (Orbax would refuse them
    too, naming none), then the first whose directory or chunk files are missing, or whose
    uncompressed chunks are not their full size (a read failing inside Orbax's restore leaves its
    other reads as abandoned coroutines that print "Event loop is closed" tracebacks after the
    one-line error). Metadata that cannot be parsed is left to the restore's own error."""
    metas, found = {}, []
    for name, want in zip(_names(item), jax.tree.leaves(item), strict=True):
        array = where / name
        try:
            metas[name] = meta = json.loads((array / ".zarray").read_text())
            shape = tuple(meta["shape"])
        except FileNotFoundError:
            problem = f'its directory "{array}" is missing' if not array.is_dir() else '".zarray" is missing'
            raise CheckpointError(f"{where}: cannot read array {name}: {problem}; {DAMAGED}") from None
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if shape != tuple(want.shape):
            found.append(f"{name} holds {list(shape)}, {MANIFEST_FILE} says {list(want.shape)}")
    if found:
        listed = "; ".join(found[:3]) + (f"; {len(found) - 3} more" if len(found) > 3 else "")
        raise CheckpointError(f"{where}: {listed}; the checkpoint is damaged or was changed after conversion")
    for name, meta in metas.items():
        problem = _chunk_problem(where / name, meta)
        if problem:
            raise CheckpointError(f"{where}: cannot read array {name}: {problem}; {DAMAGED}")


def _chunk_problem(array: Path, meta: dict) -> str | None:
    """What is wrong with a zarr v2 array's chunk files (None: nothing found)."""
    try:
        shape, chunks = [int(n) for n in meta["shape"]], [int(n) for n in meta["chunks"]]
        itemsize = np.dtype(meta["dtype"]).itemsize
        sep = meta.get("dimension_separator") or "."
    except (KeyError, TypeError, ValueError):
        return None  # left to the restore's own error
    full = math.prod(chunks) * itemsize if meta.get("compressor") is None else None
    for index in itertools.product(*(range(-(-n // c)) for n, c in zip(shape, chunks, strict=True))):
        chunk = array / (sep.join(map(str, index)) or "0")
        if not chunk.is_file():
            if meta.get("fill_value") is None:  # a missing chunk would be read as an error
                return f'chunk file "{chunk}" is missing'
        elif full is not None and chunk.stat().st_size != full:
            return f'chunk file "{chunk}" holds {chunk.stat().st_size} bytes, not {full}'
    return None


def load(
    path: str | os.PathLike,
    mesh: Mesh | None = None,
    dtype: str | None = None,
    attention_impl: str = "xla",
    query_block: int = 128,
    strategy=None,
    allow_partial: bool = False,
) -> DeepseekV4:
    """Restore the model from a converted checkpoint directory.

    Args:
      path: DST of `dsv4-convert`.
      mesh: device mesh with the rules table's axis names (default: one device).
      dtype: runtime dtype of the main weights; default the dtype the checkpoint was converted to.
        Dense arrays are cast by the reader; quantized weights dequantize to it on the fly.
      strategy: sharding strategy (`sharding.rules`, default "dp_ep"), as for `load_hf`.
      allow_partial: accept a `--layers`/partial conversion; missing parameters stay abstract.
    Returns:
      The model, each array placed in the sharding the strategy's rules give it on `mesh` (the
      runtime config carries mesh and strategy, so the MoE runs expert-parallel as with `load_hf`).
    """
    import orbax.checkpoint as ocp

    path = Path(path)
    manifest = read_manifest(path)
    cfg = ModelConfig.from_hf_config(path)
    strategy = strategy if strategy is not None else "dp_ep"
    rt = RuntimeConfig(dtype=dtype or manifest["options"]["dtype"], attention_impl=attention_impl,
                       query_block=query_block, mesh=mesh, strategy=strategy)  # fmt: skip
    if mesh is not None:
        validate(cfg, mesh, strategy)
    graphdef, state = nnx.split(abstract_model(cfg, rt))
    rules = get_rules(strategy)
    if mesh is not None:
        check_divisible(state, mesh, rules)
    mesh = mesh or single_device_mesh()
    where = path / PARAMS_DIR
    targets = _plan_restore(state, param_shardings(state, mesh, rules), manifest, mesh, rules, where, allow_partial)
    _check_stored_arrays(where, targets.item)
    with reporting_damage(where):
        restored = ocp.PyTreeCheckpointer().restore(
            where.resolve(), args=ocp.args.PyTreeRestore(item=targets.item, restore_args=targets.args)
        )
    _fill_state(state, restored, manifest.get("quantized", {}))
    return nnx.merge(graphdef, state)


def _fill_state(state, restored: dict, quantized: dict) -> None:
    for path, var in nnx.to_flat_state(state):
        key = tuple(str(p) for p in path)
        name = ".".join(key)
        try:
            value = _get(restored, key)
        except KeyError:
            continue  # allow_partial: left abstract
        if name in quantized:
            q = quantized[name]
            value = QuantizedWeight(
                value["data"], value["scale"], fmt=q["fmt"], layout=q["layout"],
                dtype=np.dtype(var.get_value().dtype).name, block=tuple(q["block"]), groups=q["groups"],
            )  # fmt: skip
        var.set_value(value)
