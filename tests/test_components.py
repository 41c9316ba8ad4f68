"""Per-component parity with transformers' DeepSeek-V4 modules, literal expectations and named traps."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from release_fixture import hf_config
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf

from dsv4.attention import entry_visible, pool_windows, window_mask
from dsv4.config import ModelConfig
from dsv4.layers import apply_rope, rope_angles, rope_inv_freq
from dsv4.mhc import HyperConnection, HyperHead, collapse
from dsv4.moe import SharedExpert, clamped_swiglu, grouped_matmul, route
from dsv4.params import KeyChain


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def half_split_rope(x, cos, sin, inverse=False):
    """Llama's rotate_half layout: the wrong one for DeepSeek-V4 (negative control)."""
    half = cos.shape[-1]
    nope, rope = x[..., : -2 * half], x[..., -2 * half :]
    a, b = rope[..., :half], rope[..., half:]
    sin = -sin if inverse else sin
    return jnp.concatenate([nope, a * cos - b * sin, b * cos + a * sin], axis=-1)


# ---------------------------------------------------------------------------------------------- RoPE


def test_rope_tables_match_transformers_and_yarn_only_on_compressed_layers():
    cfg = ModelConfig.tiny()
    rot = hf.DeepseekV4RotaryEmbedding(hf_config(cfg.to_hf_dict()))
    np.testing.assert_allclose(rope_inv_freq(cfg, compressed=False), rot.main_inv_freq.numpy(), rtol=1e-6)
    np.testing.assert_allclose(rope_inv_freq(cfg, compressed=True), rot.compress_inv_freq.numpy(), rtol=1e-6)
    plain = 1.0 / (cfg.rope_theta ** (np.arange(0, 16, 2) / 16))
    np.testing.assert_allclose(rope_inv_freq(cfg, compressed=False), plain, rtol=1e-6)
    # YaRN divides the low frequencies by the factor: the two tables must differ.
    unscaled = 1.0 / (cfg.compress_rope_theta ** (np.arange(0, 16, 2) / 16))
    assert not np.allclose(rope_inv_freq(cfg, compressed=True), unscaled)


def test_interleaved_rope_matches_transformers_and_half_split_does_not():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 3, 32)).astype(np.float32)  # [B, S, H, K], rope on last 16
    inv = rope_inv_freq(ModelConfig.tiny(), compressed=False)
    pos = np.arange(7)[None].repeat(2, 0)
    cos, sin = rope_angles(jnp.asarray(pos), inv)
    ours = apply_rope(jnp.asarray(x), cos[:, :, None], sin[:, :, None])
    tcos, tsin = torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin))
    ref = hf.apply_rotary_pos_emb(torch.tensor(x), tcos, tsin, unsqueeze_dim=2).numpy()
    assert rel_err(ours, ref) < 1e-6
    assert rel_err(half_split_rope(jnp.asarray(x), cos[:, :, None], sin[:, :, None]), ref) > 1e-2
    back = apply_rope(ours, cos[:, :, None], sin[:, :, None], inverse=True)
    np.testing.assert_allclose(back, x, atol=1e-5)


# ----------------------------------------------------------------------------------------------- mHC


def _mhc_pair(ours_cls, ref_cls, ref_names, hc_eps, rms_eps, seed, **changes):
    """Our mHC module and transformers' with the same random fn / base / scale (ref_names in order)."""
    cfg = ModelConfig.tiny(hc_eps=hc_eps, rms_norm_eps=rms_eps, **changes)
    ours, ref = ours_cls(cfg, KeyChain(seed)), ref_cls(hf_config(cfg.to_hf_dict()))
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for var, std, name in zip((ours.fn, ours.base, ours.scale), (0.5, 1.0, 1.0), ref_names, strict=True):
            var.set_value(jnp.asarray(rng.standard_normal(var.get_value().shape) * std, jnp.float32))
            getattr(ref, name).copy_(torch.tensor(np.asarray(var.get_value())))
    return cfg, ours, ref


