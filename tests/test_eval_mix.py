"""Training on a passkey-retrieval mix: which rows are synthetic, their labels, the row-mean loss,
and that a zero mix leaves the text data exactly as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sparsezoo.config import load_config
from sparsezoo.data import IGNORE_INDEX, PasskeyMix, TokenWindows
from sparsezoo.data.dataset import TOKEN_DTYPE
from sparsezoo.data.synthetic import NEEDLE_MARKER, QUERY_MARKER
from sparsezoo.train import (
    LMDataModule,
    LMModule,
    _OffsetWindows,
    row_mean_loss,
    token_losses,
)


@pytest.fixture
def windows(tmp_path: Path) -> TokenWindows:
    path = tmp_path / "train.bin"
    np.random.default_rng(0).integers(20, 300, 20_000).astype(TOKEN_DTYPE).tofile(path)
    return TokenWindows(path, seq_len=96, n_samples=40, seed=3)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_every_prefix_holds_the_fraction_of_passkey_rows(
    windows: TokenWindows, fraction: float
) -> None:
    mix = PasskeyMix(windows, fraction, vocab_size=300, passkey_len=5, seed=0)
    flags = [mix.is_passkey(i) for i in range(len(mix))]
    for n in (1, 8, 13, 40):
        assert sum(flags[:n]) == int(n * fraction)


def test_text_rows_are_the_windows_and_passkey_rows_label_only_the_answer(
    windows: TokenWindows,
) -> None:
    mix = PasskeyMix(windows, 0.5, vocab_size=300, passkey_len=4, seed=0)
    depths = set()
    for i in range(len(mix)):
        row = mix[i]
        assert row["input_ids"].shape == row["labels"].shape == (96,)
        if not mix.is_passkey(i):
            assert torch.equal(row["input_ids"], windows[i]["input_ids"])
            assert torch.equal(row["labels"], windows[i]["labels"])
            continue
        ids, labels = row["input_ids"].tolist(), row["labels"]
        assert ids[-5] == QUERY_MARKER
        needle = next(t for t in range(96) if tuple(ids[t : t + 2]) == NEEDLE_MARKER)
        depths.add(needle)
        answered = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        assert answered == [91, 92, 93, 94]  # the query marker and the first three digits
        assert labels[answered].tolist() == ids[needle + 2 : needle + 6] == ids[-4:]
        assert max(ids) < 300
    assert len(depths) > 5  # needles at many depths


def test_the_mix_is_deterministic_and_seeded(windows: TokenWindows) -> None:
    a = PasskeyMix(windows, 0.5, 300, 5, seed=0)
    b = PasskeyMix(windows, 0.5, 300, 5, seed=0)
    c = PasskeyMix(windows, 0.5, 300, 5, seed=1)
    assert all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(len(a)))
    assert not torch.equal(a[1]["input_ids"], c[1]["input_ids"])


def test_distinct_mix_rows_never_repeat_a_digit(windows: TokenWindows) -> None:
    mix = PasskeyMix(windows, 1.0, 300, 5, seed=0, distinct=True)
    answers = [row["labels"][row["labels"] != IGNORE_INDEX].tolist() for row in mix]
    assert all(len(a) == 5 and len(set(a)) == 5 for a in answers)
    plain = PasskeyMix(windows, 1.0, 300, 5, seed=0)
    assert any(len(set(r["labels"][r["labels"] != IGNORE_INDEX].tolist())) < 5 for r in plain)
    with pytest.raises(ValueError, match="distinct digits"):
        PasskeyMix(windows, 1.0, 300, 11, seed=0, distinct=True)


def test_edges_put_needles_first_or_right_before_the_query(windows: TokenWindows) -> None:
    # 96-token rows: the query marker is token 90, so a needle at depth 0 (token 0) is 90
    # tokens before it and one at depth 1 (right before it: marker 2 + digits 5) is 7
    none = _needle_distances(PasskeyMix(windows, 1.0, 300, 5, seed=0))
    assert not {7, 90} & set(none)
    edges = _needle_distances(PasskeyMix(windows, 1.0, 300, 5, seed=0, edges=1.0))
    assert set(edges) == {7, 90} and 10 <= edges.count(90) <= 30
    some = _needle_distances(PasskeyMix(windows, 1.0, 300, 5, seed=0, near=0.5, edges=0.25))
    assert 3 <= sum(d in (7, 90) for d in some) <= 20
    with pytest.raises(ValueError, match="edges must be in"):
        PasskeyMix(windows, 1.0, 300, 5, seed=0, edges=1.5)


def _needle_distances(mix: PasskeyMix) -> list[int]:
    """Tokens from each passkey row's needle to its query marker."""
    out = []
    for i in range(len(mix)):
        ids = mix[i]["input_ids"].tolist()
        needle = next(t for t in range(len(ids)) if tuple(ids[t : t + 2]) == NEEDLE_MARKER)
        out.append(ids.index(QUERY_MARKER) - needle)
    return out


