"""Reference sliding-window attention: the explicit [T, T] mask and softmax, in fp32 (the oracle).

Legend: B batch, T time, HQ query heads, H KV heads, G group size HQ // H, D head dim.
"""

from __future__ import annotations

import torch


def window_mask(T: int, window: int, device: torch.device) -> torch.Tensor:
    """Return the [T, T] boolean mask of the project's window: query t sees keys (t - window, t].

    Row t is True exactly at columns t - window + 1 .. t (clipped at 0), so every query sees
    ``min(window, t + 1)`` keys, itself included. This is the single written-out statement of the
    window definition that every faster backend is tested against.
    """
    t_T1 = torch.arange(T, device=device)[:, None]
    s_1T = torch.arange(T, device=device)[None, :]
    return (s_1T <= t_T1) & (s_1T > t_T1 - window)


def sliding_window_attention_naive(
    q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor, window: int, scale: float
) -> torch.Tensor:
    """Sliding-window attention written out step by step in fp32; returns q's dtype.

    K and V are repeated over each query group (query head h reads KV head h // G), the full score
    matrix is masked with ``window_mask`` and normalised with a plain softmax. Memory is
    O(B·HQ·T²), so this is only for tests and small inputs.
    """
    G = q_BTHD.shape[2] // k_BTHD.shape[2]
    q = q_BTHD.float()
    k = k_BTHD.float().repeat_interleave(G, dim=2)
    v = v_BTHD.float().repeat_interleave(G, dim=2)
    scores_BHTT = torch.einsum("bthd,bshd->bhts", q, k) * scale
    mask_TT = window_mask(q_BTHD.shape[1], window, q_BTHD.device)
    scores_BHTT = scores_BHTT.masked_fill(~mask_TT, float("-inf"))
    probs_BHTT = torch.softmax(scores_BHTT, dim=-1)
    o_BTHD = torch.einsum("bhts,bshd->bthd", probs_BHTT, v)
    return o_BTHD.to(q_BTHD.dtype)
