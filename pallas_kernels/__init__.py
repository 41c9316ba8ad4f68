"""Pallas kernels for dsv4's sparse compressed attention, each with a pure-jnp reference beside it.

- `sparse_attention`: chunk form (the whole-sequence forward is a chunk at start 0), the same
  positional arguments as `dsv4.attention.sparse_attention`, plus an optional fused inverse RoPE.
- `sparse_attention_decode`: one query per sequence against a window ring buffer and entries.
- `indexer_topk`: lightning-indexer scores with a streaming top-k, the arguments of
  `dsv4.attention.indexer_topk` (without its `block`).

Every op takes `backend=None | "gpu" | "tpu" | "reference"` (None: chosen from
`jax.default_backend()`, the reference on anything but GPU and TPU) and `interpret=` (run the
kernel in the Pallas interpreter, e.g. on CPU), and a frozen `*Blocks` dataclass of block sizes
with per-backend defaults. The attention kernels differentiate through their reference (custom
VJP); the top-k has no gradient. Details in each module's docstring.
"""

from pallas_kernels.indexer_topk import IndexerTopkBlocks, indexer_topk, indexer_topk_reference
from pallas_kernels.sparse_attention import (
    SparseAttentionBlocks,
    sparse_attention,
    sparse_attention_decode,
    sparse_attention_decode_reference,
    sparse_attention_reference,
)

__all__ = [
    "IndexerTopkBlocks",
    "SparseAttentionBlocks",
    "indexer_topk",
    "indexer_topk_reference",
    "sparse_attention",
    "sparse_attention_decode",
    "sparse_attention_decode_reference",
    "sparse_attention_reference",
]