def test_near_rows_put_the_needle_close_to_the_query_on_a_log_scale(
    windows: TokenWindows,
) -> None:
    uniform = _needle_distances(PasskeyMix(windows, 1.0, 300, 5, seed=0))
    near = _needle_distances(PasskeyMix(windows, 1.0, 300, 5, seed=0, near=1.0))
    # 96 tokens: 83 of filler, the needle ends 7 tokens before the query at depth 100%
    assert all(7 <= d <= 90 for d in uniform + near)
    assert np.median(near) < 25 < np.median(uniform)
    assert min(near) == 7 and max(near) > 45  # short and long distances both occur


def test_bad_mix_arguments_name_the_argument(windows: TokenWindows) -> None:
    with pytest.raises(ValueError, match="fraction"):
        PasskeyMix(windows, 1.5, 300, 5, seed=0)
    with pytest.raises(ValueError, match="seed"):
        PasskeyMix(windows, 0.5, 300, 5, seed=-1)
    with pytest.raises(ValueError, match="near"):
        PasskeyMix(windows, 0.5, 300, 5, seed=0, near=-0.1)
    with pytest.raises(ValueError, match="vocab_size"):
        PasskeyMix(windows, 0.5, 10, 5, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        PasskeyMix(windows, 0.5, 300, 50, seed=0)
    with pytest.raises(IndexError):
        PasskeyMix(windows, 0.5, 300, 5, seed=0)[40]


def test_row_mean_loss_weighs_each_row_equally() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 8, 11)
    full = torch.randint(0, 11, (3, 8))
    losses = token_losses(logits, full)
    # every row fully labelled: the plain token mean
    flat = torch.nn.functional.cross_entropy(logits.flatten(0, 1), full.flatten())
    torch.testing.assert_close(row_mean_loss(losses, full), flat)
    # a row with two labels weighs as much as a row with eight; an unlabelled row is skipped
    sparse = full.clone()
    sparse[1, :6] = IGNORE_INDEX
    sparse[2] = IGNORE_INDEX
    losses = token_losses(logits, sparse)
    assert losses[2].abs().sum() == 0
    expected = (losses[0].mean() + losses[1, 6:].mean()) / 2
    torch.testing.assert_close(row_mean_loss(losses, sparse), expected)


@pytest.mark.parametrize("passkey_mix", [0.0, 1.0])
def test_training_loss_on_labelled_positions_equals_the_loss_of_all_logits(
    passkey_mix: float,
) -> None:
    """The step's loss applies lm_head at labelled positions only: loss and every parameter's
    gradient equal those of the full [B, T, V] logits (row mean for passkeys, token mean for
    text); an unlabelled row is skipped."""
    cfg = load_config(
        None,
        [
            "model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
            "model.n_kv_heads=1", "data.seq_len=24", f"data.passkey_mix={passkey_mix}",
        ],
    )  # fmt: skip
    torch.manual_seed(0)
    module = LMModule(cfg)
    ids = torch.randint(0, 64, (3, 24))
    labels = torch.randint(0, 64, (3, 24))
    labels[0, :20] = IGNORE_INDEX
    labels[1, ::3] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX
    logits = module.model(ids)
    if passkey_mix:
        expected = row_mean_loss(token_losses(logits, labels), labels)
    else:
        expected = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX
        )
    want = torch.autograd.grad(expected, list(module.parameters()))
    loss = module._lm_loss({"input_ids": ids, "labels": labels})
    got = torch.autograd.grad(loss, list(module.parameters()))
    torch.testing.assert_close(loss, expected)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


class _Bundle:
    """The two fields of a DataBundle that LMDataModule reads."""

    def __init__(self, path: Path) -> None:
        self.train_path = self.val_path = path


def test_datamodule_mixes_only_when_asked(windows: TokenWindows) -> None:
    base = ["model.vocab_size=300", "data.seq_len=96", "train.batch_size=4", "train.max_steps=10"]
    plain = LMDataModule(load_config(None, base), _Bundle(windows.path)).train_dataloader()
    assert isinstance(plain.dataset, _OffsetWindows)
    assert isinstance(plain.dataset.windows, TokenWindows)
    mixed_cfg = load_config(None, [*base, "data.passkey_mix=0.25"])
    mixed = LMDataModule(mixed_cfg, _Bundle(windows.path)).train_dataloader()
    assert isinstance(mixed.dataset.windows, PasskeyMix)
    batch = next(iter(mixed))
    labelled = (batch["labels"] != IGNORE_INDEX).sum(1).tolist()
    assert labelled == [96, 96, 96, 5]  # one passkey row in four, the 4th
