"""MoBA decoding: the newest queries against a K/V cache, reading only the rows they attend.

The T newest queries sit at positions S - T .. S - 1 of S cached tokens. Each attends its own
block's keys up to itself and the keys of its routed past blocks (from ``route_blocks`` over the
cache's block means), under one softmax. Own-block keys are one contiguous slice of the cache
(from the first new query's block start); routed blocks are gathered per (query, query head),
so nothing outside own + routed blocks is read.
Legend: B batch, T new queries, S cached tokens, HQ query heads, H KV heads, G group size
HQ // H, D head dim, R routed slots, O own-block keys (slice), K routed keys R·block_size.
"""

from __future__ import annotations

import torch

from .gate import check_block_args

__all__ = ["moba_decode_attention", "own_block_start"]


def own_block_start(length: int, n_new: int, block_size: int) -> int:
    """First cached row the own blocks of the ``n_new`` newest of ``length`` tokens can reach."""
    return (length - n_new) // block_size * block_size


def moba_decode_attention(
    q_BTHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    block_indices_BTHR: torch.Tensor,
    block_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Outputs [B, T, HQ, D] of the T newest queries over own + routed blocks of the cache.

    q_BTHD holds the queries of the last T of the S cached tokens; k_BSHD and v_BSHD the cache
    ([B, S, H, D], post-RoPE keys); block_indices_BTHR the routed past blocks per query and
    query head (``route_blocks``, -1 unused). Computed in fp32, returned in q's dtype; not
    differentiable (decoding). ``scale`` defaults to D**-0.5. Raises ValueError naming the
    argument for a bad block_size, shapes that disagree or routed blocks that are not strictly
    past.
    """
    check_block_args("moba_decode_attention", block_size)
    B, T, HQ, D = q_BTHD.shape
    S, H = k_BSHD.shape[1], k_BSHD.shape[2]
    if k_BSHD.shape != v_BSHD.shape or k_BSHD.shape[0] != B or k_BSHD.shape[3] != D or HQ % H:
        raise ValueError(
            f"moba_decode_attention: k and v must be [B, S, H, D] with q's B and D and HQ a "
            f"multiple of H, got q {tuple(q_BTHD.shape)}, k {tuple(k_BSHD.shape)}, "
            f"v {tuple(v_BSHD.shape)}"
        )
    if not 1 <= T <= S or block_indices_BTHR.shape[:3] != (B, T, HQ):
        raise ValueError(
            f"moba_decode_attention: need 1 <= T <= S and block_indices [B, T, HQ, R], got "
            f"q {tuple(q_BTHD.shape)}, S={S}, block_indices {tuple(block_indices_BTHR.shape)}"
        )
    G = HQ // H
    scale = D**-0.5 if scale is None else float(scale)
    device = q_BTHD.device
    pos_T = torch.arange(S - T, S, device=device)
    own_T = pos_T // block_size
    if (block_indices_BTHR >= own_T.view(1, T, 1, 1)).any():
        raise ValueError(
            "moba_decode_attention: block_indices must name strictly past blocks (or -1)"
        )
    q_BTHGD = q_BTHD.float().view(B, T, H, G, D)

    lo = own_block_start(S, T, block_size)
    kpos_O = torch.arange(lo, S, device=device)
    own_TO = (kpos_O[None, :] // block_size == own_T[:, None]) & (kpos_O[None, :] <= pos_T[:, None])
    s_own = torch.einsum("bthgd,bohd->bthgo", q_BTHGD, k_BSHD[:, lo:].float()) * scale
    s_own = s_own.masked_fill(~own_TO[None, :, None, None, :], float("-inf")).flatten(2, 3)

    R = block_indices_BTHR.shape[-1]
    # unused slots read block 0 (clamped into a short cache) and are masked out below
    rows_BTHK = (
        (
            block_indices_BTHR.clamp(min=0)[..., None] * block_size
            + torch.arange(block_size, device=device)
        )
        .flatten(3)
        .clamp(max=S - 1)
    )
    b_B111 = torch.arange(B, device=device).view(B, 1, 1, 1)
    h_111H1 = (torch.arange(HQ, device=device) // G).view(1, 1, HQ, 1)
    k_BTHKD = k_BSHD[b_B111, rows_BTHK, h_111H1].float()
    v_BTHKD = v_BSHD[b_B111, rows_BTHK, h_111H1].float()
    s_routed = torch.einsum("bthd,bthkd->bthk", q_BTHD.float(), k_BTHKD) * scale
    routed_BTHK = (block_indices_BTHR >= 0).repeat_interleave(block_size, dim=-1)
    s_routed = s_routed.masked_fill(~routed_BTHK.view(B, T, HQ, R * block_size), float("-inf"))

    # one softmax over the union: own keys then routed keys
    probs = torch.softmax(torch.cat([s_own, s_routed], dim=-1), dim=-1)
    p_own, p_routed = probs.split([s_own.shape[-1], s_routed.shape[-1]], dim=-1)
    o_BTHGD = torch.einsum("bthgo,bohd->bthgd", p_own.view(B, T, H, G, -1), v_BSHD[:, lo:].float())
    o_BTHD = o_BTHGD.reshape(B, T, HQ, D) + torch.einsum("bthk,bthkd->bthd", p_routed, v_BTHKD)
    return o_BTHD.to(q_BTHD.dtype)
