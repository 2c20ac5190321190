"""The lightning indexer of DSA (``sparsezoo.kernels.dsa.indexer``): scores and top-k selection.

I(t, s) = scale · sum_j w(t, j) · ReLU(q_j(t) · k(s)) for keys s <= t, with N indexer heads q_j of
width E, one indexer key per token shared by the heads, and per-head weights w. With per-group
weights w_u(t, j) (one set per KV group u) the ReLU terms are shared and each group gets its own
score row I_u(t, s) and its own selection. ``scale`` defaults to N^-1/2 · E^-1/2 (DeepSeek-V3.2).

Queries are the last T of the S keys: query t sits at position S - T + t and sees keys
0 .. S - T + t, so the same ops serve prefill (T = S), decoding (T new tokens after S - T cached
ones) and query chunks. Future keys score -inf; top-k runs after that causal mask and returns
min(topk, position + 1) keys per query, padded with -1. Ties are broken towards the later key,
the same way by every backend, so a selection does not depend on how the rows were computed.

Backends: ``naive`` (one dense [T, S] einsum, the fp32 oracle), ``torch`` (query chunks: one
matmul, ReLU and head-weighting per chunk, then a thresholded top-k; never a [T, N, S] tensor)
and ``triton`` (score kernels in ``triton_indexer.py``, top-k through torch).

Legend: B batch, T queries, S keys, N indexer heads, E indexer head dim, U selection sets per
query (1 when one set is shared by all attention heads, else one per KV group), K top-k slots,
C queries of a chunk, P keys a chunk sees, R rows (chunk queries × sets).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from ..backend import resolve_backend
from ..cpu_workers import Workspace, even_ranges, run_workers, single_threaded_ops, worker_count

__all__ = [
    "default_index_scale",
    "indexer_scores",
    "indexer_scores_naive",
    "indexer_scores_torch",
    "indexer_topk",
    "indexer_topk_naive",
    "indexer_topk_torch",
    "select_topk_rows",
]

_SCORES = "indexer_scores"
_TOPK = "indexer_topk"
_AVAILABLE = ("naive", "torch", "triton")

# Score elements (queries × heads × keys) one chunk of the torch path holds: 16 MB of fp32
# ReLU terms, 32 queries per chunk at 32k keys (4 heads). Each chunk streams all its visible
# keys once, so fewer, larger chunks re-read them less: measured against 4 MB chunks (same
# process, alternating, 4 x 64 indexer, k = 2048, two threads) 7.4-9.6 -> 6.3-6.5 s at 32k and
# 2.7-2.8 -> 2.4 s at 16k, equal at 8k; 64 MB chunks fall out of the L3 cache (7.5-7.9 s at 32k).
_CHUNK_ELEMENTS = 1 << 22
# fp32 ReLU terms of one key block of a chunk (2 MB: this CPU's L2 per core; see _chunk_scores)
# and the fewest keys of a block (a block's matmul and ops stay large).
_L2_ELEMENTS = 1 << 19
_MIN_KEY_BLOCK = 1024
# Fewest queries of a chunk cut only to keep every worker busy: with fewer, each chunk's
# [C·N, E] @ [E, P] matmul streams all its keys for too little work.
_MIN_CHUNK_QUERIES = 8
# Chunks of at most this many queries (a decode step's) score keys-major, see _few_query_scores.
_FEW_QUERIES = 8
# Slots (queries × slots) one chunk of the slot-score path gathers: 16384 rows of an E = 64
# indexer key are 4 MB, cache-resident between the gather and the matmuls.
_CHUNK_SLOTS = 16384
# Thresholded top-k (see select_topk_rows): sample every 8th score, on rows of >= 2·topk keys.
_SAMPLE_STRIDE = 8
_SAMPLE_MIN_RATIO = 2


def default_index_scale(n_heads: int, head_dim: int) -> float:
    """The paper's indexer scaling N^-1/2 · E^-1/2 (heads and head width)."""
    return (n_heads * head_dim) ** -0.5


def _validate(
    op: str,
    q_idx_BTNE: torch.Tensor,
    k_idx_BSE: torch.Tensor,
    w_idx: torch.Tensor,
    indices: torch.Tensor | None = None,
) -> None:
    """Raise ValueError naming the offending argument when the indexer inputs do not fit."""
    if q_idx_BTNE.dim() != 4:
        raise ValueError(f"{op}: q_idx must be 4-d [B, T, N, E], got {tuple(q_idx_BTNE.shape)}")
    B, T, N, E = q_idx_BTNE.shape
    if k_idx_BSE.dim() != 3 or k_idx_BSE.shape[0] != B or k_idx_BSE.shape[2] != E:
        raise ValueError(
            f"{op}: k_idx must be [B, S, E] = [{B}, S, {E}], got {tuple(k_idx_BSE.shape)}"
        )
    S = k_idx_BSE.shape[1]
    if T < 1 or S < T:
        raise ValueError(
            f"{op}: need 1 <= T <= S (queries are the last T of the S keys), got T={T}, S={S}"
        )
    if w_idx.dim() not in (3, 4) or w_idx.shape[:2] != (B, T) or w_idx.shape[-1] != N:
        raise ValueError(
            f"{op}: w_idx must be [B, T, N] = [{B}, {T}, {N}] (one selection shared by all "
            f"heads) or [B, T, U, N] (one per KV group), got {tuple(w_idx.shape)}"
        )
    tensors = (q_idx_BTNE, k_idx_BSE, w_idx)
    if len({t.dtype for t in tensors}) != 1 or not q_idx_BTNE.is_floating_point():
        raise ValueError(
            f"{op}: q_idx, k_idx, w_idx must share one floating dtype, got "
            f"{q_idx_BTNE.dtype}, {k_idx_BSE.dtype}, {w_idx.dtype}"
        )
    devices = {t.device for t in (*tensors, *(() if indices is None else (indices,)))}
    if len(devices) != 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {sorted(map(str, devices))}")
    if indices is None:
        return
    if indices.dtype != torch.int64:
        raise ValueError(f"{op}: indices must be int64, got dtype {indices.dtype}")
    want = "[B, T, K]" if w_idx.dim() == 3 else f"[B, T, {w_idx.shape[2]}, K]"
    if indices.dim() != w_idx.dim() or indices.shape[:-1] != w_idx.shape[:-1]:
        raise ValueError(
            f"{op}: indices must be {want} to match w_idx {tuple(w_idx.shape)}, "
            f"got {tuple(indices.shape)}"
        )
    low, high = (int(x) for x in torch.aminmax(indices)) if indices.numel() else (-1, -1)
    if low < -1 or high >= S:
        raise ValueError(
            f"{op}: indices must be -1 (unused) or key positions in [0, {S}), got min "
            f"{low}, max {high}"
        )


