"""Training: loss, an optax AdamW train step, auxiliary-loss-free router balancing, Orbax checkpoints.

    model = training_model(model)                        # float32, train_stats, per-layer remat
    graphdef, state = init_train_state(model, train_cfg)
    step = make_train_step(graphdef, train_cfg)          # jitted, state donated
    state, metrics = step(state, {"tokens": int32 [B, S + 1], "mask": optional [B, S + 1]})

Loss = lm_weight * next-token CE (mean over real targets) + mtp_weight * CE of the MTP block on
token t + 2 + indexer_weight * sum over CSA layers of (the indexer KL's mean over the real
queries that see a compressed entry)
+ seq_balance_weight * the sequence-wise balance loss (`seq_balance_loss`). The indexer's inputs
are stop_gradient'ed in the model, so the KL term reaches only indexer parameters, and the LM terms
never reach them (top-k is not differentiable).

Sequence-wise balance loss (DeepSeek-V3/V4's complementary auxiliary loss), for each top-k routed
MoE layer (hash layers have nothing to balance) and each sequence of T real tokens:
    f_i = E / (K T) * #{t : expert i among the K selected for token t}
    P_i = 1/T * sum_t s_{t,i} / sum_j s_{t,j}      (s: router affinities, without the selection bias)
    L   = sum_i f_i P_i                              (1 when routing is perfectly even)
averaged over sequences and layers. Only P carries a gradient (into the router weights and,
through the router's input, everything upstream of it).

Parameter groups (`split_model`): trainable `nnx.Param`s (optimised by AdamW), and `frozen`
variables: the routers' selection `gate.bias` (updated outside the gradient, DeepSeek's
auxiliary-loss-free balancing: bias_e += rate * sign(mean load - load_e)), the hash routers'
`tid2eid` tables (never changed), and the parameters `TrainConfig.freeze` names (glob patterns
over dotted paths such as "layers.*.ffn.experts.*": no gradient, no optimizer state, unchanged; a
matched `gate.bias` is not balanced either).

Mixed precision: master weights and optimizer state are float32; with compute_dtype "bfloat16" the
matrices are cast to bfloat16 inside the step for the forward (mHC, sinks, ape, norms and router
bias stay float32, as in the release); gradients come back in float32 through the cast.

Memory: `training_model(..., remat=True)` sets RuntimeConfig(remat=True): every main-stack block is
rematerialised (`jax.checkpoint`), so the backward pass keeps only the block inputs.

Sharding: a model whose RuntimeConfig carries a mesh (`sharding.shard_model`) gets a step whose
state is placed by the strategy's rules (`train_state_shardings`: parameters, router state and both
Adam moments by their logical axes) and whose batch is split along the strategy's batch axes; the
routed experts run expert-parallel. The numbers are those of the single-device step.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import math
import numbers
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from dsv4.config import ModelConfig
from dsv4.model import DeepseekV4, check_token_ids, rebuild_model

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and loss settings (all static: a new value means a new compiled step)."""

    lr: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 10_000
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    lm_weight: float = 1.0
    mtp_weight: float = 0.3
    indexer_weight: float = 1.0
    bias_update_rate: float = 1e-3
    seq_balance_weight: float = 0.0
    compute_dtype: str = "bfloat16"
    freeze: tuple[str, ...] = ()  # glob patterns (fnmatch) over dotted parameter paths, e.g. "embed.*"

    def __post_init__(self):
        if isinstance(self.freeze, str) or not all(isinstance(p, str) and p for p in self.freeze):
            raise ValueError(f"freeze: must be a sequence of non-empty glob patterns, got {self.freeze!r}")
        object.__setattr__(self, "freeze", tuple(self.freeze))  # a list (from JSON) too: hashable, static
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype: must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        for name in ("warmup_steps", "total_steps"):
            if not isinstance(getattr(self, name), numbers.Integral):
                raise ValueError(f"{name}: must be an integer, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_steps <= self.total_steps or self.total_steps < 1:
            raise ValueError(f"need 0 <= warmup_steps <= total_steps >= 1, got {self.warmup_steps}, {self.total_steps}")
        _in_range("lr", self.lr, 0, math.inf, low_open=True)
        _in_range("clip_norm", self.clip_norm, 0, math.inf, low_open=True)
        _in_range("end_lr_ratio", self.end_lr_ratio, 0, 1)
        for name in ("b1", "b2"):
            _in_range(name, getattr(self, name), 0, 1, high_open=True)
        for name in ("weight_decay", "lm_weight", "mtp_weight", "indexer_weight", "bias_update_rate",
                     "seq_balance_weight"):  # fmt: skip
            _in_range(name, getattr(self, name), 0, math.inf)


def _in_range(name: str, value, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    """ValueError naming the TrainConfig field unless `value` is a finite real number in the range."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        where = f"{'>' if low_open else '>='} {low}" if math.isinf(high) else f"in {left}{low}, {high}{right}"
        raise ValueError(f"{name}: must be a finite number {where}, got {value!r}")


@struct.dataclass
class TrainState:
    """step (int32 scalar), params (trainable nnx.State, float32), frozen (router bias, tid2eid and the
    parameters `TrainConfig.freeze` names; floats in float32), opt_state."""

    step: jax.Array
    params: nnx.State
    frozen: nnx.State
    opt_state: optax.OptState


def _is_router_bias(path, _var) -> bool:
    return len(path) >= 2 and path[-2] == "gate" and path[-1] == "bias"


TRAINABLE = nnx.All(nnx.Param, nnx.Not(_is_router_bias))


def dotted(path) -> str:
    """An nnx path as the dotted name `TrainConfig.freeze` patterns match: "layers.0.attn.wq_a.weight"."""
    return ".".join(map(str, path))


def _matches(patterns: tuple[str, ...]):
    return lambda path, _var: any(fnmatch.fnmatchcase(dotted(path), p) for p in patterns)


def training_model(model: DeepseekV4, query_block: int | None = None, remat: bool = True) -> DeepseekV4:
    """The same weights, rebuilt float32 with RuntimeConfig(train_stats=True, remat=remat) (the training graph).

    The mesh and strategy of `model.rt` are kept (a sharded model stays sharded).
    """
    rt = dataclasses.replace(
        model.rt, dtype="float32", train_stats=True, remat=remat, query_block=query_block or model.rt.query_block
    )
    state = jax.tree.map(lambda x: x.astype(F32) if jnp.issubdtype(x.dtype, jnp.floating) else x, nnx.state(model))
    return rebuild_model(model, rt, state)


def check_freeze(model: DeepseekV4, freeze: tuple[str, ...]) -> None:
    """ValueError for a `freeze` pattern that matches no parameter (a typo would freeze nothing), and
    for patterns that match every trainable one (nothing left to train). Router biases count: a
    matched `gate.bias` is no longer moved by the load balancing."""
    names = [dotted(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    for pattern in freeze:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(f"freeze: pattern {pattern!r} matches no parameter (names like {names[-1]!r})")
    trainable = [dotted(path) for path, _ in nnx.to_flat_state(nnx.state(model, TRAINABLE))]
    if freeze and all(any(fnmatch.fnmatchcase(name, p) for p in freeze) for name in trainable):
        raise ValueError(f"freeze: {list(freeze)} leaves no parameter to train")


def split_model(model: DeepseekV4, freeze: tuple[str, ...] = ()):
    """(graphdef, trainable params, frozen variables): the parameters `freeze` matches join the frozen
    ones (`check_freeze`'s ValueError for patterns that match none or all)."""
    if not model.rt.train_stats:
        raise ValueError("build the model with RuntimeConfig(train_stats=True) (see training_model)")
    check_freeze(model, freeze)
    return nnx.split(model, nnx.All(TRAINABLE, nnx.Not(_matches(freeze))), ...)


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Learning rate of optimiser step n = 1 .. total_steps, as a function of optax's update count n - 1.

    Warms up linearly to `lr` at step `warmup_steps` (lr * n / warmup_steps), then decays by a
    cosine to `lr * end_lr_ratio` at step `total_steps`. (optax's schedules take the count of
    updates already applied: read at it directly, step 1 had a learning rate of 0 and the last step
    never reached the end value.)
    """
    if tc.warmup_steps == tc.total_steps:  # all warmup: optax's cosine refuses a decay of 0 steps
        base = optax.linear_schedule(0.0, tc.lr, tc.warmup_steps)
    else:
        base = optax.warmup_cosine_decay_schedule(
            0.0, tc.lr, tc.warmup_steps, tc.total_steps, end_value=tc.lr * tc.end_lr_ratio
        )
    return lambda count: base(count + 1)


def decay_mask(tc: TrainConfig, params: nnx.State):
    """Which parameters weight decay shrinks: matrices that some loss trains.

    Vectors (norm weights, mHC biases and scales, attention sinks) are left alone, and so are the MTP
    block when `mtp_weight` is 0 (and MTP blocks after `mtp.0`, which never run) and the indexers
    when `indexer_weight` is 0: no gradient reaches them then, and decoupled decay alone would
    shrink them every step.
    """

    def trained_matrix(path, x) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        mtp = names[:1] == ["mtp"]
        off = (mtp and (tc.mtp_weight == 0 or names[1:2] != ["0"])) or (tc.indexer_weight == 0 and "indexer" in names)
        return x.ndim >= 2 and not off

    return jax.tree_util.tree_map_with_path(trained_matrix, params)


def _decoupled_weight_decay(tc: TrainConfig) -> optax.GradientTransformation:
    """updates + weight_decay * params on `decay_mask(tc, params)`; stateless, so the optimiser state keeps
    the layout of optax.adamw's (checkpoints saved before the mask restore as they were)."""

    def update(updates, state, params):
        mask = decay_mask(tc, params)
        return jax.tree.map(lambda u, p, m: u + tc.weight_decay * p if m else u, updates, params, mask), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW with global-norm clipping (`lr_schedule`; weight decay on `decay_mask`): optax.adamw's
    three steps (Adam scaling, decoupled decay, the learning rate), the decay masked."""
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.chain(
            optax.scale_by_adam(b1=tc.b1, b2=tc.b2),
            _decoupled_weight_decay(tc),
            optax.scale_by_learning_rate(lr_schedule(tc)),
        ),
    )


def init_train_state(model: DeepseekV4, tc: TrainConfig) -> tuple[nnx.GraphDef, TrainState]:
    """(graphdef, step-0 TrainState) of a `training_model`; the state holds copies of its weights.
    The parameters `tc.freeze` names are kept in `frozen` (no optimizer state)."""
    graphdef, params, frozen = split_model(model, tc.freeze)
    # copies: the train step donates its state, which must not take `model`'s own buffers with it
    params = jax.tree.map(lambda x: jnp.astype(x, F32, copy=True), params)
    frozen = jax.tree.map(lambda x: jnp.astype(x, F32 if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, copy=True),
                          frozen)  # fmt: skip
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, frozen, optimizer(tc).init(params))


def _keeps_f32(path) -> bool:
    names = [str(p) for p in path]
    return any(n.startswith("hc_") or n in ("ape", "attn_sink") for n in names)


def cast_for_compute(params: nnx.State, dtype) -> nnx.State:
    """Matrices to the compute dtype; vectors, mHC and ape stay float32."""
    if jnp.dtype(dtype) == F32:
        return params

    def cast(path, x):
        if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 2 and not _keeps_f32(path):
            return x.astype(dtype)
        return x

    return jax.tree_util.tree_map_with_path(lambda kp, x: cast([getattr(k, "key", k) for k in kp], x), params)


def cross_entropy(logits, targets, mask):
    """Mean over mask of -log softmax(logits)[target] = logsumexp(logits) - logits[target]; logits
    float32 [B, S, V]. (Written without the [B, S, V] log-probabilities: forward + backward at
    1,024 x 4,096 on XLA:CPU 13.9 -> 2.2 ms, same values and gradients.)"""
    logits = logits.astype(F32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(F32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _stats(intermediates: nnx.State, input_mask):
    """The sown train stats: (indexer loss, {gate path: [(affinities, ids)]}).

    input_mask [B, S]: the real input tokens; the indexer loss of each CSA layer is its KL's mean
    over the real queries that see an entry (padding does not train the indexer).
    affinities [N, E] float32, ids [N, K]: one pair per call of a top-k router (see `dsv4.moe.Gate`).
    """
    indexer, routing = jnp.zeros((), F32), {}
    for path, var in nnx.to_flat_state(intermediates):
        name = path[-1]
        for v in var.get_value():
            if name == "indexer_kl":
                kl, sees = v  # [B, S'] each
                real = _real_tokens_mask(path, input_mask).astype(F32) * sees
                indexer = indexer + jnp.sum(kl * real) / jnp.maximum(jnp.sum(real), 1.0)
            elif name == "routing":
                routing.setdefault(tuple(path[:-1]), []).append(v)
    return indexer, routing


def _real_tokens_mask(path, input_mask) -> jax.Array:
    """[B, S'] the real tokens a layer at `path` saw: the main stack sees the S input tokens; the
    MTP block sees S - 1 (position t sees tokens t and t + 1, real when both are)."""
    return input_mask[:, :-1] & input_mask[:, 1:] if path[0] == "mtp" else input_mask


def expert_loads(routing: dict, input_mask) -> dict:
    """{gate-bias path: load [E] float32}: each top-k router's selections of real tokens only
    (masked padding does not move the bias balancing)."""
    loads = {}
    for path, calls in routing.items():
        real = _real_tokens_mask(path, input_mask).reshape(-1)
        load = 0.0
        for affinity, idx in calls:
            weight = jnp.broadcast_to(real[:, None], idx.shape).astype(F32)
            load = load + jnp.zeros(affinity.shape[-1], F32).at[idx.reshape(-1)].add(weight.reshape(-1))
        loads[path + ("bias",)] = load
    return loads


def sequence_balance(affinity, idx, mask):
    """One layer's sequence-wise balance loss sum_i f_i P_i, averaged over the sequences with a real token.

    affinity [B, S, E] float32 (s / sum_j s_j), idx [B, S, K] selected experts, mask [B, S] real tokens.
    """
    b, s, e = affinity.shape
    k = idx.shape[-1]
    m = mask.astype(F32)
    t = jnp.sum(m, axis=1)  # [B] real tokens per sequence
    rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], idx.shape)
    counts = jnp.zeros((b, e), F32).at[rows, idx].add(jnp.broadcast_to(m[..., None], idx.shape))  # [B, E]
    f = counts * e / (k * jnp.maximum(t, 1.0)[:, None])  # [B, E]
    p = jnp.einsum("bse,bs->be", affinity, m) / jnp.maximum(t, 1.0)[:, None]  # [B, E]
    real = (t > 0).astype(F32)
    return jnp.sum(jnp.sum(f * p, axis=-1) * real) / jnp.maximum(jnp.sum(real), 1.0)


def seq_balance_loss(routing: dict, input_mask) -> jax.Array:
    """Mean over the top-k MoE layers (main stack and MTP block) of `sequence_balance`.

    routing: {gate path: [(affinities [B*S', E], ids [B*S', K])]} from `_stats`; input_mask [B, S]:
    the real input tokens. The main stack routes S tokens; the MTP block routes S - 1 (position t
    sees tokens t and t + 1, real when both are).
    """
    b = input_mask.shape[0]
    layers = []
    for path, calls in routing.items():
        mask = _real_tokens_mask(path, input_mask)
        for affinity, idx in calls:
            e, k = affinity.shape[-1], idx.shape[-1]
            layers.append(sequence_balance(affinity.reshape(b, -1, e), idx.reshape(b, -1, k), mask))
    return jnp.mean(jnp.stack(layers)) if layers else jnp.zeros((), F32)


def loss_fn(graphdef, tc: TrainConfig, params, frozen, batch):
    """(total loss, aux dict with lm_loss, mtp_loss, indexer_loss, seq_balance_loss and the expert loads)."""
    tokens = jnp.asarray(batch["tokens"], jnp.int32)
    mask = batch.get("mask")
    mask = jnp.ones(tokens.shape, jnp.bool_) if mask is None else jnp.asarray(mask, jnp.bool_)
    dtype = jnp.dtype(tc.compute_dtype)
    model = nnx.merge(graphdef, cast_for_compute(params, dtype), cast_for_compute(frozen, dtype))
    inputs = tokens[:, :-1]
    use_mtp = tc.mtp_weight != 0 and len(model.mtp) > 0

    def run(model):
        return model.forward_with_mtp(inputs) if use_mtp else (model(inputs), None)

    (main, mtp), sown = nnx.capture(run, nnx.Intermediate)(model)  # what the layers `sow`
    mtp_loss = jnp.zeros((), F32)
    if use_mtp:
        mtp_loss = cross_entropy(mtp, tokens[:, 2:], mask[:, 2:] & mask[:, 1:-1] & mask[:, :-2])
    lm_loss = cross_entropy(main, tokens[:, 1:], mask[:, 1:] & mask[:, :-1])
    indexer_loss, routing = _stats(sown, mask[:, :-1])
    total = tc.lm_weight * lm_loss + tc.mtp_weight * mtp_loss
    if tc.indexer_weight:
        total = total + tc.indexer_weight * indexer_loss
    balance = jnp.zeros((), F32)
    if tc.seq_balance_weight:  # not computed when off: the sown affinities are then dead code
        balance = seq_balance_loss(routing, mask[:, :-1])
        total = total + tc.seq_balance_weight * balance
    aux = {"lm_loss": lm_loss, "mtp_loss": mtp_loss, "indexer_loss": indexer_loss, "seq_balance_loss": balance}
    return total, {**aux, "loads": expert_loads(routing, mask[:, :-1])}


def balance_bias(
    frozen: nnx.State, loads: dict, rate: float, freeze: tuple[str, ...] = ()
) -> tuple[nnx.State, jax.Array]:
    """bias_e += rate * sign(mean load - load_e) for every top-k router whose bias `freeze` does not
    name; returns (frozen, mean over routers of max/mean load)."""
    flat = dict(nnx.to_flat_state(frozen))
    imbalance = []
    for path, load in loads.items():
        var = flat[path]
        mean = jnp.mean(load)
        if not _matches(freeze)(path, var):
            var.set_value(var.get_value() + rate * jnp.sign(mean - load))
        imbalance.append(jnp.max(load) / jnp.maximum(mean, 1e-9))
    return frozen, (jnp.mean(jnp.stack(imbalance)) if imbalance else jnp.ones((), F32))


def train_state_shardings(state: TrainState, mesh, strategy=None) -> TrainState:
    """NamedShardings for a TrainState on `mesh`: every nnx Variable (parameters, router bias and
    tid2eid, both Adam moments) by its logical axes under `strategy`'s rules; the rest (step, Adam
    count) replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    from dsv4.params import logical_axes
    from sharding.rules import get_rules, logical_to_spec  # sharding imports dsv4: import when used

    rules = get_rules(strategy)

    def one(x):
        if isinstance(x, nnx.Variable):
            return NamedSharding(mesh, logical_to_spec(logical_axes(x), rules, mesh))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _update(graphdef, tc: TrainConfig, opt, state: TrainState, batch):
    """One optimisation step, a pure function: (state, batch) -> (state, metrics)."""
    (loss, aux), grads = jax.value_and_grad(lambda p: loss_fn(graphdef, tc, p, state.frozen, batch), has_aux=True)(
        state.params
    )
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    frozen = jax.tree.map(lambda x: x, state.frozen)
    frozen, imbalance = balance_bias(frozen, jax.lax.stop_gradient(aux["loads"]), tc.bias_update_rate, tc.freeze)
    metrics = {k: aux[k] for k in ("lm_loss", "mtp_loss", "indexer_loss", "seq_balance_loss")}
    metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), load_imbalance=imbalance)
    return TrainState(state.step + 1, params, frozen, opt_state), metrics


def _compile(graphdef, tc: TrainConfig, rt, state: TrainState):
    """(jitted step, placement of (state, batch) or None). With a mesh the state keeps its shardings."""
    fn = functools.partial(_update, graphdef, tc, optimizer(tc))
    if rt.mesh is None:
        return jax.jit(fn, donate_argnums=0), None
    from sharding.placement import batch_sharding

    shardings = train_state_shardings(state, rt.mesh, rt.strategy)
    step = jax.jit(fn, donate_argnums=0, out_shardings=(shardings, None))
    return step, (shardings, batch_sharding(rt.mesh, rt.strategy, 2))


BATCH_KEYS = ("tokens", "mask")


def _checked_batch(batch, cfg: ModelConfig, rt) -> dict:
    """The batch with host arrays as numpy; ValueError for one the step cannot take (see `_check_batch`)."""
    unknown = sorted(set(batch) - set(BATCH_KEYS))
    if unknown or "tokens" not in batch:
        raise ValueError(f"batch: expected keys 'tokens' and optionally 'mask', got {sorted(batch)}")
    batch = {k: v if isinstance(v, jax.Array) else np.asarray(v) for k, v in batch.items()}
    _check_batch(batch["tokens"], cfg.max_position_embeddings, rt)
    check_token_ids(batch["tokens"], cfg.vocab_size, "batch['tokens']")
    if "mask" in batch and tuple(batch["mask"].shape) != tuple(batch["tokens"].shape):
        raise ValueError(
            f"batch['mask'] must have the shape of batch['tokens'] [B, S + 1], {tuple(batch['tokens'].shape)}; "
            f"got {tuple(batch['mask'].shape)}"
        )
    if "mask" in batch and not isinstance(batch["mask"], jax.Array):  # a device mask is not read (a wait)
        _check_right_padding(batch["mask"])
    return batch


def _check_right_padding(mask: np.ndarray) -> None:
    """ValueError unless each row of a host mask [B, S + 1] is its real tokens then padding: attention
    does not mask padding, so padding before a real token would change what that token sees."""
    real = mask.astype(bool)
    holes = real[:, 1:] & ~real[:, :-1]  # a real token right after padding
    if holes.any():
        b, i = np.argwhere(holes)[0]
        raise ValueError(
            f"batch['mask'] row {b} has a real token at {i + 1} after padding: padding must come after "
            "every real token of its row (right padding)"
        )


def _check_batch(tokens, max_len: int, rt) -> None:
    """ValueError for a batch the step cannot take: shape, length, or a batch the mesh cannot split."""
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"batch['tokens'] must be [B, S + 1] with S >= 1, got shape {tuple(tokens.shape)}")
    if tokens.shape[1] - 1 > max_len:
        raise ValueError(
            f"sequence length {tokens.shape[1] - 1} exceeds max_position_embeddings {max_len} of this config"
        )
    if rt.mesh is not None:
        from sharding.placement import check_batch

        check_batch(int(tokens.shape[0]), rt.mesh, rt.strategy)


