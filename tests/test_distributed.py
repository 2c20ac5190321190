"""Multi-process training on CPU: DDP over gloo matches one process with the same global batch.

Both runs go through the real CLI (Lightning's DDP launcher re-runs the command line for the
second process). ``train.batch_size`` is per process, so 2 processes x 2 rows see exactly the
rows of 1 process x 4 rows at every step; the validation loss after the run must agree to float
round-off, and only rank 0 may create or touch the MLflow run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from sparsezoo.config import ConfigError, load_config
from sparsezoo.distributed import is_launcher_process, resolve_strategy
from sparsezoo.train import RUN_FILE, train

DROPPED = ("train.batch_size=", "experiment=", "train.max_steps=", "train.val_every=")


def _train_cli(overrides: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "sparsezoo.cli", "train", *overrides]
    with log.open("wb") as out:
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, log.read_text()[-4000:]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    base = [o for o in tiny_overrides if not o.startswith(DROPPED)]
    base += ["train.accelerator=cpu", "train.threads=1", "train.max_steps=5", "train.val_every=5"]
    _train_cli([*base, "experiment=single", "train.batch_size=4"], tmp_path / "single.log")
    ddp = ["experiment=ddp", "train.batch_size=2", "train.devices=2", "train.strategy=ddp"]
    _train_cli([*base, *ddp], tmp_path / "ddp.log")

    client = MlflowClient(next(o for o in base if o.startswith("tracking.uri=")).split("=", 1)[1])

    def runs(experiment: str) -> list:
        exp = client.get_experiment_by_name(experiment).experiment_id
        return client.search_runs([exp])

    (single,), ddp_runs = runs("single"), runs("ddp")
    assert len(ddp_runs) == 1, "a process other than rank 0 created an MLflow run"
    (run,) = ddp_runs
    assert run.info.status == "FINISHED"
    assert run.data.params["train.devices"] == "2"
    assert run.data.metrics["val/loss"] == pytest.approx(single.data.metrics["val/loss"], rel=1e-4)
    # both processes trained in the one run directory that rank 0 recorded
    (run_dir,) = (tmp_path / "runs" / "ddp").iterdir()
    assert json.loads((run_dir / RUN_FILE).read_text())["run_id"] == run.info.run_id
    # 5 steps, checkpoint_every 2: the final save after fit ran on both ranks without a hang
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 5


def test_launcher_process_is_rank_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    assert is_launcher_process()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert is_launcher_process()
    monkeypatch.setenv("NODE_RANK", "1")
    assert not is_launcher_process()
    monkeypatch.setenv("NODE_RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not is_launcher_process()


def test_ddp_expects_unused_parameters_only_for_phased_mechanisms() -> None:
    dense = load_config(None, ["train.strategy=ddp", "attention.mechanism=dense"])
    assert resolve_strategy(dense) == "ddp"
    # DSA's indexer warm-up freezes the model but the indexer
    dsa = load_config(None, ["train.strategy=ddp", "attention.mechanism=dsa"])
    assert resolve_strategy(dsa) == "ddp_find_unused_parameters_true"
    fsdp = load_config(None, ["train.strategy=fsdp", "train.accelerator=gpu"])
    assert resolve_strategy(fsdp) == "fsdp"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_fsdp_without_cuda_is_refused_before_any_run(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    with pytest.raises(ConfigError, match="fsdp needs CUDA"):
        train(load_config(None, [*tiny_overrides, "train.strategy=fsdp"]))
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.strategy=horovod", "train.strategy"),
        ("train.accelerator=tpu9", "train.accelerator"),
        ("train.num_nodes=0", "train.num_nodes"),
        ("train.strategy=fsdp train.accelerator=cpu", "train.strategy=fsdp needs GPUs"),
    ],
)
def test_bad_distributed_settings_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, override.split())
    assert "allowed:" in str(info.value) or "use train.strategy=ddp" in str(info.value)
