"""Tests of the Triton compressor phi (compress_kv) and block selection against the naive oracles.

Legend: B batch, T time, N compressed tokens, HQ query heads, H KV heads, G group size HQ // H,
D head dim, L block length l, F phi hidden width, n selected blocks.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import pytest
import torch
from kernel_utils import interpreted_report
from test_kernels_nsa_compression import make_phi, phi_output_and_grads
from test_kernels_nsa_select import (
    assert_same_picks,
    check_selection_rules,
    importance_fp64,
    make_inputs,
    one_hot_case,
)

from sparsezoo.kernels.backend import triton_available
from sparsezoo.kernels.nsa.select import select_blocks

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU"
)

PHI_NAMES = ("out", "dx", "dpos", "dw1", "db1", "dw2", "db2")

# (B, T, H, D, l, d, F, tile): odd T with d < l; T < l (empty output, zero gradients); T == l
# with l/d = 4 blocks per token; d == l with F over two hidden tiles; the paper's l = 32,
# d = 16; 499 blocks at the default 64-wide tiles. 16-wide tiles make the short cases span
# several token, hidden and dx tiles.
PHI_CASES = [
    (2, 37, 2, 4, 8, 4, 16, 16),
    (2, 5, 2, 4, 8, 4, 16, 16),
    (1, 8, 2, 4, 8, 2, 16, 16),
    (2, 99, 3, 4, 8, 8, 40, 16),
    (1, 301, 1, 8, 32, 16, 24, 16),
    (1, 2003, 2, 8, 8, 4, 16, 64),
]
# the biases as strided views (every other element of a longer tensor): the kernel reads them
# at unit stride, so the wrapper makes them contiguous
STRIDED_BIAS_CASE = (2, 39, 2, 4, 8, 4, 16, 16)

# (B, T, HQ, H, D, l, d, l', n, gain, blind, tile): odd T, groups of 1, 2, 3 and 4, l < l'
# (Eq. 9 overlap of 3 or 5 tokens), n above the number of legal blocks (-1 padding), T < l (no
# compressed token: every lse is -inf), zero queries (uniform probabilities, so ties
# everywhere; exact ones when l = d = l'), 19, 22 and 130 selection blocks (the running top
# list merges several chunks and carries the overlap across them; with l'/d = 3 a chunk's 48
# tokens sit in a 64-token tile that also holds the next chunk's first ones). ``blind`` sets
# lse = -inf on every 9th query, one that then sees no compressed token. ``tile`` is the
# kernel's query and token tile: 16 makes short sequences span many of both, and a chunk of
# blocks several token tiles; the long case keeps the defaults, as the interpreter runs ~40
# programs a second.
SELECT_CASES = [
    (2, 301, 4, 2, 8, 32, 16, 64, 5, 1.0, False, 16),
    (1, 37, 4, 1, 8, 8, 4, 8, 3, 1.0, True, 16),
    (1, 333, 2, 2, 8, 16, 8, 32, 4, 1.0, False, 16),
    (1, 129, 2, 1, 8, 8, 4, 16, 20, 1.0, True, 16),
    (1, 7, 2, 1, 8, 8, 4, 8, 3, 1.0, False, 16),
    (1, 90, 2, 1, 8, 4, 4, 4, 5, 0.0, False, 16),
    (1, 150, 4, 2, 8, 16, 8, 32, 4, 0.0, True, 16),
    (1, 700, 3, 1, 8, 32, 8, 32, 5, 1.0, True, 16),
    (1, 450, 2, 1, 8, 16, 8, 24, 4, 1.0, False, None),
    (1, 1040, 2, 1, 8, 8, 4, 8, 6, 1.0, False, None),
]


def _phi_mismatch(
    actual: list[torch.Tensor], expected: list[torch.Tensor], torch_fp32: list[torch.Tensor]
) -> str:
    """'' when output and every gradient match the fp64 oracle's (rounded to fp32), else why not.

    The allowed absolute error is 2e-5 or twice that of torch's own fp32 path, whichever is
    larger: the weight gradients sum over all B·N·H rows, and at hundreds of blocks torch's
    fp32 matmuls are themselves ~5e-5 off the fp64 result.
    """
    try:
        for name, a, e, ref in zip(PHI_NAMES, actual, expected, torch_fp32, strict=True):
            atol = max(2e-5, 2 * (ref - e).abs().max().item()) if e.numel() else 2e-5
            torch.testing.assert_close(
                a, e, rtol=1e-5, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
            )
    except AssertionError as err:
        return str(err)
    return ""


def select_inputs(case: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, kcmp and lse of a SELECT_CASES entry, with the blind queries' lse set to -inf."""
    B, T, HQ, H, D, L, d, _, _, gain, blind, _ = case
    q_BTHD, kcmp_BNHD, lse_BTH = make_inputs(B, T, HQ, H, D, L, d, gain)
    if blind:
        lse_BTH[:, ::9] = float("-inf")
    return q_BTHD, kcmp_BNHD, lse_BTH


