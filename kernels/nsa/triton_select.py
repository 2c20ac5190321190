"""Triton NSA block selection: streamed importances and a running top-n, no [T, S] tensor.

Legend: B batch, T time, N compressed tokens, HQ query heads, H KV heads, G group size HQ // H,
D head dim, M query rows of a program (BLOCK_M), C compressed tokens of a tile (BLOCK_C),
J selection blocks of a chunk (BLOCK_J), K slots of the running top list (n_select padded to a
power of two), P padded head dim.

One program per (query tile, batch · KV head) walks the selection blocks its newest query may
use in chunks of J. For a chunk it streams the compressed tokens that start inside the chunk's
blocks, forms p = exp(scale·q·kcmp - lse) for each of the G query heads of the group (0 for
tokens the query cannot see, and for rows whose lse is -inf) and sums them over the group; a
[M, C] x [C, J] dot with the Eq. 9 overlap weights, computed from the token and block indices
(exactly ``overlap_weights``), adds the masses to the chunk's blocks. A token overlaps at most
its own block and the next, so the mass the chunk's last tokens spill into the next chunk's
first block is carried over. Blocks 0, t // l' and t // l' - 1 are set to +inf, blocks with
j·l' > t to -inf, and the chunk is merged into a running top-n list by n rounds of argmax over
list and chunk: the list holds only lower block ids, so it wins ties, which keeps the rule
"ties go to the lower index" across chunks. The list's ids are finally written in ascending
order, -1 for slots whose pick was -inf (fewer legal blocks than n). Work is O(T·N·G·D) for the
scores plus O(T·S·n) for the merges; memory is the output only. Offsets are int64.
TRITON_INTERPRET=1 must be set before this module is imported to run it on CPU (fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import dot_precision, pad16, require_cuda, tile_ptrs
from .triton_compression import _n_visible, _visible

# Query rows and compressed tokens of a score tile, and selection blocks of a chunk (16 is
# tl.dot's minimum for the overlap dot). Not autotuned (no GPU was at hand when written).
# Tests shrink BLOCK_M and BLOCK_C to make short sequences span many tiles.
BLOCK_M = 32
BLOCK_C = 64
BLOCK_J = 16


@triton.jit
def _overlap(i, j, block_size, stride, select_size):
    """Eq. 9 weights |[i·d, i·d + l) ∩ [j·l', (j + 1)·l')| / d for broadcast token i, block j."""
    low = tl.maximum(i * stride, j * select_size)
    high = tl.minimum(i * stride + block_size, (j + 1) * select_size)
    return tl.maximum(high - low, 0).to(tl.float32) / stride


@triton.jit
def _select_kernel(
    q_ptr, k_ptr, lse_ptr, idx_ptr,
    sq_b, sq_t, sq_h, sq_d,
    sk_b, sk_t, sk_h, sk_d,
    sl_b, sl_t, sl_h,
    si_b, si_t, si_h, si_n,
    T, N, H, G, D, block_size, stride, select_size, n_select, scale,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (query tile, batch · KV head): importances by chunk, running top-n."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok = offs_m < T
    own_M1 = (offs_m // select_size)[:, None]
    last_t = tl.minimum(start_m + BLOCK_M, T) - 1
    n_vis = _n_visible(last_t, N, block_size, stride)
    # blocks the tile's newest query may use; every id is below it, so it also marks "no block"
    n_blocks = last_t // select_size + 1
    per_block = select_size // stride
    slot_1K = tl.arange(0, BLOCK_K)[None, :]
    top_MK = tl.full([BLOCK_M, BLOCK_K], float("-inf"), tl.float32)
    top_id_MK = tl.zeros([BLOCK_M, BLOCK_K], tl.int32) + n_blocks
    carry_M = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, n_blocks, BLOCK_J):
        cols_1J = (j0 + tl.arange(0, BLOCK_J))[None, :]
        imp_MJ = tl.where(cols_1J == j0, carry_M[:, None], 0.0)
        carry_M = tl.zeros([BLOCK_M], tl.float32)
        # tokens starting in blocks j0 .. j0 + J - 1 that some query of the tile can see
        chunk_end = (j0 + BLOCK_J) * per_block
        for c0 in range(j0 * per_block, tl.minimum(chunk_end, n_vis), BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            k_CP = tl.load(
                tile_ptrs(k_ptr, b, h, offs_c, offs_d, sk_b, sk_t, sk_h, sk_d),
                mask=(offs_c < N)[:, None] & d_ok[None, :],
                other=0.0,
            ).to(q_ptr.dtype.element_ty)
            visible_MC = _visible(offs_m[:, None], offs_c[None, :], T, N, block_size, stride)
            mass_MC = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
            for g in range(0, G):
                hq = h * G + g
                q_MP = tl.load(
                    tile_ptrs(q_ptr, b, hq, offs_m, offs_d, sq_b, sq_t, sq_h, sq_d),
                    mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )
                lse_M = tl.load(
                    lse_ptr + b * sl_b + offs_m.to(tl.int64) * sl_t + hq * sl_h,
                    mask=row_ok,
                    other=float("-inf"),
                )
                s_MC = tl.dot(q_MP, tl.trans(k_CP), input_precision=PRECISION) * scale
                keep_MC = visible_MC & (lse_M > float("-inf"))[:, None]
                # the where drops the inf or NaN of hidden tokens and of rows with lse -inf
                mass_MC += tl.where(keep_MC, tl.exp(s_MC - lse_M[:, None]), 0.0)
            w_CJ = _overlap(offs_c[:, None], cols_1J, block_size, stride, select_size)
            imp_MJ += tl.dot(mass_MC, w_CJ, input_precision="ieee")
            # only the chunk's own tokens spill: a tile reaching past chunk_end holds tokens of
            # the next chunk, which counts them itself
            w_C = tl.where(
                offs_c < chunk_end,
                _overlap(offs_c, j0 + BLOCK_J, block_size, stride, select_size),
                0.0,
            )
            carry_M += tl.sum(mass_MC * w_C[None, :], 1)
        forced_MJ = (cols_1J == 0) | (cols_1J == own_M1) | (cols_1J == own_M1 - 1)
        imp_MJ = tl.where(forced_MJ, float("inf"), imp_MJ)
        imp_MJ = tl.where(cols_1J > own_M1, float("-inf"), imp_MJ)
        # merge: n rounds of argmax over the list and the chunk, lowest id first among equals;
        # a taken entry becomes -inf, and -inf picks are padding whatever id they carry
        new_MK = tl.full([BLOCK_M, BLOCK_K], float("-inf"), tl.float32)
        new_id_MK = tl.zeros([BLOCK_M, BLOCK_K], tl.int32) + n_blocks
        for k in range(0, n_select):
            best_top_M = tl.max(top_MK, 1)
            at_top_M = tl.min(tl.where(top_MK == best_top_M[:, None], top_id_MK, n_blocks), 1)
            best_new_M = tl.max(imp_MJ, 1)
            at_new_M = tl.min(tl.where(imp_MJ == best_new_M[:, None], cols_1J, n_blocks), 1)
            from_top_M1 = (best_top_M >= best_new_M)[:, None]
            top_MK = tl.where(from_top_M1 & (top_id_MK == at_top_M[:, None]), float("-inf"), top_MK)
            imp_MJ = tl.where(~from_top_M1 & (cols_1J == at_new_M[:, None]), float("-inf"), imp_MJ)
            best_M1 = tl.where(from_top_M1, best_top_M[:, None], best_new_M[:, None])
            at_M1 = tl.where(from_top_M1, at_top_M[:, None], at_new_M[:, None])
            new_MK = tl.where(slot_1K == k, best_M1, new_MK)
            new_id_MK = tl.where(slot_1K == k, at_M1, new_id_MK)
        top_MK = new_MK
        top_id_MK = new_id_MK
    # ascending ids: n rounds of argmin over the real picks, -1 once they run out
    ids_MK = tl.where(top_MK > float("-inf"), top_id_MK, n_blocks)
    out_MK = tl.full([BLOCK_M, BLOCK_K], -1, tl.int64)
    for k in range(0, n_select):
        low_M = tl.min(ids_MK, 1)
        out_MK = tl.where(
            slot_1K == k, tl.where(low_M == n_blocks, -1, low_M).to(tl.int64)[:, None], out_MK
        )
        ids_MK = tl.where(ids_MK == low_M[:, None], n_blocks, ids_MK)
    tl.store(
        idx_ptr + b * si_b + offs_m.to(tl.int64)[:, None] * si_t + h * si_h + slot_1K * si_n,
        out_MK,
        mask=row_ok[:, None] & (slot_1K < n_select),
    )


def select_blocks_triton(
    q_BTHD: torch.Tensor,
    kcmp_BNHD: torch.Tensor,
    lse_BTH: torch.Tensor,
    block_size: int,
    stride: int,
    select_size: int,
    n_select: int,
    scale: float,
) -> torch.Tensor:
    """Selected block ids idx_BTHS, int64 [B, T, H, n_select], through the Triton kernel.

    The rules are ``select_blocks``' (Eq. 9-11, forced blocks 0 / own / previous counting toward
    n, j·l' <= t, ties to the lower index, ascending ids, -1 padding); scores use q's dtype for
    the dot operands with fp32 accumulation. Inputs are validated by the caller (the
    ``select_blocks`` dispatcher), which also runs this without gradient. Raises ValueError for
    CPU tensors unless the kernels were imported under TRITON_INTERPRET=1.
    """
    require_cuda("select_blocks", q_BTHD)
    B, T, HQ, D = q_BTHD.shape
    N, H = kcmp_BNHD.shape[1:3]
    lse_BTH = lse_BTH.float()
    idx_BTHS = torch.empty(B, T, H, n_select, device=q_BTHD.device, dtype=torch.int64)
    # a token tile larger than a chunk's J·l'/d tokens would only load the next chunk's tokens
    chunk_tokens = pad16(BLOCK_J * (select_size // stride))
    _select_kernel[(triton.cdiv(T, BLOCK_M), B * H)](
        q_BTHD, kcmp_BNHD, lse_BTH, idx_BTHS,
        *q_BTHD.stride(), *kcmp_BNHD.stride(), *lse_BTH.stride(), *idx_BTHS.stride(),
        T, N, H, HQ // H, D, block_size, stride, select_size, n_select, scale,
        BLOCK_M=BLOCK_M, BLOCK_C=min(BLOCK_C, chunk_tokens), BLOCK_J=BLOCK_J, BLOCK_D=pad16(D),
        BLOCK_K=triton.next_power_of_2(n_select), PRECISION=dot_precision(q_BTHD.dtype),
    )  # fmt: skip
    return idx_BTHS
