"""MoBA through NSA's selected-attention op: the Triton backend and the torch path off CPU.

MoBA is selected attention whose selection is per query head: the own block (token-causal) plus
the routed past blocks, under one softmax. NSA's ``selected_attention`` shares one selection
per KV group, so each query head is made a group of its own: KV head h moves into the batch
(B·H rows), its G query heads become G "KV heads" that all read KV head h through a stride-0
``expand`` (no copy of K or V), and each gets its own index row [own block, routed blocks].
The op's token-causal mask inside the own block and its exact backward carry over unchanged.
The forward holds no per-query-head copy of K/V; the selection backward returns dk and dv per
expanded head (G times the size of k), which autograd sums back over the group.
Legend: B batch, T time, HQ query heads, H KV heads, G group size HQ // H, D head dim, R routed
slots, S slots with the own block (R + 1), X folded batch B·H.
"""

from __future__ import annotations

import torch

from ..nsa.selection import selected_attention

__all__ = ["moba_attention_by_selection"]


def moba_attention_by_selection(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    block_indices_BTHR: torch.Tensor,
    block_size: int,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """MoBA attention by ``selected_attention(backend=backend)`` on the folded layout; o_BTHD.

    Inputs are validated by the caller. Differentiable in q, k, v; returns q's dtype.
    """
    B, T, HQ, D = q_BTHD.shape
    H = k_BTHD.shape[2]
    G = HQ // H
    own_BTH1 = (torch.arange(T, device=q_BTHD.device) // block_size).view(1, T, 1, 1)
    idx_BTHS = torch.cat([own_BTH1.expand(B, T, HQ, 1), block_indices_BTHR], dim=-1)
    S = idx_BTHS.shape[-1]
    q_XTGD = q_BTHD.reshape(B, T, H, G, D).permute(0, 2, 1, 3, 4).reshape(B * H, T, G, D)
    k_XTGD, v_XTGD = (
        x.permute(0, 2, 1, 3).reshape(B * H, T, 1, D).expand(B * H, T, G, D)
        for x in (k_BTHD, v_BTHD)
    )
    idx_XTGS = idx_BTHS.view(B, T, H, G, S).permute(0, 2, 1, 3, 4).reshape(B * H, T, G, S)
    o_XTGD = selected_attention(
        q_XTGD, k_XTGD, v_XTGD, idx_XTGS, block_size, scale=scale, backend=backend
    )
    return o_XTGD.view(B, H, T, G, D).permute(0, 2, 1, 3, 4).reshape(B, T, HQ, D)
