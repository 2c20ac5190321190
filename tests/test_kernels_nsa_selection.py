"""Tests of sparsezoo.kernels.nsa.selection: the torch path against the naive oracle, semantics.

Legend: B batch, T time, HQ query heads, H KV heads, D head dim, S selection slots, N
selection blocks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from kernel_utils import LargestTensor

from sparsezoo.kernels.nsa import selection
from sparsezoo.kernels.nsa.selection import selected_attention

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def make_qkv(B: int, T: int, HQ: int, H: int, D: int, seed: int = 0) -> QKV:
    """Seeded random fp32 q_BTHD, k_BTHD, v_BTHD leaf tensors that require grad."""
    gen = torch.Generator().manual_seed(seed)
    q_BTHD = torch.randn(B, T, HQ, D, generator=gen).requires_grad_()
    k_BTHD = torch.randn(B, T, H, D, generator=gen).requires_grad_()
    v_BTHD = torch.randn(B, T, H, D, generator=gen).requires_grad_()
    return q_BTHD, k_BTHD, v_BTHD


def nsa_like_indices(
    B: int, T: int, H: int, S: int, block_size: int, seed: int = 0
) -> torch.Tensor:
    """Indices as NSA produces them: blocks 0, own and own - 1 forced, random distinct legal
    others, -1 where fewer than S blocks are legal, slots in random order."""
    gen = torch.Generator().manual_seed(seed)
    N = -(-T // block_size)
    own_1T11 = (torch.arange(T) // block_size).view(1, T, 1, 1)
    j_111N = torch.arange(N).view(1, 1, 1, N)
    score_BTHN = torch.rand(B, T, H, N, generator=gen).masked_fill(j_111N > own_1T11, -1.0)
    forced_1T1N = (j_111N == 0) | (j_111N == own_1T11) | (j_111N == own_1T11 - 1)
    score_BTHN = score_BTHN.masked_fill(forced_1T1N, 2.0)
    top_BTHS, idx_BTHS = score_BTHN.topk(min(S, N), dim=-1)
    idx_BTHS = F.pad(idx_BTHS.masked_fill(top_BTHS < 0, -1), (0, max(0, S - N)), value=-1)
    return idx_BTHS.gather(-1, torch.rand(B, T, H, S, generator=gen).argsort(dim=-1))


def output_and_grads(
    backend: str, qkv: QKV, idx_BTHS: torch.Tensor, block_size: int, scale: float | None = None
) -> list[torch.Tensor]:
    """Output and the q, k, v gradients of a fixed random projection of it, for one backend."""
    o_BTHD = selected_attention(*qkv, idx_BTHS, block_size, scale=scale, backend=backend)
    grad_BTHD = torch.randn(o_BTHD.shape, generator=torch.Generator().manual_seed(1)).to(o_BTHD)
    return [o_BTHD, *torch.autograd.grad(o_BTHD, qkv, grad_BTHD)]


def assert_all_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """Output and q, k, v gradients agree at fp32 tolerance, each checked under its name."""
    for name, a, e in zip(("o", "dq", "dk", "dv"), actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture(params=["routed", "masked"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The torch backend runs its routed path (per-block query lists) or its masked SDPA path
    for short rows, whatever the shape."""
    limit = 0 if request.param == "routed" else 2**62
    monkeypatch.setattr(selection, "_MASKED_WORK_LIMIT", limit)
    monkeypatch.setattr(selection, "_MASKED_MASK_LIMIT", limit)
    return request.param


def force_routed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the torch backend take its routed path even for short rows."""
    monkeypatch.setattr(selection, "_MASKED_WORK_LIMIT", 0)


@pytest.fixture
def threads() -> Iterator[Callable[[int], None]]:
    """Set torch's intra-op thread count inside a test; the old count is restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# (B, T, HQ, H, D, block_size, S, scale): odd lengths, block sizes 4/8/16, one slot up to more
