"""Triton lightning-indexer kernels: dense scores, slot scores, their backwards; top-k via torch.

Legend: B batch, T queries, S keys (queries are the last T of them), N indexer heads, E
indexer head dim, U key sets per query, K index slots, M queries of a tile (BLOCK_T), L keys or
slots of a tile (BLOCK_S / BLOCK_K), Q padded indexer heads (BLOCK_N), P padded head dim
(BLOCK_E).

Dense scores: one program per (query tile, key tile, batch · set) accumulates
sum_j w_j ReLU(q_j k^T) over the N heads with one [M, P] x [P, L] tl.dot each; key tiles wholly
in the queries' future only store -inf. Its backward runs one program per (query tile, batch)
for dq (heads and sets looped), one per (query tile, batch · set) for dw and one per (key tile,
batch) for dk, each recomputing q_j k^T, so no program shares an output row and no atomics are
needed. Slot scores: one program per (query, batch) loads the N heads as a [Q, P] tile and
scores each set's gathered slot keys with one tl.dot per slot block; its backward keeps dq and
dw in registers and adds dk rows with atomics (a key sits in the slots of many queries). Top-k
scores query chunks with the dense kernel and selects with :func:`select_topk_rows` (torch's
top-k, ties to the later key), so it never holds a [T, S] matrix. Offsets are int64.
TRITON_INTERPRET=1 must be set before this module is imported to run it on CPU (fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import dot_precision, pad16, require_cuda
from .indexer import _as_sets, _topk_output, scores_in_sets, select_topk_rows

# Tile sizes; not autotuned (no GPU was at hand when written). Tests shrink them so short
# sequences span several tiles.
BLOCK_T = 64
BLOCK_S = 64
BLOCK_K = 64
# Scores (batch x queries x sets x keys) one chunk of the top-k holds: 256 MB of fp32, 1024
# queries at 64k keys. The CPU path's budget (its ReLU terms sized for a core's caches) made
# 16-query chunks there: ~4000 sequential launches and top-k passes at 64k tokens.
_SCORE_ELEMENTS = 1 << 26


@triton.jit
def _dot_relu(q_ptr, k_ptr, j, b, offs_t, offs_s, offs_e, T, S, E,
              sq_b, sq_t, sq_n, sq_e, sk_b, sk_s, sk_e, PRECISION: tl.constexpr):  # fmt: skip
    """q_j · k for a query tile and a key tile: [M, L] (rows and columns past T, S are 0)."""
    e_ok = offs_e < E
    q_MP = tl.load(
        q_ptr + b * sq_b + offs_t.to(tl.int64)[:, None] * sq_t + j * sq_n + offs_e[None, :] * sq_e,
        mask=(offs_t < T)[:, None] & e_ok[None, :],
        other=0.0,
    )
    k_LP = tl.load(
        k_ptr + b * sk_b + offs_s.to(tl.int64)[:, None] * sk_s + offs_e[None, :] * sk_e,
        mask=(offs_s < S)[:, None] & e_ok[None, :],
        other=0.0,
    )
    return tl.dot(q_MP, tl.trans(k_LP), input_precision=PRECISION), q_MP, k_LP


@triton.jit
def _dense_fwd_kernel(
    q_ptr, k_ptr, w_ptr, out_ptr,
    sq_b, sq_t, sq_n, sq_e,
    sk_b, sk_s, sk_e,
    sw_b, sw_t, sw_u, sw_n,
    so_b, so_t, so_u, so_s,
    T, S, U, N, E, scale,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (query tile, key tile, batch · set): scale · sum_j w_j ReLU(q_j · k)."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bu = tl.program_id(2).to(tl.int64)
    b = pid_bu // U
    u = pid_bu % U
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_e = tl.arange(0, BLOCK_E)
    pos_M = S - T + offs_t
    acc_ML = tl.zeros([BLOCK_T, BLOCK_S], tl.float32)
    # a key tile starting after the tile's last query holds only future keys
    if pid_s * BLOCK_S <= S - T + pid_t * BLOCK_T + BLOCK_T - 1:
        for j in range(0, N):
            dot_ML, _, _ = _dot_relu(
                q_ptr, k_ptr, j, b, offs_t, offs_s, offs_e, T, S, E,
                sq_b, sq_t, sq_n, sq_e, sk_b, sk_s, sk_e, PRECISION,
            )  # fmt: skip
            w_M = tl.load(
                w_ptr + b * sw_b + offs_t.to(tl.int64) * sw_t + u * sw_u + j * sw_n,
                mask=offs_t < T,
                other=0.0,
            )
            acc_ML += w_M[:, None] * tl.maximum(dot_ML, 0.0)
    future_ML = offs_s[None, :] > pos_M[:, None]
    acc_ML = tl.where(future_ML, float("-inf"), acc_ML * scale)
    out_ptrs = (
        out_ptr + b * so_b + offs_t.to(tl.int64)[:, None] * so_t + u * so_u
        + offs_s.to(tl.int64)[None, :] * so_s
    )  # fmt: skip
    tl.store(out_ptrs, acc_ML, mask=(offs_t < T)[:, None] & (offs_s < S)[None, :])


@triton.jit
def _load_grad(g_ptr, b, u, offs_t, offs_s, T, S, sg_b, sg_t, sg_u, sg_s):
    """Incoming gradient tile [M, L] of set u, 0 on future keys and outside the bounds."""
    visible = (offs_s[None, :] <= (S - T + offs_t)[:, None]) & (offs_t < T)[:, None]
    ptrs = (
        g_ptr + b * sg_b + offs_t.to(tl.int64)[:, None] * sg_t + u * sg_u
        + offs_s.to(tl.int64)[None, :] * sg_s
    )  # fmt: skip
    return tl.load(ptrs, mask=visible & (offs_s < S)[None, :], other=0.0)


@triton.jit
def _coef(g_ptr, w_ptr, dot_ML, b, j, offs_t, offs_s, T, S, U, scale,
          sg_b, sg_t, sg_u, sg_s, sw_b, sw_t, sw_u, sw_n,
          BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """d score / d (q_j · k) of a tile: scale · sum_u g_u w_uj where q_j · k > 0, else 0."""
    coef_ML = tl.zeros([BLOCK_T, BLOCK_S], tl.float32)
    for u in range(0, U):
        g_ML = _load_grad(g_ptr, b, u, offs_t, offs_s, T, S, sg_b, sg_t, sg_u, sg_s)
        w_M = tl.load(
            w_ptr + b * sw_b + offs_t.to(tl.int64) * sw_t + u * sw_u + j * sw_n,
            mask=offs_t < T,
            other=0.0,
        )
        coef_ML += g_ML * w_M[:, None]
    return tl.where(dot_ML > 0, coef_ML * scale, 0.0)


@triton.jit
def _dense_dq_kernel(
    q_ptr, k_ptr, w_ptr, g_ptr, dq_ptr,
    sq_b, sq_t, sq_n, sq_e,
    sk_b, sk_s, sk_e,
    sw_b, sw_t, sw_u, sw_n,
    sg_b, sg_t, sg_u, sg_s,
    T, S, U, N, E, scale,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (query tile, batch): dq_j = sum_s (sum_u g_u w_uj) [q_j·k > 0] k."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    last_key = S - T + pid_t * BLOCK_T + BLOCK_T - 1
    for j in range(0, N):
        dq_MP = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
        for s0 in range(0, tl.minimum(S, last_key + 1), BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            dot_ML, _, k_LP = _dot_relu(
                q_ptr, k_ptr, j, b, offs_t, offs_s, offs_e, T, S, E,
                sq_b, sq_t, sq_n, sq_e, sk_b, sk_s, sk_e, PRECISION,
            )  # fmt: skip
            coef_ML = _coef(
                g_ptr, w_ptr, dot_ML, b, j, offs_t, offs_s, T, S, U, scale,
                sg_b, sg_t, sg_u, sg_s, sw_b, sw_t, sw_u, sw_n, BLOCK_T, BLOCK_S,
            )  # fmt: skip
            dq_MP += tl.dot(coef_ML, k_LP, input_precision=PRECISION)
        tl.store(
            dq_ptr + b * sq_b + offs_t.to(tl.int64)[:, None] * sq_t + j * sq_n
            + offs_e[None, :] * sq_e,
            dq_MP,
            mask=(offs_t < T)[:, None] & (offs_e < E)[None, :],
        )  # fmt: skip


@triton.jit
def _dense_dw_kernel(
    q_ptr, k_ptr, g_ptr, dw_ptr,
    sq_b, sq_t, sq_n, sq_e,
    sk_b, sk_s, sk_e,
    sw_b, sw_t, sw_u, sw_n,
    sg_b, sg_t, sg_u, sg_s,
    T, S, U, N, E, scale,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (query tile, batch · set): dw_uj = scale · sum_s g_u ReLU(q_j · k)."""
    pid_t = tl.program_id(0)
    pid_bu = tl.program_id(1).to(tl.int64)
    b = pid_bu // U
    u = pid_bu % U
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    last_key = S - T + pid_t * BLOCK_T + BLOCK_T - 1
    for j in range(0, N):
        dw_M = tl.zeros([BLOCK_T], tl.float32)
        for s0 in range(0, tl.minimum(S, last_key + 1), BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            dot_ML, _, _ = _dot_relu(
                q_ptr, k_ptr, j, b, offs_t, offs_s, offs_e, T, S, E,
                sq_b, sq_t, sq_n, sq_e, sk_b, sk_s, sk_e, PRECISION,
            )  # fmt: skip
            g_ML = _load_grad(g_ptr, b, u, offs_t, offs_s, T, S, sg_b, sg_t, sg_u, sg_s)
            dw_M += tl.sum(g_ML * tl.maximum(dot_ML, 0.0), 1)
        tl.store(
            dw_ptr + b * sw_b + offs_t.to(tl.int64) * sw_t + u * sw_u + j * sw_n,
            dw_M * scale,
            mask=offs_t < T,
        )


@triton.jit
def _dense_dk_kernel(
    q_ptr, k_ptr, w_ptr, g_ptr, dk_ptr,
    sq_b, sq_t, sq_n, sq_e,
    sk_b, sk_s, sk_e,
    sw_b, sw_t, sw_u, sw_n,
    sg_b, sg_t, sg_u, sg_s,
    T, S, U, N, E, scale,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (key tile, batch): dk = sum_t sum_j coef_j(t, s) q_j(t) over the
    queries that see the tile (dk shares k's strides)."""
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_e = tl.arange(0, BLOCK_E)
    dk_LP = tl.zeros([BLOCK_S, BLOCK_E], tl.float32)
    # the first query tile holding a query at or after the tile's first key
    t_first = tl.maximum(pid_s * BLOCK_S - (S - T), 0) // BLOCK_T * BLOCK_T
    for t0 in range(t_first, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        for j in range(0, N):
            dot_ML, q_MP, _ = _dot_relu(
                q_ptr, k_ptr, j, b, offs_t, offs_s, offs_e, T, S, E,
                sq_b, sq_t, sq_n, sq_e, sk_b, sk_s, sk_e, PRECISION,
            )  # fmt: skip
            coef_ML = _coef(
                g_ptr, w_ptr, dot_ML, b, j, offs_t, offs_s, T, S, U, scale,
                sg_b, sg_t, sg_u, sg_s, sw_b, sw_t, sw_u, sw_n, BLOCK_T, BLOCK_S,
            )  # fmt: skip
            dk_LP += tl.dot(tl.trans(coef_ML), q_MP, input_precision=PRECISION)
    tl.store(
        dk_ptr + b * sk_b + offs_s.to(tl.int64)[:, None] * sk_s + offs_e[None, :] * sk_e,
        dk_LP,
        mask=(offs_s < S)[:, None] & (offs_e < E)[None, :],
    )


@triton.jit
def _slot_tile(q_ptr, k_ptr, idx_ptr, b, t, u, k0, S, T, N, E, K,
               sq_b, sq_t, sq_n, sq_e, sk_b, sk_s, sk_e, si_b, si_t, si_u, si_k,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
               PRECISION: tl.constexpr):  # fmt: skip
    """Slots k0 .. k0+L-1 of query t, set u: (key rows, used mask, q [Q, P], k [L, P],
    q_j · k [Q, L])."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    slot_L = k0 + tl.arange(0, BLOCK_K)
    key_L = tl.load(
        idx_ptr + b * si_b + t * si_t + u * si_u + slot_L * si_k, mask=slot_L < K, other=-1
    )
    used_L = (key_L >= 0) & (key_L <= S - T + t)
    row_L = tl.where(used_L, key_L, 0).to(tl.int64)
    e_ok = offs_e < E
    q_QP = tl.load(
        q_ptr + b * sq_b + t * sq_t + offs_n[:, None] * sq_n + offs_e[None, :] * sq_e,
        mask=(offs_n < N)[:, None] & e_ok[None, :],
        other=0.0,
    )
    k_LP = tl.load(
        k_ptr + b * sk_b + row_L[:, None] * sk_s + offs_e[None, :] * sk_e,
        mask=used_L[:, None] & e_ok[None, :],
        other=0.0,
    )
    return row_L, used_L, q_QP, k_LP, tl.dot(q_QP, tl.trans(k_LP), input_precision=PRECISION)


@triton.jit
def _slot_fwd_kernel(
    q_ptr, k_ptr, w_ptr, idx_ptr, out_ptr,
    sq_b, sq_t, sq_n, sq_e,
    sk_b, sk_s, sk_e,
    sw_b, sw_t, sw_u, sw_n,
    si_b, si_t, si_u, si_k,
    T, S, U, N, E, K, scale,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (query, batch): the scores of every set's slots (out shares idx's
    strides); unused and future slots -inf."""
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    for u in range(0, U):
        w_Q = tl.load(
            w_ptr + b * sw_b + t * sw_t + u * sw_u + offs_n * sw_n, mask=offs_n < N, other=0.0
        )
        for k0 in range(0, K, BLOCK_K):
            _, used_L, _, _, dot_QL = _slot_tile(
                q_ptr, k_ptr, idx_ptr, b, t, u, k0, S, T, N, E, K,
                sq_b, sq_t, sq_n, sq_e, sk_b, sk_s, sk_e, si_b, si_t, si_u, si_k,
                BLOCK_N, BLOCK_K, BLOCK_E, PRECISION,
            )  # fmt: skip
            score_L = tl.sum(w_Q[:, None] * tl.maximum(dot_QL, 0.0), 0) * scale
            slot_L = k0 + tl.arange(0, BLOCK_K)
            tl.store(
                out_ptr + b * si_b + t * si_t + u * si_u + slot_L * si_k,
                tl.where(used_L, score_L, float("-inf")),
                mask=slot_L < K,
            )


@triton.jit
def _slot_bwd_kernel(
    q_ptr, k_ptr, w_ptr, idx_ptr, g_ptr, dq_ptr, dk_ptr, dw_ptr,
    sq_b, sq_t, sq_n, sq_e,
    sk_b, sk_s, sk_e,
    sw_b, sw_t, sw_u, sw_n,
    si_b, si_t, si_u, si_k,
    T, S, U, N, E, K, scale,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (query, batch): dq and dw in registers, dk rows by atomics (g shares
    idx's strides, dq q's, dk k's, dw w's)."""
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    n_ok = offs_n < N
    e_ok = offs_e < E
    dq_QP = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    for u in range(0, U):
        w_Q = tl.load(w_ptr + b * sw_b + t * sw_t + u * sw_u + offs_n * sw_n, mask=n_ok, other=0.0)
        dw_Q = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            row_L, used_L, q_QP, k_LP, dot_QL = _slot_tile(
                q_ptr, k_ptr, idx_ptr, b, t, u, k0, S, T, N, E, K,
                sq_b, sq_t, sq_n, sq_e, sk_b, sk_s, sk_e, si_b, si_t, si_u, si_k,
                BLOCK_N, BLOCK_K, BLOCK_E, PRECISION,
            )  # fmt: skip
            slot_L = k0 + tl.arange(0, BLOCK_K)
            g_L = (
                tl.load(
                    g_ptr + b * si_b + t * si_t + u * si_u + slot_L * si_k,
                    mask=(slot_L < K) & used_L,
                    other=0.0,
                )
                * scale
            )
            dw_Q += tl.sum(g_L[None, :] * tl.maximum(dot_QL, 0.0), 1)
            coef_QL = tl.where(dot_QL > 0, w_Q[:, None] * g_L[None, :], 0.0)
            dq_QP += tl.dot(coef_QL, k_LP, input_precision=PRECISION)
            dk_LP = tl.dot(tl.trans(coef_QL), q_QP, input_precision=PRECISION)
            tl.atomic_add(
                dk_ptr + b * sk_b + row_L[:, None] * sk_s + offs_e[None, :] * sk_e,
                dk_LP,
                mask=used_L[:, None] & e_ok[None, :],
            )
        tl.store(dw_ptr + b * sw_b + t * sw_t + u * sw_u + offs_n * sw_n, dw_Q, mask=n_ok)
    tl.store(
        dq_ptr + b * sq_b + t * sq_t + offs_n[:, None] * sq_n + offs_e[None, :] * sq_e,
        dq_QP,
        mask=n_ok[:, None] & e_ok[None, :],
    )


def _dense_scores(
    q_BTNE: torch.Tensor, k_BSE: torch.Tensor, w_BTUN: torch.Tensor, scale: float
) -> torch.Tensor:
    """fp32 dense scores [B, T, U, S] of contiguous fp32 inputs, future keys -inf."""
    B, T, _, E = q_BTNE.shape
    S, U, N = k_BSE.shape[1], w_BTUN.shape[2], w_BTUN.shape[3]
    out_BTUS = torch.empty(B, T, U, S, device=q_BTNE.device)
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(S, BLOCK_S), B * U)
    _dense_fwd_kernel[grid](
        q_BTNE, k_BSE, w_BTUN, out_BTUS,
        *q_BTNE.stride(), *k_BSE.stride(), *w_BTUN.stride(), *out_BTUS.stride(),
        T, S, U, N, E, scale,
        BLOCK_T=BLOCK_T, BLOCK_S=BLOCK_S, BLOCK_E=pad16(E), PRECISION=dot_precision(q_BTNE.dtype),
    )  # fmt: skip
    return out_BTUS


class _DenseScoresTriton(torch.autograd.Function):
    """Dense scores with the three recomputing backward kernels."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q_BTNE: torch.Tensor,
        k_BSE: torch.Tensor,
        w_BTUN: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Scores of every key, future ones -inf."""
        ctx.save_for_backward(q_BTNE, k_BSE, w_BTUN)
        ctx.scale = scale
        return _dense_scores(q_BTNE, k_BSE, w_BTUN, scale)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, g_BTUS: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        """dq, dk and dw kernels; the gradient on future keys is ignored."""
        q_BTNE, k_BSE, w_BTUN = ctx.saved_tensors
        B, T, N, E = q_BTNE.shape
        S, U = k_BSE.shape[1], w_BTUN.shape[2]
        g_BTUS = g_BTUS.float()
        dq, dk, dw = torch.empty_like(q_BTNE), torch.empty_like(k_BSE), torch.empty_like(w_BTUN)
        strides = (*q_BTNE.stride(), *k_BSE.stride(), *w_BTUN.stride(), *g_BTUS.stride())
        common = dict(
            BLOCK_T=BLOCK_T, BLOCK_S=BLOCK_S, BLOCK_E=pad16(E),
            PRECISION=dot_precision(q_BTNE.dtype),
        )  # fmt: skip
        sizes = (T, S, U, N, E, ctx.scale)
        n_t = triton.cdiv(T, BLOCK_T)
        _dense_dq_kernel[(n_t, B)](q_BTNE, k_BSE, w_BTUN, g_BTUS, dq, *strides, *sizes, **common)
        _dense_dw_kernel[(n_t, B * U)](q_BTNE, k_BSE, g_BTUS, dw, *strides, *sizes, **common)
        _dense_dk_kernel[(triton.cdiv(S, BLOCK_S), B)](
            q_BTNE, k_BSE, w_BTUN, g_BTUS, dk, *strides, *sizes, **common
        )
        return dq, dk, dw, None


class _SlotScoresTriton(torch.autograd.Function):
    """Slot scores with a recomputing backward (dk by atomics)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q_BTNE: torch.Tensor,
        k_BSE: torch.Tensor,
        w_BTUN: torch.Tensor,
        idx_BTUK: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Scores of the slot keys; unused and future slots -inf."""
        B, T, N, E = q_BTNE.shape
        S, U, K = k_BSE.shape[1], w_BTUN.shape[2], idx_BTUK.shape[3]
        idx_BTUK = idx_BTUK.contiguous()
        out_BTUK = torch.empty(B, T, U, K, device=q_BTNE.device)
        _slot_fwd_kernel[(T, B)](
            q_BTNE, k_BSE, w_BTUN, idx_BTUK, out_BTUK,
            *q_BTNE.stride(), *k_BSE.stride(), *w_BTUN.stride(), *idx_BTUK.stride(),
            T, S, U, N, E, K, scale,
            BLOCK_N=pad16(N), BLOCK_K=BLOCK_K, BLOCK_E=pad16(E),
            PRECISION=dot_precision(q_BTNE.dtype),
        )  # fmt: skip
        ctx.save_for_backward(q_BTNE, k_BSE, w_BTUN, idx_BTUK)
        ctx.scale = scale
        return out_BTUK

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, g_BTUK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        """dq, dw per query program; dk accumulated with atomics."""
        q_BTNE, k_BSE, w_BTUN, idx_BTUK = ctx.saved_tensors
        B, T, N, E = q_BTNE.shape
        S, U, K = k_BSE.shape[1], w_BTUN.shape[2], idx_BTUK.shape[3]
        g_BTUK = g_BTUK.float().contiguous()
        dq, dw = torch.empty_like(q_BTNE), torch.empty_like(w_BTUN)
        dk = torch.zeros_like(k_BSE)
        _slot_bwd_kernel[(T, B)](
            q_BTNE, k_BSE, w_BTUN, idx_BTUK, g_BTUK, dq, dk, dw,
            *q_BTNE.stride(), *k_BSE.stride(), *w_BTUN.stride(), *idx_BTUK.stride(),
            T, S, U, N, E, K, ctx.scale,
            BLOCK_N=pad16(N), BLOCK_K=BLOCK_K, BLOCK_E=pad16(E),
            PRECISION=dot_precision(q_BTNE.dtype),
        )  # fmt: skip
        return dq, dk, dw, None, None


def _fp32_inputs(
    q_idx_BTNE: torch.Tensor, k_idx_BSE: torch.Tensor, w_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous fp32 q, k and [B, T, U, N] weights (the kernels compute in fp32)."""
    return (
        q_idx_BTNE.float().contiguous(),
        k_idx_BSE.float().contiguous(),
        _as_sets(w_idx).float().contiguous(),
    )


def indexer_scores_triton(
    q_idx_BTNE: torch.Tensor,
    k_idx_BSE: torch.Tensor,
    w_idx: torch.Tensor,
    scale: float,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indexer scores through the Triton kernels, differentiable; fp32 [B, T, (U,) S or K].

    Inputs are validated by the caller. Raises ValueError for CPU tensors unless the kernels
    were imported under TRITON_INTERPRET=1.
    """
    require_cuda("indexer_scores", q_idx_BTNE)
    q, k, w = q_idx_BTNE.float().contiguous(), k_idx_BSE.float().contiguous(), w_idx.float()
    return scores_in_sets(
        _DenseScoresTriton.apply, _SlotScoresTriton.apply, q, k, w, scale, indices
    )


def indexer_topk_triton(
    q_idx_BTNE: torch.Tensor,
    k_idx_BSE: torch.Tensor,
    w_idx: torch.Tensor,
    topk: int,
    scale: float,
) -> torch.Tensor:
    """Top-k selection: dense Triton scores per query chunk, then torch's top-k per row.

    Inputs are validated by the caller. Chunks hold about _SCORE_ELEMENTS scores, so no
    [T, S] matrix exists; queries that see at most ``topk`` keys take them all.
    """
    require_cuda("indexer_topk", q_idx_BTNE)
    q, k, w_BTUN = _fp32_inputs(q_idx_BTNE, k_idx_BSE, w_idx)
    B, T = q.shape[:2]
    S, U = k.shape[1], w_BTUN.shape[2]
    out_BTUK, first = _topk_output(B, T, S, U, topk, q.device)
    size = max(1, _SCORE_ELEMENTS // (B * U * S))
    for t0 in range(first, T, size):
        t1 = min(t0 + size, T)
        P = S - T + t1
        scores_BCUP = _dense_scores(q[:, t0:t1], k[:, :P], w_BTUN[:, t0:t1], scale)
        idx_RK = select_topk_rows(scores_BCUP.view(-1, P), topk)
        out_BTUK[:, t0:t1] = idx_RK.view(B, t1 - t0, U, topk)
    return out_BTUK.squeeze(2) if w_idx.dim() == 3 else out_BTUK
