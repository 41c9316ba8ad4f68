"""Training: LM-gradient parity with transformers, the indexer loss, overfitting, exact resume, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import dsv4
from dsv4 import attention, train
from dsv4.checkpoint import release_specs
from dsv4.config import ModelConfig, RuntimeConfig

SMALL = ModelConfig.tiny(num_hidden_layers=2, compress_ratios=(4, 0, 0), num_hash_layers=1, index_topk=4)
RT = RuntimeConfig(dtype="float32", train_stats=True, query_block=32)
TC = train.TrainConfig(lr=3e-3, warmup_steps=2, total_steps=40, mtp_weight=0.3, compute_dtype="bfloat16")


def tokens(cfg, batch=2, seq=64, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq + 1)), jnp.int32)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------ (a) gradient parity with transformers


def test_lm_gradients_match_transformers(flash_ckpt):
    from release_fixture import release_tensors_from_hf

    path, hf_model, cfg = flash_ckpt
    ids = np.random.default_rng(3).integers(0, cfg["vocab_size"], (2, 48))
    hf_model.zero_grad()
    hf_model(torch.tensor(ids), labels=torch.tensor(ids), use_cache=False).loss.backward()
    hf_grads = {
        n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach() for n, p in hf_model.named_parameters()
    }
    release = release_tensors_from_hf(hf_grads)

    model = train.training_model(dsv4.load_hf(path, dtype="float32"), query_block=16)
    tc = train.TrainConfig(mtp_weight=0.0, indexer_weight=0.0, compute_dtype="float32")
    graphdef, params, frozen = train.split_model(model)
    grads = jax.jit(jax.grad(lambda p: train.loss_fn(graphdef, tc, p, frozen, {"tokens": jnp.asarray(ids)})[0]))(params)
    specs = {s.path: s for s in release_specs(nnx.state(model), model.cfg)}
    worst, checked = 0.0, 0
    for p, var in nnx.to_flat_state(grads):
        ours = np.asarray(var.get_value())
        spec, name = specs[tuple(p)], ".".join(map(str, p))
        if name.startswith("mtp.") or ".indexer." in name:  # HF lacks MTP; no LM gradient reaches the indexer
            assert not np.any(ours), name
            if ".indexer." in name and all(t.name in release for t in spec.tensors):
                assert not np.any(spec.assemble([release[t.name] for t in spec.tensors])), name
            continue
        expected = spec.assemble([np.asarray(release[t.name]) for t in spec.tensors])
        err = rel(ours, expected)
        worst, checked = max(worst, err), checked + 1
        assert err <= 1e-4, (name, err)
    print(f"LM gradient parity: {checked} parameter groups, worst relative error {worst:.2e}")
    assert checked > 50


# ------------------------------------------------------------------------------------ (b) indexer loss


def _indexer_only(cfg):
    return train.TrainConfig(
        lr=1e-2, warmup_steps=0, total_steps=60, weight_decay=0.0, lm_weight=0.0, mtp_weight=0.0,
        indexer_weight=1.0, bias_update_rate=0.0, compute_dtype="float32",
    )  # fmt: skip


def test_indexer_loss_reaches_only_the_indexer():
    model = dsv4.init_model(SMALL, RT, seed=0)
    tc = _indexer_only(SMALL)
    graphdef, params, frozen = train.split_model(model)
    batch = {"tokens": tokens(SMALL)}
    grads = jax.jit(jax.grad(lambda p: train.loss_fn(graphdef, tc, p, frozen, batch)[0]))(params)
    nonzero = {".".join(map(str, p)) for p, v in nnx.to_flat_state(grads) if np.any(np.asarray(v.get_value()))}
    assert nonzero and all(".attn.indexer." in n for n in nonzero), sorted(nonzero)
    # the indexer's own query projection, compressor and weights all learn
    assert {n.split(".attn.indexer.")[1].split(".")[0] for n in nonzero} >= {"wq_b", "weights_proj", "compressor"}


def _overlap_probe(q, entries, iq, keys, iw, positions, ratio, block):
    """Stand-in for attention.indexer_kl: (sum of top-k overlaps, queries) where more than k entries are visible."""
    del block
    k = SMALL.index_topk
    q, entries = q.astype(jnp.float32), entries.astype(jnp.float32)
    visible = attention.entry_visible(positions, entries.shape[1], ratio)
    main = jnp.einsum("bqhk,btk->bqht", q, entries) * q.shape[-1] ** -0.5
    target = jnp.mean(jax.nn.softmax(jnp.where(visible[:, :, None], main, -jnp.inf), axis=-1), axis=2)
    scores = attention.index_scores(iq, keys, iw, positions, ratio)
    top_t = jax.lax.top_k(jnp.where(visible, target, -1.0), k)[1]
    top_i = jax.lax.top_k(scores, k)[1]
    hits = jnp.sum(jnp.any(top_t[..., :, None] == top_i[..., None, :], axis=-1), axis=-1) / k
    use = jnp.sum(visible, axis=-1) > k
    return jnp.sum(jnp.where(use, hits, 0.0)), jnp.sum(use).astype(jnp.float32)


def test_indexer_training_raises_topk_overlap(monkeypatch):
    model = dsv4.init_model(SMALL, RT, seed=0)
    tc = _indexer_only(SMALL)
    graphdef, state = train.init_train_state(model, tc)
    batch = {"tokens": tokens(SMALL, batch=2, seq=128, seed=1)}

    @jax.jit
    def overlap(params, frozen):
        with monkeypatch.context() as m:
            m.setattr(attention, "indexer_kl", _overlap_probe)
            mdl = nnx.merge(graphdef, params, frozen)
            mdl(batch["tokens"][:, :-1])
            (hit_sum, n), = [v.get_value()[0] for _, v in nnx.to_flat_state(nnx.pop(mdl, nnx.Intermediate))
                             if _[-1] == "indexer_kl"]  # fmt: skip
        return hit_sum / n

    before = float(overlap(state.params, state.frozen))
    step = train.make_train_step(graphdef, tc)
    losses = []
    for _ in range(60):
        state, metrics = step(state, batch)
        losses.append(float(metrics["indexer_loss"]))
    after = float(overlap(state.params, state.frozen))
    print(f"indexer top-{SMALL.index_topk} overlap {before:.3f} -> {after:.3f}; KL {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.5 * losses[0]
    assert after > before + 0.1


# ------------------------------------------------------------------------------ (c) overfit, (d) resume


@pytest.fixture(scope="module")
def small_step():
    model = dsv4.init_model(SMALL, RT, seed=0)
    graphdef, _ = train.init_train_state(model, TC)
    return graphdef, train.make_train_step(graphdef, TC)


def _fresh_state():
    return train.init_train_state(dsv4.init_model(SMALL, RT, seed=0), TC)[1]


def test_overfit_single_batch(small_step):
    _, step = small_step
    state, batch = _fresh_state(), {"tokens": tokens(SMALL)}
    first = None
    for _ in range(30):
        state, metrics = step(state, batch)
        first = first if first is not None else float(metrics["lm_loss"])
    last = float(metrics["lm_loss"])
    print(f"overfit: lm loss {first:.3f} -> {last:.3f}; metrics {sorted(metrics)}")
    assert last < first / 2
    assert int(state.step) == 30 and np.isfinite(float(metrics["grad_norm"]))
    assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(state.params))
    biases = [v.get_value() for p, v in nnx.to_flat_state(state.frozen) if p[-1] == "bias"]
    assert biases and any(np.any(np.asarray(b) != 0) for b in biases)  # balancing moved the router biases


def _copy(state):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


def test_save_restore_continue_is_exact(small_step, tmp_path):
    _, step = small_step
    batches = [{"tokens": tokens(SMALL, seed=s)} for s in range(6)]
    state = _fresh_state()
    ckpt = train.Checkpointer(tmp_path / "ckpt", SMALL, TC, every=3, keep=2)
    for b in batches[:3]:
        state, _ = step(state, b)
    assert ckpt.save(state)
    straight = _copy(state)
    for b in batches[3:]:
        straight, _ = step(straight, b)
    restored = ckpt.restore(_fresh_state())
    assert int(restored.step) == 3
    for b in batches[3:]:
        restored, _ = step(restored, b)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ckpt.close()

    other = dataclasses.replace(SMALL, hidden_size=32)
    with pytest.raises(ValueError, match="another model config.*hidden_size"):
        train.Checkpointer(tmp_path / "ckpt", other, TC).restore(_fresh_state())


# ---------------------------------------------------------------------------------------- (e) bad input


def test_bad_input_is_refused(small_step):
    graphdef, step = small_step
    short = dataclasses.replace(SMALL, max_position_embeddings=16)
    model = dsv4.init_model(short, RT, seed=0)
    g, state = train.init_train_state(model, TC)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 16"):
        train.make_train_step(g, TC)(state, {"tokens": tokens(short, seq=32)})
    with pytest.raises(ValueError, match=r"\[B, S \+ 1\]"):
        step(_fresh_state(), {"tokens": jnp.zeros((4,), jnp.int32)})
    with pytest.raises(ValueError, match="train_stats"):
        train.split_model(dsv4.init_model(SMALL, RuntimeConfig(dtype="float32"), seed=0))
    with pytest.raises(ValueError, match="compute_dtype"):
        train.TrainConfig(compute_dtype="float16")
