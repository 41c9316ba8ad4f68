"""XLA:CPU settings dsv4's programs (the console scripts, the benchmarks) choose before JAX starts.

XLA:CPU hands some fusions (reductions, elementwise chains, dots) to YNNPACK. dsv4's programs keep
YNNPACK for the dots only (`YNN_DOTS_ONLY`) and leave the rest to XLA's own emitters:
- Reductions and the like are slower through YNNPACK for this model: on the 2-core CI machine,
  paired runs with every YNNPACK fusion off gave a train step of 0.89-1.09 s against 1.11-1.29 s,
  a forward at S = 4096 of 1.15-1.33 s against 1.38-1.43 s, a prefill at 8K x 8 of ~3,000 against
  ~2,300 tokens/s; single reductions such as Sinkhorn's backward ran 20x slower through YNNPACK.
- Dots must stay with YNNPACK: with every YNNPACK fusion off, XLA:CPU's own dots computed wrong
  values (jaxlib 0.10.2) whenever the process ran other XLA work at the same time: a forward on 2
  host devices, or on one device beside another thread's work, gave wrong logits for the first
  ~96 positions from S = 2,048 (README, "Running on a mesh"; `scripts/check_sharded.py`).

The library itself never touches the environment: programs call `prefer_plain_cpu_fusions()`
first thing, and library users can set the same flag themselves (or keep XLA's defaults, which
also leave the dots with YNNPACK). `ynn_dots_off` tells whether XLA_FLAGS takes them away.

The whole-sequence programs (the forward, the prefill) compile on CPU without XLA's tree-reduction
rewrite, whoever runs them (`jit_whole_sequence`, below): a per-program compile option, not a flag.

The console scripts also keep their compiled programs across runs (`enable_compile_cache`: JAX's
persistent compilation cache, in ~/.cache/dsv4/jax unless DSV4_COMPILE_CACHE says otherwise):
compiling is most of a short run's time (the README's "Compile time", `scripts/bench_compile.py`).
`program_defaults()` applies both settings.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_DOTS_ONLY = f"{YNN_FLAG}=individual_dot"  # YNNPACK runs the dots, XLA's emitters everything else
_DOT_KINDS = ("dot", "individual_dot")  # the flag's names for dot fusions and single dots
# jaxlib releases whose XLA knows the flag (seen: 0.10.2, 0.11.2). XLA aborts the process on an
# unknown flag in XLA_FLAGS, so other releases are left alone.
KNOWN_JAXLIB = ((0, 10), (0, 11))


def _jaxlib_version() -> tuple[int, int] | None:
    try:
        from jaxlib import version
    except ImportError:
        return None
    try:
        major, minor = version.__version__.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def prefer_plain_cpu_fusions(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Leave only the dots to YNNPACK in this process (adds YNN_DOTS_ONLY to XLA_FLAGS).

    Does nothing when XLA_FLAGS already chooses a YNNPACK fusion setting (and warns if that setting
    takes the dots away from YNNPACK: `ynn_dots_off`) or the jaxlib release is not one known to
    accept the flag. Takes effect only if JAX's CPU backend has not started yet; GPU and TPU
    backends ignore it. Returns whether the flag was added.
    """
    flags = environ.get("XLA_FLAGS", "")
    if YNN_FLAG in flags:
        if ynn_dots_off(environ):
            warnings.warn(YNN_DOTS_OFF_WARNING.format(flags=flags), RuntimeWarning, stacklevel=2)
        return False
    if _jaxlib_version() not in KNOWN_JAXLIB:
        return False
    environ["XLA_FLAGS"] = f"{flags} {YNN_DOTS_ONLY}".strip()
    return True


YNN_DOTS_OFF_WARNING = (
    "XLA_FLAGS {flags!r} takes XLA:CPU's dots away from YNNPACK: with jaxlib 0.10.2, XLA's own dots "
    "computed wrong dsv4 logits (S >= 2,048) whenever the process ran other XLA work at the same time "
    f"(several host devices, or another thread). README, 'Running on a mesh'; {YNN_DOTS_ONLY} avoids it."
)


