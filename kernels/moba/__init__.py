"""MoBA kernels (``sparsezoo.kernels.moba``): Mixture of Block Attention (Lu et al., 2025).

Keys are cut into blocks of ``block_size``; every query attends its own block (token-causal)
plus the top_k - 1 strictly-past blocks whose mean key scores best against it, per query head,
under one softmax. Ops:
- ``block_means`` / ``route_blocks``: the parameter-free gate (fp32 q · mean key, own block never
  a candidate, ties to the lower index), shared by prefill and decoding;
- ``moba_attention``: gate + attention in one call;
- ``moba_routed_attention``: attention over the own block and given routed blocks;
- ``moba_decode_attention``: the newest queries against a K/V cache, own + routed rows only.
Attention backends: ``naive`` (dense masked oracle, fp32), ``torch`` (the fast CPU path: own
blocks and MoE-style regrouped routed blocks through aten's flash-attention kernels, merged by
log-sum-exp, or one masked SDPA call for a short sequence; off CPU it runs NSA's
selected-attention torch path on a folded layout) and
``triton`` (NSA's selected-attention Triton kernels on the folded layout, see ``fold.py``).
Layout [B, T, H, D] with GQA: query head h reads KV head h // (HQ // H); routing is per query
head and K/V are never repeated per query head in the forward.
Legend: B batch, T time, HQ query heads, H KV heads, D head dim, R routed slots top_k - 1.
"""

from __future__ import annotations

import torch

from ..backend import check_attention_shapes, resolve_backend
from .decode import moba_decode_attention, own_block_start
from .fold import moba_attention_by_selection
from .gate import block_means, check_block_args, route_blocks
from .naive import moba_attention_naive, route_blocks_naive
from .torch_impl import moba_attention_torch

__all__ = [
    "block_means",
    "moba_attention",
    "moba_decode_attention",
    "moba_routed_attention",
    "own_block_start",
    "route_blocks",
]

_AVAILABLE = ("naive", "torch", "triton")
# dtypes aten's CPU flash-attention kernels accept (the torch path's building block)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _validate_qkv(
    op: str, q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor
) -> None:
    """Raise ValueError naming the argument unless q, k, v fit (GQA shapes, dtype, device)."""
    check_attention_shapes(op, q_BTHD, k_BTHD, v_BTHD)
    if not (q_BTHD.dtype == k_BTHD.dtype == v_BTHD.dtype) or q_BTHD.dtype not in _DTYPES:
        raise ValueError(
            f"{op}: q, k, v must share one dtype of {[str(d) for d in _DTYPES]}, got "
            f"{q_BTHD.dtype}, {k_BTHD.dtype}, {v_BTHD.dtype}"
        )
    if not (q_BTHD.device == k_BTHD.device == v_BTHD.device):
        raise ValueError(
            f"{op}: q, k, v devices differ: {q_BTHD.device}, {k_BTHD.device}, {v_BTHD.device}"
        )


