"""``sparsezoo sweep``: Optuna studies over config values, each trial a nested MLflow run.

A sweep YAML is an experiment config plus a ``sweep:`` section (search space and constraints:
:mod:`sparsezoo.sweep_space`; objectives, sampler, pruner, storage, heartbeats:
:mod:`sparsezoo.sweep_study`). Every trial samples its values, composes its config from the base
config, the ``key=value`` overrides and the sampled values, and then

- is *invalid* when the config does not validate (a mechanism's block rules, ranges) or breaks a
  constraint: it never trains, Optuna records it PRUNED with the reason as the ``invalid`` user
  attribute and a violated trial constraint (so TPE learns to avoid the region), and MLflow
  gets a FAILED child run saying why;
- otherwise trains with :func:`sparsezoo.train.train` as a child run of the study's parent run,
  reporting the validation loss at ``trainer.global_step`` to the pruner (:class:`TrialReporter`).

The study lives in Optuna storage (``sqlite:///optuna.db`` by default, any RDB URL, or a journal
file for several local workers) and is resumed when it exists. The MLflow parent run's id is kept
in the study's user attributes, so every worker and every restart logs under the same parent.
RDB storages run heartbeats: a trial whose worker died is failed by the next worker to start a
trial, its MLflow run marked FAILED, and its parameters re-queued (:class:`StaleTrialHandler`).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import optuna
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.trainer.states import TrainerFn
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from sparsezoo import tracking
from sparsezoo.config import ConfigError, ExperimentConfig, compose, flatten, split_study_file
from sparsezoo.config import to_yaml as config_to_yaml
from sparsezoo.console import console
from sparsezoo.sweep_artifacts import (
    PARETO_DIR,
    PLOTS_DIR,
    best_trials,
    write_plots,
    write_study_files,
)
from sparsezoo.sweep_budget import SURPLUS_ATTR, SurplusTrial, is_surplus, run_until
from sparsezoo.sweep_space import SearchSpace, nested, parse_space
from sparsezoo.sweep_study import StudySettings, display_storage, open_storage, parse_settings
from sparsezoo.train import mechanism_tag, train

log = logging.getLogger(__name__)

PARENT_RUN_ATTR = "sparsezoo.mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"
INVALID_ATTR = "invalid"
ERROR_ATTR = "error"
WORKER_ATTR = "worker"  # host:pid of the process that ran the trial
STATE_TAG = "sparsezoo.trial_state"
PARENT_WAIT_S = 30.0  # how long a joining worker waits for the study creator's parent run


class TrialReporter(L.Callback):
    """Links a trial to its MLflow run and reports validation losses to Optuna by global step.

    On setup it records the run id on the trial and logs the sampled values as ``sweep/<path>``
    params. After every validation during fit it reports ``metric`` at ``trainer.global_step``
    (optuna-integration's callback reports at the epoch, which a step-based LM run never
    advances); when the pruner says so it stops training after the step instead of raising, so
    the run ends cleanly with its curves and the objective raises TrialPruned afterwards.
    """

    def __init__(
        self,
        trial: optuna.Trial,
        client: MlflowClient,
        metric: str | None,
    ) -> None:
        self.trial = trial
        self.client = client
        self.metric = metric
        self.run_id: str | None = None
        self.pruned_at: int | None = None
        self.pruned_value: float | None = None
        self._reported: set[int] = set()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Record the MLflow run id on the trial and log the sampled values on the run."""
        if self.run_id is not None or not isinstance(trainer.logger, MLFlowLogger):
            return
        self.run_id = trainer.logger.run_id
        self.trial.set_user_attr(RUN_ATTR, self.run_id)
        tracking.log_params(
            self.client, self.run_id, {f"sweep/{k}": v for k, v in self.trial.params.items()}
        )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Report the validation metric at the global step; stop training if pruned."""
        if self.metric is None or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        value = trainer.callback_metrics.get(self.metric)
        step = trainer.global_step
        if value is None or step in self._reported:
            return
        self._reported.add(step)
        self.trial.report(float(value), step)
        if self.trial.should_prune():
            self.pruned_at, self.pruned_value = step, float(value)
            trainer.should_stop = True


class StaleTrialHandler:
    """Heartbeat callback: re-queue a dead worker's trial and mark its MLflow run FAILED."""

    def __init__(self, tracking_uri: str, max_retry: int) -> None:
        self.tracking_uri = tracking_uri
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Called by Optuna with each trial it has just marked FAIL for a lost heartbeat."""
        self.retry(study, trial)
        run_id = trial.user_attrs.get(RUN_ATTR)
        log.warning("trial %d: its worker stopped (no heartbeat); re-queued", trial.number)
        if run_id:
            client = MlflowClient(self.tracking_uri)
            tracking.set_tags(
                client,
                run_id,
                {STATE_TAG: "stale", "sparsezoo.error": "worker stopped: heartbeat lost"},
            )
            client.set_terminated(run_id, "FAILED")


@dataclass
class Sweep:
    """A loaded, checked sweep: the base config, the search space and the study settings."""

    path: Path
    base_source: DictConfig
    base: ExperimentConfig
    overrides: list[str]
    space: SearchSpace
    settings: StudySettings

    def trial_config(self, values: dict[str, Any]) -> ExperimentConfig:
        """Compose a trial's config: base config, its sampled values, then the overrides."""
        return compose([self.base_source, nested(values)], self.overrides)

    def config_yaml(self, trial: FrozenTrial) -> str:
        """A finished trial's config as a ready-to-run YAML (with a fresh run name)."""
        cfg = self.trial_config(trial.params)
        cfg.run_name = None
        return config_to_yaml(cfg)


