"""MoBA — Mixture of Block Attention (Lu et al., 2025), paper-faithful.

Keys are cut into blocks of B tokens. A parameter-free gate scores, per query token and query
head, every strictly-past complete block by q · mean(K[block]) (RoPE'd keys, fp32); the query
attends its own block (always, token-causal) plus the top k - 1 scoring blocks, under one
softmax computed as parts merged by log-sum-exp (``sparsezoo.kernels.moba``). The own block is
never a candidate, the partial tail block never competes, early queries with fewer than k - 1
past blocks attend what exists, and ties go to the lower block index. Routing is per query head,
so with GQA the heads of a group may read different blocks; K/V are never repeated per query
head. With B·k >= T every query attends every past key: dense attention (``dense_limit``).
Decoding is sparse (the official implementation falls back to dense here): the cache keeps each
block's mean key, computed once when the block completes, and a step reads the means, its own
block and its k - 1 routed blocks.
Legend: B batch, T time (new tokens), S cached length, HQ query heads, H KV heads, G = HQ // H,
D head dim, N block means, R routed slots k - 1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sparsezoo.kernels.moba import (
    block_means,
    moba_decode_attention,
    moba_routed_attention,
    own_block_start,
    route_blocks,
)

from .base import Cost, KVCache, MechanismParams, QKVAttention, causal_pairs, knob

# Block distances (own block index - routed block index, >= 1) are reported as the share of
# routed picks in log2 bins, each from its low edge to the next one's; the labels become
# attn/moba/dist_<label>.
DISTANCE_BINS = ((1, "1"), (2, "2_3"), (4, "4_7"), (8, "8_15"), (16, "16_up"))


@dataclass
class MoBAParams(MechanismParams):
    """MoBA knobs; defaults are the paper's scaling-law setting (B=512, k=3)."""

    block_size: int = knob(512, help="keys per block B (the tail block may be shorter)", low=1)
    top_k: int = knob(
        3, help="blocks per query k, counting the own block (k - 1 routed)", low=1, phase=True
    )
    backend: str = knob("auto", help="kernel backend", choices=("auto", "torch", "naive", "triton"))


class MoBACache(KVCache):
    """Decode cache: post-RoPE K/V plus the fp32 mean key of every complete block.

    A block's mean is computed once, by ``block_means`` (the function prefill uses), when its
    last token is appended; a partial block never has a mean.
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        block_size: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(batch_size, max_len, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.block_size = block_size
        n_blocks = max_len // block_size
        self.kmean_BNHD = torch.zeros(
            batch_size, n_blocks, n_kv_heads, head_dim, dtype=torch.float32, device=device
        )
        self.n_means = 0

    def _kv_buffers(
        self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S, H, D] views of head-major storage: a decode step reads each routed block of
        a KV head as one contiguous run (token-major, a head's rows lie H·D apart: at 64k
        tokens, 16 heads, the step's reads took ~3x longer)."""
        B, S, H, D = shape
        k_BHSD = torch.zeros(B, H, S, D, dtype=dtype, device=device)
        return k_BHSD.transpose(1, 2), torch.zeros_like(k_BHSD).transpose(1, 2)

    def append(self, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor) -> None:
        """Store the new tokens' K/V and the mean keys of the blocks they complete."""
        super().append(k_BTHD, v_BTHD)
        complete = self.length // self.block_size
        if complete > self.n_means:
            lo, hi = self.n_means * self.block_size, complete * self.block_size
            self.kmean_BNHD[:, self.n_means : complete] = block_means(
                self.k_BSHD[:, lo:hi], self.block_size
            )
            self.n_means = complete


