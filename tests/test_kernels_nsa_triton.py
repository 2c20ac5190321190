"""Tests of the Triton NSA kernels (selected and compressed attention) against the naive oracles.

Legend: B batch, T time, HQ query heads, H KV heads, G group size HQ // H, D head dim,
S selection slots, NB selection blocks, N compressed tokens.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from kernel_utils import LargestTensor, interpreted_report

from sparsezoo.kernels.backend import triton_available
from sparsezoo.kernels.nsa.compression import compressed_attention, num_compressed
from sparsezoo.kernels.nsa.selection import selected_attention

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU"
)


def make_qkv(
    B: int, T: int, HQ: int, H: int, D: int, N: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded random fp32 leaf tensors q [B, T, HQ, D] and k, v [B, N or T, H, D] needing grad."""
    gen = torch.Generator().manual_seed(0)
    N = T if N is None else N
    q_BTHD = torch.randn(B, T, HQ, D, generator=gen).requires_grad_()
    k_BNHD = torch.randn(B, N, H, D, generator=gen).requires_grad_()
    v_BNHD = torch.randn(B, N, H, D, generator=gen).requires_grad_()
    return q_BTHD, k_BNHD, v_BNHD


def make_indices(B: int, T: int, H: int, S: int, block_size: int) -> torch.Tensor:
    """NSA-like int64 block_indices [B, T, H, S] with every edge case the kernels must handle.

    Each row holds block 0, the query's own (partial) block and the one before, then random
    legal blocks, -1 where fewer than S are legal; then about 1 slot in 6 is cleared to -1,
    every 7th position gets an all -1 row, some rows get the (future) block after their own,
    and the slots are shuffled so -1 and forced blocks sit anywhere. Ids stay distinct per row.
    """
    gen = torch.Generator().manual_seed(2)
    NB = -(-T // block_size)
    j_N = torch.arange(NB)
    own_T1 = (torch.arange(T) // block_size)[:, None]
    own_1T11 = own_T1.view(1, T, 1, 1)
    forced_BTHN = (j_N == 0) | (j_N == own_1T11) | (j_N == own_1T11 - 1)
    scores_BTHN = torch.rand(B, T, H, NB, generator=gen)
    scores_BTHN = torch.where(forced_BTHN, 2.0, scores_BTHN)
    scores_BTHN = torch.where(j_N <= own_1T11, scores_BTHN, -1.0)
    top_BTHS, idx_BTHS = scores_BTHN.topk(min(S, NB), dim=-1)
    idx_BTHS = torch.where(top_BTHS < 0, -1, idx_BTHS)
    idx_BTHS = torch.cat([idx_BTHS, idx_BTHS.new_full((B, T, H, S - idx_BTHS.shape[-1]), -1)], -1)
    idx_BTHS[torch.rand(B, T, H, S, generator=gen) < 1 / 6] = -1
    future_BTH = (own_T1 + 1 < NB) & (torch.rand(B, T, H, generator=gen) < 0.3)
    idx_BTHS[..., -1] = torch.where(future_BTH, own_T1 + 1, idx_BTHS[..., -1])
    idx_BTHS[:, 5::7] = -1
    order_BTHS = torch.rand(B, T, H, S, generator=gen).argsort(dim=-1)
    return idx_BTHS.gather(-1, order_BTHS)


def grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], seed: int = 1) -> list[torch.Tensor]:
    """Gradients of inputs under a fixed random projection of ``out`` (a seeded cotangent)."""
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return list(torch.autograd.grad(out, inputs, cotangent.to(out)))


def selection_outputs(
    fn: Callable[..., torch.Tensor],
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    idx_BTHS: torch.Tensor,
    block_size: int,
    scale: float | None,
) -> list[torch.Tensor]:
    """[o, dq, dk, dv] of a selected-attention implementation ``fn(q, k, v, idx, bs, scale)``."""
    o_BTHD = fn(*qkv, idx_BTHS, block_size, scale)
    return [o_BTHD, *grads(o_BTHD, qkv)]


def compression_outputs(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    block_size: int,
    stride: int,
) -> list[torch.Tensor]:
    """[o, lse, dq, dkcmp, dvcmp] of a compressed-attention implementation."""
    o_BTHD, lse_BTH = fn(*qkv, block_size, stride, None)
    return [o_BTHD, lse_BTH, *grads(o_BTHD, qkv)]


def naive_selection(*args: Any) -> torch.Tensor:
    """The selected_attention oracle (validated dispatcher, naive backend)."""
    return selected_attention(*args, backend="naive")


