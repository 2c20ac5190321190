"""Fast CPU MoBA attention: own blocks and routed blocks as aten flash-attention calls, LSE-merged.

Every query attends its own block (token-causal) and its routed past blocks under one softmax,
computed in parts merged by log-sum-exp:
- own part: the query blocks of a range a few at a time, as flash calls over strided views of
  q, k, v (GQA native, no copies for one KV head) that return the output and its
  log-sum-exp: per 64-key sub-block position one call against its block's keys up to its
  own, causal through an additive mask (see ``_own_forward``);
- routed parts, mixture-of-experts style: per (batch, KV head, block) "expert", the query rows
  (b, t, query head) that routed to the block, with all query heads of the group folded into
  the rows, are gathered and attended against the block's keys in one non-causal flash call;
  the result is merged into the rows' running (output, lse) by log-sum-exp.
The backward is exact: aten's flash backward recomputes each part's probabilities as
exp(s - lse) from the merged lse and uses delta = rowsum(dO · O) of the merged output, which is
the gradient of the one softmax over the union. The merged output is not kept from the forward:
the backward recomputes it, keeps delta's per-row factor and hands the flash backward a stand-in
with the same delta (see ``_MobaAttention``). Nothing of size [T, T], [T, N] or per query
head copies of K/V is built, except for short inputs that would make many routed calls (see
``moba_attention_torch``), which take one SDPA call under a [B, HQ, T, T] mask
(``_masked_attention``). Work is split
over worker threads that own disjoint ranges of query blocks
(``kernels.cpu_workers.run_workers``: single-threaded ops per worker, because small
multi-threaded ops wait on barriers on a loaded machine). A worker adds dk and dv of the keys
in its own range into the shared gradients, which no other worker writes there, and those
of earlier keys (routed chunks) into a buffer of its own, summed in worker order at the end, so
results are deterministic.
Legend: B batch, T time, HQ query heads, H KV heads, G group size HQ // H, D head dim, L keys of
a block (block_size, fewer in the tail block), N blocks ceil(T / block_size), R routed slots,
Q query rows B·T·HQ (flat, row (b·T + t)·HQ + h), M rows of one chunk, P routed pairs, W
workers, X any number of blocks, S sub-block length, Y rows S·G of a folded sub-block, K keys
of a block's first sub-blocks, r any trailing dims.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from ..cpu_workers import run_workers, worker_count
from ..group_rows import fold_group_rows, folded_band_mask, unfold_group_rows
from .mask import moba_mask

__all__ = ["moba_attention_torch"]

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

# Query rows per routed flash call: enough that a call's fixed cost is small next to its
# rows x block_size scores (~8 ms of flash per call at block 512, D = 64, one core), few
# enough that a chunk's gathered rows, outputs and merge temporaries stay ~1 MB each: each
# worker thread's allocator keeps them. fwd+bwd peak RSS at 16k tokens (16:1 heads, D = 64):
# 430-446 MB with 8192 rows, 414-425 MB with 2048 (dense 387 MB); time within noise.
_CHUNK_ROWS = 4096
# Attended (query, key) pairs a worker needs (4M: ~1 GFLOP at D = 64, ~10 ms of flash on one
# core), so that its thread, routing sort and Python loop stay a small share of its time.
_MIN_PAIRS_PER_WORKER = 1 << 22
# A routed part may outweigh its row's reference (the own part's lse) by at most e^_HEADROOM
# before the row is rebased; sums of a few such terms stay far from fp32's limit (e^88).
_HEADROOM = 40.0
# Sub-block length of the own part (see ``_own_forward``); tests shrink it.
_OWN_TILE = 64
# Whole blocks per own-part flash call: its output (and in the backward its dq) is a fresh
# tensor copied into place, so a worker's whole range at once would hold a second copy of its
# share of q (measured at 16k tokens: fwd+bwd peak 545 MB, dense 387 MB); two blocks keep it
# at 4 MB (block 512, 16 heads, D = 64), and the calls stay large (16 x 16 sub-block heads).
_OWN_SLAB = 2
_MAX_WORKERS = 8
# Short sequences with many routed calls attend all T keys in one masked SDPA call instead:
# there the routed path's fixed cost per flash call (one per batch row, KV head and block)
# outweighs the T² scores. fwd + bwd, top_k 3, two threads, routed -> masked: 4 query heads
# on 2 KV heads of 32, B 8: T 256, block 32 (128 calls): 102 -> 20 ms; T 512: 248 -> 110
# (block 32), 165 -> 122 (block 64); B 2, T 1024: 113 vs 102; T 2048: 152 vs 424. The bench
# shape (B 1, 16 query heads on 1 KV head of 64, block 32: 8 and 16 calls) is faster routed:
# 512 tokens 109 vs 127 ms, 256 tokens 55 vs 62. The tiny model's training step (4 layers,
# 8 rows, block 32): 256 tokens 689 -> 294 ms, peak RSS 390 -> 428 MB; 512 tokens 1447 -> 740
# ms, 517 -> 652 MB (the mask lives until the backward). Tests set _MASKED_MAX_T to 0.
_MASKED_MAX_T = 512
_MASKED_MIN_CALLS = 64
# ... and at most this many mask entries B·HQ·T²: aten expands a boolean mask to a float one
# (64 MB at the bound).
_MASKED_MAX_ENTRIES = 1 << 24


@dataclass(frozen=True)
class _Chunk:
    """Up to ``_CHUNK_ROWS`` query rows (flat ids, increasing) routed to block j of KV head h."""

    b: int
    h: int
    j: int
    rows_M: torch.Tensor


@dataclass(frozen=True)
class _Share:
    """One worker's query blocks ``first .. end - 1`` (all batch rows) and their routed chunks."""

    first: int
    end: int
    chunks: tuple[_Chunk, ...]


