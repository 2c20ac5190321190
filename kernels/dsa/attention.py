"""Token-sparse attention of DSA (``sparsezoo.kernels.dsa.attention``).

Query t attends the keys listed in its index slots: ``indices`` [B, T, K] gives one key set per
query shared by every attention head, [B, T, H, K] one per KV head (shared by that head's query
group). The queries are the last T of the S keys (query t sits at position S - T + t), so the
op serves prefill (T = S) and decoding alike. A slot is used when it holds a key position no
later than the query's; unused (-1) and future slots are skipped; a query with no used slot
outputs 0 with zero, finite gradients. Each slot counts once: one softmax runs over the slots.

Backends: ``naive`` (gathers every slot's key in one [B, T, H, K, D] tensor, the fp32 oracle),
``torch`` (the fast CPU path: query chunks gather their slot keys and values once per KV head
and run batched matmuls; worker threads own disjoint query ranges) and ``triton``
(``triton_attention.py``). Optionally returns the attention probabilities per slot, averaged
over the query heads that share the slot's key set (DSA's indexer-training target).

Legend: B batch, T queries, S keys, HQ query heads, H KV heads, G group size HQ // H, D head
dim, K index slots, U key sets per query (1 shared, or H), C queries of a chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from ..backend import resolve_backend
from ..base2 import LN2, LOG2E
from ..cpu_workers import Workspace, even_ranges, single_threaded_ops, worker_count
from .indexer import _positions, _split, run_on_workers

__all__ = ["sparse_attention", "sparse_attention_naive", "sparse_attention_torch"]

_OP = "sparse_attention"
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_AVAILABLE = ("naive", "torch", "triton")

# Slot rows (queries × slots) one chunk of the torch path gathers and scores. Measured at
# K = 2048, G = 16, D = 64 on one core: 8 queries per chunk (4 MB each of gathered K and V)
# beat 2, 4 and 16 by 10-30%: fewer ops per row, still cache-resident between the gather and
# the matmuls.
_CHUNK_SLOTS = 16384
# Fewest slots a worker takes when a decode step splits every query's slots over the workers.
_MIN_PART_SLOTS = 256


def _validate(
    q_BTHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor, indices: torch.Tensor
) -> None:
    """Raise ValueError naming the offending argument when the inputs do not fit the op."""
    if q_BTHD.dim() != 4 or k_BSHD.dim() != 4 or v_BSHD.dim() != 4:
        raise ValueError(
            f"{_OP}: q, k, v must be 4-d [B, T, HQ, D] / [B, S, H, D], got q "
            f"{tuple(q_BTHD.shape)}, k {tuple(k_BSHD.shape)}, v {tuple(v_BSHD.shape)}"
        )
    if k_BSHD.shape != v_BSHD.shape:
        raise ValueError(
            f"{_OP}: k and v shapes differ: k {tuple(k_BSHD.shape)}, v {tuple(v_BSHD.shape)}"
        )
    B, T, HQ, D = q_BTHD.shape
    Bk, S, H, Dk = k_BSHD.shape
    if (Bk, Dk) != (B, D) or T < 1 or S < T or HQ % H:
        raise ValueError(
            f"{_OP}: need q [B, T, HQ, D] and k, v [B, S, H, D] with 1 <= T <= S and HQ a "
            f"multiple of H, got q {tuple(q_BTHD.shape)}, k {tuple(k_BSHD.shape)}"
        )
    if not (q_BTHD.dtype == k_BSHD.dtype == v_BSHD.dtype) or not q_BTHD.is_floating_point():
        raise ValueError(
            f"{_OP}: q, k, v dtypes must be one floating dtype, got "
            f"{q_BTHD.dtype}, {k_BSHD.dtype}, {v_BSHD.dtype}"
        )
    if not (q_BTHD.device == k_BSHD.device == v_BSHD.device == indices.device):
        raise ValueError(
            f"{_OP}: q, k, v, indices devices differ: {q_BTHD.device}, {k_BSHD.device}, "
            f"{v_BSHD.device}, {indices.device}"
        )
    if indices.dtype != torch.int64:
        raise ValueError(f"{_OP}: indices must be int64, got dtype {indices.dtype}")
    if (
        not (
            (indices.dim() == 3 and indices.shape[:2] == (B, T))
            or (indices.dim() == 4 and indices.shape[:3] == (B, T, H))
        )
        or indices.shape[-1] < 1
    ):
        raise ValueError(
            f"{_OP}: indices must be [B, T, K] = [{B}, {T}, K] (shared by all heads) or "
            f"[B, T, H, K] = [{B}, {T}, {H}, K] (per KV head) with K >= 1, got "
            f"{tuple(indices.shape)}"
        )
    low, high = (int(x) for x in torch.aminmax(indices))
    if low < -1 or high >= S:
        raise ValueError(
            f"{_OP}: indices must be -1 (unused) or key positions in [0, {S}), got min {low}, "
            f"max {high}"
        )


def _per_head(indices: torch.Tensor, H: int) -> torch.Tensor:
    """Indices as [B, T, H, K] (a broadcast view for a set shared by all heads)."""
    if indices.dim() == 4:
        return indices
    B, T, K = indices.shape
    return indices.unsqueeze(2).expand(B, T, H, K)


def _probs_out(probs_BTHK: torch.Tensor, shared: bool) -> torch.Tensor:
    """Per-KV-head slot probabilities (group means) as returned: averaged over H when shared."""
    return probs_BTHK.mean(dim=2) if shared else probs_BTHK


def on_head_sets(
    apply: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    q_BTHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    want_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a backend's ``apply(q, k, v, idx_BTHK, scale, want_probs)`` with the indices as one
    set per KV head, and return its probabilities in the caller's layout ([B, T, K] when the
    set is shared)."""
    o_BTHD, probs_BTHK = apply(
        q_BTHD, k_BSHD, v_BSHD, _per_head(indices, k_BSHD.shape[2]), scale, want_probs
    )
    return o_BTHD, None if probs_BTHK is None else _probs_out(probs_BTHK, indices.dim() == 3)