def _validate_indices(
    op: str, q_BTHD: torch.Tensor, idx_BTHR: torch.Tensor, block_size: int
) -> None:
    """Raise ValueError unless idx is int64 [B, T, HQ, R] of distinct strictly-past ids or -1."""
    B, T, HQ = q_BTHD.shape[:3]
    if idx_BTHR.dtype != torch.int64 or idx_BTHR.dim() != 4 or idx_BTHR.shape[:3] != (B, T, HQ):
        raise ValueError(
            f"{op}: block_indices must be int64 [B, T, HQ, R] = [{B}, {T}, {HQ}, R], got "
            f"{idx_BTHR.dtype} {tuple(idx_BTHR.shape)}"
        )
    if idx_BTHR.device != q_BTHD.device:
        raise ValueError(f"{op}: block_indices is on {idx_BTHR.device}, q on {q_BTHD.device}")
    if idx_BTHR.numel() == 0:
        return
    own_1T11 = (torch.arange(T, device=q_BTHD.device) // block_size).view(1, T, 1, 1)
    if (idx_BTHR < -1).any() or (idx_BTHR >= own_1T11).any():
        raise ValueError(
            f"{op}: block_indices must be -1 or ids of blocks strictly before the query's own "
            f"block (< t // block_size, block_size={block_size})"
        )
    sorted_BTHR = idx_BTHR.sort(dim=-1).values
    if ((sorted_BTHR[..., 1:] == sorted_BTHR[..., :-1]) & (sorted_BTHR[..., 1:] >= 0)).any():
        raise ValueError(f"{op}: block_indices repeats a block id within a row (not allowed)")


def _attend(
    chosen: str,
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    idx_BTHR: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Run the resolved backend on validated inputs."""
    if chosen == "naive":
        return moba_attention_naive(q_BTHD, k_BTHD, v_BTHD, idx_BTHR, block_size, scale)
    if chosen == "torch" and q_BTHD.device.type == "cpu":
        return moba_attention_torch(q_BTHD, k_BTHD, v_BTHD, idx_BTHR, block_size, scale)
    return moba_attention_by_selection(
        q_BTHD, k_BTHD, v_BTHD, idx_BTHR, block_size, scale, backend=chosen
    )


def moba_routed_attention(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    block_indices_BTHR: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """MoBA attention for a given routing: own block (token-causal) + routed blocks; o_BTHD.

    q_BTHD is [B, T, HQ, D], k_BTHD and v_BTHD [B, T, H, D] with HQ a multiple of H.
    block_indices_BTHR is int64 [B, T, HQ, R] (``route_blocks``): per query and query head, ids
    of distinct blocks strictly before the query's own block, -1 unused. One softmax spans the
    own block's keys up to t and every routed block's keys. ``scale`` defaults to D**-0.5;
    fp32, bf16 and fp16 are supported (fp32 accumulation) and the output has q's dtype.
    Differentiable in q, k, v. ``backend`` is ``naive``, ``torch``, ``triton`` or ``auto``
    (triton on CUDA, torch elsewhere). Raises ValueError naming the argument for bad shapes,
    dtypes, devices, block_size, index values or backend.
    """
    op = "moba_routed_attention"
    check_block_args(op, block_size)
    _validate_qkv(op, q_BTHD, k_BTHD, v_BTHD)
    _validate_indices(op, q_BTHD, block_indices_BTHR, block_size)
    chosen = resolve_backend(op, backend, _AVAILABLE, q_BTHD)
    scale = q_BTHD.shape[-1] ** -0.5 if scale is None else float(scale)
    return _attend(chosen, q_BTHD, k_BTHD, v_BTHD, block_indices_BTHR, int(block_size), scale)


def moba_attention(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    block_size: int,
    top_k: int,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """MoBA: gate every query head over past block means, attend own + top_k - 1 blocks; o_BTHD.

    Shapes, dtypes and ``scale`` as in ``moba_routed_attention``; ``top_k`` counts the own
    block (top_k = 1 is block-local causal attention; block_size * top_k >= T is dense causal
    attention). The gate gets no gradient. The ``naive`` backend also gates naively (dense
    [T, N] scores, the oracle for ``route_blocks``); the others use ``route_blocks``. Raises
    ValueError naming the argument for bad shapes, dtypes, devices, sizes or backend.
    """
    op = "moba_attention"
    check_block_args(op, block_size, top_k)
    _validate_qkv(op, q_BTHD, k_BTHD, v_BTHD)
    chosen = resolve_backend(op, backend, _AVAILABLE, q_BTHD)
    scale = q_BTHD.shape[-1] ** -0.5 if scale is None else float(scale)
    block_size, top_k = int(block_size), int(top_k)
    with torch.no_grad():
        if chosen == "naive":
            idx_BTHR = route_blocks_naive(q_BTHD, k_BTHD, block_size, top_k)
        else:
            idx_BTHR, _ = route_blocks(q_BTHD, block_means(k_BTHD, block_size), block_size, top_k)
    return _attend(chosen, q_BTHD, k_BTHD, v_BTHD, idx_BTHR, block_size, scale)
