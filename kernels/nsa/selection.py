"""Selected-block attention, NSA's selection branch (``sparsezoo.kernels.nsa.selection``).

Query t of KV head h attends the union of the key blocks listed in ``block_indices_BTHS[b, t, h]``
(block j holds keys [j·block_size, (j+1)·block_size)), shared by all G query heads of the group,
under a token-level causal mask: keys after t are never attended, so the query's own block is
partial and a block that starts after t contributes nothing. One softmax runs over the union.
Backends: ``naive`` (explicit [T, T] mask, the fp32 oracle), ``torch`` (the fast CPU path: the
selection is inverted into per-block query lists, batched so that a few ops serve many blocks;
short rows run as one masked SDPA call) and ``triton`` (group-centric GPU kernels in
``triton_selection.py``).
Legend: B batch, T time, HQ query heads, H KV heads (HQ % H == 0; q_BTHD holds HQ heads), G
group size HQ // H, D head dim, S selection slots per (query, KV head), N selection blocks
ceil(T / block_size), L keys in one block (block_size: the last block zero-padded), E routing
experts B·H·N (one per batch, KV head and block; the block-major layout), W workers, K sort
keys (worker, expert), P legal (query, slot) selections, Q query rows B·T, Z query rows of every
KV head H·B·T, F features of a query row G·D, C chunks of a batch, M query slots of a chunk
(padded), Y slots of a batch C·M, R rows of a chunk M·G (the group folded into the rows),
O slots of a chunk under the token-level causal mask, X any trailing dims, 1 a broadcast dim,
2 the pair (lse, delta).
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
from ..base2 import LN2, LOG2E
from ..block_mask import selected_keys
from ..cpu_workers import Workspace, run_workers, worker_count
from ..group_rows import fold_group_rows, unfold_group_rows

__all__ = ["selected_attention", "selected_attention_naive", "selected_attention_torch"]

_OP = "selected_attention"
_AVAILABLE = ("naive", "torch", "triton")

# Query rows (queries × group, padding included) per batch of the torch path. Block 0 is chosen
# by every query, so without a cap one expert's score matrix would be [B·T·G, L] (134 MB at 32k
# tokens, G = 16); short query lists share a batch up to the cap (see _Batch). Measured at 16k
# tokens, G = 16, block 64: one worker runs 2048 to 16384 rows within noise; two workers run 17%
# faster forward and 12% backward at 8192 rows than at 2048, as the fewer ops per row hold the
# shared Python interpreter lock less often. At the passkey shape (T 4096 x B 2, HQ 4 / H 2, D
# 32, block 16, S 6) 4096 to 16384 rows run within noise.
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
# G·D·block_size) one worker runs the routed path: its per-batch Python then weighs, and two
# workers contend for the interpreter lock. Measured (fwd+bwd, torch at two threads, one vs two
# workers) before chunks were batched: 98k per expert (T 4096 x B 2, HQ 4 / H 2, D 32, block 16,
# S 6) 296 vs 442 ms; 2.1M (T 8192, HQ 8 / H 2, D 64, block 32, S 8) 605 vs 539 ms; 67M (T 32k,
# HQ 16 / H 1, D 64, block 64, S 16) 13.2 vs 7.5 s. With batches the first runs 118-172 vs
# 97-142 ms (five runs each): within noise, so the threshold stands.
_MIN_EXPERT_WORK = 2**19
# The routed path pays its routing (a sort of the B·T·H·S selections) and a dozen ops per batch;
# one masked flash call over all T keys pays ~B·HQ·T²·D multiply-adds instead. Their ratio grows
# with G·T·D·block_size, and up to _MASKED_WORK_LIMIT of it the masked call is the cheaper.
# Measured (forward+backward, HQ 4 on H 2, D 32, block 16, S 4, routed vs masked in ms, two
# threads / one thread): T 32 x B 128 49 vs 24 / 40 vs 30, T 64 x B 64 43 vs 26 / 48 vs 32,
# T 128 x B 32 69 vs 28 / 68 vs 45, T 256 x B 16 61 vs 61 / 64 vs 77, T 512 x B 8 67 vs 105 /
# 53 vs 192, T 1024 x B 4 78 vs 239 / 80 vs 396 — short rows, as in the first phases of a
# length curriculum. (Before the routed path batched its chunks the crossover lay between T 512
# and T 1024 at two threads.) _MASKED_MASK_LIMIT caps the elements of its additive [B, H, T·G, T]
# mask (128 MB in fp32).
_MASKED_WORK_LIMIT = 2**17
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
    return G * T * D * block_size <= _MASKED_WORK_LIMIT and B * HQ * T * T <= _MASKED_MASK_LIMIT


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
class _Batch:
    """A few chunks of routed queries, padded to one length: each op of the batch is one call.

    A chunk is up to ``_CHUNK_ROWS`` // G queries of one expert's list (batch b, KV head h,
    block j); a batch holds C chunks of similar length padded to M slots, so scores are one
    [C, M·G, D] @ [C, D, L] bmm. At the passkey shape (blocks of 16, ~100 queries per block) a
    chunk is a few small matmuls and its dozen ops' Python and dispatch cost more than their
    arithmetic; batching them (~30 batches for ~1000 lists) cut the op's forward there from 214
    to ~60 ms and its forward+backward from 576 to ~130 ms (two threads).

    ``rows_Y`` are the Y = C·M slots' flat query rows h·B·T + b·T + t into the [H·B·T, G·D]
    per-head layout, increasing within a chunk; a pad slot repeats its chunk's first row (a
    row its worker owns) and scores -inf, so it adds exact zeros. ``first`` is the start of
    ``rows_Y`` when it is one contiguous range (C = 1: block 0, chosen by every query, has long
    ones), so gathers and scatters are slices; else -1. ``blocks_C`` are the chunks' flat block
    ids (b·H + h)·N + j into the block-major keys and values. ``future_COL`` marks, for the
    first O slots of every chunk, the keys after the slot's query: own-block queries (the
    smallest t of a list, so they come first) and pads (all keys); None when no slot needs it.
    """

    rows_Y: torch.Tensor
    first: int
    blocks_C: torch.Tensor
    future_COL: torch.Tensor | None

    def take(self, x_ZX: torch.Tensor, out_YX: torch.Tensor | None = None) -> torch.Tensor:
        """The slots' rows of ``x_ZX``: a view for a contiguous range, else gathered (into
        ``out_YX`` when given)."""
        if self.first >= 0:
            return x_ZX[self.first : self.first + self.rows_Y.shape[0]]
        return torch.index_select(x_ZX, 0, self.rows_Y, out=out_YX)

    def add_to(self, x_ZX: torch.Tensor, src_YX: torch.Tensor, alpha: float = 1.0) -> None:
        """Add ``alpha · src_YX`` into the slots' rows of ``x_ZX`` in place; a row met twice
        (the same query in two chunks of the batch) gets both, in slot order."""
        if self.first >= 0:
            x_ZX[self.first : self.first + self.rows_Y.shape[0]].add_(src_YX, alpha=alpha)
        else:
            x_ZX.index_add_(0, self.rows_Y, src_YX, alpha=alpha)


@dataclass(frozen=True)
class _Routing:
    """The inverted selection: each worker's batches, and which query rows see any key.

    ``has_keys_Z`` [H·B·T] is True where the row has at least one legal selected block.
    """

    batches_W: tuple[tuple[_Batch, ...], ...]
    has_keys_Z: torch.Tensor


def _route(
    block_indices_BTHS: torch.Tensor,
    block_size: int,
    G: int,
    workers: int,
    t0: int = 0,
    n_blocks: int | None = None,
) -> _Routing:
    """Invert the selection into per-(b, h, j) query lists (CSR), per worker, in batches.

    ``block_indices_BTHS`` may be the rows t0 .. t0 + T - 1 of a longer sequence (its rows
    then sit at those positions; query rows are numbered within the slice), whose keys have
    ``n_blocks`` blocks (default: those of T rows).

    Worker w owns the query rows b·T + t of one contiguous range, the ranges balanced by
    their number of legal selections, so workers write disjoint output rows. One stable sort
    of the flat selections by (worker, expert id (b·H + h)·N + j) keeps each expert's queries
    in increasing t, so its own-block queries (j·block_size <= t < (j+1)·block_size, the
    smallest legal t) come first. Unused slots and blocks that start after the query sort past
    the end and are cut off: they contribute nothing. Each list is cut into chunks of at most
    ``_CHUNK_ROWS`` // G queries, and a worker's chunks, in order of length, into batches of at
    most ``_CHUNK_ROWS`` padded rows (``_batches``). Costs one sort and two bincounts of
    B·T·H·S ids plus a Python loop over the experts; no dense [T, N] mask is built.
    """
    B, T, H, S = block_indices_BTHS.shape
    N = -(-T // block_size) if n_blocks is None else n_blocks
    E = B * H * N
    device = block_indices_BTHS.device
    t_1T11 = torch.arange(t0, t0 + T, device=device).view(1, T, 1, 1)
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
    # flat position ((b·T + t)·H + h)·S + s: the query row h·B·T + b·T + t of KV head h
    rows_P.div_(S, rounding_mode="floor")  # now (b·T + t)·H + h
    h_P = rows_P % H
    rows_P.div_(H, rounding_mode="floor").add_(h_P.mul_(B * T))
    del h_P
    own_pos_P = (key_P % N).mul_(-block_size).add_(rows_P % T + t0)
    counts_K = torch.bincount(key_P, minlength=workers * E).tolist()
    own_K = torch.bincount(key_P[own_pos_P < block_size], minlength=workers * E).tolist()
    del key_P

    chunk_queries = max(1, _CHUNK_ROWS // G)
    # (length, start in the routed list, own-block queries in it, flat block id) per chunk
    chunks_W: list[list[tuple[int, int, int, int]]] = [[] for _ in range(workers)]
    start = 0
    for key, (count, own) in enumerate(zip(counts_K, own_K, strict=True)):
        for lo in range(start, start + count, chunk_queries):
            size = min(chunk_queries, start + count - lo)
            chunks_W[key // E].append((size, lo, max(0, min(size, start + own - lo)), key % E))
        start += count
    has_keys_Z = legal_BTHS.any(dim=-1).permute(2, 0, 1).flatten()
    batches_W = tuple(_batches(chunks, rows_P, own_pos_P, block_size, G) for chunks in chunks_W)
    return _Routing(batches_W, has_keys_Z)


def _batches(
    chunks: list[tuple[int, int, int, int]],
    rows_P: torch.Tensor,
    own_pos_P: torch.Tensor,
    block_size: int,
    G: int,
) -> tuple[_Batch, ...]:
    """One worker's chunks grouped into batches: by increasing length, as many per batch as
    fit ``_CHUNK_ROWS`` rows when padded to the longest (so the padding stays small).

    ``chunks`` holds (length, start in the routed list, own-block queries, flat block id).
    """
    batches: list[_Batch] = []
    group: list[tuple[int, int, int, int]] = []
    for chunk in sorted(chunks):
        if group and (len(group) + 1) * chunk[0] * G > _CHUNK_ROWS:
            batches.append(_batch(group, rows_P, own_pos_P, block_size))
            group = []
        group.append(chunk)
    if group:
        batches.append(_batch(group, rows_P, own_pos_P, block_size))
    return tuple(batches)


def _batch(
    group: list[tuple[int, int, int, int]],
    rows_P: torch.Tensor,
    own_pos_P: torch.Tensor,
    block_size: int,
) -> _Batch:
    """The ``_Batch`` of chunks (length, start, own-block queries, block id), shortest first."""
    device = rows_P.device
    blocks_C = torch.tensor([block for *_, block in group], device=device)
    keys_L = torch.arange(block_size, device=device)
    if len(group) == 1:
        size, lo, own, _ = group[0]
        rows_Y = rows_P[lo : lo + size]
        first = int(rows_Y[0]) if int(rows_Y[-1]) - int(rows_Y[0]) == size - 1 else -1
        future_COL = None
        if own:
            future_COL = (keys_L > own_pos_P[lo : lo + own, None]).unsqueeze(0)
        return _Batch(rows_Y, first, blocks_C, future_COL)
    M = group[-1][0]
    size_C1 = torch.tensor([size for size, *_ in group], device=device).unsqueeze(1)
    lo_C1 = torch.tensor([lo for _, lo, _, _ in group], device=device).unsqueeze(1)
    slot_M = torch.arange(M, device=device)
    valid_CM = slot_M < size_C1
    # a pad slot points at its chunk's first entry: a row of this worker, masked below
    at_CM = torch.where(valid_CM, lo_C1 + slot_M, lo_C1)
    padded = group[0][0] < M
    masked = M if padded else max(own for _, _, own, _ in group)
    future_COL = None
    if masked:
        pos_CO = torch.where(valid_CM, own_pos_P[at_CM], -1)[:, :masked]
        future_COL = keys_L > pos_CO.unsqueeze(-1)
    return _Batch(rows_P[at_CM].flatten(), -1, blocks_C, future_COL)


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


def _by_head(x_BTHD: torch.Tensor, H: int) -> torch.Tensor:
    """View or copy [B, T, H·G, D] as [H·B·T, G·D]: one KV head's query rows are contiguous."""
    B, T, HQ, D = x_BTHD.shape
    # with H = 1 the transpose only moves a size-1 dim and the reshape copies nothing
    return x_BTHD.reshape(B * T, H, HQ // H * D).transpose(0, 1).reshape(H * B * T, -1)


def _from_heads(x_ZF: torch.Tensor, B: int, T: int, D: int) -> torch.Tensor:
    """Inverse of ``_by_head``: [H·B·T, G·D] back to [B, T, H·G, D]."""
    return x_ZF.view(-1, B * T, x_ZF.shape[1]).transpose(0, 1).reshape(B, T, -1, D)


def _batch_scores(
    bt: _Batch, q_ZF: torch.Tensor, kscaled_EDL: torch.Tensor, ws: Workspace
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch's query rows, keys and scaled scores: (q_CRD, kscaled_CDL, scores_CRL), all in
    workspace buffers valid until the next batch.

    One [C, R, D] @ [C, D, L] bmm (R = M·G rows per chunk); the slots in ``future_COL`` get
    -inf on the keys after their query.
    """
    C = bt.blocks_C.shape[0]
    Y, features = bt.rows_Y.shape[0], q_ZF.shape[1]
    _, D, L = kscaled_EDL.shape
    q_CRD = bt.take(q_ZF, ws.get("q", q_ZF, Y, features)).view(C, -1, D)
    kscaled_CDL = torch.index_select(kscaled_EDL, 0, bt.blocks_C, out=ws.get("k", q_ZF, C, D, L))
    scores_CRL = torch.bmm(q_CRD, kscaled_CDL, out=ws.get("scores", q_ZF, *q_CRD.shape[:2], L))
    if bt.future_COL is not None:
        masked = bt.future_COL.shape[1]
        scores_CMGL = scores_CRL.view(C, Y // C, features // D, L)
        scores_CMGL[:, :masked].masked_fill_(bt.future_COL.unsqueeze(2), float("-inf"))
    return q_CRD, kscaled_CDL, scores_CRL


def _by_block(x_BTHD: torch.Tensor, block_size: int, transpose: bool) -> torch.Tensor:
    """A contiguous block-major copy of keys or values: [B·H·N, L, D], or [B·H·N, D, L] with
    ``transpose``; L = block_size, the last block zero-padded past T.

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
    return x_BNLHD.permute(order).reshape(
        B * H * N, *((D, block_size) if transpose else (block_size, D))
    )


def _from_blocks(x_ELD: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """Inverse of ``_by_block`` without transpose: [B·H·N, L, D] back to [B, T, H, D]."""
    _, L, D = x_ELD.shape
    x_BHNLD = x_ELD.view(B, -1, -(-T // L), L, D)
    return x_BHNLD.permute(0, 2, 3, 1, 4).reshape(B, -1, x_BHNLD.shape[1], D)[:, :T]


def _accumulate_batches(
    batches: tuple[_Batch, ...],
    q_ZF: torch.Tensor,
    kscaled_EDL: torch.Tensor,
    v_ELD: torch.Tensor,
    ref_ZG: torch.Tensor,
    acc_ZF: torch.Tensor,
    sum_ZG: torch.Tensor,
) -> None:
    """One worker's forward pass: add sum(exp2(s - ref)) and sum(exp2(s - ref) v) into its
    rows (scores and ref in base 2: see ``kernels.base2``).

    The per-row reference ref is fixed for the whole pass, so a batch is just gather, bmm,
    exp2, bmm, scatter-add. When every ref is 0 the subtraction is skipped. Keys come scaled
    (by scale · log2 e) and transposed, both block-major (``_by_block``).
    """
    G = ref_ZG.shape[1]
    shifted = bool(ref_ZG.any())
    ws = Workspace()
    for bt in batches:
        Y = bt.rows_Y.shape[0]
        _, _, probs_CRL = _batch_scores(bt, q_ZF, kscaled_EDL, ws)
        probs_YGL = probs_CRL.view(Y, G, -1)
        if shifted:
            probs_YGL.sub_(bt.take(ref_ZG).unsqueeze(-1))
        probs_YGL.exp2_()
        bt.add_to(sum_ZG, probs_YGL.sum(dim=-1))
        C, L, D = bt.blocks_C.shape[0], *v_ELD.shape[1:]
        v_CLD = torch.index_select(v_ELD, 0, bt.blocks_C, out=ws.get("v", v_ELD, C, L, D))
        out_CRD = torch.bmm(probs_CRL, v_CLD, out=ws.get("out", v_ELD, C, probs_CRL.shape[1], D))
        bt.add_to(acc_ZF, out_CRD.view(Y, -1))


def _row_max_batches(
    batches: tuple[_Batch, ...], q_ZF: torch.Tensor, kscaled_EDL: torch.Tensor, max_ZG: torch.Tensor
) -> None:
    """One worker's exact row maxima of the scores over its selected keys, into ``max_ZG``."""
    G = max_ZG.shape[1]
    ws = Workspace()
    for bt in batches:
        _, _, scores_CRL = _batch_scores(bt, q_ZF, kscaled_EDL, ws)
        block_max_YG = scores_CRL.view(bt.rows_Y.shape[0], G, -1).amax(dim=-1)
        rows_YG = bt.rows_Y.unsqueeze(1).expand(-1, G)
        max_ZG.scatter_reduce_(0, rows_YG, block_max_YG, "amax")


def _score_bound(
    q_ZF: torch.Tensor,
    k_BTHD: torch.Tensor,
    scale: float,
    block_indices_BTHS: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Upper bound [H·B·T, G] of every score a row can see: |q| · max |scale·k| over its blocks.

    By Cauchy-Schwarz q·k <= |q|·|k|; key norms are maximised per block, then over the row's
    legal selected blocks (0 for rows without any).
    """
    B, T, H, S = block_indices_BTHS.shape
    N = -(-T // block_size)
    D = k_BTHD.shape[3]
    knorm_BTH = F.pad(k_BTHD.norm(dim=-1) * abs(scale), (0, 0, 0, N * block_size - T))
    kmax_BHN = knorm_BTH.view(B, N, block_size, H).amax(dim=2).transpose(1, 2)
    idx_BHTS = block_indices_BTHS.transpose(1, 2)
    t_11T1 = torch.arange(T, device=q_ZF.device).view(1, 1, T, 1)
    legal_BHTS = (idx_BHTS >= 0) & (idx_BHTS * block_size <= t_11T1)
    kmax_BHTS = kmax_BHN.gather(2, idx_BHTS.clamp_min(0).reshape(B, H, T * S)).view(B, H, T, S)
    kbound_HBT = torch.where(legal_BHTS, kmax_BHTS, 0.0).amax(dim=-1).transpose(0, 1)
    qnorm_ZG = q_ZF.view(H * B * T, -1, D).norm(dim=-1)
    return qnorm_ZG * kbound_HBT.reshape(-1, 1)


def _forward(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    block_indices_BTHS: torch.Tensor,
    routing: _Routing,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the selected blocks, workers in parallel: returns fp32 (o_ZF, lse_ZG), the
    lse in base 2 like the scores (``kernels.base2``; only the backward reads it).

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
    q_ZF = _by_head(q_BTHD.float(), H)
    k_BTHD, v_BTHD = k_BTHD.float(), v_BTHD.float()
    # scores in base 2 (kernels.base2): the keys carry scale · log2 e, so do bound and ref
    scale2 = scale * LOG2E
    bound_ZG = _score_bound(q_ZF, k_BTHD, scale2, block_indices_BTHS, block_size)
    ref_ZG = (bound_ZG - _HEADROOM * LOG2E).clamp_min_(0.0)
    del bound_ZG
    G = HQ // H
    acc_ZF = torch.zeros_like(q_ZF)
    sum_ZG = torch.zeros_like(ref_ZG)
    kscaled_EDL = _by_block(k_BTHD * scale2, block_size, transpose=True)
    v_ELD = _by_block(v_BTHD, block_size, transpose=False)
    inputs = (q_ZF, kscaled_EDL, v_ELD, ref_ZG, acc_ZF, sum_ZG)
    run_workers([functools.partial(_accumulate_batches, bt, *inputs) for bt in routing.batches_W])

    redo_Z = routing.has_keys_Z & (sum_ZG < math.exp(-_UNDERFLOW)).any(dim=-1)
    if redo_Z.any():
        # rare, so one worker: route only the redone rows, find their maxima, accumulate again
        redo_BTH1 = redo_Z.view(H, B, T).permute(1, 2, 0).unsqueeze(-1)
        redo = _route(torch.where(redo_BTH1, block_indices_BTHS, -1), block_size, G, 1)
        batches = redo.batches_W[0]
        ref_ZG[redo_Z] = float("-inf")
        run_workers([functools.partial(_row_max_batches, batches, q_ZF, kscaled_EDL, ref_ZG)])
        acc_ZF[redo_Z] = 0.0
        sum_ZG[redo_Z] = 0.0
        run_workers([functools.partial(_accumulate_batches, batches, *inputs)])
    # rows that selected nothing: acc 0, sum 0 -> output 0 (the clamp avoids 0/0), lse -inf
    norm_ZG1 = sum_ZG.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    o_ZF = acc_ZF.view(-1, G, D).div_(norm_ZG1).view(-1, G * D)
    return o_ZF, ref_ZG + sum_ZG.log2()


def _backward_batches(
    batches: tuple[_Batch, ...],
    q_ZF: torch.Tensor,
    do_ZF: torch.Tensor,
    kscaled_EDL: torch.Tensor,
    v_EDL: torch.Tensor,
    lse_delta_ZG2: torch.Tensor,
    dq_ZF: torch.Tensor,
    dk_ELD: torch.Tensor,
    dv_ELD: torch.Tensor,
    gate_ZG: torch.Tensor | None,
) -> None:
    """One worker's backward: dq into its query rows, unscaled dk and dv into its own buffers;
    with ``gate_ZG`` the output gradient of row (z, g) is gate · dO (a gated branch).

    Per batch the probabilities are recomputed from the saved row lse, P = exp(S - lse) (as
    exp2 of base-2 scores and lse: ``kernels.base2``), and with delta = rowsum(dO ⊙ O):
    dS = P ⊙ (dO V_jᵀ - delta), dQ = dS (scale·log2 e·K_j) (added into the slots' query rows
    times ln 2, which takes log2 e back), dK_j += dSᵀ Q (the caller applies the scale),
    dV_j += Pᵀ dO.
    Keys, values and their gradients are block-major (``_by_block``), K and V transposed.
    """
    G = lse_delta_ZG2.shape[1]
    ws = Workspace()
    for bt in batches:
        Y = bt.rows_Y.shape[0]
        q_CRD, kscaled_CDL, probs_CRL = _batch_scores(bt, q_ZF, kscaled_EDL, ws)
        C, R, D = q_CRD.shape
        L = kscaled_CDL.shape[2]
        do_YF = bt.take(do_ZF, ws.get("do", do_ZF, Y, do_ZF.shape[1]))
        if gate_ZG is not None:
            # out of place: ``take`` may return a view of the caller's dO
            gated_YF = ws.get("gated", do_ZF, *do_YF.shape)
            torch.mul(
                do_YF.view(Y, G, D), bt.take(gate_ZG).unsqueeze(-1), out=gated_YF.view(Y, G, D)
            )
            do_YF = gated_YF
        do_CRD = do_YF.view(C, R, D)
        lse_delta_YG2 = bt.take(lse_delta_ZG2)
        # base-2 scores become probabilities in place: P = exp2(S - lse) of the merged softmax
        probs_YGL = probs_CRL.view(Y, G, L).sub_(lse_delta_YG2[..., :1]).exp2_()
        grad_CLD = ws.get("grad", do_ZF, C, L, D)
        dv_ELD.index_add_(0, bt.blocks_C, torch.bmm(probs_CRL.mT, do_CRD, out=grad_CLD))
        v_CDL = torch.index_select(v_EDL, 0, bt.blocks_C, out=ws.get("v", v_EDL, C, D, L))
        dscores_CRL = torch.bmm(do_CRD, v_CDL, out=ws.get("dscores", do_ZF, C, R, L))
        dscores_CRL.view(Y, G, L).sub_(lse_delta_YG2[..., 1:]).mul_(probs_YGL)
        dq_CRD = torch.bmm(dscores_CRL, kscaled_CDL.mT, out=ws.get("dq", do_ZF, C, R, D))
        bt.add_to(dq_ZF, dq_CRD.view(Y, -1), alpha=LN2)
        dk_ELD.index_add_(0, bt.blocks_C, torch.bmm(dscores_CRL.mT, q_CRD, out=grad_CLD))


def _rowdot(a_XD: torch.Tensor, b_XD: torch.Tensor) -> torch.Tensor:
    """rowsum(a ⊙ b) over the last dim D for inputs of one shape [*X, D]: [*X] in fp32 (fp64
    for fp64), _CHUNK_ROWS rows at a time, so no product of the inputs' size is ever alive."""
    D = a_XD.shape[-1]
    a_RD, b_RD = a_XD.reshape(-1, D), b_XD.reshape(-1, D)
    acc = torch.promote_types(a_XD.dtype, torch.float32)
    out_R = torch.empty(a_RD.shape[0], dtype=acc, device=a_XD.device)
    for r0 in range(0, a_RD.shape[0], _CHUNK_ROWS):
        rows = slice(r0, r0 + _CHUNK_ROWS)
        out_R[rows] = torch.linalg.vecdot(a_RD[rows], b_RD[rows])
    return out_R.view(a_XD.shape[:-1])


def _lse_delta(lse_ZG: torch.Tensor, do_ZF: torch.Tensor, o_ZF: torch.Tensor) -> torch.Tensor:
    """The backward's per-row pair [Z, G, 2]: the saved lse and delta = rowsum(dO ⊙ O), side by
    side, so one small gather fetches both."""
    G = lse_ZG.shape[1]
    delta_ZG = _rowdot(do_ZF.view(-1, G, do_ZF.shape[1] // G), o_ZF.view(-1, G, o_ZF.shape[1] // G))
    return torch.stack([lse_ZG, delta_ZG.to(lse_ZG.dtype)], dim=-1)


@dataclass
class _BackwardKV:
    """What every row range of a backward shares: the block-major scaled keys and values and
    each worker's fp32 dk / dv accumulators (``_backward_kv``)."""

    kscaled_EDL: torch.Tensor
    v_EDL: torch.Tensor
    dk_W: list[torch.Tensor]
    dv_W: list[torch.Tensor]


def _backward_kv(
    k_BTHD: torch.Tensor, v_BTHD: torch.Tensor, block_size: int, scale: float, workers: int
) -> _BackwardKV:
    """Block-major K (times scale · log2 e) and V, and zeroed dk / dv for ``workers``."""
    B, T, H, D = k_BTHD.shape
    k_BTHD, v_BTHD = k_BTHD.float(), v_BTHD.float()
    shape = (B * H * -(-T // block_size), block_size, D)
    return _BackwardKV(
        _by_block(k_BTHD * (scale * LOG2E), block_size, transpose=True),
        _by_block(v_BTHD, block_size, transpose=True),
        [k_BTHD.new_zeros(shape) for _ in range(workers)],
        [v_BTHD.new_zeros(shape) for _ in range(workers)],
    )


def _backward_rows(
    kv: _BackwardKV,
    do_BTHD: torch.Tensor,
    q_BTHD: torch.Tensor,
    lse_delta_ZG2: torch.Tensor,
    routing: _Routing,
    gate_BTH: torch.Tensor | None = None,
    dq_BTHD: torch.Tensor | None = None,
) -> torch.Tensor:
    """The backward of some query rows (all of a sequence, or a row range routed with its
    offset): dq of those rows, dk / dv added into ``kv``'s worker accumulators.

    ``lse_delta_ZG2`` holds each row's saved lse (base 2) and delta = rowsum(dO ⊙ O)
    (``_lse_delta``, or a caller's own delta: ``gated_branches`` derives it without O). With
    ``gate_BTH`` the output gradient is gate · do, scaled per gathered row (no q-sized copy).
    A given ``dq_BTHD`` (contiguous, q's shape) gets dq added into it and is returned: in
    place when one KV head makes its rows the workers' layout in fp32, else through a copy.
    Workers own disjoint query rows, so dq is shared; dk and dv rows are shared between
    workers (a block is chosen by queries of several workers), so each worker accumulates
    into its own dk/dv buffers (summed in worker order by ``_backward_dkv``): no atomics,
    deterministic.
    """
    B, T, _, D = q_BTHD.shape
    H = lse_delta_ZG2.shape[0] // (B * T)
    q_ZF = _by_head(q_BTHD.float(), H)
    do_ZF = _by_head(do_BTHD.float(), H)
    in_place = dq_BTHD is not None and H == 1 and dq_BTHD.dtype == torch.float32
    dq_ZF = _by_head(dq_BTHD, H) if in_place else torch.zeros_like(q_ZF)
    gate_ZG = None if gate_BTH is None else _by_head(gate_BTH.float()[..., None], H)
    shared = (q_ZF, do_ZF, kv.kscaled_EDL, kv.v_EDL, lse_delta_ZG2, dq_ZF)
    run_workers(
        [
            functools.partial(_backward_batches, batches, *shared, dk_ELD, dv_ELD, gate_ZG)
            for batches, dk_ELD, dv_ELD in zip(routing.batches_W, kv.dk_W, kv.dv_W, strict=True)
        ]
    )
    if dq_BTHD is None:
        return _from_heads(dq_ZF, B, T, D)
    if not in_place:
        dq_BTHD += _from_heads(dq_ZF, B, T, D)
    return dq_BTHD


def _backward_dkv(kv: _BackwardKV, scale: float, B: int, T: int) -> tuple[torch.Tensor, ...]:
    """The workers' dk / dv summed in worker order, as fp32 [B, T, H, D] (dk times scale)."""
    for dk_ELD, dv_ELD in zip(kv.dk_W[1:], kv.dv_W[1:], strict=True):
        kv.dk_W[0] += dk_ELD
        kv.dv_W[0] += dv_ELD
    return _from_blocks(kv.dk_W[0].mul_(scale), B, T), _from_blocks(kv.dv_W[0], B, T)


def _backward(
    do_BTHD: torch.Tensor,
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    lse_delta_ZG2: torch.Tensor,
    routing: _Routing,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact gradients through the merged softmax, workers in parallel: fp32 (dq, dk, dv) of
    every row (``_backward_rows`` over all of them)."""
    B, T = q_BTHD.shape[:2]
    kv = _backward_kv(k_BTHD, v_BTHD, block_size, scale, len(routing.batches_W))
    dq_BTHD = _backward_rows(kv, do_BTHD, q_BTHD, lse_delta_ZG2, routing)
    return (dq_BTHD, *_backward_dkv(kv, scale, B, T))


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
        o_ZF, lse_ZG = _forward(
            q_BTHD, k_BTHD, v_BTHD, block_indices_BTHS, routing, block_size, scale
        )
        ctx.save_for_backward(q_BTHD, k_BTHD, v_BTHD, o_ZF, lse_ZG)
        ctx.routing, ctx.block_size, ctx.scale = routing, block_size, scale
        B, T, _, D = q_BTHD.shape
        return _from_heads(o_ZF, B, T, D).to(q_BTHD.dtype)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, do_BTHD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None, None]:
        """Gradients for q, k, v in their dtypes; indices, block size and scale get none."""
        q_BTHD, k_BTHD, v_BTHD, o_ZF, lse_ZG = ctx.saved_tensors
        pair_ZG2 = _lse_delta(lse_ZG, _by_head(do_BTHD.float(), k_BTHD.shape[2]), o_ZF)
        dq, dk, dv = _backward(
            do_BTHD, q_BTHD, k_BTHD, v_BTHD, pair_ZG2, ctx.routing, ctx.block_size, ctx.scale
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
