"""Write model parameters as a checkpoint in the release layout (the inverse of `dsv4.load_hf`).

Every parameter goes through the one name table, `dsv4.checkpoint.release_specs`: its spec names
the release tensors and how `load_hf` assembles them into the parameter; `release_arrays` here is
the inverse of each assemble function, and checks itself by assembling its own output again.
Each release tensor is stored in the release format of its kind (checkpoint_format.md s2-3):

    kind "fp8"     F8_E4M3 + 128x128 block scales (F8_E8M0 bytes, or F32 with scale_fmt="float")
    kind "expert"  packed FP4 (I8) + F8_E8M0 scales per row and 32 inputs (or FP8, as Base)
    kind "float"   BF16
    kind "f32"     F32
    kind "int"     I64 (the hash router's tid2eid)

The directory gets config.json (with the release `quantization_config` and `expert_dtype`, so
it reads as a release config), generation_config.json, the shards and
model.safetensors.index.json, plus the tokenizer files when `tokenizer_dir` is given. It is
written into a temporary sibling directory and renamed into place, so a reader never sees half a
checkpoint. Everything is materialised in host memory before writing: meant for small models.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
from flax import nnx

from dsv4 import checkpoint, outputs, quant
from dsv4.config import ModelConfig, QuantizationConfig
from dsv4.model import DeepseekV4
from dsv4.quantized import materialize
from dsv4.safetensors_io import INDEX_FILE, write_sharded_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EXPORT_FILES = ("config.json", "generation_config.json", INDEX_FILE, *TOKENIZER_FILES)  # beside the shards
EXPERT_FORMATS = ("fp4", "fp8")
SCALE_FORMATS = ("ue8m0", "float")
DEFAULT_SHARD_BYTES = 4 * 2**30


# --------------------------------------------------------------------- inverse of the assemble table


def _wo_a_groups(spec: checkpoint.ParamSpec, shape: tuple[int, ...]) -> int | None:
    """G when `spec` is the grouped wo_a spec ([G*r, in_g] -> [G, in_g, r]), else None."""
    qualname = getattr(spec.assemble, "__qualname__", "")
    if qualname.startswith("_wo_a.") and len(shape) == 3:
        return shape[0]
    return None


def _disassemble_fn(spec: checkpoint.ParamSpec, shape: tuple[int, ...]) -> Callable:
    """The inverse of `spec.assemble`: parameter array -> list of release arrays."""
    if spec.assemble is checkpoint._transpose:
        return lambda p: [p.T]
    if spec.assemble is checkpoint._copy:
        return lambda p: [p]
    if spec.assemble is checkpoint._stack_experts:  # [E, in, out] -> E x [out, in]
        return lambda p: [p[e].T for e in range(p.shape[0])]
    groups = _wo_a_groups(spec, shape)
    if groups is not None:  # [G, in_g, r] -> [G*r, in_g]
        return lambda p: [p.transpose(0, 2, 1).reshape(groups * p.shape[2], p.shape[1])]
    raise NotImplementedError(
        f"no inverse for the assemble function {spec.assemble!r} of {spec.tensors[0].name}: "
        "add one to dsv4.export._disassemble_fn"
    )


def release_arrays(spec: checkpoint.ParamSpec, value: np.ndarray) -> list[np.ndarray]:
    """The release arrays (in `spec.tensors` order, logical [out, in] shapes) behind one parameter.

    Raises AssertionError if they do not assemble back to `value` exactly (a table/inverse bug).
    """
    value = np.asarray(value)
    arrays = _disassemble_fn(spec, value.shape)(value)
    for t, a in zip(spec.tensors, arrays, strict=True):
        if tuple(a.shape) != tuple(t.shape):
            raise AssertionError(f"{t.name}: disassembled shape {a.shape}, release shape {t.shape}")
    if not np.array_equal(spec.assemble(arrays), value):
        raise AssertionError(f"{spec.tensors[0].name}: disassemble is not the inverse of assemble")
    return [np.ascontiguousarray(a) for a in arrays]


# ----------------------------------------------------------------------------------- storage formats


@dataclasses.dataclass(frozen=True)
class StorageFormat:
    """How each kind is stored: FP8 block and scale format, and the routed experts' format."""

    scale_fmt: str = "ue8m0"
    expert_format: str = "fp4"
    block: tuple[int, int] = (quant.FP8_BLOCK, quant.FP8_BLOCK)

    def __post_init__(self):
        if self.scale_fmt not in SCALE_FORMATS:
            raise ValueError(f"scale_fmt must be one of {SCALE_FORMATS}, got {self.scale_fmt!r}")
        if self.expert_format not in EXPERT_FORMATS:
            raise ValueError(f"expert_format must be one of {EXPERT_FORMATS}, got {self.expert_format!r}")

    def format_of(self, kind: str) -> str:
        """Release storage of a ReleaseTensor kind: fp8 | fp4 | bf16 | f32 | i64."""
        formats = {"fp8": "fp8", "expert": self.expert_format, "float": "bf16", "f32": "f32", "int": "i64"}
        try:
            return formats[kind]
        except KeyError:
            raise ValueError(f"unknown release tensor kind {kind!r}") from None


