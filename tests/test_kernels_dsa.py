"""Tests of sparsezoo.kernels.dsa (naive and torch): indexer scores, top-k, sparse attention.

Legend: B batch, T queries, S keys (queries are the last T of them), N indexer heads, E indexer
head dim, U key sets per query, K slots, HQ query heads, H KV heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from kernel_utils import LargestTensor

from sparsezoo.kernels.dsa import attention, indexer, indexer_scores, indexer_topk, sparse_attention


@pytest.fixture
def threads() -> Iterator[Callable[[int], None]]:
    """Set torch's thread count for one test and restore it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def make_index_inputs(
    B: int, T: int, S: int, N: int, E: int, U: int | None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded fp32 leaves q_idx [B,T,N,E], k_idx [B,S,E], w [B,T,N] or [B,T,U,N] needing grad."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, N, E, generator=gen).requires_grad_()
    k = torch.randn(B, S, E, generator=gen).requires_grad_()
    w_shape = (B, T, N) if U is None else (B, T, U, N)
    return q, k, torch.randn(w_shape, generator=gen).requires_grad_()


def make_qkv(
    B: int, T: int, S: int, HQ: int, H: int, D: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded fp32 leaves q [B, T, HQ, D], k and v [B, S, H, D] needing grad."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, HQ, D, generator=gen).requires_grad_()
    k = torch.randn(B, S, H, D, generator=gen).requires_grad_()
    v = torch.randn(B, S, H, D, generator=gen).requires_grad_()
    return q, k, v


def random_indices(shape: tuple[int, ...], S: int, seed: int = 3) -> torch.Tensor:
    """int64 slots: distinct random key positions per row (any position, future ones too),
    -1 past S, about one slot in five -1, and every 7th query row entirely -1."""
    gen = torch.Generator().manual_seed(seed)
    *rows, K = shape
    idx = torch.rand(*rows, S, generator=gen).argsort(dim=-1)[..., :K]
    idx = torch.nn.functional.pad(idx, (0, K - idx.shape[-1]), value=-1)
    idx[torch.rand(*rows, K, generator=gen) < 0.2] = -1
    idx[:, 5::7] = -1
    return idx


def cotangent_grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Gradients of ``inputs`` under a seeded random cotangent (zero on -inf outputs)."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    g = g.masked_fill(torch.isinf(out), 0.0)
    return list(torch.autograd.grad(out, inputs, g))


def assert_all_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """fp32 agreement of every tensor (inf positions must match exactly)."""
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=2e-5, msg=lambda m, i=i: f"#{i}: {m}")


def assert_same_selection(
    actual: torch.Tensor, expected: torch.Tensor, scores: torch.Tensor
) -> None:
    """Index SETS agree row by row; a differing key is only allowed as a near-tie at the
    row's k-th score (the two paths round the scores differently)."""
    assert actual.shape == expected.shape
    a, e = actual.sort(dim=-1).values, expected.sort(dim=-1).values
    mismatch = (a != e).any(dim=-1)
    for row in mismatch.nonzero().tolist():
        pick = tuple(row)
        row_scores = scores[pick].detach()
        kth = row_scores[expected[pick][expected[pick] >= 0]].min()
        only = set(actual[pick].tolist()) ^ set(expected[pick].tolist())
        gap = (row_scores[list(only)] - kth).abs().max().item()
        assert gap < 1e-5, f"row {pick}: sets differ by {only}, score gap {gap}"
    assert mismatch.float().mean() < 0.01


# (B, T, S, N, E, U): prefill (T = S), decode-like (T < S, T = 1), odd sizes, per-group sets
SCORE_CASES = [
    (2, 1, 1, 2, 4, None),
    (2, 37, 37, 4, 8, None),
    (2, 37, 50, 4, 8, 3),
    (1, 1, 45, 3, 6, None),
    (2, 129, 129, 2, 16, 2),
]