def naive_compression(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The compressed_attention oracle (validated dispatcher, naive backend)."""
    return compressed_attention(*args, backend="naive")


# (B, T, HQ, H, D, block_size, S, scale): odd T, GQA 4:1 and 2:2, G = 16 (the full group tile),
# S above the number of blocks, a block size that is not a power of two, T = 1, and 131 blocks
# of 2 keys (past 128 blocks, where tile-local offsets break). The numpy interpreter runs one
# program per (t, KV head) at ~50 ms each, which bounds T · H here.
SELECTION_CASES = [
    (2, 37, 4, 1, 16, 8, 3, None),
    (1, 97, 2, 2, 8, 16, 3, None),
    (1, 67, 16, 1, 16, 8, 4, 0.3),
    (1, 40, 4, 2, 8, 5, 10, None),
    (2, 1, 2, 1, 8, 4, 2, None),
    (1, 262, 2, 1, 8, 2, 3, None),
]

# (B, T, HQ, H, D, block_size, stride, tile): 16-wide tiles make short sequences span many
# query and compressed blocks; stride = block_size; T < block_size (no compressed token at all);
# 130 compressed tokens (past 128); the default 64-wide tiles
COMPRESSION_CASES = [
    (2, 37, 4, 1, 16, 8, 4, 16),
    (1, 131, 2, 2, 8, 16, 8, 16),
    (1, 67, 16, 1, 16, 8, 8, 16),
    (1, 5, 2, 1, 8, 8, 4, 16),
    (1, 262, 2, 1, 8, 4, 2, 16),
    (1, 300, 4, 2, 16, 32, 16, 64),
]


def fp64(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """fp64 leaf copies of fp32 inputs, for an oracle whose own rounding is negligible.

    With an fp32 oracle, one CI run saw the compression lse off by 4.7e-5 (2.4e-7 in every run
    here), so either side could have been at fault; against fp64 every difference is the kernel's.
    """
    return tuple(x.detach().double().requires_grad_() for x in tensors)


def fp32(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The oracle's fp64 outputs rounded to fp32, the kernels' dtype."""
    return [x.float() for x in tensors]


def _mismatch(
    names: tuple[str, ...], actual: list[torch.Tensor], expected: list[torch.Tensor]
) -> str:
    """'' when every actual tensor equals its expected one within fp32 tolerance, else why not."""
    try:
        for name, a, e in zip(names, actual, expected, strict=True):
            torch.testing.assert_close(
                a, e, rtol=1e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}"
            )
    except AssertionError as err:
        return str(err)
    return ""


def compare_triton_with_naive() -> dict[str, str]:
    """Run every case through triton and the oracles; map case id to mismatch ('' if none).

    Runs in a child process started with TRITON_INTERPRET=1, which must be set before the
    kernel modules are imported. Module constants are shrunk so short sequences exercise every
    path: 16 queries per dK/dV program (block 0's list is split and reduced) and, per case, the
    compressed kernels' tiles. Compressed cases also check the queries that see no token:
    output 0, lse -inf, finite gradients.
    """
    from sparsezoo.kernels.nsa import triton_compression, triton_selection

    triton_selection.QUERIES_PER_PROGRAM = 16
    report = {}
    for case in SELECTION_CASES:
        B, T, HQ, H, D, block_size, S, scale = case
        qkv = make_qkv(B, T, HQ, H, D)
        idx_BTHS = make_indices(B, T, H, S, block_size)
        expected = fp32(selection_outputs(naive_selection, fp64(qkv), idx_BTHS, block_size, scale))
        scale_or_default = D**-0.5 if scale is None else scale
        try:
            actual = selection_outputs(
                triton_selection.selected_attention_triton,
                qkv,
                idx_BTHS,
                block_size,
                scale_or_default,
            )
            report[f"selection{case}"] = _mismatch(("o", "dq", "dk", "dv"), actual, expected)
        except Exception as err:  # reported per case by the parent's parametrized tests
            report[f"selection{case}"] = f"{type(err).__name__}: {err}"
    for case in COMPRESSION_CASES:
        B, T, HQ, H, D, block_size, stride, tile = case
        triton_compression.BLOCK_M = triton_compression.BLOCK_N = tile
        qkv = make_qkv(B, T, HQ, H, D, num_compressed(T, block_size, stride))
        expected = fp32(compression_outputs(naive_compression, fp64(qkv), block_size, stride))
        try:
            actual = compression_outputs(
                lambda q, k, v, bs, st, _: triton_compression.compressed_attention_triton(
                    q, k, v, bs, st, q.shape[-1] ** -0.5
                ),
                qkv,
                block_size,
                stride,
            )
            names = ("o", "lse", "dq", "dkcmp", "dvcmp")
            why = _mismatch(names, actual, expected)
            blind = min(block_size - 1, T)
            if not why and not (actual[0][:, :blind] == 0).all():
                why = f"queries before {blind} see no token but got a nonzero output"
            if not why and not (actual[1][:, :blind] == float("-inf")).all():
                why = f"queries before {blind} see no token but got a finite lse"
            if not why and not all(torch.isfinite(g).all() for g in actual[2:]):
                why = "non-finite gradient"
            report[f"compression{case}"] = why
        except Exception as err:  # reported per case by the parent's parametrized tests
            report[f"compression{case}"] = f"{type(err).__name__}: {err}"
    return report


