"""dsv4.probe: what a forward computes on the way, checked against transformers' own intermediates.

The oracle's modules return the same quantities (routers: weights and expert ids; hyper-connections:
post and comb; compressors: the compressed KV; the indexer: its top-k entries, -1 where invalid);
forward hooks collect them from one float32 run on the tiny Flash-like checkpoint (300 tokens, so
the indexer really selects: 75 entries, index_topk 16).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dsv4
from dsv4.probes import Probe

SEQ = 300
TOL = 1e-5  # relative error of float values (measured: at most 4.8e-7 here)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def hf_intermediates(hf_model, tokens) -> dict:
    """{dsv4 probe prefix: output of the matching transformers module} for one forward."""
    got, hooks = {}, []

    def keep(name, module):
        hooks.append(module.register_forward_hook(lambda _m, _args, out: got.__setitem__(name, out)))

    def keep_input(name, module):  # a hyper-connection's input streams [B, S, N, D]
        hooks.append(module.register_forward_hook(lambda _m, args, _out: got.__setitem__(name, args[0])))

    for i, layer in enumerate(hf_model.model.layers):
        keep(f"layers.{i}.ffn", layer.mlp.gate)
        for hc, module in (("hc_attn", layer.attn_hc), ("hc_ffn", layer.ffn_hc)):
            keep(f"layers.{i}.{hc}", module)
            keep_input(f"layers.{i}.{hc}.streams", module)
        comp = layer.self_attn.compressor
        if comp is not None:
            keep(f"layers.{i}.attn", comp)
            if getattr(comp, "indexer", None) is not None:
                keep(f"layers.{i}.attn.indexer", comp.indexer)
    try:
        with torch.no_grad():
            logits = hf_model(torch.tensor(tokens), use_cache=False).logits.numpy()
    finally:
        for h in hooks:
            h.remove()
    return {"logits": logits, **got}


@pytest.fixture(scope="module")
def probed(flash_ckpt):
    path, hf_model, cfg = flash_ckpt
    tokens = np.random.default_rng(7).integers(0, cfg["vocab_size"], (2, SEQ))
    model = dsv4.load_hf(path, dtype="float32", query_block=64)
    logits, seen = dsv4.probe(model, tokens)
    return model, tokens, np.asarray(logits), {k: np.asarray(v) for k, v in seen.items()}, hf_intermediates(
        hf_model, tokens
    )


def by_expert(ids, weights):
    """Sort each token's K choices by expert id (transformers' router returns them unsorted)."""
    order = np.argsort(ids, axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1)


def test_probe_logits_are_the_forward_logits(probed):
    model, tokens, logits, _, hf = probed
    np.testing.assert_array_equal(logits, np.asarray(dsv4.forward(model, tokens)))
    assert rel_err(logits, hf["logits"]) <= TOL


def test_every_layer_reports_what_its_kind_computes(probed):
    model, tokens, _, seen, _ = probed
    cfg = model.cfg
    b, s = tokens.shape
    for i in range(cfg.num_hidden_layers):
        ratio = cfg.compress_ratios[i]
        has_topk, has_kv = f"layers.{i}.attn.topk" in seen, f"layers.{i}.attn.compressed_kv" in seen
        assert (has_topk, has_kv) == (ratio == 4, ratio > 0), (i, ratio)
        if ratio:
            assert seen[f"layers.{i}.attn.compressed_kv"].shape == (b, s // ratio, cfg.head_dim)
        if ratio == 4:
            assert seen[f"layers.{i}.attn.topk"].shape == (b, s, min(cfg.index_topk, s // 4))
        assert seen[f"layers.{i}.ffn.expert_ids"].shape == (b, s, cfg.num_experts_per_tok)
        for hc in ("hc_attn", "hc_ffn"):
            assert seen[f"layers.{i}.{hc}.comb"].shape == (b, s, cfg.hc_mult, cfg.hc_mult)
            assert seen[f"layers.{i}.{hc}.pre"].shape == seen[f"layers.{i}.{hc}.post"].shape == (b, s, cfg.hc_mult)
    assert seen["hc_head.pre"].shape == (b, s, cfg.hc_mult)
    assert not any(k.startswith("mtp") for k in seen)  # the forward does not run the MTP block


def test_indexer_selections_equal_transformers(probed):
    model, _, _, seen, hf = probed
    csa = [i for i, r in enumerate(model.cfg.compress_ratios[:-1]) if r == 4]
    assert csa
    for i in csa:
        ours = np.sort(seen[f"layers.{i}.attn.topk"], axis=-1)
        theirs = np.sort(hf[f"layers.{i}.attn.indexer"].numpy(), axis=-1)
        assert (ours >= 0).any() and (ours < 0).any()  # selections and invalid slots both occur
        np.testing.assert_array_equal(ours, theirs, err_msg=f"layer {i}")


def test_compressed_kv_equals_transformers(probed):
    model, _, _, seen, hf = probed
    for i, ratio in enumerate(model.cfg.compress_ratios[:-1]):
        if ratio:
            theirs = hf[f"layers.{i}.attn"][0][:, 0].numpy()  # [B, 1, T, D] -> [B, T, D]
            assert rel_err(seen[f"layers.{i}.attn.compressed_kv"], theirs) <= TOL, i


def test_routing_equals_transformers(probed):
    model, _, _, seen, hf = probed
    b, s = seen["layers.0.ffn.expert_ids"].shape[:2]
    kinds = set()
    for i in range(model.cfg.num_hidden_layers):
        kinds.add(model.cfg.is_hash_layer(i))
        _, weights, ids = hf[f"layers.{i}.ffn"]
        want_ids, want_w = by_expert(ids.numpy().reshape(b, s, -1), weights.numpy().reshape(b, s, -1))
        got_ids, got_w = by_expert(seen[f"layers.{i}.ffn.expert_ids"], seen[f"layers.{i}.ffn.expert_weights"])
        np.testing.assert_array_equal(got_ids, want_ids, err_msg=f"layer {i}")
        assert rel_err(got_w, want_w) <= TOL, i
    assert kinds == {True, False}  # hash and top-k layers both checked


def test_mhc_mixing_equals_transformers(probed):
    model, _, _, seen, hf = probed
    for i in range(model.cfg.num_hidden_layers):
        for hc in ("hc_attn", "hc_ffn"):
            post, comb, _ = hf[f"layers.{i}.{hc}"]
            assert rel_err(seen[f"layers.{i}.{hc}.post"], post.numpy()) <= TOL
            assert rel_err(seen[f"layers.{i}.{hc}.comb"], comb.numpy()) <= TOL  # same orientation: [j, k]


def test_mhc_pre_collapses_the_streams_as_transformers(probed):
    """transformers consumes `pre` inside its module and returns the collapsed input; our `pre` applied
    to its input streams must give that collapse. The other hyper-connection's `pre` must not."""
    model, _, _, seen, hf = probed
    for i in range(model.cfg.num_hidden_layers):
        for hc, other in (("hc_attn", "hc_ffn"), ("hc_ffn", "hc_attn")):
            streams, want = hf[f"layers.{i}.{hc}.streams"].numpy(), hf[f"layers.{i}.{hc}"][2].numpy()  # [B, S, N, D]
            collapsed = np.einsum("bsn,bsnd->bsd", seen[f"layers.{i}.{hc}.pre"], streams)
            assert rel_err(collapsed, want) <= TOL, (i, hc)
            wrong = np.einsum("bsn,bsnd->bsd", seen[f"layers.{i}.{other}.pre"], streams)
            assert rel_err(wrong, want) > 1e-3, (i, hc)  # the check can fail (measured: >= 0.25; ours <= 1.2e-7)


