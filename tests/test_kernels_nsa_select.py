"""Tests of sparsezoo.kernels.nsa.select: the Eq. 9 overlap map and top-n block selection.

Legend: B batch, T time, N compressed tokens, S selection blocks, HQ query heads, H KV heads,
G group size HQ // H, D head dim, n selected blocks.
"""

from __future__ import annotations

import pytest
import torch
from kernel_utils import LargestTensor

from sparsezoo.kernels.nsa import select
from sparsezoo.kernels.nsa.compression import compressed_attention
from sparsezoo.kernels.nsa.select import overlap_weights, select_blocks, topn_blocks

BACKENDS = ["naive", "torch"]


def test_overlap_weights_paper_example() -> None:
    """l=32, d=16, l'=64: block j weighs tokens 4j-1 .. 4j+3 by [1, 2, 2, 2, 1] (0-based).

    Block 0 has no token -1, so it starts at token 0 with [2, 2, 2, 1].
    """
    w_NS = overlap_weights(32, 16, 64, 12, 3)
    expected_NS = torch.zeros(12, 3)
    expected_NS[0:4, 0] = torch.tensor([2.0, 2, 2, 1])
    expected_NS[3:8, 1] = torch.tensor([1.0, 2, 2, 2, 1])
    expected_NS[7:12, 2] = torch.tensor([1.0, 2, 2, 2, 1])
    assert w_NS.dtype == torch.float32
    torch.testing.assert_close(w_NS, expected_NS, rtol=0, atol=0)


def test_overlap_weights_other_geometries() -> None:
    """Hand-computed columns for l=16, d=8, l'=32 and l=32, d=8, l'=32; identity when equal."""
    w_NS = overlap_weights(16, 8, 32, 14, 3)
    torch.testing.assert_close(w_NS[3:8, 1], torch.tensor([1.0, 2, 2, 2, 1]))
    assert w_NS[:, 1].sum() == 8 and w_NS[:3, 1].eq(0).all() and w_NS[8:, 1].eq(0).all()
    w_NS = overlap_weights(32, 8, 32, 20, 3)
    torch.testing.assert_close(w_NS[5:12, 2], torch.tensor([1.0, 2, 3, 4, 3, 2, 1]))
    # a token inside the sequence is split across blocks but always counts l / d in total
    torch.testing.assert_close(w_NS[:9].sum(dim=1), torch.full((9,), 4.0))
    torch.testing.assert_close(overlap_weights(16, 16, 16, 7, 7), torch.eye(7), rtol=0, atol=0)