def _hc_pair(hc_eps, rms_eps, seed=0, **changes):
    return _mhc_pair(
        HyperConnection, hf.DeepseekV4HyperConnection, ("fn", "base", "scale"), hc_eps, rms_eps, seed, **changes
    )


@pytest.mark.parametrize("iters", [1, 2, 3])
def test_sinkhorn_iterations_match_transformers_before_convergence(iters):
    """comb after 1-3 Sinkhorn iterations, far from converged, so that one pass more or fewer shows
    (at the release's 20 it moves comb by < 1e-4, inside the tolerances of the tests above)."""
    cfg, ours, ref = _hc_pair(hc_eps=0.05, rms_eps=1e-6, hc_sinkhorn_iters=iters)
    x = np.random.default_rng(4).standard_normal((2, 5, cfg.hc_mult, cfg.hidden_size)).astype(np.float32)
    want = ref(torch.tensor(x))[1].detach().numpy()
    assert rel_err(ours.weights(jnp.asarray(x))[2], want) < 1e-5
    _, one_more, _ = _hc_pair(hc_eps=0.05, rms_eps=1e-6, hc_sinkhorn_iters=iters + 1)
    assert rel_err(one_more.weights(jnp.asarray(x))[2], want) > 1e-3


def test_mhc_matches_transformers_with_distinct_epsilons():
    cfg, ours, ref = _hc_pair(hc_eps=0.05, rms_eps=1e-6)
    x = np.random.default_rng(1).standard_normal((2, 5, cfg.hc_mult, cfg.hidden_size)).astype(np.float32)
    pre, post, comb = ours.weights(jnp.asarray(x))
    rpost, rcomb, rcollapsed = ref(torch.tensor(x))
    assert rel_err(post, rpost.detach().numpy()) < 1e-5
    assert rel_err(comb, rcomb.detach().numpy()) < 1e-5
    assert rel_err(collapse(jnp.asarray(x), pre), rcollapsed.detach().numpy()) < 1e-5
    # Trap: hc_eps and rms_norm_eps are separate. Using rms_norm_eps for hc_eps must change comb.
    _, swapped, _ = _hc_pair(hc_eps=1e-6, rms_eps=1e-6)
    assert rel_err(swapped.weights(jnp.asarray(x))[2], rcomb.detach().numpy()) > 1e-3


def _head_pair(hc_eps, rms_eps, seed=0):
    return _mhc_pair(HyperHead, hf.DeepseekV4HyperHead, ("hc_fn", "hc_base", "hc_scale"), hc_eps, rms_eps, seed)


def test_hc_head_matches_transformers_with_distinct_epsilons():
    """The final collapse (`hc_head`) also keeps hc_eps (added to pre) apart from rms_norm_eps (its
    input norm): with either swapped for the other, the output moves."""
    cfg, ours, ref = _head_pair(hc_eps=0.05, rms_eps=1e-6)
    x = np.random.default_rng(7).standard_normal((2, 5, cfg.hc_mult, cfg.hidden_size)).astype(np.float32)
    want = ref(torch.tensor(x)).detach().numpy()
    assert rel_err(ours(jnp.asarray(x)), want) < 1e-6
    for hc_eps, rms_eps in ((1e-6, 1e-6), (0.05, 0.05)):
        assert rel_err(_head_pair(hc_eps, rms_eps)[1](jnp.asarray(x)), want) > 1e-3, (hc_eps, rms_eps)


def test_mhc_comb_is_applied_transposed():
    cfg, ours, ref = _hc_pair(hc_eps=1e-6, rms_eps=1e-6, seed=3)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 4, cfg.hc_mult, cfg.hidden_size)).astype(np.float32)
    out = rng.standard_normal((1, 4, cfg.hidden_size)).astype(np.float32)
    _, post, comb = ours.weights(jnp.asarray(x))
    new = HyperConnection.expand(jnp.asarray(out), jnp.asarray(x), post, comb)
    c, p = np.asarray(comb), np.asarray(post)
    expected = p[..., None] * out[:, :, None, :] + np.einsum("bsjk,bsjd->bskd", c, x)
    wrong = p[..., None] * out[:, :, None, :] + np.einsum("bskj,bsjd->bskd", c, x)
    assert rel_err(new, expected) < 1e-6
    assert not np.allclose(c, np.swapaxes(c, -1, -2), atol=1e-3), "comb must not be symmetric for this test"
    assert rel_err(wrong, expected) > 1e-3