def _select_mismatch(case: tuple[Any, ...], actual_BTHS: torch.Tensor) -> str:
    """'' when the triton picks are the oracle's (up to fp32 near-ties) and obey the rules."""
    inputs = select_inputs(case)
    L, d, ls, n = case[5:9]
    knobs = {"block_size": L, "stride": d, "select_size": ls, "n_select": n}
    expected_BTHS = select_blocks(*inputs, **knobs, backend="naive")
    try:
        check_selection_rules(actual_BTHS, ls, n)
        assert_same_picks(
            actual_BTHS, expected_BTHS, importance_fp64(*inputs, L, d, ls), 1e-6, 0.002
        )
    except AssertionError:
        # the child runs without pytest's assertion rewriting: a bare assert has no message,
        # so the failing line is reported instead
        return traceback.format_exc(limit=-1)
    return ""


def compare_triton_with_naive() -> dict[str, str]:
    """Run every case through the triton backends and the oracles; case id -> mismatch or ''.

    Runs in a child process started with TRITON_INTERPRET=1, which must be set before the
    kernel modules are imported, and goes through the public dispatchers (backend='triton').
    Tiles are set per case, small ones so that short sequences cross many tile boundaries.
    """
    from sparsezoo.kernels.nsa import triton_compress_kv, triton_select

    report = {}
    for case in [*PHI_CASES, STRIDED_BIAS_CASE]:
        B, T, H, D, L, d, hidden, tile = case
        triton_compress_kv.BLOCK_N = triton_compress_kv.BLOCK_F = tile
        inputs = make_phi(B, T, H, D, L, hidden)
        key = f"phi{case}"
        if case == STRIDED_BIAS_CASE:
            key = f"strided{case}"
            for i in (3, 5):  # b1, b2
                strided = torch.zeros(2 * inputs[i].numel())[::2]
                inputs[i] = strided.copy_(inputs[i].detach()).requires_grad_()
        # the oracle runs on fp64 copies, so every difference is the kernel's own rounding
        fp64_inputs = [x.detach().double().requires_grad_() for x in inputs]
        expected = [x.float() for x in phi_output_and_grads("naive", fp64_inputs, L, d)]
        torch_fp32 = phi_output_and_grads("torch", inputs, L, d)
        try:
            report[key] = _phi_mismatch(
                phi_output_and_grads("triton", inputs, L, d), expected, torch_fp32
            )
        except Exception as err:  # reported per case by the parent's parametrized tests
            report[key] = f"{type(err).__name__}: {err}"
    default_tiles = (triton_select.BLOCK_M, triton_select.BLOCK_C)
    for case in SELECT_CASES:
        L, d, ls, n = case[5:9]
        tile = case[-1]
        triton_select.BLOCK_M, triton_select.BLOCK_C = (
            default_tiles if tile is None else (tile, tile)
        )
        knobs = {"block_size": L, "stride": d, "select_size": ls, "n_select": n}
        try:
            actual_BTHS = select_blocks(*select_inputs(case), **knobs, backend="triton")
            report[f"select{case}"] = _select_mismatch(case, actual_BTHS)
        except Exception as err:  # reported per case by the parent's parametrized tests
            report[f"select{case}"] = f"{type(err).__name__}: {err}"
    triton_select.BLOCK_M, triton_select.BLOCK_C = default_tiles
    try:
        report["hidden"] = _hidden_huge_mismatch()
    except Exception as err:  # reported by the parent's test
        report["hidden"] = f"{type(err).__name__}: {err}"
    return report


