"""Model-level properties: parameter counts of the full configs, sparsity of the default path, MTP, dtypes."""

import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv4
from dsv4.config import ModelConfig, RuntimeConfig
from dsv4.model import abstract_model, init_model


def _float_counts(cfg):
    """(main-model float weights incl. gate.bias excl. tid2eid, routed-expert weights, MTP weights)."""
    _, state = nnx.split(abstract_model(cfg, RuntimeConfig(dtype="bfloat16")))
    main = experts = mtp = 0
    for path, var in nnx.to_flat_state(state):
        x = var.get_value()
        assert isinstance(x, jax.ShapeDtypeStruct), "abstract tree must not allocate"
        if not jnp.issubdtype(x.dtype, jnp.floating):
            continue
        n = int(np.prod(x.shape))
        if path[0] == "mtp":
            mtp += n
        else:
            main += n
            experts += n if path[-1] in ("w1", "w2", "w3") and "experts" in path else 0
    return main, experts, mtp


@pytest.mark.parametrize(
    "preset, main, experts",
    [("flash", 284_332_240_471, 277_025_390_592), ("pro", 1_572_997_201_763, 1_547_396_186_112)],
)
def test_full_config_parameter_counts(preset, main, experts):
    """The release's counts, as the model issue states them (284.33B Flash, 1,573.00B Pro; experts
    by hand: layers x n_routed_experts x 3 x hidden x moe_intermediate, 43 x 256 x 3 x 4096 x 2048 =
    277,025,390,592 for Flash), not numbers read off this implementation."""
    got_main, got_experts, got_mtp = _float_counts(getattr(ModelConfig, preset)())
    assert (got_main, got_experts) == (main, experts)
    # MTP: checkpoint_format.md gives 6.61B (Flash) and 25.84B (Pro).
    assert round(got_mtp / 1e9, 2) == {"flash": 6.61, "pro": 25.84}[preset]


