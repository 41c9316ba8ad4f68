"""Tests of the tiny release-layout checkpoints and their float32 `transformers` oracle."""

import json
import math

import numpy as np
import pytest
import torch
from release_fixture import (
    TINY_FLASH,
    TINY_PRO,
    build_hf_model,
    hf_config,
    hf_state_from_release,
    release_format,
    release_names_of_hf,
    scale_name,
    write_release_checkpoint,
)

from dsv4 import quant
from dsv4.safetensors_io import CheckpointIndex

# Release config.json keys of docs/checkpoint_format.md section 1 (plus the no-architecture ones).
RELEASE_KEYS = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window",
    "compress_ratios", "rope_theta", "compress_rope_theta", "rope_scaling", "max_position_embeddings",
    "index_n_heads", "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters", "hc_eps",
    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
    "num_hash_layers", "scoring_func", "routed_scaling_factor", "norm_topk_prob", "topk_method",
    "swiglu_limit", "num_nextn_predict_layers", "rms_norm_eps", "hidden_act", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "torch_dtype", "expert_dtype", "quantization_config",
    "architectures", "model_type", "attention_bias", "attention_dropout", "initializer_range",
    "use_cache", "transformers_version",
}  # fmt: skip

LAYER_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


# ---------------------------------------------------------------------------- expected layout


def _fp8(name, shape, scale_fmt="ue8m0"):
    grid = [math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)]
    scale_dtype = "F8_E8M0" if scale_fmt == "ue8m0" else "F32"
    return {name: ("F8_E4M3", list(shape)), scale_name(name): (scale_dtype, grid)}


