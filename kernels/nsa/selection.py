"""Selected-block attention, NSA's selection branch (``sparsezoo.kernels.nsa.selection``).

Query t of KV head h attends the union of the key blocks listed in ``block_indices_BTHS[b, t, h]``
(block j holds keys [j·block_size, (j+1)·block_size)), shared by all G query heads of the group,
under a token-level causal mask: keys after t are never attended, so the query's own block is
partial and a block that starts after t contributes nothing. One softmax runs over the union.
Backends: ``naive`` (explicit [T, T] mask, the fp32 oracle), ``torch`` (the fast CPU path: the
selection is inverted into per-block query lists, so every block costs a few large matmuls;
short rows run as one masked SDPA call) and ``triton`` (group-centric GPU kernels in
``triton_selection.py``).
Legend: B batch, T time, HQ query heads, H KV heads (HQ % H == 0; q_BTHD holds HQ heads), G
group size HQ // H, D head dim, S selection slots per (query, KV head), N selection blocks
ceil(T / block_size), L keys in one block (block_size: the last block zero-padded), E routing
experts B·H·N (one per batch, KV head and block), W workers, K sort keys (worker, expert),
P legal (query, slot) selections, Q query rows B·T, F features of a query row G·D, C chunks, M
queries of a chunk, R rows of a chunk M·G (the group folded into the rows), O own-block queries
of a chunk, X any trailing dims, 1 a broadcast dim, 2 the pair (lse, delta).
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

from ..backend import check_attention_shapes, oracle_dtype, resolve_backend
from ..block_mask import selected_keys
from ..cpu_workers import Workspace, run_workers, worker_count
from ..group_rows import fold_group_rows, unfold_group_rows

__all__ = ["selected_attention", "selected_attention_naive", "selected_attention_torch"]

_OP = "selected_attention"
_AVAILABLE = ("naive", "torch", "triton")

# Query rows (queries × group) per matmul chunk of the torch path. Block 0 is chosen by every
# query, so without a cap one expert's score matrix would be [B·T·G, L] (134 MB at 32k tokens,
# G = 16). Measured at 16k tokens, G = 16, block 64: one worker runs 2048 to 16384 rows within
# noise; two workers run 17% faster forward and 12% backward at 8192 rows than at 2048, as the
# fewer ops per row hold the shared Python interpreter lock less often.
_CHUNK_ROWS = 8192
# The forward's per-row softmax reference sits _HEADROOM nats below an upper bound of the row's
# scores, so no term exceeds e^40 ≈ 2e17 (sums of millions of terms stay far from the fp32 limit
# e^88). A row whose sum ends below e^-_UNDERFLOW (its best term under ~e^-64 for up to a
# million keys) is recomputed exactly, so that no term that matters can underflow (e^-103).
_HEADROOM = 40.0
_UNDERFLOW = 50.0
# Worker threads of the torch path (see run_workers): a worker needs this many selections to
# pay for its thread, and more than a few workers contend for the Python interpreter lock.
_MIN_PAIRS_PER_WORKER = 4096
_MAX_WORKERS = 8
# Below this mean work per expert (multiply-adds of its score matmul, selections / experts ·
# G·D·block_size) one worker runs the routed path: its per-chunk Python then dominates, and two
# workers contend for the interpreter lock. Measured (fwd+bwd, torch at two threads, one vs two
# workers): 98k per expert (T 4096 x B 2, HQ 4 / H 2, D 32, block 16, S 6) 296 vs 442 ms;
# 2.1M (T 8192, HQ 8 / H 2, D 64, block 32, S 8) 605 vs 539 ms; 67M (T 32k, HQ 16 / H 1, D 64,
# block 64, S 16) 13.2 vs 7.5 s. The crossover lies between the first two; not measured closer.
_MIN_EXPERT_WORK = 2**19
# The routed path pays a dozen small ops per (batch, KV head, block) expert, whatever its
# queries; one masked flash call over all T keys pays ~B·HQ·T²·D multiply-adds instead. Their
# ratio grows with G·T·D·block_size, and below _MASKED_WORK_LIMIT of it the masked call is the
# cheaper (measured, forward+backward on one thread, HQ 4 on H 2, D 32, block 16, S 4, routed
# vs masked: T 32 x B 128 210 vs 14 ms, T 128 x B 32 241 vs 53 ms, T 512 x B 8 149 vs 173 ms,
# T 1024 x B 4 169 vs 352 ms) — short rows, as in the first phases of a length curriculum.
# With two threads the flash call runs ~2x faster and the routed path's two workers slower
# (T 512 x B 8 299 vs 83 ms, T 1024 x B 4 256 vs 168 ms, T 2048 x B 2 291 vs 331 ms), so the
# limit grows with the square of the workers; measured up to two, so it stops growing there.
# _MASKED_MASK_LIMIT caps the elements of its additive [B, H, T·G, T] mask (128 MB in fp32).
_MASKED_WORK_LIMIT = 2**18
_MASKED_MASK_LIMIT = 2**25


def _validate(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    block_indices_BTHS: torch.Tensor,
    block_size: int,
) -> None:
    """Raise ValueError naming the offending argument when the inputs do not fit the op.

    Besides shapes and dtypes this reads the index values (one min, one max and one sort along
    the slots, a few ms at 32k tokens): ids must lie in [-1, N) and be distinct within a row.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise ValueError(f"{_OP}: block_size must be an int >= 1, got {block_size!r}")
    if block_size < 1:
        raise ValueError(f"{_OP}: block_size must be an int >= 1, got {block_size!r}")
    check_attention_shapes(_OP, q_BTHD, k_BTHD, v_BTHD)
    B, T = q_BTHD.shape[:2]
    H = k_BTHD.shape[2]
    if not (q_BTHD.dtype == k_BTHD.dtype == v_BTHD.dtype) or not q_BTHD.is_floating_point():
        raise ValueError(
            f"{_OP}: q, k, v dtypes must be one floating dtype, got "
            f"{q_BTHD.dtype}, {k_BTHD.dtype}, {v_BTHD.dtype}"
        )
    if not (q_BTHD.device == k_BTHD.device == v_BTHD.device == block_indices_BTHS.device):
        raise ValueError(
            f"{_OP}: q, k, v, block_indices devices differ: {q_BTHD.device}, {k_BTHD.device}, "
            f"{v_BTHD.device}, {block_indices_BTHS.device}"
        )
    if block_indices_BTHS.dtype != torch.int64:
        raise ValueError(
            f"{_OP}: block_indices must be int64, got dtype {block_indices_BTHS.dtype}"
        )
    if block_indices_BTHS.dim() != 4 or block_indices_BTHS.shape[:3] != (B, T, H):
        raise ValueError(
            f"{_OP}: block_indices must be [B, T, H, S] = [{B}, {T}, {H}, S], "
            f"got {tuple(block_indices_BTHS.shape)}"
        )
    if block_indices_BTHS.shape[3] < 1:
        raise ValueError(f"{_OP}: block_indices needs S >= 1 slots, got shape (..., 0)")
    N = -(-T // block_size)
    low, high = block_indices_BTHS.min().item(), block_indices_BTHS.max().item()
    if low < -1 or high >= N:
        raise ValueError(
            f"{_OP}: block_indices values must be -1 (unused) or block ids in [0, {N}) for "
            f"T={T}, block_size={block_size}; got min {low}, max {high}"
        )
    # duplicates would count a block's keys twice in the softmax; sorted, they are neighbours
    sorted_BTHS = block_indices_BTHS.sort(dim=-1).values
    if ((sorted_BTHS[..., 1:] == sorted_BTHS[..., :-1]) & (sorted_BTHS[..., 1:] >= 0)).any():
        raise ValueError(f"{_OP}: block_indices repeats a block id within a row (not allowed)")


def _visible_keys(block_indices_BTHS: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, H, T, T] bool: key s is visible to query t of KV head h (in a selected block, s <= t).

    The row's selected blocks as a key mask (``selected_keys``) intersected with the causal
    mask. O(B·H·T²) memory.
    """
    T = block_indices_BTHS.shape[1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=block_indices_BTHS.device).tril()
    visible_BTHT = selected_keys(block_indices_BTHS, block_size) & causal_TT[:, None]
    return visible_BTHT.permute(0, 2, 1, 3)


def selected_attention_naive(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    block_indices_BTHS: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Selected-block attention written out step by step (the oracle); returns q's dtype.

    Computes in fp32, or fp64 for fp64 inputs. Inputs are validated by the caller. Scores over
    all T keys are masked to the row's visible keys (``_visible_keys``) and normalised by one
    softmax. A row with no visible key outputs 0 and gets zero gradients.
    Memory is O(B·HQ·T²): only for tests and small inputs.
    """
    G = q_BTHD.shape[2] // k_BTHD.shape[2]
    mask_BHTT = _visible_keys(block_indices_BTHS, block_size).repeat_interleave(G, dim=1)

    dtype = oracle_dtype(q_BTHD)
    q = q_BTHD.to(dtype)
    k = k_BTHD.to(dtype).repeat_interleave(G, dim=2)
    v = v_BTHD.to(dtype).repeat_interleave(G, dim=2)
    scores_BHTT = torch.einsum("bthd,bshd->bhts", q, k) * scale
    scores_BHTT = scores_BHTT.masked_fill(~mask_BHTT, float("-inf"))
    # softmax of an all -inf row is NaN (also in backward): give it finite scores, then zero it
    empty_BHT1 = ~mask_BHTT.any(dim=-1, keepdim=True)
    probs_BHTT = torch.softmax(scores_BHTT.masked_fill(empty_BHT1, 0.0), dim=-1)
    probs_BHTT = probs_BHTT.masked_fill(empty_BHT1, 0.0)
    o_BTHD = torch.einsum("bhts,bshd->bthd", probs_BHTT, v)
    return o_BTHD.to(q_BTHD.dtype)


def _use_masked(q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, block_size: int) -> bool:
    """Whether one masked flash call beats the routed path here (see _MASKED_WORK_LIMIT)."""
    B, T, HQ, D = q_BTHD.shape
    G = HQ // k_BTHD.shape[2]
    limit = _MASKED_WORK_LIMIT * min(worker_count(), 2) ** 2
    return G * T * D * block_size <= limit and B * HQ * T * T <= _MASKED_MASK_LIMIT


def _selected_attention_masked(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    block_indices_BTHS: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Short rows: one SDPA call over all T keys under an additive mask of the visible keys.

    Each KV head's G query heads are folded into its rows (``fold_group_rows``), so K and V
    are not repeated and the mask is built once per KV head. A row without a visible key
    attends key 0 and is then multiplied by 0: an all -inf row would give NaN, and the
    product gives it output 0 and zero gradients. fp32 inside; differentiable through SDPA's
    own backward (aten's flash kernel on CPU, which saves the row lse, not the scores).
    """
    B, T, HQ, _ = q_BTHD.shape
    H = k_BTHD.shape[2]
    G = HQ // H
    visible_BHTT = _visible_keys(block_indices_BTHS, block_size)
    has_keys_BHT1 = visible_BHTT.any(dim=-1, keepdim=True)
    visible_BHTT[..., :1] |= ~has_keys_BHT1
    mask_BHT1T = torch.zeros(B, H, T, 1, T, device=q_BTHD.device)
    mask_BHT1T.masked_fill_(~visible_BHTT.unsqueeze(3), float("-inf"))
    o_BHYD = F.scaled_dot_product_attention(
        fold_group_rows(q_BTHD.float(), H),
        k_BTHD.float().transpose(1, 2),
        v_BTHD.float().transpose(1, 2),
        attn_mask=mask_BHT1T.expand(B, H, T, G, T).reshape(B, H, T * G, T),
        scale=scale,
    )
    o_BHYD = o_BHYD * has_keys_BHT1.repeat_interleave(G, dim=2)
    return unfold_group_rows(o_BHYD, T).to(q_BTHD.dtype)


@dataclass(frozen=True)
class _Chunk:
    """Up to ``_CHUNK_ROWS`` query rows of one expert, one matmul each for scores and output.

    ``rows_M`` are the chunk's query rows b·T + t (increasing) in the [B·T, G·D] per-head
    layout. When they form one contiguous range, ``first`` is its start and gathers and
    scatters become slices (block 0 is chosen by every query, so its chunks are ranges), else
    ``first`` is -1. ``own_pos_O`` holds t - j·block_size of the chunk's leading queries that
    lie inside the expert's block j, which need the token-level causal mask (often empty).
    """

    rows_M: torch.Tensor
    first: int
    own_pos_O: torch.Tensor

    def take(self, x_QX: torch.Tensor, out_MX: torch.Tensor | None = None) -> torch.Tensor:
        """The chunk's rows of ``x_QX``: a view for a contiguous range, else gathered (into
        ``out_MX`` when given)."""
        if self.first >= 0:
            return x_QX[self.first : self.first + self.rows_M.shape[0]]
        return torch.index_select(x_QX, 0, self.rows_M, out=out_MX)

    def add_to(self, x_QX: torch.Tensor, src_MX: torch.Tensor) -> None:
        """Add ``src_MX`` into the chunk's rows of ``x_QX`` in place (the rows are distinct)."""
        if self.first >= 0:
            x_QX[self.first : self.first + self.rows_M.shape[0]] += src_MX
        else:
            x_QX.index_add_(0, self.rows_M, src_MX)

    def copy_to(self, x_QX: torch.Tensor, src_MX: torch.Tensor) -> None:
        """Overwrite the chunk's rows of ``x_QX`` with ``src_MX``."""
        if self.first >= 0:
            x_QX[self.first : self.first + self.rows_M.shape[0]] = src_MX
        else:
            x_QX.index_copy_(0, self.rows_M, src_MX)


@dataclass(frozen=True)
class _Expert:
    """One worker's share of the queries that selected block ``j`` of KV head ``h`` in batch ``b``.

    ``chunks`` cover the query list in increasing t, so only the first chunk can hold own-block
    queries.
    """

    b: int
    h: int
    j: int
    chunks: tuple[_Chunk, ...]


@dataclass(frozen=True)
class _Routing:
    """The inverted selection: each worker's experts, and which query rows see any key.

    ``has_keys_HQ`` [H, B·T] is True where the row has at least one legal selected block.
    """

    experts_W: tuple[tuple[_Expert, ...], ...]
    has_keys_HQ: torch.Tensor


def _route(block_indices_BTHS: torch.Tensor, block_size: int, G: int, workers: int) -> _Routing:
    """Invert the selection into per-(b, h, j) query lists (CSR), per worker, cut into chunks.

    Worker w owns the query rows b·T + t of one contiguous range, the ranges balanced by
    their number of legal selections, so workers write disjoint output rows. One stable sort
    of the flat selections by (worker, expert id (b·H + h)·N + j) keeps each expert's queries
    in increasing t, so its own-block queries (j·block_size <= t < (j+1)·block_size, the
    smallest legal t) come first. Unused slots and blocks that start after the query sort past
    the end and are cut off: they contribute nothing. Costs one sort and two bincounts of
    B·T·H·S ids plus a Python loop over the chunks; no dense [T, N] mask is built.
    """
    B, T, H, S = block_indices_BTHS.shape
    N = -(-T // block_size)
    E = B * H * N
    device = block_indices_BTHS.device
    t_1T11 = torch.arange(T, device=device).view(1, T, 1, 1)
    legal_BTHS = (block_indices_BTHS >= 0) & (block_indices_BTHS * block_size <= t_1T11)
    cum_pairs_Q = legal_BTHS.sum(dim=(2, 3)).flatten().cumsum(0)
    P = int(cum_pairs_Q[-1])
    # worker of a row: how many of the balanced split points P·w / workers precede its pairs
    splits_W = torch.arange(1, workers, device=device) * P // workers
    worker_BT = torch.searchsorted(splits_W, cum_pairs_Q, right=False).view(B, T)
    # key = worker·E + (b·H + h)·N + j, built in place: this runs at 32k tokens on 0.5M ids
    bh_B1H1 = torch.arange(B * H, device=device).view(B, 1, H, 1)
    key_BTHS = block_indices_BTHS + (bh_B1H1 * N + worker_BT.view(B, T, 1, 1) * E)
    key_P, rows_P = key_BTHS.masked_fill_(~legal_BTHS, workers * E).flatten().sort(stable=True)
    del key_BTHS
    key_P, rows_P = key_P[:P], rows_P[:P]
    # flat position ((b·T + t)·H + h)·S + s, so the query row b·T + t is position // (H·S)
    rows_P.div_(H * S, rounding_mode="floor")
    own_pos_P = (key_P % N).mul_(-block_size).add_(rows_P % T)
    counts_K = torch.bincount(key_P, minlength=workers * E).tolist()
    own_K = torch.bincount(key_P[own_pos_P < block_size], minlength=workers * E).tolist()
    del key_P

    chunk_queries = max(1, _CHUNK_ROWS // G)
    bounds = []  # (key, lo, hi, own queries in lo:hi) per chunk, lo:hi indexing the routed list
    start = 0
    for key, (count, own) in enumerate(zip(counts_K, own_K, strict=True)):
        for lo in range(start, start + count, chunk_queries):
            hi = min(lo + chunk_queries, start + count)
            bounds.append((key, lo, hi, max(0, min(hi, start + own) - lo)))
        start += count
    has_keys_HQ = legal_BTHS.any(dim=-1).flatten(0, 1).T
    if not bounds:
        return _Routing(((),) * workers, has_keys_HQ)
    lo_C = torch.tensor([lo for _, lo, _, _ in bounds], device=device)
    hi_C = torch.tensor([hi for _, _, hi, _ in bounds], device=device)
    first_C = rows_P[lo_C]
    # rows increase within an expert, so a chunk is one range iff last - first = size - 1
    first_C = torch.where(rows_P[hi_C - 1] - first_C == hi_C - 1 - lo_C, first_C, -1).tolist()
    sizes = [hi - lo for _, lo, hi, _ in bounds]
    rows_C, own_pos_C = rows_P.split(sizes), own_pos_P.split(sizes)

    chunks_K: dict[int, list[_Chunk]] = {}
    no_own = own_pos_P[:0].clone()
    for (key, _, _, own), rows_M, own_pos_M, first in zip(
        bounds, rows_C, own_pos_C, first_C, strict=True
    ):
        # a copy of the few own positions: a view would keep all P positions alive
        own_pos_O = own_pos_M[:own].clone() if own else no_own
        chunks_K.setdefault(key, []).append(_Chunk(rows_M, first, own_pos_O))
    experts_W: list[list[_Expert]] = [[] for _ in range(workers)]
    for key, chunks in chunks_K.items():
        w, e = divmod(key, E)
        bh, j = divmod(e, N)
        experts_W[w].append(_Expert(bh // H, bh % H, j, tuple(chunks)))
    return _Routing(tuple(tuple(experts) for experts in experts_W), has_keys_HQ)


def _workers(block_indices_BTHS: torch.Tensor, features: int, block_size: int) -> int:
    """Worker threads for the torch path: torch's intra-op thread count, capped by the work.

    ``features`` is G·D, a query row's width. Each worker needs at least
    _MIN_PAIRS_PER_WORKER selections to pay for its thread, at most _MAX_WORKERS run because
    the Python loop shares one interpreter lock, and experts smaller than _MIN_EXPERT_WORK on
    average get one worker.
    """
    B, T, H, _ = block_indices_BTHS.shape
    pairs = int((block_indices_BTHS >= 0).sum())
    experts = B * H * -(-T // block_size)
    if pairs * features * block_size < _MIN_EXPERT_WORK * experts:
        return 1
    return max(1, min(worker_count(), _MAX_WORKERS, pairs // _MIN_PAIRS_PER_WORKER))


def _future_mask(block_size: int, device: torch.device) -> torch.Tensor:
    """[block_size, block_size] mask of the keys after each position of a block: column > row."""
    return torch.ones(block_size, block_size, dtype=torch.bool, device=device).triu(1)


def _by_head(x_BTHD: torch.Tensor, H: int) -> torch.Tensor:
    """View or copy [B, T, H·G, D] as [H, B·T, G·D]: one KV head's query rows are contiguous."""
    B, T, HQ, D = x_BTHD.shape
    # with H = 1 the transpose only moves a size-1 dim and contiguous() copies nothing
    return x_BTHD.reshape(B * T, H, HQ // H * D).transpose(0, 1).contiguous()


def _from_heads(x_HQF: torch.Tensor, B: int, T: int, D: int) -> torch.Tensor:
    """Inverse of ``_by_head``: [H, B·T, G·D] back to [B, T, H·G, D]."""
    return x_HQF.transpose(0, 1).reshape(B, T, -1, D)


def _chunk_scores(
    c: _Chunk,
    q_QF: torch.Tensor,
    kscaled_T_DL: torch.Tensor,
    future_NL: torch.Tensor,
    ws: Workspace,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's query rows and scaled scores against its block: (q_RD, scores_RL), the
    latter (and gathered rows) in workspace buffers valid until the next chunk.

    One [R, D] @ [D, L] matmul; the chunk's own-block queries get -inf on the keys after them,
    looked up in ``future_NL`` (row i marks the keys of a block after block position i).
    """
    M = c.rows_M.shape[0]
    D, L = kscaled_T_DL.shape
    q_RD = c.take(q_QF, ws.get("q", q_QF, M, q_QF.shape[1])).view(-1, D)
    scores_RL = torch.mm(q_RD, kscaled_T_DL, out=ws.get("scores", q_QF, q_RD.shape[0], L))
    own = c.own_pos_O.shape[0]
    if own:
        future_OL = future_NL.index_select(0, c.own_pos_O)[:, :L]
        scores_RL.view(M, -1, L)[:own].masked_fill_(future_OL[:, None, :], float("-inf"))
    return q_RD, scores_RL


def _by_block(x_BTHD: torch.Tensor, block_size: int, transpose: bool) -> torch.Tensor:
    """A contiguous block-major copy of keys or values: [B, H, N, L, D], or [B, H, N, D, L]
    with ``transpose``; L = block_size, the last block zero-padded past T.

    One copy per call instead of a slice, scale and transpose per expert (~40 us each, a
    thousand experts per call at 4k tokens with blocks of 16). A contiguous Kᵀ makes the
    chunk matmuls ~8% faster (measured, [2048, 64] @ [64, 64]). The padding is never attended:
    a block is legal only for queries at or after its start, so every query of a short last
    block is an own-block query, and the causal mask hides the keys after it, padding included.
    """
    B, T, H, D = x_BTHD.shape
    N = -(-T // block_size)
    x_BNLHD = F.pad(x_BTHD, (0, 0, 0, 0, 0, N * block_size - T)).view(B, N, block_size, H, D)
    order = (0, 3, 1, 4, 2) if transpose else (0, 3, 1, 2, 4)
    return x_BNLHD.permute(order).contiguous()


def _from_blocks(x_BHNLD: torch.Tensor, T: int) -> torch.Tensor:
    """Inverse of ``_by_block`` without transpose: [B, H, N, L, D] back to [B, T, H, D]."""
    B, H, N, L, D = x_BHNLD.shape
    return x_BHNLD.permute(0, 2, 3, 1, 4).reshape(B, N * L, H, D)[:, :T]


def _accumulate_experts(
    experts: tuple[_Expert, ...],
    q_HQF: torch.Tensor,
    kscaled_BHNDL: torch.Tensor,
    v_BHNLD: torch.Tensor,
    ref_HQG: torch.Tensor,
    acc_HQF: torch.Tensor,
    sum_HQG: torch.Tensor,
    future_NL: torch.Tensor,
) -> None:
    """One worker's forward pass: add sum(exp(s - ref)) and sum(exp(s - ref) v) into its rows.

    The per-row reference ref is fixed for the whole pass, so a chunk is just gather, matmul,
    exp, matmul, scatter-add (a query appears at most once per expert: no collisions). When
    every ref is 0 the subtraction is skipped. Keys come scaled and transposed, both
    block-major (``_by_block``).
    """
    G = ref_HQG.shape[2]
    shifted = bool(ref_HQG.any())
    ws = Workspace()
    for ex in experts:
        kscaled_T_DL, v_LD = kscaled_BHNDL[ex.b, ex.h, ex.j], v_BHNLD[ex.b, ex.h, ex.j]
        q_QF, acc_QF, ref_QG, sum_QG = q_HQF[ex.h], acc_HQF[ex.h], ref_HQG[ex.h], sum_HQG[ex.h]
        for c in ex.chunks:
            M = c.rows_M.shape[0]
            _, probs_RL = _chunk_scores(c, q_QF, kscaled_T_DL, future_NL, ws)
            probs_MGL = probs_RL.view(M, G, -1)
            if shifted:
                probs_MGL.sub_(c.take(ref_QG).unsqueeze(-1))
            probs_MGL.exp_()
            c.add_to(sum_QG, probs_MGL.sum(dim=-1))
            out_RD = torch.mm(probs_RL, v_LD, out=ws.get("out", v_LD, M * G, v_LD.shape[1]))
            c.add_to(acc_QF, out_RD.view(M, -1))


def _row_max_experts(
    experts: tuple[_Expert, ...],
    q_HQF: torch.Tensor,
    kscaled_BHNDL: torch.Tensor,
    max_HQG: torch.Tensor,
    future_NL: torch.Tensor,
) -> None:
    """One worker's exact row maxima of the scores over its selected keys, into ``max_HQG``."""
    G = max_HQG.shape[2]
    ws = Workspace()
    for ex in experts:
        kscaled_T_DL = kscaled_BHNDL[ex.b, ex.h, ex.j]
        q_QF, max_QG = q_HQF[ex.h], max_HQG[ex.h]
        for c in ex.chunks:
            M = c.rows_M.shape[0]
            _, scores_RL = _chunk_scores(c, q_QF, kscaled_T_DL, future_NL, ws)
            block_max_MG = scores_RL.view(M, G, -1).amax(dim=-1)
            c.copy_to(max_QG, torch.maximum(c.take(max_QG), block_max_MG))


def _score_bound(
    q_HQF: torch.Tensor,
    k_BTHD: torch.Tensor,
    scale: float,
    block_indices_BTHS: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Upper bound [H, B·T, G] of every score a row can see: |q| · max |scale·k| over its blocks.

    By Cauchy-Schwarz q·k <= |q|·|k|; key norms are maximised per block, then over the row's
    legal selected blocks (0 for rows without any).
    """
    H, Q, _ = q_HQF.shape
    B, T, _, S = block_indices_BTHS.shape
    N = -(-T // block_size)
    D = k_BTHD.shape[3]
    knorm_BTH = F.pad(k_BTHD.norm(dim=-1) * abs(scale), (0, 0, 0, N * block_size - T))
    kmax_BHN = knorm_BTH.view(B, N, block_size, H).amax(dim=2).transpose(1, 2)
    idx_BHTS = block_indices_BTHS.transpose(1, 2)
    t_11T1 = torch.arange(T, device=q_HQF.device).view(1, 1, T, 1)
    legal_BHTS = (idx_BHTS >= 0) & (idx_BHTS * block_size <= t_11T1)
    kmax_BHTS = kmax_BHN.gather(2, idx_BHTS.clamp_min(0).reshape(B, H, T * S)).view(B, H, T, S)
    kbound_HBT = torch.where(legal_BHTS, kmax_BHTS, 0.0).amax(dim=-1).transpose(0, 1)
    qnorm_HQG = q_HQF.view(H, Q, -1, D).norm(dim=-1)
    return qnorm_HQG * kbound_HBT.reshape(H, Q, 1)


def _forward(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    block_indices_BTHS: torch.Tensor,
    routing: _Routing,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the selected blocks, workers in parallel: returns fp32 (o_HQF, lse_HQG).

    Rows accumulate exp(s - ref) against a fixed per-row reference ref = max(0, bound -
    _HEADROOM), where ``_score_bound`` >= every score of the row, so terms stay below
    exp(_HEADROOM) and never overflow, without the per-block maxima and rescaling of an online
    softmax (measured ~18% of the forward). The bound can be loose: a row whose sum ends below
    exp(-_UNDERFLOW) may have lost precision to underflow, so such rows (none unless all its
    scores sit ~90 nats under the bound) are recomputed against their exact maximum, found by
    an extra pass over their blocks. Workers own disjoint query rows and share the
    accumulators without races. Rows that selected nothing keep sum 0, output 0, lse -inf.
    """
    B, T, HQ, D = q_BTHD.shape
    H = k_BTHD.shape[2]
    q_HQF = _by_head(q_BTHD.float(), H)
    k_BTHD, v_BTHD = k_BTHD.float(), v_BTHD.float()
    future_NL = _future_mask(block_size, q_HQF.device)
    bound_HQG = _score_bound(q_HQF, k_BTHD, scale, block_indices_BTHS, block_size)
    ref_HQG = (bound_HQG - _HEADROOM).clamp_min_(0.0)
    del bound_HQG
    G = HQ // H
    acc_HQF = torch.zeros_like(q_HQF)
    sum_HQG = torch.zeros_like(ref_HQG)
    kscaled_BHNDL = _by_block(k_BTHD * scale, block_size, transpose=True)
    v_BHNLD = _by_block(v_BTHD, block_size, transpose=False)
    inputs = (q_HQF, kscaled_BHNDL, v_BHNLD, ref_HQG, acc_HQF, sum_HQG, future_NL)
    run_workers([functools.partial(_accumulate_experts, ex, *inputs) for ex in routing.experts_W])

    redo_HQ = routing.has_keys_HQ & (sum_HQG < math.exp(-_UNDERFLOW)).any(dim=-1)
    if redo_HQ.any():
        # rare, so one worker: route only the redone rows, find their maxima, accumulate again
        redo_BTH1 = redo_HQ.view(H, B, T).permute(1, 2, 0).unsqueeze(-1)
        redo = _route(torch.where(redo_BTH1, block_indices_BTHS, -1), block_size, G, 1)
        experts = redo.experts_W[0]
        ref_HQG[redo_HQ] = float("-inf")
        max_inputs = (q_HQF, kscaled_BHNDL, ref_HQG, future_NL)
        run_workers([functools.partial(_row_max_experts, experts, *max_inputs)])
        acc_HQF[redo_HQ] = 0.0
        sum_HQG[redo_HQ] = 0.0
        run_workers([functools.partial(_accumulate_experts, experts, *inputs)])
    # rows that selected nothing: acc 0, sum 0 -> output 0 (the clamp avoids 0/0), lse -inf
    norm_HQG1 = sum_HQG.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    o_HQF = acc_HQF.view(H, B * T, G, D).div_(norm_HQG1).view(H, B * T, -1)
    return o_HQF, ref_HQG + sum_HQG.log()


def _backward_experts(
    experts: tuple[_Expert, ...],
    q_HQF: torch.Tensor,
    do_HQF: torch.Tensor,
    kscaled_BHNDL: torch.Tensor,
    v_BHNDL: torch.Tensor,
    lse_delta_HQG2: torch.Tensor,
    dq_HQF: torch.Tensor,
    dk_BHNLD: torch.Tensor,
    dv_BHNLD: torch.Tensor,
    future_NL: torch.Tensor,
) -> None:
    """One worker's backward: dq into its query rows, unscaled dk and dv into its own buffers.

    Per chunk the probabilities are recomputed from the saved row lse, P = exp(S - lse), and
    with delta = rowsum(dO ⊙ O): dS = P ⊙ (dO V_jᵀ - delta), dQ = dS (scale·K_j) (added
    into the chunk's query rows), dK_j += dSᵀ Q (the caller applies the scale), dV_j += Pᵀ dO.
    Keys, values and their gradients are block-major (``_by_block``), K and V transposed.
    """
    G = lse_delta_HQG2.shape[2]
    ws = Workspace()
    for ex in experts:
        kscaled_T_DL, v_T_DL = kscaled_BHNDL[ex.b, ex.h, ex.j], v_BHNDL[ex.b, ex.h, ex.j]
        dk_LD, dv_LD = dk_BHNLD[ex.b, ex.h, ex.j], dv_BHNLD[ex.b, ex.h, ex.j]
        kscaled_LD = kscaled_T_DL.T
        q_QF, do_QF, dq_QF = q_HQF[ex.h], do_HQF[ex.h], dq_HQF[ex.h]
        lse_delta_QG2 = lse_delta_HQG2[ex.h]
        for c in ex.chunks:
            M = c.rows_M.shape[0]
            R = M * G
            q_RD, probs_RL = _chunk_scores(c, q_QF, kscaled_T_DL, future_NL, ws)
            do_RD = c.take(do_QF, ws.get("do", do_QF, M, do_QF.shape[1])).view(R, -1)
            lse_delta_MG2 = c.take(lse_delta_QG2)
            # scores become probabilities in place: P = exp(S - lse) of the merged softmax
            probs_MGL = probs_RL.view(M, G, -1).sub_(lse_delta_MG2[..., :1]).exp_()
            dv_LD.addmm_(probs_RL.T, do_RD)
            dscores_RL = torch.mm(do_RD, v_T_DL, out=ws.get("dscores", do_RD, R, v_T_DL.shape[1]))
            dscores_RL.view(M, G, -1).sub_(lse_delta_MG2[..., 1:]).mul_(probs_MGL)
            dq_RD = torch.mm(dscores_RL, kscaled_LD, out=ws.get("dq", do_RD, *do_RD.shape))
            c.add_to(dq_QF, dq_RD.view(M, -1))
            dk_LD.addmm_(dscores_RL.T, q_RD)


def _backward(
    do_BTHD: torch.Tensor,
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    o_HQF: torch.Tensor,
    lse_HQG: torch.Tensor,
    routing: _Routing,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact gradients through the merged softmax, workers in parallel: fp32 (dq, dk, dv).

    Workers own disjoint query rows, so dq is shared; dk and dv rows are shared between
    workers (a block is chosen by queries of several workers), so each worker accumulates
    into its own dk/dv buffers, summed in worker order afterwards: no atomics, deterministic.
    """
    B, T, HQ, D = q_BTHD.shape
    H = k_BTHD.shape[2]
    q_HQF = _by_head(q_BTHD.float(), H)
    do_HQF = _by_head(do_BTHD.float(), H)
    k_BTHD, v_BTHD = k_BTHD.float(), v_BTHD.float()
    # lse and delta side by side: one small gather per chunk fetches both
    lse_delta_HQG2 = torch.stack([lse_HQG, torch.empty_like(lse_HQG)], dim=-1)
    # delta = rowsum(dO ⊙ O) over blocks of chunk size, so no q-sized temporary is ever alive
    block = max(1, _CHUNK_ROWS // (HQ // H))
    for start in range(0, B * T, block):
        rows = slice(start, start + block)
        do_o_HMGD = (do_HQF[:, rows] * o_HQF[:, rows]).view(H, -1, HQ // H, D)
        torch.sum(do_o_HMGD, dim=-1, out=lse_delta_HQG2[:, rows, :, 1])
    dq_HQF = torch.zeros_like(q_HQF)
    kscaled_BHNDL = _by_block(k_BTHD * scale, block_size, transpose=True)
    v_BHNDL = _by_block(v_BTHD, block_size, transpose=True)
    # one block-major dk/dv pair per worker, summed into the first in worker order
    shape = (B, H, -(-T // block_size), block_size, D)
    dk_W = [k_BTHD.new_zeros(shape) for _ in routing.experts_W]
    dv_W = [v_BTHD.new_zeros(shape) for _ in routing.experts_W]
    future_NL = _future_mask(block_size, q_HQF.device)
    shared = (q_HQF, do_HQF, kscaled_BHNDL, v_BHNDL, lse_delta_HQG2, dq_HQF)
    run_workers(
        [
            functools.partial(_backward_experts, experts, *shared, dk_BHNLD, dv_BHNLD, future_NL)
            for experts, dk_BHNLD, dv_BHNLD in zip(routing.experts_W, dk_W, dv_W, strict=True)
        ]
    )
    for dk_BHNLD, dv_BHNLD in zip(dk_W[1:], dv_W[1:], strict=True):
        dk_W[0] += dk_BHNLD
        dv_W[0] += dv_BHNLD
    dk_BTHD = _from_blocks(dk_W[0].mul_(scale), T)
    return _from_heads(dq_HQF, B, T, D), dk_BTHD, _from_blocks(dv_W[0], T)


class _SelectedAttention(torch.autograd.Function):
    """Autograd wrapper of the torch path: routes once, saves the row lse, recomputes scores."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q_BTHD: torch.Tensor,
        k_BTHD: torch.Tensor,
        v_BTHD: torch.Tensor,
        block_indices_BTHS: torch.Tensor,
        block_size: int,
        scale: float,
    ) -> torch.Tensor:
        """Route the selection into per-block query lists, run the forward, save for backward."""
        G = q_BTHD.shape[2] // k_BTHD.shape[2]
        workers = _workers(block_indices_BTHS, G * q_BTHD.shape[3], block_size)
        routing = _route(block_indices_BTHS, block_size, G, workers)
        o_HQF, lse_HQG = _forward(
            q_BTHD, k_BTHD, v_BTHD, block_indices_BTHS, routing, block_size, scale
        )
        ctx.save_for_backward(q_BTHD, k_BTHD, v_BTHD, o_HQF, lse_HQG)
        ctx.routing, ctx.block_size, ctx.scale = routing, block_size, scale
        B, T, _, D = q_BTHD.shape
        return _from_heads(o_HQF, B, T, D).to(q_BTHD.dtype)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, do_BTHD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None, None]:
        """Gradients for q, k, v in their dtypes; indices, block size and scale get none."""
        q_BTHD, k_BTHD, v_BTHD, o_HQF, lse_HQG = ctx.saved_tensors
        dq, dk, dv = _backward(
            do_BTHD, q_BTHD, k_BTHD, v_BTHD, o_HQF, lse_HQG, ctx.routing, ctx.block_size, ctx.scale
        )
        return dq.to(q_BTHD.dtype), dk.to(k_BTHD.dtype), dv.to(v_BTHD.dtype), None, None, None


def selected_attention_torch(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    block_indices_BTHS: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Selected-block attention by MoE-style regrouping of queries per key block; differentiable.

    Inputs are validated by the caller. The selection is inverted into one query list per
    (batch, KV head, block) "expert"; each expert scores its gathered queries (the G heads of a
    group folded into the rows) against its block's keys with one matmul per chunk, so work is
    ~S·block_size keys per query in large matmuls. The forward sums every block against a
    fixed per-row reference derived from a score bound (rows that underflow are redone against
    their exact maxima); the backward recomputes probabilities from the saved row lse (the
    FlashAttention recipe). Work is split over ``worker_count()`` worker threads that
    own disjoint query rows (see ``run_workers``). Short rows, where the per-expert ops would
    cost more than attending every key, run as one masked SDPA call instead
    (``_use_masked``). fp32 accumulation; returns o_BTHD in q's dtype.
    """
    if _use_masked(q_BTHD, k_BTHD, block_size):
        return _selected_attention_masked(
            q_BTHD, k_BTHD, v_BTHD, block_indices_BTHS, block_size, scale
        )
    return _SelectedAttention.apply(q_BTHD, k_BTHD, v_BTHD, block_indices_BTHS, block_size, scale)


def selected_attention(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    block_indices_BTHS: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of each query over its selected key blocks, causal per token; returns o_BTHD.

    q_BTHD is [B, T, HQ, D], k_BTHD and v_BTHD are [B, T, H, D] with HQ a multiple of H; query
    head h reads KV head h // (HQ // H). block_indices_BTHS is int64 [B, T, H, S]: the blocks
    (block j = keys [j·block_size, (j+1)·block_size)) that query t attends through KV head h,
    shared by the whole query group, -1 for an unused slot. Valid ids must be distinct within a
    row (duplicates are rejected). Keys after t are never attended, also inside a selected
    block, so a block starting after t contributes nothing; a row with no visible key outputs 0
    with zero (finite) gradients. One softmax spans all selected keys. ``scale`` defaults to
    D**-0.5; fp32 and bf16 are supported (fp32 accumulation) and the output has q's dtype.
    Differentiable in q, k, v. ``backend`` is ``naive``, ``torch``, ``triton`` or ``auto``
    (triton on CUDA, torch elsewhere); the torch backend uses ``worker_count()``
    worker threads and must not be called from several threads at once. The index values are
    checked on every call (a host sync on CUDA). Raises ValueError naming the argument for bad
    shapes, dtypes, devices, block_size, index values or backend.
    """
    _validate(q_BTHD, k_BTHD, v_BTHD, block_indices_BTHS, block_size)
    block_size = int(block_size)
    chosen = resolve_backend(_OP, backend, _AVAILABLE, q_BTHD)
    scale = q_BTHD.shape[-1] ** -0.5 if scale is None else float(scale)
    if chosen == "naive":
        return selected_attention_naive(
            q_BTHD, k_BTHD, v_BTHD, block_indices_BTHS, block_size, scale
        )
    if chosen == "torch":
        return selected_attention_torch(
            q_BTHD, k_BTHD, v_BTHD, block_indices_BTHS, block_size, scale
        )
    # imported on first use: it needs triton, and TRITON_INTERPRET is read at import time
    from .triton_selection import selected_attention_triton

    return selected_attention_triton(q_BTHD, k_BTHD, v_BTHD, block_indices_BTHS, block_size, scale)
