"""The GPU benchmark script's own logic on CPU: the NSA-like indices it feeds the kernels, and
its refusal to run without CUDA (its timings need a GPU: see benchmarks/nsa_gpu.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "nsa_gpu.py"


def _script():
    spec = importlib.util.spec_from_file_location("nsa_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("T", "S", "block"), [(300, 5, 16), (64, 8, 16), (4100, 16, 64)])
def test_nsa_like_indices_are_legal_selections(T: int, S: int, block: int) -> None:
    """Each query's slots hold distinct legal blocks (at or before its own), with block 0, its
    own and the previous block among them, and -1 only where fewer than S blocks are legal."""
    idx_BTHS = _script().nsa_like_indices(2, T, 2, S, block, torch.device("cpu"))
    assert idx_BTHS.shape == (2, T, 2, S) and idx_BTHS.dtype == torch.int64
    own_T = torch.arange(T) // block
    for t in sorted({0, block - 1, block, T // 2, T - 1}):
        legal = int(own_T[t]) + 1
        for row in idx_BTHS[:, t].reshape(-1, S).tolist():
            used = [j for j in row if j >= 0]
            assert len(used) == len(set(used)) == min(S, legal)
            assert all(j <= own_T[t] for j in used)
            assert {0, int(own_T[t]), max(0, int(own_T[t]) - 1)} <= set(used)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message needs a machine without")
def test_script_without_a_gpu_exits_with_a_clear_message() -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--T", "64"], capture_output=True, text=True, check=False
    )
    assert run.returncode == 1
    assert "needs a CUDA GPU" in run.stderr
