"""Study artifacts of a sweep: plots, the trials table and the best config(s) as YAML.

Written into a local directory and logged on the study's MLflow parent run after each worker
finishes, so the parent always shows the study as of its latest worker: optimization history and
parameter importances per objective, intermediate validation losses when the study prunes, the
Pareto front when it has several objectives, ``trials.csv``, and ``best_config.yaml`` (plus
``pareto/trial_<n>.yaml`` for every Pareto-optimal trial), each ready for ``sparsezoo train``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import optuna
from matplotlib.axes import Axes
from optuna.importance import FanovaImportanceEvaluator
from optuna.trial import FrozenTrial, TrialState
from optuna.visualization import matplotlib as optuna_plots

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"
PARETO_DIR = "pareto"
BEST_CONFIG = "best_config.yaml"
TRIALS_CSV = "trials.csv"


def metric_slug(metric: str) -> str:
    """``val/loss`` -> ``val_loss``, for file names."""
    return metric.replace("/", "_")


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial (one objective) or the Pareto-optimal trials, best first objective first."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1.0
    return sorted(study.best_trials, key=lambda t: sign * t.values[0])


def _save(ax: Axes, path: Path) -> Path:
    """Save the figure an Optuna matplotlib plot drew into and release it."""
    fig = ax.figure
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(
    study: optuna.Study, objectives: Sequence[str], prunes: bool, out_dir: Path, seed: int = 0
) -> list[Path]:
    """Draw the study's plots into ``out_dir``; a plot the study cannot have yet is skipped.

    Parameter importances need two completed trials with a varying parameter in common, so a
    young study has none; the skip is logged, never raised.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    multi = len(objectives) > 1
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    files: list[Path] = []
    with warnings.catch_warnings():
        # the matplotlib backend of optuna.visualization is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for i, metric in enumerate(objectives):
            target: Callable[[FrozenTrial], float] | None = (
                (lambda t, i=i: t.values[i]) if multi else None
            )
            slug = metric_slug(metric)
            ax = optuna_plots.plot_optimization_history(study, target=target, target_name=metric)
            files.append(_save(ax, out_dir / f"optimization_history_{slug}.png"))
            if len(completed) < 2:
                log.info("parameter importances need 2 completed trials; skipped")
                continue
            try:
                ax = optuna_plots.plot_param_importances(
                    study,
                    evaluator=FanovaImportanceEvaluator(seed=seed),
                    target=target,
                    target_name=metric,
                )
            except (ValueError, RuntimeError) as exc:
                log.info("parameter importances for %s skipped: %s", metric, exc)
                plt.close("all")
                continue
            files.append(_save(ax, out_dir / f"param_importances_{slug}.png"))
        if multi:
            ax = optuna_plots.plot_pareto_front(study, target_names=list(objectives))
            files.append(_save(ax, out_dir / "pareto_front.png"))
        if prunes:
            ax = optuna_plots.plot_intermediate_values(study)
            files.append(_save(ax, out_dir / "intermediate_values.png"))
    return files


def write_study_files(
    study: optuna.Study,
    objectives: Sequence[str],
    out_dir: Path,
    config_yaml: Callable[[FrozenTrial], str],
) -> list[Path]:
    """``trials.csv`` and the best config(s) as YAML (``config_yaml`` renders one trial's)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / TRIALS_CSV]
    study.trials_dataframe().to_csv(files[0], index=False)
    best = best_trials(study)
    for rank, trial in enumerate(best):
        values = ", ".join(f"{m}={v:.6g}" for m, v in zip(objectives, trial.values, strict=True))
        header = (
            f"# trial {trial.number} of study {study.study_name}: {values}\n"
            f"# run it: sparsezoo train <this file>\n"
        )
        text = header + config_yaml(trial)
        if rank == 0:
            files.append(out_dir / BEST_CONFIG)
            files[-1].write_text(text)
        if len(objectives) > 1:
            (out_dir / PARETO_DIR).mkdir(exist_ok=True)
            files.append(out_dir / PARETO_DIR / f"trial_{trial.number}.yaml")
            files[-1].write_text(text)
    return files
