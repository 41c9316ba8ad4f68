"""Tiny DeepSeek-V4 checkpoints in the release layout, with their PyTorch oracle.

`write_release_checkpoint(cfg, out_dir)` builds a randomised `transformers` DeepseekV4ForCausalLM
(float32), renames its weights to the release names (docs/checkpoint_format.md section 2), stores
each tensor in its release format (FP8 + E8M0 scales, packed FP4, BF16, F32, I64) with
`dsv4.quant`, loads the *dequantized* values back into the HF model and returns it. The model and
the checkpoint therefore encode exactly the same numbers. An MTP block `mtp.0.*` (which HF does not
model) is added with random values.

Name mapping: `HF_TO_RELEASE` (per-layer suffixes) and `_TOP_LEVEL` are the inverse of the
renames `transformers` applies when loading the release (conversion_mapping.py, "deepseek_v4");
routed experts are the one non-rename: HF `experts.gate_up_proj [E, 2I, D]` is the stack of the
release's per-expert `w1` (rows [0, I)) and `w3` (rows [I, 2I)), `experts.down_proj [E, D, I]` the
stack of `w2`.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

# ------------------------------------------------------------------------------------- configs

TINY_FLASH: dict = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "vocab_size": 512,
    "hidden_size": 64,
    "num_hidden_layers": 5,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "qk_rope_head_dim": 16,
    "q_lora_rank": 48,
    "o_groups": 2,
    "o_lora_rank": 32,
    "sliding_window": 32,
    "compress_ratios": [0, 0, 4, 128, 4, 0],
    "rope_theta": 10000,
    "compress_rope_theta": 160000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    "max_position_embeddings": 1048576,
    "index_n_heads": 16,  # see test_parity: few heads make exact-zero score ties common
    "index_head_dim": 32,
    "index_topk": 16,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "num_hash_layers": 2,
    "scoring_func": "sqrtsoftplus",
    "routed_scaling_factor": 1.5,
    "norm_topk_prob": True,
    "topk_method": "noaux_tc",
    "swiglu_limit": 10.0,
    "num_nextn_predict_layers": 1,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
    "expert_dtype": "fp4",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "transformers_version": "5.23.0",
}

# Pro-shaped: HCA bootstrap layers, more experts and hash layers, and a hidden size (160) and
# expert width (48) that are not multiples of 128 / 32, so FP8 tiles and FP4 groups are partial
# along both axes somewhere.
TINY_PRO: dict = {
    **TINY_FLASH,
    "hidden_size": 160,
    "compress_ratios": [128, 128, 4, 128, 4, 0],
    "n_routed_experts": 12,
    "num_experts_per_tok": 3,
    "moe_intermediate_size": 48,
    "num_hash_layers": 3,
    "routed_scaling_factor": 2.5,
    "index_topk": 8,
}

# Release config keys HF's DeepseekV4Config is not given (no architecture content, or quantization
# that must not be applied to a float32 oracle).
HF_DROPPED_KEYS = (
    "architectures",
    "model_type",
    "quantization_config",
    "expert_dtype",
    "torch_dtype",
    "transformers_version",
)


def hf_config(cfg: dict) -> DeepseekV4Config:
    """DeepseekV4Config from a release config dict (HF folds compress_ratios, num_hash_layers,
    qk_rope_head_dim and rope_scaling into layer_types, mlp_layer_types, partial_rotary_factor and
    rope_parameters {main, compress})."""
    # deep copy: DeepseekV4Config writes into the nested rope_scaling dict it is given
    return DeepseekV4Config(**{k: copy.deepcopy(v) for k, v in cfg.items() if k not in HF_DROPPED_KEYS})


# ----------------------------------------------------------------------------- random weights


def _fan_in_std(shape: tuple[int, ...]) -> float:
    return min(0.1, 1.0 / math.sqrt(shape[-1]))


def _normal(shape, std: float, gen: torch.Generator, mean: float = 0.0) -> torch.Tensor:
    return mean + std * torch.randn(shape, generator=gen, dtype=torch.float32)


def _random_tid2eid(shape, num_experts: int, gen: torch.Generator) -> torch.Tensor:
    """[V, K] distinct expert ids per row, uniform in [0, E)."""
    keys = torch.rand((shape[0], num_experts), generator=gen)
    return keys.argsort(dim=-1)[:, : shape[1]].to(torch.int64)


def _random_value(name: str, like: torch.Tensor, num_experts: int, gen: torch.Generator) -> torch.Tensor:
    """A random tensor for the HF parameter/buffer `name`, scaled per kind."""
    shape = tuple(like.shape)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "tid2eid":
        return _random_tid2eid(shape, num_experts, gen)
    if name.endswith("embed_tokens.weight"):
        return _normal(shape, 1.0, gen)
    if name.endswith("norm.weight"):
        return _normal(shape, 0.1, gen, mean=1.0)
    if leaf in ("sinks", "position_bias", "base", "hc_base"):
        return _normal(shape, 0.5, gen)
    if leaf in ("scale", "hc_scale"):
        return 0.5 + torch.rand(shape, generator=gen)
    if leaf == "e_score_correction_bias":
        return _normal(shape, 0.1, gen)
    if leaf in ("fn", "hc_fn"):
        return _normal(shape, 0.05, gen)
    return _normal(shape, _fan_in_std(shape), gen)  # projections, experts, router, lm_head


def randomize_(model: torch.nn.Module, num_experts: int, gen: torch.Generator) -> None:
    """Replace every parameter and persistent buffer of `model` with random values."""
    state = {name: _random_value(name, t, num_experts, gen) for name, t in model.state_dict().items()}
    model.load_state_dict(state, strict=True)


def build_hf_model(cfg: dict, seed: int) -> DeepseekV4ForCausalLM:
    """Randomised float32 eval-mode DeepseekV4ForCausalLM for a release config dict."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("cpu"):
        model = DeepseekV4ForCausalLM(hf_config(cfg)).to(torch.float32)
    randomize_(model, cfg["n_routed_experts"], gen)
    return model.eval()