def _intermediate_shapes(fn, *args):
    """Every array shape produced anywhere in the traced program (sub-jaxprs included)."""
    shapes = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            shapes.extend(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return shapes


def _has_quadratic(shapes, s):
    """True when some array has a query-length axis and a key axis of length S or S/4."""
    return any(s in shape and shape.count(s) + shape.count(s // 4) >= 2 for shape in shapes)


@pytest.mark.parametrize("impl, expect_quadratic", [("xla", False), ("reference", True)])
def test_default_path_builds_no_quadratic_array(impl, expect_quadratic):
    s = 1000  # 250 CSA entries, 7 HCA entries; sizes chosen to differ from every weight dimension
    cfg = ModelConfig.tiny(sliding_window=16, index_topk=8)
    model = init_model(cfg, RuntimeConfig(dtype="float32", attention_impl=impl, query_block=32))
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((1, s), jnp.int32)
    shapes = _intermediate_shapes(lambda st, t: nnx.merge(graphdef, st)(t), state, tokens)
    assert _has_quadratic(shapes, s) is expect_quadratic


def test_mtp_logits_depend_on_next_token_and_not_beyond():
    cfg = ModelConfig.tiny()
    model = init_model(cfg, RuntimeConfig(dtype="float32", query_block=16), seed=1)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 40))
    main, mtp = dsv4.forward_with_mtp(model, tokens)
    assert mtp.shape == (1, 39, cfg.vocab_size)
    np.testing.assert_allclose(main, dsv4.forward(model, tokens), rtol=1e-6, atol=1e-6)
    t = 20
    changed = tokens.copy()
    changed[0, t + 1] = (changed[0, t + 1] + 1) % cfg.vocab_size  # the token MTP at t conditions on
    _, mtp2 = dsv4.forward_with_mtp(model, changed)
    np.testing.assert_allclose(mtp2[:, :t], mtp[:, :t], rtol=1e-5, atol=1e-6)  # earlier rows unaffected
    assert not np.allclose(mtp2[:, t], mtp[:, t], atol=1e-4)


def test_mtp_weights_load_from_checkpoint(flash_ckpt):
    from dsv4.safetensors_io import CheckpointIndex

    path, _, _ = flash_ckpt
    model = dsv4.load_hf(path, dtype="float32")
    index = CheckpointIndex(path)
    np.testing.assert_array_equal(
        np.asarray(model.mtp[0].enorm.weight.get_value()), index.read("mtp.0.enorm.weight").astype(np.float32)
    )
    np.testing.assert_array_equal(
        np.asarray(model.mtp[0].block.hc_attn.fn.get_value()), index.read("mtp.0.hc_attn_fn")
    )


def test_bfloat16_load_keeps_precision_sensitive_weights_in_float32(flash_ckpt):
    path, hf_model, cfg = flash_ckpt
    model = dsv4.load_hf(path, dtype="bfloat16")
    layer = model.layers[2]
    assert layer.attn.wq_a.weight.get_value().dtype == jnp.bfloat16
    for var in (layer.hc_attn.fn, layer.hc_ffn.base, layer.attn.attn_sink, layer.attn.compressor.ape,
                layer.ffn.gate.bias, model.hc_head.fn):
        assert var.get_value().dtype == jnp.float32
    tokens = np.random.default_rng(3).integers(0, cfg["vocab_size"], (2, 200))
    low = dsv4.forward(model, tokens)
    high = dsv4.forward(dsv4.load_hf(path, dtype="float32"), tokens)
    err = float(jnp.linalg.norm(low - high) / jnp.linalg.norm(high))
    assert err < 0.05, err  # bfloat16 weights and activations: measured about 1e-2


@pytest.mark.parametrize(
    "tokens, message",
    [
        (np.array([[1, 2, 512, 3]]), "id 512 at row 0, position 2 is outside the vocabulary"),
        (np.array([[1, 2], [3, -1]]), "id -1 at row 1, position 1 is outside the vocabulary"),
        (np.array([1, 2, 3]), "non-empty [batch, length] array, got shape (3,)"),
        (np.zeros((1, 0), np.int32), "got shape (1, 0)"),
        (np.array([[1.0, 2.0]]), "integer token ids, got dtype float64"),
    ],
)
def test_host_tokens_are_checked_before_the_forward(tokens, message):
    model = init_model(ModelConfig.tiny(), RuntimeConfig(dtype="float32"))  # vocab 512
    for entry in (dsv4.forward, dsv4.forward_with_mtp, dsv4.probe):
        with pytest.raises(ValueError, match=re.escape(message)):
            entry(model, tokens)
    ok = np.array([[0, 511]])
    assert dsv4.forward(model, ok).shape == (1, 2, 512)
    assert dsv4.forward(model, [[0, 511]]).shape == (1, 2, 512)  # lists are host tokens too


def test_sequences_past_max_position_embeddings_are_refused():
    """The whole-sequence entry points refuse positions the config does not have, as generate does
    (they ran past them without a word)."""
    model = init_model(ModelConfig.tiny(max_position_embeddings=16, rope_scaling=None), RuntimeConfig(dtype="float32"))
    message = "tokens have 17 positions, past the model's max_position_embeddings 16"
    for entry in (dsv4.forward, dsv4.forward_with_mtp, dsv4.probe):
        with pytest.raises(ValueError, match=re.escape(message)):
            entry(model, np.zeros((1, 17), np.int32))
    assert dsv4.forward(model, np.zeros((1, 16), np.int32)).shape == (1, 16, 512)


@pytest.mark.parametrize(
    "tokens, message",
    [
        (jnp.array([1, 2, 3]), "non-empty [batch, length] array, got shape (3,)"),
        (jnp.zeros((1, 0), jnp.int32), "got shape (1, 0)"),  # was a ZeroDivisionError
        (jnp.array([[1.7, 2.2]]), "integer token ids, got dtype float32"),  # was silently truncated
    ],
)
def test_device_tokens_are_checked_for_shape_and_dtype(tokens, message):
    """Shape and dtype are known without waiting for the device (ids are not read: see above)."""
    model = init_model(ModelConfig.tiny(), RuntimeConfig(dtype="float32"))
    for entry in (dsv4.forward, dsv4.forward_with_mtp, dsv4.probe):
        with pytest.raises(ValueError, match=re.escape(message)):
            entry(model, tokens)
    with pytest.raises(ValueError, match=re.escape(message)):  # a tracer in a caller's jit
        jax.jit(lambda t: dsv4.forward(model, t))(tokens)


def test_wrong_types_name_the_argument():
    """A config where the model goes, swapped arguments, a dtype string for rt: each names the argument."""
    cfg, rt = ModelConfig.tiny(), RuntimeConfig(dtype="float32")
    tokens = np.array([[1, 2]])
    for entry in (dsv4.forward, dsv4.forward_with_mtp, dsv4.probe, dsv4.generate):
        with pytest.raises(TypeError, match="model must be a dsv4.DeepseekV4 .* got ModelConfig"):
            entry(cfg, tokens, *((2,) if entry is dsv4.generate else ()))
    with pytest.raises(TypeError, match="cfg must be a dsv4.ModelConfig .* got RuntimeConfig"):
        init_model(rt, cfg)
    with pytest.raises(TypeError, match="rt must be a dsv4.RuntimeConfig or None, got str"):
        init_model(cfg, "float32")
    with pytest.raises(TypeError, match="cfg must be a dsv4.ModelConfig .* got dict"):
        abstract_model({"hidden_size": 64})
    with pytest.raises(TypeError, match="seed must be an integer, got 'a'"):
        init_model(cfg, rt, seed="a")


def test_runtime_changes_go_through_with_runtime():
    """Assigning model.rt once left every layer on the old attention path while model.rt said otherwise."""
    model = init_model(ModelConfig.tiny(), RuntimeConfig(dtype="float32"), seed=0)
    with pytest.raises(AttributeError, match="dsv4.with_runtime"):
        model.rt = RuntimeConfig(dtype="float32", attention_impl="reference")
    ref = dsv4.with_runtime(model, attention_impl="reference", query_block=16)
    assert ref.rt.attention_impl == "reference" and ref.rt.query_block == 16
    assert {layer.attn.rt.attention_impl for layer in ref.layers} == {"reference"}
    assert model.rt.attention_impl == "xla"  # the source model is unchanged and shares the weights
    assert ref.embed.weight.get_value() is model.embed.weight.get_value()
    tokens = np.random.default_rng(0).integers(0, 512, (2, 70))
    got, want = np.asarray(dsv4.forward(ref, tokens)), np.asarray(dsv4.forward(model, tokens))
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()  # measured 0 here, 2.9e-7 at 300 tokens
    for change, where in (({"dtype": "bfloat16"}, "dtype=..."), ({"strategy": "tp_ep"}, "shard_model")):
        with pytest.raises(ValueError, match=f"{next(iter(change))} cannot change here .*{re.escape(where)}"):
            dsv4.with_runtime(model, **change)


def test_mtp_of_a_single_token_is_empty():
    """S = 1: no token t + 1 to condition on, so [B, 0, V] MTP logits (was a ZeroDivisionError)."""
    cfg = ModelConfig.tiny()
    model = init_model(cfg, RuntimeConfig(dtype="float32"))
    main, mtp = dsv4.forward_with_mtp(model, np.array([[5], [7]]))
    assert mtp.shape == (2, 0, cfg.vocab_size) and mtp.dtype == jnp.float32
    np.testing.assert_allclose(main, dsv4.forward(model, np.array([[5], [7]])), rtol=1e-6, atol=1e-6)


def test_a_class_patch_reaches_the_forward_after_clear_caches(monkeypatch):
    """A compiled program is reused for equal shapes and graphdefs, so a class-level patch made
    after the first call shows only after `jax.clear_caches()` (`dsv4.model._block_runner` says so)."""
    from dsv4 import attention

    model = init_model(ModelConfig.tiny(), RuntimeConfig(dtype="float32"))
    tokens = np.arange(12)[None]
    before = np.asarray(dsv4.forward(model, tokens))
    original = attention.Attention.project_out
    monkeypatch.setattr(attention.Attention, "project_out", lambda self, o: original(self, o) * 0.0)
    assert np.array_equal(np.asarray(dsv4.forward(model, tokens)), before)  # the cached program
    jax.clear_caches()
    assert not np.allclose(np.asarray(dsv4.forward(model, tokens)), before, atol=1e-3)
    monkeypatch.undo()
    jax.clear_caches()


# Layers of one kind share a trace inside a jitted program (dsv4.model._block_runner).
KINDS_CFG = ModelConfig.tiny(num_hidden_layers=7, compress_ratios=(0, 4, 128, 4, 128, 4, 128, 0), num_hash_layers=1)


def _count_block_traces(monkeypatch):
    calls = []
    inner = dsv4.model.Block.__call__

    def counted(self, *args, **kwargs):
        calls.append(id(self))
        return inner(self, *args, **kwargs)

    monkeypatch.setattr(dsv4.model.Block, "__call__", counted)
    return calls


def test_layers_of_one_kind_are_traced_once(monkeypatch):
    model = init_model(KINDS_CFG, RuntimeConfig(dtype="float32"), seed=0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, KINDS_CFG.vocab_size, (1, 40)), jnp.int32)
    calls = _count_block_traces(monkeypatch)
    eager = np.asarray(model(tokens))  # no trace: every block called as it is
    assert len(calls) == 7
    calls.clear()
    jitted = np.asarray(dsv4.forward(model, tokens))
    kinds = {(KINDS_CFG.compress_ratios[i], KINDS_CFG.is_hash_layer(i)) for i in range(7)}
    assert len(kinds) == 3  # (0, hash), (4, top-k), (128, top-k)
    assert len(calls) == len(kinds)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)  # measured: at most 1.8e-7 apart


def test_a_later_trace_sees_a_patched_component(monkeypatch):
    """The shared block trace lives for one trace only: what a notebook patches between two jitted
    calls reaches the second (here the blocks' stream collapse, shifted by 1: inside blocks only)."""
    model = init_model(KINDS_CFG, RuntimeConfig(dtype="float32"), seed=0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, KINDS_CFG.vocab_size, (1, 40)), jnp.int32)
    graphdef, state = nnx.split(model)

    def jitted_logits():  # a new function each call, so the outer jit traces anew
        return jax.jit(lambda state: nnx.merge(graphdef, state)(tokens))

    before = np.asarray(jitted_logits()(state))
    collapse = dsv4.model.collapse
    monkeypatch.setattr(dsv4.model, "collapse", lambda streams, pre: collapse(streams, pre) + 1.0)
    after = np.asarray(jitted_logits()(state))
    assert np.abs(after - before).max() > 1e-3