def load_sweep(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    storage: str | None = None,
    study_name: str | None = None,
) -> Sweep:
    """Read and check a sweep YAML; every problem is a ConfigError before anything trains."""
    base_source, section, overrides = split_study_file(path, "sweep", overrides, ("space",))
    if storage is not None:
        section["storage"] = storage
    if study_name is not None:
        if not study_name.strip():
            raise ConfigError("--study: the study name must not be empty")
        section["study"] = study_name
    settings = parse_settings(section, Path(path).stem)
    base = compose([base_source], overrides)
    if not base.tracking.enabled:
        raise ConfigError("tracking.enabled=false: a sweep records every trial in MLflow")
    space = parse_space(
        section.get("space"), section.get("constraints"), base_source, base, overrides
    )
    return Sweep(Path(path), base_source, base, list(overrides), space, settings)


@dataclass
class SweepResult:
    """What one ``sparsezoo sweep`` invocation did, and where the study stands."""

    study_name: str
    storage: str
    experiment: str
    parent_run_id: str
    objectives: tuple[str, ...]
    trials_run: list[int]
    states: dict[str, int]
    best: list[FrozenTrial]
    artifact_dir: Path
    failed_this_run: int = 0
    interrupted: bool = False


def trial_state(trial: FrozenTrial) -> str:
    """One of complete, pruned, invalid, failed, surplus, running, waiting."""
    if trial.state == TrialState.PRUNED and INVALID_ATTR in trial.user_attrs:
        return "invalid"
    if trial.state == TrialState.FAIL and SURPLUS_ATTR in trial.user_attrs:
        return "surplus"
    return {TrialState.FAIL: "failed"}.get(trial.state, trial.state.name.lower())