# ---------------------------------------------------------------------------------- name table

# HF per-layer suffix -> release per-layer suffix (both below `layers.{i}.` / `model.layers.{i}.`).
HF_TO_RELEASE: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "attn_hc.fn": "hc_attn_fn",
    "attn_hc.base": "hc_attn_base",
    "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn",
    "ffn_hc.base": "hc_ffn_base",
    "ffn_hc.scale": "hc_ffn_scale",
    "self_attn.sinks": "attn.attn_sink",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.kv_norm.weight",
    "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.kv_proj.weight": "attn.compressor.wkv.weight",
    "self_attn.compressor.gate_proj.weight": "attn.compressor.wgate.weight",
    "self_attn.compressor.kv_norm.weight": "attn.compressor.norm.weight",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "self_attn.compressor.indexer.kv_proj.weight": "attn.indexer.compressor.wkv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "attn.indexer.compressor.wgate.weight",
    "self_attn.compressor.indexer.kv_norm.weight": "attn.indexer.compressor.norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
}
_HF_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")

# HF top-level name -> release name (the HF model prefix `model.` included).
_TOP_LEVEL: dict[str, str] = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
    "lm_head.weight": "head.weight",
}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def expert_names(prefix: str, num_experts: int) -> list[str]:
    """Release names of the routed experts below `prefix` (e.g. "layers.3.")."""
    return [f"{prefix}ffn.experts.{e}.w{j}.weight" for e in range(num_experts) for j in (1, 2, 3)]


def release_names_of_hf(hf_name: str, num_experts: int) -> list[str]:
    """Release tensor name(s) holding the HF tensor `hf_name` (several for stacked experts)."""
    if hf_name in _TOP_LEVEL:
        return [_TOP_LEVEL[hf_name]]
    m = _HF_LAYER.match(hf_name)
    if m is None:
        raise KeyError(f"no release name for HF tensor {hf_name!r}")
    prefix, suffix = f"layers.{m.group(1)}.", m.group(2)
    if suffix in HF_TO_RELEASE:
        return [prefix + HF_TO_RELEASE[suffix]]
    if suffix == "mlp.experts.gate_up_proj":
        return [n for n in expert_names(prefix, num_experts) if not n.endswith("w2.weight")]
    if suffix == "mlp.experts.down_proj":
        return [n for n in expert_names(prefix, num_experts) if n.endswith("w2.weight")]
    raise KeyError(f"no release name for HF tensor {hf_name!r}")


def _block_to_release(prefix: str, hf_suffix: str, value: np.ndarray, out: dict) -> None:
    """Store one HF per-layer tensor under its release name(s) (experts split per expert)."""
    if hf_suffix == "mlp.experts.gate_up_proj":  # [E, 2I, D]
        inter = value.shape[1] // 2
        for e in range(value.shape[0]):
            out[f"{prefix}ffn.experts.{e}.w1.weight"] = value[e, :inter]
            out[f"{prefix}ffn.experts.{e}.w3.weight"] = value[e, inter:]
    elif hf_suffix == "mlp.experts.down_proj":  # [E, D, I]
        for e in range(value.shape[0]):
            out[f"{prefix}ffn.experts.{e}.w2.weight"] = value[e]
    else:
        out[prefix + HF_TO_RELEASE[hf_suffix]] = value


