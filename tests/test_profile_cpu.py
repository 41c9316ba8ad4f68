"""scripts/profile_cpu.py reads XLA's optimized HLO text: instructions to dsv4 source lines through
its stack-frame tables, and loops as containers. A change of that text format fails here."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from profile_cpu import containers, source_lines  # noqa: E402

from dsv4 import layers  # noqa: E402


def test_instructions_map_to_dsv4_source_lines_and_loops_are_containers():
    def program(x, w):
        return jax.lax.fori_loop(0, 3, lambda i, a: layers.rms_norm(a @ w, 1e-6), x)

    x = jnp.ones((4, 8), jnp.float32)
    hlo = jax.jit(program).lower(x, jnp.eye(8)).compile().as_text()
    lines = set(source_lines(hlo).values())
    first = inspect.getsourcelines(layers.rms_norm)[1]
    last = first + len(inspect.getsourcelines(layers.rms_norm)[0])
    inv_first = inspect.getsourcelines(layers.inv_rms)[1]
    own = {line for line in lines if line.startswith("dsv4/layers.py:")}
    assert own, lines
    for line in own:
        number, func = int(line.split(":")[1].split()[0]), line.split()[-1]
        assert (func == "rms_norm" and first <= number < last) or (func == "inv_rms" and number > inv_first), line
    assert any(name.startswith("while") for name in containers(hlo))
