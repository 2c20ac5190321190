"""MoBA's Triton backend (NSA's selected-attention kernels on the folded layout) against the
naive oracle, interpreted on CPU (TRITON_INTERPRET=1, fp32).

Legend: B batch, T time, HQ query heads, H KV heads, D head dim.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sparsezoo.kernels.backend import triton_available
from sparsezoo.kernels.moba import moba_attention

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

# (B, T, HQ, H, D, block_size, top_k): an odd T with a partial tail block and GQA 4:2;
# one KV head for 4 query heads that route differently; 131 blocks of 2 keys (past 128, where
# tile-local offsets break); a block size that is not a power of two with top_k = 1. The
# interpreter runs one program per (t, folded head) at ~50 ms each, which bounds T · HQ.
CASES = [
    (2, 37, 4, 2, 8, 8, 3),
    (1, 67, 4, 1, 16, 8, 4),
    (1, 262, 2, 1, 8, 2, 3),
    (1, 40, 2, 2, 8, 5, 1),
]
# blocks of 12 keys through tiles of 4 (fold._TILE_KEYS set to 4 for this case: the route of
# MoBA's 512-key blocks, which do not fit one tile's shared memory on a GPU)
SPLIT_CASE = (1, 45, 2, 1, 8, 12, 2)


def compare_triton_with_naive() -> dict[str, str]:
    """Run every case through triton and naive; map case id to mismatch ('' if none).

    Runs in a child process started with TRITON_INTERPRET=1, which must be set before the
    kernel modules are imported.
    """
    from sparsezoo.kernels.moba import fold
    from sparsezoo.kernels.nsa import triton_selection

    # 16 queries per dK/dV program, so the popular blocks' lists are split and reduced
    triton_selection.QUERIES_PER_PROGRAM = 16
    report = {}
    for case in [*CASES, SPLIT_CASE]:
        fold._TILE_KEYS = 4 if case == SPLIT_CASE else 64
        B, T, HQ, H, D, block_size, top_k = case
        gen = torch.Generator().manual_seed(0)
        qkv = [torch.randn(B, T, h, D, generator=gen).requires_grad_() for h in (HQ, H, H)]
        cotangent = torch.randn(B, T, HQ, D, generator=gen)
        results = {}
        try:
            for backend in ("naive", "triton"):
                o_BTHD = moba_attention(*qkv, block_size, top_k, backend=backend)
                results[backend] = [o_BTHD, *torch.autograd.grad(o_BTHD, qkv, cotangent)]
            for name, a, e in zip(("o", "dq", "dk", "dv"), *results.values(), strict=True):
                torch.testing.assert_close(
                    e, a, rtol=1e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}"
                )
            report[str(case)] = ""
        except Exception as err:  # reported per case by the parent's parametrized tests
            report[str(case)] = f"{type(err).__name__}: {err}"
    return report


@pytest.fixture(scope="module")
def triton_report() -> dict[str, str]:
    """Per-case results of ``compare_triton_with_naive`` from one interpreted child process."""
    child = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import test_kernels_moba_triton as t; print(json.dumps(t.compare_triton_with_naive()))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("case", [*CASES, SPLIT_CASE], ids=str)
def test_triton_interpreted_matches_naive(
    triton_report: dict[str, str], case: tuple[Any, ...]
) -> None:
    """Interpreted Triton MoBA gives the naive output and q, k, v gradients in fp32."""
    assert triton_report[str(case)] == ""
