"""Sliding-window attention: each query attends exactly the last ``window`` keys (itself included).

The project's one window definition lives in ``sparsezoo.kernels.window``: query t sees keys
(t - window, t]. It is the must-fail control for long-range retrieval and NSA's local branch.
Legend: B batch, T time, S cached length, HQ query heads, H KV heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sparsezoo.kernels.window import sliding_window_attention, window_density

from .base import Cost, KVCache, MechanismParams, QKVAttention, decode_mask, knob


@dataclass
class SlidingWindowParams(MechanismParams):
    """Knobs of sliding-window attention."""

    window: int = knob(
        512, help="keys per query, the query itself included: (t - w, t]", low=1, phase=True
    )
    backend: str = knob("auto", help="kernel backend", choices=("auto", "torch", "naive", "triton"))


class SlidingWindowAttention(QKVAttention):
    """Causal local attention over a fixed window of the most recent keys."""

    name = "sliding_window"
    Params = SlidingWindowParams
    # a 32-key window is genuinely sparse at the conformance suite's few-hundred-token lengths
    test_preset: ClassVar[dict[str, Any]] = {"window": 32}

    @classmethod
    def dense_limit(cls, seq_len: int) -> dict[str, Any]:
        """A window covering the whole sequence is dense attention."""
        return {"window": seq_len}

    def attend(
        self, q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor
    ) -> torch.Tensor:
        """Windowed causal attention through the window kernel; density is exact (analytic)."""
        p = self.params
        self.stats = {"density": torch.tensor(window_density(q_BTHD.shape[1], p.window))}
        return sliding_window_attention(
            q_BTHD, k_BTHD, v_BTHD, p.window, scale=self.scale, backend=p.backend
        )

    def decode(self, q_BTHD: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """New queries read only the cached rows inside their windows."""
        T, w = q_BTHD.shape[1], self.params.window
        start = max(0, cache.length - T - w + 1)
        cache.rows_read = cache.length - start
        mask = decode_mask(T, start, cache.length, window=w)
        return self.sdpa(q_BTHD, cache.keys(start), cache.values(start), mask=mask)

    def cost(self, t: int) -> Cost:
        """A query at context t reads min(t, window) keys."""
        keys = float(min(t, self.params.window))
        return Cost(keys=keys, flops=self.attention_flops(keys))
