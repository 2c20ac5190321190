"""Shared check for the mechanism tests: the tiny demo model trains on the stdlib corpus with
a mechanism, learns (validation loss well under the unigram entropy) and logs to MLflow."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from sparsezoo.config import load_config
from sparsezoo.data import prepare_data
from sparsezoo.train import train

_DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml"


def train_tiny_and_check_it_learns(
    tmp_path: Path, data_cache: Path, mechanism: str, params: dict[str, int]
) -> pd.Series:
    """Train the demo model 150 steps at 256 tokens with ``mechanism`` (``params`` set under
    attention.params.<mechanism>), assert val loss < unigram entropy - 0.5 nats and the run's
    mechanism tag, and return the run's MLflow row (metrics and tags)."""
    overrides = [f"attention.mechanism={mechanism}"]
    overrides += [f"attention.params.{mechanism}.{key}={value}" for key, value in params.items()]
    overrides += [
        "data.max_bytes=1500000",
        "data.vocab_size=1024",
        "data.seq_len=256",
        f"data.cache_dir={data_cache}",
        "train.max_steps=150",
        "train.batch_size=8",
        "train.val_every=75",
        "train.progress_bar=false",
        f"output_dir={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    result = train(load_config(_DEMO, overrides))
    # unigram baseline: the entropy of the training tokens' empirical distribution
    data = prepare_data(
        ["stdlib"], vocab_size=1024, val_fraction=0.05, seed=0, cache_dir=data_cache,
        max_bytes=1_500_000,
    )  # fmt: skip
    counts = np.bincount(np.memmap(data.train_path, dtype=np.uint16, mode="r"), minlength=1024)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    assert result.metrics["val/loss"] < unigram - 0.5, (result.metrics["val/loss"], unigram)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["demo"]).iloc[0]
    assert run["tags.sparsezoo.mechanism"] == mechanism
    return run
