"""Triton sliding-window attention: flash-style forward and a two-kernel, atomic-free backward.

Legend: B batch, T time, HQ query heads, H KV heads, G group size HQ // H, D head dim,
M query rows of a block (BLOCK_M), N key columns of a block (BLOCK_N), P padded head dim.

Every program only visits the key (or query) blocks that intersect the window band
t - window < s <= t, so the work is O(T · window) per head. Forward keeps an online softmax per
query block and stores the log-sum-exp; backward recomputes the probabilities from it. dq is
computed per (query block, query head); dk and dv per (key block, KV head), looping over the G
query heads of the group and the query blocks that see the key block, so no two programs write
the same gradient row and no float atomics are needed. Offsets are int64 so B·T·H·D may exceed
2**31. TRITON_INTERPRET=1 must be set before this module is imported to run it on CPU (fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import dot_precision, pad16, require_cuda, tile_ptrs
from ..triton_flash import dkdv_tile, softmax_grads, softmax_out, softmax_tile

# The usual flash-attention tile for D <= 128; not autotuned (no GPU was at hand when written).
# Tests shrink them to make short sequences span many blocks.
BLOCK_M = 64
BLOCK_N = 64


@triton.jit
def _visible(t, s, T, window):
    """Window mask for broadcast query positions t and key positions s: t - window < s <= t."""
    return (s <= t) & (s > t - window) & (t < T) & (s < T)


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    sq_b, sq_t, sq_h, sq_d,
    sk_b, sk_t, sk_h, sk_d,
    sv_b, sv_t, sv_h, sv_d,
    so_b, so_t, so_h, so_d,
    T, HQ, G, D, window, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (query block, batch · query head): online softmax over the window."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HQ
    hq = pid_bh % HQ
    hk = hq // G
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_MP = tl.load(
        tile_ptrs(q_ptr, b, hq, offs_m, offs_d, sq_b, sq_t, sq_h, sq_d),
        mask=(offs_m[:, None] < T) & d_ok[None, :],
        other=0.0,
    )
    m_M = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_M = tl.zeros([BLOCK_M], tl.float32)
    acc_MP = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # key blocks from the one holding the first row's oldest key to the last row's own key
    lo = tl.maximum(start_m - window + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(start_m + BLOCK_M, T)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < T) & d_ok[None, :]
        k_NP = tl.load(
            tile_ptrs(k_ptr, b, hk, offs_n, offs_d, sk_b, sk_t, sk_h, sk_d),
            mask=kv_ok,
            other=0.0,
        )
        v_NP = tl.load(
            tile_ptrs(v_ptr, b, hk, offs_n, offs_d, sv_b, sv_t, sv_h, sv_d),
            mask=kv_ok,
            other=0.0,
        )
        visible_MN = _visible(offs_m[:, None], offs_n[None, :], T, window)
        m_M, l_M, acc_MP = softmax_tile(
            q_MP, k_NP, v_NP, visible_MN, m_M, l_M, acc_MP, scale, PRECISION
        )
    # rows past T see no key at all: they get output 0 and are not stored
    o_MP, lse_M = softmax_out(m_M, l_M, acc_MP)
    row_ok = offs_m < T
    tl.store(
        tile_ptrs(o_ptr, b, hq, offs_m, offs_d, so_b, so_t, so_h, so_d),
        o_MP.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(lse_ptr + pid_bh * T + offs_m, lse_M, mask=row_ok)


@triton.jit
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr,
    sq_b, sq_t, sq_h, sq_d,
    sk_b, sk_t, sk_h, sk_d,
    sv_b, sv_t, sv_h, sv_d,
    sdo_b, sdo_t, sdo_h, sdo_d,
    sdq_b, sdq_t, sdq_h, sdq_d,
    T, HQ, G, D, window, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (query block, batch · query head): dq = scale · Σ ds · k in the window."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HQ
    hq = pid_bh % HQ
    hk = hq // G
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok = offs_m < T
    rows_ok = row_ok[:, None] & d_ok[None, :]
    q_MP = tl.load(
        tile_ptrs(q_ptr, b, hq, offs_m, offs_d, sq_b, sq_t, sq_h, sq_d), mask=rows_ok, other=0.0
    )
    do_MP = tl.load(
        tile_ptrs(do_ptr, b, hq, offs_m, offs_d, sdo_b, sdo_t, sdo_h, sdo_d),
        mask=rows_ok,
        other=0.0,
    )
    lse_M = tl.load(lse_ptr + pid_bh * T + offs_m, mask=row_ok, other=0.0)
    delta_M = tl.load(delta_ptr + pid_bh * T + offs_m, mask=row_ok, other=0.0)
    dq_MP = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = tl.maximum(start_m - window + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(start_m + BLOCK_M, T)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < T) & d_ok[None, :]
        k_NP = tl.load(
            tile_ptrs(k_ptr, b, hk, offs_n, offs_d, sk_b, sk_t, sk_h, sk_d),
            mask=kv_ok,
            other=0.0,
        )
        v_NP = tl.load(
            tile_ptrs(v_ptr, b, hk, offs_n, offs_d, sv_b, sv_t, sv_h, sv_d),
            mask=kv_ok,
            other=0.0,
        )
        visible_MN = _visible(offs_m[:, None], offs_n[None, :], T, window)
        _, ds_MN = softmax_grads(
            q_MP, do_MP, k_NP, v_NP, visible_MN, lse_M, delta_M, scale, PRECISION
        )
        dq_MP += tl.dot(ds_MN.to(k_NP.dtype), k_NP, input_precision=PRECISION)
    tl.store(
        tile_ptrs(dq_ptr, b, hq, offs_m, offs_d, sdq_b, sdq_t, sdq_h, sdq_d),
        (dq_MP * scale).to(dq_ptr.dtype.element_ty),
        mask=rows_ok,
    )


@triton.jit
def _dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr,
    sq_b, sq_t, sq_h, sq_d,
    sk_b, sk_t, sk_h, sk_d,
    sv_b, sv_t, sv_h, sv_d,
    sdo_b, sdo_t, sdo_h, sdo_d,
    sdk_b, sdk_t, sdk_h, sdk_d,
    sdv_b, sdv_t, sdv_h, sdv_d,
    T, H, G, D, window, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (key block, batch · KV head): dk, dv summed over the group's query heads.

    The program owns its key rows for all G query heads of the group, so it writes dk and dv
    once, with plain stores, after visiting every query block whose window reaches the block.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    hk = pid_bh % H
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    key_ok = offs_n < T
    keys_ok = key_ok[:, None] & d_ok[None, :]
    k_NP = tl.load(
        tile_ptrs(k_ptr, b, hk, offs_n, offs_d, sk_b, sk_t, sk_h, sk_d), mask=keys_ok, other=0.0
    )
    v_NP = tl.load(
        tile_ptrs(v_ptr, b, hk, offs_n, offs_d, sv_b, sv_t, sv_h, sv_d), mask=keys_ok, other=0.0
    )
    dk_NP = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv_NP = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # query blocks from the one holding key start_n's own row to the newest query that sees the
    # block's last key (position start_n + BLOCK_N - 1 + window - 1)
    lo = start_n // BLOCK_M * BLOCK_M
    hi = tl.minimum(start_n + BLOCK_N + window - 1, T)
    for g in range(0, G):
        hq = hk * G + g
        row_bh = (b * H * G + hq) * T
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < T
            rows_ok = row_ok[:, None] & d_ok[None, :]
            q_MP = tl.load(
                tile_ptrs(q_ptr, b, hq, offs_m, offs_d, sq_b, sq_t, sq_h, sq_d),
                mask=rows_ok,
                other=0.0,
            )
            do_MP = tl.load(
                tile_ptrs(do_ptr, b, hq, offs_m, offs_d, sdo_b, sdo_t, sdo_h, sdo_d),
                mask=rows_ok,
                other=0.0,
            )
            lse_M = tl.load(lse_ptr + row_bh + offs_m, mask=row_ok, other=0.0)
            delta_M = tl.load(delta_ptr + row_bh + offs_m, mask=row_ok, other=0.0)
            visible_NM = _visible(offs_m[None, :], offs_n[:, None], T, window)
            dk_part, dv_part = dkdv_tile(
                k_NP, v_NP, q_MP, do_MP, visible_NM, lse_M, delta_M, scale, PRECISION
            )
            dk_NP += dk_part
            dv_NP += dv_part
    tl.store(
        tile_ptrs(dk_ptr, b, hk, offs_n, offs_d, sdk_b, sdk_t, sdk_h, sdk_d),
        (dk_NP * scale).to(dk_ptr.dtype.element_ty),
        mask=keys_ok,
    )
    tl.store(
        tile_ptrs(dv_ptr, b, hk, offs_n, offs_d, sdv_b, sdv_t, sdv_h, sdv_d),
        dv_NP.to(dv_ptr.dtype.element_ty),
        mask=keys_ok,
    )


class _SlidingWindowTriton(torch.autograd.Function):
    """Autograd wrapper: forward saves the log-sum-exp, backward runs the dq and dk/dv kernels."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q_BTHD: torch.Tensor,
        k_BTHD: torch.Tensor,
        v_BTHD: torch.Tensor,
        window: int,
        scale: float,
    ) -> torch.Tensor:
        """Run the forward kernel; returns o_BTHD and keeps q, k, v, o and lse for backward."""
        B, T, HQ, D = q_BTHD.shape
        H = k_BTHD.shape[2]
        o_BTHD = torch.empty_like(q_BTHD)
        lse_BHT = torch.empty(B, HQ, T, device=q_BTHD.device, dtype=torch.float32)
        grid = (triton.cdiv(T, BLOCK_M), B * HQ)
        _fwd_kernel[grid](
            q_BTHD, k_BTHD, v_BTHD, o_BTHD, lse_BHT,
            *q_BTHD.stride(), *k_BTHD.stride(), *v_BTHD.stride(), *o_BTHD.stride(),
            T, HQ, HQ // H, D, window, scale,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=pad16(D),
            PRECISION=dot_precision(q_BTHD.dtype),
        )  # fmt: skip
        ctx.save_for_backward(q_BTHD, k_BTHD, v_BTHD, o_BTHD, lse_BHT)
        ctx.window = window
        ctx.scale = scale
        return o_BTHD

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, do_BTHD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        """Gradients of q, k, v from the saved log-sum-exp; none for window and scale."""
        q_BTHD, k_BTHD, v_BTHD, o_BTHD, lse_BHT = ctx.saved_tensors
        B, T, HQ, D = q_BTHD.shape
        H = k_BTHD.shape[2]
        # delta_t = Σ_d o·do, the softmax-backward row term, shared by both kernels
        delta_BHT = (o_BTHD.float() * do_BTHD.float()).sum(-1).transpose(1, 2).contiguous()
        dq_BTHD = torch.empty_like(q_BTHD)
        dk_BTHD = torch.empty_like(k_BTHD)
        dv_BTHD = torch.empty_like(v_BTHD)
        _dq_kernel[(triton.cdiv(T, BLOCK_M), B * HQ)](
            q_BTHD, k_BTHD, v_BTHD, do_BTHD, dq_BTHD, lse_BHT, delta_BHT,
            *q_BTHD.stride(), *k_BTHD.stride(), *v_BTHD.stride(), *do_BTHD.stride(),
            *dq_BTHD.stride(),
            T, HQ, HQ // H, D, ctx.window, ctx.scale,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=pad16(D),
            PRECISION=dot_precision(q_BTHD.dtype),
        )  # fmt: skip
        _dkdv_kernel[(triton.cdiv(T, BLOCK_N), B * H)](
            q_BTHD, k_BTHD, v_BTHD, do_BTHD, dk_BTHD, dv_BTHD, lse_BHT, delta_BHT,
            *q_BTHD.stride(), *k_BTHD.stride(), *v_BTHD.stride(), *do_BTHD.stride(),
            *dk_BTHD.stride(), *dv_BTHD.stride(),
            T, H, HQ // H, D, ctx.window, ctx.scale,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=pad16(D),
            PRECISION=dot_precision(q_BTHD.dtype),
        )  # fmt: skip
        return dq_BTHD, dk_BTHD, dv_BTHD, None, None


def sliding_window_attention_triton(
    q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor, window: int, scale: float
) -> torch.Tensor:
    """Sliding-window attention through the Triton kernels; differentiable in q, k and v.

    Inputs are validated by the caller. The window is clipped to T (a longer one sees the same
    keys) so the key loops stay bounded; returns o_BTHD in q's dtype. Raises ValueError for CPU
    tensors unless the kernels were imported under TRITON_INTERPRET=1.
    """
    require_cuda("sliding_window_attention", q_BTHD)
    return _SlidingWindowTriton.apply(q_BTHD, k_BTHD, v_BTHD, min(window, q_BTHD.shape[1]), scale)
