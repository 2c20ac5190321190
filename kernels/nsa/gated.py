"""NSA's three branches and their gate in one op (``gated_branches``): Eq. 5 of the paper.

o_t = Σ_c sigmoid(logit_c) · o_c over the compression, selection and window branches. As three
ops plus an autograd mix, training keeps every branch's output alive from the forward to the
backward (the mix needs them for the gate gradients and each flash backward for its delta =
rowsum(dO ⊙ O)): three q-sized tensors besides the mix. The fused torch path keeps no branch
output:
- compression and window: their backwards recompute the output a part at a time with the
  forward's flash call (``gated_compressed_backward``, ``gated_window_backward``), the two
  cheap branches (aten's flash kernel);
- selection, the costliest branch: with s_c = rowsum(dY ⊙ o_c) the gate gradients,
  rowsum(dY ⊙ y) = Σ_c g_c s_c, so its delta g_slc · s_slc is rowsum(dY ⊙ y) minus the other
  two branches' terms: exact algebra, no recompute. Its rounding error is absolute, at fp32
  precision of the whole row's terms (the stored mix, the recomputed outputs); both uses of
  it (the flash delta and the gate logit's gradient s_slc · g(1 - g) = delta · (1 - g)) scale
  with g_slc, so a nearly closed gate never divides it (which is why the sigmoid is inside
  the op). The selection K/V gradients, which scale with g_slc, then carry a relative error
  of about fp32 eps / g_slc: 2% at g_slc = 6e-6 (sigmoid(-12)), where they are ~1e-5 of the
  other gradients, and ~1e-5 at g_slc = 0.01.
Every branch's output gradient g_c · dY is formed a part or a gathered batch at a time. With
the output projection inside the op (``out_weight``, ``_ProjectMix``) the projection's backward
writes dY over the mix's rows as it reads them: the mix's buffer becomes its gradient. The
backward then runs in ranges of query rows (``_row_ranges``: up to eight of 4096 rows or more),
all three branches per range, each range's dq added up in a range-sized buffer and written
over dY's rows once no branch reads them again: dq, dY and the mix share one buffer. Measured
at 32k tokens, 16 query heads of 64 on one KV head, paper blocks (``sparsezoo bench`` fwdbwd,
with NSA's q rotated out of place, phi and the gate recomputed): training peak 810 -> 743 MB
with the mix's buffer reused, 663 MB with the row ranges (dense: 696 MB); the op's backward
at 16k and 32k within noise of the whole-sequence one.
Other backends (and short rows, where the selection runs as one masked call, and devices
without aten's CPU flash kernels) compose the three ops and the mix through autograd.
Legend: B batch, T time, N compressed tokens, HQ query heads, H KV heads, G group size HQ // H,
D head dim, S selection slots, Z query rows of every KV head H·B·T, 3 the branches
(compression, selection, window).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

from ..backend import check_attention_shapes, resolve_backend
from ..window import sliding_window_attention
from ..window.torch_impl import _forward as _window_forward
from ..window.torch_impl import gated_window_backward, window_dkv
from .compressed_select import _fused_forward, _Geometry, compressed_select
from .compression import (
    _FLASH_LSE_DEVICES,
    gated_compressed_backward,
    num_compressed,
    validate_attention,
)
from .select import validate_select_knobs
from .selection import _backward_dkv as _selection_dkv
from .selection import (
    _backward_kv,
    _by_head,
    _from_heads,
    _route,
    _rowdot,
    _use_masked,
    _workers,
    selected_attention,
)
from .selection import _backward_rows as _selection_rows
from .selection import _forward as _selection_forward

__all__ = ["NSAKnobs", "gated_branches"]

_OP = "gated_branches"
_AVAILABLE = ("naive", "torch", "triton")
# rows of the projection's backward per chunk: its dOut and dY rows together ~16 MB in fp32
_PROJECT_CHUNK_ELEMENTS = 1 << 22
# query-row ranges of the fused backward (``_row_ranges``): each range's dq is written over
# dY's rows once all three branches are done with them, so dq costs a range's rows, not q's.
# At most eight (an eighth of q at 32k tokens: training peak 743 -> 663 MB) of at least 4096
# rows of a batch (at 16k tokens, 16 query heads of 64, eight ranges of 2048 rows made the
# op's backward ~20% slower; four: within noise)
_ROW_RANGES = 8
_MIN_RANGE_ROWS = 4096


@dataclass(frozen=True)
class NSAKnobs:
    """The block geometry of the three branches: compression blocks of ``block_size`` tokens
    every ``stride``, ``n_select`` selected blocks of ``select_size``, a ``window`` of keys."""

    block_size: int
    stride: int
    select_size: int
    n_select: int
    window: int


class _GatedBranches(torch.autograd.Function):
    """The fused CPU path: saves q, every K/V, the gate logits, the selection and window lse and
    the mix; no branch output (see the module doc)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q_BTHD: torch.Tensor,
        kcmp_BNHD: torch.Tensor,
        vcmp_BNHD: torch.Tensor,
        kslc_BTHD: torch.Tensor,
        vslc_BTHD: torch.Tensor,
        kwin_BTHD: torch.Tensor,
        vwin_BTHD: torch.Tensor,
        logits_BTH3: torch.Tensor,
        knobs: NSAKnobs,
        scale: float,
        keep_mix: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the three branch forwards and mix them; returns (y_BTHD, unit_BTH, idx_BTHS).

        With ``keep_mix`` the mix is saved for the backward's rowsum(dY ⊙ y); without, the
        caller projects it with ``_ProjectMix``, whose backward hands that row dot back as the
        gradient of unit_BTH: ones, a per-head scale of y that is 1 by construction (so the
        projection skips multiplying by it), whose gradient is exactly rowsum(dY ⊙ y)."""
        B, T, HQ, D = q_BTHD.shape
        H = kslc_BTHD.shape[2]
        G = HQ // H
        geo = _Geometry(T, H, G, knobs.block_size, knobs.stride, knobs.select_size, knobs.n_select)
        # gate-major contiguous gates: strided [..., c] views cost full-size passes (see _mix)
        acc = torch.promote_types(q_BTHD.dtype, torch.float32)
        gates_3BTH1 = torch.sigmoid(logits_BTH3.to(acc)).permute(3, 0, 1, 2).contiguous()[..., None]
        # each branch's term is added as soon as it ran: one branch output alive at a time
        o_cmp_BTHD, _, idx_BTHS = _fused_forward(q_BTHD, kcmp_BNHD, vcmp_BNHD, scale, geo)
        y_BTHD = o_cmp_BTHD.mul_(gates_3BTH1[0])
        routing = _route(
            idx_BTHS, knobs.select_size, G, _workers(idx_BTHS, G * D, knobs.select_size)
        )
        o_slc_ZF, lse_ZG = _selection_forward(
            q_BTHD, kslc_BTHD, vslc_BTHD, idx_BTHS, routing, knobs.select_size, scale
        )
        y_BTHD.addcmul_(_from_heads(o_slc_ZF, B, T, D), gates_3BTH1[1])
        del o_slc_ZF
        # the window's flash calls read overlapping key tiles: contiguous rows, not the strided
        # views of a fused K/V projection (its backward takes the same tensors)
        kwin_BTHD, vwin_BTHD = kwin_BTHD.contiguous(), vwin_BTHD.contiguous()
        o_win_BTHD, lse_win_BTH = _window_forward(q_BTHD, kwin_BTHD, vwin_BTHD, knobs.window, scale)
        y_BTHD.addcmul_(o_win_BTHD, gates_3BTH1[2])
        del o_win_BTHD
        y_BTHD = y_BTHD.to(q_BTHD.dtype)
        # over several row ranges the backward routes each anew (``_route``): the ids, not the
        # whole sequence's routing, are kept; one range reuses the forward's routing
        ctx.knobs, ctx.scale, ctx.workers = knobs, scale, len(routing.batches_W)
        ctx.routing = routing if len(_row_ranges(B, T, knobs)) == 1 else None
        ctx.mark_non_differentiable(idx_BTHS)
        ctx.save_for_backward(
            q_BTHD, kcmp_BNHD, vcmp_BNHD, kslc_BTHD, vslc_BTHD, kwin_BTHD, vwin_BTHD,
            logits_BTH3, lse_ZG, lse_win_BTH, idx_BTHS, y_BTHD if keep_mix else None,
        )  # fmt: skip
        return y_BTHD, q_BTHD.new_ones((B, T, HQ), dtype=acc), idx_BTHS

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx,
        dy_BTHD: torch.Tensor,
        drow_BTH: torch.Tensor,
        _grad_idx: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        """Gradients of q, the six K/V inputs and the gate logits, a row range at a time."""
        (
            q_BTHD, kcmp_BNHD, vcmp_BNHD, kslc_BTHD, vslc_BTHD, kwin_BTHD, vwin_BTHD,
            logits_BTH3, lse_ZG, lse_win_BTH, idx_BTHS, y_BTHD,
        ) = ctx.saved_tensors  # fmt: skip
        knobs: NSAKnobs = ctx.knobs
        B, T, HQ, D = q_BTHD.shape
        H = kslc_BTHD.shape[2]
        acc = torch.promote_types(q_BTHD.dtype, torch.float32)
        ranges = _row_ranges(B, T, knobs)
        # dq: one range's own buffer, or, over several, dY's rows as each range is done with
        # them: dY then arrives in the mix's buffer (``_ProjectMix``), this op's own
        dq_BTHD: torch.Tensor | None = None
        if y_BTHD is None:
            delta_BTH = drow_BTH.to(acc, copy=True)
            if len(ranges) > 1:
                dq_BTHD = dy_BTHD
        else:
            dy_BTHD = dy_BTHD.to(q_BTHD.dtype).contiguous()
            delta_BTH = _rowdot(dy_BTHD, y_BTHD)
            if len(ranges) > 1:
                dq_BTHD = torch.empty_like(q_BTHD)
        del y_BTHD
        gates_3BTH = torch.sigmoid(logits_BTH3.to(acc)).permute(3, 0, 1, 2).contiguous()
        s_cmp_BTH, s_win_BTH = (q_BTHD.new_zeros(B, T, HQ, dtype=acc) for _ in range(2))
        dkv_cmp = tuple(kcmp_BNHD.new_zeros(B, H, kcmp_BNHD.shape[1], D, dtype=acc) for _ in "kv")
        dkv_win = window_dkv(kwin_BTHD, knobs.window, HQ // H)
        slc = _backward_kv(kslc_BTHD, vslc_BTHD, knobs.select_size, ctx.scale, ctx.workers)
        lse_HBTG = lse_ZG.view(H, B, T, -1)
        for t0, t1 in ranges:
            rows = slice(t0, t1)
            dq_bTHD = torch.zeros(B, t1 - t0, HQ, D, dtype=q_BTHD.dtype, device=q_BTHD.device)
            gated_compressed_backward(
                dy_BTHD, gates_3BTH[0], q_BTHD, kcmp_BNHD, vcmp_BNHD, knobs.block_size,
                knobs.stride, ctx.scale, dq_bTHD, (t0, t1), dkv_cmp, s_cmp_BTH,
            )  # fmt: skip
            gated_window_backward(
                dy_BTHD, gates_3BTH[2], q_BTHD, kwin_BTHD, vwin_BTHD, lse_win_BTH, knobs.window,
                ctx.scale, dq_bTHD, (t0, t1), dkv_win, s_win_BTH,
            )  # fmt: skip
            # g_slc · s_slc = rowsum(dY ⊙ y) - g_cmp · s_cmp - g_win · s_win (module doc)
            delta_bTH = delta_BTH[:, rows]
            delta_bTH -= gates_3BTH[0, :, rows] * s_cmp_BTH[:, rows]
            delta_bTH -= gates_3BTH[2, :, rows] * s_win_BTH[:, rows]
            lse_bZG = lse_HBTG[:, :, rows].reshape(H * B * (t1 - t0), -1)
            delta_bZG = _by_head(delta_bTH[..., None], H).view(lse_bZG.shape)
            routing = ctx.routing if ctx.routing is not None else _route(
                idx_BTHS[:, rows], knobs.select_size, HQ // H, ctx.workers, t0,
                -(-T // knobs.select_size),
            )  # fmt: skip
            _selection_rows(
                slc, dy_BTHD[:, rows], q_BTHD[:, rows],
                torch.stack([lse_bZG, delta_bZG.to(lse_bZG.dtype)], dim=-1), routing,
                gates_3BTH[1, :, rows], dq_bTHD,
            )  # fmt: skip
            # every branch is done with these rows of dY: dq takes their place
            if dq_BTHD is None:
                dq_BTHD = dq_bTHD
            else:
                dq_BTHD[:, rows] = dq_bTHD
        dkslc, dvslc = _selection_dkv(slc, ctx.scale, B, T)
        dkcmp, dvcmp = (x.transpose(1, 2).to(kcmp_BNHD.dtype) for x in dkv_cmp)
        dkwin, dvwin = (x[:, :T].to(kwin_BTHD.dtype) for x in dkv_win)
        one_minus_3BTH = 1.0 - gates_3BTH
        dlogits_BTH3 = torch.stack(
            [
                s_cmp_BTH * gates_3BTH[0] * one_minus_3BTH[0],
                delta_BTH * one_minus_3BTH[1],
                s_win_BTH * gates_3BTH[2] * one_minus_3BTH[2],
            ],
            dim=-1,
        )
        return (
            dq_BTHD, dkcmp, dvcmp, dkslc.to(kslc_BTHD.dtype), dvslc.to(vslc_BTHD.dtype), dkwin,
            dvwin, dlogits_BTH3.to(logits_BTH3.dtype), None, None, None,
        )  # fmt: skip


def _row_ranges(B: int, T: int, knobs: NSAKnobs) -> list[tuple[int, int]]:
    """Up to _ROW_RANGES ranges of query rows for the backward, of about _MIN_RANGE_ROWS rows
    of the batch or more, each starting where the compression's folded rows and the window's
    pieces can start: at a folded row's first query (l - 1 + m·d) past the window's causal
    head (the first range holds it)."""
    first, d = knobs.block_size - 1, knobs.stride
    n = max(1, min(_ROW_RANGES, B * T // _MIN_RANGE_ROWS))
    bounds = [0]
    for i in range(1, n):
        t = first + d * round(i * (T - first) / (n * d))
        if t >= max(knobs.window, first, bounds[-1] + 1) and t < T:
            bounds.append(t)
    return list(itertools.pairwise([*bounds, T]))


class _ProjectMix(torch.autograd.Function):
    """out = y·Wᵀ of the fused op's mix y, an internal tensor whose buffer the backward reuses.

    The backward runs a chunk of rows at a time: dY = dOut·W, rowsum(dY ⊙ y) per head (which
    ``_GatedBranches`` needs for the selection's delta, returned as the gradient of the unit
    row scale y comes with), dW += dOutᵀ·y, then dY overwrites y's rows. So y and dY never
    both exist (nor a materialised copy of an expanded dOut): the mix's buffer becomes its
    gradient, one q-sized tensor off the start of the training backward. y is held on ctx,
    not saved (it is overwritten), so the graph can be back-propagated once.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, y_BTHD: torch.Tensor, unit_BTH: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """Project [B, T, HQ, D] to [B, T, C]; ``unit_BTH`` only routes the row dot back."""
        B, T, HQ, D = y_BTHD.shape
        ctx.mix = [y_BTHD.detach()]
        ctx.save_for_backward(weight)
        return F.linear(y_BTHD.view(B, T, HQ * D), weight)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(dY in y's buffer, rowsum(dY ⊙ y) [B, T, HQ] fp32 (fp64 for fp64), dW)."""
        if not ctx.mix:
            raise RuntimeError(
                f"{_OP}: the fused op's backward reuses its mix's buffer and runs once; "
                "back-propagate through it once (no retain_graph)"
            )
        y_BTHD = ctx.mix.pop()
        (weight,) = ctx.saved_tensors
        B, T, HQ, D = y_BTHD.shape
        y_NF = y_BTHD.view(B * T, HQ * D)
        # 2-d products, as aten's own linear backward: a view even of an expanded gradient (a
        # loss of out.sum()), which only a chunk at a time gets copied for the matmul
        grad_NC = grad_out.to(weight.dtype).flatten(0, 1)
        del grad_out
        acc = torch.promote_types(y_BTHD.dtype, torch.float32)
        drow_NH = torch.empty(B * T, HQ, dtype=acc, device=y_BTHD.device)
        dweight = torch.zeros_like(weight) if ctx.needs_input_grad[2] else None
        rows = max(1, _PROJECT_CHUNK_ELEMENTS // max(1, weight.shape[0] + weight.shape[1]))
        for r0 in range(0, B * T, rows):
            grad_RC, y_RF = grad_NC[r0 : r0 + rows], y_NF[r0 : r0 + rows]
            dy_RF = (grad_RC @ weight).to(y_BTHD.dtype)
            drow_NH[r0 : r0 + rows] = torch.linalg.vecdot(
                dy_RF.view(-1, HQ, D), y_RF.view(-1, HQ, D)
            )
            if dweight is not None:
                dweight.addmm_(grad_RC.mT, y_RF.to(grad_RC.dtype))
            y_RF.copy_(dy_RF)
        return y_BTHD, drow_NH.view(B, T, HQ), dweight


def _composed(
    q_BTHD: torch.Tensor,
    kcmp_BNHD: torch.Tensor,
    vcmp_BNHD: torch.Tensor,
    kv_slc: tuple[torch.Tensor, torch.Tensor],
    kv_win: tuple[torch.Tensor, torch.Tensor],
    logits_BTH3: torch.Tensor,
    out_weight: torch.Tensor | None,
    knobs: NSAKnobs,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The three ops of ``backend``, an autograd mix and the optional projection. Each branch
    runs right before its term is added, so autograd (newest ready node first)
    back-propagates the window, then the selection, then the compression, one branch's output
    gradient alive at a time."""
    o_cmp, _, idx_BTHS = compressed_select(
        q_BTHD, kcmp_BNHD, vcmp_BNHD, block_size=knobs.block_size, stride=knobs.stride,
        select_size=knobs.select_size, n_select=knobs.n_select, scale=scale, backend=backend,
    )  # fmt: skip
    gates_3BTH1 = torch.sigmoid(logits_BTH3).permute(3, 0, 1, 2).contiguous()[..., None]
    y_BTHD = o_cmp * gates_3BTH1[0]
    o_slc = selected_attention(
        q_BTHD, *kv_slc, idx_BTHS, knobs.select_size, scale=scale, backend=backend
    )
    y_BTHD = y_BTHD.addcmul(o_slc, gates_3BTH1[1])
    o_win = sliding_window_attention(q_BTHD, *kv_win, knobs.window, scale=scale, backend=backend)
    y_BTHD = y_BTHD.addcmul(o_win, gates_3BTH1[2])
    if out_weight is None:
        return y_BTHD, idx_BTHS
    return F.linear(y_BTHD.flatten(2), out_weight), idx_BTHS


def gated_branches(
    q_BTHD: torch.Tensor,
    kcmp_BNHD: torch.Tensor,
    vcmp_BNHD: torch.Tensor,
    kv_slc: tuple[torch.Tensor, torch.Tensor],
    kv_win: tuple[torch.Tensor, torch.Tensor],
    logits_BTH3: torch.Tensor,
    knobs: NSAKnobs,
    scale: float | None = None,
    backend: str = "auto",
    out_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NSA's prefill attention: (y_BTHD, idx_BTHS) with y = Σ_c sigmoid(logit_c) · o_c, or
    (y·Wᵀ [B, T, C], idx_BTHS) with the output projection's ``out_weight`` W [C, HQ·D].

    q_BTHD [B, T, HQ, D]; kcmp_BNHD / vcmp_BNHD [B, N, H, D] the compressed tokens
    (``compress_kv``); kv_slc and kv_win the (k, v) pairs [B, T, H, D] of the selection and
    window branches (the same tensors when the branches share K/V); logits_BTH3 [B, T, HQ, 3]
    the gate's pre-sigmoid outputs in branch order (compression, selection, window). The
    branches are ``compressed_select`` (which also picks idx_BTHS, int64 [B, T, H, n_select],
    no gradient), ``selected_attention`` over those blocks and ``sliding_window_attention``,
    with the rules and errors of those ops. y has q's dtype and is differentiable in q, every
    K/V, the logits and W. With W inside the op the fused path's backward turns the mix's
    buffer into its gradient (``_ProjectMix``), where a projection outside would keep the mix
    and its gradient alive together (a q-sized tensor more at the training peak); that
    backward runs once (a second raises RuntimeError). ``backend`` ``torch`` on CPU runs
    the fused op of the module doc (same results, less memory); ``naive`` (the oracle),
    ``triton`` and the torch path elsewhere compose the three ops. Raises ValueError naming
    the argument for a bad knob, shape or backend.
    """
    validate_attention(_OP, q_BTHD, kcmp_BNHD, vcmp_BNHD, knobs.block_size, knobs.stride)
    validate_select_knobs(_OP, knobs.block_size, knobs.stride, knobs.select_size, knobs.n_select)
    B, T, HQ, _ = q_BTHD.shape
    if logits_BTH3.shape != (B, T, HQ, 3):
        raise ValueError(
            f"{_OP}: logits_BTH3 must be [B, T, HQ, 3] = {[B, T, HQ, 3]}, "
            f"got {list(logits_BTH3.shape)}"
        )
    for name, (k_BTHD, v_BTHD) in (("kv_slc", kv_slc), ("kv_win", kv_win)):
        check_attention_shapes(f"{_OP} ({name})", q_BTHD, k_BTHD, v_BTHD)
        if not (q_BTHD.dtype == k_BTHD.dtype == v_BTHD.dtype):
            raise ValueError(
                f"{_OP}: {name} dtypes {k_BTHD.dtype}, {v_BTHD.dtype} differ from q's "
                f"{q_BTHD.dtype}"
            )
    if isinstance(knobs.window, bool) or not isinstance(knobs.window, int) or knobs.window < 1:
        raise ValueError(f"{_OP}: window must be an int >= 1, got {knobs.window!r}")
    if out_weight is not None and (
        out_weight.dim() != 2 or out_weight.shape[1] != HQ * q_BTHD.shape[-1]
    ):
        raise ValueError(
            f"{_OP}: out_weight must be [C, HQ·D] with HQ·D = {HQ * q_BTHD.shape[-1]}, "
            f"got {list(out_weight.shape)}"
        )
    chosen = resolve_backend(_OP, backend, _AVAILABLE, q_BTHD)
    scale = q_BTHD.shape[-1] ** -0.5 if scale is None else float(scale)
    fused = (
        chosen == "torch"
        and q_BTHD.device.type in _FLASH_LSE_DEVICES
        and num_compressed(T, knobs.block_size, knobs.stride) > 0
        and not _use_masked(q_BTHD, kv_slc[0], knobs.select_size)
    )
    if not fused:
        return _composed(
            q_BTHD, kcmp_BNHD, vcmp_BNHD, kv_slc, kv_win, logits_BTH3, out_weight, knobs, scale,
            chosen,
        )  # fmt: skip
    y_BTHD, unit_BTH, idx_BTHS = _GatedBranches.apply(
        q_BTHD, kcmp_BNHD, vcmp_BNHD, *kv_slc, *kv_win, logits_BTH3, knobs, scale,
        out_weight is None,
    )  # fmt: skip
    if out_weight is None:
        return y_BTHD, idx_BTHS
    return _ProjectMix.apply(y_BTHD, unit_BTH, out_weight), idx_BTHS