@pytest.fixture(scope="module")
def triton_report() -> dict[str, str]:
    """Per-case results of ``compare_triton_with_naive`` from one interpreted child process."""
    return interpreted_report("test_kernels_nsa_triton")


@needs_triton
@pytest.mark.parametrize("case", SELECTION_CASES, ids=str)
def test_selection_interpreted_matches_naive(
    triton_report: dict[str, str], case: tuple[Any, ...]
) -> None:
    """Interpreted selection kernels give the naive output and q, k, v gradients in fp32."""
    assert triton_report[f"selection{case}"] == ""


@needs_triton
@pytest.mark.parametrize("case", COMPRESSION_CASES, ids=str)
def test_compression_interpreted_matches_naive(
    triton_report: dict[str, str], case: tuple[Any, ...]
) -> None:
    """Interpreted compression kernels give the naive o, lse and gradients; blind queries are 0."""
    assert triton_report[f"compression{case}"] == ""


def test_make_indices_covers_the_edge_cases() -> None:
    """The index generator really produces forced, -1, all -1, future and distinct entries."""
    T, block_size = 131, 16
    idx_BTHS = make_indices(2, T, 2, 5, block_size)
    own_T11 = (torch.arange(T) // block_size).view(1, T, 1, 1)
    assert (idx_BTHS == -1).all(-1)[:, 5::7].all()
    assert ((idx_BTHS == -1).any(-1) & (idx_BTHS >= 0).any(-1)).any()
    assert (idx_BTHS * block_size > torch.arange(T).view(1, T, 1, 1)).any()
    assert ((idx_BTHS == own_T11).any(-1) | (idx_BTHS == -1).all(-1)).float().mean() > 0.5
    sorted_BTHS = idx_BTHS.sort(-1).values
    assert not ((sorted_BTHS[..., 1:] == sorted_BTHS[..., :-1]) & (sorted_BTHS[..., 1:] >= 0)).any()


@needs_triton
def test_inverted_index_lists_each_blocks_queries_in_order() -> None:
    """The CSR holds, per (b, h, block), exactly the queries that selected it, increasing in t.

    Checked against a Python listing on a small case; on a long one it never builds a tensor
    near the size of a dense [T, NB] selection mask.
    """
    from sparsezoo.kernels.nsa.triton_selection import _inverted_index

    B, T, H, S, block_size = 2, 75, 3, 4, 8
    NB = -(-T // block_size)
    idx_BTHS = make_indices(B, T, H, S, block_size)
    offsets, queries_E = _inverted_index(idx_BTHS, block_size, NB)
    for b in range(B):
        for h in range(H):
            for j in range(NB):
                s = (b * H + h) * NB + j
                listed = queries_E[offsets[s] : offsets[s + 1]].tolist()
                chose = [
                    t for t in range(T) if j in idx_BTHS[b, t, h].tolist() and j * block_size <= t
                ]
                assert listed == chose, (b, h, j)
    T, block_size = 8192, 4
    idx_BTHS = make_indices(1, T, 1, 4, block_size)
    with LargestTensor() as largest:
        _inverted_index(idx_BTHS, block_size, T // block_size)
    assert largest.numel <= T * 4


@needs_triton
@pytest.mark.parametrize("per_program", [1, 3, 1000])
def test_split_work_covers_every_segment_once(per_program: int) -> None:
    """dK/dV programs tile each CSR segment in order, at most per_program entries each.

    Every segment, empty ones included, gets a program; a segment needing several gets
    consecutive partial slots and one reduce row (segment, first slot, count); others get -1.
    """
    from sparsezoo.kernels.nsa.triton_selection import _split_work

    offsets = torch.tensor([0, 0, 5, 6, 6, 13, 16])
    chunks_C4, splits_X3, partials = _split_work(offsets, per_program)
    expected_chunks, expected_splits, slot = [], [], 0
    for s in range(len(offsets) - 1):
        lo, hi = offsets[s].item(), offsets[s + 1].item()
        starts = list(range(lo, hi, per_program)) or [lo]
        split = len(starts) > 1
        for start in starts:
            expected_chunks.append([s, start, min(start + per_program, hi), slot if split else -1])
            slot += split
        if split:
            expected_splits.append([s, slot - len(starts), len(starts)])
    assert chunks_C4.tolist() == expected_chunks
    assert splits_X3.reshape(-1, 3).tolist() == expected_splits
    assert partials == slot


@needs_triton
@pytest.mark.skipif(
    bool(os.environ.get("TRITON_INTERPRET")), reason="CPU tensors are valid when interpreted"
)
def test_triton_rejects_cpu_tensors() -> None:
    """Without the interpreter the Triton kernels refuse CPU tensors with a clear error."""
    from sparsezoo.kernels.nsa.triton_compression import compressed_attention_triton
    from sparsezoo.kernels.nsa.triton_selection import selected_attention_triton

    q_BTHD, k_BTHD, v_BTHD = make_qkv(1, 10, 2, 1, 8)
    idx_BTHS = make_indices(1, 10, 1, 2, 4)
    with pytest.raises(ValueError, match="selected_attention: backend='triton' needs CUDA"):
        selected_attention_triton(q_BTHD, k_BTHD, v_BTHD, idx_BTHS, 4, 0.3)
    with pytest.raises(ValueError, match="compressed_attention: backend='triton' needs CUDA"):
        compressed_attention_triton(q_BTHD, k_BTHD[:, :4], v_BTHD[:, :4], 4, 2, 0.3)


def _on_gpu(
    tensors: tuple[torch.Tensor, ...], dtype: torch.dtype
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """CUDA leaves in ``dtype`` and matching fp32 leaves for the oracle, both needing grad."""
    fast = tuple(x.detach().cuda().to(dtype).requires_grad_() for x in tensors)
    reference = tuple(x.detach().float().requires_grad_() for x in fast)
    return fast, reference


def _assert_all_close(
    names: tuple[str, ...], actual: list[torch.Tensor], expected: list[torch.Tensor], tol: float
) -> None:
    """Every actual tensor, in fp32, within ``tol`` of its fp32 expected one."""
    for name, a, e in zip(names, actual, expected, strict=True):
        torch.testing.assert_close(
            a.float(), e, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}"
        )


@needs_triton
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_selection_on_gpu_matches_naive(dtype: torch.dtype) -> None:
    """Compiled selection kernels at paper-like tiles (G = 16, block 64) match the fp32 oracle.

    bf16 within bf16 tolerance; the atomic-free backward is bitwise deterministic.
    """
    from sparsezoo.kernels.nsa.triton_selection import selected_attention_triton

    T, block_size = 3000, 64
    qkv, reference = _on_gpu(make_qkv(1, T, 16, 1, 64), dtype)
    idx_BTHS = make_indices(1, T, 1, 16, block_size).cuda()
    expected = selection_outputs(naive_selection, reference, idx_BTHS, block_size, None)
    actual = selection_outputs(selected_attention_triton, qkv, idx_BTHS, block_size, 64**-0.5)
    assert all(x.dtype == dtype for x in actual)
    _assert_all_close(
        ("o", "dq", "dk", "dv"), actual, expected, 1e-4 if dtype == torch.float32 else 5e-2
    )
    again = selection_outputs(selected_attention_triton, qkv, idx_BTHS, block_size, 64**-0.5)
    assert all(torch.equal(a, b) for a, b in zip(actual, again, strict=True))


@needs_triton
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compression_on_gpu_matches_naive(dtype: torch.dtype) -> None:
    """Compiled compression kernels at paper settings (block 32, stride 16) match the oracle."""
    from sparsezoo.kernels.nsa.triton_compression import compressed_attention_triton

    T, block_size, stride = 3000, 32, 16
    N = num_compressed(T, block_size, stride)
    qkv, reference = _on_gpu(make_qkv(1, T, 16, 2, 64, N), dtype)
    expected = compression_outputs(naive_compression, reference, block_size, stride)
    actual = compression_outputs(
        lambda q, k, v, bs, st, _: compressed_attention_triton(q, k, v, bs, st, 64**-0.5),
        qkv,
        block_size,
        stride,
    )
    assert actual[0].dtype == dtype and actual[1].dtype == torch.float32
    names = ("o", "lse", "dq", "dkcmp", "dvcmp")
    _assert_all_close(names, actual, expected, 1e-4 if dtype == torch.float32 else 5e-2)
