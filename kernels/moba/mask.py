"""MoBA's visibility as a boolean mask (``sparsezoo.kernels.moba.mask``), for the dense paths.

The oracle (``naive.py``) and the torch path's short-sequence call (``torch_impl.py``) both
attend all T keys under this mask, so it is written once.
Legend: B batch, T time, HQ query heads, R routed slots top_k - 1.
"""

from __future__ import annotations

import torch

from ..block_mask import selected_keys

__all__ = ["moba_mask"]


def moba_mask(block_indices_BTHR: torch.Tensor, block_size: int) -> torch.Tensor:
    """Boolean [B, HQ, T, T]: query t of head h sees key s iff s <= t and s is in t's own block
    or in one of its routed blocks."""
    T = block_indices_BTHR.shape[1]
    device = block_indices_BTHR.device
    block_T = torch.arange(T, device=device) // block_size
    own_TT = block_T[:, None] == block_T[None, :]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    routed_BTHT = selected_keys(block_indices_BTHR, block_size)
    visible_BTHT = (routed_BTHT | own_TT[None, :, None, :]) & causal_TT[:, None]
    return visible_BTHT.permute(0, 2, 1, 3)
