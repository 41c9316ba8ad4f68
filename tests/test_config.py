"""dsv4.config: presets against the release tables, config.json round trips, and every refusal."""

import dataclasses
import json

import pytest

from dsv4.config import ConfigError, ModelConfig, QuantizationConfig, RopeScaling, RuntimeConfig

# checkpoint_format.md section 1, written out by hand (not derived from the presets).
RELEASE_COMMON = {
    "vocab_size": 129280,
    "num_key_value_heads": 1,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "o_lora_rank": 1024,
    "sliding_window": 128,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "rope_scaling": RopeScaling(
        type="yarn", factor=16.0, original_max_position_embeddings=65536, beta_fast=32.0, beta_slow=1.0
    ),
    "max_position_embeddings": 1048576,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "n_shared_experts": 1,
    "num_experts_per_tok": 6,
    "num_hash_layers": 3,
    "scoring_func": "sqrtsoftplus",
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
    "quantization_config": QuantizationConfig(
        activation_scheme="dynamic",
        fmt="e4m3",
        quant_method="fp8",
        scale_fmt="ue8m0",
        weight_block_size=(128, 128),
    ),
}
RELEASE_FLASH = {
    **RELEASE_COMMON,
    "hidden_size": 4096,
    "num_hidden_layers": 43,
    "num_attention_heads": 64,
    "q_lora_rank": 1024,
    "o_groups": 8,
    "compress_ratios": tuple([0, 0] + [4, 128] * 20 + [4] + [0]),
    "index_topk": 512,
    "n_routed_experts": 256,
    "moe_intermediate_size": 2048,
    "routed_scaling_factor": 1.5,
}
RELEASE_PRO = {
    **RELEASE_COMMON,
    "hidden_size": 7168,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "q_lora_rank": 1536,
    "o_groups": 16,
    "compress_ratios": tuple([128, 128] + [4, 128] * 29 + [4] + [0]),
    "index_topk": 1024,
    "n_routed_experts": 384,
    "moe_intermediate_size": 3072,
    "routed_scaling_factor": 2.5,
}

# The Flash release values under the official inference/config.json (ModelArgs) names.
NATIVE_FLASH = {
    "vocab_size": 129280, "dim": 4096, "moe_inter_dim": 2048, "n_layers": 43, "n_hash_layers": 3,
    "n_mtp_layers": 1, "n_heads": 64, "n_routed_experts": 256, "n_shared_experts": 1,
    "n_activated_experts": 6,
    "score_func": "sqrtsoftplus", "route_scale": 1.5, "swiglu_limit": 10.0, "q_lora_rank": 1024,
    "head_dim": 512, "rope_head_dim": 64, "norm_eps": 1e-6, "o_groups": 8, "o_lora_rank": 1024,
    "window_size": 128, "compress_ratios": [0, 0] + [4, 128] * 20 + [4] + [0], "compress_rope_theta": 160000,
    "original_seq_len": 65536, "rope_theta": 10000, "rope_factor": 16, "beta_fast": 32, "beta_slow": 1,
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6, "dtype": "fp8", "scale_fmt": "ue8m0", "expert_dtype": "fp4", "scale_dtype": "fp8",
    "max_batch_size": 4, "max_seq_len": 4096,
}  # fmt: skip


# ------------------------------------------------------------------------------------ presets


@pytest.mark.parametrize(
    ("preset", "table"), [(ModelConfig.flash, RELEASE_FLASH), (ModelConfig.pro, RELEASE_PRO)]
)
def test_presets_equal_release_tables(preset, table):
    cfg = preset()
    assert set(table) == {f.name for f in dataclasses.fields(ModelConfig)}  # every key is checked
    for key, value in table.items():
        assert getattr(cfg, key) == value, key


def test_compress_ratio_lengths():
    assert len(ModelConfig.flash().compress_ratios) == 44
    assert len(ModelConfig.pro().compress_ratios) == 62
    assert len(ModelConfig.tiny().compress_ratios) == 6


