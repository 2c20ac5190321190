"""Rotary position embedding (RoPE), non-interleaved ("rotate half", Llama convention).

Legend: B batch, T time, H heads, D head dim (even).
"""

from __future__ import annotations

import torch


def rope_angles(
    positions_T: torch.Tensor, head_dim: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (cos_TD, sin_TD) for integer positions, fp32, duplicated over both halves.

    Angles are computed on the fly in fp32 from the positions rather than read from a fixed table,
    so decoding and length extrapolation past the training length need no special case.
    """
    if head_dim % 2:
        raise ValueError(f"rope: head_dim must be even, got {head_dim}")
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=positions_T.device, dtype=torch.float32) / head_dim
    )
    freqs_TD2 = positions_T.to(torch.float32)[:, None] * inv_freq[None, :]
    ang_TD = torch.cat([freqs_TD2, freqs_TD2], dim=-1)
    return ang_TD.cos(), ang_TD.sin()


def apply_rope(x_BTHD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """Rotate the last dimension of ``x_BTHD`` by the given angles (computed in fp32).

    The rotation is done in fp32 and cast back so bf16 activations keep their positional
    precision at long context.
    """
    half = x_BTHD.shape[-1] // 2
    xf = x_BTHD.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos_TD[None, :, None, :], sin_TD[None, :, None, :]
    return (xf * cos + rotated * sin).to(x_BTHD.dtype)
