"""A real short training run: metrics, params and artifacts in MLflow; failure and resume."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from sparsezoo.config import load_config
from sparsezoo.eval.runner import load_model, resolve_target
from sparsezoo.tracking import TrackingError
from sparsezoo.train import lr_schedule, train

EXPECTED_METRICS = (
    "train/loss",
    "val/loss",
    "val/ppl",
    "perf/tokens_per_s",
    "perf/step_ms",
    "perf/peak_mem_mb",
    "attn/density",
)


class CrashAt(L.Callback):
    """Raise in the middle of training, as a crash would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


class FinalWeights(L.Callback):
    """Keep a copy of the model's weights as training ends."""

    state: dict[str, torch.Tensor]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _uri(overrides: list[str]) -> str:
    return next(o for o in overrides if o.startswith("tracking.uri=")).split("=", 1)[1]


def test_training_run_logs_metrics_params_artifacts(tiny_overrides: list[str]) -> None:
    cfg = load_config(
        None,
        [
            *tiny_overrides,
            "attention.mechanism=sliding_window",
            "attention.params.sliding_window.window=8",
        ],
    )
    result = train(cfg)
    uri = _uri(tiny_overrides)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["test"])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["run_id"] == result.run_id
    assert run["status"] == "FINISHED"
    for key in EXPECTED_METRICS:
        assert f"metrics.{key}" in runs.columns, key
        assert run[f"metrics.{key}"] > 0, key
    assert run["metrics.attn/density"] < 0.5  # 8-token window at length 64 is sparse
    assert run["tags.sparsezoo.mechanism"] == "sliding_window"
    assert run["tags.sparsezoo.kind"] == "train"
    assert len(run["tags.sparsezoo.git_commit"]) > 0
    assert run["params.attention.params.sliding_window.window"] == "8"
    assert run["params.model.d_model"] == "32"
    assert run["params.data.seq_len"] == "64"
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(result.run_id)}
    assert {"config.yaml", "tokenizer.json"} <= artifacts
    # val/loss logged at the validation steps, train/loss at every step
    history = MlflowClient(uri).get_metric_history(result.run_id, "train/loss")
    assert sorted({m.step for m in history}) == list(range(6))
    val_steps = sorted(
        m.step for m in MlflowClient(uri).get_metric_history(result.run_id, "val/loss")
    )
    assert val_steps == [2, 5]
    # the saved resolved config reloads to the same config
    reloaded = load_config(result.run_dir / "config.yaml")
    assert reloaded.attention.params == {"sliding_window": {"window": 8}}
    assert reloaded.model.vocab_size == cfg.model.vocab_size > 0


def test_failed_run_is_marked_failed_and_resume_continues_same_run(
    tiny_overrides: list[str],
) -> None:
    cfg = load_config(None, tiny_overrides)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, callbacks=[CrashAt(5)])
    uri = _uri(tiny_overrides)
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["test"])
    assert list(runs["status"]) == ["FAILED"]
    run_id = runs.iloc[0]["run_id"]
    assert "simulated crash" in runs.iloc[0]["tags.sparsezoo.error"]
    run_dir = Path(cfg.output_dir) / "test" / cfg.run_name
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((run_dir / "run.json").read_text())["run_id"] == run_id

    result = train(resume=run_dir)
    assert result.run_id == run_id
    runs = mlflow.search_runs(experiment_names=["test"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    # steps 0-4 before the crash, 4-5 after resuming from the step-4 checkpoint
    assert max(steps) == 5 and 4 in steps


def test_unreachable_tracking_server_fails_before_training(
    tiny_overrides: list[str], free_port: int, tmp_path: Path
) -> None:
    cfg = load_config(None, [*tiny_overrides, f"tracking.uri=http://127.0.0.1:{free_port}"])
    with pytest.raises(TrackingError, match="unreachable"):
        train(cfg)
    assert not (tmp_path / "runs").exists()


def test_resume_needs_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        train(resume=tmp_path)


def test_lr_schedule_warmup_then_cosine_to_min() -> None:
    cfg = load_config(
        None, ["train.max_steps=100", "train.warmup_steps=10", "train.min_lr_ratio=0.1"]
    )
    f = lr_schedule(cfg)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55)
    assert f(100) == pytest.approx(0.1)


def test_a_fresh_run_in_a_used_directory_sets_the_old_checkpoints_aside(
    tiny_overrides: list[str],
) -> None:
    """Training again under the same run name: the earlier checkpoints move to
    checkpoints.previous-*, intact, and last.ckpt is the new run's (not a stale file next to a
    last-v1.ckpt)."""
    cfg = load_config(None, [*tiny_overrides, "run_name=same"])
    first = train(cfg)
    old_bytes = first.checkpoint.read_bytes()
    second = train(load_config(None, [*tiny_overrides, "run_name=same", "train.max_steps=4"]))
    assert second.run_dir == first.run_dir and second.run_id != first.run_id
    ckpts = second.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("last")) == ["last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 4
    (previous,) = second.run_dir.glob("checkpoints.previous-*")
    assert (previous / "last.ckpt").read_bytes() == old_bytes


def test_last_checkpoint_is_the_final_step_when_that_is_not_a_periodic_save(
    tiny_overrides: list[str],
) -> None:
    """5 steps with checkpoint_every=2: Lightning's periodic saves stop at step 4, and last.ckpt
    (what resume, ``sparsezoo eval`` and TrainResult read) must still hold step 5's weights."""
    final = FinalWeights()
    result = train(load_config(None, [*tiny_overrides, "train.max_steps=5"]), callbacks=[final])
    assert result.checkpoint == result.run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(result.checkpoint, weights_only=False)
    assert saved["global_step"] == 5
    assert saved["state_dict"].keys() == final.state.keys()
    for name, weight in final.state.items():
        assert torch.equal(saved["state_dict"][name], weight), name
    _, step = load_model(resolve_target(str(result.run_dir), ["passkey"]), torch.device("cpu"))
    assert step == 5
