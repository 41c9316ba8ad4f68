"""The release checkpoint layout: one name table between release tensors and model parameters.

Every parameter of the abstract model (`dsv4.model.abstract_model`) maps to one or more release
tensors through `release_specs`. Each spec says which storage forms are allowed (plain float,
FP8 with 128x128 block scales, FP4 with per-32 scales, int) and how to turn the release array
([out, in] linear weights, per-expert tensors) into the parameter's layout. The loader, the
converter and the writers all use this one table.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np
from flax import nnx

FLOAT_DTYPES = ("F32", "BF16", "F16")

# Modules whose `.weight` the release stores as FP8 (+ `.scale`); routed experts may also be FP4.
_FP8_MODULES = re.compile(
    r"(^|\.)(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|indexer\.wq_b|shared_experts\.w[123]|e_proj|h_proj)$"
)
# Parameters the release keeps in float32 (mHC, sinks, ape, router bias): lower precision is refused.
_F32_ONLY = re.compile(r"(hc_\w+_(fn|base|scale)|attn_sink|\.ape|gate\.bias)$")


@dataclasses.dataclass(frozen=True)
class ReleaseTensor:
    """One release tensor: its name, logical shape ([out, in] for linear weights) and storage forms."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "float" | "f32" | "fp8" (float or FP8) | "expert" (float, FP8 or FP4) | "int"

    @property
    def scale_name(self) -> str:
        return self.name.removesuffix(".weight") + ".scale"


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """How one model parameter is assembled from release tensors."""

    path: tuple
    tensors: tuple[ReleaseTensor, ...]
    assemble: Callable[[list[np.ndarray]], np.ndarray]


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _release_name(ours: str) -> str:
    """Our parameter path -> release tensor name (experts handled by the caller)."""
    name = re.sub(r"(^|\.)mtp\.(\d+)\.block\.", r"\1mtp.\2.", ours)
    name = re.sub(r"hc_(attn|ffn|head)\.(fn|base|scale)$", r"hc_\1_\2", name)
    if name.endswith("attn.wo_a"):
        name += ".weight"
    return name


def _kind(name: str, dtype) -> str:
    if np.issubdtype(np.dtype(dtype), np.integer):
        return "int"
    if _F32_ONLY.search(name):
        return "f32"
    if _FP8_MODULES.search(name.removesuffix(".weight")):
        return "fp8"
    return "float"


def _transpose(arrays):
    return arrays[0].T


def _copy(arrays):
    return arrays[0]


def _wo_a(groups: int):
    def assemble(arrays):  # [G*r, in_g] -> [G, in_g, r]
        w = arrays[0]
        return w.reshape(groups, -1, w.shape[1]).transpose(0, 2, 1)

    return assemble


def _stack_experts(arrays):  # E x [out, in] -> [E, in, out]
    return np.stack([a.T for a in arrays])


def param_spec(path: tuple, shape: tuple[int, ...], dtype) -> ParamSpec:
    """The release tensors behind one parameter of the abstract model."""
    ours = _dotted(path)
    m = re.search(r"experts\.(w[123])$", ours)
    if m:
        e, d_in, d_out = shape
        prefix = _release_name(ours[: m.start()])
        tensors = tuple(
            ReleaseTensor(f"{prefix}experts.{i}.{m.group(1)}.weight", (d_out, d_in), "expert")
            for i in range(e)
        )
        return ParamSpec(path, tensors, _stack_experts)
    name = _release_name(ours)
    kind = _kind(name, dtype)
    if name.endswith("attn.wo_a.weight"):
        g, d_in, r = shape
        return ParamSpec(path, (ReleaseTensor(name, (g * r, d_in), kind),), _wo_a(g))
    is_linear = len(shape) == 2 and name.endswith(".weight") and name not in ("embed.weight", "head.weight")
    if is_linear:
        return ParamSpec(path, (ReleaseTensor(name, shape[::-1], kind),), _transpose)
    return ParamSpec(path, (ReleaseTensor(name, tuple(shape), kind),), _copy)


def release_specs(state: nnx.State) -> list[ParamSpec]:
    """One ParamSpec per variable of an (abstract) model state, in tree order."""
    specs = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        specs.append(param_spec(tuple(path), tuple(value.shape), value.dtype))
    return specs


