"""Tests of sparsezoo.kernels.window: fast paths against the naive oracle, the window definition.

Legend: B batch, T time, HQ query heads, H KV heads, D head dim.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernel_utils import LargestTensor

from sparsezoo.kernels.backend import triton_available
from sparsezoo.kernels.window import sliding_window_attention, torch_impl, window_density

FAST_BACKENDS = ["torch"]


def make_qkv(
    B: int, T: int, HQ: int, H: int, D: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded random fp32 q_BTHD, k_BTHD, v_BTHD leaf tensors that require grad."""
    gen = torch.Generator().manual_seed(0)
    q_BTHD = torch.randn(B, T, HQ, D, generator=gen).requires_grad_()
    k_BTHD = torch.randn(B, T, H, D, generator=gen).requires_grad_()
    v_BTHD = torch.randn(B, T, H, D, generator=gen).requires_grad_()
    return q_BTHD, k_BTHD, v_BTHD


def output_and_grads(
    backend: str,
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    window: int,
    scale: float | None = None,
) -> list[torch.Tensor]:
    """Output and the q, k, v gradients of a fixed random projection of it, for one backend."""
    o_BTHD = sliding_window_attention(*qkv, window, scale=scale, backend=backend)
    grad_BTHD = torch.randn(o_BTHD.shape, generator=torch.Generator().manual_seed(1)).to(o_BTHD)
    return [o_BTHD, *torch.autograd.grad(o_BTHD, qkv, grad_BTHD)]


