"""NSA compression branch and block selection in one pass over the scores (``compressed_select``).

Selection ranks blocks by the compression branch's own probabilities (paper Eq. 8), so run as
two ops the scores q·kcmp are computed twice: once inside the compressed attention and once
more, from its lse, inside ``select_blocks``. The fused torch path computes them once per chunk
of queries, takes the softmax, and uses the same probability tile for the output (P @ V) and
for the group-summed, block-mapped importances that pick the top n blocks. Its backward is
aten's flash-attention backward on the folded queries (the output and lse it needs are exact),
so training keeps the blocked kernel's gradient. Other backends (and devices without aten's
CPU flash backward) compose ``compressed_attention`` and ``select_blocks``.

Legend: B batch, T time, N compressed tokens, HQ query heads, H KV heads, G group size HQ // H,
D head dim, d stride, W = d·G folded query heads per KV head, R = H·W, M folded query rows
(= N), X = B·H, c folded rows of a chunk, m visible compressed tokens of a chunk, C queries of
a chunk (c·d), S selection blocks, n = n_select.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

from ..backend import resolve_backend
from ..base2 import LN2, LOG2E
from ..cpu_workers import Workspace, run_workers, worker_count
from .compression import (
    _FLASH_LSE_DEVICES,
    _fold_queries,
    _unfold_rows,
    compressed_attention,
    validate_attention,
)
from .select import (
    _EXP_FLOOR,
    _MAX_WORKERS,
    _TILE_ELEMENTS,
    _mark_blocks,
    _top_blocks,
    block_importance,
    select_blocks,
    validate_select_knobs,
)

__all__ = ["compressed_select"]

_OP = "compressed_select"
_AVAILABLE = ("naive", "torch", "triton")


@dataclass(frozen=True)
class _Geometry:
    """The sizes and block knobs one fused call shares with its chunk jobs."""

    T: int
    H: int
    G: int
    block_size: int
    stride: int
    select_size: int
    n_select: int


def _chunk(
    m0: int,
    m1: int,
    geo: _Geometry,
    q_BTHD: torch.Tensor,
    kt_XDN: torch.Tensor,
    v_XND: torch.Tensor,
    scale: float,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ws: Workspace,
) -> None:
    """Folded rows m0 .. m1 - 1 (queries t = l - 1 + m·d + r): output, lse and blocks.

    The chunk's C = c·d queries are read straight from q_BTHD into the folded order
    (KV head, r, group member, m), in which row m of every folded head sees compressed tokens
    0 .. m, so the chunk reads the first m1 tokens and only its last c columns need the causal
    mask. The exp2 argument is floored at _EXP_FLOOR nats (see ``select``) and the hidden
    entries are then set to exactly 0, so no hidden token reaches the output or the
    importances. ``out`` is (o_BTHD, lse_XWM, idx_BTHn); each chunk writes its own rows.
    """
    o_BTHD, lse_XWM, idx_BTHn = out
    B, T, HQ, D = q_BTHD.shape
    X, H, G, d = kt_XDN.shape[0], geo.H, geo.G, geo.stride
    W, c = d * G, m1 - m0
    t0 = geo.block_size - 1 + m0 * d
    rows = min(T, t0 + c * d) - t0
    q_src = q_BTHD[:, t0 : t0 + rows]
    if rows < c * d:
        # the last chunk: zero queries stand in for the positions past T
        q_src = F.pad(q_src, (0, 0, 0, 0, 0, c * d - rows))
    q_XWcD = ws.get("q", kt_XDN, X, W, c, D)
    q_BcdHGD = q_src.reshape(B, c, d, H, G, D)
    # base-2 logits (kernels.base2): q carries scale · log2 e, the lse is made natural below
    torch.mul(q_BcdHGD.permute(0, 3, 2, 4, 1, 5), scale * LOG2E, out=q_XWcD.view(B, H, d, G, c, D))
    logits_XWcm = torch.bmm(
        q_XWcD.view(X, W * c, D), kt_XDN[:, :, :m1], out=ws.get("p", kt_XDN, X, W * c, m1)
    ).view(X, W, c, m1)
    hidden_cc = torch.ones(c, c, dtype=torch.bool, device=q_BTHD.device).triu_(1)
    logits_XWcm[..., m0:].masked_fill_(hidden_cc, float("-inf"))
    max_XWc = logits_XWcm.amax(dim=-1)
    probs_XWcm = logits_XWcm.sub_(max_XWc[..., None]).clamp_(min=_EXP_FLOOR * LOG2E).exp2_()
    probs_XWcm[..., m0:].masked_fill_(hidden_cc, 0.0)
    sum_XWc = probs_XWcm.sum(dim=-1)
    probs_XWcm.div_(sum_XWc[..., None])
    lse_XWM[:, :, m0:m1] = (max_XWc + sum_XWc.log2()).mul_(LN2)
    o_XRD = torch.bmm(probs_XWcm.view(X, W * c, m1), v_XND[:, :m1])
    o_BcdHGD = o_XRD.view(B, H, d, G, c, D).permute(0, 4, 2, 1, 3, 5)
    if rows == c * d:
        o_BTHD[:, t0 : t0 + rows].view(B, c, d, H, G, D).copy_(o_BcdHGD)
    else:
        o_BTHD[:, t0:] = o_BcdHGD.reshape(B, c * d, HQ, D)[:, :rows]

    # selection from the same probabilities: group sum, Eq. 9 band, forced/legal, top-n
    mass_XCm = probs_XWcm.view(X, d, G, c, m1).sum(dim=2).transpose(1, 2).reshape(X, c * d, m1)
    t_C1 = torch.arange(t0, t0 + c * d, device=q_BTHD.device)[:, None]
    S_c = (t0 + c * d - 1) // geo.select_size + 1
    importance_XCS = block_importance(mass_XCm, S_c, geo.block_size, d, geo.select_size)
    # blocks before the chunk's first query's previous block are legal and not local
    first_block = max(0, t0 // geo.select_size - 1)
    scores_XCS = _mark_blocks(importance_XCS, t_C1, geo.select_size, first_block)
    picked_XCn = _top_blocks(scores_XCS, geo.n_select)[:, :rows]
    idx_BTHn[:, t0 : t0 + rows] = picked_XCn.view(B, H, rows, -1).transpose(1, 2)


def _fused_forward(
    q_BTHD: torch.Tensor,
    kcmp_BNHD: torch.Tensor,
    vcmp_BNHD: torch.Tensor,
    scale: float,
    geo: _Geometry,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o_BTHD, lse_XWM, idx_BTHn): output (zero before l - 1), folded lse, selected blocks.

    Math runs in fp32 (fp64 for fp64 inputs). Chunks of folded rows hold at most
    _TILE_ELEMENTS probabilities each and are dealt to the workers round-robin (later chunks
    read more tokens), each writing disjoint rows.
    """
    B, T, HQ, D = q_BTHD.shape
    N, H = kcmp_BNHD.shape[1], kcmp_BNHD.shape[2]
    X, W = B * H, geo.stride * geo.G
    dtype = torch.promote_types(q_BTHD.dtype, torch.float32)
    q_BTHD = q_BTHD.to(dtype)
    kt_XDN = kcmp_BNHD.to(dtype).permute(0, 2, 3, 1).reshape(X, D, N).contiguous()
    v_XND = vcmp_BNHD.to(dtype).transpose(1, 2).reshape(X, N, D)
    first = geo.block_size - 1
    o_BTHD = q_BTHD.new_empty(B, T, HQ, D)
    o_BTHD[:, :first] = 0.0
    lse_XWM = q_BTHD.new_empty(X, W, N)
    # queries before l - 1 see no compressed token: block 0 is their only legal block
    idx_BTHn = torch.full((B, T, H, geo.n_select), -1, dtype=torch.int64, device=q_BTHD.device)
    idx_BTHn[:, :first, :, 0] = 0
    out = (o_BTHD, lse_XWM, idx_BTHn)
    rows = max(1, _TILE_ELEMENTS // (X * W * N))
    starts = list(range(0, N, rows))

    def job(mine: list[int]) -> None:
        ws = Workspace()
        for m0 in mine:
            _chunk(m0, min(N, m0 + rows), geo, q_BTHD, kt_XDN, v_XND, scale, out, ws)

    workers = max(1, min(worker_count(), _MAX_WORKERS, len(starts)))
    run_workers([functools.partial(job, starts[w::workers]) for w in range(workers)])
    return o_BTHD, lse_XWM, idx_BTHn


class _FusedCompressedSelect(torch.autograd.Function):
    """Compressed attention (forward fused with selection) with aten's flash backward.

    Saves q and o unfolded, the tensors the other branches and the gate already keep alive,
    and folds them (and the output gradient) only in backward.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q_BTHD: torch.Tensor,
        kcmp_BNHD: torch.Tensor,
        vcmp_BNHD: torch.Tensor,
        scale: float,
        geo: _Geometry,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns o_BTHD (q's dtype), the folded lse and the block ids (no gradient)."""
        o_BTHD, lse_XWM, idx_BTHn = _fused_forward(q_BTHD, kcmp_BNHD, vcmp_BNHD, scale, geo)
        o_BTHD = o_BTHD.to(q_BTHD.dtype)
        # the flash backward takes the lse in its accumulation dtype (fp64 for fp64 inputs)
        ctx.save_for_backward(q_BTHD, kcmp_BNHD, vcmp_BNHD, o_BTHD, lse_XWM)
        ctx.scale, ctx.geo = scale, geo
        ctx.mark_non_differentiable(lse_XWM, idx_BTHn)
        return o_BTHD, lse_XWM, idx_BTHn

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_o_BTHD: torch.Tensor, *_grad_rest: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        """dq, dk, dv from aten's CPU flash-attention backward (causal, GQA) on folded rows."""
        q_BTHD, kcmp_BNHD, vcmp_BNHD, o_BTHD, lse_XWM = ctx.saved_tensors
        geo: _Geometry = ctx.geo
        B, T, HQ, D = q_BTHD.shape
        N, H = kcmp_BNHD.shape[1], kcmp_BNHD.shape[2]
        L, d = geo.block_size, geo.stride

        def fold(x_BTHD: torch.Tensor) -> torch.Tensor:
            return _fold_queries(x_BTHD, N, H, L, d)

        dq_BRMD, dk_BHND, dv_BHND = (
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                fold(grad_o_BTHD.to(q_BTHD.dtype)),
                fold(q_BTHD),
                kcmp_BNHD.transpose(1, 2),
                vcmp_BNHD.transpose(1, 2),
                fold(o_BTHD),
                lse_XWM.view(B, H * geo.stride * geo.G, N),
                0.0,
                True,
                scale=ctx.scale,
            )
        )
        dq_BTHD = q_BTHD.new_zeros(B, T, HQ, D)
        dq_BTHD[:, L - 1 :] = _unfold_rows(dq_BRMD, T, H, L, d)
        return dq_BTHD, dk_BHND.transpose(1, 2), dv_BHND.transpose(1, 2), None, None