def test_flash_attention_kinds():
    cfg = ModelConfig.flash()
    assert cfg.attention_kind(0) == cfg.attention_kind(1) == "sliding"
    assert cfg.attention_kind(2) == "csa" and cfg.attention_kind(3) == "hca"
    assert cfg.attention_kind(41) == "hca" and cfg.attention_kind(42) == "csa"
    assert cfg.attention_kind(43) == "sliding"  # the MTP block
    assert cfg.layer_kinds == ("sliding",) * 2 + ("csa", "hca") * 20 + ("csa",)
    assert cfg.mtp_compress_ratio == 0 and cfg.num_mtp_layers == 1
    assert (cfg.compress_ratio(2), cfg.compress_ratio(3)) == (4, 128)


def test_pro_attention_kinds():
    cfg = ModelConfig.pro()
    assert cfg.layer_kinds == ("hca",) * 2 + ("csa", "hca") * 29 + ("csa",)
    assert cfg.attention_kind(61) == "sliding"


def test_layer_index_out_of_range():
    cfg = ModelConfig.tiny()
    for i in (-1, 6):
        with pytest.raises(IndexError, match=f"block {i} out of range: config has 6 compress_ratios"):
            cfg.compress_ratio(i)


def test_hash_layers():
    cfg = ModelConfig.flash()
    assert [cfg.is_hash_layer(i) for i in range(5)] == [True, True, True, False, False]
    assert not cfg.is_hash_layer(cfg.num_hidden_layers)  # the MTP block never hashes
    full = ModelConfig.tiny(num_hash_layers=5)
    assert all(full.is_hash_layer(i) for i in range(5)) and not full.is_hash_layer(5)


def test_tiny_preset():
    cfg = ModelConfig.tiny()
    assert cfg.layer_kinds == ("sliding", "sliding", "csa", "hca", "csa")
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim) == (64, 4, 64, 16)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.num_hash_layers, cfg.hc_mult) == (8, 2, 2, 4)
    assert cfg.quantization_config is None and cfg.expert_dtype is None
    assert ModelConfig.tiny(vocab_size=1000).vocab_size == 1000


def test_configs_are_hashable_static_args():
    import jax
    import jax.numpy as jnp

    width = jax.jit(lambda x, cfg: x * cfg.hidden_size, static_argnums=1)
    assert int(width(jnp.ones(()), ModelConfig.tiny())) == 64
    assert hash(ModelConfig.flash()) == hash(ModelConfig.flash())
    assert hash(RuntimeConfig()) == hash(RuntimeConfig())
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig.tiny().hidden_size = 1


# ------------------------------------------------------------------------------ config.json I/O


@pytest.mark.parametrize("preset", [ModelConfig.flash, ModelConfig.pro, ModelConfig.tiny])
def test_round_trip_through_config_json(preset, tmp_path):
    cfg = preset()
    written = cfg.save(tmp_path)
    assert written == tmp_path / "config.json"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left behind
    assert ModelConfig.from_hf_config(tmp_path) == cfg
    assert ModelConfig.from_hf_config(written) == cfg
    assert ModelConfig.from_hf_config(str(written)) == cfg
    assert ModelConfig.from_hf_config(cfg.to_hf_dict()) == cfg


def test_to_hf_dict_uses_release_layout():
    d = ModelConfig.flash().to_hf_dict()
    assert d["model_type"] == "deepseek_v4"
    assert d["rope_scaling"] == {
        "type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536, "beta_fast": 32.0,
        "beta_slow": 1.0,
    }  # fmt: skip
    assert d["quantization_config"]["weight_block_size"] == [128, 128]
    assert "expert_dtype" not in d["quantization_config"]
    assert isinstance(d["compress_ratios"], list)
    tiny = ModelConfig.tiny().to_hf_dict()
    assert "quantization_config" not in tiny and "expert_dtype" not in tiny
    json.dumps(d)


def test_generic_keys_accepted_and_ignored():
    d = ModelConfig.flash().to_hf_dict()
    d.update(
        architectures=["DeepseekV4ForCausalLM"], attention_bias=False, attention_dropout=0.0,
        initializer_range=0.02, use_cache=True, transformers_version="5.23.0", pad_token_id=None,
        output_router_logits=False, router_aux_loss_coef=0.001, router_jitter_noise=0.0, mlp_bias=False,
    )  # fmt: skip
    assert ModelConfig.from_hf_config(d) == ModelConfig.flash()


