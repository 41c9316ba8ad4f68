"""XLA:CPU settings dsv4's programs (the console scripts, the benchmarks) choose before JAX starts.

XLA:CPU hands some fusions (reductions, small dots) to YNNPACK. For this model that is slower: on
the 2-core CI machine, paired runs with YNNPACK fusions off gave a train step of 0.89-1.09 s
against 1.11-1.29 s, a forward at S = 4096 of 1.15-1.33 s against 1.38-1.43 s, a prefill at 8K x 8
of ~3,000 against ~2,300 tokens/s; single reductions such as Sinkhorn's backward ran 20x slower
through YNNPACK. (Batch-8 decode steps are the exception: 15-16 ms against 12-14 ms; batch-1
decode is unchanged. `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+reduce` keeps XLA's
defaults.) The library itself never touches the environment: programs call
`prefer_plain_cpu_fusions()` first thing, and library users can set the same flag themselves.

The console scripts also keep their compiled programs across runs (`enable_compile_cache`: JAX's
persistent compilation cache, in ~/.cache/dsv4/jax unless DSV4_COMPILE_CACHE says otherwise):
compiling is most of a short run's time (the README's "Compile time", `scripts/bench_compile.py`).
`program_defaults()` applies both settings.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import MutableMapping
from pathlib import Path

NO_YNN_FUSIONS = "--xla_cpu_experimental_ynn_fusion_type="
# jaxlib releases whose XLA knows the flag (seen: 0.10.2, 0.11.2). XLA aborts the process on an
# unknown flag in XLA_FLAGS, so other releases are left alone.
KNOWN_JAXLIB = ((0, 10), (0, 11))


def _jaxlib_minor() -> tuple[int, int] | None:
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
    """Turn XLA:CPU's YNNPACK fusions off for this process (adds NO_YNN_FUSIONS to XLA_FLAGS).

    Does nothing when XLA_FLAGS already chooses a YNNPACK fusion setting or the jaxlib release is
    not one known to accept the flag. Takes effect only if JAX's CPU backend has not started yet;
    GPU and TPU backends ignore it. Returns whether the flag was added.
    """
    flags = environ.get("XLA_FLAGS", "")
    if "ynn_fusion_type" in flags or _jaxlib_minor() not in KNOWN_JAXLIB:
        return False
    environ["XLA_FLAGS"] = f"{flags} {NO_YNN_FUSIONS}".strip()
    return True


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