# slots than blocks (S = N selects every block), GQA 4:1 and 4:2 and MHA, and a long sequence
# past 128 selection blocks (2100 / 16 -> 132) to catch offset bugs
CASES = [
    (2, 1, 4, 2, 8, 4, 1, None),
    (2, 7, 4, 1, 8, 4, 3, None),
    (2, 129, 4, 2, 8, 8, 5, None),
    (1, 129, 4, 4, 16, 16, 20, None),
    (2, 333, 4, 1, 8, 16, 6, 0.3),
    (2, 333, 2, 2, 16, 4, 7, None),
    (1, 333, 4, 2, 8, 8, 42, None),
    (1, 2100, 4, 2, 8, 16, 5, None),
]


@pytest.mark.parametrize(("B", "T", "HQ", "H", "D", "block_size", "S", "scale"), CASES)
@pytest.mark.usefixtures("path")
def test_torch_matches_naive(
    B: int, T: int, HQ: int, H: int, D: int, block_size: int, S: int, scale: float | None
) -> None:
    """Outputs and q, k, v gradients of the torch path equal the naive oracle's in fp32."""
    qkv = make_qkv(B, T, HQ, H, D)
    idx_BTHS = nsa_like_indices(B, T, H, S, block_size)
    expected = output_and_grads("naive", qkv, idx_BTHS, block_size, scale)
    assert_all_close(output_and_grads("torch", qkv, idx_BTHS, block_size, scale), expected)


