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

import functools

import torch

from ..nsa.selection import _run_workers
from .gate import check_block_args

__all__ = ["moba_decode_attention", "own_block_start"]


def own_block_start(length: int, n_new: int, block_size: int) -> int:
    """First cached row the own blocks of the ``n_new`` newest of ``length`` tokens can reach."""
    return (length - n_new) // block_size * block_size


def _gather_rows(
    x_BSHD: torch.Tensor, b_X: torch.Tensor, s_X: torch.Tensor, h_X: torch.Tensor
) -> torch.Tensor:
    """x_BSHD[b, s, h] for broadcast index tensors, as [X, D], with one ``index_select``.

    The D-vectors are addressed as rows of the underlying storage (any layout whose strides
    are multiples of D, e.g. token-major [B, S, H, D] or a head-major cache viewed as one), so
    a head-major cache reads each routed block as one contiguous run. Advanced indexing with
    three index tensors was ~30x slower at 64k tokens.
    """
    D = x_BSHD.shape[3]
    if x_BSHD.stride(3) != 1 or any(
        n > 1 and st % D for n, st in zip(x_BSHD.shape[:3], x_BSHD.stride()[:3], strict=True)
    ):
        x_BSHD = x_BSHD.contiguous()
    B, S, H, _ = x_BSHD.shape
    # a size-1 dim is only ever indexed at 0, whatever its stride
    sb, ss, sh = (
        st if n > 1 else 0 for n, st in zip(x_BSHD.shape[:3], x_BSHD.stride()[:3], strict=True)
    )
    n_rows = ((B - 1) * sb + (S - 1) * ss + (H - 1) * sh) // D + 1
    rows_RD = x_BSHD.as_strided((n_rows, D), (D, 1))
    row_X = ((b_X * sb + s_X * ss + h_X * sh) // D).flatten()
    return rows_RD.index_select(0, row_X)


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
    scale = D**-0.5 if scale is None else float(scale)
    own_1T11 = torch.arange(S - T, S, device=q_BTHD.device).view(1, T, 1, 1) // block_size
    if (block_indices_BTHR >= own_1T11).any():
        raise ValueError(
            "moba_decode_attention: block_indices must name strictly past blocks (or -1)"
        )
    out: list[torch.Tensor] = []
    # single-threaded ops (see _run_workers): the step is a few dozen small ops, and on a
    # loaded machine each multi-threaded one can wait ~10 ms on a barrier
    args = (q_BTHD, k_BSHD, v_BSHD, block_indices_BTHR, block_size, scale)
    _run_workers([functools.partial(_decode_into, out, *args)])
    return out[0]


def _decode_into(
    out: list[torch.Tensor],
    q_BTHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    block_indices_BTHR: torch.Tensor,
    block_size: int,
    scale: float,
) -> None:
    """The decode step on validated inputs; appends o_BTHD to ``out``."""
    B, T, HQ, D = q_BTHD.shape
    S, H = k_BSHD.shape[1], k_BSHD.shape[2]
    G = HQ // H
    device = q_BTHD.device
    pos_T = torch.arange(S - T, S, device=device)
    own_T = pos_T // block_size
    q_BTHGD = q_BTHD.float().view(B, T, H, G, D)

    lo = own_block_start(S, T, block_size)
    kpos_O = torch.arange(lo, S, device=device)
    own_TO = (kpos_O[None, :] // block_size == own_T[:, None]) & (kpos_O[None, :] <= pos_T[:, None])
    s_own = torch.einsum("bthgd,bohd->bthgo", q_BTHGD, k_BSHD[:, lo:].float()) * scale
    s_own = s_own.masked_fill(~own_TO[None, :, None, None, :], float("-inf")).flatten(2, 3)

    R = block_indices_BTHR.shape[-1]
    # unused slots read block 0 (clamped into a short cache) and are masked out below
    key_BTHK = (
        (
            block_indices_BTHR.clamp(min=0)[..., None] * block_size
            + torch.arange(block_size, device=device)
        )
        .flatten(3)
        .clamp(max=S - 1)
    )
    b_B111 = torch.arange(B, device=device).view(B, 1, 1, 1)
    h_111H1 = (torch.arange(HQ, device=device) // G).view(1, 1, HQ, 1)
    k_BTHKD, v_BTHKD = (
        _gather_rows(x, b_B111, key_BTHK, h_111H1).view(B, T, HQ, -1, D).float()
        for x in (k_BSHD, v_BSHD)
    )
    s_routed = torch.einsum("bthd,bthkd->bthk", q_BTHD.float(), k_BTHKD) * scale
    routed_BTHK = (block_indices_BTHR >= 0).repeat_interleave(block_size, dim=-1)
    s_routed = s_routed.masked_fill(~routed_BTHK.view(B, T, HQ, R * block_size), float("-inf"))

    # one softmax over the union: own keys then routed keys
    probs = torch.softmax(torch.cat([s_own, s_routed], dim=-1), dim=-1)
    p_own, p_routed = probs.split([s_own.shape[-1], s_routed.shape[-1]], dim=-1)
    o_BTHGD = torch.einsum("bthgo,bohd->bthgd", p_own.view(B, T, H, G, -1), v_BSHD[:, lo:].float())
    o_BTHD = o_BTHGD.reshape(B, T, HQ, D) + torch.einsum("bthk,bthkd->bthd", p_routed, v_BTHKD)
    out.append(o_BTHD.to(q_BTHD.dtype))