# ----- naive (the oracle) ------------------------------------------------------------------


def sparse_attention_naive(
    q_BTHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot attention written out in fp32 with autograd (the oracle): (o_BTHD, probs).

    Inputs are validated by the caller. Every slot's key and value are gathered, scores of
    unused and future slots are -inf, and one softmax runs over the slots; an empty row gets
    finite scores that are then zeroed. ``probs`` (detached) is the slot probability averaged
    over the heads sharing the key set. Memory is O(B·T·H·K·D): only for tests.
    """
    B, T, HQ, D = q_BTHD.shape
    S, H = k_BSHD.shape[1:3]
    G = HQ // H
    idx_BTHK = _per_head(indices, H)
    b_B111 = torch.arange(B, device=q_BTHD.device).view(B, 1, 1, 1)
    h_111H1 = torch.arange(H, device=q_BTHD.device).view(1, 1, H, 1)
    k_BTHKD = k_BSHD.float()[b_B111, idx_BTHK.clamp_min(0), h_111H1]
    v_BTHKD = v_BSHD.float()[b_B111, idx_BTHK.clamp_min(0), h_111H1]
    pos_T11 = _positions(T, S, q_BTHD.device).view(T, 1, 1)
    used_BTHK = (idx_BTHK >= 0) & (idx_BTHK <= pos_T11)
    q_BTHGD = q_BTHD.float().view(B, T, H, G, D)
    scores = torch.einsum("bthgd,bthkd->bthgk", q_BTHGD, k_BTHKD) * scale
    scores = scores.masked_fill(~used_BTHK[:, :, :, None, :], float("-inf"))
    empty_BTH11 = ~used_BTHK.any(dim=-1)[..., None, None]
    probs = torch.softmax(scores.masked_fill(empty_BTH11, 0.0), dim=-1)
    probs = probs.masked_fill(empty_BTH11, 0.0)
    o_BTHGD = torch.einsum("bthgk,bthkd->bthgd", probs, v_BTHKD)
    slot_probs = _probs_out(probs.detach().mean(dim=3), indices.dim() == 3)
    return o_BTHGD.reshape(B, T, HQ, D).to(q_BTHD.dtype), slot_probs


# ----- torch (the fast CPU path) -------------------------------------------------------------


def _chunks(T: int, K: int) -> list[tuple[int, int]]:
    """Query ranges whose slots fill about _CHUNK_SLOTS gathered rows."""
    size = max(1, _CHUNK_SLOTS // K)
    return [(t0, min(t0 + size, T)) for t0 in range(0, T, size)]


def _worker_runs(B: int, T: int, K: int) -> list[list[tuple[int, int, int]]]:
    """(batch, t0, t1) chunks cut into contiguous runs, one per worker thread."""
    chunks = [(b, t0, t1) for b in range(B) for t0, t1 in _chunks(T, K)]
    runs = _split([1] * len(chunks), max(1, min(worker_count(), len(chunks))))
    return [[chunks[i] for i in run] for run in runs]


class _Slots:
    """One chunk's slot keys and values for one KV head, k, v [C, K, D] (views of gathers).

    ``rows`` holds the (clamped) key positions of the slots, ``used_CK`` which slots are valid
    (a position at or before the query's). Built by ``_head_slots`` (one KV head's rows) or
    ``_shared_slots`` (one gather serving every KV head when they share the indices).
    """

    def __init__(
        self, k_CKD: torch.Tensor, v_CKD: torch.Tensor, rows: torch.Tensor, used_CK: torch.Tensor
    ) -> None:
        self.k_CKD, self.v_CKD, self.rows, self.used_CK = k_CKD, v_CKD, rows, used_CK
        # most chunks use every slot, and then need no masking at all
        self.all_used = bool(used_CK.all())

    def scores(self, q_CGD: torch.Tensor, ws: Workspace, keys_major: bool = False) -> torch.Tensor:
        """Scaled scores (``q_CGD`` comes scaled) in a workspace buffer, unused slots -inf:
        [C, G, K], or [C, K, G] with ``keys_major``.

        The forward takes the query-major layout: k @ q^T alone is faster at G = 16, but the
        softmax over the strided K axis loses more (measured 1.2x slower per chunk in all).
        The backward takes keys-major: it needs no reduction over the slots (the saved lse
        normalises), and k @ q^T (as v @ dO^T for dP) ran 1.2-1.3x faster than q @ k^T."""
        C, G, _ = q_CGD.shape
        K = self.k_CKD.shape[1]
        if keys_major:
            out = ws.get("scores", q_CGD, C, K, G)
            s = torch.bmm(self.k_CKD, q_CGD.transpose(1, 2), out=out)
            unused = ~self.used_CK[:, :, None]
        else:
            out = ws.get("scores", q_CGD, C, G, K)
            s = torch.bmm(q_CGD, self.k_CKD.transpose(1, 2), out=out)
            unused = ~self.used_CK[:, None, :]
        return s if self.all_used else s.masked_fill_(unused, float("-inf"))


@dataclass(frozen=True)
class _KVRows:
    """fp32 K and V of one call as rows [B, R, D]: key s of KV head h is row s·m + h of
    ``k_BRD`` and of ``v_BRD``. ``packed``: K and V of a token lie side by side in one
    storage ([B, S, 2, H, D], as ``DSACache`` keeps them), so a token's whole K and V row of
    2·H·D numbers can be read at once."""

    k_BRD: torch.Tensor
    v_BRD: torch.Tensor
    m: int
    packed: bool

    def tokens(self, b: int, H: int) -> tuple[torch.Tensor, ...]:
        """Sequence b's whole tokens: (K [S, H·D], V [S, H·D]) or, packed, one [S, 2·H·D]."""
        k_RD = self.k_BRD[b]
        D = k_RD.shape[1]
        S = (k_RD.shape[0] - H) // self.m + 1
        if self.packed:
            return (k_RD.as_strided((S, 2 * H * D), (self.m * D, 1)),)
        return tuple(x[b].as_strided((S, H * D), (self.m * D, 1)) for x in (self.k_BRD, self.v_BRD))


def _rows(x_BSHD: torch.Tensor) -> tuple[torch.Tensor, int]:
    """fp32 rows [B, R, D] and the token stride m (key s of head h is row s·m + h): a view when
    x is fp32 with each token's heads contiguous (a contiguous tensor, or half of a packed
    storage), else a contiguous copy with m = H."""
    B, S, H, D = x_BSHD.shape
    stride = x_BSHD.stride()
    if x_BSHD.dtype == torch.float32 and stride[2:] == (D, 1) and stride[1] % D == 0:
        m = stride[1] // D
        if m >= H:
            return x_BSHD.as_strided((B, (S - 1) * m + H, D), (stride[0], D, 1)), m
    return x_BSHD.float().contiguous().view(B, S * H, D), H


def _kv_rows(k_BSHD: torch.Tensor, v_BSHD: torch.Tensor) -> _KVRows:
    """K and V of a call as ``_KVRows`` (views where the layout allows, see ``_rows``)."""
    H, D = k_BSHD.shape[2:]
    (k_BRD, mk), (v_BRD, mv) = _rows(k_BSHD), _rows(v_BSHD)
    if mk != mv:
        (k_BRD, mk), (v_BRD, mv) = _rows(k_BSHD.contiguous()), _rows(v_BSHD.contiguous())
    packed = (
        mk == 2 * H
        and k_BRD.untyped_storage().data_ptr() == v_BRD.untyped_storage().data_ptr()
        and v_BRD.storage_offset() - k_BRD.storage_offset() == H * D
        and k_BRD.stride(0) == v_BRD.stride(0)
    )
    return _KVRows(k_BRD, v_BRD, mk, packed)


def _head_slots(
    kv: _KVRows,
    b: int,
    h: int,
    idx_CK: torch.Tensor,
    pos_C: torch.Tensor,
    ws: Workspace,
) -> _Slots:
    """KV head h's slots of one chunk of sequence b, gathered as rows of ``kv``.

    A gather reads contiguous rows whatever H (gathering from a strided [S, D] head slice was
    measured ~50x slower). The gathers land in workspace buffers (valid until the next chunk):
    fresh multi-MB tensors per chunk cost more in page faults than the gather itself (14x).
    """
    C, K = idx_CK.shape
    k_RD, v_RD = kv.k_BRD[b], kv.v_BRD[b]
    D = k_RD.shape[1]
    rows = torch.clamp_min(idx_CK, 0, out=ws.get("rows", idx_CK, C, K)).view(-1)
    flat = rows if kv.m == 1 else torch.add(rows * kv.m, h, out=ws.get("flat", idx_CK, C * K))
    k_CKD = torch.index_select(k_RD, 0, flat, out=ws.get("k", k_RD, C * K, D)).view(C, K, D)
    v_CKD = torch.index_select(v_RD, 0, flat, out=ws.get("v", v_RD, C * K, D)).view(C, K, D)
    return _Slots(k_CKD, v_CKD, rows, (idx_CK >= 0) & (idx_CK <= pos_C[:, None]))


def _shared_slots(
    kv: _KVRows,
    b: int,
    H: int,
    idx_CK: torch.Tensor,
    pos_C: torch.Tensor,
    ws: Workspace,
) -> list[_Slots]:
    """The slots of one chunk of sequence b whose KV heads share the indices: one gather of
    whole tokens (H·D numbers each, or 2·H·D when ``kv`` is packed: K and V at once) instead of
    H gathers of D; k, v are strided views into it, which the batched matmuls read directly.
    A decode step at 64k tokens, 4 KV heads of 128, 2048 slots: the per-head gathers took ~1 ms
    each per head and K/V.

    One _Slots per head ([C, K, D]), or for a one-query chunk one _Slots batched over the
    heads ([H, K, D], the heads as the matmuls' batch): one set of ops instead of H (measured
    0.82 -> 0.56 ms for 4 heads of 16 x 128 over 1024 slots on one core).
    """
    C, K = idx_CK.shape
    rows = torch.clamp_min(idx_CK, 0, out=ws.get("rows", idx_CK, C, K)).view(-1)
    gathered = [
        torch.index_select(t, 0, rows, out=ws.get(f"kv{i}", t, C * K, t.shape[1]))
        for i, t in enumerate(kv.tokens(b, H))
    ]
    if kv.packed:
        half = gathered[0].shape[1] // 2
        gathered = [gathered[0][:, :half], gathered[0][:, half:]]
    k_CKHD, v_CKHD = (x.view(C, K, H, -1) for x in gathered)
    used_CK = (idx_CK >= 0) & (idx_CK <= pos_C[:, None])
    if C == 1:
        return [_Slots(k_CKHD[0].transpose(0, 1), v_CKHD[0].transpose(0, 1), rows, used_CK)]
    return [_Slots(k_CKHD[:, :, h], v_CKHD[:, :, h], rows, used_CK) for h in range(H)]


def _scaled(q_CGD: torch.Tensor, scale: float, ws: Workspace) -> torch.Tensor:
    """scale · log2(e) · q of one chunk (base-2 scores, see ``kernels.base2``) in a workspace
    buffer (a scaled copy of all of q would cost a q-sized allocation per call)."""
    return torch.mul(q_CGD, scale * LOG2E, out=ws.get("q", q_CGD, *q_CGD.shape))


def _forward_chunk(
    slots: _Slots, q_CGD: torch.Tensor, ws: Workspace, want_probs: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Softmax over one chunk's slots: (o [C, G, D], lse [C, G], probs [C, K] or None), the
    probabilities averaged over the group. ``q_CGD`` comes from ``_scaled`` (base-2 scores);
    the lse is natural."""
    s_CGK = slots.scores(q_CGD, ws)
    max_CG1 = s_CGK.amax(dim=-1, keepdim=True)
    # an empty row has max -inf: shift by 0 instead, so exp2 gives 0 and the sum stays 0
    max_CG1.masked_fill_(max_CG1 == float("-inf"), 0.0)
    p_CGK = s_CGK.sub_(max_CG1).exp2_()
    sum_CG1 = p_CGK.sum(dim=-1, keepdim=True)
    inv_CG1 = sum_CG1.clamp_min(torch.finfo(torch.float32).tiny).reciprocal_()
    # normalise the small output rather than the [C, G, K] probabilities
    o_CGD = torch.bmm(p_CGK, slots.v_CKD).mul_(inv_CG1)
    lse_CG = (max_CG1 + sum_CG1.log2()).squeeze(-1).mul_(LN2)
    probs_CK = None
    if want_probs:
        G = q_CGD.shape[1]
        probs_CK = torch.bmm(inv_CG1.transpose(1, 2), p_CGK).squeeze(1).div_(G)
    return o_CGD, lse_CG, probs_CK


def _flash_slots(
    slots: _Slots, q_HGD: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query's softmax over slots that all H KV heads share (``slots`` batched over the
    heads: k, v [H, K, D]): (o [H, G, D], lse [H, G]) from one aten flash call, which reads the
    gathered K/V where they lie; unused slots get an additive -inf mask.

    A decode step's slot attention. The flash kernel replaces the dozen ops of
    ``_forward_chunk``: a 64k-token step (4 KV heads of 128, 64 query heads, k = 2048, two
    workers) spent 1.4-1.6 ms per worker there and 1.2 ms in this call.
    """
    H, G, D = q_HGD.shape
    mask_111K = None
    if not slots.all_used:
        if not bool(slots.used_CK.any()):
            return q_HGD.new_zeros(H, G, D), q_HGD.new_full((H, G), float("-inf"))
        mask_1K = q_HGD.new_zeros(slots.used_CK.shape).masked_fill_(~slots.used_CK, -torch.inf)
        mask_111K = mask_1K[None, None]
    o_1HGD, lse_1HG = _flash(
        q_HGD[None], slots.k_CKD[None], slots.v_CKD[None], attn_mask=mask_111K, scale=scale
    )[:2]
    return o_1HGD[0], lse_1HG[0]


def _forward(
    q_BTHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    idx_BTHK: torch.Tensor,
    scale: float,
    want_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """fp32 (o_BTHD, lse_BTH, probs_BTHK or None) by query chunks on worker threads."""
    B, T, HQ, D = q_BTHD.shape
    S, H, K = k_BSHD.shape[1], k_BSHD.shape[2], idx_BTHK.shape[3]
    G = HQ // H
    q_BTHGD = q_BTHD.float().view(B, T, H, G, D)
    pos_T = _positions(T, S, q_BTHD.device)
    probs_BTHK = torch.empty(B, T, H, K, device=q_BTHD.device) if want_probs else None
    # indices shared by all KV heads arrive as a stride-0 expansion over H
    shared = H > 1 and idx_BTHK.stride(2) == 0
    kv = _kv_rows(k_BSHD, v_BSHD)

    def run(
        chunks: list[tuple[int, int, int]],
        k0: int,
        k1: int,
        o_BTHGD: torch.Tensor,
        lse_BTHG: torch.Tensor,
    ) -> None:
        ws = Workspace()
        for b, t0, t1 in chunks:
            idx_CHK = idx_BTHK[b, t0:t1, :, k0:k1]
            pos_C = pos_T[t0:t1]
            heads = _shared_slots(kv, b, H, idx_CHK[:, 0], pos_C, ws) if shared else []
            # a one-query chunk of shared slots is one unit over all heads: [H, G, ...] at (b, t0)
            one_query = shared and t1 - t0 == 1
            for h in range(1 if one_query else H):
                slots = heads[h] if shared else _head_slots(kv, b, h, idx_CHK[:, h], pos_C, ws)
                at = (b, t0) if one_query else (b, slice(t0, t1), h)
                if one_query and not want_probs:
                    (o_CGD, lse_CG), probs_CK = _flash_slots(slots, q_BTHGD[at], scale), None
                else:
                    q_CGD = _scaled(q_BTHGD[at], scale, ws)
                    o_CGD, lse_CG, probs_CK = _forward_chunk(slots, q_CGD, ws, want_probs)
                o_BTHGD[at] = o_CGD
                lse_BTHG[at] = lse_CG
                if probs_BTHK is not None:
                    probs_BTHK[at] = probs_CK

    runs = _worker_runs(B, T, K)
    parts = [(0, K)] if want_probs else _slot_parts(K, len(runs))
    o_BTHGD = torch.empty(B, T, H, G, D, device=q_BTHD.device)
    lse_BTHG = torch.empty(B, T, H, G, device=q_BTHD.device)
    if len(parts) == 1:
        run_on_workers([lambda c=c: run(c, 0, K, o_BTHGD, lse_BTHG) for c in runs])
    else:
        # a decode step: its few small glue ops run single-threaded (see single_threaded_ops)
        with single_threaded_ops():
            o_W = o_BTHGD.new_empty(len(parts), *o_BTHGD.shape)
            lse_W = lse_BTHG.new_empty(len(parts), *lse_BTHG.shape)
            run_on_workers(
                [
                    lambda w=w, k0=k0, k1=k1: run(runs[0], k0, k1, o_W[w], lse_W[w])
                    for w, (k0, k1) in enumerate(parts)
                ]
            )
            _merge_parts(o_W, lse_W, o_BTHGD, lse_BTHG)
    return o_BTHGD.view(B, T, HQ, D), lse_BTHG.view(B, T, HQ), probs_BTHK


def _slot_parts(K: int, n_runs: int) -> list[tuple[int, int]]:
    """Slot ranges for the workers when all the queries make one run (decoding): each worker
    takes a share of every query's slots (split-KV, as Flash-Decoding) instead of idling, and
    the parts' softmaxes are merged. A 64k-token decode step (4 KV heads of 128, 64 query
    heads, k = 2048, two cores) ran its gathers and matmuls on one worker before: 4.4 -> 2.7
    ms with the split, the heads batched and the glue single-threaded (same process, back to
    back)."""
    workers = worker_count()
    if n_runs != 1 or workers < 2 or K < 2 * _MIN_PART_SLOTS:
        return [(0, K)]
    return even_ranges(K, min(workers, K // _MIN_PART_SLOTS))


def _merge_parts(
    o_WBTHGD: torch.Tensor, lse_WBTHG: torch.Tensor, o_BTHGD: torch.Tensor, lse_BTHG: torch.Tensor
) -> None:
    """One softmax from per-part softmaxes: lse = logsumexp of the parts' lse, o = the parts'
    outputs weighted by exp(lse_w - lse). A row no part used (all -inf) stays 0 / -inf.

    Two parts (a decode step on two workers) take four ops instead of six: the first part's
    weight is sigmoid(lse_0 - lse_1) and the output a lerp between the parts' outputs."""
    if o_WBTHGD.shape[0] == 2:
        # both parts empty: -inf - -inf is nan; such a row's outputs are all 0 already
        w0_BTHG = torch.sigmoid(lse_WBTHG[0] - lse_WBTHG[1]).nan_to_num_(nan=0.0)
        torch.lerp(o_WBTHGD[1], o_WBTHGD[0], w0_BTHG.unsqueeze(-1), out=o_BTHGD)
        torch.logaddexp(lse_WBTHG[0], lse_WBTHG[1], out=lse_BTHG)
        return
    torch.logsumexp(lse_WBTHG, dim=0, out=lse_BTHG)
    weight_WBTHG = (lse_WBTHG - lse_BTHG).exp_()
    # all parts empty: -inf - -inf is nan; such a row's outputs are all 0 already
    weight_WBTHG.nan_to_num_(nan=0.0)
    torch.sum(o_WBTHGD * weight_WBTHG.unsqueeze(-1), dim=0, out=o_BTHGD)


def _backward(
    do_BTHD: torch.Tensor,
    q_BTHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    idx_BTHK: torch.Tensor,
    o_BTHD: torch.Tensor,
    lse_BTH: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 (dq, dk, dv): probabilities recomputed from the saved lse (the FlashAttention
    recipe); dk and dv are scattered into one buffer pair per worker, summed in worker order.

    The buffers are [B, H, S, D], so every scatter-add targets contiguous rows (measured 1.5x
    faster than adding into the strided head slices of a [B, S, H, D] tensor).
    """
    B, T, HQ, D = q_BTHD.shape
    S, H = k_BSHD.shape[1], k_BSHD.shape[2]
    G = HQ // H
    q_BTHGD = q_BTHD.float().view(B, T, H, G, D)
    do_BTHGD = do_BTHD.float().view(B, T, H, G, D)
    kv = _kv_rows(k_BSHD, v_BSHD)
    delta_BTHG = (do_BTHGD * o_BTHD.view(B, T, H, G, D)).sum(-1)
    lse_BTHG = lse_BTH.view(B, T, H, G)
    pos_T = _positions(T, S, q_BTHD.device)
    dq_BTHGD = torch.empty_like(q_BTHGD)
    runs = _worker_runs(B, T, idx_BTHK.shape[3])
    dk_W = [q_BTHGD.new_zeros(B, H, S, D) for _ in runs]
    dv_W = [q_BTHGD.new_zeros(B, H, S, D) for _ in runs]

    def run(i: int) -> None:
        ws = Workspace()
        for b, t0, t1 in runs[i]:
            for h in range(H):
                slots = _head_slots(kv, b, h, idx_BTHK[b, t0:t1, h], pos_T[t0:t1], ws)
                q_CGD = _scaled(q_BTHGD[b, t0:t1, h], scale, ws)
                do_CGD = do_BTHGD[b, t0:t1, h]
                lse_C1G = lse_BTHG[b, t0:t1, h, None, :]
                # base-2 scores less the lse in base 2; an empty row's lse is -inf: its scores
                # are all -inf too, so p = exp2(-inf) = 0
                lse2_C1G = lse_C1G.clamp_min(-1e30) * LOG2E
                p_CKG = slots.scores(q_CGD, ws, keys_major=True).sub_(lse2_C1G).exp2_()
                C, K = p_CKG.shape[:2]
                dp_CKG = torch.bmm(
                    slots.v_CKD, do_CGD.transpose(1, 2), out=ws.get("dp", p_CKG, C, K, G)
                )
                ds_CKG = dp_CKG.sub_(delta_BTHG[b, t0:t1, h, None, :]).mul_(p_CKG)
                dq_BTHGD[b, t0:t1, h] = torch.bmm(ds_CKG.transpose(1, 2), slots.k_CKD)
                rows_CKD = ws.get("rows_out", p_CKG, C, K, D)
                torch.bmm(ds_CKG, q_CGD, out=rows_CKD)
                dk_W[i][b, h].index_add_(0, slots.rows, rows_CKD.view(-1, D))
                torch.bmm(p_CKG, do_CGD, out=rows_CKD)
                dv_W[i][b, h].index_add_(0, slots.rows, rows_CKD.view(-1, D))

    run_on_workers([lambda i=i: run(i) for i in range(len(runs))])
    for dk, dv in zip(dk_W[1:], dv_W[1:], strict=True):
        dk_W[0] += dk
        dv_W[0] += dv
    # scores used scale·q: dq carries the scale; dk has it through q, which also carried
    # log2(e) for the base-2 scores (_scaled): ln 2 takes that back
    dk_BSHD, dv_BSHD = dk_W[0].mul_(LN2).transpose(1, 2), dv_W[0].transpose(1, 2)
    return dq_BTHGD.mul_(scale).view(B, T, HQ, D), dk_BSHD, dv_BSHD


class _SparseAttention(torch.autograd.Function):
    """Autograd wrapper of the torch path: saves the row lse, recomputes scores in backward."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q_BTHD: torch.Tensor,
        k_BSHD: torch.Tensor,
        v_BSHD: torch.Tensor,
        idx_BTHK: torch.Tensor,
        scale: float,
        want_probs: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the chunked forward; the probabilities are a non-differentiable side output."""
        o_BTHD, lse_BTH, probs_BTHK = _forward(q_BTHD, k_BSHD, v_BSHD, idx_BTHK, scale, want_probs)
        ctx.save_for_backward(q_BTHD, k_BSHD, v_BSHD, idx_BTHK, o_BTHD, lse_BTH)
        ctx.scale = scale
        if probs_BTHK is not None:
            ctx.mark_non_differentiable(probs_BTHK)
        return o_BTHD.to(q_BTHD.dtype), probs_BTHK

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, do_BTHD: torch.Tensor, _dprobs: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None, None]:
        """Gradients for q, k, v in their dtypes; indices, scale and the flag get none."""
        q_BTHD, k_BSHD, v_BSHD, idx_BTHK, o_BTHD, lse_BTH = ctx.saved_tensors
        dq, dk, dv = _backward(
            do_BTHD, q_BTHD, k_BSHD, v_BSHD, idx_BTHK, o_BTHD, lse_BTH, ctx.scale
        )
        return dq.to(q_BTHD.dtype), dk.to(k_BSHD.dtype), dv.to(v_BSHD.dtype), None, None, None


def sparse_attention_torch(
    q_BTHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    want_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Slot attention by query chunks: gather, two batched matmuls; differentiable in q, k, v.

    Inputs are validated by the caller. Each chunk of queries gathers its slot keys and values
    once per KV head (one read serves the G query heads of the group), scores them with one
    batched matmul and applies them with another; the backward recomputes the scores from the
    saved row lse. Chunks run on ``worker_count()`` worker threads owning disjoint
    query ranges. fp32 K/V whose heads are contiguous per token are read where they lie
    (a contiguous [B, S, H, D], or the two halves of one [B, S, 2, H, D] storage, whose
    selected tokens are gathered as whole K-and-V rows); other layouts and dtypes are copied
    to fp32 first. Returns (o_BTHD in q's dtype, fp32 slot probabilities or None).
    """
    return on_head_sets(_SparseAttention.apply, q_BTHD, k_BSHD, v_BSHD, indices, scale, want_probs)


# ----- public op -----------------------------------------------------------------------------


def sparse_attention(
    q_BTHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    indices: torch.Tensor,
    scale: float | None = None,
    return_probs: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over the keys in its index slots; returns o_BTHD.

    q_BTHD is [B, T, HQ, D], k_BSHD and v_BSHD [B, S, H, D] with HQ a multiple of H (query head
    h reads KV head h // (HQ // H)); the queries are the last T of the S keys. ``indices`` is
    int64 [B, T, K] (one key set per query, shared by all heads) or [B, T, H, K] (one per KV
    head): key positions, -1 for an unused slot. Unused and future slots are skipped; a row
    with no used slot outputs 0 with zero gradients; a repeated position counts once per slot.
    ``scale`` defaults to D**-0.5. With ``return_probs`` also returns the fp32 slot
    probabilities averaged over the query heads sharing the key set, [B, T, K] or [B, T, H, K]
    (0 on unused slots; no gradient). fp32 and bf16 inputs (fp32 accumulation); the output has
    q's dtype. ``backend`` is ``naive``, ``torch``, ``triton`` or ``auto`` (triton on CUDA,
    torch elsewhere); the torch backend uses ``worker_count()`` worker threads and
    must not be called from several threads at once. The index range is checked on every call
    (a host sync on CUDA). Raises ValueError naming the argument for bad shapes, dtypes,
    devices, index values or backend.
    """
    _validate(q_BTHD, k_BSHD, v_BSHD, indices)
    chosen = resolve_backend(_OP, backend, _AVAILABLE, q_BTHD)
    scale = q_BTHD.shape[-1] ** -0.5 if scale is None else float(scale)
    if chosen == "naive":
        o_BTHD, probs = sparse_attention_naive(q_BTHD, k_BSHD, v_BSHD, indices, scale)
    elif chosen == "torch":
        o_BTHD, probs = sparse_attention_torch(q_BTHD, k_BSHD, v_BSHD, indices, scale, return_probs)
    else:
        # imported on first use: it needs triton, and TRITON_INTERPRET is read at import time
        from .triton_attention import sparse_attention_triton

        o_BTHD, probs = sparse_attention_triton(
            q_BTHD, k_BSHD, v_BSHD, indices, scale, return_probs
        )
    return (o_BTHD, probs) if return_probs else o_BTHD
