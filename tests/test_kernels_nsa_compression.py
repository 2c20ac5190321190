"""Tests of sparsezoo.kernels.nsa.compression: phi and compressed attention against the oracle.

Legend: B batch, T time, N compressed tokens, HQ query heads, H KV heads, D head dim,
L block length l, I = l·D phi input width, F phi hidden width.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_utils import LargestTensor

from sparsezoo.kernels.nsa import compression
from sparsezoo.kernels.nsa.compression import compress_kv, compressed_attention


def seeded(*shape: int, seed: int = 0) -> torch.Tensor:
    """A seeded standard-normal fp32 leaf tensor that requires grad."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def make_phi(B: int, T: int, H: int, D: int, L: int, hidden: int) -> list[torch.Tensor]:
    """x_BTHD, pos_LD, w1_IF, b1_F, w2_FD, b2_D as seeded leaves, weights scaled to O(1) outputs."""
    scale = (L * D) ** -0.5
    return [
        seeded(B, T, H, D, seed=0),
        seeded(L, D, seed=1),
        (seeded(L * D, hidden, seed=2) * scale).detach().requires_grad_(),
        seeded(hidden, seed=3),
        (seeded(hidden, D, seed=4) * hidden**-0.5).detach().requires_grad_(),
        seeded(D, seed=5),
    ]


def phi_output_and_grads(
    backend: str, inputs: list[torch.Tensor], L: int, d: int
) -> list[torch.Tensor]:
    """compress_kv's output and the gradients of every input under a fixed random projection."""
    out_BNHD = compress_kv(*inputs, block_size=L, stride=d, backend=backend)
    grad_BNHD = torch.randn(out_BNHD.shape, generator=torch.Generator().manual_seed(9))
    return [out_BNHD, *torch.autograd.grad(out_BNHD, inputs, grad_BNHD)]


# (B, T, H, D, l, d, F): T < l (no block), T == l (one), T not of the form i·d + l, odd T,
# l == d (disjoint blocks) and the paper's 32 / 16
PHI_CASES = [
    (2, 5, 2, 4, 8, 4, 16),
    (2, 8, 2, 4, 8, 4, 16),
    (2, 37, 2, 4, 8, 4, 16),
    (1, 301, 1, 8, 32, 16, 24),
    (2, 99, 3, 4, 8, 8, 8),
]


