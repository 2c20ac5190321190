"""Tests of the Triton DSA kernels (attention, indexer scores, top-k, KL) against the oracles.

The comparisons run in one child process started with TRITON_INTERPRET=1 (it must be set before
the kernel modules are imported), in fp32 on small shapes, with tiles shrunk to 16 so short rows
span several tiles and slot blocks. Legend as in test_kernels_dsa.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from kernel_utils import interpreted_report
from test_kernels_dsa import (
    assert_all_close,
    assert_same_selection,
    attention_results,
    cotangent_grads,
    make_index_inputs,
    make_qkv,
    random_indices,
)
from test_kernels_dsa_kl import kl_results, random_target

from sparsezoo.kernels.backend import triton_available
from sparsezoo.kernels.dsa import indexer_scores, indexer_topk, sparse_attention

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU"
)

# (B, T, S, HQ, H, D, K, per_head): G = 16 (a full group tile), GQA 2:1 with per-head sets,
# decode-like T < S and T = 1, K not a multiple of the 16-slot block, rows that are all -1
ATTENTION_CASES = [
    (2, 11, 11, 4, 2, 8, 9, False),
    (1, 19, 30, 16, 1, 16, 37, False),
    (1, 13, 13, 4, 2, 16, 20, True),
    (1, 1, 40, 4, 1, 8, 33, False),
]

# (B, T, S, N, E, U, topk): dense and slot scores, shared and per-group weights, T < S
INDEXER_CASES = [
    (2, 21, 21, 2, 8, None, 5),
    (1, 19, 40, 3, 16, 2, 7),
    (2, 1, 33, 4, 8, None, 20),
    (1, 23, 23, 2, 4, 2, 30),
]


def _run(check: Callable[[], None]) -> str:
    """'' when ``check`` passes, else the reason (exceptions included)."""
    try:
        check()
    except Exception as err:  # reported per case by the parent's parametrized tests
        return f"{type(err).__name__}: {err}"
    return ""


def compare_triton_with_naive() -> dict[str, str]:
    """Run every case through triton and the oracles; map case id to mismatch ('' if none)."""
    from sparsezoo.kernels.dsa import triton_attention, triton_indexer

    triton_attention.BLOCK_K = 16
    triton_indexer.BLOCK_T = triton_indexer.BLOCK_S = triton_indexer.BLOCK_K = 16
    # top-k chunks of a few queries, so every case crosses chunk borders
    triton_indexer._SCORE_ELEMENTS = 100
    report = {}
    for case in ATTENTION_CASES:
        B, T, S, HQ, H, D, K, per_head = case
        qkv = make_qkv(B, T, S, HQ, H, D)
        idx = random_indices((B, T, *((H,) if per_head else ()), K), S)

        def attention_check(qkv: Any = qkv, idx: torch.Tensor = idx) -> None:
            actual = attention_results("triton", qkv, idx, 0.3)
            assert_all_close(actual, attention_results("naive", qkv, idx, 0.3))
            assert all(torch.isfinite(g).all() for g in actual[2:])

        report[f"attention{case}"] = _run(attention_check)
    for case in INDEXER_CASES:
        B, T, S, N, E, U, topk = case
        inputs = make_index_inputs(B, T, S, N, E, U)
        idx = random_indices((B, T, *(() if U is None else (U,)), 11), S)

        def scores_check(inputs: Any = inputs, idx: torch.Tensor = idx) -> None:
            for slots in (None, idx):
                results = {}
                for backend in ("naive", "triton"):
                    out = indexer_scores(*inputs, indices=slots, backend=backend)
                    results[backend] = [out, *cotangent_grads(out, inputs)]
                assert_all_close(results["triton"], results["naive"])

        def topk_check(inputs: Any = inputs, topk: int = topk) -> None:
            actual = indexer_topk(*inputs, topk, backend="triton")
            expected = indexer_topk(*inputs, topk, backend="naive")
            assert_same_selection(actual, expected, indexer_scores(*inputs, backend="naive"))

        def kl_check(inputs: Any = inputs, idx: torch.Tensor = idx) -> None:
            target = random_target(idx.shape)
            expected = kl_results("naive", inputs, idx, target)
            assert_all_close(kl_results("triton", inputs, idx, target), expected)

        report[f"scores{case}"] = _run(scores_check)
        report[f"kl{case}"] = _run(kl_check)
        report[f"topk{case}"] = _run(topk_check)
    return report


@pytest.fixture(scope="module")
def triton_report() -> dict[str, str]:
    """Per-case results of ``compare_triton_with_naive`` from one interpreted child process."""
    return interpreted_report("test_kernels_dsa_triton")


@needs_triton
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_sparse_attention_interpreted_matches_naive(
    triton_report: dict[str, str], case: tuple[Any, ...]
) -> None:
    """Interpreted kernels give the naive output, slot probabilities and q, k, v gradients."""
    assert triton_report[f"attention{case}"] == ""


@needs_triton
@pytest.mark.parametrize("case", INDEXER_CASES, ids=str)
def test_indexer_scores_interpreted_match_naive(
    triton_report: dict[str, str], case: tuple[Any, ...]
) -> None:
    """Interpreted dense and slot score kernels give the naive scores and all gradients."""
    assert triton_report[f"scores{case}"] == ""


@needs_triton
@pytest.mark.parametrize("case", INDEXER_CASES, ids=str)
def test_indexer_kl_interpreted_matches_naive(
    triton_report: dict[str, str], case: tuple[Any, ...]
) -> None:
    """The KL over the Triton slot scores equals the oracle's, with all gradients."""
    assert triton_report[f"kl{case}"] == ""