@pytest.mark.parametrize(("B", "T", "S", "N", "E", "U"), SCORE_CASES)
@pytest.mark.parametrize("slots", [False, True])
def test_indexer_scores_torch_matches_naive(
    B: int, T: int, S: int, N: int, E: int, U: int | None, slots: bool
) -> None:
    """Dense and slot scores, and the q_idx, k_idx, w gradients, equal the oracle's."""
    inputs = make_index_inputs(B, T, S, N, E, U)
    idx = random_indices((B, T, *(() if U is None else (U,)), 9), S) if slots else None
    results = {}
    for backend in ("naive", "torch"):
        out = indexer_scores(*inputs, indices=idx, backend=backend)
        results[backend] = [out, *cotangent_grads(out, inputs)]
    assert_all_close(results["torch"], results["naive"])


def test_indexer_scores_chunk_borders(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny chunks (one to three queries each, hundreds of them) give the same results."""
    monkeypatch.setattr(indexer, "_CHUNK_ELEMENTS", 300)
    monkeypatch.setattr(indexer, "_CHUNK_SLOTS", 20)
    inputs = make_index_inputs(2, 301, 301, 3, 8, 2)
    idx = random_indices((2, 301, 2, 7), 301)
    for slots in (None, idx):
        results = {}
        for backend in ("naive", "torch"):
            out = indexer_scores(*inputs, indices=slots, backend=backend)
            results[backend] = [out, *cotangent_grads(out, inputs)]
        assert_all_close(results["torch"], results["naive"])


def test_indexer_scores_formula_and_causal_mask() -> None:
    """One score by hand: scale · sum_j w_j ReLU(q_j · k); keys after the query are -inf."""
    q, k, w = (x.detach() for x in make_index_inputs(1, 3, 5, 2, 4, None))
    out = indexer_scores(q, k, w, scale=0.7, backend="torch")
    t, s = 1, 2  # query 1 of 3 sits at position 5 - 3 + 1 = 3
    expected = 0.7 * sum(w[0, t, j] * torch.relu(q[0, t, j] @ k[0, s]) for j in range(2))
    torch.testing.assert_close(out[0, t, s], expected)
    assert torch.isinf(out[0, 0, 3:]).all() and torch.isfinite(out[0, 0, :3]).all()
    assert torch.isfinite(out[0, 2]).all()
    # the default scale is the paper's N^-1/2 · E^-1/2
    torch.testing.assert_close(indexer_scores(q, k, w), out * (8**-0.5 / 0.7))


# (B, T, S, N, E, U, topk): k below, at and above the visible counts, per-group sets, decoding
TOPK_CASES = [
    (2, 37, 37, 4, 8, None, 5),
    (2, 37, 50, 4, 8, 3, 11),
    (1, 1, 300, 2, 8, None, 17),
    (2, 20, 20, 2, 4, None, 20),
    (1, 9, 12, 2, 4, 2, 40),
    (1, 400, 400, 4, 16, None, 64),
]


@pytest.mark.parametrize(("B", "T", "S", "N", "E", "U", "topk"), TOPK_CASES)
def test_indexer_topk_torch_matches_naive_as_sets(
    B: int, T: int, S: int, N: int, E: int, U: int | None, topk: int
) -> None:
    """Index sets equal the oracle's (up to near-ties); rows are causal, -1 padded, distinct."""
    q, k, w = make_index_inputs(B, T, S, N, E, U)
    expected = indexer_topk(q, k, w, topk, backend="naive")
    actual = indexer_topk(q, k, w, topk, backend="torch")
    assert actual.dtype == torch.int64 and actual.shape == (*w.shape[:-1], topk)
    assert_same_selection(actual, expected, indexer_scores(q, k, w, backend="naive"))
    pos = torch.arange(S - T, S).view(1, T, *((1,) if U else ()), 1)
    count = (actual >= 0).sum(-1)
    assert torch.equal(count, (pos[..., 0] + 1).clamp(max=topk).expand_as(count))
    assert (actual <= pos).all()
    used = actual.sort(-1).values
    assert not ((used[..., 1:] == used[..., :-1]) & (used[..., 1:] >= 0)).any()


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("T", [30, 1])
def test_topk_ties_prefer_the_later_key(
    backend: str, T: int, threads: Callable[[int], None]
) -> None:
    """With w = 0 every score ties at 0: the k latest visible keys win, in every backend,
    also when a decode step (T = 1) splits the keys over workers."""
    threads(3)
    q, k, w = (x.detach() for x in make_index_inputs(2 if T > 1 else 1, T, 40, 2, 4, None))
    idx = indexer_topk(q, k, torch.zeros_like(w), 6, backend=backend)
    pos = torch.arange(40 - T, 40).view(1, T, 1)
    expected = pos - torch.arange(6).view(1, 1, 6)
    assert torch.equal(idx.sort(-1).values, expected.sort(-1).values.expand_as(idx))


def test_topk_runs_after_the_causal_mask() -> None:
    """Future keys scoring far above every visible one are never picked (mask before top-k)."""
    q, k, w = (x.detach() for x in make_index_inputs(1, 50, 50, 2, 4, None))
    w = w.abs()
    k = k.clone()
    q = q.clone()
    q[..., 0], k[:, 25:, 0] = 1.0, 100.0  # keys 25.. dominate every query's scores
    for backend in ("naive", "torch"):
        idx = indexer_topk(q, k, w, 8, backend=backend)
        assert (idx[0, :25] < 25).all()
        assert (idx[0, 40] >= 25).all()


def test_topk_chunk_borders_and_workers(
    monkeypatch: pytest.MonkeyPatch, threads: Callable[[int], None]
) -> None:
    """Hundreds of tiny chunks over three workers select what the oracle selects, with each
    chunk's keys scored in one block or in blocks of 7 keys (the last one partial)."""
    monkeypatch.setattr(indexer, "_CHUNK_ELEMENTS", 700)
    threads(3)
    q, k, w = make_index_inputs(2, 333, 333, 2, 8, 2)
    expected = indexer_topk(q, k, w, 13, backend="naive")
    scores = indexer_scores(q, k, w, backend="naive")
    assert_same_selection(indexer_topk(q, k, w, 13, backend="torch"), expected, scores)
    monkeypatch.setattr(indexer, "_MIN_KEY_BLOCK", 7)
    monkeypatch.setattr(indexer, "_L2_ELEMENTS", 1)
    assert_same_selection(indexer_topk(q, k, w, 13, backend="torch"), expected, scores)
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize(
    ("workers", "B", "T", "U"), [(2, 1, 1, None), (3, 1, 1, 3), (2, 1, 3, 2), (3, 2, 1, None)]
)
def test_decode_topk_splits_the_keys_over_the_workers(
    monkeypatch: pytest.MonkeyPatch,
    threads: Callable[[int], None],
    workers: int,
    B: int,
    T: int,
    U: int | None,
) -> None:
    """A decode step (fewer query chunks than workers) scores with the keys split over the
    workers, [p, E] @ [E, C·N], and selects what the oracle selects, the last query's future
    key excluded; the chunked path is never taken. Keys stored keys-contiguous per dim select
    the same."""
    threads(workers)
    monkeypatch.setattr(indexer, "_split", None)  # the query-chunk path would call it
    q, k, w = make_index_inputs(B, T, 777, 4, 8, U, seed=5)
    expected = indexer_topk(q, k, w, 40, backend="naive")
    actual = indexer_topk(q, k, w, 40, backend="torch")
    assert_same_selection(actual, expected, indexer_scores(q, k, w, backend="naive"))
    k_by_dim = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(indexer_topk(q, k_by_dim, w, 40, backend="torch"), actual)
    if T > 1:
        assert (actual[:, 0] < 777 - T + 1).all()


def test_topk_chunks_keep_every_worker_busy(threads: Callable[[int], None]) -> None:
    """Prefill chunks are cut so every worker gets one (1024 queries whose ReLU terms fit one
    chunk become two on two workers); a few decode queries stay one chunk (the key-split
    path); long rows are capped by the chunk's ReLU terms."""
    threads(2)
    assert indexer._chunks(1024, 1024, 4) == [(0, 512), (512, 1024)]
    assert indexer._chunks(5, 70000, 4) == [(0, 5)]
    assert indexer._chunks(20, 20, 4, first=4) == [(4, 12), (12, 20)]
    chunks = indexer._chunks(32768, 32768, 4)
    assert len(chunks) == 1024 and all(t1 - t0 == 32 for t0, t1 in chunks)


def test_thresholded_topk_is_exact_on_adversarial_rows() -> None:
    """Rows whose best keys all sit on the sampled stride (the threshold keeps too few
    candidates), rows of near-ties and random rows all get exactly torch's top-k set, in a
    batch of rows and each row alone."""
    gen = torch.Generator().manual_seed(0)
    R, P, topk = 6, 4096, 64
    scores = torch.randn(R, P, generator=gen)
    scores[0, ::8] += 100.0  # the sample holds every top-k key: too few survive the threshold
    scores[1] = torch.randn(P, generator=gen).round(decimals=1)  # many exact ties
    scores[2, 3000:] = float("-inf")  # a causal tail
    selected = indexer.select_topk_rows(scores, topk)
    for r in range(R):
        # a lone row (a decode step's) takes its own path to the same keys
        alone = indexer.select_topk_rows(scores[r : r + 1], topk)
        assert set(alone[0].tolist()) == set(selected[r].tolist())
        kth = scores[r].topk(topk).values.min()
        chosen = scores[r, selected[r]]
        assert (chosen >= kth).all() and selected[r].unique().numel() == topk
        above = (scores[r] > kth).nonzero().squeeze(1)
        assert set(above.tolist()) <= set(selected[r].tolist())
    # ties at the boundary go to the latest keys
    tied = (scores[1] == scores[1].topk(topk).values.min()).nonzero().squeeze(1)
    picked = sorted(set(selected[1].tolist()) & set(tied.tolist()))
    assert picked == tied.tolist()[len(tied) - len(picked) :]


def test_topk_never_materializes_the_score_matrix(threads: Callable[[int], None]) -> None:
    """At T = S = 8192 no tensor outgrows one chunk's ReLU terms, a quarter of the [T, S]
    score matrix."""
    threads(1)  # dispatch modes are per thread: keep every op on this one
    q, k, w = (x.detach() for x in make_index_inputs(1, 8192, 8192, 4, 16, None))
    with LargestTensor() as largest:
        indexer_topk(q, k, w, 256, backend="torch")
    assert largest.numel <= indexer._CHUNK_ELEMENTS <= 8192 * 8192 // 4


# (B, T, S, HQ, H, D, K, per_head): GQA and MHA, decode-like (T < S, T = 1), shared and per-head
ATTENTION_CASES = [
    (2, 1, 1, 4, 2, 8, 3, False),
    (2, 37, 37, 4, 2, 8, 9, False),
    (2, 37, 50, 6, 3, 16, 12, True),
    (1, 1, 300, 8, 2, 8, 40, False),
    (2, 129, 129, 4, 4, 8, 17, True),
    (1, 600, 600, 4, 1, 16, 64, False),
]


def attention_results(
    backend: str,
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    idx: torch.Tensor,
    scale: float | None = None,
    with_probs: bool = True,
) -> list[torch.Tensor]:
    """Output, slot probabilities (when asked for) and the q, k, v gradients of one backend.

    Inference asks for no probabilities (a decode step then takes another forward: one flash
    call over the slots), so the tests check both ways."""
    if not with_probs:
        o = sparse_attention(*qkv, idx, scale=scale, backend=backend)
        return [o, *cotangent_grads(o, qkv)]
    o, probs = sparse_attention(*qkv, idx, scale=scale, return_probs=True, backend=backend)
    return [o, probs, *cotangent_grads(o, qkv)]


@pytest.mark.parametrize("with_probs", [True, False])
@pytest.mark.parametrize(("B", "T", "S", "HQ", "H", "D", "K", "per_head"), ATTENTION_CASES)
def test_sparse_attention_torch_matches_naive(
    B: int, T: int, S: int, HQ: int, H: int, D: int, K: int, per_head: bool, with_probs: bool
) -> None:
    """Outputs, slot probabilities and all input gradients equal the oracle's in fp32, with
    and without the probabilities asked for."""
    qkv = make_qkv(B, T, S, HQ, H, D)
    idx = random_indices((B, T, *((H,) if per_head else ()), K), S)
    expected = attention_results("naive", qkv, idx, 0.3, with_probs)
    assert_all_close(attention_results("torch", qkv, idx, 0.3, with_probs), expected)


@pytest.mark.parametrize("with_probs", [True, False])
def test_sparse_attention_chunk_borders_and_workers(
    monkeypatch: pytest.MonkeyPatch, threads: Callable[[int], None], with_probs: bool
) -> None:
    """Chunks of two queries (hundreds) on three workers, per-worker dk/dv summed: same
    results, deterministic across calls."""
    monkeypatch.setattr(attention, "_CHUNK_SLOTS", 20)
    threads(3)
    qkv = make_qkv(2, 301, 301, 4, 2, 8)
    idx = random_indices((2, 301, 2, 10), 301)
    actual = attention_results("torch", qkv, idx, None, with_probs)
    assert_all_close(actual, attention_results("naive", qkv, idx, None, with_probs))
    again = attention_results("torch", qkv, idx, None, with_probs)
    assert all(torch.equal(a, b) for a, b in zip(actual, again, strict=True))


@pytest.mark.parametrize("with_probs", [True, False])
def test_sparse_attention_chunks_with_every_slot_used(with_probs: bool) -> None:
    """Prefill's common case: every slot of a chunk holds a visible key (no mask at all), as
    top-k's selections do past the first k queries; equal to the oracle, gradients too."""
    T, K = 300, 24
    qkv = make_qkv(1, T, T, 8, 2, 16)
    t_T1, j_1K = torch.arange(T)[:, None], torch.arange(K)[None]
    idx = ((t_T1 - 5 * j_1K) % (t_T1 + 1))[None]  # positions 0 .. t, repeats allowed
    expected = attention_results("naive", qkv, idx, None, with_probs)
    assert_all_close(attention_results("torch", qkv, idx, None, with_probs), expected)


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize(("T", "per_head"), [(1, False), (1, True), (3, False)])
def test_decode_splits_the_slots_over_the_workers(
    monkeypatch: pytest.MonkeyPatch,
    threads: Callable[[int], None],
    workers: int,
    T: int,
    per_head: bool,
) -> None:
    """Decoding (one run of queries, no probabilities wanted) gives every worker a share of
    each query's slots and merges the parts' softmaxes: outputs and all input gradients equal
    the oracle's, also for a row whose later parts are all unused and a row with no used slot."""
    monkeypatch.setattr(attention, "_MIN_PART_SLOTS", 8)
    threads(workers)
    merged: list[int] = []
    merge = attention._merge_parts
    monkeypatch.setattr(
        attention, "_merge_parts", lambda o, *a: (merged.append(o.shape[0]), merge(o, *a))
    )
    S, H, K = 90, 2, 48
    qkv = make_qkv(1, T, S, 8, H, 16)
    idx = random_indices((1, T, *((H,) if per_head else ()), K), S, seed=7)
    idx[0, 0, ..., K // 3 :] = -1  # only the first part has keys
    idx[0, 2:] = -1  # no key at all
    results = []
    for backend in ("naive", "torch"):
        o = sparse_attention(*qkv, idx, backend=backend)
        results.append([o, *cotangent_grads(o, qkv)])
    assert_all_close(results[1], results[0])
    assert merged == [workers]
    if T == 3:
        assert torch.equal(results[1][0][0, 2], torch.zeros_like(results[1][0][0, 2]))


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_empty_and_future_slots_are_skipped(backend: str) -> None:
    """-1 and future slots add nothing; a row without a used slot outputs 0 with zero finite
    gradients; the slot probabilities of a row sum to 1 over its used slots."""
    q, k, v = make_qkv(1, 6, 6, 2, 1, 4)
    idx = torch.tensor([[-1, -1], [0, 5], [1, -1], [-1, 3], [4, 2], [5, 5]]).view(1, 6, 2)
    o, probs = sparse_attention(q, k, v, idx, return_probs=True, backend=backend)
    assert torch.equal(o[0, 0], torch.zeros_like(o[0, 0]))
    # row 1 (position 1) only uses key 0: its output is v[0]; its future slot has probability 0
    torch.testing.assert_close(o[0, 1], v[0, 0].expand(2, 4))
    assert probs[0, 1, 1] == 0 and probs[0, 1, 0] == 1
    torch.testing.assert_close(probs.sum(-1)[0, 1:], torch.ones(5))
    # a repeated key counts once per slot: two equal slots split the mass evenly
    torch.testing.assert_close(probs[0, 5], torch.tensor([0.5, 0.5]))
    grads = torch.autograd.grad(o.square().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][0, 0], torch.zeros_like(grads[0][0, 0]))


def test_selecting_every_visible_key_is_dense_causal() -> None:
    """Slots holding all keys (future ones included, skipped) give dense causal attention."""
    q, k, v = (x.detach() for x in make_qkv(2, 40, 40, 4, 2, 8))
    idx = torch.arange(40).expand(2, 40, 40)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(sparse_attention(q, k, v, idx, backend="torch"), dense)


def test_sparse_attention_bf16_close_to_fp32() -> None:
    """bf16 inputs give a bf16 output within bf16 rounding of the fp32 oracle."""
    qkv = make_qkv(2, 100, 100, 4, 2, 16)
    idx = random_indices((2, 100, 20), 100)
    expected = sparse_attention(*qkv, idx, backend="naive")
    bf16 = tuple(x.detach().bfloat16().requires_grad_() for x in qkv)
    actual = sparse_attention(*bf16, idx, backend="torch")
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected, rtol=0, atol=3e-2)
    grads = torch.autograd.grad(actual.float().square().sum(), bf16)
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(("T", "per_head"), [(1, False), (1, True), (9, False), (9, True)])
def test_sparse_attention_reads_packed_kv_in_place(T: int, per_head: bool) -> None:
    """K and V as the two halves of one [B, S, 2, H, D] storage (DSACache's layout) are read
    where they lie, with no copy of the cache (the rows the kernel gathers from are views of
    that storage), and give the oracle's outputs, probabilities and gradients (the storage's
    gradient holds dk and dv in its two halves)."""
    B, S, HQ, H, D, K = 2, 70, 8, 2, 16, 24
    q, k, v = make_qkv(B, T, S, HQ, H, D)
    kv = torch.stack([k.detach(), v.detach()], dim=2).requires_grad_()
    packed_k, packed_v = kv[:, :, 0], kv[:, :, 1]
    rows = attention._kv_rows(packed_k, packed_v)
    assert rows.packed and rows.m == 2 * H
    assert rows.k_BRD.data_ptr() == kv.data_ptr() == rows.v_BRD.data_ptr() - H * D * 4
    idx = random_indices((B, T, *((H,) if per_head else ()), K), S, seed=5)
    o, probs = sparse_attention(q, packed_k, packed_v, idx, return_probs=True, backend="torch")
    dq, dkv = cotangent_grads(o, (q, kv))
    expected = attention_results("naive", (q, k, v), idx)
    assert_all_close([o, probs, dq, dkv[:, :, 0], dkv[:, :, 1]], expected)


