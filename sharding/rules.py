"""One table from logical axes to mesh axes, and the function that applies it to a parameter tree."""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dsv4.params import logical_axes

MeshAxes = str | tuple[str, ...] | None

# Default strategy: attention data-parallel over batch, MoE expert-parallel, everything else replicated.
# With a single shared K=V head, splitting query heads would copy the KV cache onto every device, so
# `heads` stays unsharded here; a tensor-parallel strategy is a different table, not a code change.
DEFAULT_RULES: Mapping[str, MeshAxes] = {
    "batch": "data",
    "sequence": None,
    "vocab": None,
    "embed": None,
    "q_lora": None,
    "heads": None,
    "head_dim": None,
    "kv_dim": None,
    "o_groups": None,
    "o_group_in": None,
    "o_lora": None,
    "compress_slot": None,
    "compress_dim": None,
    "index_heads": None,
    "experts": "expert",
    "expert_hidden": None,
    "expert_slot": None,
    "hc_mix": None,
    "hc_embed": None,
    "hc_stream": None,
}


def logical_to_spec(
    axes: tuple[str | None, ...], rules: Mapping[str, MeshAxes], mesh: Mesh | None = None
) -> PartitionSpec:
    """PartitionSpec for one array's logical axes.

    Raises ValueError on an axis the table does not know and when two logical axes of one array
    land on the same mesh axis. Mesh axes absent from `mesh` (when given) are dropped (replicated).
    """
    used: dict[str, str] = {}
    spec = []
    for name in axes:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no entry in the sharding rules table")
        target = rules[name]
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh is not None:
            targets = tuple(t for t in targets if t in mesh.axis_names and mesh.shape[t] > 1)
        for t in targets:
            if t in used:
                raise ValueError(
                    f"logical axes {used[t]!r} and {name!r} both map to mesh axis {t!r} in {axes}"
                )
            used[t] = name
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def single_device_mesh() -> Mesh:
    """A 1x1 mesh over the first device, with the axis names the rules table uses."""
    devices = jax.devices()[:1]
    return jax.make_mesh((1, 1), ("data", "expert"), axis_types=(AxisType.Auto,) * 2, devices=devices)


def param_shardings(
    state: nnx.State, mesh: Mesh | None = None, rules: Mapping[str, MeshAxes] = DEFAULT_RULES
):
    """NamedShardings for every variable of an (abstract or concrete) NNX state, from its logical axes."""
    mesh = mesh or single_device_mesh()

    def one(variable):
        return NamedSharding(mesh, logical_to_spec(logical_axes(variable), rules, mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