# (B, T, HQ, H, D, window, scale): odd lengths, window 1, = T, > T, not dividing T, GQA and MHA,
# and long sequences spanning hundreds of windows and tens of query chunks
CASES = [
    (2, 1, 4, 2, 8, 3, None),
    (2, 7, 4, 1, 8, 3, None),
    (2, 129, 4, 2, 8, 1, None),
    (1, 129, 4, 4, 16, 129, None),
    (2, 333, 4, 1, 8, 500, None),
    (2, 333, 4, 2, 8, 50, 0.3),
    (2, 333, 2, 2, 16, 64, None),
    (1, 300, 4, 2, 8, 299, None),
    (1, 3000, 2, 1, 4, 8, None),
    (1, 2000, 4, 2, 4, 300, None),
]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(("B", "T", "HQ", "H", "D", "window", "scale"), CASES)
def test_fast_matches_naive(
    backend: str, B: int, T: int, HQ: int, H: int, D: int, window: int, scale: float | None
) -> None:
    """Outputs and all input gradients of a fast backend equal the naive oracle's in fp32."""
    qkv = make_qkv(B, T, HQ, H, D)
    expected = output_and_grads("naive", qkv, window, scale)
    actual = output_and_grads(backend, qkv, window, scale)
    for name, a, e in zip(("o", "dq", "dk", "dv"), actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", ["naive", *FAST_BACKENDS])
@pytest.mark.parametrize("window", [1, 7, 64])
def test_window_boundary(backend: str, window: int) -> None:
    """Query t weighs keys t-window+1 .. t equally (q = 0) and key t-window not at all.

    V is one-hot per position (D = T), so output row t is exactly the attention weights of query
    t over the keys; with zero queries those are uniform over the attended keys.
    """
    T = 150
    q_BTHD = torch.zeros(1, T, 2, T)
    v_BTHD = torch.eye(T)[None, :, None, :]
    k_BTHD = torch.randn(1, T, 1, T)
    w_TT = sliding_window_attention(q_BTHD, k_BTHD, v_BTHD, window, backend=backend)[0, :, 1]
    for t in range(T):
        first = max(0, t - window + 1)
        assert w_TT[t, first] == pytest.approx(1 / (t + 1 - first), rel=1e-5)
        assert w_TT[t, t] == pytest.approx(1 / (t + 1 - first), rel=1e-5)
        if t - window >= 0:
            assert w_TT[t, t - window] == 0
        assert torch.all(w_TT[t, t + 1 :] == 0)
    torch.testing.assert_close(w_TT.sum(-1), torch.ones(T))


@pytest.mark.parametrize("backend", ["naive", *FAST_BACKENDS])
@pytest.mark.parametrize("window", [50, 51, 1000])
def test_window_covering_sequence_is_dense_causal(backend: str, window: int) -> None:
    """With window >= T the op is dense causal attention (SDPA with is_causal and GQA)."""
    q_BTHD, k_BTHD, v_BTHD = make_qkv(2, 50, 4, 2, 8)
    expected_BTHD = F.scaled_dot_product_attention(
        q_BTHD.transpose(1, 2),
        k_BTHD.transpose(1, 2),
        v_BTHD.transpose(1, 2),
        is_causal=True,
        enable_gqa=True,
    ).transpose(1, 2)
    actual_BTHD = sliding_window_attention(q_BTHD, k_BTHD, v_BTHD, window, backend=backend)
    torch.testing.assert_close(actual_BTHD, expected_BTHD, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["naive", "auto", *FAST_BACKENDS])
def test_bf16_forward_close_to_fp32(backend: str) -> None:
    """bf16 inputs give a finite bf16 output within bf16 rounding of the fp32 oracle."""
    qkv = make_qkv(2, 300, 4, 2, 16)
    expected_BTHD = sliding_window_attention(*qkv, 40, backend="naive")
    q_BTHD, k_BTHD, v_BTHD = (x.detach().bfloat16() for x in qkv)
    actual_BTHD = sliding_window_attention(q_BTHD, k_BTHD, v_BTHD, 40, backend=backend)
    assert actual_BTHD.dtype == torch.bfloat16
    assert torch.isfinite(actual_BTHD).all()
    torch.testing.assert_close(actual_BTHD.float(), expected_BTHD, rtol=0, atol=3e-2)


def test_torch_path_never_builds_time_squared_tensors() -> None:
    """Forward and backward of the torch path stay O(T·window): no [T, T] mask or scores."""
    T, window = 4096, 16
    qkv = make_qkv(1, T, 2, 1, 8)
    with LargestTensor() as largest:
        output_and_grads("torch", qkv, window)
    assert largest.numel < T * T // 16


@pytest.mark.parametrize(("B", "T", "HQ", "H", "window", "group_rows"), [
    (2, 1000, 4, 2, 24, 64),
    (1, 777, 6, 3, 40, 10),
    (2, 512, 4, 4, 8, 32),
])  # fmt: skip
def test_torch_groups_of_chunks_match_naive(
    monkeypatch: pytest.MonkeyPatch, B: int, T: int, HQ: int, H: int, window: int, group_rows: int
) -> None:
    """Many body groups per batch row (tiles overlapping across groups), a partial tail chunk
    and GQA: outputs and every gradient equal the oracle's."""
    monkeypatch.setattr(torch_impl, "_GROUP_ROWS", group_rows)
    pieces = torch_impl._pieces(B, T, window, HQ // H)
    assert sum(not p.causal and p.b == 0 for p in pieces) >= 3
    qkv = make_qkv(B, T, HQ, H, 8)
    expected = output_and_grads("naive", qkv, window)
    actual = output_and_grads("torch", qkv, window)
    for name, a, e in zip(("o", "dq", "dk", "dv"), actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_chunks_halve_while_folded_rows_keep_the_big_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks start at a quarter of the window and halve while C·G folded rows stay at the
    kernel's large-tile size; halved chunks with folded GQA rows (a copy for 2 of 6 KV heads,
    a view for one) still match the oracle on outputs and every gradient."""
    assert torch_impl._chunk_size(512, 16) == 64
    assert torch_impl._chunk_size(512, 4) == 128
    assert torch_impl._chunk_size(512, 1) == 128
    assert torch_impl._chunk_size(128, 64) == 32
    monkeypatch.setattr(torch_impl, "_MIN_CHUNK", 2)
    monkeypatch.setattr(torch_impl, "_BIG_TILE_ROWS", 12)
    assert torch_impl._chunk_size(40, 3) == 5
    for HQ, H in ((6, 2), (3, 1)):
        qkv = make_qkv(2, 301, HQ, H, 8)
        expected = output_and_grads("naive", qkv, 40)
        actual = output_and_grads("torch", qkv, 40)
        for name, a, e in zip(("o", "dq", "dk", "dv"), actual, expected, strict=True):
            torch.testing.assert_close(
                a, e, rtol=1e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}"
            )


def test_torch_path_saves_only_inputs_output_and_lse() -> None:
    """Nothing of key-tile size (K/V repeated per chunk) or a padded copy of q is saved for the
    backward: the saved storages are q, k, v, the output and the [B, T, HQ] lse."""
    qkv = make_qkv(2, 500, 4, 2, 8)
    saved: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        o_BTHD = sliding_window_attention(*qkv, 40, backend="torch")
    allowed = {x.untyped_storage().data_ptr() for x in (*qkv, o_BTHD)}
    others = {ptr: size for ptr, size in saved.items() if ptr not in allowed}
    assert sum(others.values()) <= 2 * 500 * 4 * 4  # the lse (fp32 [B, T, HQ])


def test_bad_inputs_raise_value_errors_naming_the_argument() -> None:
    """Invalid window, shapes, heads and backends raise ValueError with the culprit named."""
    q_BTHD, k_BTHD, v_BTHD = make_qkv(1, 10, 4, 2, 8)
    for window in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window"):
            sliding_window_attention(q_BTHD, k_BTHD, v_BTHD, window)
    with pytest.raises(ValueError, match="k and v"):
        sliding_window_attention(q_BTHD, k_BTHD, v_BTHD[:, :9], 4)
    with pytest.raises(ValueError, match="time"):
        sliding_window_attention(q_BTHD[:, :9], k_BTHD, v_BTHD, 4)
    with pytest.raises(ValueError, match="head dim"):
        sliding_window_attention(q_BTHD[..., :4], k_BTHD, v_BTHD, 4)
    with pytest.raises(ValueError, match="4-d"):
        sliding_window_attention(q_BTHD[0], k_BTHD, v_BTHD, 4)
    with pytest.raises(ValueError, match="HQ=3"):
        sliding_window_attention(q_BTHD[:, :, :3], k_BTHD, v_BTHD, 4)
    with pytest.raises(ValueError, match="dtypes"):
        sliding_window_attention(q_BTHD.double(), k_BTHD, v_BTHD, 4)
    with pytest.raises(ValueError, match="backend='flash' is not one of naive, torch, triton"):
        sliding_window_attention(q_BTHD, k_BTHD, v_BTHD, 4, backend="flash")


def test_window_density_hand_computed() -> None:
    """Density is attended causal pairs over all causal pairs, on hand-counted cases."""
    assert window_density(1, 1) == 1.0
    assert window_density(4, 1) == pytest.approx(4 / 10)
    assert window_density(4, 2) == pytest.approx((1 + 2 + 2 + 2) / 10)
    assert window_density(5, 3) == pytest.approx((1 + 2 + 3 + 3 + 3) / 15)
    assert window_density(5, 5) == 1.0
    assert window_density(5, 99) == 1.0
    for bad in ((0, 4), (4, 0)):
        with pytest.raises(ValueError, match=r"T must|window must"):
            window_density(*bad)


# (BLOCK, B, T, HQ, H, D, window) for the interpreted Triton kernels: fp32 and T <= 300 keep the
# numpy interpreter fast; 16-wide blocks make windows span several key and query blocks, and
# window 18 puts the last query that sees a key block first in its own query block.
TRITON_CASES = [
    (64, 2, 1, 4, 2, 8, 3),
    (64, 2, 7, 4, 1, 8, 3),
    (64, 1, 129, 4, 2, 8, 1),
    (64, 1, 150, 2, 2, 16, 150),
    (64, 2, 200, 4, 2, 8, 37),
    (64, 1, 300, 4, 1, 16, 100),
    (64, 1, 100, 2, 1, 24, 500),
    (16, 1, 150, 4, 2, 16, 37),
    (16, 2, 61, 2, 1, 8, 5),
    (16, 1, 100, 2, 1, 8, 18),
]
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def compare_triton_with_naive() -> dict[str, str]:
    """Run every TRITON_CASES case through triton and naive; map case id to mismatch ('' if none).

    Runs in a child process started with TRITON_INTERPRET=1, which must be set before the
    kernel module is imported; the block size is a module constant, set per case.
    """
    from sparsezoo.kernels.window import triton_impl

    report = {}
    for case in TRITON_CASES:
        block, B, T, HQ, H, D, window = case
        triton_impl.BLOCK_M = triton_impl.BLOCK_N = block
        qkv = make_qkv(B, T, HQ, H, D)
        expected = output_and_grads("naive", qkv, window)
        try:
            actual = output_and_grads("triton", qkv, window)
            for name, a, e in zip(("o", "dq", "dk", "dv"), actual, expected, strict=True):
                torch.testing.assert_close(
                    a, e, rtol=1e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}"
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
        "import test_kernels_window as t; print(json.dumps(t.compare_triton_with_naive()))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_interpreted_matches_naive(
    triton_report: dict[str, str], case: tuple[int, ...]
) -> None:
    """Interpreted Triton kernels give the naive output and q, k, v gradients in fp32."""
    assert triton_report[str(case)] == ""


@needs_triton
@pytest.mark.skipif(
    bool(os.environ.get("TRITON_INTERPRET")), reason="CPU tensors are valid when interpreted"
)
def test_triton_backend_rejects_cpu_tensors() -> None:
    """Without the interpreter the Triton backend refuses CPU tensors with a clear error."""
    q_BTHD, k_BTHD, v_BTHD = make_qkv(1, 10, 2, 1, 8)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        sliding_window_attention(q_BTHD, k_BTHD, v_BTHD, 4, backend="triton")


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_on_gpu_matches_naive(dtype: torch.dtype) -> None:
    """Compiled kernels over tens of blocks match the fp32 oracle (bf16 at bf16 tolerance)."""
    qkv = tuple(x.detach().cuda().to(dtype).requires_grad_() for x in make_qkv(1, 5000, 4, 2, 64))
    reference = [x.detach().float().requires_grad_() for x in qkv]
    expected = output_and_grads("naive", tuple(reference), 300)
    actual = output_and_grads("triton", qkv, 300)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for name, a, e in zip(("o", "dq", "dk", "dv"), actual, expected, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(
            a.float(), e, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}"
        )
