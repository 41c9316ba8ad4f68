"""XLA:CPU settings dsv4's programs (the console scripts, the benchmarks) choose before JAX starts.

XLA:CPU hands some fusions (reductions, small dots) to YNNPACK. For this model that is slower: on
the 2-core CI machine, paired runs with YNNPACK fusions off gave a train step of 0.89-1.09 s
against 1.11-1.29 s, a forward at S = 4096 of 1.15-1.33 s against 1.38-1.43 s, a prefill at 8K x 8
of ~3,000 against ~2,300 tokens/s; single reductions such as Sinkhorn's backward ran 20x slower
through YNNPACK. (Batch-8 decode steps are the exception: 15-16 ms against 12-14 ms; batch-1
decode is unchanged. `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+reduce` keeps XLA's
defaults.) The library itself never touches the environment: programs call
`prefer_plain_cpu_fusions()` first thing, and library users can set the same flag themselves.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

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