def make_train_step(graphdef, tc: TrainConfig):
    """A jitted `train_step(state, batch) -> (state, metrics)` (state donated). Checks the batch shape.
    `train_step.lower(state, batch)` gives the lowered step (to read its HLO or cost analysis).

    When the model's RuntimeConfig carries a mesh, the state is placed by `train_state_shardings`
    and kept there, and the batch (tokens, mask: [B, S + 1]) is split along the strategy's batch axes.
    """
    compiled = {}

    def placed(state: TrainState, batch):
        if not compiled:
            model = nnx.merge(graphdef, state.params, state.frozen)
            compiled.update(rt=model.rt, cfg=model.cfg)
            compiled["step"], compiled["placement"] = _compile(graphdef, tc, model.rt, state)
        batch = _checked_batch(batch, compiled["cfg"], compiled["rt"])
        if compiled["placement"] is not None:
            state_shardings, rows = compiled["placement"]
            state, batch = jax.device_put(state, state_shardings), jax.device_put(dict(batch), rows)
        return state, batch

    def train_step(state: TrainState, batch):
        state, batch = placed(state, batch)  # compiles on the first call
        return compiled["step"](state, batch)

    def lower(state: TrainState, batch):
        """The step lowered for these arguments, as `jax.jit(...).lower` (e.g. `.compile().as_text()`)."""
        state, batch = placed(state, batch)
        return compiled["step"].lower(state, batch)

    train_step.lower = lower
    return train_step


