"""Eval runs against a real SQLite MLflow store: ``sparsezoo eval`` on a run directory, a run id
and a checkpoint, into the run or a new linked eval run; the end-of-training hook; bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from sparsezoo import tracking
from sparsezoo.cli import main
from sparsezoo.config import ExperimentConfig, flatten, load_config, to_yaml
from sparsezoo.eval.runner import (
    TAG_CANNOT_RUN,
    TAG_EVALUATED,
    TAG_KNOBS,
    TAG_SUITES,
    EvalTarget,
)
from sparsezoo.model import SparseLM
from sparsezoo.train import CONFIG_FILE, RUN_FILE, prepare_run_data, train

SMALL_GRIDS = [
    "eval.passkey.depths=[0,50,100]",
    "eval.passkey.samples=2",
    "eval.mqar.n_pairs=[2,8]",
    "eval.mqar.samples=2",
    "eval.loss_by_position.samples=2",
    "eval.loss_by_position.buckets=4",
]
STEP = 7


def _uri(overrides: list[str]) -> str:
    return next(o for o in overrides if o.startswith("tracking.uri=")).split("=", 1)[1]


def make_run(overrides: list[str], mlflow: bool = True) -> tuple[ExperimentConfig, Path, str]:
    """A run directory as training leaves it (config, checkpoint, run record, MLflow run), with
    an untrained model: the eval machinery does not care how good the weights are. Without
    ``mlflow`` there is no run record (as after training with tracking disabled)."""
    cfg = load_config(None, overrides)
    cfg.run_name = "tiny"
    cfg.model.vocab_size = prepare_run_data(cfg).vocab_size
    run_dir = Path(cfg.output_dir) / cfg.experiment / cfg.run_name
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / CONFIG_FILE).write_text(to_yaml(cfg))
    torch.manual_seed(0)
    state = {f"model.{k}": v for k, v in SparseLM.from_config(cfg).state_dict().items()}
    torch.save({"state_dict": state, "global_step": STEP}, run_dir / "checkpoints" / "last.ckpt")
    if not mlflow:
        return cfg, run_dir, ""
    client = MlflowClient(_uri(overrides))
    run_id = tracking.create_run(client, cfg.experiment, cfg.run_name, {"sparsezoo.kind": "train"})
    tracking.log_params(client, run_id, flatten(cfg))
    client.set_terminated(run_id, "FINISHED")
    (run_dir / RUN_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": _uri(overrides)}))
    return cfg, run_dir, run_id


@pytest.fixture
def run(tiny_overrides: list[str]) -> tuple[ExperimentConfig, Path, str]:
    """A run directory with its MLflow run."""
    return make_run(tiny_overrides)


@pytest.fixture
def nsa_run(tiny_overrides: list[str]) -> tuple[ExperimentConfig, Path, str]:
    """An NSA run with small blocks: at 64 tokens a query in the last selection block has its
    three forced blocks and one free one among n_select = 4."""
    nsa = "attention.params.nsa"
    blocks = [f"{nsa}.block_size=16", f"{nsa}.stride=8", f"{nsa}.select_size=16"]
    return make_run(
        [
            *tiny_overrides,
            "attention.mechanism=nsa",
            f"{nsa}.n_select=4",
            f"{nsa}.window=8",
            *blocks,
        ]
    )


@pytest.fixture
def run_dir(tiny_overrides: list[str]) -> Path:
    """A run directory alone (no MLflow store is created): enough to test bad input."""
    return make_run(tiny_overrides, mlflow=False)[1]


def test_eval_of_a_run_dir_logs_metrics_and_heatmap_into_the_run(
    run: tuple[ExperimentConfig, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, run_dir, run_id = run
    code = main(["eval", str(run_dir), "--suite", "passkey,loss_by_position", *SMALL_GRIDS])
    assert code == 0
    assert "eval/passkey/acc" in capsys.readouterr().out
    client = MlflowClient(cfg.tracking.uri)
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED"  # evaluating does not reopen the training run
    metrics = logged.data.metrics
    for key in ("eval/passkey/L64/D0", "eval/passkey/L64/D50", "eval/passkey/L64/D100"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["eval/passkey/acc"] == pytest.approx(
        (
            metrics["eval/passkey/L64/D0"]
            + metrics["eval/passkey/L64/D50"]
            + metrics["eval/passkey/L64/D100"]
        )
        / 3
    )
    assert metrics["eval/loss_by_position/L64/loss"] > 0
    assert {f"eval/loss_by_position/L64/P{p}" for p in (0, 16, 32, 48)} <= set(metrics)
    assert [m.step for m in client.get_metric_history(run_id, "eval/passkey/acc")] == [STEP]
    assert logged.data.tags[TAG_SUITES] == "loss_by_position,passkey"
    assert TAG_CANNOT_RUN not in logged.data.tags
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert artifacts == {
        "eval/passkey_heatmap.png",
        "eval/loss_by_position.png",
        "eval/results.json",
    }
    png = Path(client.download_artifacts(run_id, "eval/passkey_heatmap.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["metrics"] == pytest.approx(
        {k: v for k, v in metrics.items() if k.startswith("eval/")}
    )
    assert results["suites"] == {"passkey": STEP, "loss_by_position": STEP}
    # a later evaluation with another suite adds to the results; a rerun replaces its own
    assert main(["eval", str(run_dir), "--suite", "mqar", *SMALL_GRIDS]) == 0
    assert main(["eval", str(run_dir), "--suite", "passkey", "eval.passkey.depths=[50]"]) == 0
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(results["suites"]) == {"passkey", "loss_by_position", "mqar"}
    assert "eval/mqar/acc" in results["metrics"]
    assert "eval/loss_by_position/loss" in results["metrics"]
    assert "eval/passkey/L64/D50" in results["metrics"]
    assert "eval/passkey/L64/D0" not in results["metrics"]
    # MLflow agrees: the cells the rerun's grid left out read NaN now (no longer scored), the
    # other suites keep theirs
    metrics = client.get_run(run_id).data.metrics
    assert math.isnan(metrics["eval/passkey/L64/D0"]) and math.isnan(
        metrics["eval/passkey/L64/D100"]
    )
    assert metrics["eval/passkey/acc"] == results["metrics"]["eval/passkey/acc"]
    latest = {k: v for k, v in metrics.items() if k.startswith("eval/") and not math.isnan(v)}
    assert latest == pytest.approx(results["metrics"])


def test_eval_by_run_id_and_by_checkpoint_into_a_new_linked_run(
    run: tuple[ExperimentConfig, Path, str],
) -> None:
    cfg, run_dir, run_id = run
    uri = cfg.tracking.uri
    assert main(["eval", run_id, "--suite", "mqar", "--tracking-uri", uri, *SMALL_GRIDS]) == 0
    client = MlflowClient(uri)
    assert "eval/mqar/KV8/acc" in client.get_run(run_id).data.metrics
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert main(["eval", str(ckpt), "--suite", "passkey", "--new-run", *SMALL_GRIDS]) == 0
    experiment = client.get_experiment_by_name(cfg.experiment)
    evals = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`sparsezoo.kind` = 'eval'"
    )
    assert len(evals) == 1
    new = evals[0]
    assert new.info.status == "FINISHED"
    assert new.data.tags[TAG_EVALUATED] == run_id
    assert "eval/passkey/acc" in new.data.metrics
    assert "eval/passkey/acc" not in client.get_run(run_id).data.metrics
    # the new run's files sit apart: the run's own results file keeps only its own suites
    own = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(own["suites"]) == {"mqar"}
    apart = json.loads((run_dir / "eval" / new.info.run_id / "results.json").read_text())
    assert apart["metrics"] == pytest.approx(dict(new.data.metrics))


def test_test_time_knob_scores_into_a_new_tagged_run_and_leaves_the_trained_runs_results(
    nsa_run: tuple[ExperimentConfig, Path, str],
) -> None:
    cfg, run_dir, run_id = nsa_run
    suites = ["--suite", "loss_by_position", *SMALL_GRIDS]
    assert main(["eval", str(run_dir), *suites]) == 0
    own = json.loads((run_dir / "eval" / "results.json").read_text())["metrics"]
    knob = "attention.params.nsa.n_select=3"
    assert main(["eval", str(run_dir), *suites, knob]) == 0
    client = MlflowClient(cfg.tracking.uri)
    trained = client.get_run(run_id)
    assert trained.data.metrics["eval/loss_by_position/loss"] == own["eval/loss_by_position/loss"]
    assert TAG_KNOBS not in trained.data.tags
    experiment = client.get_experiment_by_name(cfg.experiment)
    (new,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`sparsezoo.kind` = 'eval'"
    )
    assert new.info.run_name == "eval-tiny-nsa.n_select=3"
    assert new.data.tags[TAG_KNOBS] == knob
    assert new.data.tags[TAG_EVALUATED] == run_id
    assert new.data.params["attention.params.nsa.n_select"] == "3"
    assert trained.data.params["attention.params.nsa.n_select"] == "4"
    knob_results = run_dir / "eval" / "nsa.n_select=3" / "results.json"
    scored = json.loads(knob_results.read_text())["metrics"]
    assert scored == pytest.approx({k: v for k, v in new.data.metrics.items()})
    # one free block fewer changes what the last block's queries read, hence the loss
    assert scored["eval/loss_by_position/loss"] != pytest.approx(own["eval/loss_by_position/loss"])
    assert json.loads((run_dir / "eval" / "results.json").read_text())["metrics"] == own
    artifacts = {a.path for a in client.list_artifacts(new.info.run_id, "eval")}
    assert artifacts == {"eval/loss_by_position.png", "eval/results.json"}


@pytest.mark.parametrize(
    ("knob", "message"),
    [
        (
            "attention.params.moba.top_k=2",
            "this run's layers use nsa, so only attention.params.nsa.<knob> knobs",
        ),
        (
            "attention.params.nsa.n_select=2",
            "attention.params.nsa: n_select=2 is below the minimum 3",
        ),
        ("attention.params.nsa.n_selekt=5", "n_selekt"),
        (
            "attention.params.nsa.block_size=8",
            "with attention.params.nsa.block_size=8 (only knobs that keep the weights' shapes",
        ),
    ],
)
def test_bad_test_time_knobs_exit_2_and_log_nothing(
    nsa_run: tuple[ExperimentConfig, Path, str],
    knob: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg, run_dir, _ = nsa_run
    assert main(["eval", str(run_dir), "--suite", "passkey", *SMALL_GRIDS, knob]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert message in err
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    assert not client.search_runs(
        [experiment.experiment_id], filter_string="tags.`sparsezoo.kind` = 'eval'"
    )
    assert not (run_dir / "eval").exists()


def test_evaluation_is_deterministic(run: tuple[ExperimentConfig, Path, str]) -> None:
    _, run_dir, _ = run
    args = ["eval", str(run_dir), "--suite", "passkey", "--suite", "mqar", *SMALL_GRIDS]
    assert main(args) == 0
    first = json.loads((run_dir / "eval" / "results.json").read_text())["metrics"]
    assert main(args) == 0
    assert json.loads((run_dir / "eval" / "results.json").read_text())["metrics"] == first


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--suite", "needle"], "eval.suites=['needle'] is invalid; allowed: a non-empty list"),
        (["--suite", "passkey", "passkey.samples=3"], "takes eval.<key>=value settings"),
        (["--suite", "passkey", "model.d_model=64"], "takes eval.<key>=value settings"),
        (
            ["--suite", "passkey", "eval.passkey.sample=3"],
            "unknown config key 'eval.passkey.sample'",
        ),
        (["--suite", "passkey", "eval.passkey.samples=many"], "eval.passkey.samples"),
        (["--suite", "mqar", "eval.mqar.n_pairs=[40]"], "eval.mqar at length 64"),
        (["--suite", ","], "--suite needs at least one of"),
    ],
)
def test_bad_eval_input_exits_2_with_a_clear_error(
    run_dir: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(run_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert message in err


def test_bad_run_references_exit_2(
    run: tuple[ExperimentConfig, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, run_dir, _ = run
    uri = cfg.tracking.uri
    cases = [
        ("no/such/run", "is not a checkpoint file, a run directory or an MLflow run id"),
        ("0" * 32, "no MLflow run 00000000"),
        (str(tmp_path), "no config.yaml"),
    ]
    for reference, message in cases:
        assert main(["eval", reference, "--suite", "passkey", "--tracking-uri", uri]) == 2
        assert message in capsys.readouterr().err, reference
    bad = run_dir / "checkpoints" / "broken.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["eval", str(bad), "--suite", "passkey"]) == 2
    assert "not a checkpoint of this run's model" in capsys.readouterr().err
    (run_dir / "checkpoints" / "last.ckpt").unlink()
    assert main(["eval", str(run_dir), "--suite", "passkey"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_training_config_runs_eval_suites_at_the_end(tiny_overrides: list[str]) -> None:
    cfg = load_config(
        None,
        [*tiny_overrides, "data.passkey_mix=0.5", "eval.suites=[passkey,mqar]", *SMALL_GRIDS],
    )
    result = train(cfg)
    assert {"eval/passkey/acc", "eval/mqar/acc", "val/loss"} <= set(result.metrics)
    client = MlflowClient(_uri(tiny_overrides))
    logged = client.get_run(result.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.metrics["eval/passkey/min_acc"] <= logged.data.metrics["eval/passkey/acc"]
    assert [m.step for m in client.get_metric_history(result.run_id, "eval/mqar/acc")] == [6]
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "eval")}
    assert {"eval/passkey_heatmap.png", "eval/mqar_heatmap.png", "eval/results.json"} <= artifacts
    assert (result.run_dir / "eval" / "passkey_heatmap.png").is_file()


@pytest.mark.parametrize(
    ("run_id", "knobs", "eval_run_id", "folder"),
    [
        ("abc", (), None, "eval"),
        ("abc", (), "abc", "eval"),
        ("abc", (), "new", "eval/new"),
        (None, (), "new", "eval"),
        ("abc", ("attention.params.nsa.n_select=5",), "new", "eval/nsa.n_select=5"),
        (None, ("attention.params.moba.top_k=4",), "new", "eval/moba.top_k=4"),
    ],
)
def test_eval_files_folder_follows_the_run_the_metrics_go_into(
    tmp_path: Path,
    run_id: str | None,
    knobs: tuple[str, ...],
    eval_run_id: str | None,
    folder: str,
) -> None:
    """The trained run's own ``eval/`` only for its own results (or an untracked run's), a
    folder per knob setting, and one per new eval run of a tracked run."""
    target = EvalTarget(ExperimentConfig(), tmp_path / "x.ckpt", tmp_path, run_id, "", knobs)
    assert target.out_dir(eval_run_id) == tmp_path / folder


def test_a_run_trained_on_a_relative_sqlite_store_is_evaluated_from_another_directory(
    tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training with ``sqlite:///mlflow.db`` (a file in the working directory) records the
    store's absolute path in run.json, so ``sparsezoo eval <run dir>`` run from elsewhere logs
    into the training run; a link tag names the run directory absolutely."""
    workdir, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    workdir.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(workdir)
    overrides = [o for o in tiny_overrides if not o.startswith("tracking.uri=")]
    result = train(load_config(None, [*overrides, "tracking.uri=sqlite:///mlflow.db"]))
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    assert json.loads((result.run_dir / RUN_FILE).read_text())["tracking_uri"] == store
    monkeypatch.chdir(elsewhere)
    args = ["eval", str(result.run_dir), "--suite", "passkey", *SMALL_GRIDS[:2]]
    assert main(args) == 0
    assert not (elsewhere / "mlflow.db").exists()
    assert "eval/passkey/acc" in MlflowClient(store).get_run(result.run_id).data.metrics
    assert main([*args, "--new-run"]) == 0
    client = MlflowClient(store)
    experiment = client.get_run(result.run_id).info.experiment_id
    runs = client.search_runs([experiment], "tags.`sparsezoo.kind` = 'eval'")
    assert [r.data.tags[TAG_EVALUATED] for r in runs] == [result.run_id]


