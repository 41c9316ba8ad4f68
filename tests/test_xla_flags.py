"""dsv4.xla_flags: the XLA:CPU flag the console scripts set, and that this jaxlib accepts it."""

import os
import subprocess
import sys

from dsv4 import xla_flags


def test_adds_the_flag_and_keeps_other_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_flags.prefer_plain_cpu_fusions(env)
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {xla_flags.NO_YNN_FUSIONS}"
    empty: dict[str, str] = {}
    assert xla_flags.prefer_plain_cpu_fusions(empty) and empty["XLA_FLAGS"] == xla_flags.NO_YNN_FUSIONS


def test_leaves_an_explicit_choice_and_unknown_jaxlib_alone(monkeypatch):
    env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=kReduce"}
    assert not xla_flags.prefer_plain_cpu_fusions(env)
    assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=kReduce"
    monkeypatch.setattr(xla_flags, "_jaxlib_minor", lambda: (0, 99))
    env = {}
    assert not xla_flags.prefer_plain_cpu_fusions(env) and env == {}


def _run_jax(flags: str) -> subprocess.CompletedProcess:
    code = "import jax.numpy as jnp; print(float(jnp.arange(4.0).sum()))"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_this_jaxlib_accepts_the_flag():
    """XLA aborts on an unknown flag (the control below); the one we set must run. On a jaxlib not
    known to accept it, the flag is not set at all."""
    if xla_flags._jaxlib_minor() not in xla_flags.KNOWN_JAXLIB:
        assert not xla_flags.prefer_plain_cpu_fusions({})
        return
    ok = _run_jax(xla_flags.NO_YNN_FUSIONS)
    assert ok.returncode == 0 and ok.stdout.strip() == "6.0", ok.stderr[-500:]
    bad = _run_jax("--xla_no_such_flag_for_dsv4=1")
    assert bad.returncode != 0 and "Unknown flag" in bad.stderr


def _ynn_fusions(flags: str) -> int:
    """`ynn_fusion` instructions in the optimized HLO of a row reduction, compiled under `flags`."""
    code = (
        "import jax, jax.numpy as jnp\n"
        "f = jax.jit(lambda x: (x / x.sum(-1, keepdims=True)).sum(-2))\n"
        "print(f.lower(jnp.ones((4096, 4, 4))).compile().as_text().count('%ynn_fusion'))"
    )
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    return int(out.stdout.strip().splitlines()[-1])


def test_the_flag_takes_the_ynnpack_fusions_out():
    """The flag is not a no-op (XLA's own --help text calls the default list empty): XLA:CPU's
    default compilation of a reduction has YNNPACK fusions, compilation under the flag has none."""
    if xla_flags._jaxlib_minor() not in xla_flags.KNOWN_JAXLIB:
        assert not xla_flags.prefer_plain_cpu_fusions({})
        return
    assert _ynn_fusions("") > 0
    assert _ynn_fusions(xla_flags.NO_YNN_FUSIONS) == 0
