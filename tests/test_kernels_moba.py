"""Tests of sparsezoo.kernels.moba: the gate, the fast paths against the naive oracle, decoding,
and one test per known MoBA mistake (../shared/reference/moba.md).

Legend: B batch, T time, HQ query heads, H KV heads, D head dim, N blocks, R routed slots.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from kernel_utils import LargestTensor

from sparsezoo.kernels.moba import (
    block_means,
    fold,
    gate,
    moba_attention,
    moba_decode_attention,
    moba_routed_attention,
    route_blocks,
    torch_impl,
)
from sparsezoo.kernels.moba.naive import route_blocks_naive

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def make_qkv(B: int, T: int, HQ: int, H: int, D: int, seed: int = 0) -> QKV:
    """Seeded random fp32 q_BTHD, k_BTHD, v_BTHD leaf tensors that require grad."""
    gen = torch.Generator().manual_seed(seed)
    q_BTHD = torch.randn(B, T, HQ, D, generator=gen).requires_grad_()
    k_BTHD = torch.randn(B, T, H, D, generator=gen).requires_grad_()
    v_BTHD = torch.randn(B, T, H, D, generator=gen).requires_grad_()
    return q_BTHD, k_BTHD, v_BTHD


def with_grads(o_BTHD: torch.Tensor, qkv: QKV) -> list[torch.Tensor]:
    """[o, dq, dk, dv] under a fixed random projection of the output."""
    grad_BTHD = torch.randn(o_BTHD.shape, generator=torch.Generator().manual_seed(1)).to(o_BTHD)
    return [o_BTHD, *torch.autograd.grad(o_BTHD, qkv, grad_BTHD)]


def output_and_grads(
    backend: str, qkv: QKV, block_size: int, top_k: int, scale: float | None = None
) -> list[torch.Tensor]:
    """Output and q, k, v gradients of ``moba_attention`` (gate included) for one backend."""
    return with_grads(moba_attention(*qkv, block_size, top_k, scale=scale, backend=backend), qkv)


def assert_all_close(
    actual: list[torch.Tensor], expected: list[torch.Tensor], tol: float = 2e-5
) -> None:
    """Output and q, k, v gradients agree at fp32 tolerance, each checked under its name."""
    for name, a, e in zip(("o", "dq", "dk", "dv"), actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


def brute_force_routing(
    q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, block_size: int, top_k: int
) -> list[list[list[list[int]]]]:
    """The gate in plain Python: per (b, t, h), the ids of the best top_k - 1 strictly-past
    blocks by q · mean key, ordered by (-score, id), returned ascending."""
    B, T, HQ, _ = q_BTHD.shape
    G = HQ // k_BTHD.shape[2]
    out = []
    for b in range(B):
        rows = []
        for t in range(T):
            heads = []
            for h in range(HQ):
                scored = []
                for j in range(t // block_size):
                    mean = k_BTHD[b, j * block_size : (j + 1) * block_size, h // G].mean(0)
                    scored.append((-float(q_BTHD[b, t, h] @ mean), j))
                heads.append(sorted(j for _, j in sorted(scored)[: top_k - 1]))
            rows.append(heads)
        out.append(rows)
    return out


@pytest.fixture(autouse=True)
def routed_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here runs the torch backend's routed path, short inputs included: they would
    otherwise take its one masked SDPA call (tested in ``test_kernels_moba_masked.py``)."""
    monkeypatch.setattr(torch_impl, "_MASKED_MAX_T", 0)


@pytest.fixture
def threads() -> Iterator[Callable[[int], None]]:
    """Set torch's intra-op thread count inside a test; the old count is restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# (B, T, HQ, H, D, block_size, top_k, scale): T = 1, odd lengths with a partial tail block,
# top_k = 1 (own block only) and top_k past the number of blocks (dense), GQA 4:1 and 4:2 and
# MHA, a custom scale, and 525 blocks of 4 keys for the torch path's offsets
CASES = [
    (2, 1, 4, 2, 8, 4, 3, None),
    (2, 7, 4, 1, 8, 4, 3, None),
    (2, 129, 4, 2, 8, 8, 3, None),
    (1, 129, 4, 4, 16, 16, 20, None),
    (2, 333, 4, 1, 8, 16, 2, 0.3),
    (2, 333, 2, 2, 16, 16, 5, None),
    (1, 300, 4, 2, 8, 32, 1, None),
    (1, 2100, 4, 2, 8, 4, 3, None),
]


@pytest.mark.parametrize(("B", "T", "HQ", "H", "D", "block_size", "top_k", "scale"), CASES)
def test_torch_matches_naive(
    B: int, T: int, HQ: int, H: int, D: int, block_size: int, top_k: int, scale: float | None
) -> None:
    """Outputs and q, k, v gradients of the torch path equal the naive oracle's in fp32."""
    qkv = make_qkv(B, T, HQ, H, D)
    expected = output_and_grads("naive", qkv, block_size, top_k, scale)
    assert_all_close(output_and_grads("torch", qkv, block_size, top_k, scale), expected)