def test_sparse_attention_never_materializes_all_slots(threads: Callable[[int], None]) -> None:
    """Forward and backward at T = 2048, K = 256 stay within the size of q or of the indices:
    no [T, K, D] gather and no [T, HQ, K] score tensor for all queries at once."""
    threads(1)
    B, T, HQ, H, D, K = 1, 2048, 8, 1, 16, 256
    qkv = make_qkv(B, T, T, HQ, H, D)
    idx = random_indices((B, T, K), T)
    with LargestTensor() as largest:
        attention_results("torch", qkv, idx)
    allowed = max(2 * B * T * HQ * D, B * T * K)
    assert largest.numel <= allowed < min(T * K * D, T * HQ * K) // 4


def test_ops_run_under_inference_mode(threads: Callable[[int], None]) -> None:
    """Worker threads inherit the caller's inference mode (it is per thread), so the ops
    work under torch.inference_mode, as in evaluation."""
    threads(2)
    q, k, w = (x.detach() for x in make_index_inputs(1, 300, 300, 2, 8, None))
    qq, kk, vv = (x.detach() for x in make_qkv(1, 300, 300, 4, 1, 8))
    expected = sparse_attention(qq, kk, vv, indexer_topk(q, k, w, 16))
    with torch.inference_mode():
        idx = indexer_topk(q, k, w, 16, backend="torch")
        scores = indexer_scores(q, k, w, indices=idx, backend="torch")
        actual = sparse_attention(qq, kk, vv, idx, backend="torch")
    assert torch.isfinite(scores).any() and torch.equal(actual, expected)


