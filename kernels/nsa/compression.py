"""NSA compression branch: the learnable block compressor phi and attention over its output.

Compressed token i summarizes the raw keys (or values) [i·d, i·d + l) of one head (paper Eq. 7):
the block plus an intra-block position encoding, flattened to l·D numbers, through a two-layer
SiLU MLP whose weights all heads share. A length-T sequence has N = floor((T - l) / d) + 1
compressed tokens, none when T < l. Causality: token i is visible to query t iff its whole block
is in the past, i·d + l - 1 <= t; the first l - 1 queries see no token, their output is exactly
zero and their log-sum-exp -inf. Backends: ``naive`` (explicit per-block slices and an explicit
fp32 mask; the oracle), ``torch`` (fast CPU path) and ``triton`` (GPU; phi in
kernels/nsa/triton_compress_kv.py, the attention in kernels/nsa/triton_compression.py), chosen
through ``resolve_backend``.
Legend: B batch, T time, N compressed tokens, HQ query heads, H KV heads (HQ % H == 0),
G group size HQ // H, D head dim, L block length l, I phi input width l·D, F phi hidden width,
X flattened rows; torch path: r the d query offsets that share one visible prefix, R = H·d·G
folded query heads (W = d·G of them per KV head), M query rows per folded head.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from ..backend import oracle_dtype, resolve_backend

__all__ = ["compress_kv", "compressed_attention"]

# both ops (phi and the attention) have every backend
_AVAILABLE = ("naive", "torch", "triton")
# Device types whose aten flash-attention kernel also returns the log-sum-exp; elsewhere SDPA
# gives the output and a chunked no-grad pass the lse (tests empty it to exercise that path).
_FLASH_LSE_DEVICES = ("cpu",)
# Elements of one fp32 score tile [B, R, rows, M] of that no-grad log-sum-exp pass (64 MiB).
_LSE_TILE_ELEMENTS = 1 << 24
# The gated backward (``gated_compressed_backward``) runs a row range's folded heads in about
# this many parts, so its recomputed output and folded copies are a sixteenth of the range's
# queries each (one offset of the paper's stride 16 per part; over whole sequences, eight parts
# of two offsets put this backward 50 MB above the window's at 32k tokens, 16 query heads of 64,
# then the NSA training peak).
_GATED_PARTS = 16
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def num_compressed(T: int, block_size: int, stride: int) -> int:
    """Number of compressed tokens of a length-T sequence: floor((T - l) / d) + 1, or 0 if T < l."""
    return (T - block_size) // stride + 1 if block_size <= T else 0


def validate_blocks(op: str, block_size: int, stride: int) -> None:
    """Raise ValueError naming the knob unless l and d are ints >= 1 with l % d == 0."""
    for name, value in (("block_size", block_size), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{op}: {name} must be an int >= 1, got {value!r}")
    if block_size % stride:
        raise ValueError(
            f"{op}: block_size={block_size} must be a multiple of stride={stride} "
            "(compressed blocks tile the sequence in whole strides)"
        )


def validate_qkv(
    op: str, q_BTHD: torch.Tensor, kcmp_BNHD: torch.Tensor, block_size: int, stride: int
) -> None:
    """Raise ValueError naming the argument unless q [B, T, HQ, D] fits kcmp [B, N, H, D].

    Checks 4-d shapes, equal batch and head dim, HQ a multiple of H, T >= 1, N equal to the
    compressed count of T for (block_size, stride), and equal devices.
    """
    if q_BTHD.dim() != 4 or kcmp_BNHD.dim() != 4:
        raise ValueError(
            f"{op}: q_BTHD and kcmp_BNHD must be 4-d, got {list(q_BTHD.shape)} and "
            f"{list(kcmp_BNHD.shape)}"
        )
    B, T, HQ, D = q_BTHD.shape
    Bk, N, H, Dk = kcmp_BNHD.shape
    if (Bk, Dk) != (B, D):
        raise ValueError(
            f"{op}: q_BTHD {list(q_BTHD.shape)} and kcmp_BNHD {list(kcmp_BNHD.shape)} must agree "
            "on batch and head dim"
        )
    if H < 1 or HQ % H:
        raise ValueError(f"{op}: query heads HQ={HQ} must be a multiple of KV heads H={H} (GQA)")
    if T < 1:
        raise ValueError(f"{op}: q_BTHD must hold at least one query, got T={T}")
    expected = num_compressed(T, block_size, stride)
    if expected != N:
        raise ValueError(
            f"{op}: kcmp_BNHD has N={N} compressed tokens, but T={T}, block_size={block_size}, "
            f"stride={stride} give {expected}"
        )
    if kcmp_BNHD.device != q_BTHD.device:
        raise ValueError(f"{op}: kcmp_BNHD is on {kcmp_BNHD.device}, q_BTHD on {q_BTHD.device}")


def validate_attention(
    op: str,
    q_BTHD: torch.Tensor,
    kcmp_BNHD: torch.Tensor,
    vcmp_BNHD: torch.Tensor,
    block_size: int,
    stride: int,
) -> None:
    """Raise ValueError naming the knob or argument unless compressed attention's inputs fit:
    ``validate_blocks``, ``validate_qkv``, vcmp shaped like kcmp, one dtype, one device."""
    validate_blocks(op, block_size, stride)
    validate_qkv(op, q_BTHD, kcmp_BNHD, block_size, stride)
    if vcmp_BNHD.shape != kcmp_BNHD.shape:
        raise ValueError(
            f"{op}: vcmp_BNHD must have kcmp_BNHD's shape {list(kcmp_BNHD.shape)}, "
            f"got {list(vcmp_BNHD.shape)}"
        )
    if not (q_BTHD.dtype == kcmp_BNHD.dtype == vcmp_BNHD.dtype):
        raise ValueError(
            f"{op}: q, kcmp, vcmp dtypes differ: {q_BTHD.dtype}, {kcmp_BNHD.dtype}, "
            f"{vcmp_BNHD.dtype}"
        )
    if vcmp_BNHD.device != q_BTHD.device:
        raise ValueError(f"{op}: vcmp_BNHD is on {vcmp_BNHD.device}, q_BTHD on {q_BTHD.device}")


def _check_shape(op: str, name: str, x: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Raise ValueError naming argument ``name`` when ``x`` does not have shape ``expected``."""
    if tuple(x.shape) != expected:
        raise ValueError(f"{op}: {name} must have shape {list(expected)}, got {list(x.shape)}")


