"""MoBA decoding: the newest queries against a K/V cache, reading only the rows they attend.

The T newest queries sit at positions S - T .. S - 1 of S cached tokens. Each attends its own
block's keys up to itself and the keys of its routed past blocks (from ``route_blocks`` over the
cache's block means), under one softmax. Per KV head, the step reads the own-block slice (from
the first new query's block start) and each block in the union of its query heads' routes once,
as views of the cache (contiguous runs in a head-major cache), with no gather copies: nothing
outside own + routed blocks is read, and the reads match the rows a decode step reports.
Legend: B batch, T new queries, S cached tokens, HQ query heads, H KV heads, G group size
HQ // H, D head dim, R routed slots, O own-block keys (slice), L keys of one block, K keys of
one part (O or L).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..cpu_workers import single_threaded_ops
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
    scale = D**-0.5 if scale is None else float(scale)
    own_1T11 = torch.arange(S - T, S, device=q_BTHD.device).view(1, T, 1, 1) // block_size
    if (block_indices_BTHR >= own_1T11).any():
        raise ValueError(
            "moba_decode_attention: block_indices must name strictly past blocks (or -1)"
        )
    # single-threaded ops (see single_threaded_ops): the step is a few dozen small ops, and on
    # a loaded machine each multi-threaded one can wait ~10 ms on a barrier; splitting the
    # heads over two workers was slower (3.3 -> 4.7 ms at 64k, 16 heads: the ops are too small
    # to overlap under the interpreter lock)
    with single_threaded_ops(), torch.no_grad():
        return _decode(q_BTHD, k_BSHD, v_BSHD, block_indices_BTHR, block_size, scale)


def _decode(
    q_BTHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    block_indices_BTHR: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """The decode step on validated inputs, one (batch, KV head) at a time: o_BTHD.

    The group's query rows (t, g) score the own-block slice and every block any of them
    routed to; a row's scores on a block it did not route to (and own-block keys outside its
    own block or after it) are masked, then one softmax spans all parts. Masks that would be
    all true are skipped: a step is dozens of tiny ops, and per-head syncs (unique, tolist)
    and no-op masks were a large share of them (3.1 of 5.8 ms at 64k, 16 heads).
    """
    B, T, HQ, D = q_BTHD.shape
    S, H = k_BSHD.shape[1], k_BSHD.shape[2]
    G = HQ // H
    device = q_BTHD.device
    pos_T = torch.arange(S - T, S, device=device)
    lo = own_block_start(S, T, block_size)
    kpos_O = torch.arange(lo, S, device=device)
    own_T1O = (kpos_O // block_size == (pos_T // block_size)[:, None]) & (kpos_O <= pos_T[:, None])
    own_T1O = own_T1O[:, None, :]
    q_scaled_BTHD = q_BTHD.float() * scale
    # every head reads the same own-block slice: its scores are one batched matmul
    q_BHXD = q_scaled_BTHD.view(B, T, H, G, D).permute(0, 2, 1, 3, 4).reshape(B, H, T * G, D)
    own_BHXO = q_BHXD @ k_BSHD[:, lo:S].float().permute(0, 2, 3, 1)
    routes_BTHR = block_indices_BTHR.tolist()
    # fp32 caches are read as they are: a no-op .float() per slice is still a call per slice
    rows_of = _rows_fp32 if k_BSHD.dtype == torch.float32 else _rows_as_fp32
    o_BTHD = torch.empty(B, T, HQ, D, device=device)
    for b in range(B):
        for h in range(H):
            heads = slice(h * G, (h + 1) * G)
            rows = [{j for j in r if j >= 0} for row_t in routes_BTHR[b] for r in row_t[heads]]
            blocks = sorted(set().union(*rows))
            spans = [(lo, S)] + [(j * block_size, (j + 1) * block_size) for j in blocks]
            q_XD = q_BHXD[b, h]
            k_SD, v_SD = k_BSHD[b, :, h], v_BSHD[b, :, h]
            scores = [own_BHXO[b, h]]
            scores += [F.linear(q_XD, rows_of(k_SD, s0, s1)) for s0, s1 in spans[1:]]
            # a single new query sees its whole own-block slice: lo is its block's start
            if T > 1:
                scores[0].view(T, G, -1).masked_fill_(~own_T1O, float("-inf"))
            for i, j in enumerate(blocks, start=1):
                # rows of the group that did not route to block j must not see it
                if not all(j in r for r in rows):
                    routed_TG1 = (block_indices_BTHR[b, :, heads] == j).any(-1, keepdim=True)
                    scores[i].view(T, G, -1).masked_fill_(~routed_TG1, float("-inf"))
            probs_XK = torch.softmax(torch.cat(scores, dim=-1), dim=-1)
            parts = probs_XK.split([s1 - s0 for s0, s1 in spans], dim=-1)
            o_XD = torch.mm(parts[0], rows_of(v_SD, *spans[0]))
            for p_XK, (s0, s1) in zip(parts[1:], spans[1:], strict=True):
                o_XD.addmm_(p_XK, rows_of(v_SD, s0, s1))
            o_BTHD[b, :, heads] = o_XD.view(T, G, D)
    return o_BTHD.to(q_BTHD.dtype)


def _rows_fp32(x_SD: torch.Tensor, s0: int, s1: int) -> torch.Tensor:
    """Rows s0 .. s1 - 1 of an fp32 cache head, as a view."""
    return x_SD[s0:s1]


def _rows_as_fp32(x_SD: torch.Tensor, s0: int, s1: int) -> torch.Tensor:
    """Rows s0 .. s1 - 1 of a cache head in another dtype, converted to fp32."""
    return x_SD[s0:s1].float()
