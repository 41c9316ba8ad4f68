"""DeepSeek-V4 configuration: the frozen architecture (`ModelConfig`) and runtime choices (`RuntimeConfig`).

`ModelConfig` fields are named exactly like the release `config.json` keys (section 1 of the
project notes `../shared/docs/checkpoint_format.md`, outside this repository). Build one with a
preset (`flash()`, `pro()`, `tiny()`) or from a checkpoint with `ModelConfig.from_hf_config`;
change one only with `dataclasses.replace`.
Both dataclasses are frozen and hashable, so they can be `jax.jit` static arguments.

`from_hf_config` reads three spellings of the same architecture:
- the release `config.json` (the field names below);
- a `config.json` saved by `transformers` (`DeepseekV4Config`), whose derived keys (`layer_types`,
  `mlp_layer_types`, `compress_rates`, `rope_parameters`, `partial_rotary_factor`, `dtype`) are
  mapped back onto the release keys and checked against them when both are present;
- the repository's native `inference/config.json` (`dim`, `n_layers`, ...), detected by `dim`.
Keys that carry no architecture are accepted and ignored; any other key is refused, never guessed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from dsv4 import outputs

AttentionKind = Literal["sliding", "csa", "hca"]

_KIND_OF_RATIO: dict[int, AttentionKind] = {0: "sliding", 4: "csa", 128: "hca"}
_EXPERT_DTYPES = (None, "fp4", "fp8")


class ConfigError(ValueError):
    """A configuration that dsv4 cannot build a model from; the message names the offending key."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite JSON number (not a bool; Python's JSON reader also gives NaN and Infinity)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _set(obj: Any, name: str, value: Any) -> None:
    """Normalise a field of a frozen dataclass inside `__post_init__`."""
    object.__setattr__(obj, name, value)


