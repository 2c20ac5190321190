"""The team stack's topology from real programs on loopback (no Docker engine needed).

A PostgreSQL server (temporary cluster, free port) holds the MLflow and Optuna databases, a real
``mlflow server`` runs on the MLflow one with a local artifact root, and two ``sparsezoo sweep``
worker processes share one study with a study-wide budget (``--study-trials``). One worker is
killed with SIGKILL in the middle of a trial: the survivor fails the stale trial by heartbeat,
runs its retry, and the study still ends with exactly the budgeted number of finished trials,
each with its own child run on the MLflow server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import services
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from sparsezoo.sweep import PARENT_RUN_ATTR, RUN_ATTR, WORKER_ATTR

REQUIRED = os.environ.get("SPARSEZOO_REQUIRE_POSTGRES") == "1"
HAVE_POSTGRES = services.pg_binary("initdb") is not None and services.pg_binary("pg_ctl")
BUDGET = 4


def _worker_pid(trial: optuna.trial.FrozenTrial) -> int | None:
    worker = trial.user_attrs.get(WORKER_ATTR)
    return int(worker.rsplit(":", 1)[1]) if worker else None


@pytest.mark.slow
@pytest.mark.skipif(
    not HAVE_POSTGRES and not REQUIRED, reason="PostgreSQL server programs not installed"
)
def test_two_workers_on_postgres_share_a_budget_and_survive_a_killed_worker(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    sweep_file = tmp_path / "team.yaml"
    section = {
        "study": "team",
        "sampler": {"type": "random", "seed": 0},
        "pruner": "none",
        "heartbeat": {"interval": 1, "grace_period": 3, "max_retry": 1},
        "space": {"train.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}},
    }
    OmegaConf.save(OmegaConf.create({"experiment": "team", "sweep": section}), sweep_file)
    with services.postgres(("mlflow", "optuna"), tmp_path / "postgres.log") as address:
        storage = services.postgres_url(address, "optuna")
        backend = services.postgres_url(address, "mlflow")
        with services.mlflow_server(
            backend, tmp_path / "artifacts", tmp_path / "mlflow.log"
        ) as url:
            overrides = [o for o in tiny_overrides if not o.startswith("tracking.uri=")]
            overrides += ["train.max_steps=8", "experiment=team"]
            cmd = [sys.executable, "-m", "sparsezoo.cli", "sweep", str(sweep_file)]
            cmd += ["--study-trials", str(BUDGET), "--storage", storage, *overrides]
            env = {**os.environ, "MLFLOW_TRACKING_URI": url, "PYTHONWARNINGS": "ignore"}
            logs = [(tmp_path / f"worker{i}.log").open("wb") for i in range(2)]
            workers = [
                subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT) for log in logs
            ]
            survivor, victim = workers
            # kill the victim in the middle of a trial, after it finished one of its own;
            # one storage for the whole poll: a load_study per poll by URL opens an engine
            # (and a server connection) each time, which on a slow machine ran PostgreSQL
            # out of connections ("too many clients already")
            poll_storage = optuna.storages.RDBStorage(storage)
            deadline = time.monotonic() + 600
            killed_trial = None
            while killed_trial is None:
                assert time.monotonic() < deadline, "the victim never ran a second trial"
                assert victim.poll() is None, (tmp_path / "worker1.log").read_text()[-3000:]
                try:
                    trials = optuna.load_study(study_name="team", storage=poll_storage).trials
                except KeyError:  # the study is not created yet
                    trials = []
                mine = [t for t in trials if _worker_pid(t) == victim.pid]
                if any(t.state == TrialState.COMPLETE for t in mine):
                    running = [
                        t
                        for t in mine
                        if t.state == TrialState.RUNNING and RUN_ATTR in t.user_attrs
                    ]
                    if running:
                        victim.send_signal(signal.SIGKILL)
                        killed_trial = running[0].number
                time.sleep(0.2)
            assert survivor.wait(timeout=900) == 0, (tmp_path / "worker0.log").read_text()[-3000:]
            assert victim.wait(timeout=30) == -signal.SIGKILL
            for log in logs:
                log.close()

            study = optuna.load_study(study_name="team", storage=storage)
            client = MlflowClient(url)
            parent = study.user_attrs[PARENT_RUN_ATTR]
            experiment = client.get_experiment_by_name("team").experiment_id
            children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
            parent_status = client.get_run(parent).info.status
            trials = study.get_trials()  # read now: the storage stops with the server
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == BUDGET
    assert {_worker_pid(t) for t in finished} == {survivor.pid, victim.pid}
    stale = trials[killed_trial]
    assert stale.state == TrialState.FAIL
    retries = [
        t
        for t in finished
        if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed_trial
    ]
    assert len(retries) == 1 and retries[0].params == stale.params
    assert _worker_pid(retries[0]) == survivor.pid
    # one child run per trial that trained, none twice, each where its trial says
    by_trial = {}
    for run in children:
        number = int(run.data.tags["sparsezoo.trial"])
        assert number not in by_trial, f"trial {number} has two MLflow runs"
        by_trial[number] = run
    for trial in finished:
        run = by_trial[trial.number]
        assert run.info.run_id == trial.user_attrs[RUN_ATTR]
        assert run.info.status == "FINISHED"
        assert run.data.metrics["val/loss"] == pytest.approx(trial.value)
    assert by_trial[killed_trial].info.status == "FAILED"
    assert by_trial[killed_trial].data.tags["sparsezoo.trial_state"] == "stale"
    assert parent_status == "FINISHED"