def test_mhc_runs_in_float32_for_bfloat16_streams():
    """bfloat16 streams: the mixing weights are computed in float32 from the streams' values, and
    expand and collapse mix in float32 with those weights, rounding only their results."""
    cfg, ours, _ = _hc_pair(hc_eps=1e-6, rms_eps=1e-6, seed=4)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 3, cfg.hc_mult, cfg.hidden_size)).astype(np.float32)
    xb, out = jnp.asarray(x, jnp.bfloat16), jnp.asarray(rng.standard_normal((1, 3, cfg.hidden_size)), jnp.bfloat16)
    pre, post, comb = ours.weights(xb)
    assert pre.dtype == post.dtype == comb.dtype == jnp.float32
    for got, want in zip((pre, post, comb), ours.weights(xb.astype(jnp.float32)), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert ours.fn.get_value().dtype == jnp.float32

    x32, out32 = np.asarray(xb, np.float32), np.asarray(out, np.float32)

    def mismatches(got, want32):  # share of elements that differ from the float32 result rounded once
        return np.mean(np.asarray(got, np.float32) != np.asarray(jnp.asarray(want32).astype(jnp.bfloat16), np.float32))

    def expand_want(p, c):
        return np.asarray(p)[..., None] * out32[:, :, None, :] + np.einsum("bsjk,bsjd->bskd", np.asarray(c), x32)

    def in_bf16(w):  # the weights rounded to the streams' dtype: what a bfloat16 mix would use
        return w.astype(jnp.bfloat16).astype(jnp.float32)

    new = HyperConnection.expand(out, xb, post, comb)
    assert new.dtype == jnp.bfloat16
    collapsed = collapse(xb, pre)
    assert collapsed.dtype == jnp.bfloat16
    # measured: 0 of 1,536 / 384 elements differ; with bfloat16 weights 26% / 28% do
    assert mismatches(new, expand_want(post, comb)) <= 0.02
    assert mismatches(collapsed, np.einsum("bsn,bsnd->bsd", np.asarray(pre), x32)) <= 0.02
    assert mismatches(HyperConnection.expand(out, xb, in_bf16(post), in_bf16(comb)), expand_want(post, comb)) > 0.1
    assert mismatches(collapse(xb, in_bf16(pre)), np.einsum("bsn,bsnd->bsd", np.asarray(pre), x32)) > 0.1


# ------------------------------------------------------------------------------------------------ MoE


def test_router_bias_selects_but_does_not_weight():
    logits = jnp.asarray([[0.0, 1.0, 2.0, 3.0]])
    bias = jnp.asarray([10.0, 0.0, 0.0, 0.0])
    weights, idx = route(logits, 2, 1.5, bias=bias)
    assert sorted(np.asarray(idx)[0].tolist()) == [0, 3]
    s = np.sqrt(np.log1p(np.exp(np.asarray([0.0, 3.0]))))
    got = dict(zip(np.asarray(idx)[0].tolist(), np.asarray(weights)[0].tolist(), strict=True))
    np.testing.assert_allclose([got[0], got[3]], s / s.sum() * 1.5, rtol=1e-6)


def test_shared_expert_clamps_like_transformers():
    cfg = ModelConfig.tiny()
    ours = SharedExpert(cfg, jnp.float32, KeyChain(0))
    rng = np.random.default_rng(0)
    ref = hf.DeepseekV4MLP(hf_config(cfg.to_hf_dict()))
    with torch.no_grad():
        for name, lin in (("w1", ref.gate_proj), ("w3", ref.up_proj), ("w2", ref.down_proj)):
            w = rng.standard_normal(lin.weight.shape).astype(np.float32) * 0.5
            lin.weight.copy_(torch.tensor(w))
            getattr(ours, name).weight.set_value(jnp.asarray(w.T))
    x = rng.standard_normal((9, cfg.hidden_size)).astype(np.float32) * 3  # pre-activations beyond +-10
    with torch.no_grad():
        gate, up = (proj(torch.tensor(x)).numpy() for proj in (ref.gate_proj, ref.up_proj))
    # the gate is clamped from above only, the up projection on both sides: each must bind
    assert gate.max() > cfg.swiglu_limit and np.abs(up).max() > cfg.swiglu_limit, "inputs must exercise the clamps"
    expected = ref(torch.tensor(x)).detach().numpy()
    assert rel_err(ours(jnp.asarray(x)), expected) < 1e-5
    w1, w2, w3 = (np.asarray(getattr(ours, n).weight.get_value()) for n in ("w1", "w2", "w3"))
    unclamped = jax.nn.silu(x @ w1) * (x @ w3)
    assert rel_err(unclamped @ w2, expected) > 1e-2


def test_routed_experts_clamp_like_transformers():
    """The routed experts clamp as transformers' DeepseekV4Experts does, at pre-activations beyond
    the limit (the parity checkpoints never reach it: their largest is ~4 against 10)."""
    from dsv4.moe import Experts

    cfg = ModelConfig.tiny()
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    rng = np.random.default_rng(0)
    w1, w3 = rng.standard_normal((2, e, d, f)).astype(np.float32) * 0.5
    w2 = rng.standard_normal((e, f, d)).astype(np.float32) * 0.5

    def experts(limit):
        module = Experts(dataclasses.replace(cfg, swiglu_limit=limit), jnp.float32, KeyChain(0))
        for var, w in ((module.w1, w1), (module.w3, w3), (module.w2, w2)):
            var.set_value(jnp.asarray(w))
        return module

    ref = hf.DeepseekV4Experts(hf_config(cfg.to_hf_dict()))
    with torch.no_grad():
        ref.gate_up_proj.copy_(torch.tensor(np.concatenate([w1, w3], -1).transpose(0, 2, 1)))  # [E, 2F, D]
        ref.down_proj.copy_(torch.tensor(w2.transpose(0, 2, 1)))  # [E, D, F]
    x = (rng.standard_normal((9, d)) * 3).astype(np.float32)
    gate, up = np.einsum("nd,edf->nef", x, w1), np.einsum("nd,edf->nef", x, w3)
    assert gate.max() > cfg.swiglu_limit and np.abs(up).max() > cfg.swiglu_limit, "inputs must exercise the clamps"
    idx = np.stack([rng.permutation(e)[:2] for _ in range(9)])
    wts = rng.random((9, 2)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.tensor(x), torch.tensor(idx), torch.tensor(wts)).numpy()
    args = jnp.asarray(x), jnp.asarray(wts), jnp.asarray(idx, jnp.int32)
    assert rel_err(experts(cfg.swiglu_limit)(*args), want) < 1e-5
    assert rel_err(experts(1e9)(*args), want) > 1e-2  # unclamped


def test_indexer_head_weights_are_scaled_by_both_dims():
    """I(t, s) weights = weights_proj(x) / sqrt(index_head_dim * index_n_heads): a common factor the
    top-k cannot see, but the indexer's KL loss can."""
    from dsv4.attention import Indexer

    cfg = ModelConfig.tiny()
    ix = Indexer(cfg, 4, jnp.float32, KeyChain(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 3, cfg.hidden_size)), jnp.float32)
    qr = jnp.asarray(rng.standard_normal((1, 3, cfg.q_lora_rank)), jnp.float32)
    _, w = ix.queries(x, qr, jnp.arange(3)[None])
    want = np.asarray(x) @ np.asarray(ix.weights_proj.weight.get_value())
    np.testing.assert_allclose(w, want * (cfg.index_head_dim * cfg.index_n_heads) ** -0.5, rtol=1e-5)


