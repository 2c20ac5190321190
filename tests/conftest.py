"""Shared fixtures: a tiny real-text training config and isolated MLflow/data stores."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import services

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenizer/token cache for the whole session, so each test does not retrain BPE."""
    return tmp_path_factory.mktemp("sparsezoo-cache")


@pytest.fixture
def tiny_overrides(tmp_path: Path, data_cache: Path) -> list[str]:
    """Overrides for a seconds-long real training run: a few stdlib modules, a 2-layer model."""
    corpus = [str(STDLIB / "json" / "*.py"), str(STDLIB / "argparse.py"), str(STDLIB / "os.py")]
    return [
        f"data.corpus=[{','.join(corpus)}]",
        "data.vocab_size=512",
        "data.seq_len=64",
        "data.max_bytes=null",
        f"data.cache_dir={data_cache}",
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.n_kv_heads=1",
        "train.max_steps=6",
        "train.batch_size=4",
        "train.val_every=3",
        "train.val_batches=2",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.warmup_steps=2",
        "train.progress_bar=false",
        f"output_dir={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "experiment=test",
    ]


@pytest.fixture
def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    return services.free_port()
