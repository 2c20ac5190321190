"""MoBA's parameter-free gate: block mean keys and per-query-head top-k routing.

Keys are split into consecutive blocks of ``block_size`` tokens (block j holds keys
[j·block_size, (j + 1)·block_size)); the gate scores block j for query t and query head h as
s_j = q_t,h · mean(K[block j]) in fp32, on RoPE'd keys. Only blocks that lie entirely in the
past are candidates: for a query in block i these are blocks 0 .. i - 1, all complete. The own
block is never scored (it is always attended, token-causally, by the attention op), the
partial tail block is always some query's own block, and future blocks never compete. Each
query head keeps the best top_k - 1 candidates; ties go to the lower block index (the index
set of a stable descending sort, never ``score >= kth score``, which can pick more than
top_k - 1). A query with fewer candidates keeps all of them. The same functions serve prefill
(every position) and decoding (new positions against a cache of block means).
Legend: B batch, T time (queries), HQ query heads, H KV heads, G group size HQ // H, D head
dim, N block means, R routed slots top_k - 1, L queries of one query block, J candidate blocks
of a query block, X score rows of one KV head in a query block (L·G), Y all score rows of a
query block (B·H·X).
"""

from __future__ import annotations

import functools
import itertools
import numbers

import torch

from ..cpu_workers import run_workers, worker_count

__all__ = ["block_means", "route_blocks"]

_OP = "route_blocks"
# Query positions a worker needs (a heuristic floor: the loop runs a few small ops per query
# block, so a short sequence is routed faster on the caller's thread alone).
_MIN_QUERIES_PER_WORKER = 4096
_MAX_WORKERS = 8


def check_block_args(op: str, block_size: int, top_k: int | None = None) -> None:
    """Raise ValueError naming the argument unless block_size (and top_k) are ints >= 1."""
    for name, value in (("block_size", block_size), ("top_k", top_k)):
        if value is None and name == "top_k":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{op}: {name} must be an int >= 1, got {value!r}")


def block_means(k_BTHD: torch.Tensor, block_size: int) -> torch.Tensor:
    """fp32 mean key of every complete block: [B, T // block_size, H, D] (the tail is left out).

    Used by prefill (all keys at once) and by the decode cache (each block once it completes),
    so both paths reduce the same block_size rows in the same order.
    """
    check_block_args("block_means", block_size)
    if k_BTHD.dim() != 4:
        raise ValueError(f"block_means: k must be 4-d [B, T, H, D], got {tuple(k_BTHD.shape)}")
    B, T, H, D = k_BTHD.shape
    N = T // block_size
    return k_BTHD[:, : N * block_size].float().reshape(B, N, block_size, H, D).mean(dim=2)


def _validate(
    q_BTHD: torch.Tensor, kmean_BNHD: torch.Tensor, block_size: int, top_k: int, start: int
) -> None:
    """Raise ValueError naming the argument when the inputs do not fit route_blocks."""
    check_block_args(_OP, block_size, top_k)
    if isinstance(start, bool) or not isinstance(start, numbers.Integral) or start < 0:
        raise ValueError(f"{_OP}: start must be an int >= 0, got {start!r}")
    if q_BTHD.dim() != 4 or kmean_BNHD.dim() != 4:
        raise ValueError(
            f"{_OP}: q and kmean must be 4-d, got q {tuple(q_BTHD.shape)}, "
            f"kmean {tuple(kmean_BNHD.shape)}"
        )
    B, T, HQ, D = q_BTHD.shape
    Bm, N, H, Dm = kmean_BNHD.shape
    if (Bm, Dm) != (B, D) or H < 1 or HQ % H:
        raise ValueError(
            f"{_OP}: kmean [B, N, H, D] must match q's batch and head dim with HQ a multiple "
            f"of H, got q {tuple(q_BTHD.shape)}, kmean {tuple(kmean_BNHD.shape)}"
        )
    needed = (start + T - 1) // block_size if T else 0
    if needed > N:
        raise ValueError(
            f"{_OP}: kmean holds {N} block means but the query at position {start + T - 1} "
            f"has {needed} past blocks"
        )
    if q_BTHD.device != kmean_BNHD.device:
        raise ValueError(f"{_OP}: q is on {q_BTHD.device}, kmean on {kmean_BNHD.device}")


