"""Reference MoBA: the gate and the attention written out with dense [T, N] and [T, T] tensors.

Both are the fp32 oracles the fast paths are tested against; memory is O(B·HQ·T²), so they are
for tests and small inputs only.
Legend: B batch, T time, HQ query heads, H KV heads, G group size HQ // H, D head dim, N blocks
ceil(T / block_size), R routed slots top_k - 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mask import moba_mask


def route_blocks_naive(
    q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, block_size: int, top_k: int
) -> torch.Tensor:
    """The gate in one piece: block_indices_BTHR [B, T, HQ, top_k - 1], ids ascending, -1 last.

    Every block gets its mean key (the tail block too, as a naive gate would) and a score for
    every query; blocks that are not entirely before the query's own block are then masked to
    -inf, a stable descending sort keeps the best top_k - 1 (lower index first on ties) and
    -inf picks become -1.
    """
    B, T, HQ, D = q_BTHD.shape
    H = k_BTHD.shape[2]
    N = -(-T // block_size)
    R = top_k - 1
    k_pad_BTHD = F.pad(k_BTHD.float(), (0, 0, 0, 0, 0, N * block_size - T))
    sums_BNHD = k_pad_BTHD.view(B, N, block_size, H, D).sum(dim=2)
    counts_N = (T - torch.arange(N, device=q_BTHD.device) * block_size).clamp(max=block_size)
    kmean_BNHD = sums_BNHD / counts_N.view(1, N, 1, 1)
    kmean_BNHD = kmean_BNHD.repeat_interleave(HQ // H, dim=2)
    scores_BTHN = torch.einsum("bthd,bnhd->bthn", q_BTHD.float(), kmean_BNHD)
    own_T1 = (torch.arange(T, device=q_BTHD.device) // block_size)[:, None]
    past_TN = torch.arange(N, device=q_BTHD.device)[None, :] < own_T1
    scores_BTHN = scores_BTHN.masked_fill(~past_TN[None, :, None, :], float("-inf"))
    top_BTHN, order_BTHN = scores_BTHN.sort(dim=-1, descending=True, stable=True)
    picked_BTHR = order_BTHN[..., :R].masked_fill(top_BTHN[..., :R] == float("-inf"), N)
    picked_BTHR = F.pad(picked_BTHR, (0, R - picked_BTHR.shape[-1]), value=N)
    picked_BTHR = picked_BTHR.sort(dim=-1).values
    return picked_BTHR.masked_fill(picked_BTHR == N, -1)


def moba_attention_naive(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    block_indices_BTHR: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """MoBA attention as one masked softmax over all T keys in fp32; returns q's dtype.

    K and V are repeated over each query group, the scores masked with ``moba_mask`` and
    normalised by one softmax, so the own block and the routed blocks share a single softmax by
    construction. Every query sees at least itself, so no row is empty.
    """
    G = q_BTHD.shape[2] // k_BTHD.shape[2]
    k = k_BTHD.float().repeat_interleave(G, dim=2)
    v = v_BTHD.float().repeat_interleave(G, dim=2)
    scores_BHTT = torch.einsum("bthd,bshd->bhts", q_BTHD.float(), k) * scale
    scores_BHTT = scores_BHTT.masked_fill(~moba_mask(block_indices_BTHR, block_size), -torch.inf)
    probs_BHTT = torch.softmax(scores_BHTT, dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs_BHTT, v).to(q_BTHD.dtype)
