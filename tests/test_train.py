"""Training: LM-gradient parity with transformers, the indexer loss, overfitting, exact resume, bad input."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
    specs = {s.path: s for s in release_specs(nnx.state(model))}
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


def _indexer_only():
    return train.TrainConfig(
        lr=1e-2, warmup_steps=0, total_steps=60, weight_decay=0.0, lm_weight=0.0, mtp_weight=0.0,
        indexer_weight=1.0, bias_update_rate=0.0, compute_dtype="float32",
    )  # fmt: skip


def test_indexer_loss_reaches_only_the_indexer():
    model = dsv4.init_model(SMALL, RT, seed=0)
    tc = _indexer_only()
    graphdef, params, frozen = train.split_model(model)
    batch = {"tokens": tokens(SMALL)}
    grads = jax.jit(jax.grad(lambda p: train.loss_fn(graphdef, tc, p, frozen, batch)[0]))(params)
    nonzero = {".".join(map(str, p)) for p, v in nnx.to_flat_state(grads) if np.any(np.asarray(v.get_value()))}
    assert nonzero and all(".attn.indexer." in n for n in nonzero), sorted(nonzero)
    # the indexer's own query projection, compressor and weights all learn
    assert {n.split(".attn.indexer.")[1].split(".")[0] for n in nonzero} >= {"wq_b", "weights_proj", "compressor"}


def test_indexer_loss_counts_real_queries_only():
    """Padding is not trained: a padded batch's indexer loss equals that of the batch cut before
    the padding (causal, so the real queries see the same entries), whatever the padding holds."""
    model = dsv4.init_model(SMALL, RT, seed=0)
    graphdef, params, frozen = train.split_model(model)
    tc = _indexer_only()
    ids = tokens(SMALL, batch=2, seq=64)  # 64 inputs
    mask = jnp.ones(ids.shape, bool).at[:, 41:].set(False)  # inputs 0..40 real
    noise = jnp.where(mask, ids, (ids * 7 + 3) % SMALL.vocab_size)  # other padding contents

    @jax.jit
    def indexer_loss(batch):
        return train.loss_fn(graphdef, tc, params, frozen, batch)[1]["indexer_loss"]

    cut = float(indexer_loss({"tokens": ids[:, :42]}))  # 41 inputs
    padded = float(indexer_loss({"tokens": ids, "mask": mask}))
    padded_noise = float(indexer_loss({"tokens": noise, "mask": mask}))
    unmasked = float(indexer_loss({"tokens": ids}))
    print(f"indexer loss: cut {cut:.6f}, padded {padded:.6f} / {padded_noise:.6f}, unmasked {unmasked:.6f}")
    assert cut > 0
    np.testing.assert_allclose([padded, padded_noise], cut, rtol=1e-6)
    assert abs(unmasked - cut) > 1e-3 * cut  # the control: without the mask the padding counts


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
    tc = _indexer_only()
    graphdef, state = train.init_train_state(model, tc)
    batch = {"tokens": tokens(SMALL, batch=2, seq=128, seed=1)}

    @jax.jit
    def overlap(params, frozen):
        with monkeypatch.context() as m:
            m.setattr(attention, "indexer_kl", _overlap_probe)
            mdl = nnx.merge(graphdef, params, frozen)
            _, sown = nnx.capture(mdl, nnx.Intermediate)(batch["tokens"][:, :-1])
            (hit_sum, n), = [v.get_value()[0] for p, v in nnx.to_flat_state(sown) if p[-1] == "indexer_kl"]
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


def test_lower_gives_the_compiled_steps_program(small_step):
    """`train_step.lower(state, batch)` is the program the step runs (to read its HLO or cost): it
    counts at least the LM head's forward and backward products for the batch, and runs as the step."""
    _, step = small_step
    state, batch = _fresh_state(), {"tokens": tokens(SMALL, seq=16)}
    compiled = step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, list | tuple) else cost)["flops"]
    assert flops >= 3 * 2 * (2 * 16) * SMALL.vocab_size * SMALL.hidden_size  # 3 products per weight
    new_state, metrics = compiled(state, batch)
    assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))


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
    assert ckpt.train_config_changes == {}
    ckpt.close()

    longer = dataclasses.replace(TC, total_steps=TC.total_steps + 10, lr=TC.lr * 2)
    resumed = train.Checkpointer(tmp_path / "ckpt", SMALL, longer)
    resumed.restore(_fresh_state())  # another schedule is taken, and listed
    changes = {"lr": (TC.lr, TC.lr * 2), "total_steps": (TC.total_steps, TC.total_steps + 10)}
    assert resumed.train_config_changes == changes

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
    ids = np.asarray(tokens(SMALL, seq=8))
    for batch, message in [
        ({"tokens": np.where(ids == ids[0, 3], -1, ids)}, "token id -1 at row 0, position 3 is outside"),
        ({"tokens": ids + 0.5}, "integer token ids, got dtype float64"),  # was truncated silently
        ({"tokens": ids, "mask": np.ones((2, 8))}, r"batch\['mask'\] must have the shape"),
        ({"tokens": ids, "attention_mask": np.ones_like(ids)}, "expected keys 'tokens' and optionally 'mask'"),
        # left padding: accepted, and the loss then depended on what the padding held
        ({"tokens": ids, "mask": np.arange(ids.shape[1]) >= np.array([[0], [2]])},
         r"batch\['mask'\] row 1 has a real token at 2 after padding"),
    ]:
        with pytest.raises(ValueError, match=message):
            step(_fresh_state(), batch)


