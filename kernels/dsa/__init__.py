"""DSA kernels (``sparsezoo.kernels.dsa``): the functional ops of DeepSeek Sparse Attention.

- ``indexer_scores``: lightning-indexer scores I(t, s) = scale · sum_j w(t, j) ReLU(q_j(t) · k(s)),
  dense over the causal keys or at given index slots, differentiable (the indexer's KL loss);
- ``indexer_topk``: the top-k keys of every query after the causal mask, -1 padded, ties to
  the later key, computed by query chunks (never a [T, T] score matrix in the torch path);
- ``indexer_kl``: the sparse stage's KL(attention slot probabilities || softmax(indexer scores))
  over each query's selected slots, summed over rows, fused per query chunk in the torch path;
- ``sparse_attention``: attention over each query's selected keys, one key set shared by all
  heads or one per KV head, optionally returning the slot probabilities (the KL target).
Each op has a ``naive`` oracle, a fast ``torch`` path and a ``triton`` path. Queries are the
last T of the S keys, so prefill and decoding use the same ops. Layout [B, T, H, D].
"""

from .attention import sparse_attention
from .indexer import default_index_scale, indexer_scores, indexer_topk
from .kl import indexer_kl, kl_rows

__all__ = [
    "default_index_scale",
    "indexer_kl",
    "indexer_scores",
    "indexer_topk",
    "kl_rows",
    "sparse_attention",
]