def test_several_workers_match_naive(
    threads: Callable[[int], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three workers (query rows split three ways, per-worker dk/dv summed) match the oracle,
    are deterministic, and leave torch's thread count as it was."""
    force_routed(monkeypatch)
    monkeypatch.setattr(selection, "_MIN_PAIRS_PER_WORKER", 1)
    monkeypatch.setattr(selection, "_MIN_EXPERT_WORK", 0)
    threads(3)
    qkv = make_qkv(2, 500, 4, 2, 8)
    idx_BTHS = nsa_like_indices(2, 500, 2, 6, 8)
    assert selection._workers(idx_BTHS, 2 * 8, 8) == 3
    routing = selection._route(idx_BTHS, 8, 2, 3)
    # flat rows h·B·T + b·T + t: one (query, KV head) each
    rows_W = [torch.cat([bt.rows_Y for bt in batches]).unique() for batches in routing.batches_W]
    sizes = [len(rows) for rows in rows_W]
    assert min(sizes) > 0.8 * max(sizes)  # balanced
    assert len(torch.cat(rows_W).unique()) == sum(sizes)  # disjoint (row, KV head) sets
    expected = output_and_grads("naive", qkv, idx_BTHS, 8)
    actual = output_and_grads("torch", qkv, idx_BTHS, 8)
    assert_all_close(actual, expected)
    assert torch.get_num_threads() == 3
    again = output_and_grads("torch", qkv, idx_BTHS, 8)
    for a, b in zip(actual, again, strict=True):
        assert torch.equal(a, b)


def test_small_experts_get_one_worker(threads: Callable[[int], None]) -> None:
    """Experts whose mean score matmul is under _MIN_EXPERT_WORK multiply-adds run on one
    worker whatever the thread count; larger ones on as many as the selections pay for."""
    threads(2)
    idx_BTHS = nsa_like_indices(2, 4096, 2, 6, 16)  # ~96 queries per block of 16
    assert selection._workers(idx_BTHS, 2 * 32, 16) == 1  # ~0.1M per expert
    assert selection._workers(idx_BTHS, 16 * 64, 16) == 2  # ~1.6M per expert
    threads(1)
    assert selection._workers(idx_BTHS, 16 * 64, 16) == 1


def test_chunks_split_long_expert_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    """With tiny chunks every expert spans many chunks, own-block queries cut across chunk
    borders and gathered and contiguous chunks mix; results still match the oracle."""
    force_routed(monkeypatch)
    monkeypatch.setattr(selection, "_CHUNK_ROWS", 12)
    qkv = make_qkv(2, 200, 4, 2, 8)
    idx_BTHS = nsa_like_indices(2, 200, 2, 5, 16)
    assert_all_close(
        output_and_grads("torch", qkv, idx_BTHS, 16), output_and_grads("naive", qkv, idx_BTHS, 16)
    )


def test_short_lists_share_padded_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short query lists are batched: one batch holds chunks of many blocks, padded to its
    longest, with the same query in several of its chunks (its own and previous block);
    every slot's query row selected the chunk's block, a chunk's rows increase and its pads
    repeat its first row behind them, and the results match the oracle."""
    force_routed(monkeypatch)
    B, T, H, S, block_size = 2, 300, 2, 4, 8
    qkv = make_qkv(B, T, 4, H, 8)
    idx_BTHS = nsa_like_indices(B, T, H, S, block_size)
    (batches,) = selection._route(idx_BTHS, block_size, 2, 1).batches_W
    N = -(-T // block_size)
    mixed = 0
    for bt in batches:
        C = bt.blocks_C.shape[0]
        rows_CM = bt.rows_Y.view(C, -1)
        # (b·H + h)·N + j -> the flat row h·B·T + b·T + t of every slot
        b_C, h_C, j_C = bt.blocks_C // N // H, bt.blocks_C // N % H, bt.blocks_C % N
        assert (rows_CM // (B * T) == h_C[:, None]).all()
        assert (rows_CM % (B * T) // T == b_C[:, None]).all()
        t_CM = rows_CM % T
        assert (idx_BTHS[b_C[:, None], t_CM, h_C[:, None]] == j_C[:, None, None]).any(-1).all()
        pad_CM = rows_CM == rows_CM[:, :1]
        pad_CM[:, 0] = False
        length_C = (~pad_CM).sum(dim=1)
        assert (pad_CM.sum(dim=1) == rows_CM.shape[1] - length_C).all()  # pads come last
        for rows_M, length in zip(rows_CM, length_C.tolist(), strict=True):
            assert (rows_M[1:length] > rows_M[: length - 1]).all()
        assert bt.future_COL is not None or not pad_CM.any()
        real_Y = rows_CM[~pad_CM]
        if C > 1 and pad_CM.any() and len(real_Y.unique()) < len(real_Y):
            mixed += 1
    assert len(batches) < B * H * N // 10 and mixed > 0
    assert_all_close(
        output_and_grads("torch", qkv, idx_BTHS, block_size),
        output_and_grads("naive", qkv, idx_BTHS, block_size),
    )


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.usefixtures("path")
def test_rows_without_keys_output_zero_with_finite_grads(backend: str) -> None:
    """All -1 rows (and a whole sequence of them) give exactly 0 and finite zero gradients."""
    qkv = make_qkv(2, 50, 4, 2, 8)
    idx_BTHS = nsa_like_indices(2, 50, 2, 4, 8)
    idx_BTHS[0, 10:20, 1] = -1
    idx_BTHS[1] = -1
    o_BTHD, dq_BTHD, dk_BTHD, dv_BTHD = output_and_grads(backend, qkv, idx_BTHS, 8)
    assert torch.equal(o_BTHD[0, 10:20, 2:], torch.zeros(10, 2, 8))
    assert torch.equal(o_BTHD[1], torch.zeros(50, 4, 8))
    assert torch.equal(dq_BTHD[1], torch.zeros(50, 4, 8))
    assert torch.equal(dk_BTHD[1], torch.zeros(50, 2, 8))
    for x in (o_BTHD, dq_BTHD, dk_BTHD, dv_BTHD):
        assert torch.isfinite(x).all()
    assert o_BTHD[0, :10].abs().sum() > 0
    if backend == "torch":
        assert_all_close(
            [o_BTHD, dq_BTHD, dk_BTHD, dv_BTHD], output_and_grads("naive", qkv, idx_BTHS, 8)
        )


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.usefixtures("path")
def test_own_block_is_causal_per_token(backend: str) -> None:
    """Selecting only its own block, query t weighs keys j·block_size .. t equally (q = 0)
    and the later keys of its block not at all; V one-hot per position (D = T) makes output
    row t exactly the attention weights."""
    T, block_size = 40, 16
    q_BTHD = torch.zeros(1, T, 2, T)
    k_BTHD = torch.randn(1, T, 1, T)
    v_BTHD = torch.eye(T)[None, :, None, :]
    idx_BTHS = (torch.arange(T) // block_size).view(1, T, 1, 1)
    o_BTHD = selected_attention(q_BTHD, k_BTHD, v_BTHD, idx_BTHS, block_size, backend=backend)
    for t in range(T):
        start = t // block_size * block_size
        expected_T = torch.zeros(T)
        expected_T[start : t + 1] = 1 / (t + 1 - start)
        torch.testing.assert_close(o_BTHD[0, t, 1], expected_T, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.usefixtures("path")
def test_future_blocks_contribute_nothing(backend: str) -> None:
    """A block starting after the query changes nothing, and a row naming only future blocks
    outputs 0: the same as -1 in those slots."""
    qkv = make_qkv(1, 100, 4, 2, 8)
    idx_BTHS = nsa_like_indices(1, 100, 2, 4, 8)
    with_future_BTHS = torch.cat([idx_BTHS, torch.full_like(idx_BTHS[..., :1], -1)], dim=-1)
    padded_BTHS = with_future_BTHS.clone()
    t_T = torch.arange(100)
    # slot 4: the block after the query's own one wherever that block exists
    next_T = t_T // 8 + 1
    with_future_BTHS[0, :, :, 4] = torch.where(next_T < 13, next_T, -1)[:, None]
    with_future_BTHS[0, 5, 0] = torch.tensor([1, 2, 5, 12, -1])
    padded_BTHS[0, 5, 0] = -1
    actual = output_and_grads(backend, qkv, with_future_BTHS, 8)
    expected = output_and_grads(backend, qkv, padded_BTHS, 8)
    assert_all_close(actual, expected)
    assert torch.equal(actual[0][0, 5, :2], torch.zeros(2, 8))


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.usefixtures("path")
def test_selecting_every_block_is_dense_causal(backend: str) -> None:
    """With every legal block selected the op is dense causal attention (SDPA, GQA)."""
    q_BTHD, k_BTHD, v_BTHD = make_qkv(2, 45, 4, 2, 8)
    N = 6
    idx_BTHS = torch.arange(N).expand(2, 45, 2, N).flip(-1).contiguous()
    expected_BTHD = F.scaled_dot_product_attention(
        q_BTHD.transpose(1, 2),
        k_BTHD.transpose(1, 2),
        v_BTHD.transpose(1, 2),
        is_causal=True,
        enable_gqa=True,
    ).transpose(1, 2)
    actual_BTHD = selected_attention(q_BTHD, k_BTHD, v_BTHD, idx_BTHS, 8, backend=backend)
    torch.testing.assert_close(actual_BTHD, expected_BTHD, rtol=1e-5, atol=1e-5)


def test_peaked_softmax_shifts_and_redoes_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores spread over tens of nats make the torch path shift its row references (rows with
    an upper bound past _HEADROOM) and redo the rows whose bound was too loose with their exact
    maxima (both counted); it still matches the oracle, up to the fp32 conditioning of such
    peaked softmaxes (both sit ~1e-4 from a float64 evaluation)."""
    force_routed(monkeypatch)
    shifted, redone = [], []
    accumulate, row_max = selection._accumulate_batches, selection._row_max_batches

    def spy_accumulate(*args: Any) -> None:
        ref_ZG = inspect.signature(accumulate).bind(*args).arguments["ref_ZG"]
        shifted.append(bool(ref_ZG.any()))
        accumulate(*args)

    def spy_row_max(batches: tuple[selection._Batch, ...], *args: Any) -> None:
        redone.append(len(torch.cat([bt.rows_Y for bt in batches]).unique()))
        row_max(batches, *args)

    monkeypatch.setattr(selection, "_accumulate_batches", spy_accumulate)
    monkeypatch.setattr(selection, "_row_max_batches", spy_row_max)
    qkv = make_qkv(1, 300, 4, 2, 8)
    idx_BTHS = nsa_like_indices(1, 300, 2, 8, 8)
    expected = output_and_grads("naive", qkv, idx_BTHS, 8, scale=8.0)
    actual = output_and_grads("torch", qkv, idx_BTHS, 8, scale=8.0)
    assert shifted[0] and 0 < sum(redone) < 300 * 2  # (query, KV head) rows
    for name, a, e in zip(("o", "dq", "dk", "dv"), actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=3e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_loose_score_bound_is_redone_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Queries and keys of large norm in orthogonal subspaces score near 0 while the norm
    bound is ~200 nats higher, so exp(s - ref) underflows on the first pass for the even
    queries; exactly those rows are recomputed against their exact maxima, matching the
    oracle."""
    force_routed(monkeypatch)
    redone = []
    row_max = selection._row_max_batches

    def spy_row_max(batches: tuple[selection._Batch, ...], *args: Any) -> None:
        redone.extend(bt.rows_Y % 200 for bt in batches)  # flat rows h·T + t, B = 1
        row_max(batches, *args)

    monkeypatch.setattr(selection, "_row_max_batches", spy_row_max)
    q_BTHD, k_BTHD, v_BTHD = (x.detach() for x in make_qkv(1, 200, 4, 2, 8))
    q_BTHD[:, ::2, :, 4:] *= 12.0  # even queries: big, in dims 4-7 only
    q_BTHD[:, ::2, :, :4] = 0.0
    k_BTHD[:, ::5, :, :4] *= 12.0  # every 5th key: big, in dims 0-3 only
    k_BTHD[:, ::5, :, 4:] = 0.0
    qkv = tuple(x.requires_grad_() for x in (q_BTHD, k_BTHD, v_BTHD))
    idx_BTHS = nsa_like_indices(1, 200, 2, 5, 8)
    # the oracle in fp64: at these norms two fp32 evaluations of dq differ by ~2e-5 anyway
    qkv64 = tuple(x.detach().double().requires_grad_() for x in qkv)
    expected = [x.float() for x in output_and_grads("naive", qkv64, idx_BTHS, 8)]
    assert_all_close(output_and_grads("torch", qkv, idx_BTHS, 8), expected)
    rows = torch.cat(redone).unique()
    assert len(rows) > 50 and (rows % 2 == 0).all()


def test_scores_hundreds_of_nats_high_stay_finite(monkeypatch: pytest.MonkeyPatch) -> None:
    """Queries and keys pointing the same way score up to ~300 nats: the row references must
    sit in the units of the (base-2) scores, or the terms exp2(s - ref) overflow fp32 (a bound
    left in nats leaves them ~0.44 x 300 + 40 binary orders above the reference, past 2^128).
    The torch path matches the fp64 oracle, outputs and gradients, to what fp32 resolves at
    such scores (one ulp of a 250-nat score moves a probability by ~2e-5 relative, and the
    gradients scale with |q| = 60: the exp-based path before base 2 was 3.6e-4 off in dk)."""
    force_routed(monkeypatch)
    q_BTHD, k_BTHD, v_BTHD = (x.detach() for x in make_qkv(1, 96, 4, 2, 8))
    q_BTHD[..., 0] = 60.0
    k_BTHD[..., 0] = 12.0
    qkv = tuple(x.requires_grad_() for x in (q_BTHD, k_BTHD, v_BTHD))
    idx_BTHS = nsa_like_indices(1, 96, 2, 4, 8)
    qkv64 = tuple(x.detach().double().requires_grad_() for x in qkv)
    expected = [x.float() for x in output_and_grads("naive", qkv64, idx_BTHS, 8)]
    actual = output_and_grads("torch", qkv, idx_BTHS, 8)
    assert all(bool(torch.isfinite(a).all()) for a in actual)
    for name, a, e in zip(("o", "dq", "dk", "dv"), actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=2e-3, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.usefixtures("path")
def test_non_contiguous_inputs() -> None:
    """q, k, v viewed from a [B, H, T, D] layout give the same results as contiguous copies."""
    q_BTHD, k_BTHD, v_BTHD = (x.detach() for x in make_qkv(1, 70, 4, 2, 8))
    idx_BTHS = nsa_like_indices(1, 70, 2, 3, 8)
    views = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q_BTHD, k_BTHD, v_BTHD)]
    assert not views[0].is_contiguous()
    expected_BTHD = selected_attention(q_BTHD, k_BTHD, v_BTHD, idx_BTHS, 8, backend="naive")
    actual_BTHD = selected_attention(*views, idx_BTHS, 8, backend="torch")
    torch.testing.assert_close(actual_BTHD, expected_BTHD, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ["naive", "torch", "auto"])
@pytest.mark.usefixtures("path")
def test_bf16_close_to_fp32(backend: str) -> None:
    """bf16 inputs give a finite bf16 output within bf16 rounding of the fp32 oracle, and
    finite bf16 gradients."""
    qkv = make_qkv(2, 300, 4, 2, 16)
    idx_BTHS = nsa_like_indices(2, 300, 2, 6, 16)
    expected_BTHD = selected_attention(*qkv, idx_BTHS, 16, backend="naive")
    bf16 = tuple(x.detach().bfloat16().requires_grad_() for x in qkv)
    actual_BTHD = selected_attention(*bf16, idx_BTHS, 16, backend=backend)
    assert actual_BTHD.dtype == torch.bfloat16
    torch.testing.assert_close(actual_BTHD.float(), expected_BTHD, rtol=0, atol=3e-2)
    grads = torch.autograd.grad(actual_BTHD.float().square().sum(), bf16)
    for x, g in zip(bf16, grads, strict=True):
        assert g.dtype == torch.bfloat16 and g.shape == x.shape
        assert torch.isfinite(g).all()


def test_torch_path_never_materializes_selected_keys(
    threads: Callable[[int], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forward and backward of the routed path stay O(size of q): no [T, T] mask, no
    [T, S·block_size, D] key gathers and no [B, T, HQ, S·block_size] scores for all queries
    at once (the shape is past the masked path's limit anyway; forced so it stays tested)."""
    force_routed(monkeypatch)
    threads(1)  # dispatch modes are per thread: keep every op on this one
    B, T, HQ, H, D, block_size, S = 1, 2048, 4, 1, 16, 16, 16
    qkv = make_qkv(B, T, HQ, H, D)
    idx_BTHS = nsa_like_indices(B, T, H, S, block_size)
    with LargestTensor() as largest:
        output_and_grads("torch", qkv, idx_BTHS, block_size)
    smallest_forbidden = min(T * T, T * S * block_size * D, B * T * HQ * S * block_size)
    assert largest.numel <= 2 * B * T * HQ * D < smallest_forbidden // 4


def test_short_rows_take_the_masked_path(threads: Callable[[int], None]) -> None:
    """The masked SDPA path serves short rows of small groups and blocks (a length
    curriculum's first phases on the CPU preset), whatever the thread count, and never rows
    from 256 tokens on, paper-sized groups and blocks, or calls whose [B, H, T·G, T] mask
    would pass _MASKED_MASK_LIMIT."""

    def masked(B: int, T: int, HQ: int, H: int, D: int, block_size: int) -> bool:
        q_BTHD = torch.empty(B, T, HQ, D)
        return selection._use_masked(q_BTHD, torch.empty(B, T, H, D), block_size)

    for n in (1, 2, 3):
        threads(n)
        assert masked(128, 32, 4, 2, 32, 16) and masked(32, 128, 4, 2, 32, 16)
        assert not masked(16, 256, 4, 2, 32, 16) and not masked(8, 512, 4, 2, 32, 16)
        assert not masked(2, 4096, 4, 2, 32, 16)
        assert not masked(1, 64, 16, 1, 64, 64)  # the paper's group of 16, D 64, blocks of 64
        # B·HQ·T² mask elements: 2**25 at B 8192 (the limit), 2**26 at B 16384
        assert masked(8192, 32, 4, 2, 32, 16) and not masked(16384, 32, 4, 2, 32, 16)


def test_bad_inputs_raise_value_errors_naming_the_argument() -> None:
    """Invalid indices, block sizes, shapes, heads and backends raise ValueError naming them."""
    q_BTHD, k_BTHD, v_BTHD = make_qkv(1, 10, 4, 2, 8)
    idx_BTHS = nsa_like_indices(1, 10, 2, 3, 4)
    for block_size in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="block_size"):
            selected_attention(q_BTHD, k_BTHD, v_BTHD, idx_BTHS, block_size)
    with pytest.raises(ValueError, match="block_indices must be int64"):
        selected_attention(q_BTHD, k_BTHD, v_BTHD, idx_BTHS.int(), 4)
    with pytest.raises(ValueError, match=r"block_indices must be \[B, T, H, S\]"):
        selected_attention(q_BTHD, k_BTHD, v_BTHD, idx_BTHS[:, :9], 4)
    with pytest.raises(ValueError, match=r"block_indices must be \[B, T, H, S\]"):
        selected_attention(q_BTHD, k_BTHD, v_BTHD, idx_BTHS[:, :, :1], 4)
    with pytest.raises(ValueError, match="S >= 1"):
        selected_attention(q_BTHD, k_BTHD, v_BTHD, idx_BTHS[..., :0], 4)
    for bad in (-2, 3):
        wrong_BTHS = idx_BTHS.clone()
        wrong_BTHS[0, 9, 1, 0] = bad
        with pytest.raises(ValueError, match=r"block_indices values .* \[0, 3\)"):
            selected_attention(q_BTHD, k_BTHD, v_BTHD, wrong_BTHS, 4)
    duplicate_BTHS = torch.tensor([2, -1, 2]).expand(1, 10, 2, 3)
    with pytest.raises(ValueError, match="repeats a block id"):
        selected_attention(q_BTHD, k_BTHD, v_BTHD, duplicate_BTHS, 4)
    with pytest.raises(ValueError, match="k and v"):
        selected_attention(q_BTHD, k_BTHD, v_BTHD[:, :9], idx_BTHS, 4)
    with pytest.raises(ValueError, match="time"):
        selected_attention(q_BTHD[:, :9], k_BTHD, v_BTHD, idx_BTHS, 4)
    with pytest.raises(ValueError, match="4-d"):
        selected_attention(q_BTHD[0], k_BTHD, v_BTHD, idx_BTHS, 4)
    with pytest.raises(ValueError, match="HQ=3"):
        selected_attention(q_BTHD[:, :, :3], k_BTHD, v_BTHD, idx_BTHS, 4)
    with pytest.raises(ValueError, match="dtypes"):
        selected_attention(q_BTHD.double(), k_BTHD, v_BTHD, idx_BTHS, 4)
    with pytest.raises(ValueError, match="backend='flash' is not one of"):
        selected_attention(q_BTHD, k_BTHD, v_BTHD, idx_BTHS, 4, backend="flash")
    # the Triton kernel exists but refuses CPU tensors outside the interpreter
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        selected_attention(q_BTHD, k_BTHD, v_BTHD, idx_BTHS, 4, backend="triton")