def _compressed_select_torch(
    q_BTHD: torch.Tensor,
    kcmp_BNHD: torch.Tensor,
    vcmp_BNHD: torch.Tensor,
    geo: _Geometry,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused CPU path: (o_BTHD, lse_BTH, idx_BTHn) with the lse unfolded to [B, T, HQ]."""
    B, T, HQ, D = q_BTHD.shape
    N, H = kcmp_BNHD.shape[1], kcmp_BNHD.shape[2]
    lse_BTH = torch.full((B, T, HQ), float("-inf"), device=q_BTHD.device)
    if N == 0:
        idx_BTHn = torch.full((B, T, H, geo.n_select), -1, dtype=torch.int64)
        idx_BTHn[:, :, :, 0] = 0
        return q_BTHD.new_zeros(B, T, HQ, D), lse_BTH, idx_BTHn.to(q_BTHD.device)
    o_BTHD, lse_XWM, idx_BTHn = _FusedCompressedSelect.apply(
        q_BTHD, kcmp_BNHD, vcmp_BNHD, scale, geo
    )
    lse_BRM = lse_XWM.float().view(B, -1, N)
    lse_BTH[:, geo.block_size - 1 :] = _unfold_rows(lse_BRM, T, H, geo.block_size, geo.stride)
    return o_BTHD, lse_BTH, idx_BTHn


def compressed_select(
    q_BTHD: torch.Tensor,
    kcmp_BNHD: torch.Tensor,
    vcmp_BNHD: torch.Tensor,
    *,
    block_size: int,
    stride: int,
    select_size: int,
    n_select: int,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NSA's compression branch and its block selection: (o_BTHD, lse_BTH, idx_BTHS).

    The same results as ``compressed_attention(q, kcmp, vcmp, block_size, stride, scale)``
    followed by ``select_blocks(q, kcmp, lse, ...)`` (see both for the rules: visibility
    i·d + l - 1 <= t, zero output and lse -inf for queries that see nothing; Eq. 9-11 selection
    with forced and legal blocks, lower index on ties, ascending ids, -1 padding), with o
    differentiable in q, kcmp and vcmp (with T < l the torch path's all-zero output is a
    constant, as in ``compressed_attention``) and the ids int64 [B, T, H, n_select] without
    gradient.
    ``backend`` ``torch`` on CPU runs the fused pass (one score computation for both); other
    backends and devices run the two ops with that backend. Raises ValueError naming the knob
    or argument as those two ops do.
    """
    validate_attention(_OP, q_BTHD, kcmp_BNHD, vcmp_BNHD, block_size, stride)
    validate_select_knobs(_OP, block_size, stride, select_size, n_select)
    chosen = resolve_backend(_OP, backend, _AVAILABLE, q_BTHD)
    if chosen != "torch" or q_BTHD.device.type not in _FLASH_LSE_DEVICES:
        o_BTHD, lse_BTH = compressed_attention(
            q_BTHD, kcmp_BNHD, vcmp_BNHD, block_size, stride, scale=scale, backend=chosen
        )
        idx_BTHS = select_blocks(
            q_BTHD,
            kcmp_BNHD,
            lse_BTH,
            block_size=block_size,
            stride=stride,
            select_size=select_size,
            n_select=n_select,
            scale=scale,
            backend=chosen,
        )
        return o_BTHD, lse_BTH, idx_BTHS
    T, HQ, D = q_BTHD.shape[1:]
    H = kcmp_BNHD.shape[2]
    geo = _Geometry(T, H, HQ // H, block_size, stride, select_size, n_select)
    scale = D**-0.5 if scale is None else float(scale)
    return _compressed_select_torch(q_BTHD, kcmp_BNHD, vcmp_BNHD, geo, scale)
