"""The indexer's KL loss of DSA's sparse stage (``sparsezoo.kernels.dsa.kl``): ``indexer_kl``.

In the sparse stage the indexer learns KL(p_t || softmax(I_t)) over each query's selected
slots, with p_t the main attention's slot probabilities (the target, no gradient) and I_t the
indexer scores at those slots. Written as scores then a KL, the torch path would hold several
[B, T, K] fp32 tensors at once (scores, masks, log-softmax, products: ~1.6 GB above the
attention's own at 32k tokens, k = 2048) and run each elementwise pass over all of them; the
fused path scores, normalises and reduces one query chunk at a time and, when a gradient is
wanted, turns the chunk's (softmax - target) straight into dq, dw, dk in the same pass (the
backward only scales them by the incoming gradient).

Backends: ``naive`` (the oracle: ``indexer_scores_naive`` then :func:`kl_rows`), ``torch`` (the
fused chunked path on worker threads) and ``triton`` (the Triton slot scores then
:func:`kl_rows`).

Legend as in ``indexer``: B batch, T queries, S keys, N indexer heads, E indexer head dim,
U selection sets per query, K slots, C queries of a chunk.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from ..backend import resolve_backend
from ..base2 import LOG2E
from ..cpu_workers import Workspace
from .indexer import (
    _as_sets,
    _SlotKeys,
    _validate,
    default_index_scale,
    indexer_scores_naive,
    slot_backward,
    slot_chunk_runs,
    slot_scores,
)

__all__ = ["indexer_kl", "kl_rows"]

_OP = "indexer_kl"
_AVAILABLE = ("naive", "torch", "triton")
_TINY = torch.finfo(torch.float32).tiny


def kl_rows(target: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(scores)) of every row (last axis); -inf scores mark excluded keys.

    Both distributions live on the keys with finite scores: the target is set to 0 elsewhere
    and renormalised over them (a row whose target has no mass there gives 0, as does a row
    with no finite score). Differentiable in ``scores``; the target carries no gradient.
    """
    used = torch.isfinite(scores)
    target = torch.where(used, target.detach(), 0.0)
    target = target / target.sum(-1, keepdim=True).clamp_min(_TINY)
    log_q = torch.where(used, torch.log_softmax(scores, dim=-1), 0.0)
    return (torch.xlogy(target, target) - target * log_q).sum(-1)


def _softmax_used(scores_CK: torch.Tensor) -> torch.Tensor:
    """Softmax of score rows with -inf on excluded slots; a row with none used is all 0."""
    max_C1 = scores_CK.amax(-1, keepdim=True)
    max_C1.masked_fill_(max_C1 == float("-inf"), 0.0)
    # exp2 of the shift times log2 e: torch's exp is the slower op here (see kernels.base2)
    p_CK = (scores_CK - max_C1).mul_(LOG2E).exp2_()
    return p_CK.div_(p_CK.sum(-1, keepdim=True).clamp_min(_TINY))


class _SlotKL(torch.autograd.Function):
    """Fused slot scores + KL per query chunk, with its gradient computed in the same pass.

    The loss is a sum of KLs whose target carries no gradient, so once a chunk's scores exist
    its gradient is fixed up to the incoming scalar: d KL / d score = softmax - normalised
    target. When an input needs a gradient, the forward turns that into dq, dw, dk right away
    and saves only them (q- and k-sized); the backward scales them by the incoming gradient.
    A separate backward pass would gather every chunk's slot keys and recompute its scores a
    second time, and would keep the target ([B, T, U, K] fp32: 256 MB at 32k tokens,
    k = 2048) alive from the forward to the backward.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q_BTNE: torch.Tensor,
        k_BSE: torch.Tensor,
        w_BTUN: torch.Tensor,
        idx_BTUK: torch.Tensor,
        target_BTUK: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Sum of the rows' KL; per-row values land in a [B, T, U] tensor summed at the end, so
        the result does not depend on how chunks were dealt to the workers."""
        kl_BTU = q_BTNE.new_empty(idx_BTUK.shape[:3])
        want_grads = any(ctx.needs_input_grad[:3])
        dq = torch.zeros_like(q_BTNE) if want_grads else None
        dw = torch.zeros_like(w_BTUN) if want_grads else None

        def job(
            b: int, t0: int, t1: int, u: int, slots: _SlotKeys, ws: Workspace, *dk: torch.Tensor
        ) -> None:
            q_CNE, w_CN = q_BTNE[b, t0:t1], w_BTUN[b, t0:t1, u]
            scores_CK, relu_CNK = slot_scores(slots, q_CNE, w_CN, scale, ws)
            target_CK = target_BTUK[b, t0:t1, u]
            kl_BTU[b, t0:t1, u] = kl_rows(target_CK, scores_CK)
            if dq is not None and dw is not None:
                g_CK = _score_grad(scores_CK, target_CK, slots.used_CK).mul_(scale)
                grads = (dq[b, t0:t1], dw[b, t0:t1, u], dk[0][b])
                slot_backward(slots, q_CNE, w_CN, g_CK, ws, grads, relu_CNK)

        dk = slot_chunk_runs(job, q_BTNE, k_BSE, w_BTUN, idx_BTUK, with_dk=want_grads)
        if want_grads:
            ctx.save_for_backward(dq, dk, dw)
        return kl_BTU.sum()

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, g: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None, None]:
        """The forward's gradients times the incoming one."""
        dq, dk, dw = ctx.saved_tensors
        return dq * g, dk * g, dw * g, None, None, None