class SweepObjective:
    """The Optuna objective: sample, validate, train as a nested MLflow run, return the metrics."""

    def __init__(
        self,
        sweep: Sweep,
        study: optuna.Study,
        client: MlflowClient,
        parent_run_id: str,
        budget: int | None = None,
    ) -> None:
        self.sweep = sweep
        self.study = study
        self.client = client
        self.parent_run_id = parent_run_id
        self.budget = budget
        self.trials_run: list[int] = []

    def _tags(self, trial: optuna.Trial) -> dict[str, str]:
        tags = {
            "sparsezoo.study": self.sweep.settings.name,
            "sparsezoo.trial": str(trial.number),
            STATE_TAG: "running",
        }
        frozen = next(
            t
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.number == trial.number
        )
        retry_of = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        if retry_of is not None:
            tags["sparsezoo.retry_of"] = str(retry_of)
        return tags

    def _run_name(self, trial: optuna.Trial) -> str:
        # the timestamp keeps run directories apart if a deleted study's name is reused
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return f"{self.sweep.settings.name}-t{trial.number:04d}-{stamp}"

    def _set_state(self, run_id: str | None, state: str, **extra: str) -> None:
        if run_id is not None:
            tracking.set_tags(self.client, run_id, {STATE_TAG: state, **extra})

    def _record_invalid(self, trial: optuna.Trial, reason: str) -> None:
        """An invalid point: a FAILED child run with the reason; the trial ends PRUNED."""
        log.info("trial %d is invalid: %s", trial.number, reason)
        trial.set_user_attr(INVALID_ATTR, reason)
        # Optuna 5's channel for infeasible points: TPE ranks them below every feasible trial
        trial.set_constraint(INVALID_ATTR, 1.0)
        mechanism = str(trial.params.get("attention.mechanism", mechanism_tag(self.sweep.base)))
        tags = {
            **self._tags(trial),
            "sparsezoo.kind": "sweep_trial",
            "sparsezoo.mechanism": mechanism,
            STATE_TAG: "invalid",
            "sparsezoo.error": f"invalid point: {reason}",
        }
        run_id = tracking.create_run(
            self.client, self.sweep.base.experiment, self._run_name(trial), tags, self.parent_run_id
        )
        tracking.log_params(self.client, run_id, {f"sweep/{k}": v for k, v in trial.params.items()})
        self.client.set_terminated(run_id, "FAILED")
        trial.set_user_attr(RUN_ATTR, run_id)

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        """Run one trial; raises TrialPruned for pruned and invalid points.

        With a study-wide budget, a trial beyond it raises SurplusTrial before anything else
        (:mod:`sparsezoo.sweep_budget`).
        """
        if self.budget is not None and is_surplus(self.study, trial.number, self.budget):
            trial.set_user_attr(SURPLUS_ATTR, f"the study's budget of {self.budget} is taken")
            raise SurplusTrial(f"trial {trial.number}: study budget of {self.budget} reached")
        self.trials_run.append(trial.number)
        trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
        settings = self.sweep.settings
        # Draws outside the sampler's model (random, TPE's startup trials) come from the seed
        # plus the trial number: one worker reproduces its run, a resumed study does not replay
        # the first session's points, and concurrent workers do not draw the same ones.
        self.study.sampler = settings.make_sampler(seed_offset=trial.number)
        try:
            cfg = self.sweep.trial_config(self.sweep.space.sample(trial, self.sweep.base))
            reason = self.sweep.space.violation(cfg)
        except ConfigError as exc:
            reason = str(exc)
        if reason is not None:
            self._record_invalid(trial, reason)
            raise optuna.TrialPruned(f"invalid: {reason}")
        cfg.run_name = self._run_name(trial)
        reporter = TrialReporter(
            trial, self.client, settings.objectives[0] if settings.prunes else None
        )
        try:
            result = train(
                cfg, callbacks=[reporter], tags=self._tags(trial), parent_run_id=self.parent_run_id
            )
        except (KeyboardInterrupt, SystemExit) as exc:
            # Lightning turns Ctrl-C into SystemExit; Optuna marks the trial FAIL only for
            # exceptions and KeyboardInterrupt, so hand it a KeyboardInterrupt
            self._set_state(reporter.run_id, "interrupted")
            if reporter.run_id is not None:
                self.client.set_terminated(reporter.run_id, "KILLED")
            raise KeyboardInterrupt(f"trial {trial.number} interrupted") from exc
        except Exception as exc:
            trial.set_user_attr(ERROR_ATTR, f"{type(exc).__name__}: {exc}"[:1000])
            self._set_state(reporter.run_id, "failed")
            raise
        if reporter.pruned_at is not None:
            self._set_state(
                reporter.run_id, "pruned", **{"sparsezoo.pruned_at_step": str(reporter.pruned_at)}
            )
            raise optuna.TrialPruned(
                f"{settings.objectives[0]}={reporter.pruned_value:.4f} at step {reporter.pruned_at}"
            )
        values = [result.metrics.get(m, math.nan) for m in settings.objectives]
        bad = [m for m, v in zip(settings.objectives, values, strict=True) if not math.isfinite(v)]
        if bad:
            error = f"objective {', '.join(bad)} not finite or not logged (diverged?)"
            trial.set_user_attr(ERROR_ATTR, error)
            self._set_state(reporter.run_id, "failed", **{"sparsezoo.error": error})
            raise RuntimeError(f"trial {trial.number}: {error}")
        self._set_state(reporter.run_id, "complete")
        return values[0] if len(values) == 1 else values