@pytest.mark.parametrize("bad", [[1, 2], 42, None])
def test_a_config_that_is_no_path_or_mapping_is_named(bad):
    with pytest.raises(ConfigError, match=f"path_or_dict: .* got {type(bad).__name__}"):
        ModelConfig.from_hf_config(bad)


def test_unknown_key_is_named_with_the_file(tmp_path):
    d = ModelConfig.tiny().to_hf_dict() | {"qk_nope_head_dim": 448}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="qk_nope_head_dim") as err:
        ModelConfig.from_hf_config(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)


def test_a_key_given_twice_is_named_with_the_file(tmp_path):
    """json.loads keeps the last of two values silently (hidden_size 64, then 160, read as 160)."""
    text = json.dumps(ModelConfig.tiny().to_hf_dict())
    (tmp_path / "config.json").write_text(text.replace('{"', '{"hidden_size": 7, "', 1))
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'}: key 'hidden_size' appears twice"):
        ModelConfig.from_hf_config(tmp_path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("key", ["rms_norm_eps", "hc_eps", "rope_theta", "routed_scaling_factor", "swiglu_limit"])
def test_non_finite_numbers_are_refused(tmp_path, key, value):
    """Python's JSON reader takes NaN and Infinity; `NaN <= 0` is False, so they passed the positivity
    checks, and a checkpoint with rms_norm_eps NaN loaded and gave NaN logits."""
    (tmp_path / "config.json").write_text(json.dumps(ModelConfig.tiny().to_hf_dict() | {key: value}))
    with pytest.raises(ConfigError, match=f"{key}: must be a finite number, got {value}"):
        ModelConfig.from_hf_config(tmp_path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_yarn_factor_is_refused(value):
    rope = ModelConfig.tiny().to_hf_dict()["rope_scaling"] | {"factor": value}
    with pytest.raises(ConfigError, match=f"rope_scaling.factor: must be a positive number, got {value}"):
        ModelConfig.from_hf_config(ModelConfig.tiny().to_hf_dict() | {"rope_scaling": rope})


def test_all_unknown_keys_named_at_once():
    d = ModelConfig.tiny().to_hf_dict() | {"n_group": 8, "kv_lora_rank": 512}
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_hf_config(d)
    assert "n_group" in str(err.value) and "kv_lora_rank" in str(err.value)


def test_missing_key_is_named():
    d = ModelConfig.tiny().to_hf_dict()
    del d["hc_mult"], d["index_topk"]
    with pytest.raises(ConfigError, match=r"hc_mult.*index_topk"):
        ModelConfig.from_hf_config(d)


def test_absent_optional_keys_mean_none():
    d = ModelConfig.flash().to_hf_dict()
    for key in ("rope_scaling", "quantization_config", "expert_dtype"):
        del d[key]
    cfg = ModelConfig.from_hf_config(d)
    assert cfg.rope_scaling is None and cfg.quantization_config is None and cfg.expert_dtype is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model_type", "deepseek_v3"),
        ("attention_bias", True),
        ("mlp_bias", True),
        ("attention_dropout", 0.1),
        ("router_jitter_noise", 0.01),
    ],
)
def test_fixed_generic_keys_refuse_other_values(key, value):
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_hf_config(ModelConfig.tiny().to_hf_dict() | {key: value})


def test_rope_scaling_accepts_rope_type():
    d = ModelConfig.flash().to_hf_dict()
    d["rope_scaling"] = {k if k != "type" else "rope_type": v for k, v in d["rope_scaling"].items()}
    assert ModelConfig.from_hf_config(d) == ModelConfig.flash()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"type": "linear"}, "rope_scaling.type"),
        ({"mscale": 1.0}, "mscale"),
        ({"attention_factor": 1.3}, "attention_factor"),
    ],
)
def test_rope_scaling_refusals(change, field):
    d = ModelConfig.flash().to_hf_dict()
    d["rope_scaling"] = d["rope_scaling"] | change
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_config(d)


def test_expert_dtype_inside_quantization_config():
    d = ModelConfig.flash().to_hf_dict()
    del d["expert_dtype"]
    d["quantization_config"]["expert_dtype"] = "fp4"
    assert ModelConfig.from_hf_config(d) == ModelConfig.flash()
    d["expert_dtype"], d["quantization_config"]["expert_dtype"] = "fp4", "fp8"
    with pytest.raises(ConfigError, match="expert_dtype"):
        ModelConfig.from_hf_config(d)


