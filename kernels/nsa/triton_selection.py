"""Triton NSA selected attention: group-centric forward, atomic-free backward via a CSR index.

Legend: B batch, T time, HQ query heads, H KV heads, G group size HQ // H, D head dim,
S selected-block slots per query, NB selection blocks cdiv(T, block_size), E selected
(query, block) pairs, J CSR segments (batch, KV head, block) = B·H·NB, C dK/dV programs (chunks
of a segment), X segments split over several programs, R padded group rows (BLOCK_G),
K padded block keys (BLOCK_K), P padded head dim (BLOCK_D).

NSA §3.4: the G query heads of a group share one block set, so the forward and dq kernels run
one program per (batch, position t, KV head) that loads the group's queries as one [R, P] tile
(R = G padded to at least 16, the smallest tl.dot size) and streams the selected blocks through
with an online softmax, loading each K/V block once per group instead of once per head. dK and
dV come from the inverted selection: a CSR index block -> the queries that chose it, built with
torch sort/bincount, lets one program per (batch, KV head, block) accumulate its block's
gradients in registers and store them once, so no float atomics are needed and the result is
deterministic; the work is O(T · S · block_size), never a dense [T, NB] scan. Block 0 (forced
in NSA) is chosen by all T queries while the average block has S · block_size, so a segment
longer than QUERIES_PER_PROGRAM is spread over several programs writing fp32 partial sums,
which a reduce kernel adds in a fixed order: still no atomics, still deterministic. Offsets
are int64 so B·T·H·D may exceed 2**31. TRITON_INTERPRET=1 must be set before this module is
imported to run it on CPU (fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import dot_precision, pad16, require_cuda
from ..triton_flash import dkdv_tile, softmax_grads, softmax_out, softmax_tile

# Most blocks are chosen by about S · block_size queries, but block 0 (forced by NSA) by all T.
# A dK/dV program walks at most this many queries of one block, so a popular block is spread
# over several programs whose fp32 partial sums a second kernel adds in a fixed order; ~4x the
# paper's average list (16 · 64) keeps the split rare. Tests shrink it to force splits.
QUERIES_PER_PROGRAM = 4096


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, idx_ptr,
    sq_b, sq_t, sq_h, sq_d,
    sk_b, sk_t, sk_h, sk_d,
    sv_b, sv_t, sv_h, sv_d,
    so_b, so_t, so_h, so_d,
    si_b, si_t, si_h, si_s,
    T, H, G, D, S, block_size, scale,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (time t, batch · KV head): online softmax over the group's blocks.

    Rows past G (the padding up to BLOCK_G) hold zero queries; they are computed, never stored.
    """
    t = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    head_R = h * G + tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rows_ok = (head_R < h * G + G)[:, None] & d_ok[None, :]
    q_RP = tl.load(
        q_ptr + b * sq_b + t * sq_t + head_R[:, None] * sq_h + offs_d[None, :] * sq_d,
        mask=rows_ok,
        other=0.0,
    )
    # K/V tiles differ only by their first key inside the loop: hoist the rest of the address
    k_1P = k_ptr + b * sk_b + h * sk_h + offs_d[None, :] * sk_d
    v_1P = v_ptr + b * sv_b + h * sv_h + offs_d[None, :] * sv_d
    arange_K = tl.arange(0, BLOCK_K)
    in_block_K = arange_K < block_size
    m_R = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_R = tl.zeros([BLOCK_G], tl.float32)
    acc_RP = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    idx_row = idx_ptr + b * si_b + t * si_t + h * si_h
    for slot in range(0, S):
        start = tl.load(idx_row + slot * si_s) * block_size
        # unused slots (-1) and blocks starting after t add no key (and would leave the max -inf)
        if (start >= 0) & (start <= t):
            offs_k = start + arange_K
            # token-level causal mask: the query's own block is only partly in the past
            key_ok = in_block_K & (offs_k <= t)
            kv_ok = key_ok[:, None] & d_ok[None, :]
            k_KP = tl.load(k_1P + offs_k[:, None] * sk_t, mask=kv_ok, other=0.0)
            v_KP = tl.load(v_1P + offs_k[:, None] * sv_t, mask=kv_ok, other=0.0)
            m_R, l_R, acc_RP = softmax_tile(
                q_RP, k_KP, v_KP, key_ok[None, :], m_R, l_R, acc_RP, scale, PRECISION
            )
    # a query with no selected key keeps acc 0 and l 0: output 0, lse -inf, never 0 / 0
    o_RP, lse_R = softmax_out(m_R, l_R, acc_RP)
    tl.store(
        o_ptr + b * so_b + t * so_t + head_R[:, None] * so_h + offs_d[None, :] * so_d,
        o_RP.to(o_ptr.dtype.element_ty),
        mask=rows_ok,
    )
    tl.store(lse_ptr + (b * T + t) * H * G + head_R, lse_R, mask=head_R < h * G + G)