def _parent_run(
    sweep: Sweep, study: optuna.Study, created: bool, client: MlflowClient, storage: str
) -> str:
    """The study's MLflow parent run: the one its user attributes name, else a new one.

    Only the worker that created the study creates the parent run; a worker joining a brand-new
    study waits a moment for it, so concurrent workers share one parent.
    """
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    deadline = time.monotonic() + PARENT_WAIT_S
    while run_id is None and not created and not study.trials and time.monotonic() < deadline:
        time.sleep(0.5)
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id is not None:
        try:
            client.get_run(run_id)
        except MlflowException:
            log.warning(
                "parent run %s of study %s is not in this store; new parent",
                run_id,
                study.study_name,
            )
            run_id = None
    if run_id is None:
        settings = sweep.settings
        tags = {
            "sparsezoo.kind": "sweep",
            "sparsezoo.study": settings.name,
            "sparsezoo.storage": storage,
            "sparsezoo.mechanism": ",".join(sorted(sweep.space.reachable_mechanisms(sweep.base))),
        }
        run_id = tracking.create_run(client, sweep.base.experiment, settings.name, tags)
        params = {
            **flatten(sweep.base),
            "sweep.objectives": ",".join(settings.objectives),
            "sweep.directions": ",".join(settings.directions),
            "sweep.sampler": repr(settings.sampler),
            "sweep.pruner": repr(settings.pruner),
            **{f"sweep.space.{p.path}": repr(p.distribution()) for p in sweep.space.params},
            **{f"sweep.constraint.{i}": c.expr for i, c in enumerate(sweep.space.constraints)},
        }
        tracking.log_params(client, run_id, params)
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
    client.update_run(run_id, status="RUNNING")
    client.log_artifact(run_id, str(sweep.path))
    return run_id


def _open_study(sweep: Sweep, storage: optuna.storages.BaseStorage) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when it exists (``load_if_exists``, but knowing which).

    Returns the study and whether this call created it. An existing study must have the
    sweep's objective directions.
    """
    settings = sweep.settings
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=settings.name,
            directions=settings.directions,
            pruner=settings.make_pruner(),
        )
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(
            study_name=settings.name, storage=storage, pruner=settings.make_pruner()
        )
        created = False
    existing = [d.name.lower() for d in study.directions]
    if existing != settings.directions:
        raise ConfigError(
            f"study {settings.name!r} exists with directions {existing}, but objectives "
            f"{list(settings.objectives)} need {settings.directions}; use --study NEW_NAME"
        )
    # the first ask of this worker; every trial then reseeds (SweepObjective.__call__)
    study.sampler = settings.make_sampler(seed_offset=len(study.trials))
    return study, created


def _log_study_artifacts(
    sweep: Sweep, study: optuna.Study, client: MlflowClient, parent: str
) -> Path:
    """Write the study's plots and files locally and log them on the parent run."""
    settings = sweep.settings
    out_dir = Path(sweep.base.output_dir) / sweep.base.experiment / f"sweep-{settings.name}"
    seed = int(settings.sampler.get("seed", 0))
    plots = write_plots(study, settings.objectives, settings.prunes, out_dir / PLOTS_DIR, seed)
    for path in plots:
        client.log_artifact(parent, str(path), PLOTS_DIR)
    for path in write_study_files(study, settings.objectives, out_dir, sweep.config_yaml):
        client.log_artifact(
            parent, str(path), PARETO_DIR if path.parent.name == PARETO_DIR else None
        )
    return out_dir


def _log_study_metrics(
    study: optuna.Study, sweep: Sweep, client: MlflowClient, parent: str
) -> dict[str, int]:
    """Trial counts by state and the best value(s) as metrics on the parent run."""
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[trial_state(t)] = states.get(trial_state(t), 0) + 1
    step = len(study.trials)
    for state, count in states.items():
        client.log_metric(parent, f"trials/{state}", count, step=step)
    best = best_trials(study)
    for i, metric in enumerate(sweep.settings.objectives):
        if best:
            client.log_metric(parent, f"best/{metric}", best[0].values[i], step=step)
    return states


