"""Dense causal attention: the baseline every sparse mechanism is measured against.

Uses ``F.scaled_dot_product_attention`` (flash-style on CPU and GPU) with native GQA, so K/V are
never repeated per query head. Legend: B batch, T time, S cached length, HQ query heads,
H KV heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Cost, KVCache, MechanismParams, QKVAttention, decode_mask


@dataclass
class DenseParams(MechanismParams):
    """Dense attention has no knobs."""


class DenseAttention(QKVAttention):
    """Full causal softmax attention (GQA-aware, SDPA)."""

    name = "dense"
    Params = DenseParams

    def attend(
        self, q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor
    ) -> torch.Tensor:
        """Causal SDPA over all keys; density is 1 by definition."""
        self.stats = {"density": torch.tensor(1.0)}
        return self.sdpa(q_BTHD, k_BTHD, v_BTHD, is_causal=True)

    def decode(self, q_BTHD: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """New queries against every cached key (causal among the new tokens)."""
        T = q_BTHD.shape[1]
        cache.rows_read = cache.length
        mask = decode_mask(T, 0, cache.length)
        return self.sdpa(q_BTHD, cache.keys(), cache.values(), mask=mask)

    def cost(self, t: int) -> Cost:
        """A query at context t reads all t keys."""
        return Cost(keys=float(t), flops=self.attention_flops(t))
