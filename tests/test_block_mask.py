"""Tests of sparsezoo.kernels.block_mask: a block list expanded to one flag per key."""

from __future__ import annotations

import torch

from sparsezoo.kernels.block_mask import selected_keys


def test_selected_keys_hand_example() -> None:
    """T = 7, blocks of 3 (the last one short): blocks 0 and 2 cover keys 0-2 and 6, block 1
    alone keys 3-5, -1 slots select nothing, and there is no causal cut."""
    idx_BTHS = torch.tensor([[0, 2], [1, -1], [-1, -1]]).view(1, 1, 3, 2).expand(1, 7, 3, 2)
    mask_BTHT = selected_keys(idx_BTHS, 3)
    assert mask_BTHT.shape == (1, 7, 3, 7) and mask_BTHT.dtype == torch.bool
    assert mask_BTHT[0, 0, 0].tolist() == [True, True, True, False, False, False, True]
    assert mask_BTHT[0, 0, 1].tolist() == [False, False, False, True, True, True, False]
    assert not mask_BTHT[0, :, 2].any()
    assert torch.equal(mask_BTHT[0, 6], mask_BTHT[0, 0])