class MixtureOfBlockAttention(QKVAttention):
    """MoBA: parameter-free top-k block routing per query head over Llama-style projections."""

    name = "moba"
    Params = MoBAParams
    # the gate reads one mean key per past block besides the attended keys (both <= t)
    branches = 2
    # 32-token blocks, k = 3: a query reads about 16 own + 64 routed keys, so T = 301 is
    # genuinely sparse (density 0.46) with up to 9 past blocks to route among. Smaller blocks
    # fail the suite's bf16 check by design: the gate at initialisation sees near-equal block
    # means, bf16 rounding of q and k flips near-tied picks, and each flip swaps a large share
    # of a query's keys (relative output change 5.8% at B = 16, 3.2% at B = 32, against 5%)
    test_preset: ClassVar[dict[str, Any]] = {"block_size": 32, "top_k": 3}

    @classmethod
    def dense_limit(cls, seq_len: int) -> dict[str, Any]:
        """Four blocks and k = 4 (B·k >= T): every past block is routed, so MoBA is dense.

        Small blocks rather than one block of T keys, so the limit runs the routed path.
        """
        block_size = -(-seq_len // 4)
        return {"block_size": block_size, "top_k": -(-seq_len // block_size)}

    def attend(
        self, q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor
    ) -> torch.Tensor:
        """Gate (no gradient), then own + routed block attention; sets the routing stats."""
        p = self.params
        with torch.no_grad():
            kmean_BNHD = block_means(k_BTHD, p.block_size)
            idx_BTHR, margin_BTH = route_blocks(q_BTHD, kmean_BNHD, p.block_size, p.top_k)
        o_BTHD = moba_routed_attention(
            q_BTHD, k_BTHD, v_BTHD, idx_BTHR, p.block_size, scale=self.scale, backend=p.backend
        )
        # reduced now, so the routing (8 MB at 32k tokens) is not held until stats are read:
        # it would sit on top of the backward's peak
        summary = self._routing_summary(idx_BTHR, margin_BTH, 0)
        self.defer_stats(functools.partial(self._routing_stats, summary, idx_BTHR.shape, 0))
        return o_BTHD

    def decode(self, q_BTHD: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The newest queries over cached block means, their own block and k - 1 routed blocks.

        rows_read counts, per KV head, the block means scored, the own-block rows and the rows
        of the routed blocks (their union over the group's query heads and the new tokens).
        """
        assert isinstance(cache, MoBACache)
        p = self.params
        T, S = q_BTHD.shape[1], cache.length
        n_past = (S - 1) // p.block_size
        idx_BTHR, margin_BTH = route_blocks(
            q_BTHD, cache.kmean_BNHD[:, :n_past], p.block_size, p.top_k, start=S - T
        )
        o_BTHD = moba_decode_attention(
            q_BTHD, cache.keys(), cache.values(), idx_BTHR, p.block_size, scale=self.scale
        )
        own_rows = S - own_block_start(S, T, p.block_size)
        cache.defer_rows_read(lambda: n_past + own_rows + self._routed_rows(idx_BTHR, n_past))
        self.defer_stats(
            lambda: self._routing_stats(
                self._routing_summary(idx_BTHR, margin_BTH, S - T), idx_BTHR.shape, S - T
            )
        )
        return o_BTHD

    def _routed_rows(self, idx_BTHR: torch.Tensor, n_past: int) -> int:
        """KV rows of the routed blocks: the most any (batch, KV head) reads, its group's union."""
        B, T = idx_BTHR.shape[:2]
        H = self.shape.n_kv_heads
        slot_BHX = (
            torch.where(idx_BTHR < 0, n_past, idx_BTHR)
            .view(B, T, H, -1)
            .transpose(1, 2)
            .reshape(B, H, -1)
        )
        routed_BHN = torch.zeros(B, H, n_past + 1, dtype=torch.bool, device=idx_BTHR.device)
        routed_BHN.scatter_(2, slot_BHX, True)
        return int(routed_BHN[..., :n_past].sum(-1).max()) * self.params.block_size

    def _routing_summary(
        self, idx_BTHR: torch.Tensor, margin_BTH: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The routing reduced to what the stats need: (picks per block distance, margin sum,
        count of finite margins). Distance 0 counts the unused slots."""
        with torch.no_grad():
            T = idx_BTHR.shape[1]
            own_1T11 = torch.arange(start, start + T, device=idx_BTHR.device).view(1, T, 1, 1)
            own_1T11 = own_1T11 // self.params.block_size
            distance_BTHR = own_1T11.sub(idx_BTHR).masked_fill_(idx_BTHR < 0, 0)
            per_distance = torch.bincount(distance_BTHR.view(-1)).double()
            finite_BTH = margin_BTH.isfinite()
            margin_sum = torch.where(finite_BTH, margin_BTH, 0.0).sum()
            return per_distance, margin_sum, finite_BTH.sum()

    def _routing_stats(
        self,
        summary: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        shape_BTHR: torch.Size,
        start: int,
    ) -> dict[str, torch.Tensor]:
        """Measured density, the gate margin and the block-distance histogram of the routing.

        density: attended (query, key) pairs over causal pairs, averaged over query heads.
        gate_margin: mean gap, in softmax-logit units (scaled q · mean key), between the
        weakest routed block and the strongest one left out, over queries that had to leave one
        out (0 when none did). dist_<bin>: share of routed picks at each block distance bin.
        ``summary`` is :meth:`_routing_summary` of the routing of shape ``shape_BTHR``.
        """
        p = self.params
        per_distance, margin_sum, n_finite = summary
        B, T, HQ, _ = shape_BTHR
        picks = per_distance[1:].sum()
        pos_T = torch.arange(start, start + T, device=per_distance.device)
        own_keys = (pos_T % p.block_size + 1).sum().double() * B * HQ
        total = (causal_pairs(start + T) - causal_pairs(start)) * B * HQ
        density = (own_keys + p.block_size * picks) / total
        stats = {"density": density.clamp(max=1.0).float()}
        stats["gate_margin"] = (margin_sum / n_finite.clamp(min=1) * self.scale).float()
        lows = [low for low, _ in DISTANCE_BINS]
        for (low, label), high in zip(DISTANCE_BINS, [*lows[1:], None], strict=True):
            stats[f"dist_{label}"] = (per_distance[low:high].sum() / picks.clamp(min=1)).float()
        return stats

    def new_cache(
        self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None
    ) -> MoBACache:
        """Empty MoBA decode cache (K/V and block means) for ``batch_size`` sequences."""
        w = self.wk.weight
        return MoBACache(
            batch_size,
            max_len,
            self.shape.n_kv_heads,
            self.shape.head_dim,
            self.params.block_size,
            dtype=dtype or w.dtype,
            device=w.device,
        )

    def cost(self, t: int) -> Cost:
        """A query at context t reads its own block's t - i·B keys (i = (t - 1) // B), the keys
        of min(i, k - 1) routed blocks, and i block means for the gate."""
        p = self.params
        i = (t - 1) // p.block_size
        attended = t - i * p.block_size + min(i, p.top_k - 1) * p.block_size
        flops = self.attention_flops(attended) + 2.0 * self.shape.head_dim * i
        return Cost(keys=float(attended + i), flops=flops)
