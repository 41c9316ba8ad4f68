"""The whole model with attention_impl="pallas" (interpret mode on CPU) equals the XLA path."""

import numpy as np
import pytest

import dsv4
from dsv4.cache import init_cache
from dsv4.decode import decode_step, prefill

TOL = 1e-5


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("ckpt", ["flash_ckpt", "pro_ckpt"])
def test_pallas_forward_and_decode_equal_xla(request, ckpt):
    path, _, cfg = request.getfixturevalue(ckpt)
    xla = dsv4.load_hf(path, dtype="float32", attention_impl="xla")
    pallas = dsv4.load_hf(path, dtype="float32", attention_impl="pallas")
    tokens = np.random.default_rng(7).integers(0, cfg["vocab_size"], (2, 260))
    expected = np.asarray(dsv4.forward(xla, tokens))
    assert rel_err(dsv4.forward(pallas, tokens), expected) <= TOL
    cache = init_cache(pallas.cfg, 2, 260, "float32")
    logits, cache = prefill(pallas, tokens[:, :255], cache)
    steps = [np.asarray(logits)]
    for i in range(255, 260):  # decode across the HCA window edge at 256
        step, cache = decode_step(pallas, tokens[:, i], cache)
        steps.append(np.asarray(step)[:, None])
    assert rel_err(np.concatenate(steps, axis=1), expected) <= TOL
