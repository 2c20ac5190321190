"""Triton DSA sparse attention: group-centric forward and backward over the index slots.

Legend: B batch, T queries, S keys, HQ query heads, H KV heads, G group size HQ // H, D head
dim, K index slots, R padded group rows (BLOCK_G), L slots of a block (BLOCK_K), P padded head
dim (BLOCK_D).

One program per (query t, batch · KV head) loads the G query heads of the group as one [R, P]
tile (R = G padded to at least 16, tl.dot's minimum) and streams the query's slots through in
blocks of L: each slot's key and value row is gathered once per group, scored with one tl.dot
and folded into an online softmax. A slot is used when it holds a key position <= the query's
(S - T + t); unused and future slots get -inf scores, and a row with no used slot outputs 0
with lse -inf. The optional probabilities pass recomputes the scores from the lse and writes
each slot's probability averaged over the group. The backward program recomputes the
probabilities, keeps dq in registers and adds dk, dv rows into fp32 buffers with atomics (a
key can sit in the slots of many queries), so dk and dv are exact up to summation order.
Offsets are int64 so B·S·H·D may exceed 2**31. TRITON_INTERPRET=1 must be set before this
module is imported to run it on CPU (fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import dot_precision, pad16, require_cuda
from ..triton_flash import softmax_grads, softmax_out, softmax_tile
from .attention import on_head_sets

# Slots per loop step: a [16, 64] x [64, 64] dot per step; not autotuned (no GPU was at hand
# when written). Tests shrink it so short rows span several blocks.
BLOCK_K = 64


@triton.jit
def _load_group(ptr, b, t, h, G, offs_g, offs_d, D, s_b, s_t, s_h, s_d):
    """The group's [R, P] rows of a [B, T, HQ, D] tensor at (b, t), padding rows as 0."""
    head_R = h * G + offs_g
    mask = (offs_g < G)[:, None] & (offs_d < D)[None, :]
    ptrs = ptr + b * s_b + t * s_t + head_R[:, None] * s_h + offs_d[None, :] * s_d
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _slot_block(
    idx_row, k0, K, pos, si_k, k_row, v_row, sk_t, sk_d, sv_t, sv_d, offs_l, offs_d, D
):  # fmt: skip
    """Slots k0 .. k0+L-1 of a query: (key positions, used mask, k tile, v tile [L, P])."""
    slot_L = k0 + offs_l
    key_L = tl.load(idx_row + slot_L * si_k, mask=slot_L < K, other=-1)
    used_L = (key_L >= 0) & (key_L <= pos)
    row_L = tl.where(used_L, key_L, 0).to(tl.int64)
    kv_ok = used_L[:, None] & (offs_d < D)[None, :]
    k_LP = tl.load(k_row + row_L[:, None] * sk_t + offs_d[None, :] * sk_d, mask=kv_ok, other=0.0)
    v_LP = tl.load(v_row + row_L[:, None] * sv_t + offs_d[None, :] * sv_d, mask=kv_ok, other=0.0)
    return row_L, used_L, k_LP, v_LP


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, o_ptr, lse_ptr, probs_ptr,
    sq_b, sq_t, sq_h, sq_d,
    sk_b, sk_t, sk_h, sk_d,
    sv_b, sv_t, sv_h, sv_d,
    si_b, si_t, si_h, si_k,
    so_b, so_t, so_h, so_d,
    sp_b, sp_t, sp_h, sp_k,
    T, S, H, G, D, K, scale,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    WANT_PROBS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (query t, batch · KV head): online softmax over the query's slots."""
    t = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    pos = S - T + t
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_l = tl.arange(0, BLOCK_K)
    q_RP = _load_group(q_ptr, b, t, h, G, offs_g, offs_d, D, sq_b, sq_t, sq_h, sq_d)
    idx_row = idx_ptr + b * si_b + t * si_t + h * si_h
    k_row = k_ptr + b * sk_b + h * sk_h
    v_row = v_ptr + b * sv_b + h * sv_h
    m_R = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_R = tl.zeros([BLOCK_G], tl.float32)
    acc_RP = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        _, used_L, k_LP, v_LP = _slot_block(
            idx_row, k0, K, pos, si_k, k_row, v_row, sk_t, sk_d, sv_t, sv_d, offs_l, offs_d, D
        )
        m_R, l_R, acc_RP = softmax_tile(
            q_RP, k_LP, v_LP, used_L[None, :], m_R, l_R, acc_RP, scale, PRECISION
        )
    # a row with no valid slot keeps acc 0, l 0 and max -inf: output 0 and lse -inf
    o_RP, lse_R = softmax_out(m_R, l_R, acc_RP)
    g_ok = offs_g < G
    o_ptrs = o_ptr + b * so_b + t * so_t + (h * G + offs_g)[:, None] * so_h + offs_d[None, :] * so_d
    tl.store(
        o_ptrs,
        o_RP.to(o_ptr.dtype.element_ty),
        mask=g_ok[:, None] & (offs_d < D)[None, :],
    )
    tl.store(lse_ptr + ((b * T + t) * H + h) * G + offs_g, lse_R, mask=g_ok)
    if WANT_PROBS:
        probs_row = probs_ptr + b * sp_b + t * sp_t + h * sp_h
        for k0 in range(0, K, BLOCK_K):
            _, used_L, k_LP, _ = _slot_block(
                idx_row, k0, K, pos, si_k, k_row, v_row, sk_t, sk_d, sv_t, sv_d, offs_l, offs_d, D
            )
            s_RL = tl.dot(q_RP, tl.trans(k_LP), input_precision=PRECISION) * scale
            keep_RL = used_L[None, :] & g_ok[:, None]
            p_RL = tl.where(keep_RL, tl.exp(s_RL - lse_R[:, None]), 0.0)
            slot_L = k0 + offs_l
            tl.store(probs_row + slot_L * sp_k, tl.sum(p_RL, 0) / G, mask=slot_L < K)