def test_indexer_kl_literal():
    """KL(mean over heads of the main softmax || softmax of the indexer scores) over each query's
    visible entries, in numpy; 0 (and sees = 0) where a query sees none."""
    from dsv4.attention import indexer_kl

    rng = np.random.default_rng(0)
    s, h, k, t, i, j, ratio = 12, 3, 8, 3, 2, 4, 4
    q, e = rng.standard_normal((1, s, h, k)), rng.standard_normal((1, t, k))
    iq, keys, iw = rng.standard_normal((1, s, i, j)), rng.standard_normal((1, t, j)), rng.standard_normal((1, s, i))
    args = [jnp.asarray(a, jnp.float32) for a in (q, e, iq, keys, iw)]
    kl, sees = indexer_kl(*args, jnp.arange(s)[None], ratio, 4)

    def softmax(z):
        z = np.exp(z - z.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)

    for pos in range(s):
        n = (pos + 1) // ratio
        if n == 0:
            assert kl[0, pos] == 0 and sees[0, pos] == 0
            continue
        target = softmax(q[0, pos] @ e[0, :n].T / np.sqrt(k)).mean(0)  # [n]
        scores = iw[0, pos] @ np.maximum(iq[0, pos] @ keys[0, :n].T, 0)  # [n]
        want = np.sum(target * (np.log(target) - np.log(softmax(scores))))
        assert sees[0, pos] == 1
        np.testing.assert_allclose(kl[0, pos], want, rtol=1e-5, atol=1e-7)  # measured: 1.5e-6 at most