def _own_segments(first: int, end: int, T: int, block_size: int) -> list[tuple[int, int, int]]:
    """(t0, t1, L) runs of equal-length blocks covering query blocks first .. end - 1: slabs of
    at most ``_OWN_SLAB`` whole blocks, then the partial tail block if the range holds it."""
    full_end = min(end, T // block_size)
    segments = [
        (j * block_size, min(j + _OWN_SLAB, full_end) * block_size, block_size)
        for j in range(first, full_end, _OWN_SLAB)
    ]
    if end * block_size > T and T % block_size:
        segments.append((T - T % block_size, T, T % block_size))
    return segments


def _own_tile(L: int) -> int:
    """Sub-block length for the own part of L-key blocks: _OWN_TILE when it splits them, else L."""
    return _OWN_TILE if L > _OWN_TILE and L % _OWN_TILE == 0 else L


def _sub_block(
    x_BTX: torch.Tensor, b: int, t0: int, t1: int, L: int, n: int, s: int
) -> torch.Tensor:
    """[X, L / n, *rest] view of sub-block s (of n) of every L-row block in rows t0 .. t1 - 1."""
    return x_BTX[b, t0:t1].view(-1, n, L // n, *x_BTX.shape[2:])[:, s]


def _prefix_rows(x_BTHD: torch.Tensor, b: int, t0: int, t1: int, L: int, keys: int) -> torch.Tensor:
    """[X, heads, keys, D] view of the first ``keys`` rows of every L-row block."""
    return x_BTHD[b, t0:t1].view(-1, L, *x_BTHD.shape[2:])[:, :keys].transpose(1, 2)


def _out_factor(do_BTHD: torch.Tensor, o_BTHD: torch.Tensor) -> torch.Tensor:
    """Per-row c = D / |dO|² with D = rowsum(dO · O) (0 where dO's row is 0), fp32 [B, T, HQ].

    aten's flash backward reads the output only through D (the softmax backward's row term),
    so any stand-in O' with rowsum(dO · O') = D gives the same gradients: O' = dO · c. The
    backward keeps c (4 bytes a row) instead of O (4·D bytes a row) while it runs. Computed
    by chunks of rows: whole-tensor products would each be an O-sized temporary.
    """
    B, T, HQ, _ = do_BTHD.shape
    c_BTH = torch.empty(B, T, HQ, dtype=torch.float32, device=do_BTHD.device)
    step = max(1, _CHUNK_ROWS // HQ)
    for t0 in range(0, T, step):
        do_f = do_BTHD[:, t0 : t0 + step].float()
        norm = do_f.square().sum(-1)
        delta = (do_f * o_BTHD[:, t0 : t0 + step]).sum(-1)
        c_BTH[:, t0 : t0 + step] = torch.where(norm > 0, delta / norm, 0.0)
    return c_BTH


def _stand_in(do_Xr: torch.Tensor, c_X: torch.Tensor) -> torch.Tensor:
    """The output stand-in dO · c for rows of dO (trailing head dim) and their factors c."""
    return (do_Xr * c_X[..., None]).to(do_Xr.dtype)


def _own_mask(L: int, tile: int, G: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask [1, 1, tile·G, L] of a folded sub-block's rows against a block's keys.

    Row (t, g) of a sub-block (t its token within the sub-block) sees every key of the first
    L - tile columns and, in the last tile columns (the sub-block's own keys), those up to t.
    Sub-block s uses the view of its last (s + 1)·tile columns: its block's earlier keys and
    its own keys, causal, in one call.
    """
    return folded_band_mask(tile, G, L, -L, L - tile, dtype, device)[None, None]


def _own_forward(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    b: int,
    t0: int,
    t1: int,
    L: int,
    scale: float,
    o_BTHD: torch.Tensor,
    lse_BTH: torch.Tensor,
) -> None:
    """Own-block attention of the L-row blocks in rows t0 .. t1 - 1 into (o, lse), exactly.

    A causal flash call over whole L-key blocks computes every L x L score (its key tile spans
    the block), so blocks are cut into n sub-blocks and sub-block s is one masked call of its
    queries against the block's first s + 1 sub-blocks (``_own_mask``), each KV head's query
    rows (t, g) folded together: one softmax per row, nothing to merge. Own part alone at 32k
    tokens, block 512, 16:1 heads, one core: 0.33 s with 64-key sub-blocks (0.56 s as a causal
    call per sub-block plus LSE-merged calls against the earlier ones; 0.59 s whole blocks).
    """
    HQ, H = q_BTHD.shape[2], k_BTHD.shape[2]
    tile = _own_tile(L)
    n = L // tile
    mask_11YL = _own_mask(L, tile, HQ // H, q_BTHD.dtype, q_BTHD.device)
    for s in range(n):
        keys = (s + 1) * tile
        out_XHYD, lse_XHY = _flash(
            fold_group_rows(_sub_block(q_BTHD, b, t0, t1, L, n, s), H),
            _prefix_rows(k_BTHD, b, t0, t1, L, keys),
            _prefix_rows(v_BTHD, b, t0, t1, L, keys),
            attn_mask=mask_11YL[..., L - keys :],
            scale=scale,
        )
        _sub_block(o_BTHD, b, t0, t1, L, n, s).copy_(unfold_group_rows(out_XHYD, tile))
        _sub_block(lse_BTH, b, t0, t1, L, n, s).copy_(unfold_group_rows(lse_XHY, tile))


def _own_backward(
    do_BTHD: torch.Tensor,
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    c_BTH: torch.Tensor,
    lse_BTH: torch.Tensor,
    b: int,
    t0: int,
    t1: int,
    L: int,
    scale: float,
    dq_BTHD: torch.Tensor,
    dk_BTHD: torch.Tensor,
    dv_BTHD: torch.Tensor,
) -> None:
    """Gradients of ``_own_forward``'s calls from the merged lse and the output stand-in
    dO·c (see ``_out_factor``): dq written, dk and dv added, for the L-row blocks in rows
    t0 .. t1 - 1."""
    HQ, H = q_BTHD.shape[2], k_BTHD.shape[2]
    tile = _own_tile(L)
    n = L // tile
    mask_11YL = _own_mask(L, tile, HQ // H, q_BTHD.dtype, q_BTHD.device)
    for s in range(n):
        keys = (s + 1) * tile
        do_XSHD = _sub_block(do_BTHD, b, t0, t1, L, n, s)
        o_XSHD = _stand_in(do_XSHD, _sub_block(c_BTH, b, t0, t1, L, n, s))
        rows = [
            fold_group_rows(x, H) for x in (do_XSHD, _sub_block(q_BTHD, b, t0, t1, L, n, s), o_XSHD)
        ]
        rows.append(fold_group_rows(_sub_block(lse_BTH, b, t0, t1, L, n, s), H))
        dq_XHYD, dk_XHKD, dv_XHKD = _flash_backward(
            rows[0],
            rows[1],
            _prefix_rows(k_BTHD, b, t0, t1, L, keys),
            _prefix_rows(v_BTHD, b, t0, t1, L, keys),
            rows[2],
            rows[3],
            0.0,
            False,
            attn_mask=mask_11YL[..., L - keys :],
            scale=scale,
        )
        _sub_block(dq_BTHD, b, t0, t1, L, n, s).copy_(unfold_group_rows(dq_XHYD, tile))
        _prefix_rows(dk_BTHD, b, t0, t1, L, keys).add_(dk_XHKD)
        _prefix_rows(dv_BTHD, b, t0, t1, L, keys).add_(dv_XHKD)


def _route_share(
    block_indices_BTHR: torch.Tensor, H: int, block_size: int, first: int, end: int
) -> tuple[_Chunk, ...]:
    """Invert the routing of query blocks first .. end - 1 into per-expert chunks of rows.

    One stable sort of the routed pairs by expert id (b·H + h)·N + j keeps each expert's rows
    increasing; unused slots (-1) sort past the end and are cut off.
    """
    B, T, HQ, _ = block_indices_BTHR.shape
    t0, t1 = first * block_size, min(T, end * block_size)
    N = -(-T // block_size)
    idx_BTHR = block_indices_BTHR[:, t0:t1]
    device = idx_BTHR.device
    b_B111 = torch.arange(B, device=device).view(B, 1, 1, 1)
    h_111H1 = (torch.arange(HQ, device=device) // (HQ // H)).view(1, 1, HQ, 1)
    t_1T11 = torch.arange(t0, t1, device=device).view(1, -1, 1, 1)
    valid_BTHR = idx_BTHR >= 0
    key_BTHR = torch.where(valid_BTHR, (b_B111 * H + h_111H1) * N + idx_BTHR, B * H * N)
    rows_BTHR = (b_B111 * T + t_1T11) * HQ + torch.arange(HQ, device=device).view(1, 1, HQ, 1)
    # sorted as the narrowest integer type that holds every id: 1M routed pairs (32k tokens, 16
    # heads, k = 3) took 49 ms to sort on one core as int64, 7.5 ms as uint8, 14 ms as int16
    key_P, order_P = key_BTHR.flatten().to(_id_dtype(B * H * N)).sort(stable=True)
    P = int(valid_BTHR.sum())
    rows_P = rows_BTHR.expand_as(key_BTHR).flatten()[order_P[:P]]
    if B * T * HQ < 1 << 31:
        # kept until the backward: half the bytes of int64 (4 MB at 32k tokens, 16 heads, k = 3)
        rows_P = rows_P.to(torch.int32)
    counts = torch.bincount(key_P[:P], minlength=B * H * N).tolist()
    chunks = []
    lo = 0
    for expert, count in enumerate(counts):
        b, rest = divmod(expert, H * N)
        h, j = divmod(rest, N)
        for c in range(lo, lo + count, _CHUNK_ROWS):
            chunks.append(_Chunk(b, h, j, rows_P[c : min(c + _CHUNK_ROWS, lo + count)]))
        lo += count
    return tuple(chunks)


def _id_dtype(largest: int) -> torch.dtype:
    """The narrowest integer dtype holding 0 .. largest."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if largest <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def _block_kv(x_BTHD: torch.Tensor, c: _Chunk, block_size: int) -> torch.Tensor:
    """The chunk's block of keys or values as a [1, 1, L, D] view."""
    return x_BTHD[c.b, c.j * block_size : (c.j + 1) * block_size, c.h][None, None]


def _rebase(
    rows_M: torch.Tensor,
    d_M: torch.Tensor,
    acc_QD: torch.Tensor,
    wsum_Q: torch.Tensor,
    ref_Q: torch.Tensor,
) -> None:
    """Raise the reference of rows whose new part exceeds it by more than ``_HEADROOM`` nats.

    The rows' accumulators are scaled down by the same factor, so acc / wsum and ref + log(wsum)
    are unchanged; ``d_M`` (part lse minus reference) is updated in place.
    """
    bump_M = (d_M - _HEADROOM).clamp_min_(0.0)
    factor_M = torch.exp(-bump_M)
    acc_QD.index_copy_(0, rows_M, acc_QD.index_select(0, rows_M).mul_(factor_M[:, None]))
    wsum_Q.index_copy_(0, rows_M, wsum_Q.index_select(0, rows_M).mul_(factor_M))
    ref_Q.index_copy_(0, rows_M, ref_Q.index_select(0, rows_M).add_(bump_M))
    d_M.sub_(bump_M)


def _forward_share(
    share_slot: list[_Share],
    first: int,
    end: int,
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    block_indices_BTHR: torch.Tensor,
    block_size: int,
    scale: float,
    o_BTHD: torch.Tensor,
    lse_BTH: torch.Tensor,
) -> None:
    """One worker's forward: invert the routing of its query blocks into chunks, store them in
    ``share_slot`` (the backward needs them again), and attend (``_attend_share``)."""
    share = _Share(
        first, end, _route_share(block_indices_BTHR, k_BTHD.shape[2], block_size, first, end)
    )
    share_slot.append(share)
    _attend_share(share, q_BTHD, k_BTHD, v_BTHD, block_size, scale, o_BTHD, lse_BTH)


def _attend_share(
    share: _Share,
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    block_size: int,
    scale: float,
    o_BTHD: torch.Tensor,
    lse_BTH: torch.Tensor,
) -> None:
    """One worker's attention: own blocks, then routed chunks merged into its rows by LSE.

    A row's parts are summed against a per-row reference, its own part's lse: the own output
    starts the accumulator with weight 1 and a routed part (o_p, lse_p) adds exp(lse_p - ref)
    times o_p (a scatter-add, no read-modify-write of the rows), rebasing the rare rows where
    that weight would pass e^_HEADROOM. At the end o = acc / wsum and lse = ref + log(wsum),
    exactly the log-sum-exp merge. Writes only the worker's query rows of the shared fp32
    o_BTHD (the accumulator) and lse_BTH (the reference, then the lse); the same share gives
    the same values bit for bit (the backward recomputes o this way).
    """
    B, T, _, D = q_BTHD.shape
    segments = _own_segments(share.first, share.end, T, block_size)
    for t0, t1, L in segments:
        for b in range(B):
            _own_forward(q_BTHD, k_BTHD, v_BTHD, b, t0, t1, L, scale, o_BTHD, lse_BTH)
    chunks = share.chunks
    wsum_BTH = torch.ones_like(lse_BTH) if chunks else None
    q_QD, acc_QD, ref_Q = q_BTHD.view(-1, D), o_BTHD.view(-1, D), lse_BTH.view(-1)
    for c in chunks:
        rows_M = c.rows_M.long()  # int64: a 2-d index_add_ over int32 ids took 2.8x longer
        q_rows = q_QD.index_select(0, rows_M)[None, None]
        out_11MD, lse_11M = _flash(
            q_rows, _block_kv(k_BTHD, c, block_size), _block_kv(v_BTHD, c, block_size),
            scale=scale,
        )  # fmt: skip
        d_M = lse_11M.view(-1).sub_(ref_Q.index_select(0, rows_M))
        if d_M.max() > _HEADROOM:
            _rebase(rows_M, d_M, acc_QD, wsum_BTH.view(-1), ref_Q)
        w_M = d_M.exp_()
        acc_QD.index_add_(0, rows_M, out_11MD.view(-1, D).float().mul_(w_M[:, None]))
        wsum_BTH.view(-1).index_add_(0, rows_M, w_M)
    if wsum_BTH is None:
        return
    for t0, t1, _ in segments:
        wsum_bTH = wsum_BTH[:, t0:t1]
        o_BTHD[:, t0:t1].div_(wsum_bTH[..., None])
        lse_BTH[:, t0:t1].add_(wsum_bTH.log())


def _backward_share(
    share: _Share,
    do_BTHD: torch.Tensor,
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    c_BTH: torch.Tensor,
    lse_BTH: torch.Tensor,
    block_size: int,
    scale: float,
    dq_BTHD: torch.Tensor,
    dk_BTHD: torch.Tensor,
    dv_BTHD: torch.Tensor,
    dk_early_BTHD: torch.Tensor | None,
    dv_early_BTHD: torch.Tensor | None,
) -> None:
    """One worker's backward with the merged lse and the output stand-in dO·c: dq into its
    own rows of the shared dq_BTHD; dk and dv of the keys of its own query blocks (own parts
    and routed chunks there) added into the shared dk_BTHD, dv_BTHD, which no other worker
    writes at those rows; the routed chunks of earlier blocks (< share.first) go into the
    worker's own dk_early_BTHD, dv_early_BTHD, which cover the keys before its range (None
    for the first worker)."""
    B, T, _, D = q_BTHD.shape
    own = (do_BTHD, q_BTHD, k_BTHD, v_BTHD, c_BTH, lse_BTH)
    grads = (dq_BTHD, dk_BTHD, dv_BTHD)
    for t0, t1, L in _own_segments(share.first, share.end, T, block_size):
        for b in range(B):
            _own_backward(*own, b, t0, t1, L, scale, *grads)
    q_QD, do_QD = q_BTHD.view(-1, D), do_BTHD.view(-1, D)
    c_Q, lse_Q, dq_QD = c_BTH.view(-1), lse_BTH.view(-1), dq_BTHD.view(-1, D)
    for c in share.chunks:
        rows_M = c.rows_M.long()
        do_MD, q_MD = (x.index_select(0, rows_M) for x in (do_QD, q_QD))
        dq_11MD, dk_11LD, dv_11LD = _flash_backward(
            do_MD[None, None],
            q_MD[None, None],
            _block_kv(k_BTHD, c, block_size),
            _block_kv(v_BTHD, c, block_size),
            _stand_in(do_MD, c_Q.index_select(0, rows_M))[None, None],
            lse_Q.index_select(0, rows_M)[None, None],
            0.0,
            False,
            scale=scale,
        )
        dq_QD.index_add_(0, rows_M, dq_11MD.view(-1, D).to(dq_QD.dtype))
        early = c.j < share.first
        dk_into = dk_early_BTHD if early else dk_BTHD
        dv_into = dv_early_BTHD if early else dv_BTHD
        _block_kv(dk_into, c, block_size)[0, 0].add_(dk_11LD[0, 0])
        _block_kv(dv_into, c, block_size)[0, 0].add_(dv_11LD[0, 0])


def _split_blocks(block_indices_BTHR: torch.Tensor, block_size: int) -> list[tuple[int, int]]:
    """Cut the query blocks into contiguous ranges of about equal attended pairs, one per worker.

    A query in a block of L keys attends about L / 2 own keys plus block_size per routed block;
    the count of workers comes from torch's thread count, capped by the total work.
    """
    B, T, HQ, _ = block_indices_BTHR.shape
    N = -(-T // block_size)
    routed_T = (block_indices_BTHR >= 0).sum(dim=(0, 2, 3))
    pos_T = torch.arange(T, device=routed_T.device)
    pairs_T = B * HQ * (pos_T % block_size + 1) + block_size * routed_T
    pairs_N = torch.zeros(N, dtype=pairs_T.dtype, device=pairs_T.device)
    pairs_N.index_add_(0, pos_T // block_size, pairs_T)
    cum_N = pairs_N.cumsum(0).cpu()
    total = int(cum_N[-1])
    workers = max(1, min(worker_count(), _MAX_WORKERS, N, total // _MIN_PAIRS_PER_WORKER))
    targets = torch.arange(1, workers) * total // workers
    bounds = sorted({0, *(torch.searchsorted(cum_N, targets) + 1).tolist(), N})
    return list(itertools.pairwise(bounds))


class _MobaAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v and the per-worker routing; not the output.

    The output is the mechanism's largest tensor besides q, and its output projection holds it
    until that projection's backward has run; saving it here too would keep it alive through
    this backward, the step's memory peak (dq, dk, dv and dO live at once). So the backward
    recomputes the forward (same shares, bit-identical o and lse), reduces o to one factor per
    row (``_out_factor``) and frees it before any gradient buffer exists. Measured on the
    bench's module fwd + bwd at 32k tokens (16:1 heads, D = 64, B = 512, k = 3), heap bytes in
    use: 722 -> 605 MB during this backward, step peak 722 -> 688 MB (dense 698, now set by
    the projections' backward); time 8.7 -> 10.4 s (about one more forward).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q_BTHD: torch.Tensor,
        k_BTHD: torch.Tensor,
        v_BTHD: torch.Tensor,
        block_indices_BTHR: torch.Tensor,
        block_size: int,
        scale: float,
    ) -> torch.Tensor:
        """Own and routed parts per worker, merged by LSE into fp32 (o, lse); returns q's dtype."""
        q_BTHD, k_BTHD, v_BTHD = (x.contiguous() for x in (q_BTHD, k_BTHD, v_BTHD))
        o_BTHD, lse_BTH = _outputs(q_BTHD)
        ranges = _split_blocks(block_indices_BTHR, block_size)
        slots: list[list[_Share]] = [[] for _ in ranges]
        inputs = (q_BTHD, k_BTHD, v_BTHD, block_indices_BTHR, block_size, scale, o_BTHD, lse_BTH)
        run_workers(
            [
                functools.partial(_forward_share, slot, first, end, *inputs)
                for slot, (first, end) in zip(slots, ranges, strict=True)
            ]
        )
        ctx.save_for_backward(q_BTHD, k_BTHD, v_BTHD)
        ctx.shares = [slot[0] for slot in slots]
        ctx.block_size, ctx.scale = block_size, scale
        return o_BTHD.to(q_BTHD.dtype)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, do_BTHD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None, None]:
        """Exact gradients through the merged softmax, workers in parallel; inputs' dtypes."""
        q_BTHD, k_BTHD, v_BTHD = ctx.saved_tensors
        do_BTHD = do_BTHD.to(q_BTHD.dtype).contiguous()
        o_BTHD, lse_BTH = _outputs(q_BTHD)
        inputs = (q_BTHD, k_BTHD, v_BTHD, ctx.block_size, ctx.scale, o_BTHD, lse_BTH)
        run_workers([functools.partial(_attend_share, share, *inputs) for share in ctx.shares])
        c_BTH = _out_factor(do_BTHD, o_BTHD)
        # o's last references: freed before the gradient buffers are allocated
        del o_BTHD, inputs
        dq_BTHD = torch.zeros(q_BTHD.shape, dtype=torch.float32, device=q_BTHD.device)
        fp32 = {"dtype": torch.float32, "device": k_BTHD.device}
        dk_BTHD, dv_BTHD = (torch.zeros(k_BTHD.shape, **fp32) for _ in range(2))
        # later workers' routed chunks into keys before their range: private buffers of just
        # those rows, added in worker order (deterministic; half of two full copies)
        B, _, H, D = k_BTHD.shape
        early = [(None, None)] + [
            tuple(torch.zeros(B, share.first * ctx.block_size, H, D, **fp32) for _ in range(2))
            for share in ctx.shares[1:]
        ]
        inputs = (do_BTHD, q_BTHD, k_BTHD, v_BTHD, c_BTH, lse_BTH, ctx.block_size, ctx.scale)
        grads = (dq_BTHD, dk_BTHD, dv_BTHD)
        run_workers(
            [
                functools.partial(_backward_share, share, *inputs, *grads, *buffers)
                for share, buffers in zip(ctx.shares, early, strict=True)
            ]
        )
        for dk_early_BTHD, dv_early_BTHD in early[1:]:
            dk_BTHD[:, : dk_early_BTHD.shape[1]] += dk_early_BTHD
            dv_BTHD[:, : dv_early_BTHD.shape[1]] += dv_early_BTHD
        return (
            dq_BTHD.to(q_BTHD.dtype),
            dk_BTHD.to(k_BTHD.dtype),
            dv_BTHD.to(v_BTHD.dtype),
            None,
            None,
            None,
        )


def _outputs(q_BTHD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh fp32 (o_BTHD, lse_BTH) buffers for the workers to fill."""
    o_BTHD = torch.empty(q_BTHD.shape, dtype=torch.float32, device=q_BTHD.device)
    return o_BTHD, torch.empty(q_BTHD.shape[:3], dtype=torch.float32, device=q_BTHD.device)


def moba_attention_torch(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    block_indices_BTHR: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """MoBA attention on CPU through aten's flash-attention kernels; differentiable in q, k, v.

    Inputs are validated by the caller (CPU tensors of one floating dtype, routing from
    ``route_blocks``). Returns o_BTHD in q's dtype; parts are merged in fp32. Uses
    ``worker_count()`` worker threads and must not be called from several threads at
    once (see ``run_workers``). Sequences of at most _MASKED_MAX_T tokens that would make at
    least _MASKED_MIN_CALLS routed calls (batch rows x KV heads x blocks), with at most
    _MASKED_MAX_ENTRIES mask entries, take ``_masked_attention`` instead, one SDPA call.
    """
    B, T, HQ, _ = q_BTHD.shape
    calls = B * k_BTHD.shape[2] * -(-T // block_size)
    if T <= _MASKED_MAX_T and calls >= _MASKED_MIN_CALLS and B * HQ * T * T <= _MASKED_MAX_ENTRIES:
        return _masked_attention(q_BTHD, k_BTHD, v_BTHD, block_indices_BTHR, block_size, scale)
    return _MobaAttention.apply(q_BTHD, k_BTHD, v_BTHD, block_indices_BTHR, block_size, scale)


def _masked_attention(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    block_indices_BTHR: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """MoBA attention of a short sequence: SDPA over all T keys under ``moba_mask`` (own block
    token-causal plus the routed blocks, one softmax), GQA without repeating K/V; autograd
    gives the gradients. O(B·HQ·T²) memory: for short sequences only."""
    o_BHTD = torch.nn.functional.scaled_dot_product_attention(
        q_BTHD.transpose(1, 2),
        k_BTHD.transpose(1, 2),
        v_BTHD.transpose(1, 2),
        attn_mask=moba_mask(block_indices_BTHR, block_size),
        scale=scale,
        enable_gqa=q_BTHD.shape[2] != k_BTHD.shape[2],
    )
    return o_BHTD.transpose(1, 2)
