"""Running eval suites on a model or on a trained run, and recording the results in MLflow.

:func:`evaluate_model` runs the suites named by ``cfg.eval.suites`` on a model in memory (the
end-of-training hook calls it) and logs metrics, figures and ``results.json`` into a run.
:func:`evaluate` is ``sparsezoo eval``: it resolves a run reference (an MLflow run id, a run
directory or a checkpoint inside one), rebuilds the model from the run's saved config and
checkpoint, and logs into the evaluated run (so an ablation's report picks up the ``eval/*``
metrics) or, with ``new_run``, into a new run tagged ``sparsezoo.kind=eval`` and linked to it
by the ``sparsezoo.evaluated_run`` tag. Test-time knobs (``attention.params.<mechanism>.<key>``
overrides, e.g. more selected blocks than the model trained with) score a model the run did not
train as such, so their results always go into a new eval run tagged with the knobs, and their
files into a folder of their own: the trained run's own ``eval/*`` numbers stay its own.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sparsezoo import tracking
from sparsezoo.config import (
    EVAL_SUITES,
    ConfigError,
    ExperimentConfig,
    flatten,
    load_config,
    parse_layer_spec,
)
from sparsezoo.eval import extrapolation, loss_by_position, mqar, passkey
from sparsezoo.eval.core import EvalContext, SuiteOutput
from sparsezoo.model import SparseLM
from sparsezoo.train import CONFIG_FILE, RUN_FILE, mechanism_tag, prepare_run_data

log = logging.getLogger(__name__)

SUITES: dict[str, Callable[[EvalContext], SuiteOutput]] = {
    "passkey": passkey.run,
    "mqar": mqar.run,
    "loss_by_position": loss_by_position.run,
    "extrapolation": extrapolation.run,
}

ARTIFACT_DIR = "eval"
RESULTS_FILE = "results.json"
TAG_EVALUATED = "sparsezoo.evaluated_run"
TAG_SUITES = "sparsezoo.eval.suites"
TAG_CANNOT_RUN = "sparsezoo.eval.cannot_run"
TAG_KNOBS = "sparsezoo.eval.knobs"
KNOB_PREFIX = "attention.params."
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


class EvalError(ConfigError):
    """A run reference that does not lead to a trained model; the message says what to pass.

    A ConfigError, because like a bad config value it is the user's input to fix (exit 2).
    """


@dataclass
class EvalResult:
    """What an evaluation produced: metrics, lengths skipped with the reason, files written."""

    metrics: dict[str, float]
    skipped: dict[str, str]
    files: list[Path]
    run_id: str | None
    step: int = 0


def evaluate_model(
    model: SparseLM,
    cfg: ExperimentConfig,
    *,
    out_dir: Path,
    val_path: Callable[[], Path],
    step: int = 0,
    client: MlflowClient | None = None,
    run_id: str | None = None,
) -> EvalResult:
    """Run ``cfg.eval.suites`` (names of :data:`SUITES`) on ``model``; write figures and
    results into ``out_dir``.

    ``val_path`` gives the held-out token file (called only when loss_by_position runs). With
    ``client`` and ``run_id`` the metrics (at ``step``), the files (under ``eval/``) and tags
    naming the suites and any length a mechanism cannot run at go into that run. The model
    runs on ``eval.device`` (the end-of-training hook passes the trained model wherever the
    trainer left it: Lightning's teardown moves it to the CPU).
    """
    ctx = EvalContext(model.to(eval_device(cfg)), cfg, val_path, mechanism_tag(cfg))
    total = SuiteOutput()
    for name in cfg.eval.suites:
        log.info("eval %s: %s", ctx.label, name)
        out = SUITES[name](ctx)
        total.metrics |= out.metrics
        total.figures |= out.figures
        total.skipped |= out.skipped
    for key, why in total.skipped.items():
        log.warning("eval %s skipped: %s", key, why)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for stem, fig in total.figures.items():
        files.append(out_dir / f"{stem}.png")
        fig.savefig(files[-1], dpi=110, bbox_inches="tight")
    files.append(out_dir / RESULTS_FILE)
    results = _update_results(files[-1], cfg.eval.suites, step, total)
    if client is not None and run_id is not None:
        _log(client, run_id, total.metrics, files, step, results, cfg.eval.suites)
    return EvalResult(total.metrics, total.skipped, files, run_id, step)


def _prefixes(suites: Sequence[str]) -> tuple[str, ...]:
    """The metric-name prefixes of the suites, ``eval/<suite>/``."""
    return tuple(f"eval/{name}/" for name in suites)


def _update_results(
    path: Path, suites: Sequence[str], step: int, out: SuiteOutput
) -> dict[str, dict[str, Any]]:
    """Write this evaluation into ``results.json``, keeping what other suites wrote there.

    The file holds the run's latest result of every suite evaluated so far (``suites`` maps a
    suite to the training step it scored): a suite that runs again replaces its own entries.
    Returns the file's new content.
    """
    results = {"suites": {}, "metrics": {}, "cannot_run": {}}
    if path.is_file():
        results = json.loads(path.read_text())
    rerun = _prefixes(suites)
    for section, new in (("metrics", out.metrics), ("cannot_run", out.skipped)):
        kept = {k: v for k, v in results[section].items() if not k.startswith(rerun)}
        results[section] = kept | new
    results["suites"] |= dict.fromkeys(suites, step)
    path.write_text(json.dumps(results, indent=2, sort_keys=True))
    return results


def _log(
    client: MlflowClient,
    run_id: str,
    metrics: dict[str, float],
    files: list[Path],
    step: int,
    results: dict[str, dict[str, Any]],
    suites: Sequence[str],
) -> None:
    """One evaluation's metrics and files into an MLflow run; tags from all its results.

    A rerun of a suite on another grid leaves metrics of the earlier grid in the run, which
    MLflow cannot delete: they are logged NaN at this step, so the run's latest values are
    this evaluation's, as in ``results.json`` (an ablation report would otherwise mix the
    two grids). The tags name every suite evaluated so far and every length a mechanism
    cannot run at (the tag goes away when a rerun finds none).
    """
    now_ms = int(time.time() * 1000)
    before = client.get_run(run_id).data
    rerun = _prefixes(suites)
    stale = [k for k in before.metrics if k.startswith(rerun) and k not in metrics]
    logged = metrics | dict.fromkeys(stale, math.nan)
    batch = [Metric(k, v, now_ms, step) for k, v in sorted(logged.items())]
    for i in range(0, len(batch), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=batch[i : i + _METRICS_PER_BATCH])
    for path in files:
        client.log_artifact(run_id, str(path), ARTIFACT_DIR)
    tags = {TAG_SUITES: ",".join(sorted(results["suites"]))}
    cannot_run = results["cannot_run"]
    if cannot_run:
        tags[TAG_CANNOT_RUN] = "; ".join(f"{k}: {why}" for k, why in cannot_run.items())
    elif TAG_CANNOT_RUN in before.tags:
        client.delete_tag(run_id, TAG_CANNOT_RUN)
    tracking.set_tags(client, run_id, tags)


@dataclass
class EvalTarget:
    """A trained model to evaluate: its config, checkpoint, run directory and MLflow run."""

    cfg: ExperimentConfig
    checkpoint: Path
    run_dir: Path
    run_id: str | None
    tracking_uri: str
    knobs: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """The knobs as a short file-name-safe label (``nsa.n_select=5``); empty without knobs."""
        short = (k.removeprefix(KNOB_PREFIX) for k in self.knobs)
        return re.sub(r"[^A-Za-z0-9._=+-]", "-", "+".join(short))

    def out_dir(self, eval_run_id: str | None = None) -> Path:
        """Where the files of an evaluation go, given the run its metrics go into.

        ``<run dir>/eval`` when they go into the evaluated run itself (or nowhere, or into a
        new run of a run trained without tracking, which has no results of its own there);
        ``<run dir>/eval/<knobs>`` for test-time knobs; ``<run dir>/eval/<eval run id>`` for
        a new eval run of a tracked run, whose own ``eval/`` holds the trained run's results.
        """
        base = self.run_dir / ARTIFACT_DIR
        if self.knobs:
            return base / self.label
        if eval_run_id is not None and self.run_id is not None and eval_run_id != self.run_id:
            return base / eval_run_id
        return base


def parse_suites(values: Sequence[str]) -> list[str]:
    """Suite names from ``--suite`` values, each a name or a comma-separated list."""
    names = [n.strip() for value in values for n in value.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--suite needs at least one of: {', '.join(EVAL_SUITES)}")
    return names


def resolve_target(
    reference: str,
    suites: Sequence[str],
    overrides: Sequence[str] = (),
    tracking_uri: str | None = None,
) -> EvalTarget:
    """Find the run behind ``reference`` and compose its config for these suites.

    ``reference`` is a checkpoint file inside a run directory, a run directory (its
    ``checkpoints/last.ckpt``), or an MLflow run id looked up in ``tracking_uri`` (default:
    ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``) whose run directory is then found
    from its config. ``overrides`` are ``eval.<key>=value`` settings and test-time knobs
    (``attention.params.<mechanism>.<key>=value`` of a mechanism the run's layers use); the
    rest of the model is the run's. Raises EvalError or ConfigError naming what is wrong.
    """
    for item in overrides:
        if "=" not in item or not item.startswith(("eval.", KNOB_PREFIX)):
            raise ConfigError(
                f"bad setting {item!r}: sparsezoo eval takes eval.<key>=value settings "
                "(e.g. eval.passkey.samples=8) and attention.params.<mechanism>.<knob>=value "
                "test-time knobs (e.g. attention.params.nsa.n_select=5); the rest of the model "
                "and the data are the run's own"
            )
    path = Path(reference)
    if path.exists():
        run_dir = path.parent.parent if path.is_file() else path
        checkpoint = path if path.is_file() else run_dir / "checkpoints" / "last.ckpt"
    elif _RUN_ID.fullmatch(reference):
        run_dir = _run_dir_of(reference, tracking.resolve_tracking_uri(tracking_uri))
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
    else:
        raise EvalError(
            f"run reference {reference!r} is not a checkpoint file, a run directory or an "
            "MLflow run id (32 hex digits)"
        )
    if not (run_dir / CONFIG_FILE).is_file():
        raise EvalError(f"{reference}: no {CONFIG_FILE} in {run_dir} (not a run directory)")
    if not checkpoint.is_file():
        raise EvalError(f"{reference}: no checkpoint at {checkpoint}")
    record_path = run_dir / RUN_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    suites_override = f"eval.suites=[{','.join(suites)}]"
    cfg = load_config(run_dir / CONFIG_FILE, [*overrides, suites_override])
    knobs = tuple(item for item in overrides if item.startswith(KNOB_PREFIX))
    _check_knobs(knobs, cfg)
    uri = tracking.resolve_tracking_uri(
        tracking_uri or record.get("tracking_uri") or cfg.tracking.uri
    )
    return EvalTarget(cfg, checkpoint, run_dir, record.get("run_id"), uri, knobs)


def _tracking_client(target: EvalTarget) -> MlflowClient | None:
    """The client of the evaluated run's store (None when its config disables tracking),
    checked before anything is computed or written: the store answers and holds the run."""
    if not target.cfg.tracking.enabled:
        return None
    tracking.check_tracking(target.tracking_uri)
    client = MlflowClient(target.tracking_uri)
    if target.run_id is not None:
        try:
            client.get_run(target.run_id)
        except MlflowException as exc:
            raise EvalError(
                f"{target.run_dir / RUN_FILE} names MLflow run {target.run_id}, which is not in "
                f"the tracking store {target.tracking_uri}; pass --tracking-uri with the store "
                "it was trained in"
            ) from exc
    return client


def _check_knobs(knobs: Sequence[str], cfg: ExperimentConfig) -> None:
    """Each test-time knob must belong to a mechanism some layer of the run uses.

    A knob of another mechanism would change nothing the model computes, and its eval run
    would then claim an effect that was never applied.
    """
    used = sorted(
        set(parse_layer_spec(cfg.attention.layers, cfg.attention.mechanism, cfg.model.n_layers))
    )
    for knob in knobs:
        mechanism = knob.removeprefix(KNOB_PREFIX).split(".", 1)[0]
        if mechanism not in used:
            raise ConfigError(
                f"bad setting {knob!r}: this run's layers use {', '.join(used)}, so only "
                f"{' or '.join(KNOB_PREFIX + m + '.<knob>' for m in used)} knobs change its model"
            )


def _run_dir_of(run_id: str, uri: str) -> Path:
    """The local run directory of an MLflow training run (``output_dir/experiment/run_name``)."""
    tracking.check_tracking(uri)
    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException as exc:
        raise EvalError(f"no MLflow run {run_id} in {uri}") from exc
    params = run.data.params
    if "output_dir" not in params or "experiment" not in params:
        raise EvalError(f"MLflow run {run_id} is not a sparsezoo training run (no config params)")
    run_dir = Path(params["output_dir"]) / params["experiment"] / run.info.run_name
    if not run_dir.is_dir():
        raise EvalError(
            f"MLflow run {run_id}: its run directory {run_dir} (with the checkpoint) is not here; "
            "pass the run directory or checkpoint path instead"
        )
    return run_dir


def load_model(target: EvalTarget, device: torch.device) -> tuple[SparseLM, int]:
    """The run's model with the checkpoint's weights on ``device``, and the checkpoint's step.

    Test-time knobs that change the shape of a weight (a compression block size, say) make the
    checkpoint not fit: the error then names them.
    """
    try:
        ckpt = torch.load(target.checkpoint, map_location="cpu", weights_only=True)
        state = {
            k.removeprefix("model."): v
            for k, v in ckpt["state_dict"].items()
            if k.startswith("model.")
        }
        model = SparseLM.from_config(target.cfg)
        model.load_state_dict(state)
    except (OSError, EOFError, KeyError, RuntimeError, TypeError, pickle.UnpicklingError) as exc:
        knobs = (
            f" with {' '.join(target.knobs)} (only knobs that keep the weights' shapes can "
            "change at test time)"
            if target.knobs
            else ""
        )
        raise EvalError(
            f"{target.checkpoint}: not a checkpoint of this run's model{knobs} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from exc
    return model.to(device).eval(), int(ckpt.get("global_step", 0))


def eval_device(cfg: ExperimentConfig) -> torch.device:
    """``eval.device``: ``auto`` is CUDA when available, else CPU."""
    if cfg.eval.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.eval.device)


def evaluate(
    reference: str,
    suites: Sequence[str],
    overrides: Sequence[str] = (),
    *,
    tracking_uri: str | None = None,
    new_run: bool = False,
) -> EvalResult:
    """``sparsezoo eval``: evaluate a trained run and record the results in MLflow.

    Files go to ``<run dir>/eval/``. Metrics go into the evaluated run, or with ``new_run``
    (and for runs trained without tracking) into a new ``sparsezoo.kind=eval`` run of the same
    experiment tagged with the evaluated run, whose files then go to
    ``<run dir>/eval/<eval run id>/`` when the evaluated run has an MLflow run of its own;
    nothing is logged when the run's config disables tracking. Test-time knobs imply
    ``new_run``: that run carries the knobs as a tag (and in its params), and the files go to
    ``<run dir>/eval/<knobs>/``.
    """
    target = resolve_target(reference, suites, overrides, tracking_uri)
    cfg = target.cfg
    client = _tracking_client(target)
    model, step = load_model(target, eval_device(cfg))
    bundle: list[Path] = []

    def val_path() -> Path:
        if not bundle:
            bundle.append(prepare_run_data(cfg).val_path)
        return bundle[0]

    def run(client: MlflowClient | None, run_id: str | None, out_dir: Path) -> EvalResult:
        return evaluate_model(
            model,
            cfg,
            out_dir=out_dir,
            val_path=val_path,
            step=step,
            client=client,
            run_id=run_id,
        )

    if client is None:
        return run(None, None, target.out_dir())
    if target.run_id is not None and not new_run and not target.knobs:
        return run(client, target.run_id, target.out_dir(target.run_id))
    tags = {
        "sparsezoo.kind": "eval",
        "sparsezoo.mechanism": mechanism_tag(cfg),
        TAG_EVALUATED: target.run_id or str(target.run_dir.resolve()),
    }
    if target.knobs:
        tags[TAG_KNOBS] = " ".join(target.knobs)
    name = "-".join(filter(None, ("eval", target.run_dir.name, target.label)))
    run_id = tracking.create_run(client, cfg.experiment, name, tags)
    tracking.log_params(client, run_id, flatten(cfg))
    with tracking.run_status(client, run_id):
        return run(client, run_id, target.out_dir(run_id))
