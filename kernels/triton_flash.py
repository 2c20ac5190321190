"""Flash-attention tile steps shared by the Triton attention kernels (window, NSA compression and
selection, DSA): one key tile of the online softmax, its finish, and the backward's terms.

Each kernel loads its own tiles and passes its own mask; these jit functions hold the math.
Importing this module needs triton (see ``triton_common`` for TRITON_INTERPRET).
Legend: M query rows of a tile, N keys of a tile, P padded head dim.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
