"""NSA block selection: which l'-token blocks each query's KV group attends (paper Eq. 8-11).

Selection reuses the compression branch's probabilities p_cmp = exp(scale·q·kcmp - lse) over
the visible compressed tokens, maps them onto selection blocks by overlap (Eq. 9, 0-based: block
j collects compressed token i with weight |[i·d, i·d + l) ∩ [j·l', (j + 1)·l')| / d), sums the
probabilities over the G query heads of a KV group (Eq. 10) and keeps the top n blocks (Eq. 11).
Block 0 and the query's own and previous blocks are forced in and count toward n; block j is
legal for query t iff j·l' <= t. Ties go to the lower block index. Output indices per
(b, t, KV head) are sorted ascending, padded with -1 at the end when fewer than n blocks are
legal. Indices carry no gradient: everything runs under no_grad. Backends: ``naive`` (full fp32
tensors, the oracle), ``torch`` (query chunks, the fast CPU path) and ``triton`` (GPU, streamed
importances and a running top-n; kernels/nsa/triton_select.py). ``topn_blocks`` applies the
same forced/legal/top-n rules to importances computed elsewhere (e.g. while decoding).
Legend: B batch, T time, N compressed tokens, S selection blocks ceil(T / l'), HQ query heads,
H KV heads, G group size HQ // H, D head dim, E = D + 1, C queries per chunk, R = G·C score rows
per chunk, X = B·H, P = l'/d compressed tokens per selection block, A = l/d - 1 tokens of block
j - 1 that also overlap block j, K = P + A tokens overlapping one block, n = n_select (the last
dim of the returned idx_BTHS).
"""

from __future__ import annotations

import functools
import numbers

import torch
import torch.nn.functional as F

from ..backend import resolve_backend
from ..base2 import LOG2E
from ..cpu_workers import run_workers, worker_count
from .compression import validate_blocks, validate_qkv, visible_mask

__all__ = ["block_importance", "overlap_weights", "select_blocks", "topn_blocks"]

_OP = "select_blocks"
_AVAILABLE = ("naive", "torch", "triton")
# Elements of the largest per-chunk fp32 probability tile [B, HQ, C, N] of the torch path
# (8 MiB; T = 32k never holds [B, T, HQ, N]). The tile is written, exponentiated and summed in
# turn, so it should stay cache-resident: at T = 16k on one thread it took 0.47 s of CPU against
# 0.76 s with 64 MiB tiles, while 2 MiB tiles lost again to per-chunk overhead.
_TILE_ELEMENTS = 1 << 21
# exp of arguments below about -87 nats (results under fp32's smallest normal, 1.2e-38) leaves
# torch's vectorized CPU path and runs 20-40x slower; sharply peaked attention has many such
# entries.
# The floor adds at most e^-87 = 1.7e-38 per token and head, so it can only reorder blocks whose
# importances agree to that absolute level (in practice: blocks that all underflow to ~0).
_EXP_FLOOR = -87.0
# Worker threads of the torch path (see ``run_workers``): chunks are a few large ops each, so
# every core gets one worker; at most this many, since the loop shares one interpreter lock.
_MAX_WORKERS = 8


def overlap_weights(
    block_size: int, stride: int, select_size: int, n_cmp: int, n_sel: int
) -> torch.Tensor:
    """Eq. 9 as overlap: w_NS[i, j] = |[i·d, i·d + l) ∩ [j·l', (j + 1)·l')| / d, fp32 [N, S].

    Row i is compressed token i, column j selection block j, both 0-based. With l=32, d=16,
    l'=64, column j holds [1, 2, 2, 2, 1] on compressed indices 4j-1 .. 4j+3 (the paper's
    1-based formula transcribed literally is shifted by three tokens); with l' = l = d it is
    the identity. Raises ValueError naming the knob unless block_size, stride and select_size
    are ints >= 1 and n_cmp, n_sel ints >= 0.
    """
    knobs = {"block_size": block_size, "stride": stride, "select_size": select_size}
    counts = {"n_cmp": n_cmp, "n_sel": n_sel}
    for name, value in (*knobs.items(), *counts.items()):
        low = 1 if name in knobs else 0
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"overlap_weights: {name} must be an int >= {low}, got {value!r}")
    start_N1 = torch.arange(n_cmp)[:, None] * stride
    block_1S = torch.arange(n_sel)[None, :] * select_size
    low_NS = torch.maximum(start_N1, block_1S)
    high_NS = torch.minimum(start_N1 + block_size, block_1S + select_size)
    return (high_NS - low_NS).clamp(min=0).float() / stride


