"""Meshes, sharding strategies (logical-axis rules), placement and expert-parallel MoE for dsv4.

    mesh = make_mesh(data=2, expert=4)                      # (data, expert, tensor) = (2, 4, 1)
    model = dsv4.load_hf(path, mesh=mesh, strategy="dp_ep")  # parameters born in their shards
    cache = init_sharded_cache(model.cfg, batch, max_len, "bfloat16", mesh, "dp_ep")
    logits, cache = dsv4.decode.prefill(model, tokens, cache)  # per device, experts exchange by psum
"""

from sharding.expert_parallel import ExpertParallel, exchange_for
from sharding.mesh import AXES, initialize_distributed, make_mesh, mesh_shape
from sharding.placement import (
    CACHE_AXES,
    batch_sharding,
    cache_shardings,
    init_sharded_cache,
    per_device,
    put,
    shard_cache,
    shard_model,
    with_mesh,
)
from sharding.rules import (
    STRATEGIES,
    Strategy,
    check_divisible,
    get_rules,
    get_strategy,
    logical_to_spec,
    param_shardings,
    single_device_mesh,
    validate,
)

__all__ = [
    "AXES",
    "CACHE_AXES",
    "ExpertParallel",
    "STRATEGIES",
    "Strategy",
    "batch_sharding",
    "cache_shardings",
    "check_divisible",
    "exchange_for",
    "init_sharded_cache",
    "get_rules",
    "get_strategy",
    "initialize_distributed",
    "logical_to_spec",
    "make_mesh",
    "mesh_shape",
    "param_shardings",
    "per_device",
    "put",
    "shard_cache",
    "shard_model",
    "single_device_mesh",
    "validate",
    "with_mesh",
]
