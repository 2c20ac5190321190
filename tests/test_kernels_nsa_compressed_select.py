"""Tests of sparsezoo.kernels.nsa.compressed_select: compressed attention and block selection
in one pass must equal compressed_attention followed by select_blocks.

Legend: B batch, T time, N compressed tokens, HQ query heads, H KV heads, D head dim, l block
size, d stride, l' selection block size, n selected blocks, S selection blocks.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_nsa_select import SELECT_CASES, assert_same_picks, importance_fp64

from sparsezoo.kernels.nsa import compressed_attention, compressed_select, select_blocks


def make_qkv(
    B: int, T: int, HQ: int, H: int, D: int, L: int, d: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Seeded q_BTHD, kcmp_BNHD, vcmp_BNHD (leaves that require grad)."""
    gen = torch.Generator().manual_seed(0)
    N = (T - L) // d + 1 if T >= L else 0
    shapes = [(B, T, HQ, D), (B, N, H, D), (B, N, H, D)]
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def run_both(
    qkv: list[torch.Tensor], knobs: dict[str, int], backend: str = "torch"
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(fused o, lse, idx, dq, dk, dv) and the same from the naive two-op composition."""
    results = []
    for run in ("fused", "two"):
        if run == "fused":
            o, lse, idx = compressed_select(*qkv, **knobs, backend=backend)
        else:
            o, lse = compressed_attention(
                *qkv, knobs["block_size"], knobs["stride"], backend="naive"
            )
            idx = select_blocks(qkv[0], qkv[1], lse, **knobs, backend="naive")
        gen = torch.Generator().manual_seed(1)
        # drawn in fp64 for every dtype, so fp32 and fp64 runs get the same numbers
        grad_o = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
        # with T < l the torch path's zero output is a constant outside the graph
        grads = (
            torch.autograd.grad(o, qkv, grad_o, allow_unused=True)
            if o.requires_grad
            else (None,) * 3
        )
        results.append((o, lse, idx, *grads))
    return results[0], results[1]


@pytest.mark.parametrize(("B", "T", "HQ", "H", "D", "L", "d", "ls", "n"), SELECT_CASES)
def test_fused_equals_the_two_ops_in_fp64(
    B: int, T: int, HQ: int, H: int, D: int, L: int, d: int, ls: int, n: int
) -> None:
    """Output, lse, block ids and every input gradient, at odd T, GQA and MHA, l != l',
    n above the legal count, and 132 selection blocks; fp64 makes the block ids exact."""
    knobs = {"block_size": L, "stride": d, "select_size": ls, "n_select": n}
    fused, naive = run_both(make_qkv(B, T, HQ, H, D, L, d, torch.float64), knobs)
    assert fused[0].dtype == torch.float64 and fused[2].dtype == torch.int64
    torch.testing.assert_close(fused[0], naive[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused[1], naive[1].float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(fused[2], naive[2])
    for actual, expected in zip(fused[3:], naive[3:], strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def test_fused_fp32_at_hundreds_of_blocks() -> None:
    """fp32 at T = 4099 with l' = 16 (257 selection blocks, 511 compressed tokens): output and
    gradients close to the fp64 oracle, picks equal except at fp32 near-ties."""
    knobs = {"block_size": 16, "stride": 8, "select_size": 16, "n_select": 6}
    qkv = make_qkv(1, 4099, 4, 2, 16, 16, 8, torch.float32)
    fused, _ = run_both(qkv, knobs)
    oracle = [x.detach().double().requires_grad_() for x in qkv]
    _, naive = run_both(oracle, knobs)
    torch.testing.assert_close(fused[0], naive[0].float(), rtol=1e-4, atol=2e-5)
    for actual, expected in zip(fused[3:], naive[3:], strict=True):
        torch.testing.assert_close(actual, expected.float(), rtol=1e-4, atol=5e-5)
    importance_BTHS = importance_fp64(qkv[0].detach(), qkv[1].detach(), naive[1], 16, 8, 16)
    assert_same_picks(fused[2], naive[2], importance_BTHS, 1e-6, 0.002)


@pytest.mark.parametrize("T", [1, 30, 31, 32, 47, 48])
def test_short_sequences_and_queries_that_see_nothing(T: int) -> None:
    """T < l (no compressed token), T = l - 1, l, and the first compressed tokens: queries
    before l - 1 get output 0, lse -inf, block 0 alone and zero gradients."""
    knobs = {"block_size": 32, "stride": 16, "select_size": 64, "n_select": 4}
    fused, naive = run_both(make_qkv(1, T, 4, 2, 8, 32, 16, torch.float64), knobs)
    assert torch.equal(fused[0][:, : min(T, 31)], torch.zeros_like(fused[0][:, : min(T, 31)]))
    assert torch.isneginf(fused[1][:, : min(T, 31)]).all()
    assert torch.equal(fused[2], naive[2])
    assert fused[2][0, 0, 0].tolist() == [0, -1, -1, -1]
    torch.testing.assert_close(fused[0], naive[0])
    if T >= 32:
        assert torch.equal(fused[3][:, :31], torch.zeros_like(fused[3][:, :31]))
        torch.testing.assert_close(fused[3], naive[3])


def test_hidden_tokens_never_reach_output_or_selection() -> None:
    """A compressed token's huge key and value change nothing for the queries it is hidden
    from (its block ends at 16·i + 31): outputs finite and identical, picks identical."""
    knobs = {"block_size": 32, "stride": 16, "select_size": 64, "n_select": 4}
    q, k, v = (x.detach() for x in make_qkv(1, 300, 4, 1, 8, 32, 16, torch.float32))
    o_ref, _, idx_ref = compressed_select(q, k, v, **knobs, backend="torch")
    k_big, v_big = k.clone(), v.clone()
    k_big[:, 10], v_big[:, 10] = 1e4, 1e30
    o, _, idx = compressed_select(q, k_big, v_big, **knobs, backend="torch")
    seen_from = 16 * 10 + 31
    assert torch.isfinite(o[:, :seen_from]).all()
    assert torch.equal(o[:, :seen_from], o_ref[:, :seen_from])
    assert torch.equal(idx[:, :seen_from], idx_ref[:, :seen_from])


@pytest.mark.parametrize("backend", ["naive", "auto"])
def test_other_backends_compose_the_two_ops(backend: str) -> None:
    """Backends other than the fused torch path return exactly the two ops' results."""
    knobs = {"block_size": 16, "stride": 8, "select_size": 32, "n_select": 4}
    qkv = [x.detach() for x in make_qkv(2, 201, 4, 2, 8, 16, 8, torch.float32)]
    o, lse, idx = compressed_select(*qkv, **knobs, backend=backend)
    chosen = "naive" if backend == "naive" else "torch"
    o2, lse2 = compressed_attention(*qkv, 16, 8, backend=chosen)
    assert torch.equal(lse, lse2) if chosen == "naive" else torch.allclose(lse, lse2, atol=1e-5)
    torch.testing.assert_close(o, o2)
    assert torch.equal(idx, select_blocks(qkv[0], qkv[1], lse2, **knobs, backend=chosen))


def test_bf16_runs_in_fp32_and_returns_bf16() -> None:
    """bf16 inputs: output in bf16 close to the fp32 result, same picks, gradients in bf16."""
    knobs = {"block_size": 16, "stride": 8, "select_size": 32, "n_select": 4}
    qkv32 = make_qkv(1, 257, 4, 1, 16, 16, 8, torch.float32)
    qkv16 = [x.detach().bfloat16().requires_grad_() for x in qkv32]
    o16, _, idx16 = compressed_select(*qkv16, **knobs)
    o32, _, idx32 = compressed_select(*[x.detach().bfloat16().float() for x in qkv32], **knobs)
    assert o16.dtype == torch.bfloat16
    torch.testing.assert_close(o16.float(), o32, rtol=2e-2, atol=2e-2)
    assert torch.equal(idx16, idx32)
    grads = torch.autograd.grad(o16.sum(), qkv16)
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all() for g in grads)


def test_bad_inputs_raise_value_errors_naming_the_argument() -> None:
    """Knob and shape errors name what is wrong, as the two ops do."""
    q, k, v = (x.detach() for x in make_qkv(1, 64, 4, 2, 8, 16, 8, torch.float32))
    knobs = {"block_size": 16, "stride": 8, "select_size": 32, "n_select": 4}
    with pytest.raises(ValueError, match="n_select must be an int >= 3"):
        compressed_select(q, k, v, **{**knobs, "n_select": 2})
    with pytest.raises(ValueError, match="select_size=20 must be a multiple of stride=8"):
        compressed_select(q, k, v, **{**knobs, "select_size": 20})
    with pytest.raises(ValueError, match="vcmp_BNHD must have kcmp_BNHD's shape"):
        compressed_select(q, k, v[:, :-1], **knobs)
    with pytest.raises(ValueError, match="kcmp_BNHD has N=6 compressed tokens"):
        compressed_select(q, k[:, :-1], v[:, :-1], **knobs)
    with pytest.raises(ValueError, match="backend"):
        compressed_select(q, k, v, **knobs, backend="cuda")