def test_clamped_swiglu_literal():
    out = clamped_swiglu(jnp.asarray([20.0, -3.0]), jnp.asarray([-50.0, 4.0]), 10.0)
    np.testing.assert_allclose(out, [jax.nn.silu(10.0) * -10.0, jax.nn.silu(-3.0) * 4.0], rtol=1e-6)


# ------------------------------------------------------------------------- windows and visibility


def test_entry_visibility_literal():
    # ratio 4: entry w is usable once its window closes, i.e. at position 4w + 3.
    vis = np.asarray(entry_visible(jnp.arange(10), 3, 4)).astype(int)
    expected = [[0, 0, 0]] * 3 + [[1, 0, 0]] * 4 + [[1, 1, 0]] * 3
    np.testing.assert_array_equal(vis, expected)


def test_sliding_window_mask_literal():
    mask = np.asarray(window_mask(jnp.arange(5), jnp.arange(5), 3)).astype(int)
    expected = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    np.testing.assert_array_equal(mask, expected)


def test_hca_pooling_windows_literal():
    # 2 windows of 2 tokens, 1 channel, equal gates: each entry is the mean of its own window.
    c = jnp.asarray([1.0, 3.0, 10.0, 30.0]).reshape(1, 2, 2, 1)
    out = pool_windows(c, jnp.zeros_like(c), overlap=False)
    np.testing.assert_allclose(np.asarray(out).ravel(), [2.0, 20.0])


def test_csa_pooling_first_window_and_overlap_literal():
    # Channels: series A = [:1], series B = [1:]. Token values: A = 100 + t, B = t.
    t = np.arange(6, dtype=np.float32)
    c = jnp.asarray(np.stack([100 + t, t], -1).reshape(1, 3, 2, 2))  # 3 windows of m = 2
    out = np.asarray(pool_windows(c, jnp.zeros_like(c), overlap=True)).ravel()
    # Entry 0: only window 0's B slots (no previous window) -> mean(0, 1).
    # Entry w > 0: window w-1's A slots and window w's B slots -> mean of 4 values.
    np.testing.assert_allclose(out, [0.5, (100 + 101 + 2 + 3) / 4, (102 + 103 + 4 + 5) / 4])


