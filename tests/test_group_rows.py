"""Tests of sparsezoo.kernels.group_rows: folding a KV head's query heads into rows, and the
additive band mask of folded calls.

Legend: X leading dim, S queries, HQ query heads, H KV heads, G group size, D head dim.
"""

from __future__ import annotations

import torch

from sparsezoo.kernels.group_rows import fold_group_rows, folded_band_mask, unfold_group_rows


def test_fold_puts_each_kv_heads_rows_together_and_unfold_inverts_it() -> None:
    """Row t·G + g of KV head h is query head h·G + g of query t; a view for one KV head or
    one query head per KV head, a copy otherwise; unfold restores the input exactly."""
    X, S, HQ, D = 2, 3, 6, 4
    x_XSHD = torch.randn(X, S, HQ, D)
    for H in (1, 2, 6):
        G = HQ // H
        y_XHYD = fold_group_rows(x_XSHD, H)
        assert y_XHYD.shape == (X, H, S * G, D)
        for h, t, g in ((0, 0, 0), (H - 1, S - 1, G - 1), (H // 2, 1, G // 2)):
            assert torch.equal(y_XHYD[:, h, t * G + g], x_XSHD[:, t, h * G + g])
        shares = y_XHYD.data_ptr() == x_XSHD.data_ptr()
        assert shares == (H == 1 or G == 1)
        assert torch.equal(unfold_group_rows(y_XHYD, S), x_XSHD)


def test_band_mask_of_folded_rows() -> None:
    """Row t·G + g sees exactly the columns t + first .. t + last (0), others -inf."""
    mask_YK = folded_band_mask(3, 2, 5, -1, 1, torch.float32, torch.device("cpu"))
    inf = float("-inf")
    expected_SK = torch.tensor(
        [
            [0.0, 0.0, inf, inf, inf],
            [0.0, 0.0, 0.0, inf, inf],
            [inf, 0.0, 0.0, 0.0, inf],
        ]
    )
    assert mask_YK.shape == (6, 5)
    assert torch.equal(mask_YK, expected_SK.repeat_interleave(2, dim=0))
    assert folded_band_mask(2, 1, 3, 0, 0, torch.bfloat16, torch.device("cpu")).dtype == (
        torch.bfloat16
    )
