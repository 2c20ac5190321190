"""Triton NSA compressed attention: flash-style forward and a two-kernel, atomic-free backward.

Legend: B batch, T time, HQ query heads, H KV heads, G group size HQ // H, D head dim,
N compressed tokens, M query rows of a block (BLOCK_M), C compressed-key columns of a block
(BLOCK_N), P padded head dim.

Compressed token i summarizes raw keys [i·stride, i·stride + block_size) and is visible to query
t only when that whole block is in the past: i·stride + block_size - 1 <= t. Each forward or dq
program (query block, query head) visits only the compressed blocks its newest query can see;
each dk/dv program (compressed-key block, KV head) visits only the query blocks from the first
query that sees its first token on, looping over the G query heads of the group, so no two
programs write the same gradient row and no float atomics are needed. Queries that see no
compressed token (t < block_size - 1) output 0 with lse = -inf. Offsets are int64 so B·T·H·D may
exceed 2**31. TRITON_INTERPRET=1 must be set before this module is imported to run it on CPU
(fp32).
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
def _visible(t, i, T, N, block_size, stride):
    """Mask for broadcast query positions t and compressed tokens i: block i ends at or before t."""
    return (i * stride + block_size - 1 <= t) & (t < T) & (i < N)


@triton.jit
def _n_visible(last_t, N, block_size, stride):
    """How many compressed tokens query last_t sees: those with i·stride <= last_t + 1 - block_size.

    That is floor((last_t + 1 - block_size) / stride) + 1, at most N. The numerator is clamped
    at 0 before dividing, so no negative integer division happens (Triton truncates it toward
    zero while the interpreter's numpy floors it).
    """
    return tl.minimum(tl.maximum(last_t + 1 - block_size + stride, 0) // stride, N)


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    sq_b, sq_t, sq_h, sq_d,
    sk_b, sk_t, sk_h, sk_d,
    sv_b, sv_t, sv_h, sv_d,
    so_b, so_t, so_h, so_d,
    T, N, HQ, G, D, block_size, stride, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (query block, batch · query head): online softmax over visible tokens."""
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
    q_MP = tl.load(
        tile_ptrs(q_ptr, b, hq, offs_m, offs_d, sq_b, sq_t, sq_h, sq_d),
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_M = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_M = tl.zeros([BLOCK_M], tl.float32)
    acc_MP = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = _n_visible(tl.minimum(start_m + BLOCK_M, T) - 1, N, block_size, stride)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < N) & d_ok[None, :]
        k_CP = tl.load(
            tile_ptrs(k_ptr, b, hk, offs_n, offs_d, sk_b, sk_t, sk_h, sk_d), mask=kv_ok, other=0.0
        )
        v_CP = tl.load(
            tile_ptrs(v_ptr, b, hk, offs_n, offs_d, sv_b, sv_t, sv_h, sv_d), mask=kv_ok, other=0.0
        )
        visible_MC = _visible(offs_m[:, None], offs_n[None, :], T, N, block_size, stride)
        m_M, l_M, acc_MP = softmax_tile(
            q_MP, k_CP, v_CP, visible_MC, m_M, l_M, acc_MP, scale, PRECISION
        )
    # a query that sees no token keeps acc 0, l 0 and max -inf: output 0 and lse -inf
    o_MP, lse_M = softmax_out(m_M, l_M, acc_MP)
    tl.store(
        tile_ptrs(o_ptr, b, hq, offs_m, offs_d, so_b, so_t, so_h, so_d),
        o_MP.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(lse_ptr + (b * T + offs_m) * HQ + hq, lse_M, mask=row_ok)


@triton.jit
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr,
    sq_b, sq_t, sq_h, sq_d,
    sk_b, sk_t, sk_h, sk_d,
    sv_b, sv_t, sv_h, sv_d,
    sdo_b, sdo_t, sdo_h, sdo_d,
    sdq_b, sdq_t, sdq_h, sdq_d,
    T, N, HQ, G, D, block_size, stride, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (query block, batch · query head): dq = scale · Σ ds · kcmp."""
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
    row_M = (b * T + offs_m) * HQ + hq
    lse_M = tl.load(lse_ptr + row_M, mask=row_ok, other=0.0)
    delta_M = tl.load(delta_ptr + row_M, mask=row_ok, other=0.0)
    dq_MP = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = _n_visible(tl.minimum(start_m + BLOCK_M, T) - 1, N, block_size, stride)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < N) & d_ok[None, :]
        k_CP = tl.load(
            tile_ptrs(k_ptr, b, hk, offs_n, offs_d, sk_b, sk_t, sk_h, sk_d), mask=kv_ok, other=0.0
        )
        v_CP = tl.load(
            tile_ptrs(v_ptr, b, hk, offs_n, offs_d, sv_b, sv_t, sv_h, sv_d), mask=kv_ok, other=0.0
        )
        visible_MC = _visible(offs_m[:, None], offs_n[None, :], T, N, block_size, stride)
        # rows with lse -inf see nothing, so the mask drops their inf before it is used
        _, ds_MC = softmax_grads(
            q_MP, do_MP, k_CP, v_CP, visible_MC, lse_M, delta_M, scale, PRECISION
        )
        dq_MP += tl.dot(ds_MC.to(k_CP.dtype), k_CP, input_precision=PRECISION)
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
    T, N, H, G, D, block_size, stride, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (compressed block, batch · KV head): dkcmp, dvcmp over the group's heads.

    The program owns its compressed rows for all G query heads of the group, so it writes them
    once, with plain stores, after visiting every query block that sees any of them.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    hk = pid_bh % H
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    tok_ok = offs_n < N
    toks_ok = tok_ok[:, None] & d_ok[None, :]
    k_CP = tl.load(
        tile_ptrs(k_ptr, b, hk, offs_n, offs_d, sk_b, sk_t, sk_h, sk_d), mask=toks_ok, other=0.0
    )
    v_CP = tl.load(
        tile_ptrs(v_ptr, b, hk, offs_n, offs_d, sv_b, sv_t, sv_h, sv_d), mask=toks_ok, other=0.0
    )
    dk_CP = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv_CP = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # the first query that sees token start_n is the last raw key of its block
    lo = (start_n * stride + block_size - 1) // BLOCK_M * BLOCK_M
    for g in range(0, G):
        hq = hk * G + g
        for start_m in range(lo, T, BLOCK_M):
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
            row_M = (b * T + offs_m) * H * G + hq
            lse_M = tl.load(lse_ptr + row_M, mask=row_ok, other=0.0)
            delta_M = tl.load(delta_ptr + row_M, mask=row_ok, other=0.0)
            visible_CM = _visible(offs_m[None, :], offs_n[:, None], T, N, block_size, stride)
            dk_part, dv_part = dkdv_tile(
                k_CP, v_CP, q_MP, do_MP, visible_CM, lse_M, delta_M, scale, PRECISION
            )
            dk_CP += dk_part
            dv_CP += dv_part
    tl.store(
        tile_ptrs(dk_ptr, b, hk, offs_n, offs_d, sdk_b, sdk_t, sdk_h, sdk_d),
        (dk_CP * scale).to(dk_ptr.dtype.element_ty),
        mask=toks_ok,
    )
    tl.store(
        tile_ptrs(dv_ptr, b, hk, offs_n, offs_d, sdv_b, sdv_t, sdv_h, sdv_d),
        dv_CP.to(dv_ptr.dtype.element_ty),
        mask=toks_ok,
    )


class _CompressedAttentionTriton(torch.autograd.Function):
    """Autograd wrapper: forward returns (o, lse), backward runs the dq and dkcmp/dvcmp kernels."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q_BTHD: torch.Tensor,
        kcmp_BNHD: torch.Tensor,
        vcmp_BNHD: torch.Tensor,
        block_size: int,
        stride: int,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the forward kernel; returns o_BTHD and lse_BTH (the latter without gradient)."""
        B, T, HQ, D = q_BTHD.shape
        N, H = kcmp_BNHD.shape[1:3]
        o_BTHD = torch.empty_like(q_BTHD)
        lse_BTH = torch.empty(B, T, HQ, device=q_BTHD.device, dtype=torch.float32)
        _fwd_kernel[(triton.cdiv(T, BLOCK_M), B * HQ)](
            q_BTHD, kcmp_BNHD, vcmp_BNHD, o_BTHD, lse_BTH,
            *q_BTHD.stride(), *kcmp_BNHD.stride(), *vcmp_BNHD.stride(), *o_BTHD.stride(),
            T, N, HQ, HQ // H, D, block_size, stride, scale,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=pad16(D),
            PRECISION=dot_precision(q_BTHD.dtype),
        )  # fmt: skip
        ctx.save_for_backward(q_BTHD, kcmp_BNHD, vcmp_BNHD, o_BTHD, lse_BTH)
        ctx.mark_non_differentiable(lse_BTH)
        ctx.block_size = block_size
        ctx.stride = stride
        ctx.scale = scale
        return o_BTHD, lse_BTH

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, do_BTHD: torch.Tensor, _: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None, None]:
        """Gradients of q, kcmp, vcmp from the saved log-sum-exp; none for the integer knobs."""
        q_BTHD, kcmp_BNHD, vcmp_BNHD, o_BTHD, lse_BTH = ctx.saved_tensors
        B, T, HQ, D = q_BTHD.shape
        N, H = kcmp_BNHD.shape[1:3]
        # delta_t = Σ_d o·do, the softmax-backward row term, shared by both kernels
        delta_BTH = (o_BTHD.float() * do_BTHD.float()).sum(-1).contiguous()
        dq_BTHD = torch.empty_like(q_BTHD)
        dk_BNHD = torch.empty_like(kcmp_BNHD)
        dv_BNHD = torch.empty_like(vcmp_BNHD)
        knobs = (ctx.block_size, ctx.stride, ctx.scale)
        tiles = {
            "BLOCK_M": BLOCK_M,
            "BLOCK_N": BLOCK_N,
            "BLOCK_D": pad16(D),
            "PRECISION": dot_precision(q_BTHD.dtype),
        }
        _dq_kernel[(triton.cdiv(T, BLOCK_M), B * HQ)](
            q_BTHD, kcmp_BNHD, vcmp_BNHD, do_BTHD, dq_BTHD, lse_BTH, delta_BTH,
            *q_BTHD.stride(), *kcmp_BNHD.stride(), *vcmp_BNHD.stride(), *do_BTHD.stride(),
            *dq_BTHD.stride(),
            T, N, HQ, HQ // H, D, *knobs,
            **tiles,
        )  # fmt: skip
        _dkdv_kernel[(triton.cdiv(N, BLOCK_N), B * H)](
            q_BTHD, kcmp_BNHD, vcmp_BNHD, do_BTHD, dk_BNHD, dv_BNHD, lse_BTH, delta_BTH,
            *q_BTHD.stride(), *kcmp_BNHD.stride(), *vcmp_BNHD.stride(), *do_BTHD.stride(),
            *dk_BNHD.stride(), *dv_BNHD.stride(),
            T, N, H, HQ // H, D, *knobs,
            **tiles,
        )  # fmt: skip
        return dq_BTHD, dk_BNHD, dv_BNHD, None, None, None


def compressed_attention_triton(
    q_BTHD: torch.Tensor,
    kcmp_BNHD: torch.Tensor,
    vcmp_BNHD: torch.Tensor,
    block_size: int,
    stride: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NSA compressed attention through the Triton kernels; differentiable in q, kcmp and vcmp.

    Query t of head hq attends compressed tokens i of KV head hq // G with
    i·stride + block_size - 1 <= t; a query that sees none gets a 0 output and lse -inf.
    Returns (o_BTHD in q's dtype, lse_BTH fp32 natural-log log-sum-exp of the scaled scores, no
    gradient). Inputs are validated by the caller (the ``compressed_attention`` dispatcher); fp32
    and bf16 are supported with fp32 accumulation. Raises ValueError for CPU tensors unless the
    kernels were imported under TRITON_INTERPRET=1.
    """
    require_cuda("compressed_attention", q_BTHD)
    return _CompressedAttentionTriton.apply(q_BTHD, kcmp_BNHD, vcmp_BNHD, block_size, stride, scale)