def _fp4(name, shape):
    grid = [shape[0], math.ceil(shape[1] / 32)]
    return {name: ("I8", [shape[0], shape[1] // 2]), scale_name(name): ("F8_E8M0", grid)}


def _attention(p, c, ratio, fp8):
    d, h, dh, q = c["hidden_size"], c["num_attention_heads"], c["head_dim"], c["q_lora_rank"]
    g, r = c["o_groups"], c["o_lora_rank"]
    out = {
        p + "attn.attn_sink": ("F32", [h]),
        p + "attn.q_norm.weight": ("BF16", [q]),
        p + "attn.kv_norm.weight": ("BF16", [dh]),
    }
    for name, shape in [
        ("wq_a", [q, d]),
        ("wq_b", [h * dh, q]),
        ("wkv", [dh, d]),
        ("wo_a", [g * r, h * dh // g]),
        ("wo_b", [d, g * r]),
    ]:
        out.update(fp8(f"{p}attn.{name}.weight", shape))
    if ratio:
        width = (2 if ratio == 4 else 1) * dh
        out.update(_compressor(f"{p}attn.compressor.", ratio, width, dh, d))
    if ratio == 4:
        hi, di = c["index_n_heads"], c["index_head_dim"]
        out.update(fp8(f"{p}attn.indexer.wq_b.weight", [hi * di, q]))
        out[f"{p}attn.indexer.weights_proj.weight"] = ("BF16", [hi, d])
        out.update(_compressor(f"{p}attn.indexer.compressor.", 4, 2 * di, di, d))
    return out


def _compressor(p, ratio, width, dh, d):
    return {
        p + "ape": ("F32", [ratio, width]),
        p + "wkv.weight": ("BF16", [width, d]),
        p + "wgate.weight": ("BF16", [width, d]),
        p + "norm.weight": ("BF16", [dh]),
    }


def _moe(p, c, hash_layer, fp8, expert):
    d, e, i = c["hidden_size"], c["n_routed_experts"], c["moe_intermediate_size"]
    out = {p + "ffn.gate.weight": ("BF16", [e, d])}
    if hash_layer:
        out[p + "ffn.gate.tid2eid"] = ("I64", [c["vocab_size"], c["num_experts_per_tok"]])
    else:
        out[p + "ffn.gate.bias"] = ("F32", [e])
    for x in range(e):
        for j, shape in ((1, [i, d]), (2, [d, i]), (3, [i, d])):
            out.update(expert(f"{p}ffn.experts.{x}.w{j}.weight", shape))
    for j, shape in ((1, [i, d]), (2, [d, i]), (3, [i, d])):
        out.update(fp8(f"{p}ffn.shared_experts.w{j}.weight", shape))
    return out


def _block(p, c, ratio, hash_layer, fp8, expert):
    d, n = c["hidden_size"], c["hc_mult"]
    mix = (2 + n) * n
    out = {p + "attn_norm.weight": ("BF16", [d]), p + "ffn_norm.weight": ("BF16", [d])}
    for site in ("attn", "ffn"):
        out.update(
            {
                f"{p}hc_{site}_fn": ("F32", [mix, n * d]),
                f"{p}hc_{site}_base": ("F32", [mix]),
                f"{p}hc_{site}_scale": ("F32", [3]),
            }
        )
    out.update(_attention(p, c, ratio, fp8))
    out.update(_moe(p, c, hash_layer, fp8, expert))
    return out


def _head(p, c):
    d, n = c["hidden_size"], c["hc_mult"]
    return {
        p + "norm.weight": ("BF16", [d]),
        p + "hc_head_fn": ("F32", [n, n * d]),
        p + "hc_head_base": ("F32", [n]),
        p + "hc_head_scale": ("F32", [1]),
    }


def expected_layout(c, scale_fmt="ue8m0", expert_format="fp4"):
    """{name: (dtype, shape)} of docs/checkpoint_format.md sections 2 and 4, for config c."""

    def fp8(n, s):
        return _fp8(n, s, scale_fmt)

    expert = fp8 if expert_format == "fp8" else _fp4
    d, v, ratios = c["hidden_size"], c["vocab_size"], c["compress_ratios"]
    out = {"embed.weight": ("BF16", [v, d]), "head.weight": ("BF16", [v, d]), **_head("", c)}
    for i in range(c["num_hidden_layers"]):
        out.update(_block(f"layers.{i}.", c, ratios[i], i < c["num_hash_layers"], fp8, expert))
    out.update(_block("mtp.0.", c, ratios[-1], False, fp8, expert))
    out.update(_head("mtp.0.", c))
    out.update(fp8("mtp.0.e_proj.weight", [d, d]))
    out.update(fp8("mtp.0.h_proj.weight", [d, d]))
    out.update({"mtp.0.enorm.weight": ("BF16", [d]), "mtp.0.hnorm.weight": ("BF16", [d])})
    return out


def dequantize_checkpoint(ckpt: CheckpointIndex) -> dict[str, np.ndarray]:
    """Every weight of the checkpoint as float32 (int64 for tid2eid), deciding by header dtype."""
    out = {}
    for name in ckpt.names():
        if name.endswith(".scale"):
            continue
        dtype, value = ckpt.info(name).dtype, ckpt.read(name)
        if dtype == "F8_E4M3":
            out[name] = quant.dequantize_fp8(value, ckpt.read(scale_name(name)))
        elif dtype == "I8":
            out[name] = quant.dequantize_fp4(value, ckpt.read(scale_name(name)))
        elif dtype in ("BF16", "F32"):
            out[name] = value.astype(np.float32)
        else:
            assert dtype == "I64", (name, dtype)
            out[name] = value
    return out


def _assert_layout(path, cfg, **fmt):
    expected = expected_layout(cfg, **fmt)
    ckpt = CheckpointIndex(path)
    assert sorted(ckpt.names()) == sorted(expected)
    for name, (dtype, shape) in expected.items():
        info = ckpt.info(name)
        assert (info.dtype, list(info.shape)) == (dtype, shape), name
    assert len(ckpt.shards()) > 1


def _assert_reproduces_state(path, model, cfg):
    deq = dequantize_checkpoint(CheckpointIndex(path))
    state = hf_state_from_release({k: v for k, v in deq.items() if not k.startswith("mtp.")}, cfg)
    ref = model.state_dict()
    assert sorted(state) == sorted(ref)
    for name, tensor in ref.items():
        assert torch.equal(state[name], tensor), name


# --------------------------------------------------------------------------------- HF config


@pytest.mark.parametrize("cfg", [TINY_FLASH, TINY_PRO], ids=["flash", "pro"])
def test_release_config_has_every_release_key(cfg):
    assert set(cfg) == RELEASE_KEYS
    assert len(cfg["compress_ratios"]) == cfg["num_hidden_layers"] + 1


@pytest.mark.parametrize("cfg", [TINY_FLASH, TINY_PRO], ids=["flash", "pro"])
def test_hf_config_layer_kinds(cfg):
    hc = hf_config(cfg)
    n = cfg["num_hidden_layers"]
    assert hc.layer_types == [LAYER_TYPE[r] for r in cfg["compress_ratios"][:n]]
    assert hc.mlp_layer_types == ["hash_moe" if i < cfg["num_hash_layers"] else "moe" for i in range(n)]
    assert hc.qk_rope_head_dim == cfg["qk_rope_head_dim"]
    assert hc.compress_rates == {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    assert not hc.tie_word_embeddings


def _yarn_inv_freq(cfg):
    """architecture.md section 2, written out independently of transformers."""
    r, base, y = cfg["qk_rope_head_dim"], cfg["compress_rope_theta"], cfg["rope_scaling"]
    l0, factor = y["original_max_position_embeddings"], y["factor"]
    f = base ** (-np.arange(0, r, 2, dtype=np.float64) / r)
    low = max(math.floor(r * math.log(l0 / (2 * math.pi * y["beta_fast"])) / (2 * math.log(base))), 0)
    high = min(math.ceil(r * math.log(l0 / (2 * math.pi * y["beta_slow"])) / (2 * math.log(base))), r - 1)
    ramp = np.clip((np.arange(r // 2) - low) / (high - low), 0, 1)
    return f * (1 - ramp) + (f / factor) * ramp


@pytest.mark.parametrize("cfg", [TINY_FLASH, TINY_PRO], ids=["flash", "pro"])
def test_hf_rope_tables(cfg):
    rot = build_hf_model(cfg, seed=0).model.rotary_emb
    r = cfg["qk_rope_head_dim"]
    plain = cfg["rope_theta"] ** (-np.arange(0, r, 2, dtype=np.float64) / r)
    np.testing.assert_allclose(rot.main_inv_freq.numpy(), plain, rtol=1e-6)
    yarn = _yarn_inv_freq(cfg)
    np.testing.assert_allclose(rot.compress_inv_freq.numpy(), yarn, rtol=1e-6)
    # Negative control: YaRN really changed the table (else the check above proves little).
    assert not np.allclose(yarn, cfg["compress_rope_theta"] ** (-np.arange(0, r, 2) / r), rtol=1e-3)
    assert rot.main_attention_scaling == 1.0 and rot.compress_attention_scaling == 1.0


# ------------------------------------------------------------------------------- name table


def test_name_table_is_a_bijection(flash_ckpt):
    path, model, cfg = flash_ckpt
    names = [n for hf in model.state_dict() for n in release_names_of_hf(hf, cfg["n_routed_experts"])]
    assert len(names) == len(set(names))
    stored = CheckpointIndex(path).names()
    assert set(names) == {n for n in stored if not n.endswith(".scale") and not n.startswith("mtp.")}


def test_name_table_matches_transformers_conversion(flash_ckpt):
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    path, model, cfg = flash_ckpt
    transforms = get_checkpoint_conversion_mapping("deepseek_v4")
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter) and t not in renamings]
    # HF merges experts as concat(w1, w3) along the row axis: gate rows first, as split here.
    sources = [p for c in converters for p in c.source_patterns]
    assert sources[:2] == [r"\.experts.*.w1.weight", r"\.experts.*.w3.weight"]
    state = model.state_dict()
    for hf_name in state:
        for release_name in release_names_of_hf(hf_name, cfg["n_routed_experts"]):
            got, _ = rename_source_key(release_name, renamings, converters, "model", state)
            assert got == hf_name, release_name


def test_release_format_table():
    assert release_format("layers.3.attn.wkv.weight") == "fp8"
    assert release_format("layers.3.attn.compressor.wkv.weight") == "bf16"
    assert release_format("layers.3.attn.indexer.compressor.norm.weight") == "bf16"
    assert release_format("mtp.0.ffn.experts.7.w2.weight") == "fp4"
    assert release_format("mtp.0.ffn.experts.7.w2.weight", expert_format="fp8") == "fp8"
    assert release_format("mtp.0.hc_head_scale") == "f32"
    assert release_format("layers.0.ffn.gate.tid2eid") == "i64"
    with pytest.raises(KeyError):
        release_format("layers.0.attn.wq_c.weight")


# ------------------------------------------------------------------------------- checkpoints


@pytest.fixture(params=["flash_ckpt", "pro_ckpt"])
def ckpt(request):
    return request.getfixturevalue(request.param)


def test_hf_model_runs_with_finite_logits(ckpt):
    _, model, cfg = ckpt
    ids = torch.randint(0, cfg["vocab_size"], (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 300, cfg["vocab_size"]) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1  # activations did not vanish


def test_checkpoint_layout_matches_release_format(ckpt):
    path, _, cfg = ckpt
    _assert_layout(path, cfg)
    assert json.loads((path / "config.json").read_text()) == cfg


def test_checkpoint_dequantizes_to_hf_state_exactly(ckpt):
    path, model, cfg = ckpt
    _assert_reproduces_state(path, model, cfg)


def test_oracle_holds_quantized_not_raw_weights(flash_ckpt):
    """Negative control: the random model before quantization differs from the returned oracle."""
    _, model, cfg = flash_ckpt
    raw = build_hf_model(cfg, seed=0).state_dict()  # the flash fixture uses seed 0
    got = model.state_dict()
    for name in (
        "model.layers.0.self_attn.q_a_proj.weight",
        "model.layers.2.mlp.experts.gate_up_proj",
        "model.embed_tokens.weight",
    ):
        assert not torch.equal(raw[name], got[name]), name
        torch.testing.assert_close(got[name], raw[name], rtol=0.3, atol=0.3 * raw[name].abs().max().item())
    assert torch.equal(raw["model.layers.0.attn_hc.fn"], got["model.layers.0.attn_hc.fn"])  # F32: as is


def test_weights_are_not_trivial(flash_ckpt):
    _, model, _ = flash_ckpt
    for name, t in model.state_dict().items():
        if t.dtype.is_floating_point:
            # FP4 experts round ~15% of a gaussian to 0; nothing should be mostly 0 or 1.
            assert (t == 0).float().mean() < 0.3 and (t == 1).float().mean() < 0.1, name
            assert t.numel() == 1 or t.unique().numel() > 1, name
    tid2eid = model.state_dict()["model.layers.0.mlp.gate.tid2eid"]
    assert all(len(set(row.tolist())) == row.numel() for row in tid2eid)


def test_base_style_checkpoint(tmp_path):
    """Float32 FP8 scales and FP8 routed experts (Base checkpoints)."""
    model = write_release_checkpoint(TINY_PRO, tmp_path, seed=3, scale_fmt="float", expert_format="fp8")
    _assert_layout(tmp_path, TINY_PRO, scale_fmt="float", expert_format="fp8")
    _assert_reproduces_state(tmp_path, model, TINY_PRO)


def test_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    write_release_checkpoint(TINY_FLASH, tmp_path, seed=0, with_tokenizer=True)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == TINY_FLASH["vocab_size"]
    assert tok.token_to_id("<｜begin▁of▁sentence｜>") == 0 and tok.token_to_id("<｜end▁of▁sentence｜>") == 1
    ids = tok.encode("Hello, wörld!").ids
    assert max(ids) < TINY_FLASH["vocab_size"] and tok.decode(ids) == "Hello, wörld!"
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["add_bos_token"] is False
