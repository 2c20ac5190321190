"""Fast CPU sliding-window attention: chunked queries over strided key tiles, aten flash calls.

Legend: B batch, T time, HQ query heads, H KV heads, G group size HQ // H, D head dim, C queries
per chunk, Y folded rows of a chunk (C·G), K keys per chunk tile (C + window - 1), N chunks of
one flash call (or batch rows).

Layout of the computation:
- head: queries 0 .. window-1 cannot reach past position 0, so for them the window is plain
  causal attention; one causal flash call over the first ``window`` tokens handles them.
- body: the remaining queries are cut into chunks of C. Chunk n's queries sit at positions
  window + n·C + i and need keys window + n·C + i - window + 1 .. that position, so the whole
  chunk reads the contiguous key span 1 + n·C .. 1 + n·C + K - 1. Those spans are overlapping
  strided views of K/V (``unfold``), and in chunk-relative coordinates the window is one band
  mask [C·G, K] shared by every chunk (each KV head's query heads folded into the rows, see
  ``kernels.group_rows``), so a group of chunks is one flash call; the partial last chunk is
  one more call with the mask's corner. No [T, T] mask or score matrix ever exists;
  scores live only inside aten's blocked flash kernel, which reads a KV head once per group of
  query heads (its own GQA). The backward adds the overlapping key-tile gradients back C rows
  at a time. Only q, k, v, the output and the row lse are saved (see
  ``sliding_window_attention_torch``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from ..group_rows import fold_group_rows, folded_band_mask, unfold_group_rows

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

# Tuned with fp32 runs against dense SDPA on 2 CPU cores (T 8k-16k, windows 128-2048). A tile
# holds C + window - 1 keys for C queries, so smaller chunks compute fewer masked-out scores, but
# their key tiles hold K and V (C + window - 1) / C times over (as views forward; the backward's
# tile gradients are copies, per group). Chunks of window / 8 were marginally faster forward,
# window / 4 marginally faster forward+backward at half the memory (unfolded rows).
_MIN_CHUNK = 32
_WINDOW_FRACTION = 4
# aten's CPU flash kernel runs its largest query tiles (256 rows) on calls of at least this
# many rows per head; chunks are halved while their folded rows stay there (see _chunk_size).
_BIG_TILE_ROWS = 768
# Queries per batch row in one flash call of the body (a group of chunks): its output, dq and
# the key-tile gradients are fresh tensors, so a group bounds them (8 MB of output at 16 heads
# of 64) while calls stay large. 4096 made the window's backward the peak of an NSA training
# step at 16k tokens (612 against 595 MB for the module; the same speed within noise).
_GROUP_ROWS = 2048


def _chunk_size(window: int, G: int) -> int:
    """Queries per chunk: a quarter of the window, at least 32 so small windows keep big
    matmuls, halved while the chunk's C·G folded rows keep the kernel's largest tiles (fewer
    masked-out scores for the same tile size). At 32k tokens, window 512, 16:1 heads, two
    threads: 64 queries took 0.44 s forward, 0.87 s backward, 128 took 0.48 / 0.94 s; with one
    query per KV head (G = 1) 128 stays (64: backward 1.25 s against 1.09 s at 16k)."""
    C = max(_MIN_CHUNK, window // _WINDOW_FRACTION)
    while C // 2 >= _MIN_CHUNK and C // 2 * G >= _BIG_TILE_ROWS:
        C //= 2
    return C


def _band_mask(
    C: int, window: int, G: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Chunk-relative additive window mask [C·G, C + window - 1] of a chunk's folded rows.

    Folded row i·G + g is query i of the chunk (``fold_group_rows``), at tile position
    i + window - 1, so its keys (t - window, t] are the tile columns i .. i + window - 1.
    """
    return folded_band_mask(C, G, C + window - 1, 0, window - 1, dtype, device)


def _piece_mask(
    piece: _Piece, window: int, masks: dict[int, torch.Tensor], q_BTHD: torch.Tensor, H: int
) -> torch.Tensor | None:
    """The band mask of a body or tail piece (None for the causal head), one per chunk size."""
    if piece.causal:
        return None
    if piece.C not in masks:
        G = q_BTHD.shape[2] // H
        masks[piece.C] = _band_mask(piece.C, window, G, q_BTHD.dtype, q_BTHD.device)
    return masks[piece.C]