@needs_triton
@pytest.mark.parametrize("case", INDEXER_CASES, ids=str)
def test_indexer_topk_interpreted_matches_naive_as_sets(
    triton_report: dict[str, str], case: tuple[Any, ...]
) -> None:
    """The Triton top-k path selects the oracle's index sets (up to near-ties)."""
    assert triton_report[f"topk{case}"] == ""


@needs_triton
@pytest.mark.skipif(
    bool(os.environ.get("TRITON_INTERPRET")), reason="CPU tensors are valid when interpreted"
)
def test_triton_rejects_cpu_tensors() -> None:
    """Without the interpreter the Triton kernels refuse CPU tensors with a clear error."""
    q, k, w = make_index_inputs(1, 5, 5, 2, 4, None)
    qq, kk, vv = make_qkv(1, 5, 5, 2, 1, 8)
    idx = random_indices((1, 5, 3), 5)
    with pytest.raises(ValueError, match="indexer_scores: backend='triton' needs CUDA"):
        indexer_scores(q, k, w, backend="triton")
    with pytest.raises(ValueError, match="indexer_topk: backend='triton' needs CUDA"):
        indexer_topk(q, k, w, 2, backend="triton")
    with pytest.raises(ValueError, match="sparse_attention: backend='triton' needs CUDA"):
        sparse_attention(qq, kk, vv, idx, backend="triton")


@needs_triton
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernels_on_gpu_match_naive(dtype: torch.dtype) -> None:
    """Compiled kernels at DSA-like shapes (G = 16, 256 slots, 4 x 64 indexer) match the fp32
    oracles: outputs and gradients within fp32 / bf16 tolerance, selections as sets."""
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    qkv = tuple(
        x.detach().cuda().to(dtype).requires_grad_() for x in make_qkv(1, 1500, 1500, 16, 1, 64)
    )
    reference = tuple(x.detach().float().requires_grad_() for x in qkv)
    idx = random_indices((1, 1500, 256), 1500).cuda()
    actual = attention_results("triton", qkv, idx)
    expected = attention_results("naive", reference, idx)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.float(), e, rtol=tol, atol=tol)
    inputs = tuple(
        x.detach().cuda().requires_grad_() for x in make_index_inputs(1, 1500, 1500, 4, 64, None)
    )
    for slots in (None, idx):
        out = indexer_scores(*inputs, indices=slots, backend="triton")
        ref = indexer_scores(*inputs, indices=slots, backend="naive")
        for a, e in zip(
            [out, *cotangent_grads(out, inputs)], [ref, *cotangent_grads(ref, inputs)], strict=True
        ):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    target = random_target(idx.shape).cuda()
    actual_kl = kl_results("triton", inputs, idx, target)
    for a, e in zip(actual_kl, kl_results("naive", inputs, idx, target), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    selected = indexer_topk(*inputs, 256, backend="triton")
    assert_same_selection(
        selected.cpu(),
        indexer_topk(*inputs, 256, backend="naive").cpu(),
        indexer_scores(*inputs, backend="naive").cpu(),
    )
