"""Fast CPU sliding-window attention: chunked queries, strided key tiles, one batched SDPA call.

Legend: B batch, T time, HQ query heads, H KV heads, G group size HQ // H, D head dim,
C queries per chunk, K keys per chunk tile (C + window - 1), N batch × query chunks,
R query rows per KV head and chunk (C·G, the group folded into the rows).

Layout of the computation:
- head: queries 0 .. window-1 cannot reach past position 0, so for them the window is plain
  causal attention; one causal SDPA call over the first ``window`` tokens handles them.
- body: the remaining queries are cut into chunks of C. Chunk n's queries sit at positions
  window + n·C + i and need keys window + n·C + i - window + 1 .. that position, so the whole
  chunk reads the contiguous key span 1 + n·C .. 1 + n·C + K - 1. Those spans are overlapping
  strided views of K/V (``unfold``), and in chunk-relative coordinates the window is one band
  mask [C, K] shared by every chunk, so all chunks go through a single SDPA call. No [T, T] mask
  or score matrix ever exists; scores live only inside SDPA's blocked kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Tuned with fp32 runs against dense SDPA on 2 CPU cores (T 8k-16k, windows 128-2048). A tile
# holds C + window - 1 keys for C queries, so smaller chunks compute fewer masked-out scores, but
# K and V are held (C + window - 1) / C times over (gathered when B > 1, and as tile-shaped
# gradients that SDPA's backward zero-fills before unfold folds them). Chunks of window / 8 were
# marginally faster forward, window / 4 marginally faster forward+backward at half the memory.
_MIN_CHUNK = 32
_WINDOW_FRACTION = 4


def _chunk_size(window: int) -> int:
    """Queries per chunk: a quarter of the window, at least 32 so small windows keep big matmuls."""
    return max(_MIN_CHUNK, window // _WINDOW_FRACTION)


def _band_mask(C: int, window: int, G: int, device: torch.device) -> torch.Tensor:
    """Chunk-relative window mask [C·G, C + window - 1]: row i (repeated G times) sees i .. i+w-1.

    Query i of a chunk is at tile position i + window - 1, so its keys (t - window, t] are the
    tile columns i .. i + window - 1. Rows are repeated per group member because the group is
    folded into the query rows in (chunk position, group member) order.
    """
    i_C1 = torch.arange(C, device=device)[:, None]
    j_1K = torch.arange(C + window - 1, device=device)[None, :]
    band_CK = (j_1K >= i_C1) & (j_1K < i_C1 + window)
    return band_CK.repeat_interleave(G, dim=0)


def sliding_window_attention_torch(
    q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor, window: int, scale: float
) -> torch.Tensor:
    """Sliding-window attention through SDPA on chunked queries; differentiable in q, k and v.

    Inputs are validated by the caller. The first ``window`` queries are causal attention; the
    rest are processed in chunks whose key tiles are strided views of K/V (gathered once when
    B > 1), with the query group folded into the query rows so that each KV head is read once
    per chunk rather than repeated per query head. Returns o_BTHD in q's dtype (SDPA
    accumulates bf16 in fp32).
    """
    B, T, HQ, D = q_BTHD.shape
    H = k_BTHD.shape[2]
    G = HQ // H
    head = min(window, T)
    head_BTHD = F.scaled_dot_product_attention(
        q_BTHD[:, :head].transpose(1, 2),
        k_BTHD[:, :head].transpose(1, 2),
        v_BTHD[:, :head].transpose(1, 2),
        is_causal=True,
        scale=scale,
        enable_gqa=True,
    ).transpose(1, 2)
    if head == T:
        return head_BTHD

    C = _chunk_size(window)
    K = C + window - 1
    T_body = T - head
    chunks = -(-T_body // C)
    # padding at the end only adds keys after every real query, so causality keeps them unseen
    pad = chunks * C - T_body
    q_body_BTHD = F.pad(q_BTHD[:, head:], (0, 0, 0, 0, 0, pad))
    k_span_BTHD = F.pad(k_BTHD[:, 1:], (0, 0, 0, 0, 0, pad))
    v_span_BTHD = F.pad(v_BTHD[:, 1:], (0, 0, 0, 0, 0, pad))

    # unfold gives [B, chunks, H, D, K]; with B == 1 the reshape stays a view, else one gather
    k_NHKD = k_span_BTHD.unfold(1, K, C).transpose(-1, -2).reshape(B * chunks, H, K, D)
    v_NHKD = v_span_BTHD.unfold(1, K, C).transpose(-1, -2).reshape(B * chunks, H, K, D)
    q_NHRD = (
        q_body_BTHD.reshape(B, chunks, C, H, G, D).transpose(2, 3).reshape(B * chunks, H, C * G, D)
    )
    o_NHRD = F.scaled_dot_product_attention(
        q_NHRD, k_NHKD, v_NHKD, attn_mask=_band_mask(C, window, G, q_BTHD.device), scale=scale
    )
    body_BTHD = o_NHRD.reshape(B, chunks, H, C, G, D).transpose(2, 3).reshape(B, chunks * C, HQ, D)
    return torch.cat([head_BTHD, body_BTHD[:, :T_body]], dim=1)