def validate_select_knobs(
    op: str, block_size: int, stride: int, select_size: int, n_select: int
) -> None:
    """Raise ValueError naming the knob unless l, d are valid (``validate_blocks``), l' and n are
    ints >= 1 and >= 3, l' is a multiple of d and l' >= l."""
    validate_blocks(op, block_size, stride)
    for name, value, low in (("select_size", select_size, 1), ("n_select", n_select, 3)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            reason = " (block 0 and the two local blocks are forced in)" if low == 3 else ""
            raise ValueError(f"{op}: {name} must be an int >= {low}{reason}, got {value!r}")
    if select_size % stride or select_size < block_size:
        raise ValueError(
            f"{op}: select_size={select_size} must be a multiple of stride={stride} and "
            f">= block_size={block_size}"
        )


def _validate(
    q_BTHD: torch.Tensor,
    kcmp_BNHD: torch.Tensor,
    lse_BTH: torch.Tensor,
    block_size: int,
    stride: int,
    select_size: int,
    n_select: int,
) -> None:
    """Raise ValueError naming the knob or argument when the inputs do not fit select_blocks."""
    validate_select_knobs(_OP, block_size, stride, select_size, n_select)
    validate_qkv(_OP, q_BTHD, kcmp_BNHD, block_size, stride)
    if lse_BTH.shape != q_BTHD.shape[:3]:
        raise ValueError(
            f"{_OP}: lse_BTH must have shape [B, T, HQ] = {list(q_BTHD.shape[:3])}, "
            f"got {list(lse_BTH.shape)}"
        )
    if lse_BTH.device != q_BTHD.device:
        raise ValueError(f"{_OP}: lse_BTH is on {lse_BTH.device}, q_BTHD on {q_BTHD.device}")


def _mark_blocks(
    importance_XS: torch.Tensor, t_X1: torch.Tensor, select_size: int, first_block: int = 0
) -> torch.Tensor:
    """Set forced blocks to +inf and illegal (future) blocks to -inf, in place; returns the input.

    Row x is the query at position t_X1[x], column j is block j. Only block 0 and the columns
    from ``first_block`` on are examined: the caller guarantees that every block in between is
    legal and not a local block for all its rows.
    """
    importance_XS[..., 0] = float("inf")
    tail_XS = importance_XS[..., first_block:]
    j_1S = torch.arange(first_block, importance_XS.shape[-1], device=importance_XS.device)[None]
    own_X1 = t_X1 // select_size
    tail_XS.masked_fill_(j_1S > own_X1, float("-inf"))
    tail_XS.masked_fill_((j_1S == own_X1) | (j_1S == own_X1 - 1), float("inf"))
    return importance_XS


def _top_blocks(scores_XS: torch.Tensor, n_select: int) -> torch.Tensor:
    """Top-n block ids per row, lower index first on ties, sorted ascending, -1 padded at the end.

    Each fp32 score becomes a unique int64 key, its order-preserving integer image in the high
    32 bits and S - 1 - j in the low bits, so ``topk`` over the keys is exact, tie rule
    included; a stable descending sort of the whole row did the same 3x slower (S = 512).
    -inf picks are illegal blocks and become padding.
    """
    S = scores_XS.shape[-1]
    n = min(n_select, S)
    # + 0.0 turns -0.0 into 0.0, which the comparison treats as equal but the bits do not
    bits_XS = (scores_XS.float() + 0.0).view(torch.int32)
    # negative floats order backwards as integers: flipping their magnitude bits fixes that
    ordered_XS = (bits_XS ^ ((bits_XS >> 31) & 0x7FFFFFFF)).to(torch.int64)
    low_S = S - 1 - torch.arange(S, device=scores_XS.device)
    picked_Xn = (ordered_XS * (1 << 32) + low_S).topk(n, dim=-1).indices
    illegal_Xn = scores_XS.gather(-1, picked_Xn) == float("-inf")
    # padding ids are S, so an ascending sort puts them last before they become -1
    picked_Xn = picked_Xn.masked_fill(illegal_Xn, S).sort(dim=-1).values
    picked_Xn = picked_Xn.masked_fill(picked_Xn == S, -1)
    return F.pad(picked_Xn, (0, n_select - n), value=-1)


def _select_naive(
    q_BTHD: torch.Tensor,
    kcmp_BNHD: torch.Tensor,
    lse_BTH: torch.Tensor,
    block_size: int,
    stride: int,
    select_size: int,
    n_select: int,
    scale: float,
) -> torch.Tensor:
    """Oracle: full [B, H, G, T, N] fp32 probabilities, group sum, overlap matmul, top-n."""
    B, T, HQ, D = q_BTHD.shape
    N, H = kcmp_BNHD.shape[1], kcmp_BNHD.shape[2]
    G = HQ // H
    S = -(-T // select_size)
    q_BTHGD = q_BTHD.float().reshape(B, T, H, G, D)
    scores_BHGTN = torch.einsum("bthgd,bnhd->bhgtn", q_BTHGD, kcmp_BNHD.float()) * scale
    lse_BHGT1 = lse_BTH.float().reshape(B, T, H, G).permute(0, 2, 3, 1)[..., None]
    t_T1 = torch.arange(T, device=q_BTHD.device)[:, None]
    keep_BHGTN = visible_mask(t_T1, N, block_size, stride) & (lse_BHGT1 > float("-inf"))
    probs_BHGTN = torch.where(keep_BHGTN, torch.exp(scores_BHGTN - lse_BHGT1), 0.0)
    w_NS = overlap_weights(block_size, stride, select_size, N, S).to(q_BTHD.device)
    importance_BHTS = probs_BHGTN.sum(dim=2) @ w_NS
    idx_BHTn = _top_blocks(_mark_blocks(importance_BHTS, t_T1, select_size), n_select)
    return idx_BHTn.transpose(1, 2)


@functools.cache
def _overlap_band(block_size: int, stride: int, select_size: int) -> torch.Tensor:
    """Weights [K] of the compressed tokens l/d - 1 before block j's start through its end.

    Every selection block sees the same pattern, so it is read off block 1 of overlap_weights,
    whose first overlapping token l'/d - l/d + 1 is never negative since l <= l'. Cached per
    knob triple (a decode step would rebuild it from a dozen small ops); callers only read it.
    """
    per_block = select_size // stride
    w_NS = overlap_weights(block_size, stride, select_size, 2 * per_block, 2)
    return w_NS[per_block - block_size // stride + 1 :, 1]


def block_importance(
    mass_XN: torch.Tensor, n_blocks: int, block_size: int, stride: int, select_size: int
) -> torch.Tensor:
    """Eq. 9 on the band: importances [..., n_blocks] of selection blocks from token masses.

    ``mass_XN`` [..., N] holds a mass per compressed token (e.g. group-summed probabilities);
    the result equals ``mass_XN @ overlap_weights(block_size, stride, select_size, N,
    n_blocks)`` but reads each mass once: the map is banded (block j overlaps tokens
    j·l'/d - l/d + 1 .. (j + 1)·l'/d - 1), so block j is two short weighted sums, where the
    matmul with the mostly-zero [N, S] map costs O(N·S) (a 16 MB map per decode step at 64k
    tokens). Tokens past N count as zero mass. Raises ValueError when N > n_blocks·l'/d.
    """
    per_block = select_size // stride
    lead = block_size // stride - 1
    n_tokens = mass_XN.shape[-1]
    if n_tokens > n_blocks * per_block:
        raise ValueError(
            f"block_importance: {n_tokens} compressed tokens do not fit in n_blocks={n_blocks} "
            f"blocks of {per_block}"
        )
    band_K = _overlap_band(block_size, stride, select_size).to(mass_XN.device)
    mass_XSP = F.pad(mass_XN, (0, n_blocks * per_block - n_tokens))
    mass_XSP = mass_XSP.unflatten(-1, (n_blocks, per_block))
    # broadcast multiply and sum: a matmul with a length-P vector runs far slower on CPU
    importance_XS = (mass_XSP * band_K[lead:]).sum(dim=-1)
    if lead:
        tail_XSA = mass_XSP[..., :-1, per_block - lead :]
        importance_XS[..., 1:] += (tail_XSA * band_K[:lead]).sum(dim=-1)
    return importance_XS


def _select_torch(
    q_BTHD: torch.Tensor,
    kcmp_BNHD: torch.Tensor,
    lse_BTH: torch.Tensor,
    block_size: int,
    stride: int,
    select_size: int,
    n_select: int,
    scale: float,
) -> torch.Tensor:
    """Fast path: query chunks, each reading only the compressed prefix and blocks it can reach.

    Per chunk one batched matmul gives scale·q·k - lse for all G heads of a group (in base 2)
    and exp2 runs in place. No visibility mask is needed: a token hidden from query t starts at
    or after t - l + 2 > t - l', so it only overlaps blocks t // l' - 1 and later, whose scores
    ``_mark_blocks`` overwrites with +inf (forced) or -inf (illegal), including any inf or NaN
    mass there; every block that is ranked sees visible tokens only (the naive oracle masks
    literally, and the tests compare). The overlap map is banded (block j overlaps tokens
    j·l'/d - l/d + 1 .. (j + 1)·l'/d - 1), so the importance is two short weighted sums per
    block rather than a matmul with the mostly-zero [N, S] map.
    """
    B, T, HQ, D = q_BTHD.shape
    N, H = kcmp_BNHD.shape[1], kcmp_BNHD.shape[2]
    G = HQ // H
    device = q_BTHD.device
    per_block = select_size // stride
    S = -(-T // select_size)
    # scale·q·k - lse as one matmul: q gains a column holding -lse, k a matching row of ones;
    # that column is -inf, not +inf, where lse = -inf, so such a row gets no mass beyond the
    # floor below, the same for every block. k is
    # zero-padded to S·l'/d tokens so that a chunk's masses reshape into whole blocks; the
    # padding tokens are hidden from every query, like any other future token.
    k_XEN = torch.cat(
        [kcmp_BNHD.float().permute(0, 2, 3, 1), kcmp_BNHD.new_ones(B, H, 1, N, dtype=torch.float)],
        dim=2,
    )
    k_XEN = F.pad(k_XEN, (0, S * per_block - N)).reshape(B * H, D + 1, S * per_block)
    # in base 2 (kernels.base2): both columns carry log2 e, so exp2 gives the same masses
    neg_lse_BTH = (lse_BTH.float() * -LOG2E).masked_fill(lse_BTH == float("-inf"), float("-inf"))
    q_BTHE = torch.cat([q_BTHD.float() * (scale * LOG2E), neg_lse_BTH[..., None]], dim=-1)
    idx_BTHn = torch.full((B, T, H, n_select), -1, dtype=torch.int64, device=device)
    C = max(1, _TILE_ELEMENTS // (B * HQ * max(N, 1)))

    def chunk(t0: int) -> None:
        t1 = min(T, t0 + C)
        rows = t1 - t0
        t_C1 = torch.arange(t0, t1, device=device)[:, None]
        S_c = (t1 - 1) // select_size + 1
        # tokens of the blocks the chunk's queries may select (k is zero-padded up to them)
        N_c = S_c * per_block
        q_XRE = q_BTHE[:, t0:t1].reshape(B, rows, H, G, D + 1).permute(0, 2, 3, 1, 4)
        logits_XRN = torch.bmm(q_XRE.reshape(B * H, G * rows, D + 1), k_XEN[:, :, :N_c])
        probs_XRN = logits_XRN.clamp_(min=_EXP_FLOOR * LOG2E).exp2_()
        mass_XCN = probs_XRN.view(B * H, G, rows, N_c).sum(dim=1)
        importance_XCS = block_importance(mass_XCN, S_c, block_size, stride, select_size)
        # blocks before the chunk's first query's previous block are legal and not local
        first_block = max(0, t0 // select_size - 1)
        scores_XCS = _mark_blocks(importance_XCS, t_C1, select_size, first_block)
        idx_BTHn[:, t0:t1] = _top_blocks(scores_XCS, n_select).view(B, H, rows, -1).transpose(1, 2)

    def job(starts: list[int]) -> None:
        for t0 in starts:
            chunk(t0)

    # chunks dealt round-robin: later chunks read more tokens, so each worker gets a mix
    starts = list(range(0, T, C))
    workers = max(1, min(worker_count(), _MAX_WORKERS, len(starts)))
    run_workers([functools.partial(job, starts[w::workers]) for w in range(workers)])
    return idx_BTHn


def select_blocks(
    q_BTHD: torch.Tensor,
    kcmp_BNHD: torch.Tensor,
    lse_BTH: torch.Tensor,
    *,
    block_size: int,
    stride: int,
    select_size: int,
    n_select: int,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Selected block ids idx_BTHS, int64 [B, T, H, n_select], one block set per KV group.

    For query t and KV head h: p_cmp = exp(scale·q·kcmp - lse) over the compressed tokens
    visible to t (0 elsewhere, and everywhere when lse is -inf), summed over the G query heads
    of the group, mapped onto selection blocks with ``overlap_weights``; blocks 0, t // l' and
    t // l' - 1 (if >= 0) are always selected and count toward n_select, blocks with j·l' > t
    never are, and ties go to the lower block index. Each row lists the chosen ids in ascending
    order, followed by -1 for the slots left when fewer than n_select blocks are legal. lse_BTH
    [B, T, HQ] is ``compressed_attention``'s lse for the same q and kcmp. No gradient, no graph.
    ``scale`` defaults to D**-0.5; ``backend`` is ``naive`` (full fp32 tensors), ``torch``,
    ``triton`` (CUDA, or CPU under TRITON_INTERPRET=1) or ``auto`` (triton on CUDA, torch
    elsewhere). Raises ValueError naming the knob unless block_size % stride == 0,
    select_size % stride == 0, block_size <= select_size and n_select >= 3, or naming the
    argument for shapes that disagree or a wrong number of compressed tokens.
    """
    _validate(q_BTHD, kcmp_BNHD, lse_BTH, block_size, stride, select_size, n_select)
    chosen = resolve_backend(_OP, backend, _AVAILABLE, q_BTHD)
    scale = q_BTHD.shape[-1] ** -0.5 if scale is None else float(scale)
    args = (q_BTHD, kcmp_BNHD, lse_BTH, block_size, stride, select_size, n_select, scale)
    with torch.no_grad():
        if chosen == "naive":
            return _select_naive(*args)
        if chosen == "torch":
            return _select_torch(*args)
        # imported on first use: it needs triton, and TRITON_INTERPRET is read at import time
        from .triton_select import select_blocks_triton

        return select_blocks_triton(*args)


def topn_blocks(
    importance_BTHS: torch.Tensor, t_T: torch.Tensor, select_size: int, n_select: int
) -> torch.Tensor:
    """Block ids [B, T, H, n_select] (int64) from block importances, with NSA's selection rules.

    ``importance_BTHS`` is [B, T, H, S] (group-summed probabilities mapped onto S selection
    blocks, as in ``select_blocks``) for queries at absolute positions ``t_T`` ([T], e.g. the
    new tokens of a decode step); S must cover every query's own block. The rules are those of
    ``select_blocks``, from the same code: blocks 0, t // l' and t // l' - 1 are forced and count
    toward n_select, blocks with j·l' > t are never chosen, ties go to the lower index, ids are
    ascending with -1 padding at the end. Runs without gradient and leaves its input unchanged.
    Raises ValueError naming the argument for a bad select_size or n_select (>= 3), shapes that
    disagree, or S too small for the largest position.
    """
    op = "topn_blocks"
    for name, value, low in (("select_size", select_size, 1), ("n_select", n_select, 3)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{op}: {name} must be an int >= {low}, got {value!r}")
    if importance_BTHS.dim() != 4 or t_T.shape != importance_BTHS.shape[1:2]:
        raise ValueError(
            f"{op}: importance_BTHS must be [B, T, H, S] and t_T [T], got "
            f"{list(importance_BTHS.shape)} and {list(t_T.shape)}"
        )
    S = importance_BTHS.shape[-1]
    last = int(t_T.max()) if t_T.numel() else 0
    if last >= S * select_size:
        raise ValueError(
            f"{op}: importance_BTHS has S={S} blocks, too few for position {last} "
            f"with select_size={select_size}"
        )
    with torch.no_grad():
        scores_BTHS = importance_BTHS.detach().float().clone()
        t_T11 = t_T.to(scores_BTHS.device)[:, None, None]
        return _top_blocks(_mark_blocks(scores_BTHS, t_T11, select_size), n_select)
