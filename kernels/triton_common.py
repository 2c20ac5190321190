"""Helpers shared by the Triton kernels: tile pointers, the flash-attention tile steps (online
softmax forward, its backward terms), tile sizes, dot precision, device check.

Importing this module needs triton. TRITON_INTERPRET=1 must be set before the first import of
any Triton kernel module to run the kernels on CPU (numpy interpreter, fp32 only).
Legend: B batch, T time, H heads, D head dim, P padded head dim, M query rows of a tile, N keys
of a tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def tile_ptrs(ptr, b, h, offs_t, offs_d, s_b, s_t, s_h, s_d):
    """Pointers [rows, P] to rows offs_t of (batch b, head h) in a [B, T, H, D] tensor (int64)."""
    return ptr + b * s_b + h * s_h + offs_t.to(tl.int64)[:, None] * s_t + offs_d[None, :] * s_d


@triton.jit
def softmax_tile(q_MP, k_NP, v_NP, visible_MN, m_M, l_M, acc_MP, scale, PRECISION: tl.constexpr):
    """One key tile of an online softmax: the running (max, sum, output accumulator) of the
    query rows after adding the tile's visible keys (``visible_MN``; the rest score -inf).

    A row that has seen no visible key yet keeps max -inf; it is shifted by 0 instead, so exp
    gives 0 and never inf - inf. Finish with :func:`softmax_out`.
    """
    s_MN = tl.dot(q_MP, tl.trans(k_NP), input_precision=PRECISION) * scale
    s_MN = tl.where(visible_MN, s_MN, float("-inf"))
    m_new_M = tl.maximum(m_M, tl.max(s_MN, 1))
    m_safe_M = tl.where(m_new_M == float("-inf"), 0.0, m_new_M)
    p_MN = tl.exp(s_MN - m_safe_M[:, None])
    alpha_M = tl.exp(m_M - m_safe_M)
    l_M = l_M * alpha_M + tl.sum(p_MN, 1)
    pv_MP = tl.dot(p_MN.to(v_NP.dtype), v_NP, input_precision=PRECISION)
    return m_new_M, l_M, acc_MP * alpha_M[:, None] + pv_MP


@triton.jit
def softmax_out(m_M, l_M, acc_MP):
    """(output, log-sum-exp) of an online softmax; a row that saw no key gets 0 and -inf."""
    l_M = tl.where(l_M == 0.0, 1.0, l_M)
    return acc_MP / l_M[:, None], m_M + tl.log(l_M)


@triton.jit
def softmax_grads(
    q_MP, do_MP, k_NP, v_NP, visible_MN, lse_M, delta_M, scale, PRECISION: tl.constexpr
):
    """(p, ds) of one key tile in the backward: probabilities exp(s - lse) on the visible keys
    (0 elsewhere, so rows with lse -inf drop out) and ds = p · (dO·vᵀ - delta). dq gains
    ds·k and dk gains dsᵀ·q, both times ``scale``; dv gains pᵀ·dO."""
    s_MN = tl.dot(q_MP, tl.trans(k_NP), input_precision=PRECISION) * scale
    p_MN = tl.where(visible_MN, tl.exp(s_MN - lse_M[:, None]), 0.0)
    dp_MN = tl.dot(do_MP, tl.trans(v_NP), input_precision=PRECISION)
    return p_MN, p_MN * (dp_MN - delta_M[:, None])


@triton.jit
def dkdv_tile(k_NP, v_NP, q_MP, do_MP, visible_NM, lse_M, delta_M, scale, PRECISION: tl.constexpr):
    """(dk before ``scale``, dv) of a key tile from one tile of query rows, with the scores
    transposed ([keys, queries]) so both come out as plain dots."""
    s_NM = tl.dot(k_NP, tl.trans(q_MP), input_precision=PRECISION) * scale
    p_NM = tl.where(visible_NM, tl.exp(s_NM - lse_M[None, :]), 0.0)
    dv_NP = tl.dot(p_NM.to(do_MP.dtype), do_MP, input_precision=PRECISION)
    dp_NM = tl.dot(v_NP, tl.trans(do_MP), input_precision=PRECISION)
    ds_NM = p_NM * (dp_NM - delta_M[None, :])
    return tl.dot(ds_NM.to(q_MP.dtype), q_MP, input_precision=PRECISION), dv_NP


# jit returns an interpreter wrapper when TRITON_INTERPRET=1 was set before this import
INTERPRETED = isinstance(tile_ptrs, InterpretedFunction)


def pad16(n: int) -> int:
    """Tile size for n rows or columns: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products (as torch matmul by default), else tf32.

    Triton's default rounds fp32 operands to tf32 on NVIDIA GPUs, which would make the fp32 op
    disagree with the naive oracle at ~1e-3; bf16 operands are unaffected by the setting.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def require_cuda(op: str, x: torch.Tensor) -> None:
    """Refuse CPU tensors unless the kernels run under the interpreter (clear ValueError)."""
    if not x.is_cuda and not INTERPRETED:
        raise ValueError(
            f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import "
            f"to run on CPU), got device {x.device}"
        )