def _phi(
    flat_XI: torch.Tensor,
    w1_IF: torch.Tensor,
    b1_F: torch.Tensor,
    w2_FD: torch.Tensor,
    b2_D: torch.Tensor,
) -> torch.Tensor:
    """The compressor MLP on flattened blocks: silu(x @ w1 + b1) @ w2 + b2."""
    return torch.addmm(b2_D, F.silu(torch.addmm(b1_F, flat_XI, w1_IF)), w2_FD)


def _compress_kv_naive(
    x_BTHD: torch.Tensor,
    pos_LD: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    block_size: int,
    stride: int,
) -> torch.Tensor:
    """Oracle phi in fp32 (fp64 for fp64 x): slice every block, add positions, flatten, MLP."""
    B, T, H, D = x_BTHD.shape
    N = num_compressed(T, block_size, stride)
    x = x_BTHD.to(oracle_dtype(x_BTHD))
    blocks = [x[:, i * stride : i * stride + block_size] for i in range(N)]
    # stack needs at least one block; an empty slice of x keeps the empty result in x's graph
    blocks_BNLHD = (
        torch.stack(blocks, dim=1) if blocks else x[:, :0, None].expand(B, 0, block_size, H, D)
    )
    blocks_BNLHD = blocks_BNLHD + pos_LD.to(x.dtype)[:, None, :]
    flat_XI = blocks_BNLHD.permute(0, 1, 3, 2, 4).reshape(B * N * H, block_size * D)
    out_XD = _phi(flat_XI, *(w.to(x.dtype) for w in weights))
    return out_XD.reshape(B, N, H, D).to(x_BTHD.dtype)


def _compress_kv_torch(
    x_BTHD: torch.Tensor,
    pos_LD: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    block_size: int,
    stride: int,
) -> torch.Tensor:
    """Fast phi: all blocks as one strided ``unfold`` view, then two matmuls over every block."""
    B, T, H, D = x_BTHD.shape
    N = num_compressed(T, block_size, stride)
    # unfold needs T >= l; padding a too-short input yields one block that [:, :N] drops again
    x_pad_BTHD = F.pad(x_BTHD, (0, 0, 0, 0, 0, max(0, block_size - T)))
    blocks_BNHLD = x_pad_BTHD.unfold(1, block_size, stride)[:, :N].transpose(-1, -2)
    flat_XI = (blocks_BNHLD + pos_LD).reshape(B * N * H, block_size * D)
    return _phi(flat_XI, *weights).reshape(B, N, H, D).to(x_BTHD.dtype)


