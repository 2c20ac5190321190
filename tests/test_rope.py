"""RoPE: the chunked rotation equals the rotate-half formula, forward and backward, any dtype."""

from __future__ import annotations

import pytest
import torch

from sparsezoo.kernels import rope
from sparsezoo.kernels.rope import apply_rope, apply_rope_reference, rope_angles


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of a few rows, so short inputs cross many chunk borders (and a partial last one)."""
    monkeypatch.setattr(rope, "_CHUNK_ELEMENTS", 3 * 2 * 3 * 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_apply_rope_matches_the_rotate_half_formula(small_chunks: None, dtype: torch.dtype) -> None:
    """Outputs equal the reference at odd T and offset positions; the input is left unchanged."""
    gen = torch.Generator().manual_seed(0)
    x_BTHD = torch.randn(2, 37, 3, 8, generator=gen).to(dtype)
    before = x_BTHD.clone()
    cos_TD, sin_TD = rope_angles(torch.arange(1000, 1037), 8)
    expected = apply_rope_reference(x_BTHD, cos_TD, sin_TD)
    actual = apply_rope(x_BTHD, cos_TD, sin_TD)
    assert actual.dtype == dtype
    # both round one fp32 result to the output dtype: bf16 may differ by one unit in the last place
    rtol = 2**-7 if dtype == torch.bfloat16 else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-6)
    assert torch.equal(x_BTHD, before)


def test_apply_rope_gradient_is_the_inverse_rotation(small_chunks: None) -> None:
    """Gradients equal autograd through the reference, on a strided slice, and pass gradcheck."""
    gen = torch.Generator().manual_seed(1)
    base_BTHE = torch.randn(1, 23, 2, 12, generator=gen, dtype=torch.float64)
    cos_TD, sin_TD = rope_angles(torch.arange(23), 8)
    x_fast = base_BTHE[..., :8].clone().requires_grad_()
    x_ref = base_BTHE[..., :8].clone().requires_grad_()
    dy_BTHD = torch.randn(1, 23, 2, 8, generator=gen, dtype=torch.float64)
    apply_rope(x_fast, cos_TD, sin_TD).backward(dy_BTHD)
    apply_rope_reference(x_ref, cos_TD.double(), sin_TD.double()).backward(dy_BTHD)
    torch.testing.assert_close(x_fast.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    strided = base_BTHE[..., 2:10].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: apply_rope(x, cos_TD, sin_TD), (strided,))


def test_apply_rope_rejects_mismatched_shapes() -> None:
    """A 3-d input, an odd head dim or tables for another length raise a clear ValueError."""
    cos_TD, sin_TD = rope_angles(torch.arange(5), 4)
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        apply_rope(torch.zeros(5, 2, 4), cos_TD, sin_TD)
    with pytest.raises(ValueError, match="cos"):
        apply_rope(torch.zeros(1, 6, 2, 4), cos_TD, sin_TD)
    with pytest.raises(ValueError, match="even"):
        rope_angles(torch.arange(5), 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_in_place_rope_rotates_x_itself_with_the_same_values_and_gradients(
    small_chunks: None, dtype: torch.dtype
) -> None:
    """in_place=True returns x itself, bit-equal to the out-of-place rotation, and gradients
    through a projection rotated in place (a view of a non-leaf) equal the out-of-place ones."""
    gen = torch.Generator().manual_seed(2)
    x_BTHD = torch.randn(2, 37, 3, 8, generator=gen).to(dtype)
    cos_TD, sin_TD = rope_angles(torch.arange(5, 42), 8)
    expected = apply_rope(x_BTHD, cos_TD, sin_TD)
    assert not torch.equal(expected, x_BTHD)
    rotated = apply_rope(x_BTHD, cos_TD, sin_TD, in_place=True)
    assert rotated is x_BTHD and torch.equal(rotated, expected)

    w = torch.randn(16, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    x_BTC = torch.randn(2, 37, 16, generator=gen, dtype=torch.float64)
    upstream = torch.randn(2, 37, 3, 8, generator=gen, dtype=torch.float64)
    grads = []
    for in_place in (False, True):
        y = apply_rope((x_BTC @ w).view(2, 37, 3, 8), cos_TD, sin_TD, in_place=in_place)
        (grad,) = torch.autograd.grad((y * upstream).sum(), w)
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_partial_rope_turns_the_first_pairs_and_leaves_the_rest_position_free() -> None:
    """rope_dim = 4 of 8: pairs 0 and 1 (dims 0, 1, 4, 5) turn at a 4-wide head's frequencies,
    pairs 2 and 3 do not turn at all, so q·k over their dims is the same at every distance;
    rope_dim None is the full rotation and 0 rotates nothing; bad values raise."""
    pos_T = torch.arange(3, 40)
    cos_TD, sin_TD = rope_angles(pos_T, 8, rope_dim=4)
    cos4, sin4 = rope_angles(pos_T, 4)
    torch.testing.assert_close(cos_TD[:, [0, 1, 4, 5]], cos4, rtol=0, atol=0)
    torch.testing.assert_close(sin_TD[:, [0, 1, 4, 5]], sin4, rtol=0, atol=0)
    assert torch.equal(cos_TD[:, [2, 3, 6, 7]], torch.ones(37, 4))
    assert torch.equal(sin_TD[:, [2, 3, 6, 7]], torch.zeros(37, 4))
    for full in (rope_angles(pos_T, 8, rope_dim=8), rope_angles(pos_T, 8, rope_dim=None)):
        assert all(torch.equal(a, b) for a, b in zip(full, rope_angles(pos_T, 8), strict=True))
    cos0, sin0 = rope_angles(pos_T, 8, rope_dim=0)
    assert torch.equal(cos0, torch.ones(37, 8)) and torch.equal(sin0, torch.zeros(37, 8))

    gen = torch.Generator().manual_seed(3)
    q_1T1D = torch.randn(1, 1, 1, 8, generator=gen).expand(1, 37, 1, 8)
    k_1T1D = torch.randn(1, 1, 1, 8, generator=gen).expand(1, 37, 1, 8)
    q_rot = apply_rope(q_1T1D.contiguous(), cos_TD, sin_TD)
    k_rot = apply_rope(k_1T1D.contiguous(), cos_TD, sin_TD)
    free = [2, 3, 6, 7]
    # the same q and k at every position: the position-free dims' dot product never changes
    dots = (q_rot[0, :, 0, free] * k_rot[0, 0, 0, free]).sum(-1)
    torch.testing.assert_close(dots, dots[:1].expand(37), rtol=0, atol=1e-6)
    turned = (q_rot[0, :, 0, [0, 1, 4, 5]] * k_rot[0, 0, 0, [0, 1, 4, 5]]).sum(-1)
    assert turned.std() > 0.1
    for bad in (3, 10, -2):
        with pytest.raises(ValueError, match="rope_dim"):
            rope_angles(pos_T, 8, rope_dim=bad)
