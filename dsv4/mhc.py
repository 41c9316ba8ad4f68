"""Manifold-constrained hyper-connections (mHC): n residual streams mixed around every sub-block.

All arithmetic here is float32 (architecture.md s6); `hc_eps` and `rms_norm_eps` are distinct.
Letters: B batch, S sequence, N streams (hc_mult), D hidden.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4.config import ModelConfig
from dsv4.layers import F32, inv_rms
from dsv4.params import KeyChain, constant, normal, param
from dsv4.probes import record


def sinkhorn(comb: jax.Array, iters: int, eps: float) -> jax.Array:
    """Doubly-stochastic projection of [..., N, N] (rows = input stream j, cols = output stream k).

    Column-normalise once, then (iters - 1) times rows then columns, each with `+ eps`. Runs with the
    N x N axes leading and the tokens last ([N, N, M]), so every sum and division works on contiguous
    token vectors: XLA:CPU took 13 ms for the forward + backward of 1,024 tokens' [4, 4] matrices in
    the [..., N, N] layout (its small reductions over the last axes), 0.9 ms in this one.
    """
    lead, n = comb.shape[:-2], comb.shape[-1]
    c = jnp.moveaxis(comb.reshape(-1, n, n), 0, -1)  # [N (j), N (k), M]

    def cols(c):  # sum over the input streams j
        return c / (jnp.sum(c, axis=0, keepdims=True) + eps)

    def rows(c):  # sum over the output streams k
        return c / (jnp.sum(c, axis=1, keepdims=True) + eps)

    c = jax.lax.fori_loop(0, iters - 1, lambda _, c: cols(rows(c)), cols(c))
    return jnp.moveaxis(c, -1, 0).reshape(*lead, n, n)


def _mix_logits(streams: jax.Array, fn: jax.Array, eps: float) -> jax.Array:
    """rms(flatten(streams)) @ fn.T : [B, S, N, D] -> [B, S, rows of fn], float32.

    The norm's per-token scale is applied to the [B, S, rows] product rather than to the [B, S, N*D]
    input (the order of the mHC paper's equations): the normalised copy of the streams is never written.
    """
    flat = streams.reshape(*streams.shape[:-2], -1).astype(F32)
    return jnp.einsum("bsm,rm->bsr", flat, fn.astype(F32)) * inv_rms(flat, eps)


def collapse(streams: jax.Array, pre: jax.Array) -> jax.Array:
    """sum_s pre[s] * streams[s]: [B, S, N, D], [B, S, N] -> [B, S, D] in the streams' dtype."""
    return jnp.einsum("bsn,bsnd->bsd", pre, streams.astype(F32)).astype(streams.dtype)


class HyperConnection(nnx.Module):
    """mHC around one sub-block: `pre` collapses streams to the block input, `post`/`comb` expand back."""

    def __init__(self, cfg: ModelConfig, keys: KeyChain):
        self.cfg = cfg
        n, d = cfg.hc_mult, cfg.hidden_size
        self.fn = param(keys, ((2 + n) * n, n * d), ("hc_mix", "hc_embed"), F32, normal(0.02))
        self.base = param(keys, ((2 + n) * n,), ("hc_mix",), F32, constant(0.0))
        self.scale = param(keys, (3,), (None,), F32, constant(1.0))

    def weights(self, streams: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """pre [B,S,N], post [B,S,N], comb [B,S,N,N] (comb[j, k]: input stream j -> output k)."""
        cfg, n = self.cfg, self.cfg.hc_mult
        mix = _mix_logits(streams, self.fn.get_value(), cfg.rms_norm_eps)
        base, scale = self.base.get_value(), self.scale.get_value()
        pre = jax.nn.sigmoid(mix[..., :n] * scale[0] + base[:n]) + cfg.hc_eps
        post = 2 * jax.nn.sigmoid(mix[..., n : 2 * n] * scale[1] + base[n : 2 * n])
        comb = mix[..., 2 * n :] * scale[2] + base[2 * n :]
        comb = jax.nn.softmax(comb.reshape(*comb.shape[:-1], n, n), axis=-1) + cfg.hc_eps
        comb = sinkhorn(comb, cfg.hc_sinkhorn_iters, cfg.hc_eps)
        for name, value in (("pre", pre), ("post", post), ("comb", comb)):
            record(self, name, value)
        return pre, post, comb

    @staticmethod
    def expand(block_out: jax.Array, streams: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
        """new[k] = post[k] * block_out + sum_j comb[j, k] * streams[j]  (comb applied transposed).

        The post term is an einsum too: as a broadcast multiply, its gradient for block_out was a sum
        over the stream axis that XLA:CPU ran 3x slower (forward + backward of one expand at 1,024
        tokens: 20.7 -> 6.6 ms); the values are the same products.
        """
        mixed = jnp.einsum("bsjk,bsjd->bskd", comb, streams.astype(F32))
        spread = jnp.einsum("bsk,bsd->bskd", post, block_out.astype(F32))
        return (spread + mixed).astype(streams.dtype)


class HyperHead(nnx.Module):
    """Final collapse of the N streams to one (no Sinkhorn): `hc_head_fn/base/scale` in the release."""

    def __init__(self, cfg: ModelConfig, keys: KeyChain):
        self.cfg = cfg
        n, d = cfg.hc_mult, cfg.hidden_size
        self.fn = param(keys, (n, n * d), ("hc_stream", "hc_embed"), F32, normal(0.02))
        self.base = param(keys, (n,), ("hc_stream",), F32, constant(0.0))
        self.scale = param(keys, (1,), (None,), F32, constant(1.0))

    def __call__(self, streams: jax.Array) -> jax.Array:
        """[B, S, N, D] -> [B, S, D]."""
        mix = _mix_logits(streams, self.fn.get_value(), self.cfg.rms_norm_eps)
        pre = jax.nn.sigmoid(mix * self.scale.get_value()[0] + self.base.get_value()) + self.cfg.hc_eps
        record(self, "pre", pre)
        return collapse(streams, pre)
