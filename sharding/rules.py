"""Sharding strategies: tables from logical axes to mesh axes, and the functions that apply them.

A strategy is a named table (logical axis -> mesh axes) plus how the routed experts exchange tokens
(`moe`). The tables (mesh axes `data`, `expert`, `tensor`; see `sharding.mesh`):

  strategy    batch            heads / o_groups / index_heads   experts              moe
  ----------  ---------------  -------------------------------  -------------------  ----------
  dp_ep       data             -                                expert               psum
  dp_ep_a2a   (data, expert)   -                                expert               all_to_all
  tp_ep       -                tensor                           (expert, tensor)     psum
  replicated  -                -                                -                    -

- dp_ep (default): attention data-parallel over batch, experts spread over `expert`. With one
  shared K=V head, splitting query heads would copy the KV cache onto every device, so attention
  (and the cache) is split by batch instead. Tokens are replicated over `expert`, so every expert
  device already holds every token of its data shard: it applies its own experts and one psum over
  `expert` combines them (no dispatch needed).
- dp_ep_a2a: attention data-parallel over every device (no attention work or cache repeated on
  the expert axis); tokens travel to their experts' devices by all_to_all and back. Needs the
  batch divisible by data x expert.
- tp_ep: for batch-1 latency. Query heads, output groups and indexer heads split over `tensor`
  (the KV cache is then replicated: fine at small batch); experts over every model device.
- replicated: every array whole on every device (conversion, tiny tests).

The shared expert, the router (`gate`) and mHC stay replicated in every strategy: together they
are a few percent of a layer, and splitting them would add a collective per layer for no real
memory saving. `embed`/`vocab` stay replicated too (one gather / matmul per step, small).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping

import jax
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from dsv4.params import logical_axes
from dsv4.quantized import QuantizedWeight, quantized_axes
from dsv4.xla_flags import ynn_dots_off
from sharding.mesh import axis_size

MeshAxes = str | tuple[str, ...] | None

MOE_MODES = ("psum", "all_to_all")

# Every logical axis, unsharded: the base every strategy overrides.
REPLICATED_RULES: Mapping[str, MeshAxes] = {
    "batch": None,
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
    "experts": None,
    "router_experts": None,  # the router's expert axis: replicated (see the module docstring)
    "expert_hidden": None,
    "expert_slot": None,
    "hc_mix": None,
    "hc_embed": None,
    "hc_stream": None,
}

DP_EP_RULES: Mapping[str, MeshAxes] = {**REPLICATED_RULES, "batch": "data", "experts": "expert"}
DP_EP_A2A_RULES: Mapping[str, MeshAxes] = {**DP_EP_RULES, "batch": ("data", "expert")}
TP_EP_RULES: Mapping[str, MeshAxes] = {
    **REPLICATED_RULES,
    "heads": "tensor",
    "o_groups": "tensor",
    "index_heads": "tensor",
    "experts": ("expert", "tensor"),
}

@dataclasses.dataclass(frozen=True)
class Strategy:
    """A named rules table plus the routed experts' token exchange ("psum" or "all_to_all").

    Hashable (the table is stored as sorted items), so it can sit in a RuntimeConfig that jit
    treats as static.
    """

    name: str
    table: tuple[tuple[str, MeshAxes], ...]
    moe: str = "psum"

    def __post_init__(self):
        if self.moe not in MOE_MODES:
            raise ValueError(f"strategy {self.name!r}: moe must be one of {MOE_MODES}, got {self.moe!r}")
        if isinstance(self.table, Mapping):
            object.__setattr__(self, "table", tuple(sorted(self.table.items())))
        pairs = isinstance(self.table, tuple) and all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in self.table
        )
        if not pairs:
            raise ValueError(
                f"strategy {self.name!r}: table must map logical axis names to mesh axes, got {self.table!r}"
            )

    @property
    def rules(self) -> dict[str, MeshAxes]:
        """The table as a dict: logical axis -> mesh axes."""
        return dict(self.table)

    @property
    def data_parallel(self) -> bool:
        """Whether only the batch and the routed experts are split (every other weight replicated).

        Such a strategy runs a whole step per device under `jax.shard_map` (`sharding.placement.per_device`):
        the model code sees its local batch and local experts, and the only collectives are the experts'.
        """
        split = {k for k, v in self.table if v}
        return "batch" in split and split <= {"batch", "experts"}

    def mesh_axes(self, logical: str, mesh: Mesh) -> tuple[str, ...]:
        """The mesh axes (of size > 1 on `mesh`) that logical axis `logical` is split over."""
        return _targets(self.rules.get(logical), mesh)


STRATEGIES: Mapping[str, Strategy] = {
    "dp_ep": Strategy("dp_ep", DP_EP_RULES, "psum"),
    "dp_ep_a2a": Strategy("dp_ep_a2a", DP_EP_A2A_RULES, "all_to_all"),
    "tp_ep": Strategy("tp_ep", TP_EP_RULES, "psum"),
    "replicated": Strategy("replicated", REPLICATED_RULES, "psum"),
}
DEFAULT_STRATEGY = "dp_ep"


def get_strategy(strategy: str | Strategy | None = None) -> Strategy:
    """The Strategy named `strategy` (default "dp_ep"); a Strategy is returned as is."""
    if isinstance(strategy, Strategy):
        return strategy
    name = DEFAULT_STRATEGY if strategy is None else strategy
    if name not in STRATEGIES:
        raise ValueError(f"unknown sharding strategy {name!r}; known: {sorted(STRATEGIES)}")
    return STRATEGIES[name]


def get_rules(strategy: str | Strategy | None = None) -> dict[str, MeshAxes]:
    """The rules table (logical axis -> mesh axes) of a strategy."""
    return get_strategy(strategy).rules


def _targets(target: MeshAxes, mesh: Mesh | None) -> tuple[str, ...]:
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    if mesh is not None:
        targets = tuple(t for t in targets if mesh.shape[t] > 1)
    return targets


def check_mesh_axes(rules: Mapping[str, MeshAxes], mesh: Mesh, name: str = "rules") -> None:
    """ValueError when the table names a mesh axis `mesh` does not have, or when a mesh axis is not
    of type Auto (`jax.make_mesh` makes Explicit ones by default; the routed experts' ragged_dot has
    no explicit-sharding rule, and the forward failed inside JAX)."""
    other = {a: t.name for a, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t != AxisType.Auto}
    if other:
        raise ValueError(
            f"{name}: mesh axes {other} are not of type Auto: build the mesh with sharding.make_mesh, or "
            "jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto,) * 3)"
        )
    for logical, target in rules.items():
        for t in _targets(target, None):
            if t not in mesh.axis_names:
                raise ValueError(
                    f"{name}: logical axis {logical!r} maps to mesh axis {t!r}, "
                    f"which the mesh {dict(mesh.shape)} does not have"
                )


def logical_to_spec(
    axes: tuple[str | None, ...], rules: Mapping[str, MeshAxes], mesh: Mesh | None = None
) -> PartitionSpec:
    """PartitionSpec for one array's logical axes.

    Raises ValueError on an axis the table does not know, on a mesh axis the mesh lacks, and when
    two logical axes of one array land on the same mesh axis. Mesh axes of size 1 are dropped.
    """
    used: dict[str, str] = {}
    spec = []
    for name in axes:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no entry in the sharding rules table")
        targets = _targets(rules[name], None)
        if mesh is not None:
            missing = [t for t in targets if t not in mesh.axis_names]
            if missing:
                raise ValueError(f"logical axis {name!r} maps to mesh axis {missing[0]!r}, not in {mesh.axis_names}")
            targets = _targets(rules[name], mesh)
        for t in targets:
            if t in used:
                raise ValueError(f"logical axes {used[t]!r} and {name!r} both map to mesh axis {t!r} in {axes}")
            used[t] = name
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def single_device_mesh() -> Mesh:
    """A 1x1x1 (data, expert, tensor) mesh over the first device."""
    devices = jax.devices()[:1]
    axes = ("data", "expert", "tensor")
    return jax.make_mesh((1, 1, 1), axes, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _as_rules(rules) -> Mapping[str, MeshAxes]:
    """Accept a table, a Strategy, a strategy name or None (the default strategy)."""
    if rules is None or isinstance(rules, str | Strategy):
        return get_rules(rules)
    return rules


def param_shardings(state: nnx.State, mesh: Mesh | None = None, rules=None):
    """NamedShardings for every variable of an (abstract or concrete) NNX state, from its logical axes.

    `rules` is a table, a Strategy or a strategy name (default: the default strategy's). A variable
    holding a `QuantizedWeight` becomes a QuantizedWeight whose data and scale are their shardings
    (`dsv4.quantized.quantized_axes`): a tree that is no prefix of the state (see
    `sharding.placement._spec_tree`).
    """
    mesh = mesh or single_device_mesh()
    rules = _as_rules(rules)
    check_mesh_axes(rules, mesh)

    def named(axes):
        return NamedSharding(mesh, logical_to_spec(axes, rules, mesh))

    def one(variable):
        value, axes = variable.get_value(), logical_axes(variable)
        if not isinstance(value, QuantizedWeight):
            return named(axes)
        data_axes, scale_axes = quantized_axes(axes, value.layout)
        return dataclasses.replace(value, data=named(data_axes), scale=named(scale_axes))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ------------------------------------------------------------------------------------ validation


CPU_MULTIDEVICE_WARNING = (
    "dsv4 on {n} CPU devices with XLA_FLAGS that take XLA:CPU's dots away from YNNPACK: with that "
    "setting (jaxlib 0.10.2) XLA's own dots gave wrong logits for sequences of 2,048 tokens and more "
    "when several devices ran at once (README, 'Running on a mesh'). dsv4.xla_flags.YNN_DOTS_ONLY, "
    "or XLA's defaults, avoid it; `python scripts/check_sharded.py` checks this machine."
)
_WARNED: list[int] = []  # the device count of the mesh that warned (once per process)


def warn_cpu_multidevice(mesh: Mesh) -> bool:
    """Warn (once per process) when `mesh` spans several CPU devices and XLA_FLAGS turns YNNPACK's
    dots off (`dsv4.xla_flags.ynn_dots_off`); returns whether it warned."""
    if isinstance(mesh, AbstractMesh):  # no devices yet
        return False
    n = mesh.devices.size
    if n < 2 or mesh.devices.flat[0].platform != "cpu" or _WARNED or not ynn_dots_off():
        return False
    _WARNED.append(n)
    warnings.warn(CPU_MULTIDEVICE_WARNING.format(n=n), RuntimeWarning, stacklevel=3)
    return True


def validate(cfg, mesh: Mesh, strategy: str | Strategy | None = None, batch: int | None = None) -> None:
    """Check, before anything is compiled, that `strategy` can shard `cfg` (and `batch`) on `mesh`.

    Raises ValueError listing every problem: a mesh axis the mesh lacks, or a mesh size that does
    not divide the batch, the routed experts, the query heads, the output groups or the indexer heads.
    Warns when a mesh axis of size > 1 goes unused by the strategy (`warn_unused_axes`).
    Warns once per process on a mesh of several CPU devices when XLA_FLAGS turns YNNPACK's dots off
    (`warn_cpu_multidevice`).
    """
    if not isinstance(mesh, Mesh | AbstractMesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    warn_cpu_multidevice(mesh)
    strat = get_strategy(strategy)
    check_mesh_axes(strat.rules, mesh, f"strategy {strat.name!r}")
    check_expert_exchange(strat, mesh)
    checks = (
        ("batch", batch, "batch"),
        ("experts", cfg.n_routed_experts, "n_routed_experts"),
        ("heads", cfg.num_attention_heads, "num_attention_heads"),
        ("o_groups", cfg.o_groups, "o_groups"),
        ("index_heads", cfg.index_n_heads, "index_n_heads"),
    )
    problems = []
    for logical, value, what in checks:
        axes = strat.mesh_axes(logical, mesh)
        n = axis_size(mesh, axes)
        if value is not None and value % n:
            problems.append(
                f"{what} = {value} is not divisible by {n} (strategy {strat.name!r} splits {logical!r} "
                f"over mesh axes {axes} of sizes {[mesh.shape[a] for a in axes]})"
            )
    if problems:
        raise ValueError("the mesh cannot shard this model: " + "; ".join(problems))  # one line for the CLIs
    warn_unused_axes(strat, mesh)


def check_expert_exchange(strat: Strategy, mesh: Mesh) -> None:
    """ValueError when the routed experts' token exchange cannot run under `strat` on `mesh`: tokens
    split over some of the expert axes but not all, or split over them with moe="psum"."""
    experts, tokens = strat.mesh_axes("experts", mesh), strat.mesh_axes("batch", mesh)
    shared = set(experts) & set(tokens)
    if shared and shared != set(experts):
        raise ValueError(f"strategy {strat.name!r}: tokens split over {tokens}, experts over {experts}; "
                         "tokens must be split over all of the expert axes or none")  # fmt: skip
    if shared and strat.moe == "psum":
        raise ValueError(f"strategy {strat.name!r}: psum needs tokens replicated over the expert axes {experts}")


def unused_axes(strategy: str | Strategy | None, mesh: Mesh) -> list[str]:
    """Mesh axes of size > 1 that no logical axis of `strategy` is split over (none for a strategy
    that splits nothing, such as "replicated", which copies everything by design)."""
    strat = get_strategy(strategy)
    if not any(_targets(target, None) for _, target in strat.table):
        return []
    used = {a for _, target in strat.table for a in _targets(target, mesh)}
    return [a for a in mesh.axis_names if mesh.shape[a] > 1 and a not in used]


def warn_unused_axes(strategy: str | Strategy | None, mesh: Mesh) -> None:
    """Warn (once per process and axis) when `mesh` has an axis `strategy` never splits over: every
    array is copied across it, and its devices repeat one another's work (e.g. dp_ep with tensor > 1)."""
    strat = get_strategy(strategy)
    for a in unused_axes(strat, mesh):
        if (strat.name, a, mesh.shape[a]) in _WARNED_UNUSED:  # once per process (validate runs at each step)
            continue
        _WARNED_UNUSED.add((strat.name, a, mesh.shape[a]))
        warnings.warn(
            f"strategy {strat.name!r} splits nothing over mesh axis {a!r} of size {mesh.shape[a]}: every "
            f"array is copied across it and its devices repeat one another's work; give it size 1 or use a "
            f"strategy that splits over it ({', '.join(_strategies_using(a)) or 'none'})",
            RuntimeWarning,
            stacklevel=3,
        )


_WARNED_UNUSED: set[tuple[str, str, int]] = set()


def _strategies_using(axis: str) -> list[str]:
    return [name for name, st in STRATEGIES.items() if any(axis in _targets(t, None) for _, t in st.table)]


def check_divisible(state: nnx.State, mesh: Mesh, rules) -> None:
    """ValueError naming every parameter whose sharded dimension the mesh axes do not divide."""
    rules = _as_rules(rules)
    problems = []
    for path, var in nnx.to_flat_state(state):
        shape = var.get_value().shape
        spec = logical_to_spec(logical_axes(var), rules, mesh)
        for dim, target in zip(shape, spec, strict=False):
            n = axis_size(mesh, _targets(target, mesh))
            if dim % n:
                problems.append(f"{'.'.join(map(str, path))}: dimension {dim} is not divisible by {n} ({target})")
    if problems:
        listed = "\n  ".join(problems[:8])
        raise ValueError(f"{len(problems)} parameter(s) cannot be sharded on this mesh:\n  {listed}")