# ------------------------------------------------------------------------------------ checkpoints


def _meta(cfg: ModelConfig, tc: TrainConfig) -> dict:
    return {"model_config": cfg.to_hf_dict(), "train_config": dataclasses.asdict(tc)}


class CheckpointMismatch(ValueError):
    """A readable checkpoint of another model config or other frozen parameters than the run's."""


def _trainable_names(state: TrainState) -> list[str]:
    """The dotted names of the parameters a state trains (those with Adam moments), sorted."""
    return sorted(dotted(path) for path, _ in nnx.to_flat_state(state.params))


def _check_same_trainable(meta: dict, like: TrainState, tc: dict, where: str) -> None:
    """ValueError when the checkpoint trained other parameters than `like` (the state's structure:
    who has Adam moments). Compares the parameters the freeze patterns select, so equivalent globs
    spelled differently are accepted; a checkpoint from before the names were stored compares the
    patterns."""
    saved_freeze = meta.get("train_config", {}).get("freeze", [])
    if "trainable" in meta:
        ours = _trainable_names(like)
        if meta["trainable"] == ours:
            return
        changed = sorted(set(meta["trainable"]) ^ set(ours))
        detail = f" ({len(changed)} parameter(s) differ, e.g. {changed[0]})"
    elif sorted(set(saved_freeze)) == sorted(set(tc["freeze"])):
        return
    else:
        detail = ""
    raise CheckpointMismatch(
        f"checkpoint {where} was trained with freeze {saved_freeze}, not {tc['freeze']}{detail}: "
        "a resume needs the run's frozen parameters (dsv4-train: repeat its --freeze)"
    )