def _score_grad(
    scores_CK: torch.Tensor, target_CK: torch.Tensor, used_CK: torch.Tensor
) -> torch.Tensor:
    """d KL(target || softmax(scores)) / d scores of each row (a fresh tensor): the softmax
    minus the target renormalised over the used slots; 0 on unused slots and on rows whose
    target has no mass there (their loss is the constant 0)."""
    p_CK = _softmax_used(scores_CK)
    t_CK = torch.where(used_CK, target_CK, 0.0)
    mass_C1 = t_CK.sum(-1, keepdim=True)
    p_CK.mul_(mass_C1 > 0)
    return p_CK.sub_(t_CK.div_(mass_C1.clamp_min(_TINY)))


def indexer_kl(
    q_idx_BTNE: torch.Tensor,
    k_idx_BSE: torch.Tensor,
    w_idx: torch.Tensor,
    indices: torch.Tensor,
    target: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sum over score rows of KL(target || softmax(I)) at the index slots; fp32 scalar.

    Shapes as in ``indexer_scores`` with ``indices``: q_idx [B, T, N, E], k_idx [B, S, E],
    w_idx [B, T, N] with indices [B, T, K] (one set per query) or w_idx [B, T, U, N] with
    indices [B, T, U, K]; ``target`` has the shape of ``indices`` (DSA: the attention's slot
    probabilities). A row's distributions live on its used slots (not -1, not future): the
    target is renormalised over them, and a row whose target has no mass there, or with no
    used slot, contributes 0. Differentiable in q_idx, k_idx and w_idx; the target gets no
    gradient. ``scale`` defaults to N^-1/2 · E^-1/2. ``backend`` is ``naive``, ``torch``,
    ``triton`` or ``auto``. Raises ValueError naming the argument for bad shapes, dtypes,
    devices, index values or backend.
    """
    _validate(_OP, q_idx_BTNE, k_idx_BSE, w_idx, indices)
    if target.shape != indices.shape or not target.is_floating_point():
        raise ValueError(
            f"{_OP}: target must be a floating tensor shaped like indices "
            f"{tuple(indices.shape)}, got {target.dtype} {tuple(target.shape)}"
        )
    if target.device != indices.device:
        raise ValueError(f"{_OP}: target is on {target.device}, indices on {indices.device}")
    chosen = resolve_backend(_OP, backend, _AVAILABLE, q_idx_BTNE)
    N, E = q_idx_BTNE.shape[2:]
    scale = default_index_scale(N, E) if scale is None else float(scale)
    sets = _as_sets if w_idx.dim() == 3 else lambda x: x
    target_BTUK = sets(target.detach().float())
    if chosen == "torch":
        q, k, w = q_idx_BTNE.float(), k_idx_BSE.float(), _as_sets(w_idx).float().contiguous()
        return _SlotKL.apply(q, k, w, sets(indices), target_BTUK, scale)
    if chosen == "naive":
        scores = indexer_scores_naive(q_idx_BTNE, k_idx_BSE, w_idx, scale, indices)
    else:
        # imported on first use: it needs triton, and TRITON_INTERPRET is read at import time
        from .triton_indexer import indexer_scores_triton

        scores = indexer_scores_triton(q_idx_BTNE, k_idx_BSE, w_idx, scale, indices)
    return kl_rows(target_BTUK, sets(scores)).sum()