def test_quantization_config_refusals():
    d = ModelConfig.flash().to_hf_dict()
    d["quantization_config"] = d["quantization_config"] | {"modules_to_not_convert": None}
    with pytest.raises(ConfigError, match="modules_to_not_convert"):
        ModelConfig.from_hf_config(d)
    d["quantization_config"] = ModelConfig.flash().to_hf_dict()["quantization_config"] | {"fmt": "e5m2"}
    with pytest.raises(ConfigError, match="quantization_config.fmt"):
        ModelConfig.from_hf_config(d)


def test_transformers_saved_config_reads_back():
    transformers = pytest.importorskip("transformers")
    for cfg in (ModelConfig.flash(), ModelConfig.pro(), ModelConfig.tiny()):
        hf = transformers.DeepseekV4Config(**cfg.to_hf_dict())
        assert ModelConfig.from_hf_config(json.loads(hf.to_json_string(use_diff=True))) == cfg
        assert ModelConfig.from_hf_config(hf.to_dict()) == cfg


def test_transformers_derived_keys_must_agree():
    d = ModelConfig.tiny().to_hf_dict()
    layer_types = ["sliding_attention"] * 5
    with pytest.raises(ConfigError, match="layer_types"):
        ModelConfig.from_hf_config(d | {"layer_types": layer_types})
    with pytest.raises(ConfigError, match="mlp_layer_types"):
        ModelConfig.from_hf_config(d | {"mlp_layer_types": ["moe", "hash_moe", "moe", "moe", "moe"]})
    with pytest.raises(ConfigError, match="num_hash_layers"):
        ModelConfig.from_hf_config(d | {"mlp_layer_types": ["hash_moe"] * 3 + ["moe"] * 2})
    with pytest.raises(ConfigError, match="compress_rates"):
        ModelConfig.from_hf_config(d | {"compress_rates": {"compressed_sparse_attention": 8}})
    with pytest.raises(ConfigError, match="qk_rope_head_dim"):
        ModelConfig.from_hf_config(d | {"partial_rotary_factor": 0.5})


def test_layer_types_alone_give_a_sliding_mtp_block():
    d = ModelConfig.flash().to_hf_dict()
    del d["compress_ratios"]
    d["layer_types"] = [
        {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}[r]
        for r in ModelConfig.flash().compress_ratios[:-1]
    ]
    assert ModelConfig.from_hf_config(d) == ModelConfig.flash()


def test_unreadable_path():
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_hf_config("/nonexistent/dir/config.json")


# ------------------------------------------------------------------ native inference/config.json


def test_native_flash_translates_to_release(tmp_path):
    assert ModelConfig.from_hf_config(NATIVE_FLASH) == ModelConfig.flash()
    path = tmp_path / "inference_config.json"
    path.write_text(json.dumps(NATIVE_FLASH))
    assert ModelConfig.from_hf_config(path) == ModelConfig.flash()


def test_native_defaults_and_formats():
    minimal = {k: v for k, v in NATIVE_FLASH.items() if k not in ("n_mtp_layers", "norm_eps", "hc_mult")}
    assert ModelConfig.from_hf_config(minimal) == ModelConfig.flash()
    bf16 = ModelConfig.from_hf_config(NATIVE_FLASH | {"dtype": "bf16"})
    assert bf16.quantization_config is None
    no_yarn = ModelConfig.from_hf_config(NATIVE_FLASH | {"original_seq_len": 0})
    assert no_yarn.rope_scaling is None and no_yarn.max_position_embeddings == 4096