def ynn_dots_off(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether XLA_FLAGS takes XLA:CPU's dots away from YNNPACK (its last YNNPACK setting lists no dot kind).

    Without a setting XLA's defaults hold, and they give the dots to YNNPACK. A list of changes
    ("+reduce", "-individual_dot") keeps the default dots unless it removes one of them.
    """
    settings = re.findall(rf"{YNN_FLAG}=(\S*)", environ.get("XLA_FLAGS", ""))
    if not settings:
        return False
    items = [item.strip().lower() for item in settings[-1].split(",") if item.strip()]
    if items and all(item[0] in "+-" for item in items):  # changes to XLA's default list
        return any(item[1:] in _DOT_KINDS for item in items if item[0] == "-")
    return not any(item.lstrip("+") in _DOT_KINDS for item in items)


COMPILE_CACHE_ENV = "DSV4_COMPILE_CACHE"
_OFF = ("", "0", "off", "false", "no", "none")


def default_compile_cache_dir(environ: MutableMapping[str, str] = os.environ) -> Path:
    """$XDG_CACHE_HOME/dsv4/jax, else ~/.cache/dsv4/jax."""
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dsv4" / "jax"


def enable_compile_cache(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Turn on JAX's persistent compilation cache for this process; returns its directory or None.

    The directory: one the user already gave JAX (JAX_COMPILATION_CACHE_DIR, `jax.config`) is kept;
    else $DSV4_COMPILE_CACHE ("off" or empty turns the cache off; a URL such as gs://bucket/dir
    is handed to JAX as it is); else `default_compile_cache_dir()`. A directory that cannot be
    created gives a warning and no cache, never an error. JAX keys each
    entry by the program, the compile options and XLA_FLAGS, jax and backend versions, so a stale
    entry is never used; in a multi-process run only one process writes. Call it before the first
    compilation (JAX sets the cache up once per process).
    """
    import jax

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    setting = environ.get(COMPILE_CACHE_ENV)
    if setting is not None and setting.strip().lower() in _OFF:
        return None
    if setting and "://" in setting:  # a remote store JAX opens itself (e.g. gs://bucket/dir)
        jax.config.update("jax_compilation_cache_dir", setting)
        return setting
    path = Path(setting).expanduser() if setting else default_compile_cache_dir(environ)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        message = f"{COMPILE_CACHE_ENV}: cannot create {path} ({err}); compiling without a persistent cache"
        warnings.warn(message, stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    return str(path)


def program_defaults() -> None:
    """What dsv4's console scripts set first thing: `prefer_plain_cpu_fusions`, `enable_compile_cache`."""
    prefer_plain_cpu_fusions()
    enable_compile_cache()


# ------------------------------------------------------------------------- whole-sequence programs

# XLA:CPU rewrites every reduction over more than 32 elements into a reduce-window of 32-wide partial
# results plus a reduce of those (its TreeReductionRewriter, for the accuracy of long float sums).
# The reduce-window does not take its producer into its loop, so the producer is written out in full
# first: the indexer's top-k bisection (32 compare-and-count passes over [128, T] per query block)
# wrote and reread a [128, T] int32 array on every pass. Without the rewrite each count is one fused
# loop: the bisection over [128, 4,096] took 0.9-1.3 ms instead of 4.0-4.2 ms, the benchmark forward
# 6% less time at S = 4,096 and 15% less at 16,384 (scripts/PERFORMANCE.md). Decode steps, whose long
# reductions have few rows, were not faster without it, and the train step was unchanged: they keep it.
TREE_REDUCTION_PASS = "tree_reduction_rewriter"
_PASSES_FLAG = "--xla_disable_hlo_passes"


def whole_sequence_cpu_options(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Compile options of the whole-sequence programs on CPU: the HLO passes XLA_FLAGS disables
    (a compile option replaces the flag's list), plus the tree-reduction rewrite."""
    settings = re.findall(rf"{_PASSES_FLAG}=(\S*)", environ.get("XLA_FLAGS", ""))
    names = [name for name in (settings[-1].split(",") if settings else []) if name]
    if TREE_REDUCTION_PASS not in names:
        names.append(TREE_REDUCTION_PASS)
    return {"xla_disable_hlo_passes": ",".join(names)}


class WholeSequenceJit:
    """`jax.jit(fun, **jit_kwargs)`, compiled with `whole_sequence_cpu_options()` when JAX's default
    backend is the CPU (read at each call: GPU and TPU compile as plain `jax.jit`).

    Called while JAX traces (inside a caller's `jax.jit`, `grad` or `vmap`), it is the plain
    `jax.jit`: compile options belong to the outermost program, which the caller compiles.
    """

    def __init__(self, fun: Callable, **jit_kwargs: Any):
        import jax

        functools.update_wrapper(self, fun)
        self._fun, self._kwargs = fun, jit_kwargs
        self._plain = jax.jit(fun, **jit_kwargs)
        self._cpu = None  # made at the first CPU call, when XLA_FLAGS is settled

    def _jitted(self, args: tuple = ()):
        import jax

        if jax.default_backend() != "cpu" or any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
            return self._plain
        if self._cpu is None:
            self._cpu = jax.jit(self._fun, compiler_options=whole_sequence_cpu_options(), **self._kwargs)
        return self._cpu

    def __call__(self, *args, **kwargs):
        return self._jitted((args, kwargs))(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._jitted((args, kwargs)).lower(*args, **kwargs)


def jit_whole_sequence(**jit_kwargs: Any) -> Callable[[Callable], WholeSequenceJit]:
    """Decorator taking `jax.jit`'s keyword arguments and making a `WholeSequenceJit`."""
    return functools.partial(WholeSequenceJit, **jit_kwargs)