def compress_kv(
    x_BTHD: torch.Tensor,
    pos_LD: torch.Tensor,
    w1_IF: torch.Tensor,
    b1_F: torch.Tensor,
    w2_FD: torch.Tensor,
    b2_D: torch.Tensor,
    block_size: int,
    stride: int,
    backend: str = "auto",
) -> torch.Tensor:
    """NSA's learnable compressor phi: one D-vector per head for every block of l raw tokens.

    Compressed token i of x_BTHD ([B, T, H, D], keys or values) is
    ``silu(flatten(x[:, i·d : i·d + l] + pos_LD) @ w1_IF + b1_F) @ w2_FD + b2_D`` per head, with
    the block flattened position-major to I = l·D numbers and the same weights for every head.
    Returns x_BNHD of shape [B, N, H, D] with N = floor((T - l) / d) + 1, or an empty
    [B, 0, H, D] tensor when T < l, in x's dtype; it is differentiable in x and every weight.
    ``backend`` is ``naive`` (per-block slices, in fp32, or fp64 for fp64 x), ``torch``
    (torch's type promotion and autocast apply), ``triton`` (CUDA, or CPU under
    TRITON_INTERPRET=1; dots in x's dtype with fp32 accumulation) or ``auto`` (triton on CUDA,
    torch elsewhere). Raises ValueError naming the argument when block_size or stride is not an
    int >= 1, block_size % stride != 0, x is not 4-d, or pos_LD, w1_IF, b1_F, w2_FD, b2_D are
    not [l, D], [l·D, F], [F], [F, D], [D].
    """
    op = "compress_kv"
    validate_blocks(op, block_size, stride)
    if x_BTHD.dim() != 4:
        raise ValueError(f"{op}: x_BTHD must be 4-d [B, T, H, D], got {list(x_BTHD.shape)}")
    D = x_BTHD.shape[-1]
    _check_shape(op, "pos_LD", pos_LD, (block_size, D))
    if w1_IF.dim() != 2 or w1_IF.shape[0] != block_size * D:
        raise ValueError(
            f"{op}: w1_IF must have shape [block_size * D, F] = [{block_size * D}, F], "
            f"got {list(w1_IF.shape)}"
        )
    F_hidden = w1_IF.shape[1]
    _check_shape(op, "b1_F", b1_F, (F_hidden,))
    _check_shape(op, "w2_FD", w2_FD, (F_hidden, D))
    _check_shape(op, "b2_D", b2_D, (D,))
    weights = (w1_IF, b1_F, w2_FD, b2_D)
    if any(w.device != x_BTHD.device for w in (pos_LD, *weights)):
        raise ValueError(f"{op}: pos_LD and the weights must be on x_BTHD's device")
    chosen = resolve_backend(op, backend, _AVAILABLE, x_BTHD)
    if chosen == "naive":
        return _compress_kv_naive(x_BTHD, pos_LD, weights, block_size, stride)
    if chosen == "torch":
        return _compress_kv_torch(x_BTHD, pos_LD, weights, block_size, stride)
    # imported on first use: it needs triton, and TRITON_INTERPRET is read at import time
    from .triton_compress_kv import compress_kv_triton

    return compress_kv_triton(x_BTHD, pos_LD, *weights, block_size, stride)


def visible_mask(t_T1: torch.Tensor, N: int, block_size: int, stride: int) -> torch.Tensor:
    """[T, N] boolean visibility of compressed token i to the query at t_T1: i·d + l - 1 <= t.

    The single written-out statement of the causal rule that every backend is tested against:
    a compressed token becomes visible at the last raw position of its block, never earlier.
    """
    i_1N = torch.arange(N, device=t_T1.device)[None, :]
    return i_1N * stride + block_size - 1 <= t_T1