def run_sweep(
    path: str | Path,
    n_trials: int | None = None,
    *,
    study_trials: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    overrides: Sequence[str] = (),
    timeout: float | None = None,
) -> SweepResult:
    """Run trials of the study a sweep YAML describes; see the module docs.

    Give exactly one of ``n_trials`` (trials this call runs) and ``study_trials`` (run until
    the study holds that many finished trials, sharing the work with every other worker on it:
    :mod:`sparsezoo.sweep_budget`).

    Every input problem raises ConfigError (or TrackingError) before any trial. A trial whose
    training fails is recorded FAIL with its error and the study goes on. KeyboardInterrupt
    ends the current trial (FAIL, MLflow run KILLED) and returns with ``interrupted``; running
    the same command again continues the study.
    """
    if (n_trials is None) == (study_trials is None):
        raise ConfigError("give exactly one of --n-trials and --study-trials")
    for flag, value in (("--n-trials", n_trials), ("--study-trials", study_trials)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}={value} must be >= 1")
    sweep = load_sweep(path, overrides, storage=storage, study_name=study_name)
    settings = sweep.settings
    uri = tracking.resolve_tracking_uri(sweep.base.tracking.uri)
    tracking.check_tracking(uri)
    shown = display_storage(settings.storage)
    with warnings.catch_warnings():
        # heartbeats and the retry callback are marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        handler = (
            StaleTrialHandler(uri, settings.heartbeat.max_retry) if settings.heartbeat else None
        )
        study_storage = open_storage(settings.storage, settings.heartbeat, handler)
        study, created = _open_study(sweep, study_storage)
        client = MlflowClient(uri)
        parent = _parent_run(sweep, study, created, client, shown)
        log.info(
            "study %s (%s, %d trials so far), MLflow parent run %s in %s",
            settings.name,
            shown,
            len(study.trials),
            parent,
            uri,
        )
        objective = SweepObjective(sweep, study, client, parent, study_trials)
        interrupted = False

        def optimize(n: int | None, seconds: float | None) -> None:
            study.optimize(
                objective, n_trials=n, timeout=seconds, catch=(Exception,), gc_after_trial=True
            )

        try:
            if study_trials is None:
                optimize(n_trials, timeout)
            else:
                beats = settings.heartbeat is not None and isinstance(study_storage, RDBStorage)
                run_until(
                    study,
                    lambda: optimize(1, None),
                    study_trials,
                    timeout=timeout,
                    heartbeats=beats,
                )
        except KeyboardInterrupt:
            interrupted = True
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if interrupted:
        if not running:
            client.set_terminated(parent, "KILLED")
        out_dir = Path(sweep.base.output_dir) / sweep.base.experiment / f"sweep-{settings.name}"
    else:
        out_dir = _log_study_artifacts(sweep, study, client, parent)
        if not running:
            client.set_terminated(parent, "FINISHED")
    states = _log_study_metrics(study, sweep, client, parent)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    failed = sum(1 for n in objective.trials_run if trials[n].state == TrialState.FAIL)
    return SweepResult(
        study_name=settings.name,
        storage=shown,
        experiment=sweep.base.experiment,
        parent_run_id=parent,
        objectives=settings.objectives,
        trials_run=objective.trials_run,
        states=states,
        best=best_trials(study),
        artifact_dir=out_dir,
        failed_this_run=failed,
        interrupted=interrupted,
    )


def print_sweep(result: SweepResult) -> None:
    """Print the study's trial counts, its parent run and its best trial(s) as a table."""
    con = console()
    counts = ", ".join(f"{n} {state}" for state, n in sorted(result.states.items()))
    con.print(
        f"[bold]study[/bold] {result.study_name} ({result.storage}): {counts}; "
        f"this call ran {len(result.trials_run)} trial(s)"
    )
    con.print(
        f"MLflow parent run {result.parent_run_id} in experiment {result.experiment}; "
        f"study artifacts in {result.artifact_dir}"
    )
    if not result.best:
        con.print("no completed trial yet")
        return
    title = "best trial" if len(result.objectives) == 1 else "Pareto front"
    table = Table(title=title, title_justify="left", expand=False)
    for col in ("trial", *result.objectives, "params"):
        table.add_column(col)
    for trial in result.best:
        params = "  ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items()
        )
        table.add_row(str(trial.number), *(f"{v:.4f}" for v in trial.values), params)
    con.print(table)
