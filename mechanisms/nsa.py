"""NSA — Native Sparse Attention (Yuan et al., 2025), paper-faithful.

Three branches over the context, mixed per query head by a learned sigmoid gate (Eq. 5):
- compression: blocks of l raw keys/values at stride d, summarised by a learnable MLP phi with an
  intra-block position encoding (separate phi for K and V); compressed token i is visible to
  query t iff i*d + l - 1 <= t. RoPE rule (the paper leaves it open): phi compresses the
  un-rotated keys, and compressed key i is then rotated at position i*d + l - 1, its last token.
- selection: the compression branch's probabilities, summed over the GQA group and mapped onto
  selection blocks of l' tokens by overlap (Eq. 9), pick n blocks per query and KV head — block 0
  and the two local blocks forced in — attended at full resolution (token-causal in the
  query's own block).
- sliding window: the project's one window, keys (t - w, t].
Each branch has its own keys and values by default (``kv_mode="independent"``, the paper) or
shares one K/V projection (``"shared"``, as most public implementations do).

Legend: B batch, T time (new tokens), S cached length, C d_model, HQ query heads, H KV heads,
G = HQ // H, D head dim, N compressed tokens, J selection blocks, K selected slots (n).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from sparsezoo.kernels.nsa import (
    block_importance,
    compress_kv,
    compressed_select,
    selected_attention,
    sliding_window_attention,
    topn_blocks,
)
from sparsezoo.kernels.rope import apply_rope

from .base import (
    AttentionMechanism,
    AttentionShape,
    Cost,
    KVCache,
    MechanismConfigError,
    MechanismParams,
    causal_pairs,
    decode_mask,
    knob,
)

BRANCHES = ("cmp", "slc", "win")


@dataclass
class NSAParams(MechanismParams):
    """NSA knobs; defaults are the paper's (l=32, d=16, l'=64, n=16, w=512)."""

    block_size: int = knob(32, help="compression block length l", low=1)
    stride: int = knob(16, help="compression stride d (l and l' must be multiples of d)", low=1)
    select_size: int = knob(64, help="selection block length l' (>= l)", low=1)
    n_select: int = knob(16, help="selected blocks n, counting 1 initial + 2 local forced", low=3)
    window: int = knob(512, help="sliding window w: query t sees keys (t - w, t]", low=1)
    kv_mode: str = knob(
        "independent",
        help="K/V per branch (paper) or one shared K/V",
        choices=("independent", "shared"),
    )
    compress_hidden: int = knob(64, help="hidden width of the compression MLP phi", low=1)
    gate_hidden: int = knob(64, help="hidden width of the gate MLP", low=1)
    backend: str = knob("auto", help="kernel backend", choices=("auto", "torch", "naive", "triton"))

    def validate(self, shape: AttentionShape) -> None:
        """Ranges, then NSA's block rules: d | l, d | l', l <= l'."""
        super().validate(shape)
        if self.block_size % self.stride:
            raise MechanismConfigError(
                f"block_size={self.block_size} must be a multiple of stride={self.stride}"
            )
        if self.select_size % self.stride:
            raise MechanismConfigError(
                f"select_size={self.select_size} must be a multiple of stride={self.stride}"
            )
        if self.block_size > self.select_size:
            raise MechanismConfigError(
                f"block_size={self.block_size} must be <= select_size={self.select_size}"
            )