@triton.jit
def _bwd_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
    sq_b, sq_t, sq_h, sq_d,
    sk_b, sk_t, sk_h, sk_d,
    sv_b, sv_t, sv_h, sv_d,
    si_b, si_t, si_h, si_k,
    sdo_b, sdo_t, sdo_h, sdo_d,
    sdq_b, sdq_t, sdq_h, sdq_d,
    sdk_b, sdk_t, sdk_h, sdk_d,
    T, S, H, G, D, K, scale,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (query t, batch · KV head): dq in registers, dk and dv by atomics.

    dk and dv share the strides sdk_* (both are contiguous fp32 buffers shaped like k).
    """
    t = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    pos = S - T + t
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_l = tl.arange(0, BLOCK_K)
    g_ok = offs_g < G
    d_ok = offs_d < D
    q_RP = _load_group(q_ptr, b, t, h, G, offs_g, offs_d, D, sq_b, sq_t, sq_h, sq_d)
    do_RP = _load_group(do_ptr, b, t, h, G, offs_g, offs_d, D, sdo_b, sdo_t, sdo_h, sdo_d)
    row_R = ((b * T + t) * H + h) * G + offs_g
    # padded rows load lse 0 and delta 0 with q = do = 0: their terms vanish
    lse_R = tl.load(lse_ptr + row_R, mask=g_ok, other=0.0)
    delta_R = tl.load(delta_ptr + row_R, mask=g_ok, other=0.0)
    idx_row = idx_ptr + b * si_b + t * si_t + h * si_h
    k_row = k_ptr + b * sk_b + h * sk_h
    v_row = v_ptr + b * sv_b + h * sv_h
    dk_row = dk_ptr + b * sdk_b + h * sdk_h
    dv_row = dv_ptr + b * sdk_b + h * sdk_h
    dq_RP = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        row_L, used_L, k_LP, v_LP = _slot_block(
            idx_row, k0, K, pos, si_k, k_row, v_row, sk_t, sk_d, sv_t, sv_d, offs_l, offs_d, D
        )
        # used slots of a non-empty row have finite lse; every other entry is exactly 0
        p_RL, ds_RL = softmax_grads(
            q_RP, do_RP, k_LP, v_LP, used_L[None, :], lse_R, delta_R, scale, PRECISION
        )
        dq_RP += tl.dot(ds_RL.to(k_LP.dtype), k_LP, input_precision=PRECISION)
        dk_LP = tl.dot(tl.trans(ds_RL).to(q_RP.dtype), q_RP, input_precision=PRECISION)
        dv_LP = tl.dot(tl.trans(p_RL).to(do_RP.dtype), do_RP, input_precision=PRECISION)
        ok_LP = used_L[:, None] & d_ok[None, :]
        offs_LP = row_L[:, None] * sdk_t + offs_d[None, :] * sdk_d
        tl.atomic_add(dk_row + offs_LP, dk_LP * scale, mask=ok_LP)
        tl.atomic_add(dv_row + offs_LP, dv_LP, mask=ok_LP)
    dq_ptrs = (
        dq_ptr + b * sdq_b + t * sdq_t + (h * G + offs_g)[:, None] * sdq_h
        + offs_d[None, :] * sdq_d
    )  # fmt: skip
    tl.store(
        dq_ptrs, (dq_RP * scale).to(dq_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :]
    )


class _SparseAttentionTriton(torch.autograd.Function):
    """Autograd wrapper: forward saves the lse, backward recomputes the probabilities."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q_BTHD: torch.Tensor,
        k_BSHD: torch.Tensor,
        v_BSHD: torch.Tensor,
        idx_BTHK: torch.Tensor,
        scale: float,
        want_probs: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the forward kernel; slot probabilities (if asked) are a non-differentiable output."""
        B, T, HQ, D = q_BTHD.shape
        S, H, K = k_BSHD.shape[1], k_BSHD.shape[2], idx_BTHK.shape[3]
        G = HQ // H
        o_BTHD = torch.empty_like(q_BTHD)
        lse_BTH = torch.empty(B, T, HQ, device=q_BTHD.device, dtype=torch.float32)
        probs_BTHK = torch.empty(B, T, H, K, device=q_BTHD.device) if want_probs else lse_BTH
        _fwd_kernel[(T, B * H)](
            q_BTHD, k_BSHD, v_BSHD, idx_BTHK, o_BTHD, lse_BTH, probs_BTHK,
            *q_BTHD.stride(), *k_BSHD.stride(), *v_BSHD.stride(), *idx_BTHK.stride(),
            *o_BTHD.stride(), *(probs_BTHK.stride() if want_probs else (0, 0, 0, 0)),
            T, S, H, G, D, K, scale,
            BLOCK_G=pad16(G), BLOCK_K=BLOCK_K, BLOCK_D=pad16(D),
            WANT_PROBS=want_probs, PRECISION=dot_precision(q_BTHD.dtype),
        )  # fmt: skip
        ctx.save_for_backward(q_BTHD, k_BSHD, v_BSHD, idx_BTHK, o_BTHD, lse_BTH)
        ctx.scale = scale
        if not want_probs:
            return o_BTHD, None
        ctx.mark_non_differentiable(probs_BTHK)
        return o_BTHD, probs_BTHK

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, do_BTHD: torch.Tensor, _dprobs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None, None]:
        """dq, dk, dv in the input dtypes; indices, scale and the flag get none."""
        q_BTHD, k_BSHD, v_BSHD, idx_BTHK, o_BTHD, lse_BTH = ctx.saved_tensors
        B, T, HQ, D = q_BTHD.shape
        S, H, K = k_BSHD.shape[1], k_BSHD.shape[2], idx_BTHK.shape[3]
        do_BTHD = do_BTHD.contiguous()
        delta_BTH = (o_BTHD.float() * do_BTHD.float()).sum(-1)
        dq_BTHD = torch.empty_like(q_BTHD)
        dk_BSHD = torch.zeros(k_BSHD.shape, device=k_BSHD.device, dtype=torch.float32)
        dv_BSHD = torch.zeros_like(dk_BSHD)
        _bwd_kernel[(T, B * H)](
            q_BTHD, k_BSHD, v_BSHD, idx_BTHK, do_BTHD, lse_BTH, delta_BTH,
            dq_BTHD, dk_BSHD, dv_BSHD,
            *q_BTHD.stride(), *k_BSHD.stride(), *v_BSHD.stride(), *idx_BTHK.stride(),
            *do_BTHD.stride(), *dq_BTHD.stride(), *dk_BSHD.stride(),
            T, S, H, HQ // H, D, K, ctx.scale,
            BLOCK_G=pad16(HQ // H), BLOCK_K=BLOCK_K, BLOCK_D=pad16(D),
            PRECISION=dot_precision(q_BTHD.dtype),
        )  # fmt: skip
        return dq_BTHD, dk_BSHD.to(k_BSHD.dtype), dv_BSHD.to(v_BSHD.dtype), None, None, None


def sparse_attention_triton(
    q_BTHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    want_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Slot attention through the Triton kernels; differentiable in q, k and v.

    Inputs are validated by the caller. Returns (o_BTHD in q's dtype, fp32 slot probabilities
    averaged over the heads sharing each key set, or None). Raises ValueError for CPU tensors
    unless the kernels were imported under TRITON_INTERPRET=1.
    """
    require_cuda("sparse_attention", q_BTHD)
    return on_head_sets(
        _SparseAttentionTriton.apply, q_BTHD, k_BSHD, v_BSHD, indices, scale, want_probs
    )