def encode(t: checkpoint.ReleaseTensor, value: np.ndarray, fmt: StorageFormat):
    """One release tensor in its storage format.

    Returns ({stored name: array}, {stored name: safetensors dtype override}).
    """
    storage = fmt.format_of(t.kind)
    if storage == "fp8":
        q, s = quant.quantize_fp8(value, scale_fmt=fmt.scale_fmt, block=fmt.block)
        overrides = {t.scale_name: "F8_E8M0"} if fmt.scale_fmt == "ue8m0" else {}
        return {t.name: q, t.scale_name: s}, overrides
    if storage == "fp4":
        packed, s = quant.quantize_fp4(value)
        return {t.name: packed, t.scale_name: s}, {t.scale_name: "F8_E8M0"}
    if storage == "bf16":
        return {t.name: np.asarray(value, np.float32).astype(ml_dtypes.bfloat16)}, {}
    if storage == "f32":
        return {t.name: np.asarray(value, np.float32)}, {}
    return {t.name: np.asarray(value).astype(np.int64)}, {}


# ------------------------------------------------------------------------------------------ writer


def _split_state(model_or_state, cfg: ModelConfig | None) -> tuple[nnx.State, ModelConfig]:
    if isinstance(model_or_state, DeepseekV4):
        cfg = cfg or model_or_state.cfg
        _, state = nnx.split(model_or_state)
        return state, cfg
    if cfg is None:
        raise ValueError("export_release: pass `cfg` when exporting a state rather than a model")
    return model_or_state, cfg


def release_config(cfg: ModelConfig, fmt: StorageFormat, include_mtp: bool) -> ModelConfig:
    """`cfg` as a release config.json states it: quantization_config and expert_dtype set."""
    qc = QuantizationConfig(
        activation_scheme="dynamic",
        fmt="e4m3",
        quant_method="fp8",
        scale_fmt=fmt.scale_fmt,
        weight_block_size=fmt.block,
    )
    out = dataclasses.replace(cfg, quantization_config=qc, expert_dtype=fmt.expert_format)
    return out if include_mtp else out.without_mtp()


def _check_finite(spec: checkpoint.ParamSpec, value: np.ndarray) -> None:
    """ValueError naming the parameter when it holds NaN or an infinity (a diverged run): no release
    format stores those as weights, and FP8 cannot encode an infinity at all."""
    bad = ~np.isfinite(value)
    if bad.any():
        name = ".".join(map(str, spec.path))
        raise ValueError(
            f"parameter {name} (release tensor {spec.tensors[0].name}) holds {int(bad.sum())} NaN or infinite "
            f"value(s) of {value.size}: a model that diverged cannot be exported"
        )


def release_tensors(state: nnx.State, fmt: StorageFormat, include_mtp: bool = True):
    """Every stored tensor of the checkpoint, in parameter-tree order.

    Returns ({name: array}, {name: safetensors dtype override}).
    """
    flat = dict(nnx.to_flat_state(state))
    stored, overrides = {}, {}
    for spec in checkpoint.release_specs(state):
        if not include_mtp and spec.path[0] == "mtp":
            continue
        value = np.asarray(materialize(flat[spec.path].get_value()))  # a --keep-quantized weight: dense
        if np.issubdtype(value.dtype, np.floating) or value.dtype == ml_dtypes.bfloat16:
            value = value.astype(np.float32)
            _check_finite(spec, value)
        for t, array in zip(spec.tensors, release_arrays(spec, value), strict=True):
            s, o = encode(t, array, fmt)
            stored.update(s)
            overrides.update(o)
    return stored, overrides


def _write_side_files(tmp: Path, cfg: ModelConfig, tokenizer_dir) -> None:
    cfg.save(tmp / "config.json")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
           "temperature": 1.0, "top_p": 1.0}  # fmt: skip
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, tmp)