def latest_saved_step(directory: str | os.PathLike) -> int | None:
    """The latest step saved under a Checkpointer's `directory` (None: none, or no directory), read only."""
    import orbax.checkpoint as ocp

    if not os.path.isdir(directory):
        return None
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(os.path.abspath(directory), options=options) as manager:
        return manager.latest_step()


class Checkpointer:
    """Orbax CheckpointManager for a TrainState: `save` every `every` steps, keep the last `keep`."""

    def __init__(
        self, directory: str | os.PathLike, cfg: ModelConfig, tc: TrainConfig, every: int = 100, keep: int = 3
    ):
        import orbax.checkpoint as ocp

        self._ocp, self.cfg, self.tc = ocp, cfg, tc
        self.train_config_changes: dict[str, tuple] = {}  # field -> (checkpoint's, this run's), by restore
        options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def save(self, state: TrainState, force: bool = False) -> bool:
        ocp = self._ocp
        meta = {**_meta(self.cfg, self.tc), "trainable": _trainable_names(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        saved = self.manager.save(int(state.step), args=args, force=force)
        if saved:  # complete on disk before the next step donates (overwrites) the state's buffers
            self.manager.wait_until_finished()
        return saved

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, like: TrainState, step: int | None = None) -> TrainState:
        """Restore into the structure of `like` (e.g. a fresh init_train_state). Refuses another model
        config; another TrainConfig (a changed schedule, other loss weights) is taken as given, and
        `train_config_changes` lists how it differs."""
        ocp = self._ocp
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        want = json.loads(json.dumps(_meta(self.cfg, self.tc)["model_config"]))
        if meta["model_config"] != want:  # first: another config also has other parameter names
            diff = sorted(
                k for k in set(want) | set(meta["model_config"]) if want.get(k) != meta["model_config"].get(k)
            )
            raise CheckpointMismatch(
                f"checkpoint {self.manager.directory}/{step} was written for another model config "
                f"(differs in: {', '.join(diff)})"
            )
        saved_tc, tc = meta.get("train_config", {}), json.loads(json.dumps(dataclasses.asdict(self.tc)))
        _check_same_trainable(meta, like, tc, f"{self.manager.directory}/{step}")
        self.train_config_changes = {k: (saved_tc[k], v) for k, v in tc.items() if saved_tc.get(k, v) != v}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]

    def close(self):
        self.manager.close()