@pytest.mark.parametrize(
    ("B", "T", "HQ", "H", "D", "block_size", "top_k"),
    [(2, 37, 4, 2, 8, 8, 3), (1, 300, 4, 1, 8, 4, 4), (2, 61, 2, 2, 8, 16, 1)],
)
def test_selection_fold_matches_naive(
    B: int, T: int, HQ: int, H: int, D: int, block_size: int, top_k: int
) -> None:
    """The folded layout on NSA's selected attention (the triton backend's and the off-CPU
    torch path's route), run here with NSA's torch backend, matches the oracle."""
    qkv = make_qkv(B, T, HQ, H, D)
    with torch.no_grad():
        idx_BTHR = route_blocks_naive(qkv[0], qkv[1], block_size, top_k)
    scale = D**-0.5
    actual = fold.moba_attention_by_selection(*qkv, idx_BTHR, block_size, scale, "torch")
    expected = moba_routed_attention(*qkv, idx_BTHR, block_size, backend="naive")
    assert_all_close(with_grads(actual, qkv), with_grads(expected, qkv))


@pytest.mark.parametrize(
    ("T", "block_size", "tile", "top_k"), [(61, 16, 4, 2), (100, 12, 4, 3), (53, 10, 4, 2)]
)
def test_selection_fold_splits_long_blocks_into_tiles(
    monkeypatch: pytest.MonkeyPatch, T: int, block_size: int, tile: int, top_k: int
) -> None:
    """Blocks longer than the kernels' tile go as runs of tiles (the tiles of the own block
    after the query's own tile left out): each call of NSA's op gets blocks of at most a tile,
    and outputs and gradients still match the oracle (a block of 10 keys goes as tiles of 2)."""
    monkeypatch.setattr(fold, "_TILE_KEYS", tile)
    sizes: list[int] = []
    select = fold.selected_attention

    def recording(*args: object, **kwargs: object) -> torch.Tensor:
        sizes.append(args[4])
        return select(*args, **kwargs)

    monkeypatch.setattr(fold, "selected_attention", recording)
    qkv = make_qkv(1, T, 4, 2, 8)
    with torch.no_grad():
        idx_BTHR = route_blocks_naive(qkv[0], qkv[1], block_size, top_k)
    actual = fold.moba_attention_by_selection(*qkv, idx_BTHR, block_size, 8**-0.5, "torch")
    expected = moba_routed_attention(*qkv, idx_BTHR, block_size, backend="naive")
    assert_all_close(with_grads(actual, qkv), with_grads(expected, qkv))
    assert sizes == [max(d for d in range(1, tile + 1) if block_size % d == 0)]