@dataclass(frozen=True)
class _Piece:
    """One flash call of the layout: queries t0 .. t0 + n·C - 1 of batch row b (n chunks of C
    queries, ``b`` None for all rows at once) against key tiles starting at ``k0``
    (K = C + window - 1 keys per chunk, tile i at k0 + i·C); ``causal`` for the head piece,
    whose one tile is its own C keys."""

    b: int | None
    t0: int
    n: int
    C: int
    k0: int
    causal: bool


def _pieces(
    B: int, T: int, window: int, G: int, rows: tuple[int, int] | None = None
) -> list[_Piece]:
    """The head (first ``window`` queries, plain causal), the full chunks of the body in groups
    of at most _GROUP_ROWS queries per batch row, and the partial tail chunk; with ``rows``
    (t0, t1) only the pieces of those queries, the head included when t0 is 0 (then t1 must
    reach past it; else t0 must be past it). A body query t reads keys t - window + 1 .. t."""
    t0, t1 = (0, T) if rows is None else rows
    head = min(window, T)
    pieces = [_Piece(None, 0, 1, head, 0, True)] if t0 == 0 else []
    start = max(t0, head)
    C = _chunk_size(window, G)
    full = (t1 - start) // C
    per_group = max(1, _GROUP_ROWS // C)
    for b in range(B):
        for n0 in range(0, full, per_group):
            n = min(per_group, full - n0)
            q0 = start + n0 * C
            pieces.append(_Piece(b, q0, n, C, q0 - window + 1, False))
    tail = t1 - start - full * C
    if tail:
        pieces.append(_Piece(None, t1 - tail, 1, tail, t1 - tail - window + 1, False))
    return pieces


def _queries(x_BTX: torch.Tensor, piece: _Piece) -> torch.Tensor:
    """The piece's query rows of x as an [N, C, *rest] view (N = n chunks, or B rows)."""
    x = x_BTX[:, piece.t0 : piece.t0 + piece.n * piece.C]
    if piece.b is None:
        return x
    return x[piece.b].view(piece.n, piece.C, *x.shape[2:])


def _to_kernel(x_NCHr: torch.Tensor, piece: _Piece, H: int) -> torch.Tensor:
    """Query rows [N, C, HQ, *rest] in the piece's flash layout: [N, HQ, C, *rest] for the
    causal head (the kernel's causal mask is by row), folded [N, H, C·G, *rest] under the
    band mask (``fold_group_rows``: at 32k tokens, 16:1 heads, window 512, one core, the body
    forward took 0.77 s in chunks of 32 folded queries against 0.96 s in chunks of 128
    unfolded, the previous best)."""
    if piece.causal:
        return x_NCHr.transpose(1, 2)
    return fold_group_rows(x_NCHr, H)


def _from_kernel(y: torch.Tensor, piece: _Piece) -> torch.Tensor:
    """Inverse of ``_to_kernel`` for a flash result: back to [N, C, HQ, *rest]."""
    if piece.causal:
        return y.transpose(1, 2)
    return unfold_group_rows(y, piece.C)


def _tiles(x_BTHD: torch.Tensor, piece: _Piece, window: int) -> torch.Tensor:
    """The piece's key tiles of x as a [N, H, K, D] view (overlapping strided windows)."""
    K = piece.C if piece.causal else piece.C + window - 1
    x = x_BTHD[:, piece.k0 : piece.k0 + (piece.n - 1) * piece.C + K]
    if piece.b is None:
        return x.transpose(1, 2)
    return x[piece.b].unfold(0, K, piece.C).permute(0, 1, 3, 2)


def _add_tiles(dx_BTHD: torch.Tensor, g_NHKD: torch.Tensor, piece: _Piece, window: int) -> None:
    """Add a piece's key-tile gradients into dx (fp32 [B, T + C, H, D], C rows of slack).

    Tiles overlap, so they are added C rows at a time: piece p of every tile lands on rows
    k0 + (i + p)·C .. of tile i, one non-overlapping strided view per p.
    """
    if piece.b is None:
        dx_BTHD[:, piece.k0 : piece.k0 + g_NHKD.shape[2]] += g_NHKD.transpose(1, 2)
        return
    C, n = piece.C, piece.n
    K = g_NHKD.shape[2]
    for p0 in range(0, K, C):
        c = min(C, K - p0)
        rows = dx_BTHD[piece.b, piece.k0 + p0 : piece.k0 + p0 + n * C]
        rows.view(n, C, *rows.shape[1:])[:, :c] += g_NHKD[:, :, p0 : p0 + c].transpose(1, 2)


def _forward(
    q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor, window: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_BTHD in q's dtype, lse_BTH fp32), piece by piece."""
    B, T, HQ, _ = q_BTHD.shape
    H = k_BTHD.shape[2]
    o_BTHD = torch.empty_like(q_BTHD)
    lse_BTH = torch.empty(B, T, HQ, dtype=torch.float32, device=q_BTHD.device)
    masks: dict[int, torch.Tensor] = {}
    for piece in _pieces(B, T, window, HQ // H):
        mask = _piece_mask(piece, window, masks, q_BTHD, H)
        out_NHYD, lse_NHY = _flash(
            _to_kernel(_queries(q_BTHD, piece), piece, H),
            _tiles(k_BTHD, piece, window),
            _tiles(v_BTHD, piece, window),
            is_causal=piece.causal,
            attn_mask=mask,
            scale=scale,
        )
        _queries(o_BTHD, piece).copy_(_from_kernel(out_NHYD, piece))
        _queries(lse_BTH, piece).copy_(_from_kernel(lse_NHY, piece))
    return o_BTHD, lse_BTH


# what a backward piece feeds aten's flash backward besides q, k, v and the lse: given the piece,
# its mask and its query rows in kernel layout, the output gradient's rows and the output rows
PieceRows = Callable[[_Piece, torch.Tensor | None, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _backward(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    lse_BTH: torch.Tensor,
    window: int,
    scale: float,
    piece_rows: PieceRows,
    dq_BTHD: torch.Tensor | None = None,
    rows: tuple[int, int] | None = None,
    dkv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the inputs' dtypes; dk, dv accumulate in fp32 across pieces.

    ``piece_rows`` gives each piece's output-gradient and output rows: slices of saved tensors
    (``_WindowAttention``) or a recomputed output (``gated_window_backward``). A given
    ``dq_BTHD`` (contiguous, q's shape) gets dq added into it and is returned; else a zeroed
    one does. With ``rows`` (t0, t1) only those queries run (``_pieces``), ``dq_BTHD`` holds
    just their rows, and ``dkv`` (``window_dkv``'s accumulators, added into) collects dk and
    dv across calls; the returned dk and dv are then those accumulators, unconverted.
    """
    B, T, H, _ = k_BTHD.shape
    HQ = q_BTHD.shape[2]
    t0 = 0 if rows is None else rows[0]
    dq_BTHD = torch.zeros_like(q_BTHD) if dq_BTHD is None else dq_BTHD
    dk_BTHD, dv_BTHD = window_dkv(k_BTHD, window, HQ // H) if dkv is None else dkv
    masks: dict[int, torch.Tensor] = {}
    for piece in _pieces(B, T, window, HQ // H, rows):
        mask = _piece_mask(piece, window, masks, q_BTHD, H)
        q_rows = _to_kernel(_queries(q_BTHD, piece), piece, H)
        do_rows, o_rows = piece_rows(piece, mask, q_rows)
        dq_NHYD, dk_NHKD, dv_NHKD = _flash_backward(
            do_rows,
            q_rows,
            _tiles(k_BTHD, piece, window),
            _tiles(v_BTHD, piece, window),
            o_rows,
            _to_kernel(_queries(lse_BTH, piece), piece, H).contiguous(),
            0.0,
            piece.causal,
            attn_mask=mask,
            scale=scale,
        )
        dq_rows = _queries(dq_BTHD, replace(piece, t0=piece.t0 - t0))
        dq_rows += _from_kernel(dq_NHYD, piece)
        _add_tiles(dk_BTHD, dk_NHKD, piece, window)
        _add_tiles(dv_BTHD, dv_NHKD, piece, window)
    if dkv is not None:
        return dq_BTHD, dk_BTHD, dv_BTHD
    return dq_BTHD, dk_BTHD[:, :T].to(k_BTHD.dtype), dv_BTHD[:, :T].to(v_BTHD.dtype)


def window_dkv(k_BTHD: torch.Tensor, window: int, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed fp32 dk and dv accumulators [B, T + slack, H, D] of the backward (the slack takes
    the last chunk's key tile past T)."""
    B, T, H, D = k_BTHD.shape
    slack = _chunk_size(window, G)
    return tuple(
        torch.zeros(B, T + slack, H, D, dtype=torch.float32, device=k_BTHD.device) for _ in range(2)
    )


def gated_window_backward(
    dy_BTHD: torch.Tensor,
    gate_BTH: torch.Tensor,
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    lse_BTH: torch.Tensor,
    window: int,
    scale: float,
    dq_BTHD: torch.Tensor,
    rows: tuple[int, int],
    dkv: tuple[torch.Tensor, torch.Tensor],
    s_BTH: torch.Tensor,
) -> None:
    """Backward of ``gate · window_attention(q, k, v)`` for the queries ``rows`` (t0, t1)
    without the saved output: adds their dq into ``dq_BTHD`` (contiguous, those rows only),
    dk and dv into ``dkv`` (``window_dkv``) and writes their rows of ``s_BTH``, s = rowsum(dy ⊙
    o) the gradient of the gate. As in ``_pieces``, a range from 0 must reach past the
    window's causal head and any other must start past it.

    Inputs are contiguous and in one dtype (the forward's); ``lse_BTH`` is the forward's. Each
    piece recomputes its output rows with the forward's flash call, so only piece-sized
    outputs ever exist: a caller that keeps the gated sum of several branches instead of each
    branch's output (NSA's ``gated_branches``) saves a q-sized tensor for one more flash
    forward. The piece's output gradient is gate · dy.
    """
    H = k_BTHD.shape[2]
    acc = s_BTH.dtype

    def piece_rows(
        piece: _Piece, mask: torch.Tensor | None, q_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        o_rows, _ = _flash(
            q_rows,
            _tiles(k_BTHD, piece, window),
            _tiles(v_BTHD, piece, window),
            is_causal=piece.causal,
            attn_mask=mask,
            scale=scale,
        )
        dy_rows = _to_kernel(_queries(dy_BTHD, piece), piece, H)
        s_rows = torch.linalg.vecdot(dy_rows, o_rows).to(acc)
        _queries(s_BTH, piece).copy_(_from_kernel(s_rows, piece))
        gate_rows = _to_kernel(_queries(gate_BTH, piece), piece, H)
        return dy_rows * gate_rows.unsqueeze(-1).to(dy_rows.dtype), o_rows

    _backward(q_BTHD, k_BTHD, v_BTHD, lse_BTH, window, scale, piece_rows, dq_BTHD, rows, dkv)


class _WindowAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, the output and the row lse; nothing of tile size."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q_BTHD: torch.Tensor,
        k_BTHD: torch.Tensor,
        v_BTHD: torch.Tensor,
        window: int,
        scale: float,
    ) -> torch.Tensor:
        """Run the pieces; the output is the tensor the caller gets (saved, not copied)."""
        q_BTHD, k_BTHD, v_BTHD = (x.contiguous() for x in (q_BTHD, k_BTHD, v_BTHD))
        o_BTHD, lse_BTH = _forward(q_BTHD, k_BTHD, v_BTHD, window, scale)
        ctx.save_for_backward(q_BTHD, k_BTHD, v_BTHD, o_BTHD, lse_BTH)
        ctx.window, ctx.scale = window, scale
        return o_BTHD

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, do_BTHD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        """Gradients for q, k, v; window and scale get none."""
        q_BTHD, k_BTHD, v_BTHD, o_BTHD, lse_BTH = ctx.saved_tensors
        do_BTHD = do_BTHD.to(q_BTHD.dtype).contiguous()
        H = k_BTHD.shape[2]

        def piece_rows(
            piece: _Piece, _mask: torch.Tensor | None, _q_rows: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            do_rows, o_rows = (_to_kernel(_queries(x, piece), piece, H) for x in (do_BTHD, o_BTHD))
            return do_rows, o_rows

        grads = _backward(q_BTHD, k_BTHD, v_BTHD, lse_BTH, ctx.window, ctx.scale, piece_rows)
        return (*grads, None, None)


def sliding_window_attention_torch(
    q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor, window: int, scale: float
) -> torch.Tensor:
    """Sliding-window attention through aten's flash kernels on chunked queries; differentiable
    in q, k and v.

    Inputs are validated by the caller. The first ``window`` queries are causal attention; the
    rest go in chunks of C queries whose key tiles (C + window - 1 keys) are overlapping strided
    views of K/V under one shared band mask, a group of chunks per flash call, then the partial
    tail chunk. Query heads read their KV head through the kernel's own GQA (no K/V repeat).
    Only q, k, v, the output and the row lse are kept for the backward: SDPA over padded,
    folded copies kept a padded copy of q and its own copy of the output besides the result
    (252 MB at 32k tokens, 16 heads of 64). Returns o_BTHD in q's dtype (bf16 accumulates in
    fp32).
    """
    return _WindowAttention.apply(q_BTHD, k_BTHD, v_BTHD, window, scale)
