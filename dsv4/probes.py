"""Look inside a forward pass: indexer selections, compressed KV, expert routing, mHC mixing.

`probe(model, tokens)` runs the jitted whole-sequence forward once more with probes on and returns
the logits together with what every layer computed on the way, as a flat dict of arrays keyed by
the module path and the probe's name:

    logits, seen = dsv4.probe(model, tokens)          # tokens int32 [B, S]
    seen["layers.2.attn.topk"]                        # CSA: entries [B, S, min(index_topk, S // 4)], ascending, -1 last
    seen["layers.2.attn.compressed_kv"]               # CSA/HCA: compressed entries [B, S // m, head_dim]
    seen["layers.0.ffn.expert_ids"]                   # routed experts per token [B, S, K] (hash or top-k)
    seen["layers.0.ffn.expert_weights"]               # their weights [B, S, K] float32
    seen["layers.0.hc_attn.comb"]                     # mHC: pre [B, S, N], post [B, S, N], comb [B, S, N, N]
    seen["hc_head.pre"]                               # the final collapse's weights [B, S, N]

Modules record with `record(self, name, value)`, which does nothing unless `probe` is tracing:
the plain `forward`, decoding and training compile exactly as without probes (nothing recorded,
nothing kept alive). Inside `probe` the values are collected with `nnx.capture`.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
from flax import nnx

from dsv4.xla_flags import jit_whole_sequence

_PROBING = contextvars.ContextVar("dsv4_probing", default=False)


class Probe(nnx.Intermediate):
    """A value recorded by `record` while `probe` traces the forward."""


def record(module: nnx.Module, name: str, value) -> None:
    """Record `value` as `name` of `module` when `probe` is tracing; otherwise do nothing."""
    if _PROBING.get():
        module.sow(Probe, name, value, reduce_fn=lambda _, new: new, init_fn=lambda: None)


@contextlib.contextmanager
def _probing():
    token = _PROBING.set(True)
    try:
        yield
    finally:
        _PROBING.reset(token)


@jit_whole_sequence()  # compiled as the forward is, so its logits are the forward's
def _probe(model, tokens):
    with _probing():
        logits, probes = nnx.capture(model, Probe)(tokens)
    return logits, {".".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(probes)}


def probe(model, tokens) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The model's logits for `tokens` [B, S] and every probe of the forward, keyed "path.name".

    The logits are those of `dsv4.forward` (the same computation, compiled separately). Shapes are
    listed in this module's docstring; a probe exists only for the layers that compute it (`topk` on
    CSA layers, `compressed_kv` on CSA and HCA layers).
    """
    from dsv4.model import whole_sequence_tokens  # dsv4.model imports this module

    return _probe(model, whole_sequence_tokens(model, tokens))
