"""The shared SDPA helper: the folded-GQA decode path equals attention with repeated K/V."""

from __future__ import annotations

import pytest
import torch

import sparsezoo
from sparsezoo.mechanisms.base import decode_mask


@pytest.mark.parametrize(("n_heads", "n_kv_heads", "new"), [(6, 2, 3), (4, 4, 2), (8, 1, 1)])
def test_sdpa_decode_path_equals_repeated_kv_attention(
    n_heads: int, n_kv_heads: int, new: int
) -> None:
    """New queries against a cache, with the decode mask: same output as an explicit softmax
    over K/V repeated per query head (so the head-to-group mapping and mask rows are right)."""
    torch.manual_seed(0)
    module = sparsezoo.build_attention(
        "dense", d_model=8 * n_heads, n_heads=n_heads, n_kv_heads=n_kv_heads
    )
    B, S, D = 2, 9, 8
    q_BTHD = torch.randn(B, new, n_heads, D)
    k_BSHD, v_BSHD = torch.randn(B, S, n_kv_heads, D), torch.randn(B, S, n_kv_heads, D)
    mask_TS = decode_mask(new, 0, S)
    actual = module.sdpa(q_BTHD, k_BSHD, v_BSHD, mask=mask_TS)
    G = n_heads // n_kv_heads
    k_rep, v_rep = (x.repeat_interleave(G, dim=2) for x in (k_BSHD, v_BSHD))
    scores = torch.einsum("bthd,bshd->bhts", q_BTHD, k_rep) * module.scale
    if mask_TS is not None:
        scores = scores.masked_fill(~mask_TS, float("-inf"))
    expected = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v_rep)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
