"""Tests of the MoBA torch backend's short-sequence path: one SDPA call under MoBA's mask.

Sequences of at most ``torch_impl._MASKED_MAX_T`` tokens (and a bounded mask) skip the routed
flash calls; the path must equal the naive oracle on the output and every input gradient, and
the dispatch must send each input where the rule says. ``test_kernels_moba.py`` forces the
routed path on its short inputs.

Legend: B batch, T time, HQ query heads, H KV heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from test_kernels_moba import assert_all_close, make_qkv, output_and_grads

from sparsezoo.kernels.moba import moba_attention, torch_impl

# the rule's own value, read before the fixture below lowers it
MIN_CALLS = torch_impl._MASKED_MIN_CALLS


@pytest.fixture(autouse=True)
def masked_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short inputs here take the masked path however few routed calls they would make."""
    monkeypatch.setattr(torch_impl, "_MASKED_MIN_CALLS", 1)


@pytest.mark.parametrize(
    ("B", "T", "HQ", "H", "D", "block_size", "top_k", "scale"),
    [
        (2, 1, 4, 2, 8, 4, 3, None),
        (2, 7, 4, 1, 8, 4, 3, None),
        (2, 129, 4, 2, 8, 8, 3, None),
        (1, 129, 4, 4, 16, 16, 20, None),
        (2, 333, 4, 1, 8, 16, 2, 0.3),
        (1, 300, 4, 2, 8, 32, 1, None),
        (1, 512, 4, 2, 8, 4, 3, None),
    ],
)
def test_masked_path_matches_naive(
    B: int, T: int, HQ: int, H: int, D: int, block_size: int, top_k: int, scale: float | None
) -> None:
    """Odd lengths with a partial tail block, top_k 1 and past the block count, GQA 4:1 and
    4:2, MHA, a custom scale, 128 blocks at the largest masked length: output, dq, dk, dv."""
    qkv = make_qkv(B, T, HQ, H, D)
    actual = output_and_grads("torch", qkv, block_size, top_k, scale)
    assert_all_close(actual, output_and_grads("naive", qkv, block_size, top_k, scale))


def test_masked_and_routed_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same short input through both torch paths gives the same output and gradients."""
    qkv = make_qkv(2, 200, 4, 2, 16)
    masked = output_and_grads("torch", qkv, 16, 4)
    monkeypatch.setattr(torch_impl, "_MASKED_MAX_T", 0)
    assert_all_close(masked, output_and_grads("torch", qkv, 16, 4))


def _path_taken(monkeypatch: pytest.MonkeyPatch, B: int, T: int, HQ: int) -> str:
    """Which torch path ``moba_attention`` runs for a [B, T, HQ, 8] input on 1 KV head with
    blocks of 64 (ceil(T / 64) routed calls per batch row)."""
    taken: list[str] = []
    masked, routed = torch_impl._masked_attention, torch_impl._MobaAttention.apply

    def spy(name: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return lambda *args: (taken.append(name), fn(*args))[1]

    monkeypatch.setattr(torch_impl, "_masked_attention", spy("masked", masked))
    monkeypatch.setattr(torch_impl._MobaAttention, "apply", spy("routed", routed))
    q_BTHD, k_BTHD, v_BTHD = (x.detach() for x in make_qkv(B, T, HQ, 1, 8))
    moba_attention(q_BTHD, k_BTHD, v_BTHD, 64, 3, backend="torch")
    assert len(taken) == 1
    return taken[0]


def test_dispatch_by_length_calls_and_mask_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Masked up to _MASKED_MAX_T tokens, from _MASKED_MIN_CALLS routed calls (batch rows x
    KV heads x blocks) and up to _MASKED_MAX_ENTRIES mask entries; routed past any of them."""
    monkeypatch.setattr(torch_impl, "_MASKED_MIN_CALLS", MIN_CALLS)
    T = torch_impl._MASKED_MAX_T
    rows = -(-MIN_CALLS // -(-T // 64))  # fewest batch rows that make enough calls at T
    assert _path_taken(monkeypatch, rows, T, 2) == "masked"
    assert _path_taken(monkeypatch, rows, T + 1, 2) == "routed"
    assert _path_taken(monkeypatch, rows - 1, T, 2) == "routed"
    monkeypatch.setattr(torch_impl, "_MASKED_MIN_CALLS", 1)
    monkeypatch.setattr(torch_impl, "_MASKED_MAX_ENTRIES", 2 * 2 * 100 * 100)
    assert _path_taken(monkeypatch, 2, 100, 2) == "masked"
    assert _path_taken(monkeypatch, 2, 101, 2) == "routed"


def test_masked_path_bf16_and_non_contiguous_inputs() -> None:
    """bf16 inputs stay close to the fp32 oracle; strided views give the contiguous result."""
    qkv = [x.detach() for x in make_qkv(1, 150, 4, 2, 16)]
    expected_BTHD = moba_attention(*qkv, 16, 3, backend="naive")
    bf16 = [x.bfloat16() for x in qkv]
    actual_BTHD = moba_attention(*bf16, 16, 3, backend="torch")
    assert actual_BTHD.dtype == torch.bfloat16
    torch.testing.assert_close(actual_BTHD.float(), expected_BTHD, rtol=0.05, atol=0.03)
    views = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in qkv]
    assert not views[0].is_contiguous()
    torch.testing.assert_close(
        moba_attention(*views, 16, 3, backend="torch"), expected_BTHD, rtol=1e-5, atol=2e-5
    )