def _check_topk(topk: int) -> int:
    if isinstance(topk, bool) or not isinstance(topk, numbers.Integral) or topk < 1:
        raise ValueError(f"{_TOPK}: topk must be an int >= 1, got {topk!r}")
    return int(topk)


def _as_sets(w_idx: torch.Tensor) -> torch.Tensor:
    """w_idx as [B, T, U, N] (a view): shared weights become one selection set."""
    return w_idx.unsqueeze(2) if w_idx.dim() == 3 else w_idx


def _positions(T: int, S: int, device: torch.device) -> torch.Tensor:
    """Positions [T] of the queries, the last T of the S keys."""
    return torch.arange(S - T, S, device=device)


# ----- naive (the oracle) ------------------------------------------------------------------


def indexer_scores_naive(
    q_idx_BTNE: torch.Tensor,
    k_idx_BSE: torch.Tensor,
    w_idx: torch.Tensor,
    scale: float,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indexer scores written out in fp32 with autograd (the oracle): [B, T, (U,) S or K].

    Inputs are validated by the caller. Without ``indices`` every key is scored and future keys
    get -inf; with them, the keys in the index slots are scored and unused (-1) or future slots
    get -inf. Memory is O(B·T·N·S): only for tests and small inputs.
    """
    T, S = q_idx_BTNE.shape[1], k_idx_BSE.shape[1]
    q, k, w_BTUN = q_idx_BTNE.float(), k_idx_BSE.float(), _as_sets(w_idx).float()
    pos_T1 = _positions(T, S, q.device)[:, None]
    if indices is None:
        relu_BTNS = torch.einsum("btne,bse->btns", q, k).relu()
        scores = torch.einsum("btun,btns->btus", w_BTUN, relu_BTNS) * scale
        future_TS = torch.arange(S, device=q.device)[None, :] > pos_T1
        scores = scores.masked_fill(future_TS[:, None, :], float("-inf"))
    else:
        idx_BTUK = _as_sets(indices) if w_idx.dim() == 3 else indices
        b_B111 = torch.arange(q.shape[0], device=q.device).view(-1, 1, 1, 1)
        k_BTUKE = k[b_B111, idx_BTUK.clamp_min(0)]
        relu_BTUNK = torch.einsum("btne,btuke->btunk", q, k_BTUKE).relu()
        scores = torch.einsum("btun,btunk->btuk", w_BTUN, relu_BTUNK) * scale
        used = (idx_BTUK >= 0) & (idx_BTUK <= pos_T1[..., None])
        scores = scores.masked_fill(~used, float("-inf"))
    return scores.squeeze(2) if w_idx.dim() == 3 else scores


def indexer_topk_naive(
    q_idx_BTNE: torch.Tensor,
    k_idx_BSE: torch.Tensor,
    w_idx: torch.Tensor,
    topk: int,
    scale: float,
) -> torch.Tensor:
    """Top-k keys per query from the dense naive scores: a stable sort of the reversed row.

    Sorting the keys in reverse order by score, stably and descending, ranks equal scores by
    descending key position, the tie rule of every backend. Slots past the query's
    min(topk, position + 1) visible keys (and past S) hold -1.
    """
    T, S = q_idx_BTNE.shape[1], k_idx_BSE.shape[1]
    with torch.no_grad():
        scores = indexer_scores_naive(q_idx_BTNE, k_idx_BSE, w_idx, scale)
        order = scores.flip(-1).argsort(dim=-1, descending=True, stable=True)[..., :topk]
        idx = (S - 1) - order
        count_T1 = (_positions(T, S, q_idx_BTNE.device) + 1).clamp(max=topk)[:, None]
        if w_idx.dim() == 4:
            count_T1 = count_T1[:, None]
        slot = torch.arange(idx.shape[-1], device=idx.device)
        idx = torch.where(slot < count_T1, idx, -1)
        pad = topk - idx.shape[-1]
    return torch.nn.functional.pad(idx, (0, pad), value=-1) if pad else idx


# ----- top-k of score rows (shared by the torch and triton paths) ---------------------------


def _break_ties(scores_RP: torch.Tensor, kth_R1: torch.Tensor, topk: int) -> torch.Tensor:
    """Exactly ``topk`` keys per row: all above the k-th value, then the latest equal ones."""
    if scores_RP.shape[0] == 1:
        # one row: its above and tied keys listed, the tied ones' last (topk - above) taken
        above_N = (scores_RP[0] > kth_R1[0]).nonzero().squeeze(1)
        tied_M = (scores_RP[0] == kth_R1[0]).nonzero().squeeze(1)
        return torch.cat([above_N, tied_M[tied_M.numel() - (topk - above_N.numel()) :]])[None]
    above_RP = scores_RP > kth_R1
    tied_RP = scores_RP == kth_R1
    need_R1 = topk - above_RP.sum(-1, keepdim=True)
    # rank of each tied key counted from the end of the row: the latest tied keys win
    rank_RP = tied_RP.flip(-1).cumsum(-1).flip(-1)
    chosen_RP = above_RP | (tied_RP & (rank_RP <= need_R1))
    return chosen_RP.nonzero()[:, 1].view(-1, topk)


def _topk_exact(scores_RP: torch.Tensor, topk: int) -> torch.Tensor:
    """torch.topk finds the k-th value; a row where more than ``topk`` scores reach it has a
    tie at the boundary and is redone by the deterministic rule of :func:`_break_ties`."""
    values_RK, idx_RK = scores_RP.topk(topk, dim=-1, sorted=False)
    kth_R1 = values_RK.amin(-1, keepdim=True)
    tied_R = (scores_RP >= kth_R1).sum(-1, dtype=torch.int32) > topk
    if bool(tied_R.any()):
        rows = tied_R.nonzero().squeeze(1)
        idx_RK[rows] = _break_ties(scores_RP[rows], kth_R1[rows], topk)
    return idx_RK


def select_topk_rows(scores_RP: torch.Tensor, topk: int) -> torch.Tensor:
    """Positions [R, topk] of the ``topk`` largest scores of each row, ties to the later key.

    Every row must hold more than ``topk`` finite scores (future keys are -inf). Rows much
    longer than ``topk`` first drop most keys below a threshold: the value at rank
    topk/stride + 3 standard deviations of every _SAMPLE_STRIDE-th score, which keeps every
    top-k key and about 3·sqrt(topk·stride) more (checked: a row left with fewer than
    ``topk`` candidates takes the exact path). On one core, torch.topk plus the tie check
    over whole rows cost ~20 ns per score; sample, threshold, compaction and top-k of the
    survivors ~10 ns (measured at 16k keys, k = 2048, on a loaded 2-core machine).
    """
    R, P = scores_RP.shape
    if topk * _SAMPLE_MIN_RATIO > P:
        return _topk_exact(scores_RP, topk)
    expected = topk / _SAMPLE_STRIDE
    rank = min(-(-P // _SAMPLE_STRIDE), int(expected + 3.0 * expected**0.5) + 1)
    sample_RM = scores_RP[:, ::_SAMPLE_STRIDE]
    tau_R1 = sample_RM.topk(rank, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    keep_RP = scores_RP >= tau_R1
    if R == 1:
        return _one_row_of_survivors(scores_RP, keep_RP, topk)
    count_R = keep_RP.sum(-1, dtype=torch.int32)
    short_R = count_R < topk
    if bool(short_R.any()):
        # rare: the sample put too many of the row's best keys above the threshold
        idx_RK = torch.empty(R, topk, dtype=torch.int64, device=scores_RP.device)
        rows = short_R.nonzero().squeeze(1)
        idx_RK[rows] = _topk_exact(scores_RP[rows], topk)
        good = (~short_R).nonzero().squeeze(1)
        if good.numel():
            idx_RK[good] = _topk_of_survivors(scores_RP[good], keep_RP[good], count_R[good], topk)
        return idx_RK
    return _topk_of_survivors(scores_RP, keep_RP, count_R, topk)


def _one_row_of_survivors(
    scores_1P: torch.Tensor, keep_1P: torch.Tensor, topk: int
) -> torch.Tensor:
    """``select_topk_rows`` of a single row (a decode step's): the kept keys listed in key
    order, their top-k, the exact path when fewer than ``topk`` survived.

    The row needs none of ``_topk_of_survivors``' packing into a padded block: at 64k keys and
    k = 2048 on one core 0.19 ms against 0.36 ms for the general path.
    """
    kept_N = keep_1P[0].nonzero().squeeze(1)
    if kept_N.numel() < topk:
        return _topk_exact(scores_1P, topk)
    top_1K = _topk_exact(scores_1P[0].index_select(0, kept_N)[None], topk)
    return kept_N.index_select(0, top_1K[0])[None]


def _topk_of_survivors(
    scores_RP: torch.Tensor, keep_RP: torch.Tensor, count_R: torch.Tensor, topk: int
) -> torch.Tensor:
    """Top-k of each row among the kept keys (at least ``topk`` per row), as key positions.

    The kept scores are packed in key order into one -inf padded [R, width] block (so "later
    slot" is "later key" for the tie rule) with 1-d index ops only; the winners' slots map
    back to key positions through the flat list of kept keys.
    """
    R, P = scores_RP.shape
    flat_N = keep_RP.view(-1).nonzero().squeeze(1)
    N = flat_N.numel()
    count_R = count_R.long()
    start_R = count_R.cumsum(0) - count_R
    width = int(count_R.max())
    arange_R = torch.arange(R, device=flat_N.device)
    # kept key n of row r goes to packed slot r·width + (n - start_r): one repeat, no division
    shift_N = (arange_R * width - start_R).repeat_interleave(count_R, output_size=N)
    dest_N = shift_N.add_(torch.arange(N, device=flat_N.device))
    packed = scores_RP.new_full((R * width,), float("-inf"))
    packed.index_copy_(0, dest_N, scores_RP.view(-1).index_select(0, flat_N))
    top_RK = _topk_exact(packed.view(R, width), topk)
    kept_RK = flat_N.index_select(0, top_RK.add_(start_R[:, None]).view(-1)).view(R, topk)
    return kept_RK.sub_((arange_R * P)[:, None])


def _topk_output(
    B: int, T: int, S: int, U: int, topk: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """The [B, T, U, topk] selection with the queries that see at most ``topk`` keys filled
    (all their keys, -1 after), and the first query that needs scoring."""
    first = min(T, max(0, topk - (S - T)))  # query t sees S - T + t + 1 keys
    if first == 0:
        # every query sees more than topk keys: its scoring fills all of its row (a decode
        # step past k tokens spent ~0.1 ms on the fill's small ops)
        return torch.empty((B, T, U, topk), dtype=torch.int64, device=device), 0
    out_BTUK = torch.full((B, T, U, topk), -1, dtype=torch.int64, device=device)
    pos_C = _positions(T, S, device)[:first]
    slot_K = torch.arange(topk, device=device)
    all_CK = torch.where(slot_K[None, :] <= pos_C[:, None], slot_K[None, :], -1)
    out_BTUK[:, :first] = all_CK[None, :, None, :]
    return out_BTUK, first


# ----- torch (the fast CPU path) -------------------------------------------------------------


def _chunks(T: int, S: int, N: int, first: int = 0) -> list[tuple[int, int]]:
    """Query ranges [t0, t1) from ``first`` on, each holding at most _CHUNK_ELEMENTS ReLU
    terms, and small enough that every worker gets one unless a share would be under
    _MIN_CHUNK_QUERIES queries (then the few queries make one chunk: see indexer_topk_torch)."""
    size = max(1, _CHUNK_ELEMENTS // (N * S))
    share = -(-(T - first) // worker_count())
    size = min(size, max(_MIN_CHUNK_QUERIES, share))
    return [(t0, min(t0 + size, T)) for t0 in range(first, T, size)]


def run_on_workers(jobs: list[Callable[[], object]]) -> None:
    """Run the jobs on worker threads (``run_workers``: one each, single-threaded ops) in
    the caller's inference mode, which is per thread: without it a worker could not write
    into tensors the caller created under ``torch.inference_mode``."""
    if not torch.is_inference_mode_enabled():
        run_workers(jobs)
        return

    def in_mode(job: Callable[[], object]) -> None:
        with torch.inference_mode():
            job()

    run_workers([lambda job=job: in_mode(job) for job in jobs])


def _split(costs: list[int], workers: int) -> list[list[int]]:
    """Indices of ``costs`` cut into ``workers`` contiguous runs of about equal total cost."""
    total, runs, acc = sum(costs), [[] for _ in range(workers)], 0
    for i, cost in enumerate(costs):
        runs[min(workers - 1, acc * workers // max(1, total))].append(i)
        acc += cost
    return [run for run in runs if run]


def _weighted_relu(
    q_CNE: torch.Tensor,
    kt_EP: torch.Tensor,
    w_CUN: torch.Tensor,
    ws: Workspace | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_j w_j · ReLU(q_j · k) of queries against keys ``kt_EP`` [E, P]: [C, U, P] (into
    ``out`` when given), the ReLU terms [C·N, P] in ``ws``'s buffer (else a fresh tensor)."""
    C, N, E = q_CNE.shape
    P = kt_EP.shape[1]
    relu = None if ws is None else ws.get("relu", q_CNE, C * N, P)
    relu_RP = torch.mm(q_CNE.reshape(C * N, E), kt_EP, out=relu).relu_()
    return torch.bmm(w_CUN, relu_RP.view(C, N, P), out=out)


def _chunk_scores(
    q_CNE: torch.Tensor, kt_EP: torch.Tensor, w_CUN: torch.Tensor, ws: Workspace
) -> torch.Tensor:
    """Head-weighted ReLU scores [C, U, P] of a chunk's queries (``w_CUN`` comes scaled), in a
    workspace buffer valid until the next chunk; future keys are not masked here.

    Keys go in blocks whose [C·N, block] ReLU terms fit the core's L2 cache, so the matmul
    writes, the ReLU and the head weighting all stay there (one block per step instead of
    three passes over the chunk's 16 MB of terms).
    """
    C, N, _ = q_CNE.shape
    P, U = kt_EP.shape[1], w_CUN.shape[1]
    scores_CUP = ws.get("scores", q_CNE, C, U, P)
    block = max(_MIN_KEY_BLOCK, _L2_ELEMENTS // (C * N))
    for p0 in range(0, P, block):
        p1 = min(P, p0 + block)
        weighted_CUB = ws.get("weighted", q_CNE, C, U, p1 - p0)
        _weighted_relu(q_CNE, kt_EP[:, p0:p1], w_CUN, ws, out=weighted_CUB)
        scores_CUP[:, :, p0:p1] = weighted_CUB
    return scores_CUP


def _mask_future(scores_CUP: torch.Tensor, first_pos: int) -> None:
    """-inf on the keys after each query of a chunk whose first query sits at ``first_pos``."""
    C, P = scores_CUP.shape[0], scores_CUP.shape[2]
    if C == 1:
        # a lone query is scored against the keys up to its own: none lies in its future
        return
    # only the chunk's own diagonal stretch of keys can lie in a query's future
    tail = scores_CUP[:, :, first_pos:]
    future_CP = torch.ones(C, P - first_pos, dtype=torch.bool, device=tail.device).triu(1)
    tail.masked_fill_(future_CP[:, None, :], float("-inf"))


def indexer_topk_torch(
    q_idx_BTNE: torch.Tensor,
    k_idx_BSE: torch.Tensor,
    w_idx: torch.Tensor,
    topk: int,
    scale: float,
) -> torch.Tensor:
    """Top-k selection by query chunks: matmul, ReLU, head weighting, causal mask, top-k.

    Inputs are validated by the caller. Queries that see at most ``topk`` keys take them all
    without scoring; the rest go in chunks of about _CHUNK_ELEMENTS ReLU terms, so no [T, S]
    score matrix exists. Chunks run on ``worker_count()`` worker threads.
    """
    B, T, N, _ = q_idx_BTNE.shape
    S = k_idx_BSE.shape[1]
    w_BTUN = _as_sets(w_idx).float() * scale
    U = w_BTUN.shape[2]
    q, k_BSE = q_idx_BTNE.float(), k_idx_BSE.float()
    out_BTUK, first = _topk_output(B, T, S, U, topk, q.device)
    chunks = [(b, *c) for b in range(B) for c in _chunks(T, S, N, first)]
    if 0 < len(chunks) < worker_count():
        # decoding: too few query chunks to go round, so the workers split the keys instead;
        # the rest of the step is small ops, single-threaded (see single_threaded_ops)
        with single_threaded_ops():
            for b, t0, t1 in chunks:
                P = S - T + t1
                scores_CUP = _scores_by_keys(q[b, t0:t1], k_BSE[b, :P], w_BTUN[b, t0:t1])
                _mask_future(scores_CUP, S - T + t0)
                idx_RK = select_topk_rows(scores_CUP.view(-1, P), topk)
                out_BTUK[b, t0:t1] = idx_RK.view(t1 - t0, U, topk)
        return out_BTUK.squeeze(2) if w_idx.dim() == 3 else out_BTUK
    # keys by dimension only for chunks of many queries: a decode step reads the keys in place
    many = any(t1 - t0 > _FEW_QUERIES for _, t0, t1 in chunks)
    kt_BES = _keys_by_dim(k_idx_BSE) if many else None

    def job(b: int, t0: int, t1: int, ws: Workspace) -> None:
        P = S - T + t1
        q_CNE, w_CUN = q[b, t0:t1], w_BTUN[b, t0:t1]
        if t1 - t0 <= _FEW_QUERIES:
            scores_CUP = _few_query_scores(q_CNE, k_BSE[b, :P], w_CUN)
        else:
            scores_CUP = _chunk_scores(q_CNE, kt_BES[b, :, :P], w_CUN, ws)
        _mask_future(scores_CUP, S - T + t0)
        idx_RK = select_topk_rows(scores_CUP.view(-1, P), topk)
        out_BTUK[b, t0:t1] = idx_RK.view(t1 - t0, U, topk)

    costs = [S - T + t1 for _, _, t1 in chunks]  # keys scored: later chunks cost more
    runs = _split(costs, max(1, min(worker_count(), len(chunks))))
    if runs:
        run_on_workers([lambda run=run: _run_chunks(job, [chunks[i] for i in run]) for run in runs])
    return out_BTUK.squeeze(2) if w_idx.dim() == 3 else out_BTUK


def _keys_by_dim(k_idx_BSE: torch.Tensor) -> torch.Tensor:
    """The fp32 indexer keys of a chunked call as [B, E, S] with keys contiguous along S: a
    view when they come so, else one copy (8 MB at 32k tokens, E = 64).

    A chunk's scores are [rows, E] @ [E, keys]; with Kᵀ a transposed view of row-major keys
    that matmul ran at half speed on this CPU: [128, 64] @ [64, 32768], one core, 6.9 ms
    against 3.6 ms with contiguous rows. A decode step's few rows take the other form, see
    ``_few_query_scores``.
    """
    kt_BES = k_idx_BSE.float().transpose(1, 2)
    return kt_BES if kt_BES.stride(2) == 1 else kt_BES.contiguous()


def _few_query_scores(q_CNE: torch.Tensor, k_PE: torch.Tensor, w_CUN: torch.Tensor) -> torch.Tensor:
    """Scores [C, U, P] of a few queries (``w_CUN`` comes scaled) against row-major keys
    ``k_PE``: ReLU terms keys-major, [P, E] @ [E, C·N], then the head weighting; future keys
    are not masked here.

    For a decode step's 4 heads this form reads cold keys fastest: 32768 keys of 64 on one
    core 1.31 ms, against 1.88-2.06 ms for [C·N, E] @ [E, P] on keys stored by dimension (the
    chunks' form) and 2.13-2.23 ms on a transposed view (three rounds, /tmp/sz29/mm6.py).
    """
    C, N, E = q_CNE.shape
    terms_PR = torch.mm(k_PE, q_CNE.reshape(C * N, E).t()).relu_()
    return torch.matmul(w_CUN, terms_PR.t().view(C, N, k_PE.shape[0]))


def _scores_by_keys(q_CNE: torch.Tensor, k_PE: torch.Tensor, w_CUN: torch.Tensor) -> torch.Tensor:
    """``_few_query_scores`` with the keys split over the workers.

    The top-k stays on one thread: its dozen small ops run 3x slower when two workers contend
    for the interpreter lock (measured: two 32k-key rows on two workers 0.75 ms, one on one
    0.25 ms).
    """
    C, U, P = q_CNE.shape[0], w_CUN.shape[1], k_PE.shape[0]
    scores_CUP = q_CNE.new_empty(C, U, P)

    def part(p0: int, p1: int) -> None:
        scores_CUP[:, :, p0:p1] = _few_query_scores(q_CNE, k_PE[p0:p1], w_CUN)

    ranges = even_ranges(P, worker_count())
    run_on_workers([lambda p0=p0, p1=p1: part(p0, p1) for p0, p1 in ranges])
    return scores_CUP


def _run_chunks(
    job: Callable[[int, int, int, Workspace], None], chunks: list[tuple[int, int, int]]
) -> None:
    """One worker: run ``job`` on its (batch, t0, t1) chunks with one reused workspace."""
    ws = Workspace()
    for chunk in chunks:
        job(*chunk, ws)


class _DenseScores(torch.autograd.Function):
    """Dense indexer scores [B, T, U, S] by query chunks; backward recomputes each chunk."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q_BTNE: torch.Tensor,
        k_BSE: torch.Tensor,
        w_BTUN: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Score every key of every query; future keys -inf."""
        B, T, N, _ = q_BTNE.shape
        S, U = k_BSE.shape[1], w_BTUN.shape[2]
        out_BTUS = torch.full((B, T, U, S), float("-inf"), device=q_BTNE.device)
        for b in range(B):
            for t0, t1 in _chunks(T, S, N):
                P = S - T + t1
                q_CNE, kt_EP = q_BTNE[b, t0:t1], k_BSE[b, :P].T
                scores_CUP = _weighted_relu(q_CNE, kt_EP, w_BTUN[b, t0:t1]).mul_(scale)
                _mask_future(scores_CUP, S - T + t0)
                out_BTUS[b, t0:t1, :, :P] = scores_CUP
        ctx.save_for_backward(q_BTNE, k_BSE, w_BTUN)
        ctx.scale = scale
        return out_BTUS

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, g_BTUS: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        """dq, dk, dw by chunks: the ReLU gate of each term comes from the recomputed q·k."""
        q_BTNE, k_BSE, w_BTUN = ctx.saved_tensors
        B, T, N, E = q_BTNE.shape
        S = k_BSE.shape[1]
        dq, dk, dw = torch.zeros_like(q_BTNE), torch.zeros_like(k_BSE), torch.zeros_like(w_BTUN)
        for b in range(B):
            for t0, t1 in _chunks(T, S, N):
                P, C = S - T + t1, t1 - t0
                q_CNE, k_PE = q_BTNE[b, t0:t1], k_BSE[b, :P]
                dot_CNP = torch.mm(q_CNE.reshape(C * N, E), k_PE.T).view(C, N, P)
                g_CUP = g_BTUS[b, t0:t1, :, :P] * ctx.scale
                _zero_future(g_CUP, S - T + t0)
                dw[b, t0:t1] = torch.bmm(g_CUP, dot_CNP.clamp_min(0.0).transpose(1, 2))
                coef_CNP = torch.bmm(w_BTUN[b, t0:t1].transpose(1, 2), g_CUP)
                coef_CNP.mul_(dot_CNP > 0)
                coef_RP = coef_CNP.view(C * N, P)
                dq[b, t0:t1] = torch.mm(coef_RP, k_PE).view(C, N, E)
                dk[b, :P] += torch.mm(coef_RP.T, q_CNE.reshape(C * N, E))
        return dq, dk, dw, None


def _zero_future(g_CUP: torch.Tensor, first_pos: int) -> None:
    """Zero the incoming gradient on future keys (their scores are the constant -inf)."""
    C, P = g_CUP.shape[0], g_CUP.shape[2]
    future_CP = torch.ones(C, P - first_pos, dtype=torch.bool, device=g_CUP.device).triu(1)
    g_CUP[:, :, first_pos:].masked_fill_(future_CP[:, None, :], 0.0)


class _SlotKeys:
    """One chunk's slot keys of one set, gathered once into a workspace buffer: [C, K, E],
    with the clamped key positions ``rows`` and the used-slot mask (idx >= 0, not future)."""

    def __init__(
        self, k_SE: torch.Tensor, idx_CK: torch.Tensor, pos_C: torch.Tensor, ws: Workspace
    ) -> None:
        C, K = idx_CK.shape
        E = k_SE.shape[1]
        self.rows = torch.clamp_min(idx_CK, 0, out=ws.get("rows", idx_CK, C, K)).view(-1)
        k_RE = torch.index_select(k_SE, 0, self.rows, out=ws.get("k", k_SE, C * K, E))
        self.k_CKE = k_RE.view(C, K, E)
        self.used_CK = (idx_CK >= 0) & (idx_CK <= pos_C[:, None])

    def dots(self, q_CNE: torch.Tensor, ws: Workspace) -> torch.Tensor:
        """q_j · k of every head and slot, [C, N, K], in a workspace buffer."""
        C, N, _ = q_CNE.shape
        out = ws.get("dots", q_CNE, C, N, self.k_CKE.shape[1])
        return torch.bmm(q_CNE, self.k_CKE.transpose(1, 2), out=out)


def slot_scores(
    slots: _SlotKeys, q_CNE: torch.Tensor, w_CN: torch.Tensor, scale: float, ws: Workspace
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [C, K] of one chunk's slots of one set (a fresh tensor, -inf on unused slots)
    and the ReLU'd dots [C, N, K] behind them (a workspace buffer, valid until its next use)."""
    relu_CNK = slots.dots(q_CNE, ws).relu_()
    scores_CK = torch.bmm(w_CN[:, None, :], relu_CNK).squeeze(1).mul_(scale)
    return scores_CK.masked_fill_(~slots.used_CK, float("-inf")), relu_CNK


def slot_backward(
    slots: _SlotKeys,
    q_CNE: torch.Tensor,
    w_CN: torch.Tensor,
    g_CK: torch.Tensor,
    ws: Workspace,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    relu_CNK: torch.Tensor | None = None,
) -> None:
    """Accumulate one chunk's gradients from ``g_CK``, the gradient of its scaled slot scores
    already multiplied by the scale (and 0 on unused slots), into ``grads`` = (dq_CNE, dw_CN,
    dk_SE): dq and dw are the chunk's rows, dk the worker's whole-sequence buffer. The ReLU'd
    dots are recomputed unless a caller that just scored the chunk passes them (consumed)."""
    dq_CNE, dw_CN, dk_SE = grads
    C, K = g_CK.shape
    if relu_CNK is None:
        relu_CNK = slots.dots(q_CNE, ws).relu_()
    # ReLU(x) > 0 exactly where x > 0: the gate needs no pre-activation copy
    gate_CNK = relu_CNK > 0
    dw_CN += torch.bmm(relu_CNK, g_CK[:, :, None]).squeeze(-1)
    # the ReLU'd dots are no longer needed: their buffer takes the coefficients
    coef_CNK = torch.mul(w_CN[:, :, None], g_CK[:, None, :], out=relu_CNK)
    coef_CNK.mul_(gate_CNK)
    dq_CNE += torch.bmm(coef_CNK, slots.k_CKE)
    dk_CKE = ws.get("dk", q_CNE, C, K, q_CNE.shape[2])
    torch.bmm(coef_CNK.transpose(1, 2), q_CNE, out=dk_CKE)
    dk_SE.index_add_(0, slots.rows, dk_CKE.view(-1, q_CNE.shape[2]))


def slot_chunk_runs(
    job: Callable[..., None],
    q_BTNE: torch.Tensor,
    k_BSE: torch.Tensor,
    w_BTUN: torch.Tensor,
    idx_BTUK: torch.Tensor,
    with_dk: bool = False,
) -> torch.Tensor | None:
    """Run ``job(b, t0, t1, u, slots, ws)`` on every (query chunk, set) of a slot pass, the
    chunks on worker threads. With ``with_dk`` each worker also passes its own zeroed dk
    buffer, [B, S, E] like k (``job(..., ws, dk_BSE)``), and the buffers' sum, in worker
    order, is returned."""
    B, T = q_BTNE.shape[:2]
    S, U, K = k_BSE.shape[1], w_BTUN.shape[2], idx_BTUK.shape[3]
    pos_T = _positions(T, S, q_BTNE.device)
    runs = _slot_runs(B, T, K)
    dk_W = [torch.zeros_like(k_BSE) for _ in runs] if with_dk else []

    def run(i: int) -> None:
        ws = Workspace()
        extra = (dk_W[i],) if with_dk else ()
        for b, t0, t1 in runs[i]:
            for u in range(U):
                slots = _SlotKeys(k_BSE[b], idx_BTUK[b, t0:t1, u], pos_T[t0:t1], ws)
                job(b, t0, t1, u, slots, ws, *extra)

    run_on_workers([lambda i=i: run(i) for i in range(len(runs))])
    if not with_dk:
        return None
    for dk in dk_W[1:]:
        dk_W[0] += dk
    return dk_W[0]


class _GatheredScores(torch.autograd.Function):
    """Indexer scores at index slots [B, T, U, K]; backward recomputes the gathered keys."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q_BTNE: torch.Tensor,
        k_BSE: torch.Tensor,
        w_BTUN: torch.Tensor,
        idx_BTUK: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Score the slot keys of every query; unused and future slots -inf."""
        out_BTUK = q_BTNE.new_empty(*idx_BTUK.shape)

        def job(b: int, t0: int, t1: int, u: int, slots: _SlotKeys, ws: Workspace) -> None:
            out_BTUK[b, t0:t1, u] = slot_scores(
                slots, q_BTNE[b, t0:t1], w_BTUN[b, t0:t1, u], scale, ws
            )[0]

        slot_chunk_runs(job, q_BTNE, k_BSE, w_BTUN, idx_BTUK)
        ctx.save_for_backward(q_BTNE, k_BSE, w_BTUN, idx_BTUK)
        ctx.scale = scale
        return out_BTUK

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, g_BTUK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        """dq, dw per query; dk scattered into per-worker buffers summed at the end."""
        q_BTNE, k_BSE, w_BTUN, idx_BTUK = ctx.saved_tensors
        dq, dw = torch.zeros_like(q_BTNE), torch.zeros_like(w_BTUN)

        def job(
            b: int, t0: int, t1: int, u: int, slots: _SlotKeys, ws: Workspace, dk_BSE: torch.Tensor
        ) -> None:
            g_CK = ws.get("g", q_BTNE, *slots.used_CK.shape)
            torch.mul(g_BTUK[b, t0:t1, u], ctx.scale, out=g_CK).masked_fill_(~slots.used_CK, 0.0)
            grads = (dq[b, t0:t1], dw[b, t0:t1, u], dk_BSE[b])
            slot_backward(slots, q_BTNE[b, t0:t1], w_BTUN[b, t0:t1, u], g_CK, ws, grads)

        dk = slot_chunk_runs(job, q_BTNE, k_BSE, w_BTUN, idx_BTUK, with_dk=True)
        return dq, dk, dw, None, None


def _slot_runs(B: int, T: int, K: int) -> list[list[tuple[int, int, int]]]:
    """(batch, t0, t1) chunks of about _CHUNK_SLOTS slots, cut into one run per worker."""
    size = max(1, _CHUNK_SLOTS // K)
    chunks = [(b, t0, min(t0 + size, T)) for b in range(B) for t0 in range(0, T, size)]
    runs = _split([1] * len(chunks), max(1, min(worker_count(), len(chunks))))
    return [[chunks[i] for i in run] for run in runs]


def indexer_scores_torch(
    q_idx_BTNE: torch.Tensor,
    k_idx_BSE: torch.Tensor,
    w_idx: torch.Tensor,
    scale: float,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indexer scores by query chunks with recomputing backwards; fp32 [B, T, (U,) S or K].

    Inputs are validated by the caller. Dense scores keep only the [T, S] output (never the
    [T, N, S] ReLU terms); slot scores gather each chunk's keys, and their backward scatters dk
    into one buffer per worker thread.
    """
    q, k, w = q_idx_BTNE.float(), k_idx_BSE.float(), w_idx.float()
    return scores_in_sets(_DenseScores.apply, _GatheredScores.apply, q, k, w, scale, indices)


def scores_in_sets(
    dense: Callable[..., torch.Tensor],
    slots: Callable[..., torch.Tensor],
    q_BTNE: torch.Tensor,
    k_BSE: torch.Tensor,
    w_idx: torch.Tensor,
    scale: float,
    indices: torch.Tensor | None,
) -> torch.Tensor:
    """Run a backend's dense ``(q, k, w_BTUN, scale)`` or slot ``(q, k, w_BTUN, idx_BTUK,
    scale)`` score function on [B, T, U, ...] sets; shared weights drop the U axis again."""
    w_BTUN = _as_sets(w_idx).contiguous()
    if indices is None:
        scores = dense(q_BTNE, k_BSE, w_BTUN, scale)
    else:
        scores = slots(
            q_BTNE, k_BSE, w_BTUN, _as_sets(indices) if w_idx.dim() == 3 else indices, scale
        )
    return scores.squeeze(2) if w_idx.dim() == 3 else scores


# ----- public ops ----------------------------------------------------------------------------


def indexer_scores(
    q_idx_BTNE: torch.Tensor,
    k_idx_BSE: torch.Tensor,
    w_idx: torch.Tensor,
    scale: float | None = None,
    indices: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Lightning-indexer scores I(t, s), differentiable in q_idx, k_idx and w_idx; fp32.

    q_idx_BTNE is [B, T, N, E] (N indexer heads of width E), k_idx_BSE [B, S, E] (one key per
    token, shared by the heads), w_idx [B, T, N] (one selection shared by all attention heads)
    or [B, T, U, N] (per-KV-group weights, one score row per group). The queries are the last T
    of the S keys. Without ``indices`` returns every key's score, [B, T, S] or [B, T, U, S],
    -inf for future keys (O(T·S) memory: for training losses at moderate lengths and tests);
    with int64 ``indices`` [B, T, K] or [B, T, U, K] returns the scores of those slots, -inf
    for unused (-1) and future slots. ``scale`` defaults to N^-1/2 · E^-1/2. ``backend`` is
    ``naive``, ``torch``, ``triton`` or ``auto`` (triton on CUDA, torch elsewhere). Raises
    ValueError naming the argument for bad shapes, dtypes, devices, index values or backend.
    """
    _validate(_SCORES, q_idx_BTNE, k_idx_BSE, w_idx, indices)
    chosen = resolve_backend(_SCORES, backend, _AVAILABLE, q_idx_BTNE)
    N, E = q_idx_BTNE.shape[2:]
    scale = default_index_scale(N, E) if scale is None else float(scale)
    if chosen == "naive":
        return indexer_scores_naive(q_idx_BTNE, k_idx_BSE, w_idx, scale, indices)
    if chosen == "torch":
        return indexer_scores_torch(q_idx_BTNE, k_idx_BSE, w_idx, scale, indices)
    # imported on first use: it needs triton, and TRITON_INTERPRET is read at import time
    from .triton_indexer import indexer_scores_triton

    return indexer_scores_triton(q_idx_BTNE, k_idx_BSE, w_idx, scale, indices)


def indexer_topk(
    q_idx_BTNE: torch.Tensor,
    k_idx_BSE: torch.Tensor,
    w_idx: torch.Tensor,
    topk: int,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The ``topk`` highest-scoring visible keys of every query: int64 indices, -1 padded.

    Shapes as in :func:`indexer_scores`; returns [B, T, topk] for shared weights or
    [B, T, U, topk] for per-group weights. The causal mask applies before the top-k, so query
    t gets min(topk, position + 1) keys (all of them while it sees no more than ``topk``); the
    slot order is unspecified, equal scores prefer the later key. No gradient flows through a
    selection. Raises ValueError for a bad ``topk`` and as :func:`indexer_scores`.
    """
    _validate(_TOPK, q_idx_BTNE, k_idx_BSE, w_idx)
    topk = _check_topk(topk)
    chosen = resolve_backend(_TOPK, backend, _AVAILABLE, q_idx_BTNE)
    N, E = q_idx_BTNE.shape[2:]
    scale = default_index_scale(N, E) if scale is None else float(scale)
    with torch.no_grad():
        if chosen == "naive":
            return indexer_topk_naive(q_idx_BTNE, k_idx_BSE, w_idx, topk, scale)
        if chosen == "torch":
            return indexer_topk_torch(q_idx_BTNE, k_idx_BSE, w_idx, topk, scale)
        from .triton_indexer import indexer_topk_triton

        return indexer_topk_triton(q_idx_BTNE, k_idx_BSE, w_idx, topk, scale)