def test_several_workers_match_naive(
    threads: Callable[[int], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three workers (query blocks split three ways, dk/dv of earlier keys in per-worker
    buffers; the gate split too) match the oracle, are deterministic, and leave torch's thread
    count as it was."""
    monkeypatch.setattr(torch_impl, "_MIN_PAIRS_PER_WORKER", 1)
    monkeypatch.setattr(gate, "_MIN_QUERIES_PER_WORKER", 1)
    threads(3)
    qkv = make_qkv(2, 500, 4, 2, 8)
    with torch.no_grad():
        idx_BTHR, _ = route_blocks(qkv[0], block_means(qkv[1], 8), 8, 3)
    ranges = torch_impl._split_blocks(idx_BTHR, 8)
    assert len(ranges) == 3 and ranges[0][0] == 0 and ranges[-1][1] == 63
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert len(gate._split_rows(500, 0, 8, 3)) == 3
    expected = output_and_grads("naive", qkv, 8, 3)
    actual = output_and_grads("torch", qkv, 8, 3)
    assert_all_close(actual, expected)
    assert torch.get_num_threads() == 3
    again = output_and_grads("torch", qkv, 8, 3)
    for a, b in zip(actual, again, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("B", "T", "HQ", "H", "block_size", "tile", "used"),
    [
        (2, 333, 4, 1, 16, 4, 4),
        (2, 333, 4, 2, 16, 4, 4),
        (1, 200, 2, 2, 12, 8, 12),
        (1, 300, 4, 2, 128, 64, 64),
    ],
)
def test_own_sub_blocks_match_naive(
    monkeypatch: pytest.MonkeyPatch,
    B: int,
    T: int,
    HQ: int,
    H: int,
    block_size: int,
    tile: int,
    used: int,
) -> None:
    """The own part cut into sub-blocks (one call per sub-block against the block's keys up to
    its own, causal through the additive mask, with the query group folded into the rows: a
    view for one KV head, a copy for 2 of 4) matches the oracle on outputs and gradients;
    blocks the tile does not divide, and the partial tail block (13, 44 keys), are attended
    whole."""
    monkeypatch.setattr(torch_impl, "_OWN_TILE", tile)
    qkv = make_qkv(B, T, HQ, H, 8)
    expected = output_and_grads("naive", qkv, block_size, 3)
    assert_all_close(output_and_grads("torch", qkv, block_size, 3), expected)
    assert torch_impl._own_tile(block_size) == used
    assert torch_impl._own_tile(T % block_size) == T % block_size


def test_expert_ids_sort_in_the_narrowest_type_that_holds_them() -> None:
    """Ids up to 255 sort as uint8, up to 32767 as int16, then int32 and int64 (CASES' 1050
    experts of T = 2100 take the int16 path through the oracle comparison)."""
    cases = [(255, torch.uint8), (256, torch.int16), (32767, torch.int16), (32768, torch.int32)]
    cases += [(2**31 - 1, torch.int32), (2**31, torch.int64)]
    for largest, dtype in cases:
        assert torch_impl._id_dtype(largest) == dtype


def test_chunks_split_long_expert_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    """With tiny chunks every block's routed rows span many flash calls; results still match."""
    monkeypatch.setattr(torch_impl, "_CHUNK_ROWS", 5)
    qkv = make_qkv(2, 200, 4, 2, 8)
    assert_all_close(output_and_grads("torch", qkv, 16, 3), output_and_grads("naive", qkv, 16, 3))


def test_routed_parts_far_above_the_own_part_are_rebased(monkeypatch: pytest.MonkeyPatch) -> None:
    """A routed part whose lse passes its row's reference (the own part's lse) by more than
    _HEADROOM nats rebases the row; with the headroom shrunk to 0.5 nats most chunks do, and
    outputs and gradients still match the oracle. With the real headroom (40 nats), keys of
    one past block aligned with every query (scores ~60 nats above the rest) also rebase."""
    rebased = []
    rebase = torch_impl._rebase

    def spy(rows_M: torch.Tensor, d_M: torch.Tensor, *args: torch.Tensor) -> None:
        rebased.append(int((d_M > torch_impl._HEADROOM).sum()))
        rebase(rows_M, d_M, *args)

    monkeypatch.setattr(torch_impl, "_rebase", spy)
    qkv = make_qkv(2, 200, 4, 2, 8)
    with monkeypatch.context() as m:
        m.setattr(torch_impl, "_HEADROOM", 0.5)
        actual = output_and_grads("torch", qkv, 16, 3)
    assert sum(rebased) > 100
    assert_all_close(actual, output_and_grads("naive", qkv, 16, 3))
    rebased.clear()
    q_BTHD, k_BTHD, v_BTHD = (x.detach() for x in make_qkv(1, 96, 2, 1, 8, seed=4))
    q_BTHD[..., 0] = 8.0
    k_BTHD[:, 16:32, :, 0] = 8.0  # block 1: scores ~64 · scale above the others
    qkv = tuple(x.requires_grad_() for x in (q_BTHD, k_BTHD, v_BTHD))
    actual = output_and_grads("torch", qkv, 16, 2, scale=1.0)
    assert sum(rebased) > 0
    assert_all_close(actual, output_and_grads("naive", qkv, 16, 2, scale=1.0), tol=1e-4)


@pytest.mark.parametrize(
    ("T", "HQ", "H", "block_size", "top_k"), [(45, 2, 1, 4, 3), (37, 4, 2, 8, 2)]
)
def test_gate_matches_brute_force(T: int, HQ: int, H: int, block_size: int, top_k: int) -> None:
    """route_blocks and the naive gate pick the plain-Python gate's blocks; the margin is the
    gap between the weakest pick and the best block left out (+inf when nothing is left out)."""
    q_BTHD, k_BTHD, _ = (x.detach() for x in make_qkv(2, T, HQ, H, 8, seed=3))
    expected = brute_force_routing(q_BTHD, k_BTHD, block_size, top_k)
    idx_BTHR, margin_BTH = route_blocks(q_BTHD, block_means(k_BTHD, block_size), block_size, top_k)
    naive_BTHR = route_blocks_naive(q_BTHD, k_BTHD, block_size, top_k)
    assert torch.equal(idx_BTHR, naive_BTHR)
    for b in range(2):
        for t in range(T):
            for h in range(HQ):
                ids = expected[b][t][h]
                assert idx_BTHR[b, t, h].tolist() == ids + [-1] * (top_k - 1 - len(ids))
    kmean_BNHD = block_means(k_BTHD, block_size).repeat_interleave(HQ // H, dim=2)
    t = T - 1
    scores = sorted((q_BTHD[1, t, 1] @ kmean_BNHD[1, : t // block_size, 1].T).tolist())[::-1]
    assert margin_BTH[1, t, 1].item() == pytest.approx(scores[top_k - 2] - scores[top_k - 1])
    early = torch.arange(T) // block_size <= top_k - 1
    assert torch.isinf(margin_BTH[:, early]).all()


def test_gate_ties_keep_exactly_top_k_minus_one_lowest_ids() -> None:
    """Equal scores (q = 0) route exactly k - 1 blocks, the lowest ids, never every block tied
    with the k-th score (the ``>= kth`` mistake); a tie at the cut goes to the lower id."""
    q_BTHD = torch.zeros(1, 100, 2, 8)
    k_BTHD = torch.randn(1, 100, 1, 8)
    idx_BTHR, margin_BTH = route_blocks(q_BTHD, block_means(k_BTHD, 8), 8, 4)
    assert torch.equal(idx_BTHR[0, 99], torch.tensor([[0, 1, 2], [0, 1, 2]]))
    assert torch.equal(route_blocks_naive(q_BTHD, k_BTHD, 8, 4), idx_BTHR)
    assert (margin_BTH[0, 32:] == 0).all()
    # scores 5, 3, 9, 3, 1 for blocks 0..4 with 2 slots: 9 and one of the tied 3s (block 1)
    kmean_BNHD = torch.tensor([5.0, 3.0, 9.0, 3.0, 1.0]).view(1, 5, 1, 1)
    idx_BTHR, margin_BTH = route_blocks(torch.ones(1, 1, 1, 1), kmean_BNHD, 1, 3, start=5)
    assert idx_BTHR.flatten().tolist() == [0, 2]
    idx_BTHR, margin_BTH = route_blocks(torch.ones(1, 1, 1, 1), kmean_BNHD, 1, 4, start=5)
    assert idx_BTHR.flatten().tolist() == [0, 1, 2] and margin_BTH.item() == 0.0


def test_gate_never_scores_the_own_or_a_future_block() -> None:
    """Means of the own block and later blocks, however well they score, change nothing: a
    query in block i competes only among blocks 0 .. i - 1."""
    q_BTHD = torch.randn(1, 80, 2, 8, generator=torch.Generator().manual_seed(5))
    kmean_BNHD = torch.randn(1, 10, 1, 8, generator=torch.Generator().manual_seed(6))
    rigged_BNHD = kmean_BNHD.clone()
    rigged_BNHD[:, 4:] = 1e4 * q_BTHD[:, 79:, :1]  # the own block 9 and blocks 4.. score huge
    idx_BTHR, _ = route_blocks(q_BTHD[:, 36:40], kmean_BNHD[:, :4], 8, 3, start=36)
    rigged_BTHR, _ = route_blocks(q_BTHD[:, 36:], rigged_BNHD, 8, 3, start=36)
    # rows in block 4 (positions 36..39) see only blocks 0..3: identical either way
    assert torch.equal(idx_BTHR, rigged_BTHR[:, :4])
    own_BT11 = (torch.arange(36, 80) // 8).view(1, -1, 1, 1)
    assert (rigged_BTHR < own_BT11).all()


def test_partial_tail_block_is_never_a_candidate() -> None:
    """The tail block has no mean for the gate; its queries route among the complete blocks
    before it, and it is attended only as its own queries' own block."""
    q_BTHD, k_BTHD, v_BTHD = (x.detach() for x in make_qkv(1, 5 * 8 + 3, 2, 1, 8))
    assert block_means(k_BTHD, 8).shape == (1, 5, 1, 8)
    idx_BTHR = route_blocks_naive(q_BTHD, k_BTHD, 8, 7)  # top_k past every block
    assert (idx_BTHR[0, 40:] == torch.tensor([0, 1, 2, 3, 4, -1])).all()
    # changing the tail's keys changes no query before the tail, in output or routing
    k2_BTHD = k_BTHD.clone()
    k2_BTHD[:, 40:] = 100.0
    o1 = moba_attention(q_BTHD, k_BTHD, v_BTHD, 8, 3)
    o2 = moba_attention(q_BTHD, k2_BTHD, v_BTHD, 8, 3)
    assert torch.equal(o1[:, :40], o2[:, :40])


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_queries_without_past_blocks_are_finite(backend: str) -> None:
    """Queries in block 0 (no past block to route to: every slot -1) attend their own block
    only; no NaN in outputs or gradients, and the result is plain causal attention."""
    qkv = make_qkv(2, 16, 4, 2, 8)
    o, dq, dk, dv = output_and_grads(backend, qkv, 32, 3)
    for x in (o, dq, dk, dv):
        assert torch.isfinite(x).all()
    expected = F.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in qkv), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(o, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_batch_rows_never_share_blocks(backend: str) -> None:
    """Blocks restart at every sequence (no block crosses a batch boundary, the packed-batch
    mistake): NaN keys and values in sample 1 leave sample 0 untouched, tail block included."""
    q_BTHD, k_BTHD, v_BTHD = (x.detach() for x in make_qkv(2, 45, 4, 2, 8))
    alone = moba_attention(q_BTHD[:1], k_BTHD[:1], v_BTHD[:1], 8, 3, backend=backend)
    k_BTHD[1] = float("nan")
    v_BTHD[1] = float("nan")
    both = moba_attention(q_BTHD, k_BTHD, v_BTHD, 8, 3, backend=backend)
    torch.testing.assert_close(both[:1], alone, rtol=1e-6, atol=1e-6)


def test_backward_uses_the_merged_softmax() -> None:
    """Gradients through the own/routed merge equal those of the one softmax, where a backward
    normalising each part by its own lse would be far off: with scale 2 the parts' masses
    differ by orders of magnitude from row to row."""
    qkv = make_qkv(1, 96, 4, 1, 8, seed=7)
    expected = output_and_grads("naive", qkv, 16, 3, scale=2.0)
    assert_all_close(output_and_grads("torch", qkv, 16, 3, scale=2.0), expected, tol=1e-4)
    # one softmax: an all-ones value vector comes out as exactly one for every query
    v_ones = torch.ones(1, 96, 1, 8)
    o = moba_attention(qkv[0].detach(), qkv[1].detach(), v_ones, 16, 3, scale=2.0)
    torch.testing.assert_close(o, torch.ones_like(o))


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_own_block_is_causal_per_token(backend: str) -> None:
    """With q = 0 (all scores equal) and one-hot values, output row t is exactly the attention
    weights: uniform over keys i·B .. t of its own block and its routed blocks, 0 after t."""
    T, block_size = 40, 8
    q_BTHD = torch.zeros(1, T, 2, T)
    k_BTHD = torch.randn(1, T, 1, T)
    v_BTHD = torch.eye(T)[None, :, None, :]
    o_BTHD = moba_attention(q_BTHD, k_BTHD, v_BTHD, block_size, 2, backend=backend)
    for t in range(T):
        start = t // block_size * block_size
        keys = list(range(start, t + 1)) + (list(range(block_size)) if start else [])
        expected_T = torch.zeros(T)
        expected_T[keys] = 1 / len(keys)
        torch.testing.assert_close(o_BTHD[0, t, 1], expected_T, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize(("T", "block_size", "top_k"), [(45, 8, 6), (45, 45, 1), (64, 16, 4)])
def test_dense_limit(backend: str, T: int, block_size: int, top_k: int) -> None:
    """With block_size · top_k >= T every past block is routed: dense causal attention."""
    q_BTHD, k_BTHD, v_BTHD = make_qkv(2, T, 4, 2, 8)
    expected_BTHD = F.scaled_dot_product_attention(
        q_BTHD.transpose(1, 2),
        k_BTHD.transpose(1, 2),
        v_BTHD.transpose(1, 2),
        is_causal=True,
        enable_gqa=True,
    ).transpose(1, 2)
    actual_BTHD = moba_attention(q_BTHD, k_BTHD, v_BTHD, block_size, top_k, backend=backend)
    torch.testing.assert_close(actual_BTHD, expected_BTHD, rtol=1e-5, atol=1e-5)


def test_decode_equals_prefill_rows() -> None:
    """The T newest queries against the cache (routing over cached block means from position
    S - T) equal the same rows of the full forward, for one token and for a chunk."""
    q_BTHD, k_BTHD, v_BTHD = (x.detach() for x in make_qkv(2, 77, 4, 2, 8))
    full_BTHD = moba_attention(q_BTHD, k_BTHD, v_BTHD, 8, 3, backend="naive")
    for S, T in ((77, 1), (77, 12), (9, 9), (40, 3)):
        kmean_BNHD = block_means(k_BTHD[:, :S], 8)
        idx_BTHR, _ = route_blocks(q_BTHD[:, S - T : S], kmean_BNHD, 8, 3, start=S - T)
        o_BTHD = moba_decode_attention(
            q_BTHD[:, S - T : S], k_BTHD[:, :S], v_BTHD[:, :S], idx_BTHR, 8
        )
        torch.testing.assert_close(o_BTHD, full_BTHD[:, S - T : S], rtol=1e-5, atol=1e-5)


def test_bf16_close_to_fp32() -> None:
    """bf16 inputs (with the fp32 routing) give a bf16 output within bf16 rounding of the fp32
    oracle, and finite bf16 gradients."""
    qkv = make_qkv(2, 300, 4, 2, 16)
    with torch.no_grad():
        idx_BTHR = route_blocks_naive(qkv[0], qkv[1], 16, 3)
    expected_BTHD = moba_routed_attention(*qkv, idx_BTHR, 16, backend="naive")
    bf16 = tuple(x.detach().bfloat16().requires_grad_() for x in qkv)
    actual_BTHD = moba_routed_attention(*bf16, idx_BTHR, 16, backend="torch")
    assert actual_BTHD.dtype == torch.bfloat16
    torch.testing.assert_close(actual_BTHD.float(), expected_BTHD, rtol=0, atol=3e-2)
    grads = torch.autograd.grad(actual_BTHD.float().square().sum(), bf16)
    for x, g in zip(bf16, grads, strict=True):
        assert g.dtype == torch.bfloat16 and g.shape == x.shape and torch.isfinite(g).all()


def test_non_contiguous_inputs() -> None:
    """q, k, v viewed from a [B, H, T, D] layout give the same results as contiguous copies."""
    q_BTHD, k_BTHD, v_BTHD = (x.detach() for x in make_qkv(1, 70, 4, 2, 8))
    views = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q_BTHD, k_BTHD, v_BTHD)]
    assert not views[0].is_contiguous()
    expected_BTHD = moba_attention(q_BTHD, k_BTHD, v_BTHD, 8, 3, backend="naive")
    torch.testing.assert_close(
        moba_attention(*views, 8, 3, backend="torch"), expected_BTHD, rtol=1e-5, atol=2e-5
    )


def test_torch_path_never_materializes_dense_or_repeated_tensors(
    threads: Callable[[int], None],
) -> None:
    """Forward and backward stay O(size of q): no [T, T] or [T, N] tensor per head, no K/V
    repeated per query head, no [T, k·block_size, D] gathers for all queries at once."""
    threads(1)  # dispatch modes are per thread: keep every op on this one
    B, T, HQ, H, D, block_size, top_k = 1, 2048, 8, 1, 16, 16, 4
    qkv = make_qkv(B, T, HQ, H, D)
    with LargestTensor() as largest:
        output_and_grads("torch", qkv, block_size, top_k)
    size_q = B * T * HQ * D
    N = T // block_size
    assert largest.numel <= size_q < min(T * T, B * T * HQ * N, T * top_k * block_size * D) // 4


def test_torch_path_does_not_save_its_output() -> None:
    """The output is not among the tensors saved for the backward (the output projection
    holds it only until its own backward; the kernel recomputes it)."""
    qkv = make_qkv(1, 300, 4, 2, 8)
    saved: list[int] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(x.untyped_storage().data_ptr())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        o_BTHD = moba_attention(*qkv, 8, 3, backend="torch")
    assert saved and o_BTHD.untyped_storage().data_ptr() not in saved
    assert_all_close(with_grads(o_BTHD, qkv), output_and_grads("naive", qkv, 8, 3))


@pytest.mark.parametrize("causal", [False, True])
def test_output_stand_in_gives_the_flash_backward_the_same_gradients(causal: bool) -> None:
    """aten's flash backward reads the output only through rowsum(dO · O): the stand-in
    dO · c with c = D / |dO|² gives its gradients, rows with dO = 0 included (c = 0)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 37, 16, generator=gen) for _ in range(3))
    o, lse = torch_impl._flash(q, k, v, is_causal=causal, scale=0.25)
    do = torch.randn(o.shape, generator=gen)
    do[:, :, 5] = 0.0
    c = torch_impl._out_factor(do.transpose(1, 2), o.transpose(1, 2)).transpose(1, 2)
    assert torch.all(c[:, :, 5] == 0)
    stand_in = torch_impl._stand_in(do, c)
    expected = torch_impl._flash_backward(do, q, k, v, o, lse, 0.0, causal, scale=0.25)
    actual = torch_impl._flash_backward(do, q, k, v, stand_in, lse, 0.0, causal, scale=0.25)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    wrong = torch_impl._flash_backward(do, q, k, v, stand_in * 1.01, lse, 0.0, causal, scale=0.25)
    assert not torch.allclose(wrong[0], expected[0], rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_value_errors_naming_the_argument() -> None:
    """Invalid sizes, shapes, dtypes, indices and backends raise ValueError naming them."""
    q_BTHD, k_BTHD, v_BTHD = (x.detach() for x in make_qkv(1, 10, 4, 2, 8))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="block_size must be an int >= 1"):
            moba_attention(q_BTHD, k_BTHD, v_BTHD, bad, 3)
        with pytest.raises(ValueError, match="top_k must be an int >= 1"):
            moba_attention(q_BTHD, k_BTHD, v_BTHD, 4, bad)
    with pytest.raises(ValueError, match="k and v"):
        moba_attention(q_BTHD, k_BTHD, v_BTHD[:, :9], 4, 3)
    with pytest.raises(ValueError, match="HQ=3"):
        moba_attention(q_BTHD[:, :, :3], k_BTHD, v_BTHD, 4, 3)
    with pytest.raises(ValueError, match="dtype"):
        moba_attention(q_BTHD.double(), k_BTHD.double(), v_BTHD.double(), 4, 3)
    with pytest.raises(ValueError, match="backend='flash' is not one of"):
        moba_attention(q_BTHD, k_BTHD, v_BTHD, 4, 3, backend="flash")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        moba_attention(q_BTHD, k_BTHD, v_BTHD, 4, 3, backend="triton")
    idx_BTHR = torch.full((1, 10, 4, 2), -1)
    for bad_idx, message in (
        (idx_BTHR.int(), "must be int64"),
        (idx_BTHR[:, :9], r"must be int64 \[B, T, HQ, R\]"),
        (idx_BTHR.index_fill(1, torch.tensor([9]), 2), "strictly before the query's own block"),
        (idx_BTHR.index_fill(1, torch.tensor([9]), -2), "strictly before the query's own block"),
        (idx_BTHR.index_fill(1, torch.tensor([9]), 0), "repeats a block id"),
    ):
        with pytest.raises(ValueError, match=message):
            moba_routed_attention(q_BTHD, k_BTHD, v_BTHD, bad_idx, 4)
    kmean_BNHD = block_means(k_BTHD, 4)
    with pytest.raises(ValueError, match="kmean holds 2 block means but the query at position 12"):
        route_blocks(q_BTHD, kmean_BNHD, 4, 3, start=3)
    with pytest.raises(ValueError, match="start must be an int >= 0"):
        route_blocks(q_BTHD, kmean_BNHD, 4, 3, start=-1)
    with pytest.raises(ValueError, match=r"kmean .* must match q's batch and head dim"):
        route_blocks(q_BTHD, kmean_BNHD[..., :4], 4, 3)
    with pytest.raises(ValueError, match="strictly past blocks"):
        moba_decode_attention(q_BTHD[:, 9:], k_BTHD, v_BTHD, torch.full((1, 1, 4, 1), 2), 4)