@pytest.mark.parametrize("sizes", [[0, 20, 0, 17, 0], [1, 0, 0, 0, 0], [70, 3, 0, 129, 1], [3, 0, 5, 1, 7]])
def test_tiled_grouped_matmul_equals_ragged_dot(sizes):
    rng = np.random.default_rng(len(sizes) + sum(sizes))
    gs = np.asarray(sizes, np.int32)
    x = jnp.asarray(rng.standard_normal((int(gs.sum()), 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((len(sizes), 16, 24)), jnp.float32)
    ragged = grouped_matmul(x, w, gs, "ragged_dot")
    tiled = grouped_matmul(x, w, gs, "tiled")
    np.testing.assert_allclose(tiled, ragged, rtol=1e-5, atol=1e-5)
    row, g = len(x) - 1, int(np.flatnonzero(gs)[-1])  # the last row belongs to the last non-empty group
    np.testing.assert_allclose(tiled[row], np.asarray(x[row]) @ np.asarray(w[g]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes", [[70, 3, 0, 129, 1], list(np.random.default_rng(5).integers(0, 9, 40))])
def test_tiled_grouped_matmul_gradients_equal_ragged_dot(sizes):
    # The tiled form's backward is written by hand (custom_vjp); the second case has 40 groups of
    # 0-8 rows: 8-row tiles, more tiles than one loop step holds.
    rng = np.random.default_rng(sum(sizes))
    gs = np.asarray(sizes, np.int32)
    x = jnp.asarray(rng.standard_normal((int(gs.sum()), 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((len(sizes), 16, 24)), jnp.float32)
    probe = jnp.asarray(rng.standard_normal((int(gs.sum()), 24)), jnp.float32)

    def loss(x, w, impl):
        return jnp.sum(jnp.tanh(grouped_matmul(x, w, gs, impl)) * probe)

    want = jax.grad(loss, argnums=(0, 1))(x, w, "ragged_dot")
    got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, w, "tiled")
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(got[1][np.flatnonzero(gs == 0)])).max(initial=0.0) == 0.0  # empty groups


@pytest.mark.parametrize("impl", ["tiled", "fused"])
def test_rows_past_the_last_group_are_zero_as_in_ragged_dot(impl):
    """sum(group_sizes) < M (the expert-parallel exchange passes such sizes): ragged_dot leaves the
    trailing rows zero and gives them no gradient; the tiled forms had multiplied them by the last
    expert (its weight gradient 72% off). A numpy cotangent is taken too (eager jax.vjp)."""
    from dsv4 import moe

    rng = np.random.default_rng(7)
    gs = np.asarray([3, 0, 2], np.int32)
    x = jnp.asarray(rng.standard_normal((9, 8)), jnp.float32)  # rows 5..8 belong to no group
    w1, w3 = (jnp.asarray(rng.standard_normal((3, 8, 6)), jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((3, 6, 8)), jnp.float32)
    if impl == "tiled":
        args, fn = (x, w1), lambda x, w: grouped_matmul(x, w, gs, "tiled")
        ref = lambda x, w: grouped_matmul(x, w, gs, "ragged_dot")  # noqa: E731
    else:
        args = (x, w1, w3, w2)
        fn = functools.partial(moe.expert_ffn, group_sizes=gs, limit=10.0, impl="tiled")
        ref = functools.partial(moe._expert_ffn_by_products, group_sizes=gs, limit=10.0, impl="ragged_dot")
    out, vjp = jax.vjp(fn, *args)
    want, want_vjp = jax.vjp(ref, *args)
    assert np.abs(np.asarray(out[5:])).max() == 0.0
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    cotangent = rng.standard_normal(out.shape).astype(np.float32)
    for g, r in zip(vjp(cotangent), want_vjp(jnp.asarray(cotangent)), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes", [[70, 3, 0, 129, 1], list(np.random.default_rng(6).integers(0, 9, 40))])
def test_fused_expert_ffn_equals_three_products(sizes):
    """The experts' one-loop form (gate, up, SwiGLU, down per tile) gives what the three grouped
    products give, and so do its gradients; the limit is small so that the clamps bind."""
    from dsv4 import moe

    rng = np.random.default_rng(len(sizes))
    gs = np.asarray(sizes, np.int32)
    m, e = int(gs.sum()), len(sizes)
    x = jnp.asarray(rng.standard_normal((m, 16)), jnp.float32)
    w1, w3 = (jnp.asarray(rng.standard_normal((e, 16, 24)), jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((e, 24, 16)), jnp.float32)
    limit = 1.5
    assert float(jnp.max(jnp.abs(jnp.einsum("md,edf->emf", x, w3)))) > limit  # the clamp binds somewhere
    probe = jnp.asarray(rng.standard_normal((m, 16)), jnp.float32)

    def loss(fn):
        return lambda *a: jnp.sum(jnp.tanh(fn(*a)) * probe)

    fused = functools.partial(moe.expert_ffn, group_sizes=gs, limit=limit, impl="tiled")
    products = functools.partial(moe._expert_ffn_by_products, group_sizes=gs, limit=limit, impl="ragged_dot")
    np.testing.assert_allclose(fused(x, w1, w3, w2), products(x, w1, w3, w2), rtol=1e-6, atol=1e-5)
    got = jax.grad(loss(fused), argnums=(0, 1, 2, 3))(x, w1, w3, w2)
    want = jax.grad(loss(products), argnums=(0, 1, 2, 3))(x, w1, w3, w2)
    for g, r in zip(got, want, strict=True):
        # The two forms add the same float32 terms in different orders, and the order XLA:CPU picks
        # depends on the processor: measured at most 1e-7 of the gradient's largest entry (6-40) on
        # one machine and 1.0e-6 on an AVX-512 one, so the bound is 4e-6 of it (~34 ulps). Without
        # the clamps (limit 100) the gradients are off by 2-20 times their largest entry.
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=4e-6 * float(np.max(np.abs(r))))


@pytest.mark.parametrize("t, n", [(24, 16), (24, 8)])
def test_csa_selection_forms_agree(monkeypatch, t, n):
    """A CSA block reads its top-k entries as a masked product over all T entries when T <= 2N, else
    by gathering them: both forms, values and gradients, on indexer-like selections with -1 slots."""
    import dsv4.attention as attention

    rng = np.random.default_rng(t + n)
    b, s, h, k, window, ratio = 2, 40, 3, 8, 6, 4
    start = np.array([0, 57], np.int32)
    pos = start[:, None] + np.arange(s)
    visible = np.minimum((pos + 1) // ratio, t)[..., None]
    order = np.argsort(rng.random((b, s, t)), axis=-1)[..., :n]
    idx = jnp.asarray(np.where(order < visible, order, -1), jnp.int32)  # some slots empty (-1)
    q, kv, prev, entries = (
        jnp.asarray(rng.standard_normal(shape), jnp.float32)
        for shape in [(b, s, h, k), (b, s, k), (b, window - 1, k), (b, t, k)]
    )
    sink = jnp.asarray(rng.standard_normal(h), jnp.float32)

    def loss(q, kv, entries):
        out = attention.sparse_attention(q, kv, prev, jnp.asarray(start), sink, window, entries, idx, ratio, block=16)
        return jnp.sum(jnp.sin(out)), out

    results = {}
    for form, factor in (("gather", 0), ("dense", 1_000)):
        monkeypatch.setattr(attention, "DENSE_SELECTION", factor)
        results[form] = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, kv, entries)
    (_, out_g), grads_g = results["gather"]
    (_, out_d), grads_d = results["dense"]
    np.testing.assert_allclose(out_d, out_g, rtol=1e-5, atol=1e-6)
    for gd, gg in zip(grads_d, grads_g, strict=True):  # measured: at most 1.4e-6 apart
        np.testing.assert_allclose(gd, gg, rtol=1e-5, atol=4e-6)
    mask = np.asarray(attention.selection_mask(idx, t))
    assert mask.sum() == int((idx >= 0).sum()) and mask.sum() < idx.size  # one True per valid slot


def test_tile_rows_keep_padding_proportional_to_rows():
    from dsv4.moe import TILE, tile_rows

    assert tile_rows(2, 8) == 1  # a decode step: top-2 of one token
    assert tile_rows(16, 8) == 2  # batch 8
    assert tile_rows(16, 5) == 4  # 4 rows per expert on average
    assert tile_rows(8192, 8) == TILE  # a prefill


@pytest.mark.parametrize("span", [512, 1024, 4096], ids=["merge_each_chunk", "merge_two_chunks", "merge_once"])
@pytest.mark.parametrize("block", [32, 4], ids=["prefill_block", "few_queries"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "many_ties"])
def test_chunked_indexer_topk_equals_scoring_every_entry(monkeypatch, ties, block, span):
    """Causal key chunks with a running top-k give the indices (and order) of one top-k over all entries,
    however many chunks are scored between two merges (MERGE_SPAN)."""
    from dsv4 import attention

    rng = np.random.default_rng(0)
    b, s, heads, dim, ratio, k = 2, 96, 2, 16, 4, 40
    t = 1300  # three chunks of 512, the last partial
    q = rng.standard_normal((b, s, heads, dim)).astype(np.float32)
    keys = rng.standard_normal((b, t, dim)).astype(np.float32)
    if ties:  # integer-valued inputs with one mostly-negative head: many exactly equal (often zero) scores
        q, keys = np.round(q), np.round(keys)
        q[..., 0, :] = -np.abs(q[..., 0, :])
    weights = rng.standard_normal((b, s, heads)).astype(np.float32)
    positions = np.stack([np.arange(s) * 55 + 3, np.arange(s) * 54]).astype(np.int32)  # up to ~5,230 / 4 entries
    args = [jnp.asarray(a) for a in (q, keys, weights, positions)]

    monkeypatch.setattr(attention, "KEY_CHUNK", 512)
    monkeypatch.setattr(attention, "FEW_QUERY_DOTS", 512 * 4 * heads)  # so that few-query blocks chunk too
    monkeypatch.setattr(attention, "MERGE_SPAN", span)  # 1024: two merges, the second of one chunk
    assert attention.key_chunk(block, heads) == 512
    chunked = np.asarray(attention.indexer_topk(*args, ratio, k, block))
    monkeypatch.setattr(attention, "KEY_CHUNK", 10**6)
    monkeypatch.setattr(attention, "FEW_QUERY_DOTS", 10**9)
    whole = np.asarray(attention.indexer_topk(*args, ratio, k, block))
    assert np.array_equal(chunked, whole)
    visible = (positions + 1) // ratio
    assert np.all((chunked < visible[..., None]) & (chunked >= -1))
    assert np.all((chunked == -1).sum(-1) == np.maximum(k - visible, 0))  # -1 only where fewer than k exist


@pytest.mark.parametrize("t", [40, 700], ids=["one_chunk", "chunked"])
def test_blocks_that_see_at_most_k_entries_select_them_all(t):
    """A query block none of whose queries sees more than k entries takes every visible entry without
    scoring; the result is what scoring every entry gives (blocks of 16 at ratio 4 and k = 8: the first
    two blocks see at most 8 entries, the rest more)."""
    from dsv4 import attention
    from pallas_kernels import indexer_topk_reference

    rng = np.random.default_rng(3)
    b, s, heads, dim, ratio, k, block = 2, 80, 2, 16, 4, 8, 16
    q = jnp.asarray(rng.standard_normal((b, s, heads, dim)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((b, t, dim)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((b, s, heads)), jnp.float32)
    first = np.arange(2 * block)  # two blocks that see at most 8 entries, then blocks of ~500-620 entries
    row = np.concatenate([first, 2_000 + 10 * np.arange(s - 2 * block)])
    positions = jnp.asarray(np.stack([row, row + 1]), jnp.int32)
    got = np.asarray(attention.indexer_topk(q, keys, weights, positions, ratio, k, block))
    want = np.asarray(attention.ascending_valid_first(indexer_topk_reference(q, keys, weights, positions, ratio, k)))
    assert np.array_equal(got, want)
    visible = (np.asarray(positions) + 1) // ratio
    assert np.array_equal(got[:, : 2 * block], np.where(np.arange(k) < visible[:, : 2 * block, None], np.arange(k), -1))
    assert visible[:, : 2 * block].max() <= k < visible[:, 2 * block :].min()  # both kinds of block occur