def _compressed_attention_naive(
    q_BTHD: torch.Tensor,
    kcmp_BNHD: torch.Tensor,
    vcmp_BNHD: torch.Tensor,
    block_size: int,
    stride: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle: scores of every query against every token (fp32, or fp64 for fp64 input), the
    explicit mask, a softmax."""
    T, HQ = q_BTHD.shape[1:3]
    N, H = kcmp_BNHD.shape[1], kcmp_BNHD.shape[2]
    G = HQ // H
    dtype = oracle_dtype(q_BTHD)
    k_BNQD = kcmp_BNHD.to(dtype).repeat_interleave(G, dim=2)
    v_BNQD = vcmp_BNHD.to(dtype).repeat_interleave(G, dim=2)
    scores_BQTN = torch.einsum("btqd,bnqd->bqtn", q_BTHD.to(dtype), k_BNQD) * scale
    visible_TN = visible_mask(torch.arange(T, device=q_BTHD.device)[:, None], N, block_size, stride)
    sees_T1 = visible_TN.any(dim=-1, keepdim=True)
    lse_BQT = torch.logsumexp(scores_BQTN.detach().masked_fill(~visible_TN, float("-inf")), -1)
    # rows that see nothing keep their finite scores, so softmax and its backward stay NaN-free,
    # and are then zeroed: their output is exactly 0 and no gradient flows through them
    probs_BQTN = torch.softmax(scores_BQTN.masked_fill(sees_T1 & ~visible_TN, float("-inf")), -1)
    probs_BQTN = probs_BQTN * sees_T1
    o_BTHD = torch.einsum("bqtn,bnqd->btqd", probs_BQTN, v_BNQD)
    return o_BTHD.to(q_BTHD.dtype), lse_BQT.transpose(1, 2)


def _fold_queries(
    q_BTHD: torch.Tensor, N: int, H: int, block_size: int, stride: int
) -> torch.Tensor:
    """Queries t >= l - 1 as [B, R, M = N, D] rows of a causal attention over the N tokens.

    Query t = l - 1 + m·d + r (0 <= r < d) sees exactly tokens 0 .. m, i.e. row m of a top-left
    causal mask, for every r. Folding (r, group member g) into the heads as R = H·d·G, in
    (KV head, r, g) order, makes KV head h serve folded heads h·d·G .. (h + 1)·d·G - 1 (GQA).
    The tail is padded with zero queries up to N·d rows; those rows are dropped afterwards.
    """
    B, T, HQ, D = q_BTHD.shape
    G = HQ // H
    first = block_size - 1
    q_pad_BTHD = F.pad(q_BTHD[:, first:], (0, 0, 0, 0, 0, N * stride - (T - first)))
    q_BNrHGD = q_pad_BTHD.reshape(B, N, stride, H, G, D)
    return q_BNrHGD.permute(0, 3, 2, 4, 1, 5).reshape(B, H * stride * G, N, D)


def _unfold_rows(x_BRM: torch.Tensor, T: int, H: int, block_size: int, stride: int) -> torch.Tensor:
    """Inverse of ``_fold_queries`` for per-row outputs: [B, R, M, *] -> [B, T - l + 1, HQ, *]."""
    B, R, N = x_BRM.shape[:3]
    G = R // (H * stride)
    rest = x_BRM.shape[3:]
    x_BHrGN = x_BRM.reshape(B, H, stride, G, N, *rest)
    x_BNrHG = x_BHrGN.permute(0, 4, 2, 1, 3, *range(5, 5 + len(rest)))
    return x_BNrHG.reshape(B, N * stride, H * G, *rest)[:, : T - block_size + 1]


def _part_rows(
    x_BTHX: torch.Tensor, r0: int, r1: int, first: int, stride: int
) -> list[tuple[torch.Tensor, slice, int]]:
    """Where offsets r0 .. r1 - 1 of the folded rows sit in x: (rows [B, n, c', HQ, *rest] of
    x, the folded rows m they are, c' offsets from r0) for the full rows of ``stride``
    queries and the partial last one. Row t of x is query first + m·d + r (``first`` = l - 1
    for a whole sequence, see ``_fold_queries``; a row range starts at a folded row)."""
    B, T, HQ = x_BTHX.shape[:3]
    rest = x_BTHX.shape[3:]
    full, rem = divmod(T - first, stride)
    pieces = []
    if full:
        # a view for contiguous x (the rows added into), a copy of a strided x (only read)
        rows = x_BTHX[:, first : first + full * stride].reshape(B, full, stride, HQ, *rest)
        pieces.append((rows[:, :, r0:r1], slice(0, full), r1 - r0))
    if rem > r0:
        t0, c = first + full * stride + r0, min(r1, rem) - r0
        pieces.append((x_BTHX[:, t0 : t0 + c].unsqueeze(1), slice(full, full + 1), c))
    return pieces


def _fold_part(
    x_BTHX: torch.Tensor, r0: int, r1: int, N: int, H: int, first: int, stride: int
) -> torch.Tensor:
    """The folded rows of offsets r0 .. r1 - 1 only: ``_fold_queries``' heads (h, r, g) with
    r in that range, [B, H·c·G, N, *rest] (c = r1 - r0), rows past T zero."""
    B, _, HQ = x_BTHX.shape[:3]
    rest = x_BTHX.shape[3:]
    c = r1 - r0
    part_BNcHX = x_BTHX.new_zeros(B, N, c, HQ, *rest)
    for rows, m, n_r in _part_rows(x_BTHX, r0, r1, first, stride):
        part_BNcHX[:, m, :n_r] = rows
    part_BNcHGX = part_BNcHX.view(B, N, c, H, HQ // H, *rest)
    order = (0, 3, 2, 4, 1, *range(5, 5 + len(rest)))
    return part_BNcHGX.permute(order).reshape(B, H * c * (HQ // H), N, *rest)


def _add_unfolded_part(
    dst_BTHX: torch.Tensor, x_BRMX: torch.Tensor, r0: int, r1: int, H: int, first: int,
    stride: int,
) -> None:  # fmt: skip
    """Inverse of ``_fold_part``, added into the rows of dst (contiguous) it came from."""
    B, R, N = x_BRMX.shape[:3]
    rest = x_BRMX.shape[3:]
    c, HQ = r1 - r0, dst_BTHX.shape[2]
    order = (0, 4, 2, 1, 3, *range(5, 5 + len(rest)))
    x_BNcHX = x_BRMX.reshape(B, H, c, R // (H * c), N, *rest).permute(order)
    x_BNcHX = x_BNcHX.reshape(B, N, c, HQ, *rest)
    for rows, m, n_r in _part_rows(dst_BTHX, r0, r1, first, stride):
        rows += x_BNcHX[:, m, :n_r]


def _rows_flash(
    q_BRMD: torch.Tensor, k_BHND: torch.Tensor, v_BHND: torch.Tensor, m0: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of folded rows m0 .. m0 + M - 1 under the causal rule (row m sees tokens 0 .. m):
    aten's flash kernel is top-left causal only, so rows past the first are a causal call on
    their diagonal tokens m0 .. and, for m0 > 0, a full call on tokens 0 .. m0 - 1, merged by
    their log-sum-exps (exact: the flash backward of each part with the merged pair gives that
    part's share of the gradients)."""
    M = q_BRMD.shape[2]
    o_BRMD, lse_BRM = _flash(
        q_BRMD, k_BHND[:, :, m0 : m0 + M], v_BHND[:, :, m0 : m0 + M], is_causal=True, scale=scale
    )
    if m0 == 0:
        return o_BRMD, lse_BRM
    o_old, lse_old = _flash(q_BRMD, k_BHND[:, :, :m0], v_BHND[:, :, :m0], scale=scale)
    lse_new = torch.logaddexp(lse_old, lse_BRM)
    o_BRMD.mul_((lse_BRM - lse_new).exp_().unsqueeze(-1))
    o_BRMD.addcmul_(o_old, (lse_old - lse_new).exp_().unsqueeze(-1))
    return o_BRMD, lse_new


def gated_compressed_backward(
    dy_BTHD: torch.Tensor,
    gate_BTH: torch.Tensor,
    q_BTHD: torch.Tensor,
    kcmp_BNHD: torch.Tensor,
    vcmp_BNHD: torch.Tensor,
    block_size: int,
    stride: int,
    scale: float,
    dq_BTHD: torch.Tensor,
    rows: tuple[int, int],
    dkv_BHND: tuple[torch.Tensor, torch.Tensor],
    s_BTH: torch.Tensor,
) -> None:
    """Backward of ``gate · compressed_attention(q, kcmp, vcmp)`` on CPU for the queries
    ``rows`` (t0, t1) without its output: adds their dq into ``dq_BTHD`` (contiguous, those
    rows only), dk and dv into ``dkv_BHND`` (fp32 [B, H, N, D], fp64 for fp64) and writes
    their rows of ``s_BTH``, s = rowsum(dy ⊙ o) the gradient of the gate. t0 is 0 or a folded
    row's first query (l - 1 + m·d, ``_fold_queries``).

    The folded heads run in parts of a few offsets r (``_fold_part``); each part recomputes
    its output and lse with aten's causal flash forward (``_rows_flash``, a pair consistent
    with its flash backward) and back-propagates gate · dy, so no q-sized output or folded
    copy exists. Inputs are in one dtype with T >= block_size.
    """
    B, _, HQ, _ = q_BTHD.shape
    H = kcmp_BNHD.shape[2]
    t0, t1 = rows
    lo = max(t0, block_size - 1)
    if t1 <= lo:
        return
    m0 = (lo - block_size + 1) // stride
    M = -(-(t1 - lo) // stride)
    k_BHND, v_BHND = kcmp_BNHD.transpose(1, 2), vcmp_BNHD.transpose(1, 2)
    dk_BHND, dv_BHND = dkv_BHND
    # the range's rows, contiguous (the folded parts are added into them)
    s_bTH = torch.zeros(B, t1 - t0, HQ, dtype=s_BTH.dtype, device=s_BTH.device)
    q_bTHD, dy_bTHD = q_BTHD[:, t0:t1], dy_BTHD[:, t0:t1]
    gate_bTH1 = gate_BTH[:, t0:t1].unsqueeze(-1).to(q_BTHD.dtype)
    step = max(1, stride // _GATED_PARTS)
    for r0 in range(0, stride, step):
        r1 = min(stride, r0 + step)
        part = (r0, r1, M, H, lo - t0, stride)
        q_BRMD = _fold_part(q_bTHD, *part)
        o_BRMD, lse_BRM = _rows_flash(q_BRMD, k_BHND, v_BHND, m0, scale)
        dy_BRMD = _fold_part(dy_bTHD, *part)
        _add_unfolded_part(
            s_bTH, torch.linalg.vecdot(dy_BRMD, o_BRMD).to(s_BTH.dtype), *part[:2], *part[3:]
        )
        do_BRMD = dy_BRMD.mul_(_fold_part(gate_bTH1, *part))
        keys = slice(m0, m0 + M)
        dq_BRMD, dk_part, dv_part = _flash_backward(
            do_BRMD, q_BRMD, k_BHND[:, :, keys], v_BHND[:, :, keys], o_BRMD, lse_BRM, 0.0, True,
            scale=scale,
        )  # fmt: skip
        dk_BHND[:, :, keys] += dk_part
        dv_BHND[:, :, keys] += dv_part
        if m0:
            dq_old, dk_part, dv_part = _flash_backward(
                do_BRMD, q_BRMD, k_BHND[:, :, :m0], v_BHND[:, :, :m0], o_BRMD, lse_BRM, 0.0,
                False, scale=scale,
            )  # fmt: skip
            dq_BRMD += dq_old
            dk_BHND[:, :, :m0] += dk_part
            dv_BHND[:, :, :m0] += dv_part
        _add_unfolded_part(dq_BTHD, dq_BRMD, *part[:2], *part[3:])
    s_BTH[:, t0:t1] = s_bTH


def _causal_lse(q_BRMD: torch.Tensor, k_BHND: torch.Tensor, scale: float) -> torch.Tensor:
    """Natural-log log-sum-exp [B, R, M] of top-left causal scores, in query chunks, no grad.

    Off CPU there is no public SDPA op that also returns its log-sum-exp, so it is recomputed
    here; each chunk of rows only reads the key prefix its causal mask can reach.
    """
    B, R, M, D = q_BRMD.shape
    H = k_BHND.shape[1]
    lse_BRM = torch.empty(B, R, M, device=q_BRMD.device, dtype=torch.float32)
    rows = max(1, _LSE_TILE_ELEMENTS // (B * R * M))
    with torch.no_grad():
        for m0 in range(0, M, rows):
            m1 = min(M, m0 + rows)
            q_BHWMD = q_BRMD[:, :, m0:m1].float().reshape(B, H, R // H, m1 - m0, D)
            k_BH1DN = k_BHND[:, :, None, :m1].float().transpose(-1, -2)
            scores_BHWMN = (q_BHWMD @ k_BH1DN) * scale
            m_M1 = torch.arange(m0, m1, device=q_BRMD.device)[:, None]
            future_MN = torch.arange(m1, device=q_BRMD.device)[None, :] > m_M1
            scores_BHWMN.masked_fill_(future_MN, float("-inf"))
            lse_BRM[:, :, m0:m1] = torch.logsumexp(scores_BHWMN, dim=-1).reshape(B, R, m1 - m0)
    return lse_BRM


def _compressed_attention_torch(
    q_BTHD: torch.Tensor,
    kcmp_BNHD: torch.Tensor,
    vcmp_BNHD: torch.Tensor,
    block_size: int,
    stride: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast path: the staircase visibility becomes one causal flash-attention call, no mask.

    Queries are folded by ``_fold_queries`` so that causal SDPA over the N compressed tokens is
    exactly the visibility rule; its blocked kernel skips the invisible half and never stores a
    score matrix. On CPU, aten's flash kernel also returns the log-sum-exp (layout [B, R, M],
    output differentiable); elsewhere SDPA gives the output and ``_causal_lse`` the lse.
    """
    B, T, HQ, D = q_BTHD.shape
    N, H = kcmp_BNHD.shape[1], kcmp_BNHD.shape[2]
    first = block_size - 1
    lse_BTH = torch.full((B, T, HQ), float("-inf"), device=q_BTHD.device)
    if N == 0:
        return q_BTHD.new_zeros(B, T, HQ, D), lse_BTH
    q_BRMD = _fold_queries(q_BTHD, N, H, block_size, stride)
    k_BHND = kcmp_BNHD.transpose(1, 2)
    v_BHND = vcmp_BNHD.transpose(1, 2)
    if q_BTHD.device.type in _FLASH_LSE_DEVICES:
        o_BRMD, lse_BRM = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_BRMD, k_BHND, v_BHND, is_causal=True, scale=scale
        )
    else:
        o_BRMD = F.scaled_dot_product_attention(
            q_BRMD, k_BHND, v_BHND, is_causal=True, scale=scale, enable_gqa=True
        )
        lse_BRM = _causal_lse(q_BRMD, k_BHND, scale)
    # the zero rows of the queries that see nothing are concatenated, not written in place, so
    # autograd sees one differentiable output
    zeros_BTHD = q_BTHD.new_zeros(B, first, HQ, D)
    o_BTHD = torch.cat([zeros_BTHD, _unfold_rows(o_BRMD, T, H, block_size, stride)], dim=1)
    lse_BTH[:, first:] = _unfold_rows(lse_BRM.detach().float(), T, H, block_size, stride)
    return o_BTHD, lse_BTH


def compressed_attention(
    q_BTHD: torch.Tensor,
    kcmp_BNHD: torch.Tensor,
    vcmp_BNHD: torch.Tensor,
    block_size: int,
    stride: int,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of every query over the compressed tokens it may see; (o_BTHD, lse_BTH).

    q_BTHD is [B, T, HQ, D]; kcmp_BNHD and vcmp_BNHD are [B, N, H, D] with N the compressed
    count of T (``compress_kv``'s output) and HQ a multiple of H (query head h reads KV head
    h // G). Token i is visible to query t iff i·d + l - 1 <= t; queries t < l - 1 see none and
    get an exact zero output, lse -inf and zero (never NaN) gradients. lse_BTH [B, T, HQ] is the
    fp32 natural-log log-sum-exp of the scaled visible scores, detached: block selection uses it
    to rebuild this branch's probabilities. o is differentiable in q, kcmp and vcmp and has q's
    dtype. ``scale`` defaults to D**-0.5. ``backend`` is ``naive`` (explicit fp32 mask),
    ``torch``, ``triton`` (CUDA; CPU only under TRITON_INTERPRET=1) or ``auto`` (triton on
    CUDA, torch elsewhere). Raises ValueError naming the argument for bad block_size or
    stride, shapes that disagree, a wrong N, or mismatched dtypes or devices.
    """
    op = "compressed_attention"
    validate_attention(op, q_BTHD, kcmp_BNHD, vcmp_BNHD, block_size, stride)
    chosen = resolve_backend(op, backend, _AVAILABLE, q_BTHD)
    scale = q_BTHD.shape[-1] ** -0.5 if scale is None else float(scale)
    if chosen == "naive":
        return _compressed_attention_naive(q_BTHD, kcmp_BNHD, vcmp_BNHD, block_size, stride, scale)
    if chosen == "torch":
        return _compressed_attention_torch(q_BTHD, kcmp_BNHD, vcmp_BNHD, block_size, stride, scale)
    # imported on first use: it needs triton, and TRITON_INTERPRET is read at import time
    from .triton_compression import compressed_attention_triton

    return compressed_attention_triton(q_BTHD, kcmp_BNHD, vcmp_BNHD, block_size, stride, scale)
