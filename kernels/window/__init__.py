"""Causal sliding-window attention (``sparsezoo.kernels.window``).

The project's one window definition: query t attends the keys in (t - window, t], i.e. exactly
``window`` keys including itself, fewer near the start of the sequence. Backends: ``naive`` (the
explicit-mask fp32 oracle), ``torch`` (chunked aten flash calls, the fast CPU path) and
``triton`` (GPU kernels; testable on CPU under TRITON_INTERPRET=1), chosen through
``resolve_backend``.
Legend: B batch, T time, HQ query heads, H KV heads (HQ % H == 0), D head dim.
"""

from __future__ import annotations

import numbers

import torch

from ..backend import check_attention_shapes, resolve_backend
from .naive import sliding_window_attention_naive
from .torch_impl import sliding_window_attention_torch

__all__ = ["sliding_window_attention", "window_density"]

_OP = "sliding_window_attention"
_AVAILABLE = ("naive", "torch", "triton")


def _validate(
    q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor, window: int
) -> None:
    """Raise ValueError naming the offending argument when the inputs do not fit the op."""
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"{_OP}: window must be an int >= 1, got {window!r}")
    check_attention_shapes(_OP, q_BTHD, k_BTHD, v_BTHD)
    if not (q_BTHD.dtype == k_BTHD.dtype == v_BTHD.dtype):
        raise ValueError(
            f"{_OP}: q, k, v dtypes differ: {q_BTHD.dtype}, {k_BTHD.dtype}, {v_BTHD.dtype}"
        )
    if not (q_BTHD.device == k_BTHD.device == v_BTHD.device):
        raise ValueError(
            f"{_OP}: q, k, v devices differ: {q_BTHD.device}, {k_BTHD.device}, {v_BTHD.device}"
        )


def sliding_window_attention(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    window: int,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal sliding-window attention: query t attends keys (t - window, t]; returns o_BTHD.

    q_BTHD is [B, T, HQ, D], k_BTHD and v_BTHD are [B, T, H, D] with HQ a multiple of H; query head
    h reads KV head h // (HQ // H), the grouping of ``repeat_interleave`` and SDPA's enable_gqa.
    ``scale`` defaults to D**-0.5. fp32 and bf16 are supported (bf16 accumulates in fp32); the
    output has q's dtype. ``backend`` is ``naive``, ``torch``, ``triton`` or ``auto`` (triton on
    CUDA, torch elsewhere; triton on CPU tensors only under TRITON_INTERPRET=1, in fp32). Raises
    ValueError naming the argument for a bad window, mismatched shapes, dtypes or devices, or a
    backend that is unknown or unavailable.
    """
    _validate(q_BTHD, k_BTHD, v_BTHD, window)
    window = int(window)
    chosen = resolve_backend(_OP, backend, _AVAILABLE, q_BTHD)
    scale = q_BTHD.shape[-1] ** -0.5 if scale is None else float(scale)
    if chosen == "naive":
        return sliding_window_attention_naive(q_BTHD, k_BTHD, v_BTHD, window, scale)
    if chosen == "torch":
        return sliding_window_attention_torch(q_BTHD, k_BTHD, v_BTHD, window, scale)
    # imported on first use: it needs triton, and TRITON_INTERPRET is read when it is imported
    from .triton_impl import sliding_window_attention_triton

    return sliding_window_attention_triton(q_BTHD, k_BTHD, v_BTHD, window, scale)


def window_density(T: int, window: int) -> float:
    """Fraction of the causal query-key pairs of a length-T sequence that the window attends.

    Equals (sum over t < T of min(window, t + 1)) / (sum over t < T of (t + 1)), computed in closed
    form; mechanisms report it as ``attn/density``. Raises ValueError unless T >= 1 and
    window >= 1.
    """
    if T < 1:
        raise ValueError(f"window_density: T must be >= 1, got {T}")
    if window < 1:
        raise ValueError(f"window_density: window must be >= 1, got {window}")
    causal_pairs = T * (T + 1) // 2
    if window >= T:
        return 1.0
    # the first `window` queries see t + 1 keys each, every later query sees exactly `window`
    attended = window * (window + 1) // 2 + (T - window) * window
    return attended / causal_pairs