def _top_first(scores_YJ: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n largest scores per row, descending, ties to the lower index, and the (n + 1)-th
    largest value: (values [Y, n + 1], indices [Y, n]); overwrites the input.

    n passes of ``max``, which returns the first maximal index (documented), each followed by
    masking the pick: exactly the first n of a stable descending sort. For the few picks MoBA
    makes this was 2x faster than ``topk`` on CPU, and the tie rule needs no second pass. The
    last value needs no index: ``amax`` (5-9x faster than ``max`` over rows of 8-32 scores).
    """
    values, picks = [], []
    for _ in range(n):
        value_Y, pick_Y = scores_YJ.max(dim=-1)
        values.append(value_Y)
        picks.append(pick_Y)
        scores_YJ.scatter_(-1, pick_Y[:, None], float("-inf"))
    values.append(scores_YJ.amax(dim=-1))
    return torch.stack(values, dim=-1), torch.stack(picks, dim=-1)


def _route_rows(
    q_BTHD: torch.Tensor,
    kmeanT_BHDN: torch.Tensor,
    block_size: int,
    R: int,
    start: int,
    lo: int,
    hi: int,
    idx_BTHR: torch.Tensor,
    margin_BTH: torch.Tensor,
) -> None:
    """Route query rows lo .. hi - 1 (positions start + lo ..) in place, one query block at a time.

    All queries of block i share the candidates 0 .. i - 1, so each block is one matmul per KV
    head (the group's query rows folded together, against the transposed means) and one
    top-(R + 1): the extra value gives the margin.
    """
    B, _, HQ, D = q_BTHD.shape
    H = kmeanT_BHDN.shape[1]
    G = HQ // H
    row = lo
    while row < hi:
        i = (start + row) // block_size
        end = min(hi, (i + 1) * block_size - start)
        if i == 0:
            row = end
            continue
        if i <= R:
            # every candidate is routed; the margin stays +inf (nothing was left out)
            idx_BTHR[:, row:end, :, :i] = torch.arange(i, device=q_BTHD.device)
            row = end
            continue
        L = end - row
        q_BLHGD = q_BTHD[:, row:end].float().reshape(B, L, H, G, D)
        q_BHXD = q_BLHGD.permute(0, 2, 1, 3, 4).reshape(B, H, L * G, D)
        scores_BHXJ = torch.matmul(q_BHXD, kmeanT_BHDN[..., :i])
        top_YR, picked_YR = _top_first(scores_BHXJ.view(-1, i), R)
        picked_BHLGR = picked_YR.sort(dim=-1).values.view(B, H, L, G, R)
        idx_BTHR[:, row:end].view(B, L, H, G, R).copy_(picked_BHLGR.permute(0, 2, 1, 3, 4))
        margin_BHLG = (top_YR[:, R - 1] - top_YR[:, R]).view(B, H, L, G)
        margin_BTH[:, row:end].view(B, L, H, G).copy_(margin_BHLG.permute(0, 2, 1, 3))
        row = end


def _split_rows(T: int, start: int, block_size: int, workers: int) -> list[tuple[int, int]]:
    """Cut query rows 0 .. T - 1 into ``workers`` ranges of about equal gate work, at block
    borders (a row in block i scores i candidates)."""
    if workers == 1:
        # a decode step: no tensor ops for a split that has one range
        return [(0, T)]
    pos_T = torch.arange(start, start + T)
    cum_T = (pos_T // block_size + 1).cumsum(0)
    targets = torch.arange(1, workers) * int(cum_T[-1]) // workers
    cuts = torch.searchsorted(cum_T, targets).tolist()
    # round each cut to the next block border so no query block is split between workers
    cuts = [min(T, -(-(start + c) // block_size) * block_size - start) for c in cuts]
    bounds = sorted({0, *cuts, T})
    return list(itertools.pairwise(bounds))


def route_blocks(
    q_BTHD: torch.Tensor,
    kmean_BNHD: torch.Tensor,
    block_size: int,
    top_k: int,
    start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed past blocks per query and query head: (block_indices_BTHR, margin_BTH), no grad.

    q_BTHD [B, T, HQ, D] holds the queries at positions start .. start + T - 1 (RoPE'd);
    kmean_BNHD [B, N, H, D] the mean keys of the complete blocks (``block_means``), at least
    those before the last query's block. Query t of head h scores blocks 0 .. t // block_size - 1
    with q · kmean (fp32, unscaled) and routes the best top_k - 1; block_indices_BTHR is int64
    [B, T, HQ, top_k - 1], ids ascending, -1 padding at the end for queries with fewer
    candidates. margin_BTH is the fp32 gap between the weakest routed and the strongest
    unrouted score (0 on a tie at the cut, +inf where every candidate is routed). Work is split
    over worker threads on CPU (see ``kernels.cpu_workers.run_workers``). Raises ValueError
    naming the argument for bad sizes, shapes or devices.
    """
    _validate(q_BTHD, kmean_BNHD, block_size, top_k, start)
    B, T, HQ, _ = q_BTHD.shape
    R = top_k - 1
    idx_BTHR = torch.full((B, T, HQ, R), -1, dtype=torch.int64, device=q_BTHD.device)
    margin_BTH = torch.full((B, T, HQ), float("inf"), device=q_BTHD.device)
    if R == 0 or T == 0:
        return idx_BTHR, margin_BTH
    workers = 1
    if q_BTHD.device.type == "cpu":
        workers = max(1, min(worker_count(), _MAX_WORKERS, T // _MIN_QUERIES_PER_WORKER))
    # a transposed view, no copy: a decode step would otherwise copy every cached mean
    kmeanT_BHDN = kmean_BNHD.detach().float().permute(0, 2, 3, 1)
    args = (q_BTHD.detach(), kmeanT_BHDN, block_size, R, start)
    run_workers(
        [
            functools.partial(_route_rows, *args, lo, hi, idx_BTHR, margin_BTH)
            for lo, hi in _split_rows(T, start, block_size, workers)
        ]
    )
    return idx_BTHR, margin_BTH
