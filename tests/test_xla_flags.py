"""dsv4.xla_flags: the XLA:CPU flag the console scripts set (that this jaxlib accepts it, and that it
leaves exactly the dots to YNNPACK), reading a user's own setting, and the persistent compilation cache."""

import os
import re
import subprocess
import sys
import warnings

import pytest

from dsv4 import xla_flags


def test_adds_the_flag_and_keeps_other_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_flags.prefer_plain_cpu_fusions(env)
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {xla_flags.YNN_DOTS_ONLY}"
    empty: dict[str, str] = {}
    assert xla_flags.prefer_plain_cpu_fusions(empty) and empty["XLA_FLAGS"] == xla_flags.YNN_DOTS_ONLY
    assert not xla_flags.ynn_dots_off(empty)


def test_leaves_an_explicit_choice_and_unknown_jaxlib_alone(monkeypatch):
    keeps_dots = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=+reduce"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not xla_flags.prefer_plain_cpu_fusions(keeps_dots)
    assert keeps_dots["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=+reduce"
    no_dots = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}
    with pytest.warns(RuntimeWarning, match="takes XLA:CPU's dots away from YNNPACK"):
        assert not xla_flags.prefer_plain_cpu_fusions(no_dots)
    assert no_dots["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: (0, 99))
    env = {}
    assert not xla_flags.prefer_plain_cpu_fusions(env) and env == {}


@pytest.mark.parametrize(
    "flags, off",
    [
        ("", False),  # XLA's defaults keep the dots with YNNPACK
        ("--xla_force_host_platform_device_count=2", False),
        ("--xla_cpu_experimental_ynn_fusion_type=", True),  # every YNNPACK fusion off
        ("--xla_cpu_experimental_ynn_fusion_type=reduce", True),  # a list without a dot kind
        ("--xla_cpu_experimental_ynn_fusion_type=dot", False),
        ("--xla_cpu_experimental_ynn_fusion_type=reduce,individual_dot", False),
        ("--xla_cpu_experimental_ynn_fusion_type=+reduce", False),  # changes keep the default dots
        ("--xla_cpu_experimental_ynn_fusion_type=-reduce", False),
        ("--xla_cpu_experimental_ynn_fusion_type=-individual_dot", True),
        ("--xla_cpu_experimental_ynn_fusion_type=dot --xla_cpu_experimental_ynn_fusion_type=", True),  # the last wins
        ("--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_ynn_fusion_type=dot", False),
    ],
)
def test_ynn_dots_off_reads_the_last_setting(flags, off):
    assert xla_flags.ynn_dots_off({"XLA_FLAGS": flags}) is off


def _run_jax(flags: str) -> subprocess.CompletedProcess:
    code = "import jax.numpy as jnp; print(float(jnp.arange(4.0).sum()))"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_this_jaxlib_accepts_the_flag():
    """XLA aborts on an unknown flag (the control below); the one we set must run. On a jaxlib not
    known to accept it, the flag is not set at all."""
    if xla_flags._jaxlib_version() not in xla_flags.KNOWN_JAXLIB:
        assert not xla_flags.prefer_plain_cpu_fusions({})
        return
    ok = _run_jax(xla_flags.YNN_DOTS_ONLY)
    assert ok.returncode == 0 and ok.stdout.strip() == "6.0", ok.stderr[-500:]
    bad = _run_jax("--xla_no_such_flag_for_dsv4=1")
    assert bad.returncode != 0 and "Unknown flag" in bad.stderr


REDUCTION = "lambda x: (x / x.sum(-1, keepdims=True)).sum(-2)"  # row sums of [4096, 4, 4]
PRODUCT = "lambda x: x.reshape(4096, 16) @ x.reshape(16, 4096)"  # a [4096, 16] x [16, 4096] dot


def _ynn_fusions(flags: str, program: str) -> int:
    """`ynn_fusion` instructions in the optimized HLO of `program` on [4096, 4, 4], compiled under `flags`."""
    code = (
        "import jax, jax.numpy as jnp\n"
        f"f = jax.jit({program})\n"
        "print(f.lower(jnp.ones((4096, 4, 4))).compile().as_text().count('%ynn_fusion'))"
    )
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    return int(out.stdout.strip().splitlines()[-1])


def test_the_flag_leaves_exactly_the_dots_to_ynnpack():
    """The flag is not a no-op (XLA's own --help text calls the default list empty): XLA:CPU's
    default compilation gives a reduction and a dot to YNNPACK; under the flag only the dot goes
    there. Every YNNPACK fusion off (the setting of the wrong-logits issue) takes the dot too."""
    if xla_flags._jaxlib_version() not in xla_flags.KNOWN_JAXLIB:
        assert not xla_flags.prefer_plain_cpu_fusions({})
        return
    assert _ynn_fusions("", REDUCTION) > 0 and _ynn_fusions("", PRODUCT) > 0
    assert _ynn_fusions(xla_flags.YNN_DOTS_ONLY, REDUCTION) == 0
    assert _ynn_fusions(xla_flags.YNN_DOTS_ONLY, PRODUCT) > 0
    assert _ynn_fusions(f"{xla_flags.YNN_FLAG}=", PRODUCT) == 0


# ------------------------------------------------------------------------ persistent compile cache


@pytest.fixture
def no_jax_cache_dir():
    """Leave jax.config's cache directory as the test found it (unset: conftest turns the cache off)."""
    import jax

    before = jax.config.jax_compilation_cache_dir
    assert before is None
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def test_compile_cache_directory_choice(tmp_path, no_jax_cache_dir):
    import jax

    assert xla_flags.enable_compile_cache({"DSV4_COMPILE_CACHE": "off"}) is None
    assert xla_flags.enable_compile_cache({"DSV4_COMPILE_CACHE": ""}) is None
    assert jax.config.jax_compilation_cache_dir is None
    assert xla_flags.default_compile_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "dsv4" / "jax"
    got = xla_flags.enable_compile_cache({"XDG_CACHE_HOME": str(tmp_path / "xdg")})  # the default place
    assert got == str(tmp_path / "xdg" / "dsv4" / "jax") == jax.config.jax_compilation_cache_dir
    assert (tmp_path / "xdg" / "dsv4" / "jax").is_dir()
    # a directory JAX was already given wins over DSV4_COMPILE_CACHE
    assert xla_flags.enable_compile_cache({"DSV4_COMPILE_CACHE": str(tmp_path / "other")}) == got
    assert not (tmp_path / "other").exists()


def test_remote_compile_cache_is_handed_to_jax(tmp_path, monkeypatch, no_jax_cache_dir):
    import jax

    monkeypatch.chdir(tmp_path)
    assert xla_flags.enable_compile_cache({"DSV4_COMPILE_CACHE": "gs://bucket/dsv4"}) == "gs://bucket/dsv4"
    assert jax.config.jax_compilation_cache_dir == "gs://bucket/dsv4"
    assert not list(tmp_path.iterdir())  # no local "gs:" directory


def test_unwritable_compile_cache_warns_and_runs_without(tmp_path, no_jax_cache_dir):
    import jax

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="DSV4_COMPILE_CACHE: cannot create"):
        assert xla_flags.enable_compile_cache({"DSV4_COMPILE_CACHE": str(blocker / "cache")}) is None
    assert jax.config.jax_compilation_cache_dir is None