def test_native_unknown_and_missing_keys():
    with pytest.raises(ConfigError, match=r"inter_dim.*n_expert_groups"):
        ModelConfig.from_hf_config(NATIVE_FLASH | {"inter_dim": 18432, "n_expert_groups": 8})
    no_swiglu = {k: v for k, v in NATIVE_FLASH.items() if k != "swiglu_limit"}
    with pytest.raises(ConfigError, match="swiglu_limit"):
        ModelConfig.from_hf_config(no_swiglu)
    with pytest.raises(ConfigError, match="dtype"):
        ModelConfig.from_hf_config(NATIVE_FLASH | {"dtype": "fp16"})
    no_hash = {k: v for k, v in NATIVE_FLASH.items() if k != "n_hash_layers"}  # named as the file names it
    with pytest.raises(ConfigError, match=r"missing native config keys \['n_hash_layers'\]"):
        ModelConfig.from_hf_config(no_hash)
    with pytest.raises(ConfigError, match="original_seq_len: must be a finite number, got '65536'"):  # was a TypeError
        ModelConfig.from_hf_config(NATIVE_FLASH | {"original_seq_len": "65536"})


MAIN_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rope_parameters": {"main": 10000.0, "compress": MAIN_ROPE}}, "rope_parameters: malformed value"),
        ({"rope_parameters": {"main": MAIN_ROPE, "compress": {"rope_type": "default"}}},
         "rope_parameters: malformed value .*KeyError: 'rope_theta'"),
        ({"compress_rates": 4}, "compress_rates: malformed value 4"),
        ({"mlp_layer_types": 3}, "mlp_layer_types: malformed value 3"),
        ({"layer_types": 5}, "layer_types: malformed value 5"),
        ({"partial_rotary_factor": "0.25"}, "partial_rotary_factor: must be a finite number, got '0.25'"),
    ],
)  # fmt: skip
def test_malformed_transformers_keys_are_named(change, message):
    """Each raised a bare TypeError, KeyError or ValueError naming neither the key nor the file."""
    with pytest.raises(ConfigError, match=f"config dict: {message}"):
        ModelConfig.from_hf_config(ModelConfig.tiny().to_hf_dict() | change)


# ------------------------------------------------------------------------------ validation rules


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"compress_ratios": (0, 0, 4, 128, 4)}, "compress_ratios"),
        ({"compress_ratios": (0, 0, 4, 128, 4, 0, 0)}, "compress_ratios"),
        ({"compress_ratios": (0, 0, 8, 128, 4, 0)}, "compress_ratios"),
        ({"compress_ratios": (0, 0, 4, "128", 4, 0)}, "compress_ratios"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"qk_rope_head_dim": 15, "index_head_dim": 33}, "qk_rope_head_dim"),
        ({"qk_rope_head_dim": 64, "index_head_dim": 66}, "qk_rope_head_dim"),
        ({"index_head_dim": 16}, "index_head_dim"),
        ({"index_head_dim": 33}, "index_head_dim"),
        ({"head_dim": 63}, r"head_dim: must be even \(RoPE"),  # was accepted, then failed inside RoPE
        ({"o_groups": 3}, "o_groups"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"num_hash_layers": 6}, "num_hash_layers"),
        ({"num_hash_layers": -1}, "num_hash_layers"),
        ({"hc_mult": 0}, "hc_mult"),
        ({"hc_sinkhorn_iters": 0}, "hc_sinkhorn_iters"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"vocab_size": -5}, "vocab_size"),
        ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
        ({"index_topk": 0}, "index_topk"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"swiglu_limit": -1.0}, "swiglu_limit"),
        ({"hidden_size": 64.0}, "hidden_size"),
        ({"norm_topk_prob": 1}, "norm_topk_prob"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"topk_method": "greedy"}, "topk_method"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"n_shared_experts": 2}, "n_shared_experts"),
        ({"expert_dtype": "int4"}, "expert_dtype"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 8}},
         "rope_scaling.type"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "original_max_position_embeddings"),
        ({"rope_scaling": 16}, "rope_scaling"),
        ({"quantization_config": "fp8"}, "quantization_config"),
    ],
)  # fmt: skip
def test_validation_rule_names_its_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"(?<![A-Za-z_]){field}\b"):
        ModelConfig.tiny(**overrides)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(eos_token_id=512), r"eos_token_id: must lie in \[0, vocab_size 512\), got 512"),
        (dict(eos_token_id=(1, -1)), r"eos_token_id: must lie in \[0, vocab_size 512\), got \(1, -1\)"),
        (dict(bos_token_id=9999), "bos_token_id: must lie in"),
        (dict(torch_dtype="int3"), "torch_dtype: must be one of"),
        (dict(rope_scaling=dict(type="yarn", factor=0.5, original_max_position_embeddings=64)),
         "rope_scaling.factor: YaRN extends the context, so it must be >= 1, got 0.5"),
        (dict(rope_scaling=dict(type="yarn", factor=4, original_max_position_embeddings=64, beta_fast=1, beta_slow=32)),
         r"beta_fast \(1.0\) must exceed beta_slow \(32.0\)"),
    ],
)  # fmt: skip
def test_values_the_model_cannot_mean_are_refused(change, message):
    """Each was accepted: special token ids past the vocabulary (generate refused them later), any
    string as torch_dtype, a YaRN factor below 1, a YaRN ramp running backwards."""
    assert ModelConfig.tiny().vocab_size == 512
    with pytest.raises(ConfigError, match=message):
        ModelConfig.tiny(**change)


