"""Per-key mask of a block selection, shared by the dense oracles and masked paths of the kernels.

NSA's selection and MoBA's routing both name key blocks per (batch, query, head) row with -1
for an unused slot; their reference paths expand that list to one flag per key.
Legend: B batch, T time, H heads of the index, S slots, N blocks ceil(T / block_size).
"""

from __future__ import annotations

import torch

__all__ = ["selected_keys"]


def selected_keys(block_indices_BTHS: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, T, H, T] bool: key s lies in one of the blocks listed for row (b, t, h).

    Block j holds keys [j·block_size, (j+1)·block_size); -1 slots select nothing. No causal
    mask: callers intersect with their own. O(B·H·T²) memory.
    """
    B, T, H, _ = block_indices_BTHS.shape
    N = -(-T // block_size)
    device = block_indices_BTHS.device
    # selected_BTHN[b, t, h, j]: block j is in row (b, t, h); the extra column N swallows the -1s
    slot_BTHS = torch.where(block_indices_BTHS < 0, N, block_indices_BTHS)
    selected_BTHN = torch.zeros(B, T, H, N + 1, dtype=torch.bool, device=device)
    selected_BTHN = selected_BTHN.scatter(-1, slot_BTHS, True)[..., :N]
    return selected_BTHN[..., torch.arange(T, device=device) // block_size]