def _generate(env_changes: dict) -> tuple[list[str], str]:
    """dsv4-generate in a fresh process: (the generated text's lines, stderr with JAX's compile log)."""
    code = "import sys; from dsv4.cli import generate_main; sys.exit(generate_main(sys.argv[1:]))"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_LOG_COMPILES": "1", **env_changes}  # fmt: skip
    cmd = [sys.executable, "-c", code, "--prompt", "Hello", "--max-new-tokens", "4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [line for line in proc.stdout.splitlines() if not line.startswith("[")], proc.stderr


def test_dsv4_generate_fills_the_compile_cache_and_reuses_it(tmp_path):
    cache = tmp_path / "cache"
    first, log = _generate({"DSV4_COMPILE_CACHE": str(cache)})
    entries = sorted(p.name for p in cache.iterdir())
    assert any("prefill" in name for name in entries) and any("decode" in name for name in entries), entries
    assert "Persistent compilation cache hit for 'jit__prefill_program'" not in log
    second, log = _generate({"DSV4_COMPILE_CACHE": str(cache)})
    for program in ("jit__prefill_program", "jit__decode_program"):
        assert f"Persistent compilation cache hit for '{program}'" in log, log[-3000:]
    assert second == first
    assert sorted(p.name for p in cache.iterdir()) == entries
    _generate({"DSV4_COMPILE_CACHE": "off", "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert not (tmp_path / "xdg").exists()


# ------------------------------------------------------------------------ whole-sequence programs


@pytest.mark.parametrize(
    "flags, passes",
    [
        ("", "tree_reduction_rewriter"),
        ("--xla_force_host_platform_device_count=2", "tree_reduction_rewriter"),
        ("--xla_disable_hlo_passes=foo,bar", "foo,bar,tree_reduction_rewriter"),  # the user's list is kept
        ("--xla_disable_hlo_passes=a --xla_disable_hlo_passes=tree_reduction_rewriter", "tree_reduction_rewriter"),
    ],
)
def test_whole_sequence_options_keep_the_users_disabled_passes(flags, passes):
    assert xla_flags.whole_sequence_cpu_options({"XLA_FLAGS": flags}) == {"xla_disable_hlo_passes": passes}


def test_the_forward_compiles_without_the_tree_reduction_rewrite():
    """On CPU, dsv4's forward and prefill programs compile without XLA's tree-reduction rewrite: none
    of its reduce-windows (32-wide, stride 32) in the optimized forward, where the same function under
    plain `jax.jit` has them (the control). Parity with transformers under this setting:
    tests/test_parity.py, which runs it."""
    import jax
    import jax.numpy as jnp

    import dsv4
    from dsv4 import model
    from dsv4.config import ModelConfig
    from dsv4.generate import _prefill_program
    from dsv4.probes import _probe

    assert jax.default_backend() == "cpu"
    net = dsv4.init_model(ModelConfig.tiny(), seed=0)
    tokens = jnp.zeros((1, 300), jnp.int32)

    def tree_reductions(jitted) -> int:
        text = jitted.lower(net, tokens).compile().as_text()
        return len(re.findall(r"reduce-window\(.*window=\{size=[\dx]*32 stride=", text))

    assert tree_reductions(jax.jit(model._forward.__wrapped__)) > 0
    assert tree_reductions(model._forward) == 0
    for program in (model._forward, model._forward_with_mtp, _prefill_program, _probe):
        assert isinstance(program, xla_flags.WholeSequenceJit)


def test_whole_sequence_programs_run_inside_a_callers_jit_and_grad():
    """A notebook's own `jax.jit(lambda t: dsv4.forward(model, t))` (and `grad` or `vmap` around the
    forward) traces the program as a plain nested jit: JAX refuses compile options below the top
    level. The float32 logits equal the forward's own call to rounding (in bfloat16 a different
    fusion moves the roundings, and with them the discrete top-k choices)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import dsv4
    from dsv4 import model
    from dsv4.config import ModelConfig, RuntimeConfig

    net = dsv4.init_model(ModelConfig.tiny(), RuntimeConfig(dtype="float32"), seed=0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, net.cfg.vocab_size, (1, 40)), jnp.int32)
    direct = dsv4.forward(net, tokens)
    nested = jax.jit(lambda t: dsv4.forward(net, t))(tokens)
    np.testing.assert_allclose(np.asarray(nested), np.asarray(direct), rtol=0, atol=2e-6)
    mapped = jax.vmap(lambda t: dsv4.forward(net, t[None])[0])(tokens)
    np.testing.assert_allclose(np.asarray(mapped), np.asarray(direct), rtol=0, atol=2e-6)
    graphdef, state = nnx.split(net)

    def last_logit(state):  # through the program itself, with traced weights
        return model._forward(nnx.merge(graphdef, state), tokens)[0, -1, 0]

    grad = jax.grad(last_logit, allow_int=True)(state)["embed"]["weight"].get_value()  # tid2eid is int
    assert grad.shape == (net.cfg.vocab_size, net.cfg.hidden_size) and bool(jnp.any(grad != 0))
    assert not bool(jnp.any(grad[np.setdiff1d(np.arange(net.cfg.vocab_size), np.asarray(tokens))] != 0))