def one_hot_case(
    scores_GN: torch.Tensor, T: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, kcmp, lse where every query of head g scores compressed token i exactly scores_GN[g, i].

    kcmp holds one-hot tokens (D = N) and q the desired scores (used with scale 1); lse comes
    from compressed_attention, as in the model.
    """
    G, N = scores_GN.shape
    q_BTHD = scores_GN[None, None].expand(1, T, G, N).contiguous()
    kcmp_BNHD = torch.eye(N)[None, :, None, :]
    _, lse_BTH = compressed_attention(q_BTHD, kcmp_BNHD, kcmp_BNHD, 4, 4, scale=1.0)
    return q_BTHD, kcmp_BNHD, lse_BTH


def select_identity(
    q_BTHD: torch.Tensor, kcmp_BNHD: torch.Tensor, lse_BTH: torch.Tensor, n: int, backend: str
) -> torch.Tensor:
    """select_blocks with l = d = l' = 4, where compressed token i is selection block i."""
    return select_blocks(
        q_BTHD,
        kcmp_BNHD,
        lse_BTH,
        block_size=4,
        stride=4,
        select_size=4,
        n_select=n,
        scale=1.0,
        backend=backend,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_sums_probabilities_not_logits(backend: str) -> None:
    """Head 0 puts all its mass on block 1, head 1 prefers block 2 mildly: block 1 wins.

    Query t = 23 sees tokens 0..5; blocks 0, 4, 5 are forced, so n = 4 leaves one free slot.
    Summed logits would rank block 2 (0 + 1) above block 1 (10 - 10); summed probabilities
    give block 1 about 1.0 and block 2 about 0.4.
    """
    scores_GN = torch.zeros(2, 6)
    scores_GN[0, 1] = 10.0
    scores_GN[1, 1], scores_GN[1, 2] = -10.0, 1.0
    idx_BTHS = select_identity(*one_hot_case(scores_GN, 24), 4, backend)
    assert idx_BTHS[0, 23, 0].tolist() == [0, 1, 4, 5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_block(backend: str) -> None:
    """Equal importances (uniform probabilities) pick the lowest free blocks, deterministically."""
    q_BTHD, kcmp_BNHD, lse_BTH = one_hot_case(torch.zeros(2, 10), 40)
    idx_BTHS = select_identity(q_BTHD, kcmp_BNHD, lse_BTH, 5, backend)
    assert idx_BTHS[0, 39, 0].tolist() == [0, 1, 2, 8, 9]
    # query 35 sees tokens 0..8 and may use blocks 0..8: forced 0, 7, 8, then 1, 2 by index
    assert idx_BTHS[0, 35, 0].tolist() == [0, 1, 2, 7, 8]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_tokens_never_leak_even_when_huge(backend: str) -> None:
    """A not-yet-visible token whose probability would overflow changes nothing and gives no NaN.

    Query t = 20..22 sees tokens 0..4; token 5 (block 5, t's own) is hidden. Its score exp(200)
    overflows fp32; the free slot still goes to block 2, which head 1 prefers among 1..3.
    """
    scores_GN = torch.zeros(2, 6)
    scores_GN[0, 5] = 200.0
    scores_GN[1, 2] = 1.0
    idx_BTHS = select_identity(*one_hot_case(scores_GN, 24), 4, backend)
    for t in (20, 21, 22):
        assert idx_BTHS[0, t, 0].tolist() == [0, 2, 4, 5]


def make_inputs(
    B: int, T: int, HQ: int, H: int, D: int, L: int, d: int, gain: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded q_BTHD (std ``gain``), kcmp_BNHD and their lse_BTH from compressed_attention."""
    gen = torch.Generator().manual_seed(0)
    N = (T - L) // d + 1 if T >= L else 0
    q_BTHD = torch.randn(B, T, HQ, D, generator=gen) * gain
    kcmp_BNHD = torch.randn(B, N, H, D, generator=gen)
    _, lse_BTH = compressed_attention(q_BTHD, kcmp_BNHD, kcmp_BNHD, L, d)
    return q_BTHD, kcmp_BNHD, lse_BTH


def importance_fp64(
    q_BTHD: torch.Tensor, kcmp_BNHD: torch.Tensor, lse_BTH: torch.Tensor, L: int, d: int, ls: int
) -> torch.Tensor:
    """Block importance [B, T, H, S] in fp64, written with explicit loops over the query heads."""
    B, T, HQ, D = q_BTHD.shape
    N, H = kcmp_BNHD.shape[1:3]
    G = HQ // H
    t_T1 = torch.arange(T)[:, None]
    visible_TN = torch.arange(N)[None, :] * d + L - 1 <= t_T1
    w_NS = overlap_weights(L, d, ls, N, -(-T // ls)).double()
    mass_BTHN = torch.zeros(B, T, H, N, dtype=torch.float64)
    for hq in range(HQ):
        scores_BTN = torch.einsum(
            "btd,bnd->btn", q_BTHD[:, :, hq].double(), kcmp_BNHD[:, :, hq // G].double()
        )
        probs_BTN = torch.exp(scores_BTN * D**-0.5 - lse_BTH[:, :, hq, None].double())
        mass_BTHN[:, :, hq // G] += torch.where(visible_TN, probs_BTN, 0.0)
    return mass_BTHN @ w_NS


# (B, T, HQ, H, D, l, d, l', n): GQA and MHA, odd T, l == d == l', l < l' with several token
# widths, n larger than the legal count of most queries, and T = 2100 with l' = 16 (132 blocks,
# past 128, where tile-local offsets break)
SELECT_CASES = [
    (2, 301, 4, 2, 8, 32, 16, 64, 5),
    (1, 37, 4, 1, 8, 8, 4, 8, 3),
    (1, 333, 2, 2, 8, 16, 8, 32, 4),
    (2, 203, 4, 1, 8, 16, 16, 16, 6),
    (1, 300, 4, 2, 8, 32, 8, 32, 4),
    (1, 129, 2, 1, 8, 8, 4, 16, 20),
    (2, 2100, 4, 2, 8, 8, 4, 16, 6),
]


def assert_same_picks(
    actual_BTHS: torch.Tensor,
    expected_BTHS: torch.Tensor,
    importance_BTHS: torch.Tensor,
    atol: float,
    max_rows_differ: float,
) -> None:
    """Equal block ids, except at fp32 near-ties of the fp64 importance ``importance_BTHS``.

    Rows that differ must be at most a fraction ``max_rows_differ`` of all rows, and the sorted
    fp64 importances of the two picks must agree (rtol 1e-5, ``atol``).
    """
    assert actual_BTHS.dtype == torch.int64 and actual_BTHS.shape == expected_BTHS.shape
    differ_BTH = (actual_BTHS != expected_BTHS).any(dim=-1)
    assert differ_BTH.float().mean() <= max_rows_differ
    importance_XS = importance_BTHS[differ_BTH]
    picks = [
        importance_XS.gather(-1, idx_BTHS[differ_BTH].clamp(min=0)).sort(-1).values
        for idx_BTHS in (actual_BTHS, expected_BTHS)
    ]
    torch.testing.assert_close(*picks, rtol=1e-5, atol=atol)


def assert_same_selection(
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    knobs: dict[str, int],
    atol: float,
    max_rows_differ: float,
) -> None:
    """select_blocks' torch and naive backends agree in the sense of ``assert_same_picks``."""
    expected_BTHS = select_blocks(*inputs, **knobs, backend="naive")
    actual_BTHS = select_blocks(*inputs, **knobs, backend="torch")
    L, d, ls = knobs["block_size"], knobs["stride"], knobs["select_size"]
    importance_BTHS = importance_fp64(*inputs, L, d, ls)
    assert_same_picks(actual_BTHS, expected_BTHS, importance_BTHS, atol, max_rows_differ)


@pytest.mark.parametrize(("B", "T", "HQ", "H", "D", "L", "d", "ls", "n"), SELECT_CASES)
def test_torch_matches_naive(
    monkeypatch: pytest.MonkeyPatch,
    B: int,
    T: int,
    HQ: int,
    H: int,
    D: int,
    L: int,
    d: int,
    ls: int,
    n: int,
) -> None:
    """Chunked torch selection picks the oracle's blocks from the same lse.

    A tiny tile makes the torch path cut T into dozens of odd-sized query chunks.
    """
    monkeypatch.setattr(select, "_TILE_ELEMENTS", 37 * B * HQ * max(1, (T - L) // d + 1))
    knobs = {"block_size": L, "stride": d, "select_size": ls, "n_select": n}
    assert_same_selection(make_inputs(B, T, HQ, H, D, L, d), knobs, 1e-6, 0.002)


def test_torch_matches_naive_on_peaked_attention() -> None:
    """Logits with std ~30 push most probabilities below fp32's normal range (the exp floor).

    With n = 16 of 47 blocks the picks reach far into blocks of tiny importance, so the floor
    must not reorder anything above ~1e-33; rows may differ only by ties at that level.
    """
    knobs = {"block_size": 16, "stride": 8, "select_size": 32, "n_select": 16}
    assert_same_selection(make_inputs(1, 1500, 4, 1, 16, 16, 8, gain=30.0), knobs, 1e-33, 1.0)


def test_topn_blocks_agrees_with_select_blocks() -> None:
    """topn_blocks on the same importances reproduces select_blocks (decode uses it)."""
    inputs = make_inputs(1, 700, 4, 2, 8, 16, 8)
    importance_BTHS = importance_fp64(*inputs, 16, 8, 32)
    knobs = {"block_size": 16, "stride": 8, "select_size": 32, "n_select": 5}
    expected_BTHS = select_blocks(*inputs, **knobs, backend="naive")
    # a decode step sees a slice of the queries at their absolute positions
    t_T = torch.arange(450, 700)
    actual_BTHS = topn_blocks(importance_BTHS[:, 450:].float(), t_T, 32, 5)
    assert_same_picks(actual_BTHS, expected_BTHS[:, 450:], importance_BTHS[:, 450:], 1e-6, 0.002)


def test_topn_blocks_hand_example() -> None:
    """Forced blocks win, future blocks never do, early rows pad with -1; input left unchanged."""
    importance_BTHS = torch.tensor([0.0, 0.1, 0.5, 0.3, 100.0, 100.0]).repeat(1, 3, 1, 1)
    before_BTHS = importance_BTHS.clone()
    idx_BTHS = topn_blocks(importance_BTHS, torch.tensor([23, 13, 2]), 4, 4)
    assert idx_BTHS[0, :, 0].tolist() == [[0, 2, 4, 5], [0, 1, 2, 3], [0, -1, -1, -1]]
    assert torch.equal(importance_BTHS, before_BTHS)
    with pytest.raises(ValueError, match="n_select must be an int >= 3"):
        topn_blocks(importance_BTHS, torch.tensor([23, 13, 2]), 4, 2)
    with pytest.raises(ValueError, match="t_T"):
        topn_blocks(importance_BTHS, torch.tensor([23, 13]), 4, 4)
    with pytest.raises(ValueError, match="S=6 blocks, too few for position 24"):
        topn_blocks(importance_BTHS, torch.tensor([24, 13, 2]), 4, 4)


def test_top_blocks_orders_like_a_stable_sort() -> None:
    """The integer-key top-n equals a stable descending sort: ties (many), negatives, +-inf,
    -0.0 against 0.0, padding for -inf picks, and n larger than the row."""
    gen = torch.Generator().manual_seed(0)
    values = torch.tensor([0.0, -0.0, 1.5, -2.0, 1e-38, 3.0, float("inf"), float("-inf")])
    scores_XS = values[torch.randint(0, len(values), (400, 37), generator=gen)]
    for n in (3, 16, 37, 40):
        order_XS = torch.sort(scores_XS, dim=-1, descending=True, stable=True).indices[:, :n]
        illegal_Xn = scores_XS.gather(-1, order_XS) == float("-inf")
        expected_Xn = order_XS.masked_fill(illegal_Xn, 99).sort(dim=-1).values
        expected_Xn = torch.nn.functional.pad(
            expected_Xn.masked_fill(expected_Xn == 99, -1), (0, n - expected_Xn.shape[-1]), value=-1
        )
        assert torch.equal(select._top_blocks(scores_XS, n), expected_Xn), n


def check_selection_rules(idx_BTHS: torch.Tensor, ls: int, n: int) -> None:
    """Per row: ascending ids then -1 padding, min(n, legal) of them, forced ones present once."""
    B, T, H, _ = idx_BTHS.shape
    for t in range(T):
        own = t // ls
        forced = {0, own, own - 1} - {-1}
        for row in idx_BTHS[:, t].reshape(B * H, n).tolist():
            ids = [j for j in row if j >= 0]
            assert row == ids + [-1] * (n - len(ids)), (t, row)
            assert ids == sorted(set(ids)), (t, row)
            assert len(ids) == min(n, own + 1), (t, row)
            assert forced <= set(ids), (t, row)
            assert max(ids) <= own, (t, row)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("T", "L", "d", "ls", "n"), [(2100, 8, 4, 16, 6), (200, 32, 16, 64, 3)])
def test_forced_legal_and_padding(
    monkeypatch: pytest.MonkeyPatch, backend: str, T: int, L: int, d: int, ls: int, n: int
) -> None:
    """Forced blocks counted inside n, no future block, -1 padding early, at long T too."""
    monkeypatch.setattr(select, "_TILE_ELEMENTS", 4 * 100 * ((T - L) // d + 1))
    inputs = make_inputs(1, T, 4, 2, 8, L, d)
    knobs = {"block_size": L, "stride": d, "select_size": ls, "n_select": n}
    check_selection_rules(select_blocks(*inputs, **knobs, backend=backend), ls, n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_graph_and_lse_minus_inf_gives_no_mass(backend: str) -> None:
    """Indices carry no graph; a query whose lse is -inf only gets its forced blocks."""
    q_BTHD, kcmp_BNHD, lse_BTH = make_inputs(1, 200, 2, 1, 8, 8, 4)
    q_BTHD.requires_grad_()
    lse_BTH[:, 150] = float("-inf")
    knobs = {"block_size": 8, "stride": 4, "select_size": 8, "n_select": 5}
    idx_BTHS = select_blocks(q_BTHD, kcmp_BNHD, lse_BTH, **knobs, backend=backend)
    assert not idx_BTHS.requires_grad and idx_BTHS.grad_fn is None
    # all free blocks tie at 0, so the tie rule picks 1 and 2 next to the forced 0, 17, 18
    assert idx_BTHS[0, 150, 0].tolist() == [0, 1, 2, 17, 18]


def test_torch_path_holds_one_chunk_of_probabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch path never builds [B, T, HQ, N]: its tiles stay near the configured budget."""
    q_BTHD, kcmp_BNHD, lse_BTH = make_inputs(1, 2100, 4, 1, 8, 8, 4)
    N = kcmp_BNHD.shape[1]
    monkeypatch.setattr(select, "_TILE_ELEMENTS", 4 * N * 128)
    knobs = {"block_size": 8, "stride": 4, "select_size": 16, "n_select": 4}
    with LargestTensor() as largest:
        select_blocks(q_BTHD, kcmp_BNHD, lse_BTH, **knobs, backend="torch")
    assert largest.numel < 2100 * 4 * N // 8


def test_bad_inputs_raise_value_errors_naming_the_argument() -> None:
    """Bad knobs and shapes raise ValueError naming the knob or argument."""
    q_BTHD, kcmp_BNHD, lse_BTH = make_inputs(1, 100, 4, 2, 8, 8, 4)
    good = {"block_size": 8, "stride": 4, "select_size": 16, "n_select": 4}
    bad_knobs = [
        ({"n_select": 2}, "n_select must be an int >= 3"),
        ({"block_size": 6}, "block_size=6 must be a multiple of stride=4"),
        ({"select_size": 18}, "select_size=18 must be a multiple of stride"),
        ({"select_size": 4}, "select_size=4 .* >= block_size=8"),
        ({"stride": 0}, "stride must be an int >= 1"),
    ]
    for change, match in bad_knobs:
        with pytest.raises(ValueError, match=match):
            select_blocks(q_BTHD, kcmp_BNHD, lse_BTH, **{**good, **change})
    with pytest.raises(ValueError, match="lse_BTH must have shape"):
        select_blocks(q_BTHD, kcmp_BNHD, lse_BTH[:, :, :2], **good)
    with pytest.raises(ValueError, match="kcmp_BNHD has N=20"):
        select_blocks(q_BTHD, kcmp_BNHD[:, :20], lse_BTH, **good)
    with pytest.raises(ValueError, match="backend='fast' is not one of"):
        select_blocks(q_BTHD, kcmp_BNHD, lse_BTH, **good, backend="fast")
    for args, match in (((32, 16, 64, -1, 3), "n_cmp"), ((32, 0, 64, 4, 3), "stride")):
        with pytest.raises(ValueError, match=match):
            overlap_weights(*args)
