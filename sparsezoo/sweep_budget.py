"""A study-wide trial budget shared by any number of sweep workers.

``sparsezoo sweep FILE --study-trials N`` runs trials until the study holds N finished trials
(COMPLETE or PRUNED), however many workers on however many machines join it. Optuna's own
``n_trials`` counts per process, and its ``MaxTrialsCallback`` lets racing workers overshoot;
here the budget is decided by trial number, which the storage assigns atomically:

- the budget's slots are the first N trials, by number, that did not fail (a failed trial, e.g.
  one whose worker died, frees its slot; its heartbeat retry is a new trial that takes one);
- a trial beyond the slots is *surplus*: it ends FAIL before sampling or training anything, with
  the ``surplus`` user attribute, and is not counted as a failure of the sweep;
- a worker with nothing to start waits while other workers' trials run, failing stale ones by
  heartbeat as it polls, so a study whose worker died still completes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import optuna
from optuna.trial import TrialState

log = logging.getLogger(__name__)

SURPLUS_ATTR = "surplus"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class SurplusTrial(Exception):
    """Raised by the objective for a trial beyond the budget (Optuna records it FAIL)."""


def finished_count(study: optuna.Study) -> int:
    """Trials that count toward the budget as done: COMPLETE or PRUNED."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def is_surplus(study: optuna.Study, number: int, budget: int) -> bool:
    """Whether trial ``number`` lies beyond the first ``budget`` trials that did not fail."""
    ahead = sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.number < number and t.state != TrialState.FAIL
    )
    return ahead >= budget


def run_until(
    study: optuna.Study,
    run_one: Callable[[], None],
    budget: int,
    *,
    timeout: float | None = None,
    poll_s: float = 2.0,
    heartbeats: bool = True,
) -> None:
    """Start trials with ``run_one`` until the study has ``budget`` finished trials.

    Returns early when ``timeout`` seconds have passed (no new trial starts after it). While
    every remaining slot is held by another worker's running trial it polls every ``poll_s``
    seconds; on storages with ``heartbeats`` each poll fails the trials whose worker stopped
    beating (their retries are queued as WAITING trials, which this worker then runs). Without
    heartbeats (a journal file) a dead worker's trial cannot be told from a slow one, so the
    wait says so once: such a trial holds its slot until someone marks it failed.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    waiting_logged = False
    while deadline is None or time.monotonic() < deadline:
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        done = sum(1 for t in trials if t.state in FINISHED)
        if done >= budget:
            return
        running = sum(1 for t in trials if t.state == TrialState.RUNNING)
        queued = any(t.state == TrialState.WAITING for t in trials)
        if queued or done + running < budget:
            run_one()
            waiting_logged = False
            continue
        if not waiting_logged:
            log.info(
                "study %s: %d/%d trials finished, %d running elsewhere; waiting",
                study.study_name,
                done,
                budget,
                running,
            )
            if not heartbeats:
                log.warning(
                    "study %s: this storage has no heartbeats, so a trial whose worker died "
                    "stays RUNNING and keeps its slot; use an RDB storage (sqlite:///, "
                    "postgresql://) for crash-safe shared budgets",
                    study.study_name,
                )
            waiting_logged = True
        time.sleep(poll_s)