def copy_tokenizer(src, dst) -> list[str]:
    """Copy tokenizer.json (required) and tokenizer_config.json / special_tokens_map.json (if present)."""
    src, dst = Path(src), Path(dst)
    if not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{src}: no tokenizer.json to copy")
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in copied:  # each file whole or not at all (a temporary name, then a rename)
        outputs.write_file(dst / name, lambda f, name=name: f.write((src / name).read_bytes()), binary=True)
    return copied


def _foreign_entries(out_dir: Path) -> list[str]:
    """Entries of `out_dir` that an export does not write (EXPORT_FILES and *.safetensors shards)."""
    return sorted(p.name for p in out_dir.iterdir()
                  if not (p.is_file() and (p.name in EXPORT_FILES or p.suffix == ".safetensors")))  # fmt: skip


def check_out_dir(out_dir: Path, overwrite: bool, option: str = "overwrite=True") -> None:
    """FileExistsError unless `out_dir` may be written: absent, empty, or (with `overwrite`) a
    checkpoint directory holding only what an export writes (config.json, shards, index, tokenizer
    files). Other contents are never replaced: a mistyped OUT must not delete someone's files, nor
    an export over a downloaded release its README or code. A mount point is refused too: the
    finished export takes OUT's place by a rename, which a mount point does not allow. `option`:
    how the caller asks for `overwrite`, for the message."""
    if os.path.ismount(out_dir):
        raise FileExistsError(f"{out_dir}: a mount point, which an export cannot replace; write into a folder in it")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty; pass {option} to replace it")
    if outputs.holds_cwd(out_dir):
        raise FileExistsError(f"{out_dir}: holds the current directory, which {option} cannot replace: run elsewhere")
    if not (out_dir / "config.json").is_file():
        raise FileExistsError(
            f"{out_dir}: not empty and not a checkpoint (no config.json); {option} replaces only a checkpoint"
        )
    foreign = _foreign_entries(out_dir)
    if foreign:
        raise FileExistsError(
            f"{out_dir}: holds files an export does not write ({outputs.some_names(foreign)}); {option} would "
            "delete them with the checkpoint: move them away first"
        )


def export_release(
    model_or_state,
    cfg: ModelConfig | None,
    out_dir,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    scale_fmt: str = "ue8m0",
    include_mtp: bool = True,
    tokenizer_dir=None,
    expert_format: str = "fp4",
    overwrite: bool = False,
) -> Path:
    """Write a release-layout checkpoint of a model (or its nnx.State plus `cfg`) to `out_dir`.

    Args:
      model_or_state: a DeepseekV4, or its nnx.State (then `cfg` is required).
      cfg: the architecture; None takes `model.cfg`.
      out_dir: target directory; created, or replaced when `overwrite` and it holds a checkpoint
        (a config.json); any other non-empty directory is refused (`check_out_dir`). A symbolic
        link is followed: its target is written (or replaced).
      max_shard_bytes: shard size bound (a larger single tensor gets a shard of its own).
      scale_fmt: FP8 scales as "ue8m0" (F8_E8M0 bytes, as released) or "float" (F32, as Base).
      include_mtp: False drops `mtp.*` and writes num_nextn_predict_layers 0.
      tokenizer_dir: a directory whose tokenizer files are copied alongside.
      expert_format: routed experts as "fp4" (instruct release) or "fp8" (Base release).
    Returns:
      The checkpoint directory. `dsv4.load_hf(out_dir)` reads it back; every value comes back
      rounded as `encode` stores it (FP8/FP4/BF16).
    """
    state, cfg = _split_state(model_or_state, cfg)
    block = cfg.quantization_config.weight_block_size if cfg.quantization_config else None
    fmt = StorageFormat(scale_fmt, expert_format, *(() if block is None else (tuple(block),)))
    stored, overrides = release_tensors(state, fmt, include_mtp)
    out_dir = Path(os.path.abspath(out_dir))  # "." gets a name and a parent for the temporary sibling
    if out_dir.is_symlink():  # written through: replacing the link would leave its target as it was
        out_dir = out_dir.resolve()
    check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp."))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the checkpoint is an ordinary directory
    try:
        write_sharded_checkpoint(tmp, stored, overrides, max_shard_bytes)
        _write_side_files(tmp, release_config(cfg, fmt, include_mtp), tokenizer_dir)
        outputs.replace_dir(tmp, out_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno is not None:  # a full or read-only disk: name the export
            raise OSError(err.errno, f"cannot write the export {out_dir}: {err.strerror}") from err
        raise
    return out_dir