@triton.jit
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr, idx_ptr,
    sq_b, sq_t, sq_h, sq_d,
    sk_b, sk_t, sk_h, sk_d,
    sv_b, sv_t, sv_h, sv_d,
    sdo_b, sdo_t, sdo_h, sdo_d,
    sdq_b, sdq_t, sdq_h, sdq_d,
    si_b, si_t, si_h, si_s,
    T, H, G, D, S, block_size, scale,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (time t, batch · KV head): dq of the group over its selected blocks."""
    t = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    head_R = h * G + tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    g_ok = head_R < h * G + G
    rows_ok = g_ok[:, None] & d_ok[None, :]
    q_RP = tl.load(
        q_ptr + b * sq_b + t * sq_t + head_R[:, None] * sq_h + offs_d[None, :] * sq_d,
        mask=rows_ok,
        other=0.0,
    )
    do_RP = tl.load(
        do_ptr + b * sdo_b + t * sdo_t + head_R[:, None] * sdo_h + offs_d[None, :] * sdo_d,
        mask=rows_ok,
        other=0.0,
    )
    # padded rows load lse 0, delta 0 and do 0: finite p, zero ds, and they are never stored
    row_R = (b * T + t) * H * G + head_R
    lse_R = tl.load(lse_ptr + row_R, mask=g_ok, other=0.0)
    delta_R = tl.load(delta_ptr + row_R, mask=g_ok, other=0.0)
    k_1P = k_ptr + b * sk_b + h * sk_h + offs_d[None, :] * sk_d
    v_1P = v_ptr + b * sv_b + h * sv_h + offs_d[None, :] * sv_d
    arange_K = tl.arange(0, BLOCK_K)
    in_block_K = arange_K < block_size
    dq_RP = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    idx_row = idx_ptr + b * si_b + t * si_t + h * si_h
    for slot in range(0, S):
        start = tl.load(idx_row + slot * si_s) * block_size
        # the forward's kept slots: each holds key `start` <= t, so every real lse is finite here
        if (start >= 0) & (start <= t):
            offs_k = start + arange_K
            key_ok = in_block_K & (offs_k <= t)
            kv_ok = key_ok[:, None] & d_ok[None, :]
            k_KP = tl.load(k_1P + offs_k[:, None] * sk_t, mask=kv_ok, other=0.0)
            v_KP = tl.load(v_1P + offs_k[:, None] * sv_t, mask=kv_ok, other=0.0)
            _, ds_RK = softmax_grads(
                q_RP, do_RP, k_KP, v_KP, key_ok[None, :], lse_R, delta_R, scale, PRECISION
            )
            dq_RP += tl.dot(ds_RK.to(k_KP.dtype), k_KP, input_precision=PRECISION)
    tl.store(
        dq_ptr + b * sdq_b + t * sdq_t + head_R[:, None] * sdq_h + offs_d[None, :] * sdq_d,
        (dq_RP * scale).to(dq_ptr.dtype.element_ty),
        mask=rows_ok,
    )


@triton.jit
def _dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, queries_ptr, chunks_ptr,
    dk_part_ptr, dv_part_ptr,
    sq_b, sq_t, sq_h, sq_d,
    sk_b, sk_t, sk_h, sk_d,
    sv_b, sv_t, sv_h, sv_d,
    sdo_b, sdo_t, sdo_h, sdo_d,
    sdk_b, sdk_t, sdk_h, sdk_d,
    sdv_b, sdv_t, sdv_h, sdv_d,
    T, H, G, D, NB, block_size, scale,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per chunk of a CSR segment (b, h, j): dk, dv of block j over those queries.

    Chunk row c of chunks_ptr is (segment, first, last, slot): the program walks queries_ptr
    [first, last), which hold query positions that selected block j in increasing order. A
    segment that fits one chunk owns the block's key rows for the whole group and stores dk and
    dv directly; otherwise (slot >= 0) it stores fp32 partial sums in row `slot` of the partial
    buffers for ``_reduce_kernel``. Padded group rows load zero q, do, lse and delta, so their
    p·do and ds·q terms vanish.
    """
    chunk = chunks_ptr + tl.program_id(0).to(tl.int64) * 4
    segment = tl.load(chunk)
    first = tl.load(chunk + 1)
    last = tl.load(chunk + 2)
    slot = tl.load(chunk + 3)
    j = segment % NB
    b = segment // NB // H
    h = segment // NB % H
    arange_K = tl.arange(0, BLOCK_K)
    offs_k = j * block_size + arange_K
    head_R = h * G + tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    g_ok = head_R < h * G + G
    rows_ok = g_ok[:, None] & d_ok[None, :]
    key_ok = (arange_K < block_size) & (offs_k < T)
    keys_ok = key_ok[:, None] & d_ok[None, :]
    k_KP = tl.load(
        k_ptr + b * sk_b + h * sk_h + offs_k[:, None] * sk_t + offs_d[None, :] * sk_d,
        mask=keys_ok,
        other=0.0,
    )
    v_KP = tl.load(
        v_ptr + b * sv_b + h * sv_h + offs_k[:, None] * sv_t + offs_d[None, :] * sv_d,
        mask=keys_ok,
        other=0.0,
    )
    # the group's rows at a query differ only by its time inside the loop: hoist the rest
    q_RP_base = q_ptr + b * sq_b + head_R[:, None] * sq_h + offs_d[None, :] * sq_d
    do_RP_base = do_ptr + b * sdo_b + head_R[:, None] * sdo_h + offs_d[None, :] * sdo_d
    row_R_base = b * T * H * G + head_R
    dk_KP = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    dv_KP = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for e in range(first, last):
        t = tl.load(queries_ptr + e)
        q_RP = tl.load(q_RP_base + t * sq_t, mask=rows_ok, other=0.0)
        do_RP = tl.load(do_RP_base + t * sdo_t, mask=rows_ok, other=0.0)
        lse_R = tl.load(lse_ptr + row_R_base + t * H * G, mask=g_ok, other=0.0)
        delta_R = tl.load(delta_ptr + row_R_base + t * H * G, mask=g_ok, other=0.0)
        visible_K1 = (key_ok & (offs_k <= t))[:, None]
        dk_part, dv_part = dkdv_tile(
            k_KP, v_KP, q_RP, do_RP, visible_K1, lse_R, delta_R, scale, PRECISION
        )
        dk_KP += dk_part
        dv_KP += dv_part
    if slot < 0:
        tl.store(
            dk_ptr + b * sdk_b + h * sdk_h + offs_k[:, None] * sdk_t + offs_d[None, :] * sdk_d,
            (dk_KP * scale).to(dk_ptr.dtype.element_ty),
            mask=keys_ok,
        )
        tl.store(
            dv_ptr + b * sdv_b + h * sdv_h + offs_k[:, None] * sdv_t + offs_d[None, :] * sdv_d,
            dv_KP.to(dv_ptr.dtype.element_ty),
            mask=keys_ok,
        )
    else:
        tile_KP = slot * BLOCK_K * BLOCK_D + arange_K[:, None] * BLOCK_D + offs_d[None, :]
        tl.store(dk_part_ptr + tile_KP, dk_KP)
        tl.store(dv_part_ptr + tile_KP, dv_KP)


