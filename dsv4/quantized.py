"""Weights as the model reads them: plain arrays today; quantized pytrees plug in here.

Every weight the model multiplies with goes through `materialize`, so a weight kept in its
release form (FP8 with block scales, FP4 with group scales) can be dequantized on the fly inside
the jitted forward without the layers knowing.
"""

from __future__ import annotations

import jax


def materialize(value) -> jax.Array:
    """The weight as a dense array in the parameter's layout (identity for plain arrays)."""
    return value