def test_eval_against_a_store_without_the_run_fails_before_writing_anything(
    run: tuple[ExperimentConfig, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--tracking-uri`` naming a store that does not hold the run recorded in run.json: exit
    2 naming both, and no eval files are written into the run directory."""
    _, run_dir, run_id = run
    other = f"sqlite:///{tmp_path / 'other.db'}"
    code = main(["eval", str(run_dir), "--suite", "passkey", "--tracking-uri", other])
    assert code == 2
    err = capsys.readouterr().err
    assert f"names MLflow run {run_id}, which is not in the tracking store {other}" in err
    assert not (run_dir / "eval").exists()


def test_end_of_training_eval_runs_on_the_eval_device(
    tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end-of-training hook scores the trained model on ``eval.device`` (the trainer's
    teardown leaves it on the CPU), as ``sparsezoo eval`` does."""
    moved: list[torch.device] = []
    to = SparseLM.to

    def recording(self: SparseLM, *args: object, **kwargs: object) -> SparseLM:
        moved.append(torch.device(args[0]) if args else kwargs.get("device"))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(SparseLM, "to", recording)
    train(load_config(None, [*tiny_overrides, "eval.suites=[passkey]", *SMALL_GRIDS[:2]]))
    assert moved[-1:] == [torch.device("cpu")]
