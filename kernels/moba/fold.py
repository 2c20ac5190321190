"""MoBA through NSA's selected-attention op: the Triton backend and the torch path off CPU.

MoBA is selected attention whose selection is per query head: the own block (token-causal) plus
the routed past blocks, under one softmax. NSA's ``selected_attention`` shares one selection
per KV group, so each query head is made a group of its own: KV head h moves into the batch
(B·H rows), its G query heads become G "KV heads" that all read KV head h through a stride-0
``expand`` (no copy of K or V), and each gets its own index row [own block, routed blocks].
The op's token-causal mask inside the own block and its exact backward carry over unchanged.
The forward holds no per-query-head copy of K/V; the selection backward returns dk and dv per
expanded head (G times the size of k), which autograd sums back over the group. NSA's Triton
kernels load a whole block as one tile, so MoBA blocks longer than ``_TILE_KEYS`` (512 tokens
by default) go as runs of tiles: the forward kernel with a 512-key tile asks for 266,240 bytes
of shared memory in fp32 at D = 64, over an H100's 232,448, and 36,864 with 64-key tiles
(compiled ahead of time for sm_90 with this Triton, no GPU needed).
Legend: B batch, T time, HQ query heads, H KV heads, G group size HQ // H, D head dim, R routed
slots, S slots with the own block (R + 1), X folded batch B·H.
"""

from __future__ import annotations

import torch

from ..nsa.selection import selected_attention

__all__ = ["moba_attention_by_selection"]

# Longest block NSA's selection kernels take as one tile (NSA's own l' = 64).
_TILE_KEYS = 64


def _tile(block_size: int) -> int:
    """The longest tile of at most ``_TILE_KEYS`` keys that divides ``block_size``."""
    if block_size <= _TILE_KEYS:
        return block_size
    return max(d for d in range(1, _TILE_KEYS + 1) if block_size % d == 0)


def _as_tiles(idx_BTHS: torch.Tensor, block_size: int, tile: int) -> torch.Tensor:
    """Block ids as the ids of their tiles, [B, T, H, S·m] for m = block_size // tile; the
    tiles of the query's own block after its own tile are future, so -1 (NSA's op masks keys
    token by token only inside the query's own block, now its own tile)."""
    m = block_size // tile
    tiles_BTHSM = idx_BTHS[..., None] * m + torch.arange(m, device=idx_BTHS.device)
    own_tile_1T11 = (torch.arange(idx_BTHS.shape[1], device=idx_BTHS.device) // tile).view(
        1, -1, 1, 1, 1
    )
    unused = (idx_BTHS[..., None] < 0) | (tiles_BTHSM > own_tile_1T11)
    return tiles_BTHSM.masked_fill(unused, -1).flatten(-2)


def moba_attention_by_selection(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    block_indices_BTHR: torch.Tensor,
    block_size: int,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """MoBA attention by ``selected_attention(backend=backend)`` on the folded layout; o_BTHD.

    Inputs are validated by the caller. Differentiable in q, k, v; returns q's dtype.
    """
    B, T, HQ, D = q_BTHD.shape
    H = k_BTHD.shape[2]
    G = HQ // H
    own_BTH1 = (torch.arange(T, device=q_BTHD.device) // block_size).view(1, T, 1, 1)
    idx_BTHS = torch.cat([own_BTH1.expand(B, T, HQ, 1), block_indices_BTHR], dim=-1)
    S = idx_BTHS.shape[-1]
    q_XTGD = q_BTHD.reshape(B, T, H, G, D).permute(0, 2, 1, 3, 4).reshape(B * H, T, G, D)
    k_XTGD, v_XTGD = (
        x.permute(0, 2, 1, 3).reshape(B * H, T, 1, D).expand(B * H, T, G, D)
        for x in (k_BTHD, v_BTHD)
    )
    tile = _tile(block_size)
    if tile < block_size:
        idx_BTHS = _as_tiles(idx_BTHS, block_size, tile)
        S = idx_BTHS.shape[-1]
    idx_XTGS = idx_BTHS.view(B, T, H, G, S).permute(0, 2, 1, 3, 4).reshape(B * H, T, G, S)
    o_XTGD = selected_attention(
        q_XTGD, k_XTGD, v_XTGD, idx_XTGS, tile, scale=scale, backend=backend
    )
    return o_XTGD.view(B, H, T, G, D).permute(0, 2, 1, 3, 4).reshape(B, T, HQ, D)
