"""Tests of sparsezoo.kernels.dsa.kl: the sparse stage's indexer KL, naive vs fused torch path.

Legend as in test_kernels_dsa.py.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_dsa import (
    SCORE_CASES,
    assert_all_close,
    make_index_inputs,
    random_indices,
)

from sparsezoo.kernels.dsa import indexer, indexer_kl, indexer_scores, kl_rows


def random_target(shape: tuple[int, ...], seed: int = 5) -> torch.Tensor:
    """Non-negative slot weights with exact zeros, and every 5th query row all zero (a row
    whose target has no mass: its KL and gradients must be 0)."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=gen)
    target[torch.rand(shape, generator=gen) < 0.3] = 0.0
    target[:, 4::5] = 0.0
    return target


def kl_results(
    backend: str, inputs: tuple[torch.Tensor, ...], idx: torch.Tensor, target: torch.Tensor
) -> list[torch.Tensor]:
    """[loss, d q_idx, d k_idx, d w] of one backend."""
    loss = indexer_kl(*inputs, idx, target, backend=backend)
    return [loss, *torch.autograd.grad(loss, inputs)]


@pytest.mark.parametrize(("B", "T", "S", "N", "E", "U"), SCORE_CASES)
def test_indexer_kl_torch_matches_naive(
    B: int, T: int, S: int, N: int, E: int, U: int | None
) -> None:
    """The fused KL and its q_idx, k_idx, w gradients equal the oracle's (shared and per-group
    sets, decode-like T < S, -1, future and all-unused rows, zero-mass target rows)."""
    inputs = make_index_inputs(B, T, S, N, E, U)
    idx = random_indices((B, T, *(() if U is None else (U,)), 9), S)
    target = random_target(idx.shape)
    results = {b: kl_results(b, inputs, idx, target) for b in ("naive", "torch")}
    assert_all_close(results["torch"], results["naive"])
    assert all(torch.isfinite(g).all() for g in results["torch"])


def test_indexer_kl_chunk_borders_and_long_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hundreds of tiny chunks (one to three queries) over 301 queries of 40 slots give the
    oracle's loss and gradients."""
    monkeypatch.setattr(indexer, "_CHUNK_SLOTS", 100)
    inputs = make_index_inputs(2, 301, 301, 3, 8, 2)
    idx = random_indices((2, 301, 2, 40), 301)
    target = random_target(idx.shape)
    results = {b: kl_results(b, inputs, idx, target) for b in ("naive", "torch")}
    assert_all_close(results["torch"], results["naive"])


def test_kl_rows_by_hand() -> None:
    """One row by hand: the target renormalised over the used (finite) slots, KL against the
    softmax of those scores; a row with no used slot and a zero-mass row give 0."""
    scores = torch.tensor([[1.0, float("-inf"), 0.0, 2.0], [float("-inf")] * 4, [1.0, 2, 3, 4]])
    target = torch.tensor([[0.2, 0.5, 0.2, 0.4], [0.3, 0.3, 0.2, 0.2], [0.0] * 4])
    p = torch.tensor([0.2, 0.2, 0.4]) / 0.8
    q = torch.softmax(torch.tensor([1.0, 0.0, 2.0]), dim=0)
    expected = torch.stack([(p * (p / q).log()).sum(), torch.tensor(0.0), torch.tensor(0.0)])
    torch.testing.assert_close(kl_rows(target, scores), expected)


def test_indexer_kl_matches_scores_then_kl() -> None:
    """The op is the KL of ``indexer_scores`` at the slots: the same number either way."""
    inputs = tuple(x.detach() for x in make_index_inputs(1, 30, 30, 2, 8, None))
    idx = random_indices((1, 30, 6), 30)
    target = random_target(idx.shape)
    scores = indexer_scores(*inputs, indices=idx, scale=0.4, backend="naive")
    expected = kl_rows(target, scores).sum()
    torch.testing.assert_close(indexer_kl(*inputs, idx, target, 0.4, backend="torch"), expected)


def test_indexer_kl_target_gets_no_gradient() -> None:
    """A target that requires grad is treated as a constant (the recipe's detached target)."""
    inputs = make_index_inputs(1, 12, 12, 2, 4, None)
    idx = random_indices((1, 12, 5), 12)
    target = random_target(idx.shape).requires_grad_()
    for backend in ("naive", "torch"):
        loss = indexer_kl(*inputs, idx, target, backend=backend)
        assert torch.autograd.grad(loss, target, allow_unused=True)[0] is None


def test_indexer_kl_gradient_scales_with_the_incoming_one() -> None:
    """The torch path computes its gradient in the forward: a loss weighted by 2.5 (and one
    with a zero weight) gives 2.5x (and 0x) the oracle's gradients."""
    inputs = make_index_inputs(1, 40, 40, 2, 8, 2)
    idx = random_indices((1, 40, 2, 7), 40)
    target = random_target(idx.shape)
    for weight in (2.5, 0.0):
        grads = {
            b: torch.autograd.grad(weight * indexer_kl(*inputs, idx, target, backend=b), inputs)
            for b in ("naive", "torch")
        }
        assert_all_close(list(grads["torch"]), list(grads["naive"]))


def test_indexer_kl_keeps_no_target_for_backward() -> None:
    """What the torch path saves for backward is its q-, k- and w-sized gradients: not the
    target (256 MB at 32k tokens), not the indices; with no input needing a gradient, nothing."""
    inputs = make_index_inputs(1, 50, 50, 2, 8, None)
    idx = random_indices((1, 50, 11), 50)
    target = random_target(idx.shape)
    for needs_grad in (True, False):
        sizes: list[int] = []

        def pack(t: torch.Tensor, sizes: list[int] = sizes) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            args = inputs if needs_grad else tuple(x.detach() for x in inputs)
            indexer_kl(*args, idx, target, backend="torch")
        # the set axis of shared weights is kept: compare sizes
        assert sorted(sizes) == (sorted(x.numel() for x in inputs) if needs_grad else [])


def test_indexer_kl_bad_inputs_name_the_argument() -> None:
    """Shape, dtype and backend errors name what is wrong."""
    q, k, w = (x.detach() for x in make_index_inputs(1, 6, 8, 2, 4, None))
    idx = torch.zeros(1, 6, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"target must be a floating tensor shaped like indices"):
        indexer_kl(q, k, w, idx, torch.rand(1, 6, 4))
    with pytest.raises(ValueError, match=r"target must be a floating tensor"):
        indexer_kl(q, k, w, idx, torch.ones(1, 6, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"indices must be \[B, T, K\]"):
        indexer_kl(q, k, w, idx[..., None], torch.rand(1, 6, 3, 1))
    with pytest.raises(ValueError, match=r"indexer_kl: indices must be -1"):
        indexer_kl(q, k, w, idx + 9, torch.rand(1, 6, 3))
    with pytest.raises(ValueError, match="backend='flash' is not one of"):
        indexer_kl(q, k, w, idx, torch.rand(1, 6, 3), backend="flash")