@triton.jit
def _reduce_kernel(
    dk_ptr, dv_ptr, dk_part_ptr, dv_part_ptr, splits_ptr,
    sdk_b, sdk_t, sdk_h, sdk_d,
    sdv_b, sdv_t, sdv_h, sdv_d,
    T, H, D, NB, block_size, scale,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per split segment (b, h, j): dk, dv of block j = its partials summed in order.

    Split row p of splits_ptr is (segment, first slot, slot count); adding the partial tiles in
    slot order makes the result independent of scheduling, unlike float atomics.
    """
    split = splits_ptr + tl.program_id(0).to(tl.int64) * 3
    segment = tl.load(split)
    first = tl.load(split + 1)
    count = tl.load(split + 2)
    j = segment % NB
    b = segment // NB // H
    h = segment // NB % H
    arange_K = tl.arange(0, BLOCK_K)
    offs_k = j * block_size + arange_K
    offs_d = tl.arange(0, BLOCK_D)
    keys_ok = ((arange_K < block_size) & (offs_k < T))[:, None] & (offs_d < D)[None, :]
    tile_KP = arange_K[:, None] * BLOCK_D + offs_d[None, :]
    dk_KP = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    dv_KP = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for slot in range(first, first + count):
        dk_KP += tl.load(dk_part_ptr + slot * BLOCK_K * BLOCK_D + tile_KP)
        dv_KP += tl.load(dv_part_ptr + slot * BLOCK_K * BLOCK_D + tile_KP)
    tl.store(
        dk_ptr + b * sdk_b + h * sdk_h + offs_k[:, None] * sdk_t + offs_d[None, :] * sdk_d,
        (dk_KP * scale).to(dk_ptr.dtype.element_ty),
        mask=keys_ok,
    )
    tl.store(
        dv_ptr + b * sdv_b + h * sdv_h + offs_k[:, None] * sdv_t + offs_d[None, :] * sdv_d,
        dv_KP.to(dv_ptr.dtype.element_ty),
        mask=keys_ok,
    )


def _inverted_index(
    idx_BTHS: torch.Tensor, block_size: int, NB: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of the selection per (batch, KV head, block): offsets [B·H·NB + 1] and query times [E].

    Segment (b, h, j) = entries offsets[s] .. offsets[s + 1] of queries_E with s = (b·H + h)·NB + j,
    the positions t that selected block j, in increasing t (a stable sort of the row-major
    (b, h, t, slot) order). Unused slots and blocks starting after t add no key and are left out.
    Built with sort and bincount in O(B·T·H·S), never a dense [T, NB] mask.
    """
    B, T, H, S = idx_BTHS.shape
    device = idx_BTHS.device
    idx_BHTS = idx_BTHS.permute(0, 2, 1, 3)
    time_BHTS = torch.arange(T, device=device).view(1, 1, T, 1).expand(B, H, T, S)
    legal_BHTS = (idx_BHTS >= 0) & (idx_BHTS * block_size <= time_BHTS)
    segment_BHTS = torch.arange(B * H, device=device).view(B, H, 1, 1) * NB + idx_BHTS
    segment_E = segment_BHTS[legal_BHTS]
    order_E = torch.sort(segment_E, stable=True).indices
    queries_E = time_BHTS[legal_BHTS][order_E].contiguous()
    offsets = torch.zeros(B * H * NB + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.bincount(segment_E, minlength=B * H * NB).cumsum(0)
    return offsets, queries_E


def _split_work(offsets: torch.Tensor, per_program: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Cut the CSR segments into dK/dV programs: (chunks_C4, splits_X3, number of partials).

    chunks_C4 rows are (segment, first, last, slot): entries [first, last) of one segment, at
    most ``per_program`` of them, one row per program (an empty segment still gets one, which
    writes its zero gradient). slot is -1 for a segment that fits one chunk, else the row of the
    partial-sum buffers this chunk fills; a split segment's slots are consecutive. splits_X3
    rows are (segment, first slot, slot count) for the split segments, one per reduce program.
    """
    device = offsets.device
    counts_J = offsets[1:] - offsets[:-1]
    chunks_J = ((counts_J + per_program - 1) // per_program).clamp_min(1)
    C = int(chunks_J.sum())
    segment_C = torch.repeat_interleave(
        torch.arange(len(counts_J), device=device), chunks_J, output_size=C
    )
    first_chunk_J = chunks_J.cumsum(0) - chunks_J
    rank_C = torch.arange(C, device=device) - first_chunk_J[segment_C]
    first_C = offsets[segment_C] + rank_C * per_program
    last_C = torch.minimum(first_C + per_program, offsets[segment_C + 1])
    split_J = chunks_J > 1
    split_C = split_J[segment_C]
    slot_C = torch.where(split_C, split_C.cumsum(0) - 1, -1)
    chunks_C4 = torch.stack([segment_C, first_C, last_C, slot_C], dim=1).contiguous()
    segment_X = split_J.nonzero()[:, 0]
    splits_X3 = torch.stack(
        [segment_X, slot_C[first_chunk_J[segment_X]], chunks_J[segment_X]], dim=1
    ).contiguous()
    return chunks_C4, splits_X3, int(split_C.sum())


class _SelectedAttentionTriton(torch.autograd.Function):
    """Autograd wrapper: forward saves the log-sum-exp, backward runs the dq and dk/dv kernels."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q_BTHD: torch.Tensor,
        k_BTHD: torch.Tensor,
        v_BTHD: torch.Tensor,
        idx_BTHS: torch.Tensor,
        block_size: int,
        scale: float,
    ) -> torch.Tensor:
        """Run the forward kernel; returns o_BTHD and keeps what backward recomputes from."""
        B, T, HQ, D = q_BTHD.shape
        H = k_BTHD.shape[2]
        S = idx_BTHS.shape[3]
        o_BTHD = torch.empty_like(q_BTHD)
        lse_BTH = torch.empty(B, T, HQ, device=q_BTHD.device, dtype=torch.float32)
        _fwd_kernel[(T, B * H)](
            q_BTHD, k_BTHD, v_BTHD, o_BTHD, lse_BTH, idx_BTHS,
            *q_BTHD.stride(), *k_BTHD.stride(), *v_BTHD.stride(), *o_BTHD.stride(),
            *idx_BTHS.stride(),
            T, H, HQ // H, D, S, block_size, scale,
            BLOCK_G=pad16(HQ // H), BLOCK_K=pad16(block_size), BLOCK_D=pad16(D),
            PRECISION=dot_precision(q_BTHD.dtype),
        )  # fmt: skip
        ctx.save_for_backward(q_BTHD, k_BTHD, v_BTHD, o_BTHD, lse_BTH, idx_BTHS)
        ctx.block_size = block_size
        ctx.scale = scale
        return o_BTHD

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, do_BTHD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None, None]:
        """Gradients of q, k, v from the saved log-sum-exp; none for indices, block, scale."""
        q_BTHD, k_BTHD, v_BTHD, o_BTHD, lse_BTH, idx_BTHS = ctx.saved_tensors
        B, T, HQ, D = q_BTHD.shape
        H = k_BTHD.shape[2]
        S = idx_BTHS.shape[3]
        block_size = ctx.block_size
        NB = triton.cdiv(T, block_size)
        # delta_t = Σ_d o·do, the softmax-backward row term, shared by both kernels
        delta_BTH = (o_BTHD.float() * do_BTHD.float()).sum(-1).contiguous()
        offsets, queries_E = _inverted_index(idx_BTHS, block_size, NB)
        dq_BTHD = torch.empty_like(q_BTHD)
        dk_BTHD = torch.empty_like(k_BTHD)
        dv_BTHD = torch.empty_like(v_BTHD)
        tiles = {
            "BLOCK_G": pad16(HQ // H),
            "BLOCK_K": pad16(block_size),
            "BLOCK_D": pad16(D),
            "PRECISION": dot_precision(q_BTHD.dtype),
        }
        _dq_kernel[(T, B * H)](
            q_BTHD, k_BTHD, v_BTHD, do_BTHD, dq_BTHD, lse_BTH, delta_BTH, idx_BTHS,
            *q_BTHD.stride(), *k_BTHD.stride(), *v_BTHD.stride(), *do_BTHD.stride(),
            *dq_BTHD.stride(), *idx_BTHS.stride(),
            T, H, HQ // H, D, S, block_size, ctx.scale,
            **tiles,
        )  # fmt: skip
        chunks_C4, splits_X3, partials = _split_work(offsets, QUERIES_PER_PROGRAM)
        BLOCK_K, BLOCK_D = tiles["BLOCK_K"], tiles["BLOCK_D"]
        dk_part = torch.empty(partials, BLOCK_K, BLOCK_D, device=q_BTHD.device, dtype=torch.float32)
        dv_part = torch.empty_like(dk_part)
        _dkdv_kernel[(chunks_C4.shape[0],)](
            q_BTHD, k_BTHD, v_BTHD, do_BTHD, dk_BTHD, dv_BTHD, lse_BTH, delta_BTH,
            queries_E, chunks_C4, dk_part, dv_part,
            *q_BTHD.stride(), *k_BTHD.stride(), *v_BTHD.stride(), *do_BTHD.stride(),
            *dk_BTHD.stride(), *dv_BTHD.stride(),
            T, H, HQ // H, D, NB, block_size, ctx.scale,
            **tiles,
        )  # fmt: skip
        _reduce_kernel[(splits_X3.shape[0],)](
            dk_BTHD, dv_BTHD, dk_part, dv_part, splits_X3,
            *dk_BTHD.stride(), *dv_BTHD.stride(),
            T, H, D, NB, block_size, ctx.scale,
            BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
        )  # fmt: skip
        return dq_BTHD, dk_BTHD, dv_BTHD, None, None, None


def selected_attention_triton(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    idx_BTHS: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """NSA selected attention through the Triton kernels; differentiable in q, k and v.

    Query head hq at time t attends, with one softmax, the selection blocks idx_BTHS[b, t, hq // G]
    (block j = keys [j·block_size, (j+1)·block_size), -1 = unused slot) under a token-level
    causal mask; a query with no visible key outputs 0. Inputs are validated by the caller (the
    ``selected_attention`` dispatcher: int64 ids in [-1, NB), distinct within a row); fp32 and
    bf16 are supported with fp32 accumulation and o_BTHD has q's dtype. Raises ValueError for
    CPU tensors unless the kernels were imported under TRITON_INTERPRET=1.
    """
    require_cuda("selected_attention", q_BTHD)
    return _SelectedAttentionTriton.apply(q_BTHD, k_BTHD, v_BTHD, idx_BTHS, block_size, scale)
