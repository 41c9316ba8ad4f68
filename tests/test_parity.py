"""Whole-model float32 parity with transformers' DeepseekV4ForCausalLM on release-layout checkpoints.

Tolerance: relative Frobenius error of the logits <= 1e-4 (measured: about 1e-6; see README).
Sequences of 300 tokens span two HCA windows (128), nine sliding windows (32) and 75 CSA entries
with index_topk 16 (Flash-like) or 8 (Pro-like), so the indexer really selects.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dsv4
from dsv4 import attention, mhc

TOL = 1e-4
SEQ = 300


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tokens_for(cfg, seed=0, batch=2, seq=SEQ):
    return np.random.default_rng(seed).integers(0, cfg["vocab_size"], (batch, seq))


def hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(torch.tensor(tokens), use_cache=False).logits.numpy()


@pytest.fixture(scope="module")
def reference_logits(flash_ckpt, pro_ckpt):
    out = {}
    for name, (path, hf_model, cfg) in (("flash", flash_ckpt), ("pro", pro_ckpt)):
        tokens = tokens_for(cfg)
        out[name] = (path, tokens, hf_logits(hf_model, tokens))
    return out


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("name", ["flash", "pro"])
def test_whole_model_matches_transformers(reference_logits, name, impl):
    path, tokens, expected = reference_logits[name]
    model = dsv4.load_hf(path, dtype="float32", attention_impl=impl, query_block=64)
    got = dsv4.forward(model, tokens)
    assert got.shape == expected.shape and got.dtype == jnp.float32
    err = rel_err(got, expected)
    print(f"{name}/{impl}: relative error {err:.2e}")
    assert err <= TOL


def test_odd_lengths_and_batch_one(flash_ckpt):
    path, hf_model, cfg = flash_ckpt
    model = dsv4.load_hf(path, dtype="float32", query_block=16)
    for seq in (1, 3, 5, 131):
        tokens = tokens_for(cfg, seed=seq, batch=1, seq=seq)
        assert rel_err(dsv4.forward(model, tokens), hf_logits(hf_model, tokens)) <= TOL, seq


@pytest.mark.parametrize("name", ["flash", "pro"])
def test_mtp_logits_match_transformers_decoder_layer(flash_ckpt, pro_ckpt, name):
    """The MTP block (architecture.md s8) against transformers' own decoder layer fed the MTP input
    (`release_fixture.hf_mtp_logits`); pairing the streams at t with token t instead of t + 1 must fail."""
    from release_fixture import hf_mtp_logits

    path, hf_model, cfg = flash_ckpt if name == "flash" else pro_ckpt
    tokens = tokens_for(cfg, seed=5, seq=200)
    model = dsv4.load_hf(path, dtype="float32", query_block=64)
    main, mtp = dsv4.forward_with_mtp(model, tokens)
    assert mtp.shape == (2, 199, cfg["vocab_size"])
    err = rel_err(mtp, hf_mtp_logits(hf_model, cfg, tokens))
    print(f"{name}: MTP relative error {err:.2e}")
    assert err <= TOL
    assert rel_err(main, hf_logits(hf_model, tokens)) <= TOL
    assert rel_err(mtp, hf_mtp_logits(hf_model, cfg, tokens, pair_with_next=False)) > 100 * TOL


# ------------------------------------------------------------------------------- negative controls


def _broken_parity(monkeypatch, reference_logits, module, attr, broken):
    """The forward's error against transformers with one part patched.

    The jitted forward reuses a program compiled for the same shapes and graphdef, patched or not
    (`test_model.py::test_a_class_patch_reaches_the_forward_after_clear_caches`), so the caches are
    cleared on both sides of the patch; the intact forward is then checked to be back within TOL.
    """
    path, tokens, expected = reference_logits["flash"]
    model = dsv4.load_hf(path, dtype="float32")
    jax.clear_caches()
    monkeypatch.setattr(module, attr, broken)
    try:
        err = rel_err(dsv4.forward(model, tokens), expected)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    assert rel_err(dsv4.forward(model, tokens), expected) <= TOL
    return err


def test_negative_control_comb_not_transposed(monkeypatch, reference_logits):
    def expand_untransposed(block_out, streams, post, comb):
        mixed = jnp.einsum("bskj,bsjd->bskd", comb, streams)
        return post[..., None] * block_out[:, :, None, :] + mixed

    err = _broken_parity(
        monkeypatch, reference_logits, mhc.HyperConnection, "expand", staticmethod(expand_untransposed)
    )
    assert err > 100 * TOL


def test_negative_control_half_split_rope(monkeypatch, reference_logits):
    def half_split(x, cos, sin, inverse=False):
        half = cos.shape[-1]
        nope, rope = x[..., : -2 * half], x[..., -2 * half :]
        a, b = rope[..., :half], rope[..., half:]
        sin = -sin if inverse else sin
        return jnp.concatenate([nope, a * cos - b * sin, b * cos + a * sin], axis=-1)

    assert _broken_parity(monkeypatch, reference_logits, attention, "apply_rope", half_split) > 100 * TOL


@pytest.mark.parametrize("everywhere", [False, True], ids=["no_yarn", "yarn_everywhere"])
def test_negative_control_yarn_on_the_wrong_layers(monkeypatch, reference_logits, everywhere):
    """YaRN (the compressed table) belongs to CSA and HCA layers only: the table of the other kind
    on every layer must fail parity, whichever way round."""
    table = attention.rope_inv_freq

    def one_table(cfg, compressed):
        return table(cfg, compressed=everywhere)

    assert _broken_parity(monkeypatch, reference_logits, attention, "rope_inv_freq", one_table) > 100 * TOL


def test_negative_control_future_compressed_entries_visible(monkeypatch, reference_logits):
    def leaky(positions, num_entries, ratio):  # off by one window: sees the window still filling
        return jnp.arange(num_entries) < ((positions + 1) // ratio + 1)[..., None]

    assert _broken_parity(monkeypatch, reference_logits, attention, "entry_visible", leaky) > 100 * TOL
