"""Backend selection shared by every kernel op.

Each op declares the backends it implements; callers pass ``backend`` as one of ``naive``,
``torch``, ``triton`` or ``auto``. ``auto`` resolves to ``triton`` for CUDA tensors when the op
has a Triton implementation and Triton imports, else to ``torch``. Asking for a backend an op
does not implement is an error that names the op and the backends it has.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

BACKENDS = ("naive", "torch", "triton", "auto")


@functools.cache
def triton_available() -> bool:
    """Return True when the ``triton`` package can be imported on this machine."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(op: str, backend: str, available: tuple[str, ...], x: torch.Tensor) -> str:
    """Resolve ``backend`` for op ``op`` given the backends it implements and an input tensor.

    ``x`` decides what ``auto`` means: CUDA tensors prefer Triton, everything else uses the fast
    torch path. Raises ValueError naming the op, the requested backend and the allowed ones.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if x.is_cuda and "triton" in available and triton_available():
            return "triton"
        return "torch" if "torch" in available else "naive"
    if backend not in available:
        raise ValueError(
            f"{op}: backend={backend!r} is not implemented; available: {', '.join(available)}"
        )
    if backend == "triton" and not triton_available():
        raise ValueError(f"{op}: backend='triton' requested but triton is not installed")
    return backend


def check_attention_shapes(
    op: str, q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor
) -> None:
    """Raise ValueError naming the argument unless q [B,T,HQ,D] and k, v [B,T,H,D] fit (GQA).

    Shared by the attention ops whose queries and keys cover the same T tokens; dtype and
    device rules stay with each op because they differ (e.g. integer index tensors).
    """
    if q_BTHD.dim() != 4 or k_BTHD.dim() != 4 or v_BTHD.dim() != 4:
        raise ValueError(
            f"{op}: q, k, v must be 4-d [B, T, H, D], got q {tuple(q_BTHD.shape)}, "
            f"k {tuple(k_BTHD.shape)}, v {tuple(v_BTHD.shape)}"
        )
    if k_BTHD.shape != v_BTHD.shape:
        raise ValueError(
            f"{op}: k and v shapes differ: k {tuple(k_BTHD.shape)}, v {tuple(v_BTHD.shape)}"
        )
    B, T, HQ, D = q_BTHD.shape
    Bk, Tk, H, Dk = k_BTHD.shape
    if (Bk, Tk, Dk) != (B, T, D):
        raise ValueError(
            f"{op}: q and k must agree on batch, time and head dim, got q {tuple(q_BTHD.shape)}, "
            f"k {tuple(k_BTHD.shape)}"
        )
    if T < 1 or D < 1 or H < 1 or HQ % H:
        raise ValueError(
            f"{op}: query heads HQ={HQ} must be a multiple of KV heads H={H} (GQA), "
            f"with T >= 1 and D >= 1"
        )


def oracle_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a ``naive`` oracle computes in for input ``x``: fp32, or fp64 for fp64 input.

    Oracles upcast half-precision inputs to fp32 so they are references for every dtype, and
    keep fp64 so a test can compare an fp32 kernel with a reference whose own rounding is
    negligible (then every difference is the kernel's).
    """
    return torch.promote_types(x.dtype, torch.float32)
