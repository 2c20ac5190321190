"""Optuna sweeps end to end: real SQLite/journal Optuna storage, real SQLite MLflow, tiny model.

Covers pruning at global steps, invalid points (mechanism validation and explicit constraints)
that never train, interrupt and resume into the same study and MLflow parent, journal storage
with two objectives and a Pareto front, heartbeat failure and retry of a dead worker's trial,
and every kind of bad input failing with exit status 2 before anything trains.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import lightning as L
import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from sparsezoo import sweep as sweep_module
from sparsezoo import tracking
from sparsezoo.cli import main
from sparsezoo.config import ConfigError, load_config
from sparsezoo.sweep import load_sweep, run_sweep
from sparsezoo.sweep_budget import is_surplus, run_until
from sparsezoo.sweep_space import Constraint

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
# valid NSA knobs for the tiny model at seq_len 64 (d | l, d | l', l <= l')
NSA_TINY = {"block_size": 8, "stride": 8, "select_size": 16, "n_select": 3, "window": 16}
# the random sampler (seeded 264 + trial number) draws, in order: a good lr (completes), a bad
# lr (pruned at the first validation), an NSA block size that fails NSA's validation, an NSA
# window that breaks the explicit constraint
PRUNE_AND_INVALID = {
    "sampler": {"type": "random", "seed": 264},
    "pruner": {"type": "median", "n_startup_trials": 1},
    "space": {
        "train.lr": [1.0e-2, 1.0e-6],
        "attention.mechanism": ["dense", "nsa"],
        "attention.params.nsa.block_size": [8, 12],
        "attention.params.nsa.window": [8, 32],
    },
    "constraints": ["attention.params.nsa.window <= 16"],
}


def write_sweep(tmp_path: Path, section: dict[str, Any], name: str = "tiny_sweep") -> Path:
    """A sweep file: a dense base config with valid tiny NSA knobs, plus the sweep section."""
    doc = {
        "experiment": "test",
        "attention": {"mechanism": "dense", "params": {"nsa": NSA_TINY}},
        "sweep": section,
    }
    path = tmp_path / f"{name}.yaml"
    OmegaConf.save(OmegaConf.create(doc), path)
    return path


def _uri(overrides: list[str]) -> str:
    return next(o for o in overrides if o.startswith("tracking.uri=")).split("=", 1)[1]


def _children(client: MlflowClient, parent: str) -> dict[int, Any]:
    """The parent's child runs by trial number."""
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    return {int(r.data.tags["sparsezoo.trial"]): r for r in runs}


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def test_sweep_prunes_and_never_trains_invalid_points(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    path = write_sweep(tmp_path, PRUNE_AND_INVALID)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    result = run_sweep(path, 4, storage=storage, overrides=tiny_overrides)

    study = optuna.load_study(study_name="tiny_sweep", storage=storage)
    trials = study.get_trials()
    assert [t.state for t in trials] == [
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.PRUNED,
        TrialState.PRUNED,
    ]
    assert result.states == {"complete": 1, "pruned": 1, "invalid": 2}
    good, pruned, bad_blocks, bad_window = trials
    # pruning saw the validation loss at the global step (val_every=3), not at the epoch
    assert set(pruned.intermediate_values) == {3}
    assert set(good.intermediate_values) == {3, 6}
    assert "invalid" not in pruned.user_attrs
    assert "block_size=12 must be a multiple of stride=8" in bad_blocks.user_attrs["invalid"]
    assert bad_blocks.constraints == bad_window.constraints == {"invalid": 1.0}
    assert good.constraints == pruned.constraints == {}
    assert bad_window.user_attrs["invalid"] == (
        "constraint violated: attention.params.nsa.window <= 16"
    )
    assert result.best[0].number == good.number

    client = MlflowClient(_uri(tiny_overrides))
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["sparsezoo.kind"] == "sweep"
    assert parent.data.tags["sparsezoo.study"] == "tiny_sweep"
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best/val/loss"] == pytest.approx(good.value)
    assert parent.data.metrics["trials/invalid"] == 2
    children = _children(client, result.parent_run_id)
    assert sorted(children) == [0, 1, 2, 3]
    states = {n: r.data.tags["sparsezoo.trial_state"] for n, r in children.items()}
    assert states == {0: "complete", 1: "pruned", 2: "invalid", 3: "invalid"}
    for trial in trials:
        run = children[trial.number]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["sparsezoo.study"] == "tiny_sweep"
        for key, value in trial.params.items():
            assert run.data.params[f"sweep/{key}"] == str(value)
    # trained trials: the resolved config as params, the training curves as metrics
    done = children[good.number]
    assert done.info.status == "FINISHED"
    assert done.data.params["train.lr"] == str(good.params["train.lr"])
    assert done.data.metrics["val/loss"] == pytest.approx(good.value)
    assert len(client.get_metric_history(done.info.run_id, "val/loss")) == 2
    cut = children[pruned.number]
    assert cut.data.tags["sparsezoo.pruned_at_step"] == "3"
    assert max(m.step for m in client.get_metric_history(cut.info.run_id, "train/loss")) < 5
    # invalid points: a FAILED record saying why, nothing trained
    for trial in (bad_blocks, bad_window):
        run = children[trial.number]
        assert run.info.status == "FAILED"
        assert trial.user_attrs["invalid"] in run.data.tags["sparsezoo.error"]
        assert not client.get_metric_history(run.info.run_id, "train/loss")
        assert not (tmp_path / "runs" / "test" / run.data.tags["mlflow.runName"]).exists()

    artifacts = _artifacts(client, result.parent_run_id)
    assert {
        "best_config.yaml",
        "trials.csv",
        "tiny_sweep.yaml",
        "plots/optimization_history_val_loss.png",
        "plots/intermediate_values.png",
    } <= artifacts
    best_yaml = Path(client.download_artifacts(result.parent_run_id, "best_config.yaml"))
    best_cfg = load_config(best_yaml)
    assert best_cfg.train.lr == good.params["train.lr"]
    assert best_cfg.attention.mechanism == good.params["attention.mechanism"]
    assert best_cfg.run_name is None


class InterruptAt(L.Callback):
    """Press Ctrl-C at a training step (Lightning turns it into SystemExit)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_interrupted_sweep_resumes_same_study_and_parent(
    tmp_path: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    section = {
        "sampler": {"type": "tpe", "seed": 1},
        "pruner": "none",
        "space": {"train.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}},
    }
    path = write_sweep(tmp_path, section)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    real_train = sweep_module.train
    calls: list[int] = []

    def train_then_interrupt(cfg: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            kwargs["callbacks"] = [*kwargs["callbacks"], InterruptAt(1)]
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(sweep_module, "train", train_then_interrupt)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        first = run_sweep(path, 3, storage=storage, overrides=tiny_overrides)
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT after a Ctrl-C
    monkeypatch.setattr(sweep_module, "train", real_train)
    assert first.interrupted
    assert first.trials_run == [0, 1]
    client = MlflowClient(_uri(tiny_overrides))
    assert client.get_run(first.parent_run_id).info.status == "KILLED"
    killed = _children(client, first.parent_run_id)[1]
    assert killed.info.status == "KILLED"
    assert killed.data.tags["sparsezoo.trial_state"] == "interrupted"

    second = run_sweep(path, 1, storage=storage, overrides=tiny_overrides)
    assert not second.interrupted
    assert second.parent_run_id == first.parent_run_id
    assert second.trials_run == [2]
    study = optuna.load_study(study_name="tiny_sweep", storage=storage)
    assert [t.state for t in study.trials] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
    ]
    assert client.get_run(first.parent_run_id).info.status == "FINISHED"
    assert sorted(_children(client, first.parent_run_id)) == [0, 1, 2]
    mlflow.set_tracking_uri(_uri(tiny_overrides))
    parents = mlflow.search_runs(
        experiment_names=["test"], filter_string="tags.`sparsezoo.kind` = 'sweep'"
    )
    assert len(parents) == 1


def test_journal_storage_two_objectives_pareto_front_from_the_cli(
    tmp_path: Path, tiny_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    section = {
        "objectives": ["val/loss", "perf/tokens_per_s"],
        "sampler": {"type": "nsga2", "seed": 0, "population_size": 2},
        "space": {"train.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}},
    }
    path = write_sweep(tmp_path, section)
    journal = tmp_path / "study.journal"
    # options between the file and the overrides, as the README writes the command
    argv = ["sweep", str(path), "--n-trials", "2", "--storage", f"journal:{journal}"]
    assert main([*argv, *tiny_overrides]) == 0
    out = capsys.readouterr().out
    assert "study tiny_sweep" in out and "2 complete" in out and "Pareto front" in out
    study = optuna.load_study(
        study_name="tiny_sweep", storage=JournalStorage(JournalFileBackend(str(journal)))
    )
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    assert all(t.state == TrialState.COMPLETE and len(t.values) == 2 for t in study.trials)
    client = MlflowClient(_uri(tiny_overrides))
    parent = study.user_attrs["sparsezoo.mlflow_parent_run_id"]
    artifacts = _artifacts(client, parent)
    assert "plots/pareto_front.png" in artifacts
    assert "plots/optimization_history_perf_tokens_per_s.png" in artifacts
    assert "best_config.yaml" in artifacts
    assert {f"pareto/trial_{t.number}.yaml" for t in study.best_trials} <= artifacts
    for run in _children(client, parent).values():
        trial = study.trials[int(run.data.tags["sparsezoo.trial"])]
        assert run.data.metrics["perf/tokens_per_s"] == pytest.approx(trial.values[1])


DEAD_WORKER = textwrap.dedent(
    """
    import os, sys, time, optuna
    from optuna.storages import RDBStorage
    storage = RDBStorage(sys.argv[1], heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage, study_name="tiny_sweep")

    def die(trial):
        trial.suggest_float("train.lr", 1.0e-3, 1.0e-2, log=True)
        trial.set_user_attr("mlflow_run_id", sys.argv[2])
        time.sleep(1.5)  # let the heartbeat thread beat, then die without a word
        os.kill(os.getpid(), 9)

    study.optimize(die, n_trials=1)
    """
)


def test_heartbeat_fails_and_retries_a_dead_workers_trial(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    section = {
        "sampler": {"type": "random", "seed": 0},
        "pruner": "none",
        "heartbeat": {"interval": 1, "grace_period": 2, "max_retry": 1},
        "space": {"train.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}},
    }
    path = write_sweep(tmp_path, section)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    client = MlflowClient(_uri(tiny_overrides))
    dead_run = tracking.create_run(client, "test", "dead-worker", {"sparsezoo.trial": "0"})
    proc = subprocess.run(
        [sys.executable, "-c", DEAD_WORKER, storage, dead_run], capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL
    study = optuna.load_study(study_name="tiny_sweep", storage=storage)
    assert study.trials[0].state == TrialState.RUNNING
    time.sleep(2.5)  # past the grace period

    result = run_sweep(path, 1, storage=storage, overrides=tiny_overrides)
    trials = optuna.load_study(study_name="tiny_sweep", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == trials[0].params  # the dead trial's point, re-queued
    assert result.trials_run == [1]
    dead = client.get_run(dead_run)
    assert dead.info.status == "FAILED"
    assert dead.data.tags["sparsezoo.trial_state"] == "stale"
    retried = _children(client, result.parent_run_id)[1]
    assert retried.data.tags["sparsezoo.retry_of"] == "0"
    assert retried.info.status == "FINISHED"


BAD_INPUT = [
    (
        {"space": {"train.lr": {"type": "gauss", "low": 1, "high": 2}}},
        [],
        "sweep.space.train.lr: unknown distribution type 'gauss'",
    ),
    (
        {"space": {"train.lr": {"type": "float", "low": 0.1, "high": 0.01}}},
        [],
        "sweep.space.train.lr: low=0.1 > high=0.01",
    ),
    (
        {"space": {"train.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}},
        [],
        "log=true needs low > 0",
    ),
    (
        {"space": {"train.lrr": [0.1, 0.2]}},
        [],
        "unknown config key 'train.lrr'",
    ),
    (
        {"space": {"train.warmup_steps": {"type": "float", "low": 0.5, "high": 2.5}}},
        [],
        "sweep.space.train.warmup_steps: invalid value",
    ),
    (
        {"space": {"attention.params.nsa.windw": [8, 16]}, "pruner": "none"},
        ["attention.mechanism=nsa"],
        "nsa has no knob 'windw'",
    ),
    (
        {"space": {"attention.params.nsa.n_select": {"type": "int", "low": 1, "high": 4}}},
        ["attention.mechanism=nsa"],
        "outside the knob's allowed range [3, inf]",
    ),
    (
        {"space": {"attention.params.moba.top_k": [2, 3]}},
        [],
        "no trial uses moba",
    ),
    (
        {"space": {"attention.mechanism": ["dense", "nsaa"]}},
        [],
        "sweep.space.attention.mechanism: unknown attention mechanism 'nsaa'",
    ),
    ({"space": {}}, [], "sweep.space is empty"),
    (
        {"space": {"train.lr": [0.1]}, "objectives": ["val/acc"]},
        [],
        "sweep.objectives: unknown metric 'val/acc'",
    ),
    (
        {
            "space": {"train.lr": [0.1]},
            "objectives": ["val/loss", "perf/tokens_per_s"],
            "pruner": "median",
        },
        [],
        "sweep.pruner=median: Optuna prunes single-objective studies only",
    ),
    (
        {"space": {"train.lr": [0.1]}, "objectives": ["perf/step_ms"], "pruner": "median"},
        [],
        "pruning compares intermediate validation losses",
    ),
    (
        {"space": {"train.lr": [0.1]}, "sampler": {"type": "grid"}},
        [],
        "sweep.sampler.type: unknown 'grid'",
    ),
    (
        {"space": {"train.lr": [0.1]}, "sampler": {"type": "tpe", "n_startup": 3}},
        [],
        "unknown option(s) ['n_startup'] for tpe",
    ),
    (
        {"space": {"train.lr": [0.1]}, "trials": 3},
        [],
        "sweep: unknown key(s) ['trials']",
    ),
    (
        {"space": {"train.lr": [0.1]}, "constraints": ["__import__('os').getcwd() == 1"]},
        [],
        "is not allowed in a constraint",
    ),
    (
        {"space": {"train.lr": [0.1]}, "constraints": ["train.lrr < 1"]},
        [],
        "sweep.constraints[0] (train.lrr < 1): unknown config path 'train.lrr'",
    ),
    (
        {"space": {"train.lr": [0.1]}, "heartbeat": {"interval": 10, "grace_period": 5}},
        [],
        "sweep.heartbeat.grace_period=5 must exceed interval=10",
    ),
    (
        {"space": {"train.lr": [0.1]}},
        ["train.lr=0.5"],
        "override train.lr=... sets a searched value",
    ),
    (
        {"space": {"train.lr": [0.1]}},
        ["--storage", "nosuch://host/db"],
        "unknown database 'nosuch'",
    ),
    (
        {"space": {"train.lr": [0.1]}},
        ["--storage", "not a url"],
        "storage 'not a url' is not a URL",
    ),
    (
        {"space": {"train.lr": [0.1]}},
        ["--storage", "sqlite:////nonexistent-dir/optuna.db"],
        "directory /nonexistent-dir is not writable",
    ),
    (
        {"space": {"train.lr": [0.1]}},
        ["--n-trials", "0"],
        "--n-trials=0 must be >= 1",
    ),
    (
        {"space": {"train.lr": [0.1]}},
        ["--study-trials", "0"],
        "--study-trials=0 must be >= 1",
    ),
]


@pytest.mark.parametrize(("section", "extra", "message"), BAD_INPUT)
def test_bad_sweep_input_fails_before_training(
    tmp_path: Path,
    tiny_overrides: list[str],
    capsys: pytest.CaptureFixture[str],
    section: dict[str, Any],
    extra: list[str],
    message: str,
) -> None:
    path = write_sweep(tmp_path, section)
    budgeted = "--n-trials" in extra or "--study-trials" in extra
    n_trials = [] if budgeted else ["--n-trials", "2"]
    storage = [] if "--storage" in extra else ["--storage", f"sqlite:///{tmp_path / 'o.db'}"]
    rc = main(["sweep", str(path), *n_trials, *storage, *extra, *tiny_overrides])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_constraint_expressions() -> None:
    cfg = load_config(None, ["attention.params.nsa.window=48", "data.seq_len=128"])
    rule = Constraint.parse(
        "attention.params.nsa.window % attention.params.nsa.stride == 0 "
        "and min(data.seq_len, 64) >= 2 * attention.params.nsa.stride",
        "c",
    )
    assert rule.paths == (
        "attention.params.nsa.window",
        "attention.params.nsa.stride",
        "data.seq_len",
    )
    assert rule.mechanisms == {"nsa"}
    assert rule.holds(cfg)  # 48 % 16 == 0, 64 >= 32
    assert not Constraint.parse("not data.seq_len > 100", "c").holds(cfg)
    assert Constraint.parse("-model.n_layers < 0 < 1 <= abs(-1)", "c").holds(cfg)
    with pytest.raises(ConfigError, match="c: cannot parse"):
        Constraint.parse("data.seq_len <", "c")
    with pytest.raises(ConfigError, match=r"'\[1, 2\]' is not allowed"):
        Constraint.parse("[1, 2] == data.seq_len", "c")


@pytest.mark.parametrize("name", ["nsa_knobs", "moba_knobs", "dsa_knobs"])
def test_shipped_sweeps_load_and_document_their_command(name: str) -> None:
    sweep = load_sweep(EXPERIMENTS / f"{name}.yaml")
    mechanism = name.removesuffix("_knobs")
    assert sweep.base.attention.mechanism == mechanism
    assert {p.mechanism for p in sweep.space.params} == {None, mechanism}
    assert sweep.space.violation(sweep.base) is None  # the base point is a valid trial
    readme = (EXPERIMENTS / f"{name}.md").read_text()
    assert f"sparsezoo sweep experiments/{name}.yaml --n-trials" in readme


def test_sweep_overrides_edit_the_study_from_the_command_line() -> None:
    # sweep.* overrides edit the study section; the rest apply to every trial's base config
    sweep = load_sweep(
        EXPERIMENTS / "nsa_knobs.yaml",
        ["sweep.space.attention.params.nsa.stride=[8]", "train.max_steps=7"],
    )
    stride = next(p for p in sweep.space.params if p.path.endswith("nsa.stride"))
    assert stride.choices == (8,)
    assert sweep.base.train.max_steps == 7
    assert sweep.overrides == ["train.max_steps=7"]


def test_readme_sweep_example_loads(tmp_path: Path) -> None:
    text = (EXPERIMENTS.parent / "README.md").read_text().split("## Sweeps", 1)[1]
    example = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    (tmp_path / "configs").symlink_to(EXPERIMENTS.parent / "configs")
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "my_sweep.yaml").write_text(example)
    sweep = load_sweep(tmp_path / "experiments" / "my_sweep.yaml")
    assert sweep.settings.name == "my_sweep"
    assert sweep.space.reachable_mechanisms(sweep.base) == {"nsa", "moba"}
    assert [c.mechanisms for c in sweep.space.constraints] == [{"moba"}]


@pytest.mark.slow
def test_two_workers_share_a_journal_study_and_one_parent(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    section = {
        "sampler": {"type": "random", "seed": 0},
        "pruner": "none",
        "space": {"train.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}},
    }
    path = write_sweep(tmp_path, section)
    storage = f"journal:{tmp_path / 'study.journal'}"
    # MLflow's SQLite store cannot be created by two processes at once: create it first
    MlflowClient(_uri(tiny_overrides)).search_experiments()
    cmd = [sys.executable, "-m", "sparsezoo.cli", "sweep", str(path), "--n-trials", "1"]
    cmd += ["--storage", storage, *tiny_overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    workers = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=600)[0].decode() for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = optuna.load_study(
        study_name="tiny_sweep",
        storage=JournalStorage(JournalFileBackend(str(tmp_path / "study.journal"))),
    )
    assert sorted(t.number for t in study.trials) == [0, 1]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    mlflow.set_tracking_uri(_uri(tiny_overrides))
    parents = mlflow.search_runs(
        experiment_names=["test"], filter_string="tags.`sparsezoo.kind` = 'sweep'"
    )
    assert len(parents) == 1
    client = MlflowClient(_uri(tiny_overrides))
    assert sorted(_children(client, parents.iloc[0]["run_id"])) == [0, 1]


@pytest.mark.parametrize("flags", [[], ["--n-trials", "1", "--study-trials", "2"]])
def test_sweep_needs_exactly_one_trial_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    path = write_sweep(tmp_path, {"space": {"train.lr": [0.1]}})
    with pytest.raises(SystemExit) as info:
        main(["sweep", str(path), *flags])
    assert info.value.code == 2
    assert "--n-trials" in capsys.readouterr().err


def test_surplus_is_decided_by_trial_number_among_trials_that_did_not_fail(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="s")
    trials = [study.ask() for _ in range(3)]  # three workers start at once, budget 2
    assert [is_surplus(study, t.number, 2) for t in trials] == [False, False, True]
    study.tell(trials[0], state=TrialState.FAIL)  # a dead worker's trial frees its slot
    assert not is_surplus(study, trials[2].number, 2)


def test_run_until_finishes_exactly_the_budget_and_runs_queued_retries(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    study.tell(study.ask(), state=TrialState.FAIL)
    study.enqueue_trial({"x": 0.5})  # a retry waiting for a worker
    calls = []

    def run_one() -> None:
        calls.append(1)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)

    run_until(study, run_one, 3, poll_s=0.01)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 3 and len(calls) == 2
    assert study.trials[2].params == {"x": 0.5}
    run_until(study, run_one, 3, poll_s=0.01)  # nothing left: returns at once
    assert len(calls) == 2


def test_run_until_waits_for_other_workers_and_warns_without_heartbeats(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="s")
    study.ask()  # another worker's trial holds the only slot
    calls = []
    with caplog.at_level("INFO", logger="sparsezoo.sweep_budget"):
        run_until(study, lambda: calls.append(1), 1, timeout=0.3, poll_s=0.05, heartbeats=False)
    assert calls == []  # nothing to start: it waited until the timeout
    assert "0/1 trials finished, 1 running elsewhere; waiting" in caplog.text
    assert "no heartbeats" in caplog.text