def test_negative_control_transposed_comb_differs(probed):
    _, _, _, seen, hf = probed
    comb = seen["layers.0.hc_attn.comb"]
    assert rel_err(np.swapaxes(comb, -1, -2), hf["layers.0.hc_attn"][1].numpy()) > 1e-2


def test_probes_follow_a_changed_router(flash_ckpt):
    """Probes report the live computation: biasing a top-k router toward expert 3 shows in its ids."""
    path, _, cfg = flash_ckpt
    model = dsv4.load_hf(path, dtype="float32")
    layer = next(i for i in range(model.cfg.num_hidden_layers) if not model.cfg.is_hash_layer(i))
    tokens = np.random.default_rng(1).integers(0, cfg["vocab_size"], (1, 40))
    before = np.asarray(dsv4.probe(model, tokens)[1][f"layers.{layer}.ffn.expert_ids"])
    gate = model.layers[layer].ffn.gate
    gate.bias.set_value(gate.bias.get_value().at[3].set(1e3))
    after = np.asarray(dsv4.probe(model, tokens)[1][f"layers.{layer}.ffn.expert_ids"])
    assert not (before == 3).any(axis=-1).all()
    assert (after == 3).any(axis=-1).all()


def test_plain_forward_records_nothing(flash_ckpt, recwarn):
    path, _, cfg = flash_ckpt
    model = dsv4.load_hf(path, dtype="float32")
    tokens = jnp.zeros((1, 8), jnp.int32)
    dsv4.forward(model, tokens)
    dsv4.probe(model, tokens)
    from flax import nnx

    assert not nnx.state(model, Probe)  # nothing left on the modules
    assert not [w for w in recwarn if "sow" in str(w.message)]  # no sow outside nnx.capture


def test_probes_reach_out_of_rematerialised_layers(probed):
    """A training model (per-layer `jax.checkpoint`, train stats on) reports the same probes: the
    values recorded inside each checkpointed block come back out to `nnx.capture`."""
    from dsv4.train import training_model

    model, tokens, logits, seen, _ = probed
    remat = training_model(model, remat=True)
    assert remat.rt.remat and remat.rt.train_stats
    remat_logits, remat_seen = dsv4.probe(remat, tokens)
    assert set(remat_seen) == set(seen)
    assert rel_err(np.asarray(remat_logits), logits) <= TOL
    for key, value in seen.items():
        got = np.asarray(remat_seen[key])
        if np.issubdtype(value.dtype, np.integer):
            np.testing.assert_array_equal(np.sort(got, -1), np.sort(value, -1), err_msg=key)
        else:
            assert rel_err(got, value) <= TOL, key
