"""Length curriculum (``data.curriculum``): phases of shorter rows before ``data.seq_len``.

Config validation names the phase key; `PhasedBatches` serves whole steps phase after phase,
splits a step's rows between processes as one process would see them, and resumes at a step;
the data module builds the phases' rows (their own passkey mix) from one row stream; a real
training run goes through the phases and logs tokens per second from the batches it saw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from sparsezoo.config import ConfigError, load_config, phase_attention_params, trains_on_passkeys
from sparsezoo.data import IGNORE_INDEX, PasskeyMix, TokenWindows
from sparsezoo.data.curriculum import Phase, PhasedBatches
from sparsezoo.data.dataset import TOKEN_DTYPE
from sparsezoo.train import LMDataModule, train


class _Rows(Dataset):
    """Row i is [i] * seq_len, so a batch shows which rows it holds."""

    def __init__(self, n: int, seq_len: int) -> None:
        self.n, self.seq_len = n, seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = torch.full((self.seq_len,), i)
        return {"input_ids": row, "labels": row}


def _phases() -> list[Phase]:
    return [Phase(_Rows(100, 8), 2, 4, 0), Phase(_Rows(100, 16), 3, 2, 8)]


def test_phased_batches_serve_each_phase_in_turn() -> None:
    batches = PhasedBatches(_phases())
    assert len(batches) == 5
    shapes = [tuple(batches[s]["input_ids"].shape) for s in range(5)]
    assert shapes == [(4, 8), (4, 8), (2, 16), (2, 16), (2, 16)]
    rows = [batches[s]["input_ids"][:, 0].tolist() for s in range(5)]
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11], [12, 13]]
    assert [batches.locate(s) for s in (0, 1, 2, 4)] == [(0, 0), (0, 1), (1, 0), (1, 2)]
    with pytest.raises(IndexError):
        batches[5]


def test_phased_batches_split_steps_between_processes_and_resume() -> None:
    whole = PhasedBatches(_phases())
    for step in range(5):
        parts = [PhasedBatches(_phases(), 0, rank, 2)[step]["input_ids"] for rank in range(2)]
        assert parts[0].shape[0] == parts[1].shape[0] == whole[step]["input_ids"].shape[0] // 2
        merged = sorted(torch.cat(parts)[:, 0].tolist())
        assert merged == whole[step]["input_ids"][:, 0].tolist()
    resumed = PhasedBatches(_phases(), start=3)
    assert len(resumed) == 2
    torch.testing.assert_close(resumed[0]["input_ids"], whole[3]["input_ids"])


def test_phased_batches_reject_bad_phases() -> None:
    with pytest.raises(ValueError, match="phases must not be empty"):
        PhasedBatches([])
    with pytest.raises(ValueError, match="start must be in"):
        PhasedBatches(_phases(), start=5)
    with pytest.raises(ValueError, match="multiple of world=2"):
        PhasedBatches([Phase(_Rows(100, 8), 2, 3)], world=2)
    with pytest.raises(ValueError, match="exceed its 10 rows"):
        PhasedBatches([Phase(_Rows(10, 8), 3, 4)])
    with pytest.raises(ValueError, match="rank must be in"):
        PhasedBatches(_phases(), rank=2, world=2)


BASE = ["model.vocab_size=300", "data.seq_len=96", "train.batch_size=2", "train.max_steps=10"]


def test_curriculum_config_parses_and_names_bad_keys(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(
        "data:\n  seq_len: 96\n  passkey_mix: 0.5\n"
        "  curriculum:\n    - {seq_len: 32, steps: 4, batch_size: 6, passkey_mix: 1.0}\n"
        "train:\n  max_steps: 10\n"
    )
    cfg = load_config(path)
    phase = cfg.data.curriculum[0]
    assert (phase.seq_len, phase.steps, phase.batch_size, phase.passkey_mix) == (32, 4, 6, 1.0)
    assert phase.passkey_near is None
    assert trains_on_passkeys(cfg)
    assert not trains_on_passkeys(load_config(None, BASE))
    only_phase = load_config(
        None, [*BASE, "data.curriculum=[{seq_len: 32, steps: 2, passkey_mix: 1}]"]
    )
    assert trains_on_passkeys(only_phase)  # text at data.seq_len, passkeys in the phase
    bad = {
        "seq_len: 128, steps: 2": r"data\.curriculum\[0\]\.seq_len=128 is invalid",
        "seq_len: 32, steps: 0": r"data\.curriculum\[0\]\.steps=0 is invalid",
        "seq_len: 32, steps: 2, batch_size: -1": r"data\.curriculum\[0\]\.batch_size",
        "seq_len: 32, steps: 2, passkey_mix: 1.5": r"data\.curriculum\[0\]\.passkey_mix",
        "seq_len: 32, steps: 2, passkey_near: -1": r"data\.curriculum\[0\]\.passkey_near",
        "seq_len: 8, steps: 2, passkey_mix: 1": r"data\.curriculum\[0\]\.seq_len: seq_len must be",
        "seq_len: 32, steps: 10": r"train\.max_steps=10 is invalid; allowed: > the data\.curr",
        "seq_len: 32, step: 2": r"unknown config key 'data\.curriculum\[\]\.step'; valid keys "
        r"here: seq_len, steps, batch_size, passkey_mix, passkey_near",
    }
    with pytest.raises(ConfigError, match=r"data\.passkey_len=11 is invalid; allowed: <= 10"):
        load_config(None, [*BASE, "data.passkey_distinct=true", "data.passkey_len=11"])
    for phase_text, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*BASE, f"data.curriculum=[{{{phase_text}}}]"])


def test_phase_attention_params_are_checked_and_follow_the_steps() -> None:
    """A phase's mechanism knobs apply over attention.params for its steps only; the config
    names the offending key for an unknown mechanism, a knob that is not a phase knob (with
    the ones that are) and an invalid value."""
    nsa = [*BASE, "attention.mechanism=nsa", "attention.params.nsa.n_select=5"]

    def phases(text: str) -> list[str]:
        return [
            *nsa,
            f"data.curriculum=[{{seq_len: 32, steps: 2, attention_params: {text}}}, "
            "{seq_len: 64, steps: 3}]",
        ]

    cfg = load_config(None, phases("{nsa: {n_select: 4, window: 16}, dsa: {topk: 8}}"))
    knobs = {"nsa": {"n_select": 4, "window": 16}, "dsa": {"topk": 8}}
    assert [phase_attention_params(cfg, step) for step in range(7)] == [knobs] * 2 + [{}] * 5
    key = r"data\.curriculum\[0\]\.attention_params"
    fixed = r"cannot change between phases; the knobs a phase may set for nsa: n_select, window"
    bad = {
        "{foo: {n_select: 4}}": rf"{key}: unknown attention mechanism 'foo'",
        "{nsa: {n_selekt: 4}}": rf"{key}\.nsa\.n_selekt=4 {fixed}",
        "{nsa: {n_select: 2}}": rf"{key}\.nsa: n_select=2 is below the minimum 3",
        "{nsa: {kv_mode: shared}}": rf"{key}\.nsa\.kv_mode='shared' {fixed}",
        "{nsa: {n_select: 4, block_size: 64}}": rf"{key}\.nsa\.block_size=64 {fixed}",
        "{dense: {x: 1}}": rf"{key}\.dense\.x=1 cannot change .* for dense: none",
    }
    for text, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, phases(text))


def test_training_sets_each_phases_knobs_then_restores_the_configured_ones(
    tiny_overrides: list[str],
) -> None:
    """Every layer's mechanism trains the phase's steps with its knobs and the steps after
    the phases with attention.params' (a real run: the knob is read on each step)."""
    cfg = load_config(
        None,
        [
            *tiny_overrides,
            "attention.mechanism=sliding_window",
            "attention.params.sliding_window.window=16",
            "data.curriculum=[{seq_len: 32, steps: 2, attention_params: "
            "{sliding_window: {window: 4}}}, {seq_len: 32, steps: 1}]",
        ],
    )
    windows: list[list[int]] = []

    class Knobs(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
            windows.append([attn.params.window for attn in pl_module.model.mechanisms()])

    train(cfg, callbacks=[Knobs()])
    assert windows == [[4, 4]] * 2 + [[16, 16]] * 4


class _Bundle:
    def __init__(self, path: Path) -> None:
        self.train_path = self.val_path = path


def test_datamodule_trains_the_phases_then_the_full_length(tmp_path: Path) -> None:
    path = tmp_path / "train.bin"
    np.random.default_rng(0).integers(20, 300, 20_000).astype(TOKEN_DTYPE).tofile(path)
    cfg = load_config(
        None,
        [
            *BASE,
            "data.passkey_mix=0.5",
            "data.curriculum=[{seq_len: 32, steps: 3, batch_size: 4, passkey_mix: 1.0},"
            " {seq_len: 64, steps: 2}]",
        ],
    )
    loader = LMDataModule(cfg, _Bundle(path)).train_dataloader()
    batches = list(loader)
    assert [tuple(b["input_ids"].shape) for b in batches] == (
        [(4, 32)] * 3 + [(2, 64)] * 2 + [(2, 96)] * 5
    )
    labelled = [(b["labels"] != IGNORE_INDEX).sum(1).tolist() for b in batches]
    assert labelled[:3] == [[5] * 4] * 3  # every row a passkey row, 5 answer digits
    assert labelled[3:] == [[64, 5], [64, 5]] + [[96, 5]] * 5  # data.passkey_mix=0.5 after
    phases = loader.dataset.phases
    assert isinstance(phases[0].rows, PasskeyMix) and phases[0].rows.fraction == 1.0
    assert isinstance(phases[2].rows.windows, TokenWindows)
    assert [p.first_row for p in phases] == [0, 12, 16]  # one stream of rows, no reuse


def test_training_run_goes_through_the_curriculum(tiny_overrides: list[str]) -> None:
    cfg = load_config(
        None,
        [
            *tiny_overrides,
            "data.passkey_mix=0.5",
            "data.curriculum=[{seq_len: 32, steps: 3, batch_size: 8, passkey_mix: 1.0}]",
        ],
    )
    seen: list[tuple[int, ...]] = []

    class Shapes(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            seen.append(tuple(args[1]["input_ids"].shape))  # (pl_module, batch, batch_idx)

    result = train(cfg, callbacks=[Shapes()])
    assert seen == [(8, 32)] * 3 + [(4, 64)] * 3
    assert result.metrics["perf/tokens_per_s"] > 0
    assert np.isfinite(result.metrics["train/loss"])
