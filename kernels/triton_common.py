"""Helpers shared by the Triton kernels: tile pointers, tile sizes, dot precision, device check.

Importing this module needs triton. TRITON_INTERPRET=1 must be set before the first import of
any Triton kernel module to run the kernels on CPU (numpy interpreter, fp32 only).
Legend: B batch, T time, H heads, D head dim, P padded head dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def tile_ptrs(ptr, b, h, offs_t, offs_d, s_b, s_t, s_h, s_d):
    """Pointers [rows, P] to rows offs_t of (batch b, head h) in a [B, T, H, D] tensor (int64)."""
    return ptr + b * s_b + h * s_h + offs_t.to(tl.int64)[:, None] * s_t + offs_d[None, :] * s_d


# jit returns an interpreter wrapper when TRITON_INTERPRET=1 was set before this import
INTERPRETED = isinstance(tile_ptrs, InterpretedFunction)


def pad16(n: int) -> int:
    """Tile size for n rows or columns: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products (as torch matmul by default), else tf32.

    Triton's default rounds fp32 operands to tf32 on NVIDIA GPUs, which would make the fp32 op
    disagree with the naive oracle at ~1e-3; bf16 operands are unaffected by the setting.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def require_cuda(op: str, x: torch.Tensor) -> None:
    """Refuse CPU tensors unless the kernels run under the interpreter (clear ValueError)."""
    if not x.is_cuda and not INTERPRETED:
        raise ValueError(
            f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import "
            f"to run on CPU), got device {x.device}"
        )