def test_bad_inputs_raise_value_errors_naming_the_argument() -> None:
    """Each op names the argument it rejects: shapes, dtypes, indices, topk, backend."""
    q, k, w = (x.detach() for x in make_index_inputs(1, 6, 8, 2, 4, None))
    with pytest.raises(ValueError, match="q_idx must be 4-d"):
        indexer_scores(q[0], k, w)
    with pytest.raises(ValueError, match="k_idx must be"):
        indexer_scores(q, k[..., :3], w)
    with pytest.raises(ValueError, match="1 <= T <= S"):
        indexer_scores(q, k[:, :5], w)
    with pytest.raises(ValueError, match="w_idx must be"):
        indexer_scores(q, k, w[..., :1])
    with pytest.raises(ValueError, match="share one floating dtype"):
        indexer_scores(q, k.double(), w)
    with pytest.raises(ValueError, match="indices must be int64"):
        indexer_scores(q, k, w, indices=torch.zeros(1, 6, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"indices must be \[B, T, K\]"):
        indexer_scores(q, k, w, indices=torch.zeros(1, 6, 2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"key positions in \[0, 8\)"):
        indexer_scores(q, k, w, indices=torch.full((1, 6, 3), 8))
    for topk in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="topk must be an int >= 1"):
            indexer_topk(q, k, w, topk)
    with pytest.raises(ValueError, match="backend='flash' is not one of"):
        indexer_topk(q, k, w, 3, backend="flash")

    qq, kk, vv = (x.detach() for x in make_qkv(1, 6, 8, 4, 2, 8))
    idx = torch.zeros(1, 6, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="must be 4-d"):
        sparse_attention(qq[0], kk, vv, idx)
    with pytest.raises(ValueError, match="k and v shapes differ"):
        sparse_attention(qq, kk, vv[:, :7], idx)
    with pytest.raises(ValueError, match="1 <= T <= S and HQ a multiple of H"):
        sparse_attention(qq[:, :, :3], kk, vv, idx)
    with pytest.raises(ValueError, match="dtypes"):
        sparse_attention(qq.double(), kk, vv, idx)
    with pytest.raises(ValueError, match="indices must be int64"):
        sparse_attention(qq, kk, vv, idx.int())
    with pytest.raises(ValueError, match=r"\[B, T, H, K\] = \[1, 6, 2, K\]"):
        sparse_attention(qq, kk, vv, torch.zeros(1, 6, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"key positions in \[0, 8\), got min -2"):
        sparse_attention(qq, kk, vv, idx - 2)
    with pytest.raises(ValueError, match="backend='flash' is not one of"):
        sparse_attention(qq, kk, vv, idx, backend="flash")