@pytest.mark.parametrize(
    "field, value",
    [("lr", -1e-3), ("lr", float("nan")), ("lr", "1e-3"), ("mtp_weight", -1.0), ("clip_norm", 0.0), ("b1", 1.5),
     ("b2", -0.1), ("weight_decay", -1.0), ("end_lr_ratio", 2.0), ("total_steps", 100.5)],
)  # fmt: skip
def test_train_config_values_are_checked(field, value):
    """Each was accepted (a negative lr or loss weight trained toward a negative loss without a word)."""
    with pytest.raises(ValueError, match=f"^{field}: must be"):
        train.TrainConfig(**{field: value})


def test_all_warmup_schedule():
    """warmup_steps == total_steps (allowed) builds an optimizer: optax's cosine refuses 0 decay steps."""
    tc = train.TrainConfig(lr=1.0, warmup_steps=4, total_steps=4)
    params = {"w": jnp.ones(2)}
    updates, _ = train.optimizer(tc).update({"w": jnp.ones(2)}, train.optimizer(tc).init(params), params)
    assert np.all(np.isfinite(np.asarray(updates["w"])))


@pytest.mark.parametrize("warmup", [0, 4])
def test_schedule_by_optimiser_step(warmup):
    """Step n of T uses lr * n / W in the warmup, the peak at step W, lr * end_lr_ratio at step T. optax
    reads a schedule at the count of updates already applied: step 1 had lr 0 (a wasted step) and the
    last step ended at 1.6x the end value."""
    tc = train.TrainConfig(lr=1.0, warmup_steps=warmup, total_steps=10, end_lr_ratio=0.1)
    at_step = [float(train.lr_schedule(tc)(n - 1)) for n in range(1, 11)]  # optax's count = n - 1
    if warmup:
        np.testing.assert_allclose(at_step[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    else:
        assert 0.9 < at_step[0] < 1.0  # one step into the cosine
    assert at_step[-1] == pytest.approx(0.1, rel=1e-6)
    assert np.all(np.diff(at_step[max(warmup - 1, 0) :]) < 0)  # decays from the peak on
    # the whole optimiser: the first step of a warmup of 4 moves the weights by a quarter of lr (Adam: ~lr * sign)
    tc = dataclasses.replace(tc, weight_decay=0.0)
    params = {"w": jnp.ones(3)}
    opt = train.optimizer(tc)
    updates, _ = opt.update({"w": jnp.full(3, 0.5)}, opt.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -at_step[0], rtol=1e-4)


@pytest.mark.parametrize("off", ["mtp", "indexer", "neither"])
def test_weight_decay_leaves_untrained_groups_and_vectors_alone(off):
    """With mtp_weight (or indexer_weight) 0 no gradient reaches the MTP block (or the indexers), yet
    AdamW's decoupled decay shrank them by (1 - lr * wd) every step; norm weights and other vectors were
    pulled toward 0 too. Zero gradients: whatever moves, moves by decay alone."""
    model = train.training_model(dsv4.init_model(SMALL, RT, seed=0))
    tc = dataclasses.replace(TC, warmup_steps=0, weight_decay=0.1,
                             mtp_weight=0.0 if off == "mtp" else 0.3, indexer_weight=0.0 if off == "indexer" else 1.0)
    _, params, _ = train.split_model(model)
    opt = train.optimizer(tc)
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    moved = {}
    for path, u in nnx.to_flat_state(updates):
        names = [str(p) for p in path]
        group = "mtp" if names[0] == "mtp" else "indexer" if "indexer" in names else "other"
        kind = "matrix" if u.get_value().ndim >= 2 else "vector"
        moved.setdefault((group, kind), []).append(bool(jnp.any(u.get_value() != 0)))
    assert not any(moved[("other", "vector")]) and not any(moved[("mtp", "vector")])
    assert all(moved[("other", "matrix")])
    assert all(moved[("mtp", "matrix")]) == (off != "mtp") and any(moved[("mtp", "matrix")]) == (off != "mtp")
    assert all(moved[("indexer", "matrix")]) == (off != "indexer")
    assert any(moved[("indexer", "matrix")]) == (off != "indexer")


def test_optimizer_state_keeps_the_layout_of_optax_adamw():
    """The decay mask went in through adamw(mask=...), which wraps its state in a MaskedState: training
    checkpoints saved before could no longer be restored (resume, dsv4-export). Same layout now, and
    the same update as optax.adamw where every parameter decays."""
    tc = dataclasses.replace(TC, warmup_steps=0)
    _, params, _ = train.split_model(train.training_model(dsv4.init_model(SMALL, RT, seed=0)))
    decayed = optax.adamw(train.lr_schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay)
    adamw = optax.chain(optax.clip_by_global_norm(tc.clip_norm), decayed)
    assert jax.tree.structure(train.optimizer(tc).init(params)) == jax.tree.structure(adamw.init(params))
    p, g = {"w": jnp.ones((3, 3))}, {"w": jnp.full((3, 3), 0.5)}
    ours, _ = train.optimizer(tc).update(g, train.optimizer(tc).init(p), p)
    theirs, _ = adamw.update(g, adamw.init(p), p)
    np.testing.assert_array_equal(np.asarray(ours["w"]), np.asarray(theirs["w"]))


def test_mtp_blocks_that_never_run_do_not_decay():
    cfg = ModelConfig.tiny(num_hidden_layers=2, compress_ratios=(4, 0, 0, 0), num_hash_layers=1, index_topk=4,
                           num_nextn_predict_layers=2)  # fmt: skip
    _, params, _ = train.split_model(train.training_model(dsv4.init_model(cfg, RT, seed=0)))
    flat = {tuple(str(p) for p in path): m for path, m in nnx.to_flat_state(train.decay_mask(TC, params))}
    first = [m.get_value() for k, m in flat.items() if k[:2] == ("mtp", "0")]
    second = [m.get_value() for k, m in flat.items() if k[:2] == ("mtp", "1")]
    assert any(first) and second and not any(second)


def test_a_short_row_trains_and_the_source_model_survives_the_donation(small_step):
    """S = 2, under the CSA ratio: no compressed entry yet, indexer loss 0 (was an IndexError). The
    step donates its state; `init_train_state` copies, so the model it came from still runs (its
    weights had been deleted by the first step)."""
    _, step = small_step
    model = dsv4.init_model(SMALL, RT, seed=0)
    _, state = train.init_train_state(model, TC)
    state, metrics = step(state, {"tokens": tokens(SMALL, seq=2)})
    assert float(metrics["indexer_loss"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    assert dsv4.forward(model, np.asarray(tokens(SMALL, seq=2))).shape == (2, 3, SMALL.vocab_size)


# ------------------------------------------------------------------------------ (f) per-layer remat

ONE_LAYER = ModelConfig.tiny(num_hidden_layers=1, compress_ratios=(4, 0), num_hash_layers=0, index_topk=4)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _checkpoints(fn, *args) -> int:
    """The number of `jax.checkpoint` equations in the top level of fn's jaxpr."""
    eqns = jax.make_jaxpr(fn)(*args).jaxpr.eqns
    return sum(e.primitive.name in ("checkpoint", "remat", "remat2") for e in eqns)


def test_remat_gives_the_same_loss_and_gradients():
    tc = train.TrainConfig(mtp_weight=0.0, seq_balance_weight=0.01, compute_dtype="float32")
    batch = {"tokens": tokens(ONE_LAYER, batch=2, seq=32)}
    models = {r: train.training_model(dsv4.init_model(ONE_LAYER, RT, seed=0), remat=r) for r in (False, True)}
    split = {r: train.split_model(m) for r, m in models.items()}
    assert models[True].rt.remat and not models[False].rt.remat

    def value_and_grad(graphdef, params, frozen):
        return jax.value_and_grad(lambda p: train.loss_fn(graphdef, tc, p, frozen, batch), has_aux=True)(params)

    # one checkpointed block per layer (recomputed in the backward pass) in the remat graph, none in the other
    checkpoints = {r: _checkpoints(functools.partial(value_and_grad, g), p, f) for r, (g, p, f) in split.items()}
    assert checkpoints == {True: ONE_LAYER.num_hidden_layers, False: 0}, checkpoints

    out = jax.jit(lambda a, b: (value_and_grad(split[False][0], *a), value_and_grad(split[True][0], *b)))(
        split[False][1:], split[True][1:]
    )
    ((loss0, aux0), grads0), ((loss1, aux1), grads1) = out
    assert float(loss0) == float(loss1)
    for k in ("lm_loss", "indexer_loss", "seq_balance_loss"):  # the sown stats came out of the checkpoint
        assert abs(float(aux1[k]) - float(aux0[k])) <= 1e-6 * float(aux0[k]) and float(aux0[k]) > 0, k
    assert aux0["loads"].keys() == aux1["loads"].keys() and len(aux1["loads"]) == 1
    for key in aux0["loads"]:
        np.testing.assert_array_equal(aux0["loads"][key], aux1["loads"][key])
    err = rel(_flat(grads1), _flat(grads0))
    print(f"remat: loss {float(loss1):.6f} (equal), gradient relative error {err:.2e}")
    assert err <= 1e-6
    for (path, a), (_, b) in zip(nnx.to_flat_state(grads0), nnx.to_flat_state(grads1), strict=True):
        a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * max(np.abs(a).max(), 1e-30), err_msg=str(path))


# ------------------------------------------------------------------- (g) sequence-wise balance loss


def _numpy_balance(affinity, idx, mask):
    """DeepSeek-V3's sequence-wise balance loss for one layer, in float64: affinity [B,S,E], idx [B,S,K], mask [B,S]."""
    b, _, e = affinity.shape
    k, out = idx.shape[-1], []
    for row in range(b):
        real = mask[row]
        t = real.sum()
        f = np.bincount(idx[row][real].ravel(), minlength=e) * e / (k * t)
        p = affinity[row][real].sum(0) / t
        out.append(np.sum(f * p))
    return float(np.mean(out))


def test_seq_balance_loss_value():
    model = dsv4.init_model(SMALL, RT, seed=0)
    graphdef, params, frozen = train.split_model(model)
    batch = {"tokens": tokens(SMALL, batch=2, seq=32)}
    batch["mask"] = jnp.ones(batch["tokens"].shape, bool).at[1, 20:].set(False)  # row 1: 19 real inputs
    off = dataclasses.replace(TC, compute_dtype="float32")  # seq_balance_weight 0
    on = dataclasses.replace(off, seq_balance_weight=0.5)

    @jax.jit
    def run(params, frozen):
        mdl = nnx.merge(graphdef, params, frozen)
        _, sown = nnx.capture(mdl.forward_with_mtp, nnx.Intermediate)(batch["tokens"][:, :-1])
        routing = {p[:-1]: v.get_value()[0] for p, v in nnx.to_flat_state(sown) if p[-1] == "routing"}
        return routing, *(train.loss_fn(graphdef, tc, params, frozen, batch) for tc in (on, off))

    routing, (loss_on, aux_on), (loss_off, aux_off) = run(params, frozen)
    assert set(routing) == {("layers", 1, "ffn", "gate"), ("mtp", 0, "block", "ffn", "gate")}  # top-k routers only
    mask = np.asarray(batch["mask"])[:, :-1]
    expected = []
    for path, (affinity, idx) in routing.items():
        affinity, idx = np.asarray(affinity, np.float64), np.asarray(idx)
        np.testing.assert_allclose(affinity.sum(-1), 1.0, rtol=1e-6)  # s / sum_j s_j
        top = np.sort(np.argsort(-affinity, axis=-1)[:, : SMALL.num_experts_per_tok], -1)  # bias 0: top-k of s
        np.testing.assert_array_equal(np.sort(idx, -1), top)
        m = mask[:, :-1] & mask[:, 1:] if path[0] == "mtp" else mask  # MTP position t reads tokens t and t + 1
        b, e, k = mask.shape[0], affinity.shape[-1], idx.shape[-1]
        expected.append(_numpy_balance(affinity.reshape(b, -1, e), idx.reshape(b, -1, k), m))
        # the bias balancing's loads count real tokens only (padding once moved the biases too)
        real_load = np.bincount(idx.reshape(b, -1, k)[m].ravel(), minlength=e)
        np.testing.assert_array_equal(aux_on["loads"][path + ("bias",)], real_load)
        assert real_load.sum() == k * m.sum() < idx.size
    value = float(aux_on["seq_balance_loss"])
    print(f"sequence balance loss {value:.6f}, numpy {np.mean(expected):.6f} (per layer {expected})")
    assert abs(value - np.mean(expected)) <= 1e-6 * np.mean(expected) and value > 0.5  # ~1 for random routing
    assert float(aux_off["seq_balance_loss"]) == 0.0
    np.testing.assert_allclose(float(loss_on) - float(loss_off), 0.5 * value, rtol=1e-5)
    for k in ("lm_loss", "mtp_loss", "indexer_loss"):
        assert float(aux_on[k]) == float(aux_off[k]), k


def test_seq_balance_gradient_reaches_routers_and_upstream_only():
    model = dsv4.init_model(SMALL, RT, seed=0)
    graphdef, params, frozen = train.split_model(model)
    tc = train.TrainConfig(lm_weight=0.0, mtp_weight=0.0, indexer_weight=0.0, seq_balance_weight=1.0,
                           compute_dtype="float32")  # fmt: skip
    batch = {"tokens": tokens(SMALL, batch=2, seq=32)}
    grads = jax.jit(jax.grad(lambda p: train.loss_fn(graphdef, tc, p, frozen, batch)[0]))(params)
    norms = {".".join(map(str, p)): float(jnp.linalg.norm(v.get_value())) for p, v in nnx.to_flat_state(grads)}
    nonzero = {n for n, v in norms.items() if v > 0}
    assert norms["layers.1.ffn.gate.weight"] > 0  # the router of the top-k layer
    assert {"layers.0.attn.wq_a.weight", "layers.1.attn.wkv.weight", "embed.weight", "layers.1.hc_ffn.fn"} <= nonzero
    # nothing downstream of the last router, and not the indexer (its inputs are stop_gradient'ed)
    downstream = ("head.", "norm.", "hc_head.", "layers.1.ffn.experts.", "layers.1.ffn.shared_experts.", "mtp.")
    assert not [n for n in nonzero if n.startswith(downstream) or ".indexer." in n], sorted(nonzero)
    assert TC.seq_balance_weight == 0.0
    with pytest.raises(ValueError, match="seq_balance_weight"):
        train.TrainConfig(seq_balance_weight=-1.0)


# ------------------------------------------------------------------------------- (f) frozen parameters

FREEZE = ("layers.*.ffn.experts.*", "embed.*", "layers.1.ffn.gate.*")  # layer 1: the top-k router, its bias too


def _names(state) -> dict:
    return {train.dotted(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_frozen_parameters_get_no_gradient_no_optimizer_state_and_stay_fixed():
    """Freezing the routed experts, the embedding and a router moves them to `frozen`: unchanged (and
    float32) by bfloat16 steps, router bias included, no Adam moments; the other parameters'
    gradients are those of the unfrozen model."""
    tc = dataclasses.replace(TC, freeze=FREEZE, compute_dtype="float32")
    graphdef, state = train.init_train_state(dsv4.init_model(SMALL, RT, seed=0), tc)
    full_tc = dataclasses.replace(tc, freeze=())
    full_graphdef, full = train.init_train_state(dsv4.init_model(SMALL, RT, seed=0), full_tc)
    trainable, frozen = _names(state.params), _names(state.frozen)
    assert {"embed.weight", "layers.0.ffn.experts.w1", "layers.1.ffn.gate.weight", "layers.1.ffn.gate.bias"} <= set(
        frozen
    )
    assert "mtp.0.block.ffn.experts.w1" in trainable and "layers.0.ffn.shared_experts.w1.weight" in trainable
    assert trainable.keys() | (frozen.keys() & _names(full.params).keys()) == _names(full.params).keys()
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert moments == 2 * sum(x.size for x in trainable.values())  # Adam's mu and nu, trainable only

    batch = {"tokens": tokens(SMALL)}

    def grads(g, tc, st):
        return _names(jax.grad(lambda p: train.loss_fn(g, tc, p, st.frozen, batch)[0])(st.params))

    partial, whole = grads(graphdef, tc, state), grads(full_graphdef, full_tc, full)
    scale = np.sqrt(sum(np.sum(np.square(whole[n], dtype=np.float64)) for n in partial))  # their global norm
    for name, g in partial.items():  # each to 1e-6 of the global norm (measured <= 9.5e-8; hc_head.base's
        assert np.linalg.norm(g - whole[name]) <= 1e-6 * scale, name  # ~1e-7 entries differ by 3e-4 of their own)
    every = [np.ravel(d[n]) for d in (partial, whole) for n in sorted(partial)]
    assert rel(np.concatenate(every[: len(partial)]), np.concatenate(every[len(partial) :])) <= 1e-6  # 1.2e-7

    step = train.make_train_step(graphdef, dataclasses.replace(tc, compute_dtype="bfloat16"))
    for _ in range(3):
        state, _ = step(state, batch)
    after, moved = _names(state.frozen), _names(state.params)
    for name in frozen.keys() - {"mtp.0.block.ffn.gate.bias"}:  # the one bias not frozen: balancing moves it
        np.testing.assert_array_equal(after[name], frozen[name], err_msg=name)
        assert after[name].dtype == np.float32 or not np.issubdtype(after[name].dtype, np.floating), name
    assert not np.array_equal(after["mtp.0.block.ffn.gate.bias"], frozen["mtp.0.block.ffn.gate.bias"])
    assert all(not np.array_equal(moved[n], trainable[n]) for n in ("layers.0.attn.wq_a.weight", "head.weight"))


def test_freeze_patterns_are_checked():
    model = dsv4.init_model(SMALL, RT, seed=0)
    for freeze, message in [
        ("embed.*", "freeze: must be a sequence of non-empty glob patterns"),
        (("",), "freeze: must be a sequence of non-empty glob patterns"),
        (("layers.*.expert.*", "embed.*"), r"pattern 'layers.\*.expert.\*' matches no parameter"),
        (("*",), r"freeze: \['\*'\] leaves no parameter to train"),
    ]:
        with pytest.raises(ValueError, match=message):
            train.init_train_state(model, dataclasses.replace(TC, freeze=freeze))
    assert train.TrainConfig(freeze=["embed.*"]).freeze == ("embed.*",)  # a list from JSON: a tuple


def test_resume_with_other_frozen_parameters_is_refused(tmp_path):
    tc = dataclasses.replace(TC, freeze=("embed.*",))
    _, state = train.init_train_state(dsv4.init_model(SMALL, RT, seed=0), tc)
    ckpt = train.Checkpointer(tmp_path / "ckpt", SMALL, tc)
    ckpt.save(state, force=True)
    ckpt.close()
    assert train.Checkpointer(tmp_path / "ckpt", SMALL, tc).restore(state).step == 0  # the same: restored
    with pytest.raises(ValueError, match=r"trained with freeze \['embed.\*'\], not \[\] \(1 parameter\(s\) differ, "
                       r"e.g. embed.weight\): a resume needs"):  # fmt: skip
        train.Checkpointer(tmp_path / "ckpt", SMALL, TC).restore(_fresh_state())
    # the same parameters by another spelling: restored (the patterns were compared, and this refused)
    same = dataclasses.replace(TC, freeze=("emb*.weight",))
    like = train.init_train_state(dsv4.init_model(SMALL, RT, seed=0), same)[1]
    restored = train.Checkpointer(tmp_path / "ckpt", SMALL, same).restore(like)
    assert restored.step == 0