def test_scoring_func_message_says_why():
    with pytest.raises(ConfigError, match="only router scoring the model implements"):
        ModelConfig.tiny(scoring_func="sigmoid")
    with pytest.raises(ConfigError, match="unsupported"):
        ModelConfig.tiny(tie_word_embeddings=True)
    with pytest.raises(ConfigError, match="norm_topk_prob.*always renormalises"):  # was accepted, then ignored
        ModelConfig.tiny(norm_topk_prob=False)


def test_compress_ratios_may_have_one_entry_per_mtp_block():
    cfg = ModelConfig.tiny(num_nextn_predict_layers=2, compress_ratios=(0, 0, 4, 128, 4, 0, 0))
    assert cfg.num_mtp_layers == 2 and cfg.mtp_compress_ratio == 0
    assert ModelConfig.tiny(num_nextn_predict_layers=0).num_mtp_layers == 0


@pytest.mark.parametrize("ratios,expected", [((0, 0, 4, 128, 4, 4, 0), [4, 0]), ((0, 0, 4, 128, 4, 128), [128, 128])])
def test_each_mtp_block_is_built_with_its_own_ratio(ratios, expected):
    """With one entry per MTP block, every block was built with the last entry (mtp.0 of ratio 4 got 0)."""
    import dsv4

    cfg = ModelConfig.tiny(num_nextn_predict_layers=2, compress_ratios=ratios)
    assert [cfg.mtp_ratio(i) for i in range(2)] == expected
    model = dsv4.init_model(cfg)
    assert [block.block.attn.ratio for block in model.mtp] == expected


def test_dicts_and_lists_are_normalised():
    cfg = ModelConfig.tiny(
        compress_ratios=[0, 0, 4, 128, 4, 0],
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 64},
        eos_token_id=[1, 2],
    )
    assert cfg.compress_ratios == (0, 0, 4, 128, 4, 0)
    assert cfg.rope_scaling == RopeScaling(factor=4.0, original_max_position_embeddings=64)
    assert cfg.eos_token_id == (1, 2)
    hash(cfg)


def test_errors_list_every_failing_field():
    with pytest.raises(ConfigError) as err:
        ModelConfig.tiny(o_groups=3, num_experts_per_tok=9)
    assert "o_groups" in str(err.value) and "num_experts_per_tok" in str(err.value)


# ------------------------------------------------------------------------------- RuntimeConfig


def test_runtime_config_defaults_and_dtype():
    import jax.numpy as jnp

    rt = RuntimeConfig()
    assert (rt.dtype, rt.attention_impl, rt.query_block) == ("bfloat16", "xla", 128)
    assert rt.jnp_dtype == jnp.bfloat16
    assert RuntimeConfig(dtype="float32").jnp_dtype == jnp.float32
    assert RuntimeConfig(attention_impl="pallas", query_block=64).query_block == 64


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dtype": "float16"}, "dtype"),
        ({"attention_impl": "flash"}, "attention_impl"),
        ({"query_block": 0}, "query_block"),
        ({"query_block": 12.5}, "query_block"),
        ({"remat": "no"}, "remat: must be a bool"),
        ({"train_stats": "no"}, "train_stats: must be a bool"),  # a truthy string once switched it on
    ],
)
def test_runtime_config_validation(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        RuntimeConfig(**kwargs)