def release_tensors_from_hf(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """HF state dict -> {release name: float32/int64 numpy array}, unquantized."""
    out: dict[str, np.ndarray] = {}
    for hf_name, tensor in state.items():
        value = tensor.detach().cpu().numpy()
        if hf_name in _TOP_LEVEL:
            out[_TOP_LEVEL[hf_name]] = value
            continue
        m = _HF_LAYER.match(hf_name)
        if m is None:
            raise KeyError(f"no release name for HF tensor {hf_name!r}")
        _block_to_release(f"layers.{m.group(1)}.", m.group(2), value, out)
    return out


def _stack_experts(release: dict[str, np.ndarray], prefix: str, num_experts: int):
    """Per-expert release w1/w2/w3 -> HF (gate_up_proj [E, 2I, D], down_proj [E, D, I])."""
    w = {j: [release[f"{prefix}ffn.experts.{e}.w{j}.weight"] for e in range(num_experts)] for j in (1, 2, 3)}
    gate_up = np.stack([np.concatenate([a, b], axis=0) for a, b in zip(w[1], w[3], strict=True)])
    return gate_up, np.stack(w[2])


def hf_state_from_release(release: dict[str, np.ndarray], cfg: dict) -> dict[str, torch.Tensor]:
    """{release name: array} (main model, no mtp.*) -> HF state dict of torch tensors."""
    out = {hf: torch.from_numpy(np.asarray(release[r])) for hf, r in _TOP_LEVEL.items()}
    for i in range(cfg["num_hidden_layers"]):
        prefix = f"layers.{i}."
        for hf_suffix, rel_suffix in HF_TO_RELEASE.items():
            if prefix + rel_suffix in release:
                out[f"model.{prefix}{hf_suffix}"] = torch.from_numpy(np.asarray(release[prefix + rel_suffix]))
        gate_up, down = _stack_experts(release, prefix, cfg["n_routed_experts"])
        out[f"model.{prefix}mlp.experts.gate_up_proj"] = torch.from_numpy(gate_up)
        out[f"model.{prefix}mlp.experts.down_proj"] = torch.from_numpy(down)
    return out


# ------------------------------------------------------------------------------ release formats

_BLOCK = r"(layers|mtp)\.\d+\."
_FORMAT_RULES: list[tuple[str, str]] = [
    (rf"^{_BLOCK}ffn\.experts\.\d+\.w[123]\.weight$", "expert"),
    (rf"^{_BLOCK}attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)\.weight$", "fp8"),
    (rf"^{_BLOCK}ffn\.shared_experts\.w[123]\.weight$", "fp8"),
    (r"^mtp\.\d+\.(e_proj|h_proj)\.weight$", "fp8"),
    (r"^(embed|head|norm)\.weight$", "bf16"),
    (r"^mtp\.\d+\.(enorm|hnorm|norm)\.weight$", "bf16"),
    (rf"^{_BLOCK}(attn_norm|ffn_norm)\.weight$", "bf16"),
    (rf"^{_BLOCK}attn\.(q_norm|kv_norm|compressor\.norm|indexer\.compressor\.norm)\.weight$", "bf16"),
    (rf"^{_BLOCK}attn\.(compressor|indexer\.compressor)\.(wkv|wgate)\.weight$", "bf16"),
    (rf"^{_BLOCK}attn\.indexer\.weights_proj\.weight$", "bf16"),
    (rf"^{_BLOCK}ffn\.gate\.weight$", "bf16"),
    (rf"^{_BLOCK}attn\.attn_sink$", "f32"),
    (rf"^{_BLOCK}attn\.(compressor|indexer\.compressor)\.ape$", "f32"),
    (rf"^{_BLOCK}hc_(attn|ffn)_(fn|base|scale)$", "f32"),
    (r"^(mtp\.\d+\.)?hc_head_(fn|base|scale)$", "f32"),
    (rf"^{_BLOCK}ffn\.gate\.bias$", "f32"),
    (rf"^{_BLOCK}ffn\.gate\.tid2eid$", "i64"),
]


def release_format(name: str, expert_format: str = "fp4") -> str:
    """Storage format of the release tensor `name` (not a `.scale`): fp8 | fp4 | bf16 | f32 | i64.

    FP8 and FP4 weights come with a sibling `<module>.scale`. Routed experts are `expert_format`
    ("fp4" in instruct checkpoints, "fp8" in Base ones).
    """
    for pattern, fmt in _FORMAT_RULES:
        if re.match(pattern, name):
            return expert_format if fmt == "expert" else fmt
    raise KeyError(f"{name!r} is not a DeepSeek-V4 release tensor name")


def scale_name(weight_name: str) -> str:
    """`<module>.weight` -> `<module>.scale`."""
    if not weight_name.endswith(".weight"):
        raise ValueError(f"{weight_name!r} has no .weight suffix")
    return weight_name[: -len(".weight")] + ".scale"


def _encode(name: str, value: np.ndarray, fmt: str, scale_fmt: str):
    """One release tensor -> ({stored name: array}, {stored name: dtype string}, dequantized float)."""
    from dsv4 import quant  # dsv4 (and JAX) only where needed: the benchmarks' transformers side imports neither

    if fmt == "fp8":
        q, s = quant.quantize_fp8(value, scale_fmt=scale_fmt)
        dtypes = {scale_name(name): "F8_E8M0"} if scale_fmt == "ue8m0" else {}
        return {name: q, scale_name(name): s}, dtypes, quant.dequantize_fp8(q, s)
    if fmt == "fp4":
        packed, s = quant.quantize_fp4(value)
        deq = quant.dequantize_fp4(packed, s)
        return {name: packed, scale_name(name): s}, {scale_name(name): "F8_E8M0"}, deq
    if fmt == "bf16":
        stored = value.astype(ml_dtypes.bfloat16)
        return {name: stored}, {}, stored.astype(np.float32)
    if fmt == "f32":
        return {name: value.astype(np.float32)}, {}, value.astype(np.float32)
    if fmt == "i64":
        return {name: value.astype(np.int64)}, {}, value.astype(np.int64)
    raise ValueError(f"unknown release format {fmt!r}")


def encode_release(tensors: dict[str, np.ndarray], scale_fmt: str = "ue8m0", expert_format: str = "fp4"):
    """Quantize every release tensor to its storage format.

    Returns:
      (stored {name: array}, dtype overrides {name: "F8_E8M0"}, dequantized {name: float32/int64}).
    """
    stored, dtypes, deq = {}, {}, {}
    for name, value in tensors.items():
        s, d, v = _encode(name, value, release_format(name, expert_format), scale_fmt)
        stored.update(s)
        dtypes.update(d)
        deq[name] = v
    return stored, dtypes, deq


# -------------------------------------------------------------------------------- MTP block


def mtp_tensors(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Random float release tensors `mtp.0.*`: one block of kind compress_ratios[-1] with a non-hash
    router, e_proj/h_proj [D, D], enorm/hnorm/norm [D] and its own hc_head_fn/base/scale."""
    block_cfg = {
        **cfg,
        "num_hidden_layers": 1,
        "compress_ratios": cfg["compress_ratios"][-1:],
        "num_hash_layers": 0,
    }
    block = build_hf_model(block_cfg, seed)
    rel = release_tensors_from_hf(block.state_dict())
    gen = torch.Generator().manual_seed(seed + 1)
    d = cfg["hidden_size"]
    out = {f"mtp.0.{k[len('layers.0.') :]}": v for k, v in rel.items() if k.startswith("layers.0.")}
    out["mtp.0.e_proj.weight"] = _normal((d, d), _fan_in_std((d, d)), gen).numpy()
    out["mtp.0.h_proj.weight"] = _normal((d, d), _fan_in_std((d, d)), gen).numpy()
    out["mtp.0.enorm.weight"] = _normal((d,), 0.1, gen, mean=1.0).numpy()
    out["mtp.0.hnorm.weight"] = _normal((d,), 0.1, gen, mean=1.0).numpy()
    out["mtp.0.norm.weight"] = rel["norm.weight"]
    for leaf in ("fn", "base", "scale"):
        out[f"mtp.0.hc_head_{leaf}"] = rel[f"hc_head_{leaf}"]
    return out


# ------------------------------------------------------------------------------- tokenizer


def write_tiny_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with the release's special tokens, padded to `vocab_size`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = [
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        "<｜User｜>",
        "<｜Assistant｜>",
        "<think>",
        "</think>",
    ]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    pad = [f"<｜place▁holder▁no▁{i}｜>" for i in range(vocab_size - len(vocab))]
    tok.add_special_tokens(pad)
    tok.save(str(out_dir / "tokenizer.json"))
    tok_cfg = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": specials[0],
        "eos_token": specials[1],
        "pad_token": specials[1],
        "model_max_length": 1048576,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))


# ---------------------------------------------------------------------------------- writer


def write_release_checkpoint(
    cfg: dict,
    out_dir,
    seed: int = 0,
    max_shard_bytes: int = 256 * 1024,
    scale_fmt: str = "ue8m0",
    expert_format: str = "fp4",
    with_tokenizer: bool = False,
) -> DeepseekV4ForCausalLM:
    """Write a release-layout checkpoint for `cfg` to `out_dir` and return its float32 HF oracle.

    The HF model holds exactly the dequantized values stored in the checkpoint. Writes
    config.json, generation_config.json, the shards and model.safetensors.index.json (and a tiny
    tokenizer when `with_tokenizer`). `scale_fmt="float"` stores FP8 scales as float32 and
    `expert_format="fp8"` stores routed experts as FP8, as Base checkpoints do.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_hf_model(cfg, seed)
    release = release_tensors_from_hf(model.state_dict())
    release.update(mtp_tensors(cfg, seed + 10_000))
    stored, dtypes, deq = encode_release(release, scale_fmt, expert_format)
    main = {k: v for k, v in deq.items() if not k.startswith("mtp.")}
    model.load_state_dict(hf_state_from_release(main, cfg), strict=True)
    from dsv4.safetensors_io import write_sharded_checkpoint

    write_sharded_checkpoint(out_dir, stored, dtypes, max_shard_bytes)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    gen_cfg = {
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": cfg["eos_token_id"],
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    if with_tokenizer:
        write_tiny_tokenizer(out_dir, cfg["vocab_size"])
    model.mtp_release = {k: v for k, v in deq.items() if k.startswith("mtp.")}  # for hf_mtp_logits
    return model.eval()


def hf_mtp_logits(hf_main: DeepseekV4ForCausalLM, cfg: dict, tokens: np.ndarray, pair_with_next: bool = True):
    """The MTP block's logits [B, S-1, V] computed by transformers, which has no MTP block of its own.

    transformers' decoder layer runs the block: it is layer L of a model of L + 1 layers whose first
    L are the main model's (`hf_main`, the oracle `write_release_checkpoint` returned, with its
    `mtp_release` tensors), fed tokens[:, :-1]; a forward pre-hook replaces that layer's input by the
    MTP input of architecture.md s8, written here in torch: h_proj(hnorm(streams)) + e_proj(enorm(
    embed(token t + 1))) on every stream. The final hc_head and norm are the MTP block's own, the
    head the shared one. `pair_with_next=False` pairs the streams at t with token t instead (a
    negative control).
    """
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RMSNorm

    n, ratio = cfg["num_hidden_layers"], cfg["compress_ratios"][-1]
    big = {**cfg, "num_hidden_layers": n + 1, "compress_ratios": [*cfg["compress_ratios"][:-1], ratio, ratio]}
    release = release_tensors_from_hf(hf_main.state_dict())
    glue = {}
    for name, value in hf_main.mtp_release.items():
        suffix = name.removeprefix("mtp.0.")
        if suffix in ("e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight"):
            glue[suffix] = torch.from_numpy(np.asarray(value))
        elif suffix == "norm.weight" or suffix.startswith("hc_head_"):
            release[suffix] = value
        else:
            release[f"layers.{n}.{suffix}"] = value
    model = DeepseekV4ForCausalLM(hf_config(big)).eval()
    model.load_state_dict(hf_state_from_release(release, big), strict=True)
    norms = {}
    for name in ("enorm", "hnorm"):
        norms[name] = DeepseekV4RMSNorm(cfg["hidden_size"], eps=cfg["rms_norm_eps"])
        norms[name].weight.data = glue[f"{name}.weight"]
    tokens = torch.tensor(tokens)
    paired = tokens[:, 1:] if pair_with_next else tokens[:, :-1]

    def block_input(module, args, kwargs):
        e = torch.nn.functional.linear(norms["enorm"](model.model.embed_tokens(paired)), glue["e_proj.weight"])
        h = torch.nn.functional.linear(norms["hnorm"](args[0]), glue["h_proj.weight"])
        return (h + e[:, :, None, :],), {**kwargs, "input_ids": paired}

    handle = model.model.layers[n].register_forward_pre_hook(block_input, with_kwargs=True)
    try:
        with torch.no_grad():
            return model(tokens[:, :-1], use_cache=False).logits.numpy()
    finally:
        handle.remove()
