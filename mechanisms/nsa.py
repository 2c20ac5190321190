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
shares one K/V projection (``"shared"``, as most public implementations do). An option outside
the paper, ``compress_skip="mean"``, adds each block's mean to phi's output (see Compressor).

Legend: B batch, T time (new tokens), S cached length, C d_model, HQ query heads, H KV heads,
G = HQ // H, D head dim, N compressed tokens, J selection blocks, K selected slots (n).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparsezoo.kernels.cpu_workers import (
    even_ranges,
    run_workers,
    single_threaded_ops,
    worker_count,
)
from sparsezoo.kernels.nsa import (
    NSAKnobs,
    block_importance,
    compress_kv,
    gated_branches,
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
    n_select: int = knob(
        16, help="selected blocks n, counting 1 initial + 2 local forced", low=3, phase=True
    )
    window: int = knob(
        512, help="sliding window w: query t sees keys (t - w, t]", low=1, phase=True
    )
    kv_mode: str = knob(
        "independent",
        help="K/V per branch (paper) or one shared K/V",
        choices=("independent", "shared"),
    )
    compress_hidden: int = knob(64, help="hidden width of the compression MLP phi", low=1)
    compress_skip: str = knob(
        "none",
        help="phi alone (paper) or phi plus the block's mean, a pooled skip path",
        choices=("none", "mean"),
    )
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
        self.select_size = params.select_size
        super().__init__(batch_size, max_len, n_kv_heads, head_dim, dtype=dtype, device=device)
        shape = (batch_size, max_len, n_kv_heads, head_dim)
        self.win_k_BSHD = self.win_v_BSHD = None
        if params.kv_mode == "independent":
            # head-major like the selection K/V: a step reads a head's window as one run
            major = (batch_size, n_kv_heads, max_len, head_dim)
            self.win_k_BSHD = torch.zeros(major, dtype=dtype, device=device).transpose(1, 2)
            self.win_v_BSHD = torch.zeros(major, dtype=dtype, device=device).transpose(1, 2)
        self.raw_k_BSHD = torch.zeros(shape, dtype=dtype, device=device)
        self.raw_v_BSHD = torch.zeros(shape, dtype=dtype, device=device)
        n_cmp = max(0, (max_len - params.block_size) // params.stride + 1)
        # head-major, so that a decode step's scores and output are batched matmuls over the
        # cache as it lies (no copy of N rows per step); the keys also dimension-major, so
        # the scores are q @ K with K's rows contiguous: with Kᵀ a transposed view of [N, D]
        # rows that matmul ran ~1.4x slower (2 heads of 4095 x 128, one core, cold)
        self.kcmp_BHDN = torch.zeros(
            batch_size, n_kv_heads, head_dim, n_cmp, dtype=dtype, device=device
        )
        self.vcmp_BHND = torch.zeros(
            batch_size, n_kv_heads, n_cmp, head_dim, dtype=dtype, device=device
        )
        self.n_cmp = 0

    def _kv_buffers(
        self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S, H, D] views of head-major selection K/V storage (``k_BHSD``, ``v_BHSD``),
        padded to whole selection blocks: a step reads a selected block of a KV head as one
        contiguous run of l' rows (token-major, its rows lie H·D apart: at 64k tokens, 4 KV
        heads of 128, a gather of 2048 such rows took ~1.4 ms per MB)."""
        B, S, H, D = shape
        padded = -(-S // self.select_size) * self.select_size
        self.k_BHSD = torch.zeros(B, H, padded, D, dtype=dtype, device=device)
        self.v_BHSD = torch.zeros_like(self.k_BHSD)
        return self.k_BHSD[:, :, :S].transpose(1, 2), self.v_BHSD[:, :, :S].transpose(1, 2)


def _recomputed(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """``fn(*args)``, keeping for the backward only its inputs when autograd records it.

    For the small MLPs beside the attention (phi, the gate), whose saved activations (phi's
    flattened blocks, twice the keys' size; the gate's hidden layer) would otherwise live
    through the attention's backward, the training peak: their recompute (small matmuls) runs
    after it, when memory is low (a module step at 16k tokens, 16 query heads of 64: peak
    heap 414 -> 391 MB).
    """
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)


def _linear_init(module: nn.Linear) -> nn.Linear:
    nn.init.normal_(module.weight, std=module.in_features**-0.5)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


class Compressor(nn.Module):
    """phi: MLP over a flattened block of l keys (or values) plus an intra-block position code.

    With ``mean_skip`` the block's mean is added to the MLP's output (``compress_skip="mean"``,
    not in the paper): a compressed key then starts as the average of its block's keys, so its
    score against a query tracks the block's raw scores before phi has learned anything. The
    paper's phi learns only through the compression branch's output; where the gate turns that
    branch off, its scores — and so the block selection — stay untrained (experiments/
    passkey_4k.md).
    """

    def __init__(self, block_size: int, head_dim: int, hidden: int, mean_skip: bool) -> None:
        super().__init__()
        self.mean_skip = mean_skip
        self.pos_LD = nn.Parameter(torch.randn(block_size, head_dim) * 0.02)
        self.w1_IF = nn.Parameter(
            torch.randn(block_size * head_dim, hidden) * (block_size * head_dim) ** -0.5
        )
        self.b1_F = nn.Parameter(torch.zeros(hidden))
        self.w2_FD = nn.Parameter(torch.randn(hidden, head_dim) * hidden**-0.5)
        self.b2_D = nn.Parameter(torch.zeros(head_dim))

    def forward(self, x_BTHD: torch.Tensor, stride: int, backend: str) -> torch.Tensor:
        """Compressed tokens [B, N, H, D] of every complete block of ``x_BTHD``."""
        out_BNHD = compress_kv(
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
        if self.mean_skip and out_BNHD.shape[1]:
            # unfold gives [B, N, H, D, l]: the N complete blocks at stride d (none when T < l,
            # where unfold would raise)
            out_BNHD = out_BNHD + x_BTHD.unfold(1, self.pos_LD.shape[0], stride).mean(-1)
        return out_BNHD


class NativeSparseAttention(AttentionMechanism):
    """NSA: gated compression + top-n block selection + sliding window, trained sparse."""

    name = "nsa"
    Params = NSAParams
    branches = 3
    # small blocks make a few hundred tokens genuinely sparse: a query at t reads about
    # t/8 compressed + 4*16 selected + 16 window keys (density 0.34 at T=301, plus 0.12 of
    # compressed tokens)
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
        mean_skip = p.compress_skip == "mean"
        self.compress_k = Compressor(p.block_size, d, p.compress_hidden, mean_skip)
        self.compress_v = Compressor(p.block_size, d, p.compress_hidden, mean_skip)
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
        """Queries (RoPE'd), per-branch K/V and gate logits [B, T, HQ, 3] (before the sigmoid)
        for tokens at ``start``."""
        B, T, _ = x_BTC.shape
        s = self.shape
        # one angle table for q and the rotated keys. q is rotated out of place: in place on a
        # view of the projection, autograd's CopySlices backward clones the gradient and
        # rotates a second copy, at the end of the backward where the input's gradient is
        # being summed (a module step at 32k peaked there at 823 MB; 687 out of place); the
        # unrotated projection is freed at once, nothing saves it
        cos_TD, sin_TD = self.rope_tables(start, T, x_BTC.device)
        q_BTHD = self.wq(x_BTC).view(B, T, s.n_heads, s.head_dim)
        q_BTHD = apply_rope(q_BTHD, cos_TD, sin_TD)
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
        logits_BTH3 = _recomputed(self.gate, x_BTC).view(B, T, s.n_heads, 3)
        return q_BTHD, branch_kv, logits_BTH3

    def _compress(
        self, raw_k_BTHD: torch.Tensor, raw_v_BTHD: torch.Tensor, first: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed K (rotated at each block's last position) and V; ``first`` is the index
        of the first compressed token the raw slice starts at."""
        p = self.params
        kcmp_BNHD = _recomputed(self.compress_k, raw_k_BTHD, p.stride, p.backend)
        vcmp_BNHD = _recomputed(self.compress_v, raw_v_BTHD, p.stride, p.backend)
        idx = torch.arange(first, first + kcmp_BNHD.shape[1], device=raw_k_BTHD.device)
        return self.rope_at(kcmp_BNHD, idx * p.stride + p.block_size - 1), vcmp_BNHD

    # ----- forward / decode --------------------------------------------------------------

    def forward(self, x_BTC: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Gated sum of the three branches (Eq. 5); with a cache, sparse decoding."""
        B, T, _ = x_BTC.shape
        if cache is None:
            q_BTHD, kv, logits_BTH3 = self._project(x_BTC, 0)
            y_BTC = self._prefill(q_BTHD, kv, logits_BTH3)
            self.stats.update(self._gate_stats(torch.sigmoid(logits_BTH3.detach())))
            return y_BTC
        o_BTHD = self.decode_reader(x_BTC, cache)()
        return self.wo(o_BTHD.reshape(B, T, -1))

    def decode_reader(self, x_BTC: torch.Tensor, cache: KVCache) -> Callable[[], torch.Tensor]:
        """Project the new tokens and append them (emitting the compressed tokens they
        complete); the returned function runs the three branches over the cache and mixes them."""
        assert isinstance(cache, NSACache)
        q_BTHD, kv, logits_BTH3 = self._project(x_BTC, cache.length)
        gates_BTH3 = torch.sigmoid(logits_BTH3)
        self._append(cache, kv)

        def read() -> torch.Tensor:
            # a step is dozens of small ops: single-threaded (see single_threaded_ops)
            with single_threaded_ops():
                outs, idx_BTHK, pos_T = self._decode(q_BTHD, cache)
                o_BTHD = self._mix(outs, gates_BTH3)
            self.defer_stats(
                lambda: {**self._selection_stats(idx_BTHK, pos_T), **self._gate_stats(gates_BTH3)}
            )
            return o_BTHD

        return read

    def _mix(self, outs: Iterable[torch.Tensor], gates_BTH3: torch.Tensor) -> torch.Tensor:
        """Eq. 5 for decoding: the gate-weighted sum of the branch outputs in branch order (the
        prefill mixes inside ``gated_branches``)."""
        # gate-major contiguous copy, then one multiply and in-place multiply-adds: the
        # broadcast products of strided gate views plus ``sum`` cost fresh full-size temporaries
        gates_3BTH1 = gates_BTH3.permute(3, 0, 1, 2).contiguous()[..., None]
        terms = zip(gates_3BTH1, outs, strict=True)
        gate_BTH1, o = next(terms)
        o_BTHD = o * gate_BTH1
        for gate_BTH1, o in terms:
            o_BTHD.addcmul_(o, gate_BTH1)
        return o_BTHD

    @staticmethod
    def _gate_stats(gates_BTH3: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each branch's mean gate."""
        g = gates_BTH3.detach().float().mean(dim=(0, 1, 2))
        return {f"gate_{b}": g[i] for i, b in enumerate(BRANCHES)}

    def _prefill(
        self, q_BTHD: torch.Tensor, kv: dict[str, torch.Tensor], logits_BTH3: torch.Tensor
    ) -> torch.Tensor:
        """The output projection of the gated sum of the compression, selection and window
        branches over the whole sequence, [B, T, C] (``gated_branches``: one score pass serves
        the compression output and the block selection, Eq. 8-11, and the projection runs
        inside the op so that training need not keep the gated sum); sets the selection
        stats."""
        p = self.params
        T = q_BTHD.shape[1]
        kcmp_BNHD, vcmp_BNHD = self._compress(kv["raw_k"], kv["raw_v"], 0)
        knobs = NSAKnobs(p.block_size, p.stride, p.select_size, p.n_select, p.window)
        y_BTC, idx_BTHK = gated_branches(
            q_BTHD, kcmp_BNHD, vcmp_BNHD, (kv["slc_k"], kv["slc_v"]), (kv["win_k"], kv["win_v"]),
            logits_BTH3, knobs, scale=self.scale, backend=p.backend, out_weight=self.wo.weight,
        )  # fmt: skip
        self.stats = self._selection_stats(idx_BTHK, torch.arange(T, device=q_BTHD.device))
        return y_BTC

    def _selection_stats(
        self, idx_BTHK: torch.Tensor, pos_T: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Measured density, the compressed tokens' share, the forced share of selections and
        the GQA group size (query heads sharing each KV head's selected blocks, the unit the
        selection kernels load blocks for: G = 16 in the paper's layout, 64 on 4 KV heads).

        ``density`` follows the contract: causal (query, key) pairs attended at full resolution
        over all causal pairs, each raw key once per query although the query's own and
        previous blocks are both selected and inside the window (averaged over batch and KV
        heads). ``cmp_density`` is the compressed tokens the queries see over the same causal
        pairs: the compression branch's keys, which are not raw keys.
        """
        p = self.params
        with torch.no_grad():
            t_1T11 = pos_T.view(1, -1, 1, 1)
            valid = idx_BTHK >= 0
            own = t_1T11 // p.select_size
            forced = valid & ((idx_BTHK == 0) | (idx_BTHK == own) | (idx_BTHK == own - 1))
            # window keys (t - w, t]; a selected block adds its causal keys before the window
            win_lo_1T11 = (t_1T11 - p.window + 1).clamp(min=0)
            first = idx_BTHK * p.select_size
            last = torch.minimum(first + p.select_size - 1, win_lo_1T11 - 1)
            outside = ((last - first + 1).clamp(min=0) * valid).sum(-1).double()
            pos = pos_T.double()
            n_win = (pos + 1).clamp(max=p.window)
            # compressed token i is visible iff i*d + l - 1 <= t
            n_cmp = (torch.div(pos - p.block_size + 1, p.stride, rounding_mode="floor") + 1).clamp(
                min=0
            )
            total = causal_pairs(int(pos_T[-1]) + 1) - causal_pairs(int(pos_T[0]))
            return {
                "density": ((n_win + outside.mean(dim=(0, 2))).sum() / total).float(),
                "cmp_density": (n_cmp.sum() / total).float(),
                "forced_frac": (forced.sum() / valid.sum().clamp(min=1)).float(),
                "group_size": torch.tensor(float(self.shape.group_size)),
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
            cache.kcmp_BHDN[..., cache.n_cmp : n_total] = kcmp.permute(0, 2, 3, 1)
            cache.vcmp_BHND[:, :, cache.n_cmp : n_total] = vcmp.transpose(1, 2)
            cache.n_cmp = n_total

    def _decode(
        self, q_BTHD: torch.Tensor, cache: NSACache
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """Branch outputs of the newest queries, reading only the rows NSA needs, with the
        selected blocks [B, T, H, n] and the queries' positions (for the stats).

        Scores run head-major, rows R = (new token, query head of the group), so each branch is
        a batched matmul over (batch, KV head). Three phases: the compression branch with the
        KV heads split over the workers (the big reads); on one thread, the group-summed
        probabilities mapped onto blocks by the banded Eq. 9 (``block_importance``) and the
        top-n (small ops: run on two workers at once they contend for the interpreter lock,
        ~1.4 ms per worker at 64k tokens against ~0.3 ms on one); then the selected blocks,
        heads split over the workers, with the window on the caller's. The rows read are
        counted per block from the newest query that chose it.
        """
        p = self.params
        B, T, HQ, D = q_BTHD.shape
        H, G = self.shape.n_kv_heads, self.shape.group_size
        device = q_BTHD.device
        pos_T = torch.arange(cache.length - T, cache.length, device=device)
        # scaled queries: a multiply of the few query rows, not of every score
        qs_BTHGD = (q_BTHD.float().view(B, T, H, G, D) * self.scale).contiguous()
        bounds = even_ranges(H, max(1, min(worker_count(), H)))

        o_cmp_BHRD = torch.empty(B, H, T * G, D, device=device)
        mass_BHTN = torch.empty(B, H, T, cache.n_cmp, device=device)
        run_workers(
            [
                functools.partial(
                    self._decode_compressed, qs_BTHGD, cache, pos_T, h0, h1, o_cmp_BHRD, mass_BHTN
                )
                for h0, h1 in bounds
            ]
        )

        J = math.ceil(cache.length / p.select_size)
        importance_BHTJ = block_importance(mass_BHTN, J, p.block_size, p.stride, p.select_size)
        idx_BTHK = topn_blocks(importance_BHTJ.transpose(1, 2), pos_T, p.select_size, p.n_select)

        o_slc_BTHGD = torch.empty(B, T, H, G, D, device=device)
        w_lo = max(0, cache.length - T - p.window + 1)
        o_win: list[torch.Tensor] = []

        def window() -> None:
            # the window branch's keys, through the project's one window rule
            win_k = cache.k_BSHD if cache.win_k_BSHD is None else cache.win_k_BSHD
            win_v = cache.v_BSHD if cache.win_v_BSHD is None else cache.win_v_BSHD
            mask = decode_mask(T, w_lo, cache.length, window=p.window)
            k_BSHD, v_BSHD = (w[:, w_lo : cache.length].float() for w in (win_k, win_v))
            o_win.append(self.sdpa(q_BTHD.float(), k_BSHD, v_BSHD, mask=mask))

        jobs = [
            functools.partial(
                self._decode_selected, qs_BTHGD, cache, pos_T, idx_BTHK, h0, h1, o_slc_BTHGD
            )
            for h0, h1 in bounds
        ]
        run_workers([lambda: (window(), jobs[0]()), *jobs[1:]])

        n_rows = cache.n_cmp + cache.length - w_lo
        cache.defer_rows_read(lambda: n_rows + self._selected_rows(idx_BTHK, pos_T))
        o_cmp = o_cmp_BHRD.view(B, H, T, G, D).transpose(1, 2)
        outs = (o_cmp, o_slc_BTHGD, o_win[0])
        return tuple(o.reshape(B, T, HQ, D).to(q_BTHD.dtype) for o in outs), idx_BTHK, pos_T

    def _decode_compressed(
        self,
        qs_BTHGD: torch.Tensor,
        cache: NSACache,
        pos_T: torch.Tensor,
        h0: int,
        h1: int,
        o_cmp_BHRD: torch.Tensor,
        mass_BHTN: torch.Tensor,
    ) -> None:
        """Compression branch of KV heads h0 .. h1 - 1 (``qs`` comes scaled): its output and
        the group-summed probabilities of every compressed token, written into the outputs."""
        p = self.params
        B, T, _, G, D = qs_BTHGD.shape
        U = h1 - h0
        N = cache.n_cmp
        q_BURD = qs_BTHGD[:, :, h0:h1].transpose(1, 2).reshape(B, U, T * G, D)
        kcmp_BUDN = cache.kcmp_BHDN[:, h0:h1, :, :N].float()
        vcmp_BUND = cache.vcmp_BHND[:, h0:h1, :N].float()
        s_BUTGN = (q_BURD @ kcmp_BUDN).view(B, U, T, G, N)
        # compressed token i is visible to t iff i·d + l - 1 <= t: masks (and rows that see no
        # token) only when the last token is not visible to the first new query
        if N and (N - 1) * p.stride + p.block_size - 1 > cache.length - T:
            vis_TN = torch.arange(N, device=pos_T.device) * p.stride + p.block_size - 1
            s_BUTGN.masked_fill_(~(vis_TN <= pos_T[:, None])[:, None], float("-inf"))
            probs_BUTGN = torch.softmax(s_BUTGN, dim=-1).nan_to_num_(0.0)
        else:
            probs_BUTGN = torch.softmax(s_BUTGN, dim=-1)
        torch.matmul(probs_BUTGN.view(B, U, T * G, N), vcmp_BUND, out=o_cmp_BHRD[:, h0:h1])
        torch.sum(probs_BUTGN, dim=3, out=mass_BHTN[:, h0:h1])

    def _decode_selected(
        self,
        qs_BTHGD: torch.Tensor,
        cache: NSACache,
        pos_T: torch.Tensor,
        idx_BTHK: torch.Tensor,
        h0: int,
        h1: int,
        o_slc_BTHGD: torch.Tensor,
    ) -> None:
        """Selection branch of KV heads h0 .. h1 - 1 over their selected blocks ``idx_BTHK``
        (``qs`` comes scaled), written into ``o_slc_BTHGD``."""
        p = self.params
        B, T, H, G, D = qs_BTHGD.shape
        U = h1 - h0
        device = pos_T.device
        idx_BTUK = idx_BTHK[:, :, h0:h1]
        keys_BTUKL = idx_BTUK[..., None] * p.select_size + torch.arange(
            p.select_size, device=device
        )
        ok_BTUKL = (idx_BTUK[..., None] >= 0) & (keys_BTUKL <= pos_T.view(1, T, 1, 1, 1))
        # whole blocks of the head-major cache, one contiguous l'·D row each: flat block ids
        # (b·H + h)·blocks + j, one index_select per tensor; unused slots (-1) read block 0 and
        # the own block's rows past the query are read too, both masked by ok_BTUKL
        blocks = cache.k_BHSD.shape[2] // p.select_size
        b_B111 = torch.arange(B, device=device).view(B, 1, 1, 1)
        h_11U1 = torch.arange(h0, h1, device=device).view(1, 1, U, 1)
        flat_X = ((b_B111 * H + h_11U1) * blocks + idx_BTUK.clamp_min(0)).flatten()
        sel_shape = (B, T, U, p.n_select * p.select_size, D)
        k_sel, v_sel = (
            c.view(-1, p.select_size * D).index_select(0, flat_X).view(sel_shape).float()
            for c in (cache.k_BHSD, cache.v_BHSD)
        )
        # one SDPA call (aten's flash kernel on CPU), (new token, KV head) as its (batch, head);
        # never an empty row: a query's own block is forced, and holds the query itself
        X, R = B * T, p.n_select * p.select_size
        mask_XU1R = torch.zeros(X, U, 1, R, device=device).masked_fill_(
            ~ok_BTUKL.view(X, U, 1, R), float("-inf")
        )
        o_XUGD = nn.functional.scaled_dot_product_attention(
            qs_BTHGD[:, :, h0:h1].reshape(X, U, G, D),
            k_sel.view(X, U, R, D),
            v_sel.view(X, U, R, D),
            attn_mask=mask_XU1R,
            scale=1.0,
        )
        o_slc_BTHGD[:, :, h0:h1] = o_XUGD.view(B, T, U, G, D)

    def _selected_rows(self, idx_BTHK: torch.Tensor, pos_T: torch.Tensor) -> int:
        """Raw rows the selection branch reads per (batch, KV head), at most over both.

        The step gathers whole blocks of l' rows (a query's own block too: its rows past the
        query are read and masked), each block once however many new queries chose it; blocks
        nobody chose cost nothing. So a one-token step past n blocks reads n·l' rows, the
        paper's Table 4 count at any context.
        """
        B, T, H, K = idx_BTHK.shape
        J = int(pos_T[-1]) // self.params.select_size + 1
        # unused slots (-1) go to an extra column J that is dropped
        slot_BHX = idx_BTHK.masked_fill(idx_BTHK < 0, J).transpose(1, 2).reshape(B, H, T * K)
        chosen_BHJ = torch.zeros(B, H, J + 1, dtype=torch.bool, device=idx_BTHK.device)
        chosen_BHJ.scatter_(2, slot_BHX, True)
        return int(chosen_BHJ[..., :J].sum(-1).max()) * self.params.select_size

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
