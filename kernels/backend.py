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