# ------------------------------------------------------------------------------ validation and reads


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _storage_problems(index, present, t: ReleaseTensor, block) -> tuple[list[str], set[str]]:
    """Problems with one expected tensor as stored, and the names it accounts for (itself + scale)."""
    if t.name not in present:
        return [f"missing tensor {t.name!r} (not in the index)"], set()
    info, where = index.info(t.name), f"{t.name!r} in {index.shard_of(t.name)}"
    dtype, shape, expected = info.dtype, tuple(info.shape), t.shape
    used = {t.name}
    allowed = {
        "int": ("I64", "I32"),
        "f32": ("F32",),
        "float": FLOAT_DTYPES,
        "fp8": FLOAT_DTYPES + ("F8_E4M3",),
        "expert": FLOAT_DTYPES + ("F8_E4M3", "I8"),
    }[t.kind]
    if dtype not in allowed:
        return [f"tensor {where} has dtype {dtype}, expected one of {', '.join(allowed)}"], used
    if dtype == "I8":  # FP4: two codes per byte along the input axis, one scale per 32 inputs
        if t.shape[1] % 2:
            odd = f"tensor {where} is packed FP4, which needs an even input size; the config's is {t.shape[1]}"
            return [odd], used | {t.scale_name}
        expected = (t.shape[0], t.shape[1] // 2)
    problems = []
    if shape != expected:
        problems.append(f"tensor {where} has shape {list(shape)}, expected {list(expected)}")
    if dtype in ("I8", "F8_E4M3"):
        problems += _scale_problems(index, present, t.scale_name, _scale_grid(t.shape, dtype, block), dtype)
        used.add(t.scale_name)
    return problems, used


def _scale_grid(shape: tuple[int, int], dtype: str, block: tuple[int, int]) -> tuple[int, int]:
    """Scale shape of a quantized [out, in] weight: per 128x128 tile (FP8) or per row and 32 inputs (FP4)."""
    if dtype == "I8":
        return (shape[0], _ceil_div(shape[1], 32))
    return (_ceil_div(shape[0], block[0]), _ceil_div(shape[1], block[1]))


def _scale_problems(index, present, name: str, shape: tuple[int, ...], weight_dtype: str) -> list[str]:
    if name not in present:
        return [f"missing scale tensor {name!r} for the {weight_dtype} weight"]
    info, where = index.info(name), f"{name!r} in {index.shard_of(name)}"
    allowed = ("F8_E8M0", "U8") if weight_dtype == "I8" else ("F8_E8M0", "U8", "F32")
    problems = []
    if info.dtype not in allowed:
        problems.append(f"scale {where} has dtype {info.dtype}, expected one of {', '.join(allowed)}")
    if tuple(info.shape) != shape:
        problems.append(f"scale {where} has shape {list(info.shape)}, expected scale grid {list(shape)}")
    return problems


PROBLEMS_SHOWN = 40  # problems listed in an error; a checkpoint of another model has thousands


def problem_report(header: str, problems: list[str], limit: int = PROBLEMS_SHOWN) -> str:
    """`header`, then the first `limit` problems one per line and how many more there are."""
    more = [f"... and {len(problems) - limit} more"] if len(problems) > limit else []
    return header + "\n  " + "\n  ".join(problems[:limit] + more)


def validate_index(index, specs: list[ParamSpec], block: tuple[int, int]) -> list[str]:
    """Every problem of a checkpoint index against the expected tensors, all at once."""
    problems, used, present = [], set(), set(index.names())
    for spec in specs:
        for t in spec.tensors:
            p, u = _storage_problems(index, present, t, block)
            problems += p
            used |= u
    for name in sorted(present - used):
        problems.append(f"unknown tensor {name!r} in {index.shard_of(name)}")
    return problems


def read_dequantized(index, t: ReleaseTensor, block: tuple[int, int]) -> np.ndarray:
    """One release tensor as float32 (an integer one as stored) in its logical shape, dequantized exactly."""
    from dsv4 import quant

    info = index.info(t.name)
    w = index.read(t.name)
    if info.dtype in ("F8_E4M3", "I8"):
        scale = _read_scale(index, t.scale_name) if info.dtype == "F8_E4M3" else index.read(t.scale_name)
        check_values(index, t, info.dtype, w, scale)
        if info.dtype == "F8_E4M3":
            return quant.dequantize_fp8(w, scale, block)
        return quant.dequantize_fp4(w, scale)
    if t.kind == "int":  # as stored (I32 or I64): the range check sees the ids before any narrowing cast
        return w
    return w.astype(np.float32)


def check_values(index, t: ReleaseTensor, code: str, raw: np.ndarray, scale: np.ndarray | None) -> None:
    """CheckpointError naming the shard and tensor when its quantized data is damaged (`quant.damage`)."""
    from dsv4 import quant
    from dsv4.safetensors_io import CheckpointError

    found = quant.damage(code, raw, scale)
    if found is not None:
        part, reason = found
        name = t.scale_name if part == "scale" else t.name
        raise CheckpointError(f"{index.shard_of(name)}: tensor {name!r}: {reason}; the file is damaged")


def check_expert_ids(index, t: ReleaseTensor, ids: np.ndarray, n_experts: int) -> None:
    """CheckpointError naming the shard and tensor when a hash router's `tid2eid` names an expert
    outside [0, n_experts): the model would route tokens to experts that do not exist."""
    from dsv4.safetensors_io import CheckpointError

    if ids.size and not (0 <= ids.min() and ids.max() < n_experts):
        raise CheckpointError(
            f"{index.shard_of(t.name)}: tensor {t.name!r} names experts {ids.min()}..{ids.max()}, "
            f"outside [0, n_routed_experts {n_experts}): the file is damaged or of another model"
        )


def _read_scale(index, name: str) -> np.ndarray:
    scale = index.read(name)
    return scale.view(np.uint8) if scale.dtype.itemsize == 1 else scale.astype(np.float32)