class NSACache(KVCache):
    """Decode cache: raw selection K/V (the base buffers), window K/V, un-rotated compression
    K/V, and the compressed tokens, one appended every ``stride`` steps (never recomputed)."""

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        params: NSAParams,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(batch_size, max_len, n_kv_heads, head_dim, dtype=dtype, device=device)
        shape = (batch_size, max_len, n_kv_heads, head_dim)
        independent = params.kv_mode == "independent"
        self.win_k_BSHD = torch.zeros(shape, dtype=dtype, device=device) if independent else None
        self.win_v_BSHD = torch.zeros(shape, dtype=dtype, device=device) if independent else None
        self.raw_k_BSHD = torch.zeros(shape, dtype=dtype, device=device)
        self.raw_v_BSHD = torch.zeros(shape, dtype=dtype, device=device)
        n_cmp = max(0, (max_len - params.block_size) // params.stride + 1)
        # head-major, so that one head's compressed tokens are contiguous and a decode step's
        # scores are one batched matmul over the cache as it lies (no copy of N rows per step)
        cmp_shape = (batch_size, n_kv_heads, n_cmp, head_dim)
        self.kcmp_BHND = torch.zeros(cmp_shape, dtype=dtype, device=device)
        self.vcmp_BHND = torch.zeros(cmp_shape, dtype=dtype, device=device)
        self.n_cmp = 0


def _linear_init(module: nn.Linear) -> nn.Linear:
    nn.init.normal_(module.weight, std=module.in_features**-0.5)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


class Compressor(nn.Module):
    """phi: MLP over a flattened block of l keys (or values) plus an intra-block position code."""

    def __init__(self, block_size: int, head_dim: int, hidden: int) -> None:
        super().__init__()
        self.pos_LD = nn.Parameter(torch.randn(block_size, head_dim) * 0.02)
        self.w1_IF = nn.Parameter(
            torch.randn(block_size * head_dim, hidden) * (block_size * head_dim) ** -0.5
        )
        self.b1_F = nn.Parameter(torch.zeros(hidden))
        self.w2_FD = nn.Parameter(torch.randn(hidden, head_dim) * hidden**-0.5)
        self.b2_D = nn.Parameter(torch.zeros(head_dim))

    def forward(self, x_BTHD: torch.Tensor, stride: int, backend: str) -> torch.Tensor:
        """Compressed tokens [B, N, H, D] of every complete block of ``x_BTHD``."""
        return compress_kv(
            x_BTHD,
            self.pos_LD,
            self.w1_IF,
            self.b1_F,
            self.w2_FD,
            self.b2_D,
            self.pos_LD.shape[0],
            stride,
            backend=backend,
        )


class NativeSparseAttention(AttentionMechanism):
    """NSA: gated compression + top-n block selection + sliding window, trained sparse."""

    name = "nsa"
    Params = NSAParams
    branches = 3
    # small blocks make a few hundred tokens genuinely sparse: a query at t reads about
    # t/8 compressed + 4*16 selected + 16 window keys (density ~0.65 at T=301)
    test_preset: ClassVar[dict[str, Any]] = {
        "block_size": 16,
        "stride": 8,
        "select_size": 16,
        "n_select": 4,
        "window": 16,
    }

    def __init__(self, shape: AttentionShape, params: NSAParams | None = None) -> None:
        super().__init__(shape, params)
        p: NSAParams = self.params
        hq, h, d = shape.n_heads, shape.n_kv_heads, shape.head_dim
        n_kv_sets = 3 if p.kv_mode == "independent" else 1
        self.wq = nn.Linear(shape.d_model, hq * d, bias=False)
        # one fused projection for every branch's keys and values: (cmp, slc, win) x (k, v)
        self.wkv = nn.Linear(shape.d_model, n_kv_sets * 2 * h * d, bias=False)
        self.wo = nn.Linear(hq * d, shape.d_model, bias=False)
        self.compress_k = Compressor(p.block_size, d, p.compress_hidden)
        self.compress_v = Compressor(p.block_size, d, p.compress_hidden)
        self.gate = nn.Sequential(
            _linear_init(nn.Linear(shape.d_model, p.gate_hidden)),
            nn.SiLU(),
            nn.Linear(p.gate_hidden, 3 * hq),
        )
        # small last layer and zero bias: every gate starts near sigmoid(0) = 0.5 so all branches
        # contribute from step 0, while the first layer still gets gradient (a zero last layer
        # would block it)
        nn.init.normal_(self.gate[2].weight, std=0.02 * p.gate_hidden**-0.5)
        nn.init.zeros_(self.gate[2].bias)

    # ----- projections -------------------------------------------------------------------

    def _project(
        self, x_BTC: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Queries (RoPE'd), per-branch K/V and gates [B, T, HQ, 3] for tokens at ``start``."""
        B, T, _ = x_BTC.shape
        s = self.shape
        # one angle table for q and the rotated keys; the fresh q is rotated in place
        cos_TD, sin_TD = self.rope_tables(start, T, x_BTC.device)
        q_BTHD = self.wq(x_BTC).view(B, T, s.n_heads, s.head_dim)
        q_BTHD = apply_rope(q_BTHD, cos_TD, sin_TD, in_place=True)
        # unbind (not slicing) so backward stacks the branch gradients in one allocation
        kv_sets = [
            kv.unbind(2)
            for kv in self.wkv(x_BTC).view(B, T, -1, 2, s.n_kv_heads, s.head_dim).unbind(2)
        ]
        if self.params.kv_mode == "independent":
            (raw_k, raw_v), (slc_k, slc_v), (win_k, win_v) = kv_sets
            slc_k, win_k = (apply_rope(k, cos_TD, sin_TD) for k in (slc_k, win_k))
        else:
            ((raw_k, raw_v),) = kv_sets
            slc_k = win_k = apply_rope(raw_k, cos_TD, sin_TD)
            slc_v = win_v = raw_v
        branch_kv = {
            "raw_k": raw_k, "raw_v": raw_v, "slc_k": slc_k, "slc_v": slc_v,
            "win_k": win_k, "win_v": win_v,
        }  # fmt: skip
        gates_BTH3 = torch.sigmoid(self.gate(x_BTC)).view(B, T, s.n_heads, 3)
        return q_BTHD, branch_kv, gates_BTH3

    def _compress(
        self, raw_k_BTHD: torch.Tensor, raw_v_BTHD: torch.Tensor, first: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed K (rotated at each block's last position) and V; ``first`` is the index
        of the first compressed token the raw slice starts at."""
        p = self.params
        kcmp_BNHD = self.compress_k(raw_k_BTHD, p.stride, p.backend)
        vcmp_BNHD = self.compress_v(raw_v_BTHD, p.stride, p.backend)
        idx = torch.arange(first, first + kcmp_BNHD.shape[1], device=raw_k_BTHD.device)
        return self.rope_at(kcmp_BNHD, idx * p.stride + p.block_size - 1), vcmp_BNHD

    # ----- forward / decode --------------------------------------------------------------

    def forward(self, x_BTC: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Gated sum of the three branches (Eq. 5); with a cache, sparse decoding."""
        B, T, _ = x_BTC.shape
        if cache is None:
            q_BTHD, kv, gates_BTH3 = self._project(x_BTC, 0)
            o_BTHD = self._mix(self._prefill(q_BTHD, kv), gates_BTH3)
        else:
            o_BTHD = self.decode_reader(x_BTC, cache)()
        return self.wo(o_BTHD.reshape(B, T, -1))

    def decode_reader(self, x_BTC: torch.Tensor, cache: KVCache) -> Callable[[], torch.Tensor]:
        """Project the new tokens and append them (emitting the compressed tokens they
        complete); the returned function runs the three branches over the cache and mixes them."""
        assert isinstance(cache, NSACache)
        q_BTHD, kv, gates_BTH3 = self._project(x_BTC, cache.length)
        self._append(cache, kv)
        return lambda: self._mix(self._decode(q_BTHD, cache), gates_BTH3)

    def _mix(self, outs: tuple[torch.Tensor, ...], gates_BTH3: torch.Tensor) -> torch.Tensor:
        """Eq. 5: the gate-weighted sum of the branch outputs; records each branch's mean gate."""
        # gate-major contiguous copy, then one multiply and in-place multiply-adds: the
        # broadcast products of strided gate views plus ``sum`` took 0.2-0.7 s at T = 32k
        # (fresh full-size temporaries per term) against 0.05 s for this
        gates_3BTH1 = gates_BTH3.permute(3, 0, 1, 2).contiguous()[..., None]
        o_BTHD = outs[0] * gates_3BTH1[0]
        for gate_BTH1, o in zip(gates_3BTH1[1:], outs[1:], strict=True):
            o_BTHD.addcmul_(o, gate_BTH1)
        g = gates_BTH3.detach().float().mean(dim=(0, 1, 2))
        self.stats.update({f"gate_{b}": g[i] for i, b in enumerate(BRANCHES)})
        return o_BTHD

    def _prefill(
        self, q_BTHD: torch.Tensor, kv: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = self.params
        T = q_BTHD.shape[1]
        kcmp_BNHD, vcmp_BNHD = self._compress(kv["raw_k"], kv["raw_v"], 0)
        # one score pass serves the compression output and the block selection (Eq. 8-11)
        o_cmp, _, idx_BTHK = compressed_select(
            q_BTHD,
            kcmp_BNHD,
            vcmp_BNHD,
            block_size=p.block_size,
            stride=p.stride,
            select_size=p.select_size,
            n_select=p.n_select,
            scale=self.scale,
            backend=p.backend,
        )
        o_slc = selected_attention(
            q_BTHD, kv["slc_k"], kv["slc_v"], idx_BTHK, p.select_size, scale=self.scale,
            backend=p.backend,
        )  # fmt: skip
        o_win = sliding_window_attention(
            q_BTHD, kv["win_k"], kv["win_v"], p.window, scale=self.scale, backend=p.backend
        )
        self._selection_stats(idx_BTHK, torch.arange(T, device=q_BTHD.device))
        return o_cmp, o_slc, o_win

    def _selection_stats(self, idx_BTHK: torch.Tensor, pos_T: torch.Tensor) -> None:
        """Measured density (keys read over causal keys) and the forced share of selections."""
        p = self.params
        with torch.no_grad():
            t_1T11 = pos_T.view(1, -1, 1, 1)
            valid = idx_BTHK >= 0
            # keys read in a selected block: all l' of a past block, up to t in the own block
            sel_keys = (t_1T11 - idx_BTHK * p.select_size + 1).clamp(0, p.select_size) * valid
            own = t_1T11 // p.select_size
            forced = valid & ((idx_BTHK == 0) | (idx_BTHK == own) | (idx_BTHK == own - 1))
            pos = pos_T.double()
            # compressed token i is visible iff i*d + l - 1 <= t
            n_cmp = (torch.div(pos - p.block_size + 1, p.stride, rounding_mode="floor") + 1).clamp(
                min=0
            )
            n_win = (pos + 1).clamp(max=p.window)
            per_query = n_cmp + n_win + sel_keys.double().sum(-1).mean(dim=(0, 2))
            total = causal_pairs(int(pos_T[-1]) + 1) - causal_pairs(int(pos_T[0]))
            self.stats = {
                "density": (per_query.sum() / total).clamp(max=1.0).float(),
                "forced_frac": (forced.sum() / valid.sum().clamp(min=1)).float(),
            }

    def _append(self, cache: NSACache, kv: dict[str, torch.Tensor]) -> None:
        """Append new tokens' K/V to every buffer and emit the compressed tokens they complete."""
        p = self.params
        start = cache.length
        T = kv["slc_k"].shape[1]
        cache.append(kv["slc_k"], kv["slc_v"])
        end = start + T
        if cache.win_k_BSHD is not None:
            cache.win_k_BSHD[:, start:end] = kv["win_k"]
            cache.win_v_BSHD[:, start:end] = kv["win_v"]
        cache.raw_k_BSHD[:, start:end] = kv["raw_k"]
        cache.raw_v_BSHD[:, start:end] = kv["raw_v"]
        n_total = max(0, (end - p.block_size) // p.stride + 1)
        if n_total > cache.n_cmp:
            lo = cache.n_cmp * p.stride
            hi = (n_total - 1) * p.stride + p.block_size
            kcmp, vcmp = self._compress(
                cache.raw_k_BSHD[:, lo:hi], cache.raw_v_BSHD[:, lo:hi], cache.n_cmp
            )
            cache.kcmp_BHND[:, :, cache.n_cmp : n_total] = kcmp.transpose(1, 2)
            cache.vcmp_BHND[:, :, cache.n_cmp : n_total] = vcmp.transpose(1, 2)
            cache.n_cmp = n_total

    def _decode(
        self, q_BTHD: torch.Tensor, cache: NSACache
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Branch outputs of the newest queries, reading only the rows NSA needs.

        Scores run head-major, rows R = (new token, query head of the group), so each branch is
        a batched matmul over (batch, KV head). Selection maps the group-summed compression
        probabilities onto blocks by the banded Eq. 9 (``block_importance``), and the rows read
        are counted per block from the newest query that chose it.
        """
        p = self.params
        B, T, HQ, D = q_BTHD.shape
        H, G = self.shape.n_kv_heads, self.shape.group_size
        device = q_BTHD.device
        pos_T = torch.arange(cache.length - T, cache.length, device=device)
        q_BHRD = q_BTHD.float().view(B, T, H, G, D).transpose(1, 2).reshape(B, H, T * G, D)

        # compression branch over the visible compressed tokens
        N = cache.n_cmp
        s_BHTGN = (q_BHRD @ cache.kcmp_BHND[:, :, :N].float().mT).view(B, H, T, G, N)
        vis_TN = torch.arange(N, device=device) * p.stride + p.block_size - 1 <= pos_T[:, None]
        s_BHTGN = s_BHTGN.mul_(self.scale).masked_fill_(~vis_TN[:, None], float("-inf"))
        probs_BHTGN = torch.softmax(s_BHTGN, dim=-1).nan_to_num_(0.0)
        o_cmp_BHRD = probs_BHTGN.view(B, H, T * G, N) @ cache.vcmp_BHND[:, :, :N].float()

        # selection: group-summed probabilities -> blocks (Eq. 9) -> forced + top-n
        J = math.ceil(cache.length / p.select_size)
        importance_BHTJ = block_importance(
            probs_BHTGN.sum(3), J, p.block_size, p.stride, p.select_size
        )
        idx_BTHK = topn_blocks(importance_BHTJ.transpose(1, 2), pos_T, p.select_size, p.n_select)
        keys_BTHKL = idx_BTHK[..., None] * p.select_size + torch.arange(
            p.select_size, device=device
        )
        ok_BTHKL = (idx_BTHK[..., None] >= 0) & (keys_BTHKL <= pos_T.view(1, T, 1, 1, 1))
        # masked slots and the own block's future rows are clamped into range, never attended
        rows_BTHR = keys_BTHKL.clamp(0, cache.length - 1).flatten(3)
        # flat row ids (b·S + row)·H + h: one index_select per tensor, far cheaper on CPU than
        # advanced indexing with three broadcast index tensors
        S = cache.k_BSHD.shape[1]
        b_B111 = torch.arange(B, device=device).view(B, 1, 1, 1)
        h_11H1 = torch.arange(H, device=device).view(1, 1, H, 1)
        flat_X = ((b_B111 * S + rows_BTHR) * H + h_11H1).flatten()
        k_sel = cache.k_BSHD.view(-1, D).index_select(0, flat_X).view(*rows_BTHR.shape, D).float()
        v_sel = cache.v_BSHD.view(-1, D).index_select(0, flat_X).view(*rows_BTHR.shape, D).float()
        qf_BTHGD = q_BTHD.float().view(B, T, H, G, D)
        s_sel = torch.einsum("bthgd,bthrd->bthgr", qf_BTHGD, k_sel) * self.scale
        s_sel = s_sel.masked_fill(~ok_BTHKL.flatten(3)[:, :, :, None, :], float("-inf"))
        o_slc = torch.einsum("bthgr,bthrd->bthgd", torch.softmax(s_sel, -1).nan_to_num(0.0), v_sel)

        # sliding window: the window branch's keys, through the project's one window rule
        w_lo = max(0, cache.length - T - p.window + 1)
        win_k = cache.k_BSHD if cache.win_k_BSHD is None else cache.win_k_BSHD
        win_v = cache.v_BSHD if cache.win_v_BSHD is None else cache.win_v_BSHD
        mask = decode_mask(T, w_lo, cache.length, window=p.window)
        o_win = self.sdpa(
            q_BTHD.float(),
            win_k[:, w_lo : cache.length].float(),
            win_v[:, w_lo : cache.length].float(),
            mask=mask,
        )

        cache.rows_read = N + self._selected_rows(idx_BTHK, pos_T) + (cache.length - w_lo)
        self._selection_stats(idx_BTHK, pos_T)
        o_cmp = o_cmp_BHRD.view(B, H, T, G, D).transpose(1, 2)
        return tuple(o.reshape(B, T, HQ, D).to(q_BTHD.dtype) for o in (o_cmp, o_slc, o_win))

    def _selected_rows(self, idx_BTHK: torch.Tensor, pos_T: torch.Tensor) -> int:
        """Raw rows the selection branch reads per (batch, KV head), at most over both.

        A block's rows are shared by the new queries that chose it, up to the newest of them
        (only a query's own block is partial), so block j costs min(l', t_j - j·l' + 1) rows,
        t_j the newest query choosing it; blocks nobody chose cost nothing.
        """
        B, T, H, K = idx_BTHK.shape
        J = int(pos_T[-1]) // self.params.select_size + 1
        t_BTHK = pos_T.view(1, T, 1, 1).expand(B, T, H, K)
        # unused slots (-1) go to an extra column J that is dropped
        slot_BHX = idx_BTHK.masked_fill(idx_BTHK < 0, J).transpose(1, 2).reshape(B, H, T * K)
        newest_BHJ = torch.full((B, H, J + 1), -1, dtype=torch.int64, device=idx_BTHK.device)
        newest_BHJ.scatter_reduce_(2, slot_BHX, t_BTHK.transpose(1, 2).reshape(B, H, -1), "amax")
        start_J = torch.arange(J, device=idx_BTHK.device) * self.params.select_size
        rows_BHJ = (newest_BHJ[..., :J] - start_J + 1).clamp(0, self.params.select_size)
        return int(rows_BHJ.sum(-1).max())

    # ----- cache and cost ----------------------------------------------------------------

    def new_cache(
        self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None
    ) -> NSACache:
        """Empty NSA decode cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
        w = self.wkv.weight
        return NSACache(
            batch_size,
            max_len,
            self.shape.n_kv_heads,
            self.shape.head_dim,
            self.params,
            dtype=dtype or w.dtype,
            device=w.device,
        )

    @torch.no_grad()
    def fill_cache(self, x_BTC: torch.Tensor, cache: KVCache) -> None:
        """Append tokens (all buffers and compressed tokens) without computing outputs."""
        assert isinstance(cache, NSACache)
        _, kv, _ = self._project(x_BTC, cache.length)
        self._append(cache, kv)

    def cost(self, t: int) -> Cost:
        """Keys read by a query at context t: compressed + selected + window (NSA Table 4)."""
        p = self.params
        n_cmp = (t - p.block_size) // p.stride + 1 if t >= p.block_size else 0
        n_blocks = (t - 1) // p.select_size + 1
        if n_blocks <= p.n_select:
            n_sel = t
        else:
            n_sel = (p.n_select - 1) * p.select_size + (t - 1) % p.select_size + 1
        keys = float(n_cmp + n_sel + min(p.window, t))
        return Cost(keys=keys, flops=self.attention_flops(keys))
