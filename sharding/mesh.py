"""Device meshes with named axes (`data`, `expert`, `tensor`), on one host or many.

Every mesh dsv4 builds has all three axes, in that order, so a strategy's rules table
(`sharding.rules`) can always be checked against it; an axis of size 1 simply replicates.
Axis types are `Auto`: the compiler propagates shardings from the parameters and the cache, and
`jax.lax.ragged_dot` (the expert matmul) has no explicit-sharding rule.

Multi-host: call `initialize_distributed` once per process, before anything touches a device; it
wraps `jax.distributed.initialize` and checks the cluster it joined against what was asked for.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

AXES = ("data", "expert", "tensor")

# Environment variables read when the flags are not given (the names dsv4-multihost documents).
ENV_COORDINATOR = "DSV4_COORDINATOR"
ENV_NUM_PROCESSES = "DSV4_NUM_PROCESSES"
ENV_PROCESS_ID = "DSV4_PROCESS_ID"


def mesh_shape(n_devices: int, data: int | None = None, expert: int | None = None, tensor: int = 1):
    """(data, expert, tensor) sizes whose product is `n_devices`; at most one of data/expert inferred.

    Defaults: with neither given, every device goes to `expert` (experts are most of the weights);
    with one given, the other takes the rest. Raises ValueError when the sizes cannot multiply to
    the device count.
    """
    if not isinstance(n_devices, int) or isinstance(n_devices, bool) or n_devices < 1:
        raise ValueError(f"a mesh needs at least one device, got n_devices={n_devices!r}")
    for name, size in (("data", data), ("expert", expert), ("tensor", tensor)):
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ValueError(f"mesh axis {name!r} must be a positive integer, got {size!r}")
    if data is None and expert is None:
        data = 1
    known = math.prod(s for s in (data, expert, tensor) if s is not None)
    if n_devices % known:
        raise ValueError(
            f"mesh sizes data={data} expert={expert} tensor={tensor} do not divide the {n_devices} devices"
        )
    if data is None:
        data = n_devices // known
    elif expert is None:
        expert = n_devices // known
    if data * expert * tensor != n_devices:
        raise ValueError(
            f"mesh sizes data={data} x expert={expert} x tensor={tensor} = {data * expert * tensor}, "
            f"but there are {n_devices} devices"
        )
    return data, expert, tensor


def make_mesh(
    data: int | None = None,
    expert: int | None = None,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A (data, expert, tensor) mesh over `devices` (default: every device of every process).

    Sizes left as None are inferred from the device count (see `mesh_shape`). With the default
    devices the layout comes from `jax.make_mesh`, which keeps the fastest links on the inner axes.
    """
    n = len(devices) if devices is not None else jax.device_count()
    shape = mesh_shape(n, data, expert, tensor)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def axis_size(mesh: Mesh, axes: str | Sequence[str] | None) -> int:
    """Product of the sizes of `axes` on `mesh` (1 for None or an empty tuple)."""
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in names)


# ------------------------------------------------------------------------------------ multi-host


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def distributed_args(coordinator=None, num_processes=None, process_id=None) -> dict:
    """The arguments for `jax.distributed.initialize`: flags first, then DSV4_* environment variables.

    Values still missing stay None, so `jax.distributed.initialize` fills them: the coordinator from
    its JAX_COORDINATOR_ADDRESS variable, the rest from its cluster detection (Cloud TPU metadata,
    SLURM, Open MPI). JAX reads no process-count or process-id variable of its own.
    Raises ValueError for a malformed address or an inconsistent process id.
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"coordinator must be host:port, got {coordinator!r}")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} is outside [0, {num_processes})")
    return dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
) -> None:
    """Join the multi-process JAX cluster (call once per process, before any device work).

    A single process (num_processes == 1, or nothing given and no cluster detected) is left alone;
    a process count or id without a coordinator, where no cluster is detected, raises ValueError
    (such a process would otherwise run alone as process 0 of 1).
    On CPU the cross-process collectives go through gloo. After joining, the process count JAX
    reports must equal `num_processes`; a mismatch raises RuntimeError before anything is compiled.
    """
    args = distributed_args(coordinator, num_processes, process_id)
    if args["num_processes"] == 1:
        return
    if args["coordinator_address"] is None and not _cluster_detected():
        given = [f"{k} {args[k]}" for k in ("num_processes", "process_id") if args[k] is not None]
        if not given:  # a single process
            return
        raise ValueError(
            f"{' and '.join(given)} given (--num-processes / {ENV_NUM_PROCESSES}, --process-id / "
            f"{ENV_PROCESS_ID}) without a coordinator (--coordinator / {ENV_COORDINATOR}), and no cluster "
            "was detected to find one: the processes cannot join"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**args, initialization_timeout=timeout_s)
    check_processes(args["num_processes"], args["process_id"])


CLUSTER_MARKERS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def _cluster_detected() -> bool:
    """Whether `jax.distributed.initialize` has a cluster to find without arguments.

    True when one of CLUSTER_MARKERS is set, or when one of JAX's own cluster environments says it
    is present (a Cloud TPU VM slice through its metadata server, GKE, SLURM, Open MPI, Kubernetes):
    the same detection `initialize` runs, so a plain TPU VM slice needs no flags.
    """
    if any(os.environ.get(m) for m in CLUSTER_MARKERS):
        return True
    try:  # JAX has no public API for its detection; without this module only the markers count
        from jax._src.clusters import ClusterEnv
    except ImportError:
        return False
    return any(not env.opt_in_only_method and env.is_env_present() for env in ClusterEnv._cluster_types)


def check_processes(num_processes: int | None, process_id: int | None = None, timeout_s: int = 60) -> None:
    """RuntimeError when the cluster JAX joined does not have the shape this process asked for.

    Each process also publishes the process count it was given in the coordinator's key-value
    store and compares the others' (no device work, nothing compiled): a host started with a
    different --num-processes makes every process fail with the same message, instead of the
    others hanging in their first collective.
    """
    if process_id is not None and jax.process_index() != process_id:
        raise RuntimeError(f"asked to be process {process_id}, but JAX made this process {jax.process_index()}")
    asked = _published_counts(num_processes, timeout_s)
    if num_processes is not None:
        asked[jax.process_index()] = num_processes
    wrong = {p: n for p, n in asked.items() if n is not None and n != jax.process_count()}
    if wrong:
        raise RuntimeError(
            f"the cluster has {jax.process_count()} processes, but process(es) {sorted(wrong)} were started "
            f"with --num-processes {sorted(set(wrong.values()))}: every host must pass the same count"
        )


def _published_counts(num_processes: int | None, timeout_s: int) -> dict[int, int | None]:
    """{process index: the count it was started with (None: not given)}, via the coordinator's store."""
    from jax._src import distributed  # the coordinator client; JAX has no public key-value API

    client = distributed.global_state.client
    if client is None:
        return {}
    client.key_value_set(f"dsv4/num_processes/{jax.process_index()}", str(num_processes or 0))
    counts = {}
    for p in range(jax.process_count()):
        value = int(client.blocking_key_value_get(f"dsv4/num_processes/{p}", timeout_s * 1000))
        counts[p] = value or None
    return counts