@pytest.mark.parametrize(("B", "T", "H", "D", "L", "d", "hidden"), PHI_CASES)
def test_compress_kv_torch_matches_naive(
    B: int, T: int, H: int, D: int, L: int, d: int, hidden: int
) -> None:
    """The unfold path gives the per-block oracle's output and gradients of x and all weights."""
    inputs = make_phi(B, T, H, D, L, hidden)
    expected = phi_output_and_grads("naive", inputs, L, d)
    actual = phi_output_and_grads("torch", inputs, L, d)
    N = (T - L) // d + 1 if T >= L else 0
    assert actual[0].shape == (B, N, H, D)
    names = ("out", "dx", "dpos", "dw1", "db1", "dw2", "db2")
    for name, a, e in zip(names, actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_compress_kv_is_phi_of_each_block(backend: str) -> None:
    """Token i is the MLP of x[i·d : i·d + l] + pos, flattened position-major, for every head."""
    B, T, H, D, L, d = 1, 23, 2, 3, 8, 4
    x, pos, w1, b1, w2, b2 = (t.detach() for t in make_phi(B, T, H, D, L, 5))
    out_BNHD = compress_kv(x, pos, w1, b1, w2, b2, L, d, backend=backend)
    assert out_BNHD.shape == (B, 4, H, D)
    for i in range(4):
        for h in range(H):
            flat_I = torch.cat([x[0, i * d + s, h] + pos[s] for s in range(L)])
            expected_D = F.silu(flat_I @ w1 + b1) @ w2 + b2
            torch.testing.assert_close(out_BNHD[0, i, h], expected_D, rtol=1e-5, atol=1e-5)


def make_qkv(
    B: int, T: int, HQ: int, H: int, D: int, L: int, d: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded q_BTHD and compressed kcmp_BNHD, vcmp_BNHD for a length-T sequence, as leaves."""
    N = (T - L) // d + 1 if T >= L else 0
    return seeded(B, T, HQ, D, seed=0), seeded(B, N, H, D, seed=1), seeded(B, N, H, D, seed=2)


def attention_output_and_grads(
    backend: str,
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    L: int,
    d: int,
    scale: float | None = None,
) -> list[torch.Tensor]:
    """Output, lse, and the q, kcmp, vcmp gradients of a fixed random projection of the output."""
    o_BTHD, lse_BTH = compressed_attention(*qkv, L, d, scale=scale, backend=backend)
    assert not lse_BTH.requires_grad
    assert lse_BTH.dtype == torch.float32
    grad_BTHD = torch.randn(o_BTHD.shape, generator=torch.Generator().manual_seed(1))
    return [o_BTHD, lse_BTH, *torch.autograd.grad(o_BTHD, qkv, grad_BTHD)]


# (B, T, HQ, H, D, l, d, scale): GQA 4:1 and 4:2, MHA, odd lengths, T == l (one token), l == d,
# an explicit scale, and a long sequence with over a thousand compressed tokens
ATTENTION_CASES = [
    (2, 37, 4, 1, 8, 8, 4, None),
    (2, 37, 4, 2, 8, 8, 4, None),
    (2, 301, 2, 2, 8, 32, 16, None),
    (1, 301, 4, 2, 16, 32, 16, 0.3),
    (2, 8, 4, 2, 8, 8, 4, None),
    (1, 99, 4, 1, 8, 8, 8, None),
    (1, 4100, 2, 1, 4, 8, 4, None),
]


@pytest.mark.parametrize(("B", "T", "HQ", "H", "D", "L", "d", "scale"), ATTENTION_CASES)
def test_compressed_attention_torch_matches_naive(
    B: int, T: int, HQ: int, H: int, D: int, L: int, d: int, scale: float | None
) -> None:
    """Output, lse (incl. its -inf rows) and q, kcmp, vcmp gradients equal the fp32 oracle's."""
    qkv = make_qkv(B, T, HQ, H, D, L, d)
    expected = attention_output_and_grads("naive", qkv, L, d, scale)
    actual = attention_output_and_grads("torch", qkv, L, d, scale)
    for name, a, e in zip(("o", "lse", "dq", "dk", "dv"), actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_off_cpu_path_matches_naive(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path for devices without aten's flash lse (SDPA + chunked lse) is exact on CPU too."""
    monkeypatch.setattr(compression, "_FLASH_LSE_DEVICES", ())
    # a tile of 7 query rows per folded head makes the lse pass run in many chunks
    monkeypatch.setattr(compression, "_LSE_TILE_ELEMENTS", 2 * 4 * 8 * 36 * 7)
    qkv = make_qkv(2, 301, 4, 2, 8, 16, 8)
    expected = attention_output_and_grads("naive", qkv, 16, 8)
    actual = attention_output_and_grads("torch", qkv, 16, 8)
    for name, a, e in zip(("o", "lse", "dq", "dk", "dv"), actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize(("L", "d"), [(8, 4), (32, 16), (4, 4)])
def test_visibility_rule(backend: str, L: int, d: int) -> None:
    """Token i is unseen by query i·d + l - 2 and seen by i·d + l - 1; early queries get 0, -inf.

    Values are one-hot per compressed token (D = N) and queries are zero, so output row t is
    exactly the attention weights of query t: uniform over the tokens it sees.
    """
    T = 4 * L + 3 * d + 1
    N = (T - L) // d + 1
    q_BTHD = torch.zeros(1, T, 2, N)
    kcmp_BNHD = torch.randn(1, N, 1, N)
    vcmp_BNHD = torch.eye(N)[None, :, None, :]
    o_BTHD, lse_BTH = compressed_attention(q_BTHD, kcmp_BNHD, vcmp_BNHD, L, d, backend=backend)
    for i in range(N):
        if i * d + L - 2 >= 0:
            assert o_BTHD[0, i * d + L - 2, :, i].eq(0).all()
        assert o_BTHD[0, i * d + L - 1, :, i].eq(1 / (i + 1)).all()
    assert o_BTHD[0, : L - 1].eq(0).all()
    assert lse_BTH[0, : L - 1].eq(float("-inf")).all()
    assert torch.isfinite(lse_BTH[0, L - 1 :]).all()


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_queries_that_see_nothing_have_zero_output_and_finite_grads(backend: str) -> None:
    """The first l - 1 queries output exactly 0, get dq = 0, and no gradient is NaN anywhere."""
    L, d = 16, 8
    qkv = make_qkv(2, 70, 4, 2, 8, L, d)
    o_BTHD, lse_BTH, dq_BTHD, dk_BNHD, dv_BNHD = attention_output_and_grads(backend, qkv, L, d)
    assert o_BTHD[:, : L - 1].eq(0).all()
    assert lse_BTH[:, : L - 1].eq(float("-inf")).all()
    assert dq_BTHD[:, : L - 1].eq(0).all()
    for grad in (dq_BTHD, dk_BNHD, dv_BNHD):
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_shorter_than_one_block_sees_nothing(backend: str) -> None:
    """With T < l there is no compressed token: zero output, lse -inf everywhere."""
    q_BTHD = torch.randn(2, 7, 4, 8)
    kcmp_BNHD = torch.zeros(2, 0, 2, 8)
    o_BTHD, lse_BTH = compressed_attention(q_BTHD, kcmp_BNHD, kcmp_BNHD, 8, 4, backend=backend)
    assert o_BTHD.shape == q_BTHD.shape and o_BTHD.eq(0).all()
    assert lse_BTH.shape == (2, 7, 4) and lse_BTH.eq(float("-inf")).all()


def test_bf16_forward_close_to_fp32() -> None:
    """bf16 inputs give a finite bf16 output within bf16 rounding of the fp32 oracle."""
    qkv = make_qkv(2, 301, 4, 2, 16, 16, 8)
    o_ref_BTHD, lse_ref_BTH = compressed_attention(*qkv, 16, 8, backend="naive")
    q, k, v = (x.detach().bfloat16() for x in qkv)
    o_BTHD, lse_BTH = compressed_attention(q, k, v, 16, 8, backend="torch")
    assert o_BTHD.dtype == torch.bfloat16 and lse_BTH.dtype == torch.float32
    torch.testing.assert_close(o_BTHD.float(), o_ref_BTHD, rtol=0, atol=3e-2)
    torch.testing.assert_close(lse_BTH, lse_ref_BTH, rtol=0, atol=5e-2)


def test_torch_path_builds_no_score_matrix() -> None:
    """Forward and backward of the torch path never hold a [T, N] score or mask tensor."""
    T, L, d = 4100, 8, 4
    qkv = make_qkv(1, T, 2, 1, 4, L, d)
    with LargestTensor() as largest:
        attention_output_and_grads("torch", qkv, L, d)
    assert largest.numel < T * qkv[1].shape[1] // 8


def test_bad_inputs_raise_value_errors_naming_the_argument() -> None:
    """Invalid knobs, weight shapes, compressed lengths and backends name the culprit."""
    x, pos, w1, b1, w2, b2 = (t.detach() for t in make_phi(1, 20, 2, 4, 8, 6))
    for block_size, stride, match in ((8, 3, "multiple of stride"), (0, 4, "block_size")):
        with pytest.raises(ValueError, match=match):
            compress_kv(x, pos, w1, b1, w2, b2, block_size, stride)
    with pytest.raises(ValueError, match="stride must be an int"):
        compress_kv(x, pos, w1, b1, w2, b2, 8, 2.0)
    bad_weights = {
        "pos_LD": (x, pos[:4], w1, b1, w2, b2),
        "w1_IF": (x, pos, w1[:-1], b1, w2, b2),
        "b1_F": (x, pos, w1, b1[:-1], w2, b2),
        "w2_FD": (x, pos, w1, b1, w2[:, :-1], b2),
        "b2_D": (x, pos, w1, b1, w2, b2[:-1]),
        "x_BTHD": (x[0], pos, w1, b1, w2, b2),
    }
    for name, args in bad_weights.items():
        with pytest.raises(ValueError, match=name):
            compress_kv(*args, 8, 4)

    q, k, v = (t.detach() for t in make_qkv(1, 20, 4, 2, 8, 8, 4))
    with pytest.raises(ValueError, match="N=3 compressed tokens"):
        compressed_attention(q, k[:, :3], v[:, :3], 8, 4)
    with pytest.raises(ValueError, match="HQ=3"):
        compressed_attention(q[:, :, :3], k, v, 8, 4)
    with pytest.raises(ValueError, match="T=0"):
        compressed_attention(q[:, :0], k[:, :0], v[:, :0], 8, 4)
    with pytest.raises(ValueError, match="vcmp_BNHD"):
        compressed_attention(q, k, v[..., :4], 8, 4)
    with pytest.raises(ValueError, match="head dim"):
        compressed_attention(q[..., :4], k, v, 8, 4)
    with pytest.raises(ValueError, match="dtypes"):
        compressed_attention(q.double(), k, v, 8, 4)
    with pytest.raises(ValueError, match="block_size"):
        compressed_attention(q, k, v, 6, 4)
    # the Triton kernel exists but refuses CPU tensors outside the interpreter
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        compressed_attention(q, k, v, 8, 4, backend="triton")