# ----------------------------------------------------------------------------------- RopeScaling


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RopeScaling:
    """YaRN parameters of the compressed (CSA / HCA) layers' RoPE (architecture.md section 2)."""

    type: str = "yarn"
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self):
        if self.type != "yarn":
            raise ConfigError(f"rope_scaling.type: only 'yarn' is implemented, got {self.type!r}")
        for name in ("factor", "beta_fast", "beta_slow"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ConfigError(f"rope_scaling.{name}: must be a positive number, got {value!r}")
            _set(self, name, float(value))
        if not _is_int(self.original_max_position_embeddings) or self.original_max_position_embeddings < 1:
            raise ConfigError(
                "rope_scaling.original_max_position_embeddings: must be a positive integer, "
                f"got {self.original_max_position_embeddings!r}"
            )
        if self.factor < 1:
            raise ConfigError(f"rope_scaling.factor: YaRN extends the context, so it must be >= 1, got {self.factor}")
        if self.beta_fast <= self.beta_slow:
            raise ConfigError(
                f"rope_scaling: beta_fast ({self.beta_fast}) must exceed beta_slow ({self.beta_slow}), "
                "the YaRN ramp runs from the one to the other"
            )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RopeScaling:
        """Parse a `rope_scaling` dict; accepts `type` or `rope_type`, and `attention_factor` only if 1."""
        d = dict(raw)
        kinds = {d.pop(key) for key in ("type", "rope_type") if key in d}
        if len(kinds) != 1:
            raise ConfigError(f"rope_scaling: needs exactly one of type / rope_type, got {sorted(kinds)}")
        if d.pop("attention_factor", 1.0) != 1.0:
            raise ConfigError("rope_scaling.attention_factor: DeepSeek-V4 applies no YaRN attention scaling")
        _check_keys(
            d,
            {f.name for f in dataclasses.fields(cls)} - {"type"},
            {"factor", "original_max_position_embeddings"},
            "rope_scaling",
        )
        return cls(type=kinds.pop(), **d)

    def to_dict(self) -> dict[str, Any]:
        """The release `rope_scaling` dict."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- QuantizationConfig


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class QuantizationConfig:
    """The checkpoint's `quantization_config`: block-scaled FP8 (E4M3) weights, dynamic activations."""

    activation_scheme: str
    fmt: str
    quant_method: str
    scale_fmt: str
    weight_block_size: tuple[int, int]
    expert_dtype: str | None = None

    def __post_init__(self):
        expected = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}
        for name, value in expected.items():
            if getattr(self, name) != value:
                raise ConfigError(
                    f"quantization_config.{name}: only {value!r} is supported, got {getattr(self, name)!r}"
                )
        if not isinstance(self.scale_fmt, str):
            raise ConfigError(f"quantization_config.scale_fmt: must be a string, got {self.scale_fmt!r}")
        block = self.weight_block_size
        if not isinstance(block, Sequence) or len(block) != 2 or not all(_is_int(b) and b > 0 for b in block):
            raise ConfigError(
                f"quantization_config.weight_block_size: must be two positive integers, got {block!r}"
            )
        _set(self, "weight_block_size", tuple(block))
        if self.expert_dtype not in _EXPERT_DTYPES:
            raise ConfigError(f"quantization_config.expert_dtype: must be one of {_EXPERT_DTYPES}")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> QuantizationConfig:
        """Parse a `quantization_config` dict, refusing keys it does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        _check_keys(raw, names, names - {"expert_dtype"}, "quantization_config")
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        """The release `quantization_config` dict (`expert_dtype` only when set)."""
        d = dataclasses.asdict(self)
        d["weight_block_size"] = list(self.weight_block_size)
        if d["expert_dtype"] is None:
            del d["expert_dtype"]
        return d


def _check_keys(raw: Mapping[str, Any], allowed: set[str], required: set[str], where: str) -> None:
    unknown, missing = sorted(set(raw) - allowed), sorted(required - set(raw))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}")
    if missing:
        raise ConfigError(f"{where}: missing keys {missing}")


# -------------------------------------------------------------------------------- ModelConfig

_FLASH_RATIOS = (0, 0) + (4, 128) * 20 + (4,) + (0,)
_PRO_RATIOS = (128, 128) + (4, 128) * 29 + (4,) + (0,)
_RELEASE_ROPE = RopeScaling(
    factor=16.0, original_max_position_embeddings=65536, beta_fast=32.0, beta_slow=1.0
)
_RELEASE_QUANT = QuantizationConfig(
    activation_scheme="dynamic",
    fmt="e4m3",
    quant_method="fp8",
    scale_fmt="ue8m0",
    weight_block_size=(128, 128),
)

_INT_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window",
    "max_position_embeddings", "index_n_heads", "index_head_dim", "index_topk", "hc_mult",
    "hc_sinkhorn_iters", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
    "moe_intermediate_size", "num_hash_layers", "num_nextn_predict_layers",
)  # fmt: skip
_FLOAT_FIELDS = (
    "rope_theta",
    "compress_rope_theta",
    "hc_eps",
    "routed_scaling_factor",
    "swiglu_limit",
    "rms_norm_eps",
)
_BOOL_FIELDS = ("norm_topk_prob", "tie_word_embeddings")
_STR_FIELDS = ("scoring_func", "topk_method", "hidden_act", "torch_dtype")
_NON_NEGATIVE = ("num_hash_layers", "num_nextn_predict_layers", "n_shared_experts", "swiglu_limit")
_POSITIVE = tuple(n for n in _INT_FIELDS + _FLOAT_FIELDS if n not in _NON_NEGATIVE)
# One value implemented; message says why.
_ONLY = {
    "num_key_value_heads": (1, "attention is shared-KV multi-query: one K=V head"),
    "scoring_func": ("sqrtsoftplus", "the only router scoring the model implements"),
    "topk_method": ("noaux_tc", "the only top-k routing the model implements"),
    "hidden_act": ("silu", "the experts are SwiGLU"),
    "tie_word_embeddings": (False, "tied embeddings are unsupported: embed and head are separate weights"),
    "norm_topk_prob": (True, "the router always renormalises its top-k weights, as the release and transformers do"),
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """The DeepSeek-V4 architecture, one field per release `config.json` key (defaults: Flash).

    `compress_ratios` has `num_hidden_layers + 1` entries, the last shared by the MTP blocks, or
    `num_hidden_layers + num_nextn_predict_layers`, one per MTP block (`mtp_ratio`). Use the presets
    for full configs.
    """

    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    compress_ratios: tuple[int, ...] = _FLASH_RATIOS
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: RopeScaling | None = _RELEASE_ROPE
    max_position_embeddings: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    norm_topk_prob: bool = True
    topk_method: str = "noaux_tc"
    swiglu_limit: float = 10.0
    num_nextn_predict_layers: int = 1
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 1
    torch_dtype: str = "bfloat16"
    expert_dtype: str | None = "fp4"
    quantization_config: QuantizationConfig | None = _RELEASE_QUANT

    def __post_init__(self):
        _normalise_types(self)
        _raise_all(_size_errors(self))
        _raise_all(_layer_errors(self) + _attention_errors(self) + _moe_errors(self) + _choice_errors(self))

    # ------------------------------------------------------------------ derived per-layer facts

    def compress_ratio(self, i: int) -> int:
        """Compression ratio of block `i` (0..num_hidden_layers-1 main layers, then the MTP block)."""
        if not 0 <= i < len(self.compress_ratios):
            raise IndexError(
                f"block {i} out of range: config has {len(self.compress_ratios)} compress_ratios"
            )
        return self.compress_ratios[i]

    def attention_kind(self, i: int) -> AttentionKind:
        """'sliding' (ratio 0), 'csa' (ratio 4) or 'hca' (ratio 128) for block `i`."""
        return _KIND_OF_RATIO[self.compress_ratio(i)]

    def is_hash_layer(self, i: int) -> bool:
        """Whether block `i` routes by the frozen `tid2eid` table; the MTP block never does."""
        return 0 <= i < self.num_hash_layers

    @property
    def layer_kinds(self) -> tuple[AttentionKind, ...]:
        """Attention kind of each main layer (the MTP block excluded)."""
        return tuple(self.attention_kind(i) for i in range(self.num_hidden_layers))

    @property
    def mtp_compress_ratio(self) -> int:
        """Compression ratio of the (first) MTP block: `mtp_ratio(0)`."""
        return self.mtp_ratio(0)

    def mtp_ratio(self, i: int) -> int:
        """Compression ratio of MTP block `i`: its own `compress_ratios` entry when the list has one per
        block (num_hidden_layers + num_nextn_predict_layers entries), else the one last entry they share."""
        return self.compress_ratios[min(self.num_hidden_layers + i, len(self.compress_ratios) - 1)]

    @property
    def num_mtp_layers(self) -> int:
        """Number of MTP blocks (`num_nextn_predict_layers`)."""
        return self.num_nextn_predict_layers

    def without_mtp(self) -> ModelConfig:
        """This config with no MTP block: num_nextn_predict_layers 0, `compress_ratios` cut to the
        main layers plus the one trailing entry a release list keeps."""
        ratios = self.compress_ratios[: self.num_hidden_layers + 1]
        return dataclasses.replace(self, num_nextn_predict_layers=0, compress_ratios=ratios)

    # ------------------------------------------------------------------------------- presets

    @classmethod
    def flash(cls) -> ModelConfig:
        """DeepSeek-V4-Flash, exactly the release config.json (checkpoint_format.md section 1)."""
        return cls()

    @classmethod
    def pro(cls) -> ModelConfig:
        """DeepSeek-V4-Pro, exactly the release config.json (checkpoint_format.md section 1)."""
        return dataclasses.replace(
            cls.flash(), hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
            q_lora_rank=1536, o_groups=16, compress_ratios=_PRO_RATIOS, index_topk=1024,
            n_routed_experts=384, moe_intermediate_size=3072, routed_scaling_factor=2.5,
        )  # fmt: skip

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        """A tiny valid config for tests (every layer kind, hash and learned routers, an MTP block).

        Unquantized (`quantization_config` and `expert_dtype` None); `overrides` go through
        `dataclasses.replace`, so they are validated together.
        """
        base = dataclasses.replace(
            cls.flash(), vocab_size=512, hidden_size=64, num_hidden_layers=5,
            compress_ratios=(0, 0, 4, 128, 4, 0), num_attention_heads=4, head_dim=64, qk_rope_head_dim=16,
            q_lora_rank=48, o_groups=2, o_lora_rank=32, sliding_window=32, index_n_heads=4,
            index_head_dim=32, index_topk=16, n_routed_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=32, num_hash_layers=2, hc_mult=4, expert_dtype=None,
            quantization_config=None,
        )  # fmt: skip
        return dataclasses.replace(base, **overrides)

    # ---------------------------------------------------------------------------- config.json

    @classmethod
    def from_hf_config(cls, path_or_dict: str | os.PathLike | Mapping[str, Any]) -> ModelConfig:
        """Build from a config.json path, a directory holding config.json, or a dict.

        Reads the release keys, a `transformers`-saved config, or the native `inference/config.json`
        names (detected by `dim`). Raises ConfigError naming the source and every unknown key.
        """
        raw, source = _read_config(path_or_dict)
        try:
            release = _native_to_release(raw) if "dim" in raw else dict(raw)
            return cls(**_release_kwargs(release))
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The release config.json as a dict; `from_hf_config(cfg.to_hf_dict()) == cfg`."""
        out: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, RopeScaling | QuantizationConfig):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            if value is not None or f.name not in ("expert_dtype", "quantization_config"):
                out[f.name] = value
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write `to_hf_dict()` as JSON atomically; `path` is a file or an existing directory."""
        target = Path(path)
        if target.is_dir():
            target = target / "config.json"
        outputs.write_json(target, self.to_hf_dict(), indent=2)
        return target


# ---------------------------------------------------------------------------------- validation


def _raise_all(errors: list[str]) -> None:
    if errors:
        raise ConfigError("invalid DeepSeek-V4 config: " + "; ".join(errors))


def _normalise_types(cfg: ModelConfig) -> None:
    """Check field types; normalise containers to tuples and numbers to float (hashable, exact)."""
    for name in _INT_FIELDS:
        if not _is_int(getattr(cfg, name)):
            raise ConfigError(f"{name}: must be an integer, got {getattr(cfg, name)!r}")
    for name in _FLOAT_FIELDS:
        if not _is_number(getattr(cfg, name)):
            raise ConfigError(f"{name}: must be a finite number, got {getattr(cfg, name)!r}")
        _set(cfg, name, float(getattr(cfg, name)))
    for names, kind in ((_BOOL_FIELDS, bool), (_STR_FIELDS, str)):
        for name in names:
            if not isinstance(getattr(cfg, name), kind):
                raise ConfigError(f"{name}: must be a {kind.__name__}, got {getattr(cfg, name)!r}")
    _normalise_containers(cfg)


def _normalise_containers(cfg: ModelConfig) -> None:
    _set(cfg, "compress_ratios", _int_tuple("compress_ratios", cfg.compress_ratios))
    if isinstance(cfg.eos_token_id, Sequence):
        _set(cfg, "eos_token_id", _int_tuple("eos_token_id", cfg.eos_token_id))
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(cfg, name)
        if not (value is None or _is_int(value) or isinstance(value, tuple)):
            raise ConfigError(f"{name}: must be an integer or null, got {value!r}")
    _normalise_nested(cfg)


def _normalise_nested(cfg: ModelConfig) -> None:
    """Dicts -> RopeScaling / QuantizationConfig; `quantization_config.expert_dtype` -> `expert_dtype`.

    The expert format has one home, `ModelConfig.expert_dtype`, so a config spelling it inside
    `quantization_config` (transformers, V4.1) equals one spelling it at the top level (the release).
    """
    for name, kind in (("rope_scaling", RopeScaling), ("quantization_config", QuantizationConfig)):
        value = getattr(cfg, name)
        if isinstance(value, Mapping):
            _set(cfg, name, kind.from_dict(value))
        elif value is not None and not isinstance(value, kind):
            raise ConfigError(f"{name}: must be a {kind.__name__}, a dict or None, got {value!r}")
    qc = cfg.quantization_config
    if qc is None or qc.expert_dtype is None:
        return
    if cfg.expert_dtype not in (None, qc.expert_dtype):
        raise ConfigError(
            f"expert_dtype: {cfg.expert_dtype!r} disagrees with "
            f"quantization_config.expert_dtype {qc.expert_dtype!r}"
        )
    _set(cfg, "expert_dtype", qc.expert_dtype)
    _set(cfg, "quantization_config", dataclasses.replace(qc, expert_dtype=None))


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if (
        isinstance(value, str | bytes)
        or not isinstance(value, Sequence)
        or not all(_is_int(v) for v in value)
    ):
        raise ConfigError(f"{name}: must be a list of integers, got {value!r}")
    return tuple(value)


def _size_errors(cfg: ModelConfig) -> list[str]:
    errors = [f"{n}: must be positive, got {getattr(cfg, n)}" for n in _POSITIVE if getattr(cfg, n) <= 0]
    return errors + [
        f"{n}: must be >= 0, got {getattr(cfg, n)}" for n in _NON_NEGATIVE if getattr(cfg, n) < 0
    ]


def _layer_errors(cfg: ModelConfig) -> list[str]:
    n, ratios, errors = cfg.num_hidden_layers, cfg.compress_ratios, []
    allowed_lengths = sorted({n + 1, n + cfg.num_nextn_predict_layers})
    if len(ratios) not in allowed_lengths:
        errors.append(
            f"compress_ratios: has {len(ratios)} entries, expected {' or '.join(map(str, allowed_lengths))} "
            "(num_hidden_layers + 1, or + num_nextn_predict_layers; the entries after the main layers are the "
            "MTP blocks)"
        )
    bad = {i: r for i, r in enumerate(ratios) if r not in _KIND_OF_RATIO}
    if bad:
        errors.append(f"compress_ratios: entries must be 0, 4 or 128, got {bad} (index: ratio)")
    if cfg.num_hash_layers > n:
        errors.append(f"num_hash_layers: {cfg.num_hash_layers} exceeds num_hidden_layers {n}")
    return errors


def _attention_errors(cfg: ModelConfig) -> list[str]:
    rope, errors = cfg.qk_rope_head_dim, []
    if cfg.head_dim % 2:
        errors.append(f"head_dim: must be even (RoPE rotates channel pairs), got {cfg.head_dim}")
    if rope % 2 or rope >= cfg.head_dim:
        errors.append(f"qk_rope_head_dim: must be even and < head_dim ({cfg.head_dim}), got {rope}")
    if cfg.index_head_dim % 2 or cfg.index_head_dim <= rope:
        errors.append(
            f"index_head_dim: must be even and > qk_rope_head_dim ({rope}): indexer queries rotate their "
            f"last {rope} channels; got {cfg.index_head_dim}"
        )
    if cfg.num_attention_heads % cfg.o_groups:
        errors.append(
            f"o_groups: {cfg.o_groups} does not divide num_attention_heads {cfg.num_attention_heads}"
        )
    return errors


def _moe_errors(cfg: ModelConfig) -> list[str]:
    errors = []
    if cfg.num_experts_per_tok > cfg.n_routed_experts:
        errors.append(
            f"num_experts_per_tok: {cfg.num_experts_per_tok} exceeds n_routed_experts {cfg.n_routed_experts}"
        )
    if cfg.n_shared_experts not in (0, 1):
        errors.append(f"n_shared_experts: must be 0 or 1, got {cfg.n_shared_experts}")
    return errors


def _choice_errors(cfg: ModelConfig) -> list[str]:
    errors = [
        f"{name}: must be {value!r} ({why}), got {getattr(cfg, name)!r}"
        for name, (value, why) in _ONLY.items()
        if getattr(cfg, name) != value
    ]
    if cfg.expert_dtype not in _EXPERT_DTYPES:
        errors.append(f"expert_dtype: must be one of {_EXPERT_DTYPES}, got {cfg.expert_dtype!r}")
    if cfg.torch_dtype not in _TORCH_DTYPES:
        errors.append(f"torch_dtype: must be one of {_TORCH_DTYPES}, got {cfg.torch_dtype!r}")
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(cfg, name)
        ids = value if isinstance(value, tuple) else () if value is None else (value,)
        if any(not 0 <= i < cfg.vocab_size for i in ids):
            errors.append(f"{name}: must lie in [0, vocab_size {cfg.vocab_size}), got {value!r}")
    return errors


_TORCH_DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn")


# -------------------------------------------------------------------------- reading config.json

_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(ModelConfig))
# Absent means None (no YaRN, an unquantized checkpoint, expert format read from the tensors).
_ABSENT_IS_NONE = ("rope_scaling", "quantization_config", "expert_dtype")
# Keys a config must carry (no default in dsv4): they fix shapes or numerics.
_REQUIRED = _FIELD_NAMES - set(_ABSENT_IS_NONE) - {
    "num_key_value_heads", "scoring_func", "topk_method", "hidden_act", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "torch_dtype",
}  # fmt: skip
# No architecture in them (bookkeeping, training-only knobs, HF output flags): accepted with any value.
_IGNORED = frozenset({
    "architectures", "transformers_version", "initializer_range", "use_cache", "pad_token_id",
    "_name_or_path", "output_router_logits", "router_aux_loss_coef", "output_hidden_states",
    "output_attentions", "return_dict", "chunk_size_feed_forward", "id2label", "label2id", "problem_type",
})  # fmt: skip
# Accepted only with the value dsv4 implements.
_FIXED = {
    "model_type": "deepseek_v4",
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "router_jitter_noise": 0.0,
    "is_encoder_decoder": False,
}
_HF_LAYER_TYPES = {
    "sliding_attention": 0,
    "compressed_sparse_attention": 4,
    "heavily_compressed_attention": 128,
}
_HF_COMPRESS_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}


def _read_config(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict), "config dict"
    if not isinstance(path_or_dict, str | os.PathLike):
        raise ConfigError(
            "path_or_dict: expected a config.json path, a checkpoint directory or a mapping, "
            f"got {type(path_or_dict).__name__}"
        )
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / "config.json"
    from dsv4.safetensors_io import reject_duplicate_keys

    try:
        raw = json.loads(path.read_text("utf-8"), object_pairs_hook=reject_duplicate_keys(path, ConfigError))
    except ConfigError:  # a key given twice: the hook names the file
        raise
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise ConfigError(f"{path}: cannot read a JSON config: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return raw, str(path)


def _release_kwargs(raw: dict[str, Any]) -> dict[str, Any]:
    """Release/transformers config keys -> ModelConfig keyword arguments (refusing unknown keys)."""
    d = dict(raw)
    unknown = sorted(set(d) - _FIELD_NAMES - _IGNORED - set(_FIXED) - set(_DERIVED) - {"dtype"})
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}: dsv4 refuses keys it does not understand")
    for key, value in _FIXED.items():
        if key in d and d.pop(key) != value:
            raise ConfigError(f"{key}: only {value!r} is supported, got {raw[key]!r}")
    for key in _IGNORED & set(d):
        del d[key]
    if isinstance(d.get("rope_scaling"), Mapping):  # parsed now: rope_parameters is checked against it
        d["rope_scaling"] = RopeScaling.from_dict(d["rope_scaling"])
    _put(d, "torch_dtype", d.pop("dtype", None), "dtype")
    for key, fold in _DERIVED.items():
        value = d.pop(key, None)
        if value is not None:
            with _malformed(key, value):
                fold(d, value)
    for key in _ABSENT_IS_NONE:
        d.setdefault(key, None)
    missing = sorted(_REQUIRED - set(d))
    if missing:
        raise ConfigError(f"missing config keys {missing}")
    return d


@contextlib.contextmanager
def _malformed(key: str, value: Any):
    """ConfigError naming `key` for a value of the wrong form (a number where a mapping belongs, a
    missing sub-key), instead of the TypeError or KeyError its use would raise."""
    try:
        yield
    except ConfigError:
        raise
    except (TypeError, KeyError, ValueError, AttributeError) as err:
        raise ConfigError(f"{key}: malformed value {value!r} ({type(err).__name__}: {err})") from None


def _put(d: dict[str, Any], key: str, value: Any, origin: str) -> None:
    """Set a release key from a derived one, refusing a disagreement with a value already there."""
    if value is None:
        return
    if key in d and d[key] != value:
        raise ConfigError(f"{origin}: implies {key} = {value!r}, but {key} is {d[key]!r}")
    d[key] = value


def _fold_compress_rates(d: dict[str, Any], rates: Any) -> None:
    if dict(rates) != _HF_COMPRESS_RATES:
        raise ConfigError(f"compress_rates: only {_HF_COMPRESS_RATES} is implemented, got {rates!r}")


def _fold_layer_types(d: dict[str, Any], types: Sequence[str]) -> None:
    bad = sorted(set(types) - set(_HF_LAYER_TYPES))
    if bad:
        raise ConfigError(f"layer_types: unknown entries {bad}")
    if "num_hidden_layers" in d and len(types) != d["num_hidden_layers"]:
        raise ConfigError(f"layer_types: has {len(types)} entries for {d['num_hidden_layers']} layers")
    ratios = [_HF_LAYER_TYPES[t] for t in types]
    if "compress_ratios" in d:
        if list(d["compress_ratios"])[: len(ratios)] != ratios:
            raise ConfigError(
                f"layer_types: implies compress_ratios {ratios} + MTP, but it is {d['compress_ratios']}"
            )
    else:  # the MTP block is a sliding-window block (checkpoint_format.md section 4)
        d["compress_ratios"] = ratios + [0] * max(d.get("num_nextn_predict_layers", 1), 1)


def _fold_mlp_layer_types(d: dict[str, Any], types: Sequence[str]) -> None:
    n_hash = next((i for i, t in enumerate(types) if t != "hash_moe"), len(types))
    if any(t != "moe" for t in types[n_hash:]):
        raise ConfigError(f"mlp_layer_types: must be 'hash_moe' layers then 'moe' layers, got {list(types)}")
    _put(d, "num_hash_layers", n_hash, "mlp_layer_types")


def _fold_rope_parameters(d: dict[str, Any], params: Mapping[str, Any]) -> None:
    if set(params) != {"main", "compress"}:
        raise ConfigError(f"rope_parameters: expected the keys main and compress, got {sorted(params)}")
    main, comp = dict(params["main"]), dict(params["compress"])
    for part in (main, comp):
        _fold_partial_rotary_factor(d, part.pop("partial_rotary_factor", None))
    if main.pop("rope_type", main.pop("type", "default")) != "default" or set(main) != {"rope_theta"}:
        raise ConfigError(
            f"rope_parameters.main: must be plain RoPE with only rope_theta, got {params['main']}"
        )
    _put(d, "rope_theta", float(main["rope_theta"]), "rope_parameters.main")
    _put(d, "compress_rope_theta", float(comp.pop("rope_theta")), "rope_parameters.compress")
    if comp.get("rope_type", comp.get("type", "default")) == "default":
        if set(comp) - {"rope_type", "type"}:
            raise ConfigError(f"rope_parameters.compress: unexpected keys {sorted(comp)} for plain RoPE")
        scaling = None
        if d.get("rope_scaling") is not None:
            raise ConfigError("rope_parameters.compress: plain RoPE, but rope_scaling is set")
    else:
        scaling = RopeScaling.from_dict(comp)
    _put(d, "rope_scaling", scaling, "rope_parameters.compress")


def _fold_partial_rotary_factor(d: dict[str, Any], factor: float | None) -> None:
    if factor is None or "head_dim" not in d:
        return
    if not _is_number(factor):
        raise ConfigError(f"partial_rotary_factor: must be a finite number, got {factor!r}")
    rope = factor * d["head_dim"]
    if rope != int(rope):
        raise ConfigError(f"partial_rotary_factor: {factor} x head_dim {d['head_dim']} is not an integer")
    _put(d, "qk_rope_head_dim", int(rope), "partial_rotary_factor")


# transformers' derived keys, folded back onto the release keys in this order.
_DERIVED = {
    "compress_rates": _fold_compress_rates,
    "layer_types": _fold_layer_types,
    "mlp_layer_types": _fold_mlp_layer_types,
    "rope_parameters": _fold_rope_parameters,
    "partial_rotary_factor": _fold_partial_rotary_factor,
}

# --------------------------------------------------------------- native inference/config.json

# Native ModelArgs name -> release key (names not listed here and in _NATIVE_SAME are refused).
_NATIVE_RENAMES = {
    "dim": "hidden_size",
    "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_activated_experts": "num_experts_per_tok",
    "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor",
    "window_size": "sliding_window",
    "rope_head_dim": "qk_rope_head_dim",
    "n_hash_layers": "num_hash_layers",
    "n_mtp_layers": "num_nextn_predict_layers",
    "norm_eps": "rms_norm_eps",
}
_NATIVE_SAME = frozenset({
    "vocab_size", "n_routed_experts", "n_shared_experts", "q_lora_rank", "head_dim", "o_groups",
    "o_lora_rank", "compress_ratios", "rope_theta", "compress_rope_theta", "swiglu_limit", "index_n_heads",
    "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters", "hc_eps", "expert_dtype",
})  # fmt: skip
# Consumed by the translation (YaRN, weight format) or runtime-only (batch, cache length, scale storage).
_NATIVE_SPECIAL = frozenset({
    "original_seq_len", "rope_factor", "beta_fast", "beta_slow", "dtype", "scale_fmt",
    "max_batch_size", "max_seq_len", "scale_dtype",
})  # fmt: skip
# The official ModelArgs defaults that equal both releases' values; other missing keys are refused.
_NATIVE_DEFAULTS = {
    "n_mtp_layers": 1, "norm_eps": 1e-6, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
    "beta_fast": 32, "beta_slow": 1, "head_dim": 512, "rope_head_dim": 64, "window_size": 128,
    "index_n_heads": 64, "index_head_dim": 128, "o_lora_rank": 1024, "n_shared_experts": 1,
    "score_func": "sqrtsoftplus", "rope_theta": 10000.0, "vocab_size": 129280, "dtype": "fp8",
    "scale_fmt": "ue8m0",
}  # fmt: skip


def _native_to_release(raw: dict[str, Any]) -> dict[str, Any]:
    """Translate the native `inference/config.json` (ModelArgs names) to release keys."""
    unknown = sorted(set(raw) - set(_NATIVE_RENAMES) - _NATIVE_SAME - _NATIVE_SPECIAL)
    if unknown:
        raise ConfigError(f"unknown native config keys {unknown}: dsv4 refuses keys it does not understand")
    native = {**_NATIVE_DEFAULTS, **raw}
    for key in ("original_seq_len", "rope_factor", "beta_fast", "beta_slow", "max_seq_len"):
        if key in native and not _is_number(native[key]):
            raise ConfigError(f"{key}: must be a finite number, got {native[key]!r}")
    out = {_NATIVE_RENAMES.get(k, k): v for k, v in native.items() if k not in _NATIVE_SPECIAL}
    out["rope_scaling"] = _native_rope(native)
    if out["rope_scaling"] is not None:
        out["max_position_embeddings"] = int(native["original_seq_len"] * native["rope_factor"])
    elif "max_seq_len" in native:  # without YaRN the runtime's cache length is the only position bound
        out["max_position_embeddings"] = native["max_seq_len"]
    if native["dtype"] == "fp8":
        out["quantization_config"] = dataclasses.replace(_RELEASE_QUANT, scale_fmt=native["scale_fmt"])
    elif native["dtype"] != "bf16":
        raise ConfigError(f"dtype: native weight format must be 'fp8' or 'bf16', got {native['dtype']!r}")
    out["norm_topk_prob"] = True  # the official gate always renormalises its sqrtsoftplus top-k weights
    missing = sorted(_REQUIRED - set(out) - set(_ABSENT_IS_NONE))
    if missing:  # named as the native file names them
        native_name = {release: name for name, release in _NATIVE_RENAMES.items()}
        raise ConfigError(f"missing native config keys {[native_name.get(k, k) for k in missing]}")
    return out


def _native_rope(native: dict[str, Any]) -> RopeScaling | None:
    """YaRN is on when `original_seq_len` > 0 (the official runtime's switch)."""
    if native.get("original_seq_len", 0) <= 0:
        return None
    if "rope_factor" not in native:
        raise ConfigError("rope_factor: required when original_seq_len > 0 (YaRN)")
    return RopeScaling(
        factor=native["rope_factor"], original_max_position_embeddings=native["original_seq_len"],
        beta_fast=native["beta_fast"], beta_slow=native["beta_slow"],
    )  # fmt: skip


# -------------------------------------------------------------------------------- RuntimeConfig

_RUNTIME_DTYPES = ("float32", "bfloat16")
_ATTENTION_IMPLS = ("xla", "reference", "pallas")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeConfig:
    """Runtime choices kept apart from the architecture.

    dtype: parameter and compute dtype of the main weights ("float32" | "bfloat16").
    attention_impl: "xla" | "reference" | "pallas".
    query_block: query block size of the blockwise attention and indexer paths.
    train_stats: for training, CSA layers compute the lightning indexer's KL loss (`sow`n as the
        `nnx.Intermediate` "indexer_kl": each query's KL and whether it sees an entry, both [B, S]),
        and top-k routers their "routing" (affinities, expert ids: the expert loads of the bias
        balancing and the sequence-wise balance loss);
        collected with `nnx.capture(fn, nnx.Intermediate)` (as `dsv4.train.loss_fn` does).
    mesh: a `jax.sharding.Mesh` with axes (data, expert, tensor) (`sharding.mesh.make_mesh`), or
        None for one device. Mesh is hashable, so the config stays a valid static argument.
    strategy: a `sharding.rules` strategy name ("dp_ep", "dp_ep_a2a", "tp_ep", "replicated") or a
        `sharding.rules.Strategy`: how parameters, caches and the routed experts use the mesh.
    remat: rematerialise every main-stack block (`jax.checkpoint` per layer, `dsv4.model`):
        under a gradient only the block inputs are kept and each block's activations are recomputed
        in the backward pass. The same numbers; for training memory (no effect without a gradient).
    """

    dtype: str = "bfloat16"
    attention_impl: str = "xla"
    query_block: int = 128
    train_stats: bool = False
    mesh: Any = None
    strategy: Any = "dp_ep"
    remat: bool = False

    def __post_init__(self):
        if self.dtype not in _RUNTIME_DTYPES:
            raise ConfigError(f"dtype: must be one of {_RUNTIME_DTYPES}, got {self.dtype!r}")
        if self.attention_impl not in _ATTENTION_IMPLS:
            raise ConfigError(
                f"attention_impl: must be one of {_ATTENTION_IMPLS}, got {self.attention_impl!r}"
            )
        if not _is_int(self.query_block) or self.query_block < 1:
            raise ConfigError(f"query_block: must be a positive integer, got {self.query_block!r}")
        for name in ("remat", "train_stats"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: must be a bool, got {getattr(self, name)!r}")
        _check_sharding(self.mesh, self.strategy)

    @property
    def jnp_dtype(self):
        """The jax.numpy dtype named by `dtype`."""
        import jax.numpy as jnp

        return jnp.dtype(self.dtype)


def _check_sharding(mesh, strategy) -> None:
    """ConfigError for an unknown strategy, or a strategy naming a mesh axis the mesh lacks."""
    from jax.sharding import Mesh

    from sharding.rules import check_mesh_axes, get_strategy  # sharding imports dsv4: import when used

    try:
        strat = get_strategy(strategy)
    except ValueError as err:
        raise ConfigError(f"strategy: {err}") from None
    if mesh is None:
        return
    if not isinstance(mesh, Mesh):
        raise ConfigError(f"mesh: must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    try:
        check_mesh_axes(strat.rules, mesh, f"strategy {strat.name!r}")
    except ValueError as err:
        raise ConfigError(f"mesh: {err}") from None