def _hidden_huge_mismatch() -> str:
    """'' when a hidden token whose probability overflows fp32 changes no pick, else why not.

    As in test_kernels_nsa_select: with l = d = l' = 4, queries 20..22 see tokens 0..4, while
    token 5 (their own block) scores exp(200) = inf. Its inf must be masked before the overlap
    dot, where inf · 0 would turn every block of the chunk into NaN.
    """
    scores_GN = torch.zeros(2, 6)
    scores_GN[0, 5] = 200.0
    scores_GN[1, 2] = 1.0
    inputs = one_hot_case(scores_GN, 24)
    knobs = {"block_size": 4, "stride": 4, "select_size": 4, "n_select": 4, "scale": 1.0}
    actual_BTHS = select_blocks(*inputs, **knobs, backend="triton")
    expected_BTHS = select_blocks(*inputs, **knobs, backend="naive")
    if torch.equal(actual_BTHS, expected_BTHS):
        return ""
    picks = [idx_BTHS[0, 20:23, 0].tolist() for idx_BTHS in (actual_BTHS, expected_BTHS)]
    return f"queries 20..22 picked {picks[0]}, naive {picks[1]}"


@pytest.fixture(scope="module")
def triton_report() -> dict[str, str]:
    """Per-case results of ``compare_triton_with_naive`` from one interpreted child process."""
    return interpreted_report("test_kernels_nsa_triton_ops")


@needs_triton
@pytest.mark.parametrize("case", PHI_CASES, ids=str)
def test_compress_kv_interpreted_matches_naive(
    triton_report: dict[str, str], case: tuple[Any, ...]
) -> None:
    """Interpreted phi kernels give the naive output and the gradients of x and every weight."""
    assert triton_report[f"phi{case}"] == ""


@needs_triton
def test_compress_kv_interpreted_reads_strided_biases(triton_report: dict[str, str]) -> None:
    """Biases given as strided views give the naive output and gradients."""
    assert triton_report[f"strided{STRIDED_BIAS_CASE}"] == ""


@needs_triton
@pytest.mark.parametrize("case", SELECT_CASES, ids=str)
def test_select_blocks_interpreted_matches_naive(
    triton_report: dict[str, str], case: tuple[Any, ...]
) -> None:
    """The interpreted selection kernel picks the naive blocks (up to fp32 near-ties)."""
    assert triton_report[f"select{case}"] == ""


@needs_triton
def test_select_blocks_interpreted_hidden_tokens_never_leak(triton_report: dict[str, str]) -> None:
    """An overflowing probability of a not-yet-visible token changes no pick and gives no NaN."""
    assert triton_report["hidden"] == ""


@needs_triton
@pytest.mark.skipif(
    bool(os.environ.get("TRITON_INTERPRET")), reason="CPU tensors are valid when interpreted"
)
def test_triton_ops_reject_cpu_tensors() -> None:
    """Without the interpreter the phi and selection kernels refuse CPU tensors clearly."""
    from sparsezoo.kernels.nsa.triton_compress_kv import compress_kv_triton
    from sparsezoo.kernels.nsa.triton_select import select_blocks_triton

    with pytest.raises(ValueError, match="compress_kv: backend='triton' needs CUDA"):
        compress_kv_triton(*make_phi(1, 10, 1, 4, 4, 8), 4, 2)
    with pytest.raises(ValueError, match="select_blocks: backend='triton' needs CUDA"):
        select_blocks_triton(*make_inputs(1, 10, 2, 1, 8, 4, 2), 4, 2, 8, 3, 0.3)


@needs_triton
@needs_cuda
def test_compress_kv_on_gpu_matches_naive() -> None:
    """Compiled phi kernels at the paper's l = 32, d = 16, D = 64, F = 64 match the fp32 oracle."""
    inputs = [x.detach().cuda().requires_grad_() for x in make_phi(2, 3000, 4, 64, 32, 64)]
    expected = phi_output_and_grads("naive", inputs, 32, 16)
    actual = phi_output_and_grads("triton", inputs, 32, 16)
    for name, a, e in zip(PHI_NAMES, actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@needs_triton
@needs_cuda
def test_select_blocks_on_gpu_matches_naive() -> None:
    """The compiled selection kernel at paper settings (G = 16, n = 16) picks the naive blocks."""
    case = (1, 3000, 16, 1, 64, 32, 16, 64, 16, 1.0, True, None)
    inputs = tuple(x.cuda() for x in select_inputs(case))
    knobs = {"block_size": 32, "stride": 16, "select_size": 64, "n_select": 16}
    actual_BTHS = select_blocks(*inputs, **knobs, backend="triton")
    assert _select_mismatch(case, actual_BTHS.cpu()) == ""
