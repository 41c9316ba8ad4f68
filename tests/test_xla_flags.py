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
