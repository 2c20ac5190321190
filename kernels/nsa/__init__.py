"""NSA kernels (``sparsezoo.kernels.nsa``): the functional ops of Native Sparse Attention.

- ``compress_kv``: the learnable block compressor phi (Eq. 7);
- ``compressed_attention``: attention over the compressed tokens with the exact causal
  visibility rule, returning the output and the log-sum-exp that selection reuses;
- ``select_blocks`` / ``topn_blocks`` / ``overlap_weights`` / ``block_importance``: Eq. 9
  overlap mapping, GQA group sum of probabilities, forced initial and local blocks, legal-block
  rule, top-n, -1 padding;
- ``compressed_select``: compressed attention and block selection in one pass over the scores
  (what the mechanism calls);
- ``selected_attention``: attention over the selected blocks, shared by a GQA group;
- ``sliding_window_attention``: the project's one window definition (re-exported);
- ``gated_branches``: the three branches and their sigmoid gate (Eq. 5) in one op, what the
  mechanism's prefill calls; its CPU path keeps no selection or window output for backward.
Each op has a ``naive`` oracle, a fast ``torch`` path and ``triton`` kernels (``topn_blocks``,
``overlap_weights`` and ``block_importance`` are small torch helpers). Layout [B, T, H, D].
"""

from ..window import sliding_window_attention
from .compressed_select import compressed_select
from .compression import compress_kv, compressed_attention
from .gated import NSAKnobs, gated_branches
from .select import block_importance, overlap_weights, select_blocks, topn_blocks
from .selection import selected_attention

__all__ = [
    "NSAKnobs",
    "block_importance",
    "compress_kv",
    "compressed_attention",
    "compressed_select",
    "gated_branches",
    "overlap_weights",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
    "topn_blocks",
]
