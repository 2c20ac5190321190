"""A KV head's query heads folded into rows, so one flash call sees a GQA group as one head.

aten's CPU flash kernel cuts a head's queries into tiles by their count (32 rows below 192
queries, 64 below 768, else 256). A call over S queries of G query heads that share a KV head
has S rows per head; folded, the KV head has S·G rows, (t, g) in order, so the kernel runs
larger tiles against the same keys. Masks of folded calls index rows as t·G + g
(``folded_band_mask``).
Legend: X any leading dim, S queries, HQ query heads, H KV heads, G group size HQ // H, Y folded
rows S·G, K key columns, r any trailing dims.
"""

from __future__ import annotations

import torch

__all__ = ["fold_group_rows", "folded_band_mask", "unfold_group_rows"]


def fold_group_rows(x_XSHr: torch.Tensor, H: int) -> torch.Tensor:
    """[X, S, HQ, *rest] -> [X, H, S·G, *rest]: each KV head's query rows (t, g) in one run.

    A view when H = 1 or G = 1, else a copy.
    """
    X, S, HQ, *rest = x_XSHr.shape
    x_XHSGr = x_XSHr.reshape(X, S, H, HQ // H, *rest).transpose(1, 2)
    return x_XHSGr.reshape(X, H, S * (HQ // H), *rest)


def unfold_group_rows(x_XHYr: torch.Tensor, S: int) -> torch.Tensor:
    """Inverse of ``fold_group_rows``: [X, H, S·G, *rest] -> [X, S, HQ, *rest]."""
    X, H, Y, *rest = x_XHYr.shape
    x_XSHGr = x_XHYr.reshape(X, H, S, Y // S, *rest).transpose(1, 2)
    return x_XSHGr.reshape(X, S, H * (Y // S), *rest)


def folded_band_mask(
    S: int, G: int, keys: int, first: int, last: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive mask [S·G, keys] of a folded call: row t·G + g sees the key columns
    t + first .. t + last and gets -inf on the others (aten's flash kernel takes a mask of
    the query's dtype, not bool)."""
    t_Y1 = torch.arange(S * G, device=device)[:, None] // G
    j_1K = torch.arange(keys, device=device)[None, :]
    visible_YK = (j_1K >= t_Y1 + first) & (j_1K <= t_Y1 + last)
    return torch.zeros(visible_YK.shape, dtype=dtype, device=device).masked_fill_(
        ~visible_YK, float("-inf")
    )
