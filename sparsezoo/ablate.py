"""``sparsezoo ablate``: a grid of training runs under one MLflow parent run, then a report.

An ablation file is an experiment config (``include:`` plus any ExperimentConfig keys: the base
every point shares, including data, token budget and evaluation) with one ``ablation:`` section::

    ablation:
      name: quickstart                  # default: the file's stem
      mechanisms: [dense, nsa, moba]    # default: the base config's attention.mechanism
      params:                           # knob axes, crossed only with their own mechanism
        nsa: {window: [16, 32]}
      axes:                             # shared axes (config dot paths), crossed with all
        data.seq_len: [256, 512]
      seeds: [0, 1]                     # default: the base config's seed

A grid point is a mechanism, one value per knob axis of that mechanism, one value per shared
axis and a seed; it trains as a child run nested under the ablation's parent run, tagged with
the ablation name, its mechanism and its grid coordinates. When ``data.seq_len`` is an axis the
batch size is scaled so that every point trains on the base config's tokens per step (the same
token budget). Every point's config is composed and validated before anything trains. A failing
point is recorded as a failed child with its error and the rest go on; ``resume`` reuses the
latest parent run of the same ablation and skips points that already finished. At the end the
report (:mod:`sparsezoo.ablation_report`) is printed and logged on the parent run.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from omegaconf import DictConfig

from sparsezoo import tracking
from sparsezoo.config import ConfigError, ExperimentConfig, compose, split_study_file

log = logging.getLogger("sparsezoo")

SECTION_KEYS = ("name", "mechanisms", "params", "axes", "seeds")
# tags of an ablation's parent run and of each child
TAG_ABLATION = "sparsezoo.ablation"
TAG_POINT = "sparsezoo.point"
TAG_GRID = "sparsezoo.grid."


@dataclass(frozen=True)
class GridPoint:
    """One training run of an ablation: its coordinates and the overrides that produce it.

    ``coords`` maps an axis name (``mechanism``, ``<mechanism>.<knob>``, a shared axis's dot
    path, ``seed``) to its value; ``key`` is their canonical text, stable across runs, used to
    recognise finished points when resuming.
    """

    coords: tuple[tuple[str, Any], ...]
    overrides: tuple[str, ...]

    @property
    def key(self) -> str:
        """Canonical ``axis=value`` list, e.g. ``mechanism=nsa,nsa.window=16,seed=0``."""
        return ",".join(f"{axis}={value}" for axis, value in self.coords)

    @property
    def mechanism(self) -> str:
        """The point's mechanism axis value."""
        return str(dict(self.coords)["mechanism"])


@dataclass
class Ablation:
    """A parsed ablation: its name, the base config source, grid points and their configs."""

    name: str
    base: DictConfig
    overrides: tuple[str, ...]
    points: list[GridPoint]
    configs: list[ExperimentConfig]

    @property
    def experiment(self) -> str:
        """The MLflow experiment every run of the ablation goes to."""
        return self.configs[0].experiment


def _values(section: str, axis: str, values: Any) -> list[Any]:
    """An axis's values: a non-empty list of scalars, else ConfigError naming the axis."""
    if not isinstance(values, list) or not values:
        raise ConfigError(
            f"ablation.{section}.{axis}: an axis needs a non-empty list of values, got {values!r}"
        )
    for value in values:
        if isinstance(value, dict | list):
            raise ConfigError(f"ablation.{section}.{axis}: values must be scalars, got {value!r}")
    return values


def _format(value: Any) -> str:
    """A value as it appears in an override (``key=value``) and in coordinates."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _grid(section: dict[str, Any], base: ExperimentConfig) -> list[GridPoint]:
    """Every grid point of the section, mechanisms outermost and seeds innermost."""
    mechanisms = section.get("mechanisms", [base.attention.mechanism])
    mechanisms = _values("mechanisms", "", mechanisms) if "mechanisms" in section else mechanisms
    params = section.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"ablation.params must map a mechanism to knob axes, got {params!r}")
    for mech in params:
        if mech not in mechanisms:
            raise ConfigError(
                f"ablation.params.{mech}: {mech!r} is not in ablation.mechanisms "
                f"({', '.join(map(str, mechanisms))})"
            )
    axes = section.get("axes") or {}
    if not isinstance(axes, dict):
        raise ConfigError(f"ablation.axes must map config paths to value lists, got {axes!r}")
    for path in axes:
        if path in ("seed", "attention.mechanism"):
            raise ConfigError(
                f"ablation.axes.{path}: use ablation.{'seeds' if path == 'seed' else 'mechanisms'}"
            )
    seeds = _values("seeds", "", section["seeds"]) if "seeds" in section else [base.seed]
    shared = [(path, _values("axes", path, v)) for path, v in axes.items()]
    points = []
    for mech in mechanisms:
        knobs = params.get(mech) or {}
        if not isinstance(knobs, dict):
            raise ConfigError(f"ablation.params.{mech} must map knobs to value lists")
        own = [(knob, _values(f"params.{mech}", knob, v)) for knob, v in knobs.items()]
        names = [f"{mech}.{knob}" for knob, _ in own] + [path for path, _ in shared]
        paths = [f"attention.params.{mech}.{knob}" for knob, _ in own] + [p for p, _ in shared]
        lists = [v for _, v in own] + [v for _, v in shared]
        for combo in itertools.product(*lists):
            for seed in seeds:
                coords = (("mechanism", mech), *zip(names, combo, strict=True), ("seed", seed))
                overrides = (
                    f"attention.mechanism={mech}",
                    *(f"{p}={_format(v)}" for p, v in zip(paths, combo, strict=True)),
                    f"seed={seed}",
                )
                points.append(GridPoint(coords, overrides))
    return points


def _budget_override(point: GridPoint, base: ExperimentConfig) -> list[str]:
    """A batch size giving the base config's tokens per step when the point changes seq_len."""
    seq_len = dict(point.coords).get("data.seq_len")
    if seq_len is None or int(seq_len) == base.data.seq_len:
        return []
    tokens = base.train.batch_size * base.data.seq_len
    if tokens % int(seq_len):
        raise ConfigError(
            f"ablation.axes.data.seq_len: {seq_len} does not divide the base tokens per step "
            f"{tokens} (train.batch_size x data.seq_len), so the token budget cannot be kept"
        )
    return [f"train.batch_size={tokens // int(seq_len)}"]


def load_ablation(path: str | Path, overrides: Sequence[str] = ()) -> Ablation:
    """Parse an ablation file and compose + validate every grid point's config.

    ``overrides`` (``key=value``) apply to the base config of every point, under the point's own
    coordinates; those under ``ablation.`` edit the grid itself (``ablation.seeds=[0,1]``).
    Raises ConfigError naming the offending key or value for an unknown section key, an empty
    grid or axis, an axis that is not a config path, or any point whose config is invalid —
    before anything trains.
    """
    base, section, base_overrides = split_study_file(path, "ablation", overrides, ("axes",))
    unknown = sorted(set(section) - set(SECTION_KEYS))
    if unknown:
        raise ConfigError(
            f"ablation: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(SECTION_KEYS)}"
        )
    name = str(section.get("name") or Path(path).stem)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"ablation.name {name!r}: use letters, digits, '_', '-' and '.' only")
    base_cfg = compose([base], base_overrides)
    points = _grid(section, base_cfg)
    configs = []
    for point in points:
        try:
            extra = [*point.overrides, *_budget_override(point, base_cfg)]
            cfg = compose([base], [*base_overrides, *extra])
        except ConfigError as exc:
            raise ConfigError(f"ablation point {point.key}: {exc}") from exc
        cfg.run_name = f"{name}-{len(configs):03d}-{re.sub(r'[^A-Za-z0-9_.=-]+', '_', point.key)}"
        configs.append(cfg)
    return Ablation(name, base, tuple(overrides), points, configs)


def _parent_run(
    client: MlflowClient, ablation: Ablation, resume: bool
) -> tuple[str, dict[str, str]]:
    """The parent run (reused when resuming) and, for resume, its finished points' run ids."""
    experiment = client.get_experiment_by_name(ablation.experiment)
    if resume and experiment is not None:
        parents = client.search_runs(
            [experiment.experiment_id],
            filter_string=(
                f"tags.`sparsezoo.kind` = 'ablation' and tags.`{TAG_ABLATION}` = '{ablation.name}'"
            ),
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if parents:
            parent_id = parents[0].info.run_id
            client.update_run(parent_id, status="RUNNING")
            return parent_id, finished_points(client, experiment.experiment_id, parent_id)
    parent_id = tracking.create_run(
        client,
        ablation.experiment,
        ablation.name,
        {"sparsezoo.kind": "ablation", TAG_ABLATION: ablation.name},
    )
    tracking.log_params(
        client,
        parent_id,
        {"points": str(len(ablation.points)), "overrides": " ".join(ablation.overrides)},
    )
    return parent_id, {}


def finished_points(client: MlflowClient, experiment_id: str, parent_id: str) -> dict[str, str]:
    """Point key -> run id of the parent's children that finished."""
    children = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'FINISHED'"
        ),
        max_results=10000,
    )
    tagged = [run for run in children if TAG_POINT in run.data.tags]
    return {run.data.tags[TAG_POINT]: run.info.run_id for run in tagged}


@dataclass
class AblationOutcome:
    """What an ablation did: its parent run and each point's child run id or error."""

    parent_run_id: str
    trained: list[str]
    skipped: list[str]
    failed: dict[str, str]


def run_ablation(ablation: Ablation, resume: bool = False) -> AblationOutcome:
    """Train every grid point as a child of one parent run; failures are recorded, not fatal.

    The parent ends FINISHED when every point finished, FAILED when some failed (the rest
    still trained), KILLED on Ctrl-C. Tracking must be enabled: an ablation lives in MLflow.
    """
    from sparsezoo.train import train

    cfg0 = ablation.configs[0]
    if not cfg0.tracking.enabled:
        raise ConfigError("tracking.enabled=false: an ablation records its points in MLflow")
    uri = tracking.resolve_tracking_uri(cfg0.tracking.uri)
    tracking.check_tracking(uri)
    client = MlflowClient(uri)
    parent_id, done = _parent_run(client, ablation, resume)
    outcome = AblationOutcome(parent_id, [], [], {})
    try:
        for i, (point, cfg) in enumerate(zip(ablation.points, ablation.configs, strict=True)):
            if point.key in done:
                outcome.skipped.append(point.key)
                continue
            n = len(ablation.points)
            log.info("ablation %s: point %d/%d %s", ablation.name, i + 1, n, point.key)
            tags = {TAG_ABLATION: ablation.name, TAG_POINT: point.key}
            tags |= {TAG_GRID + axis: _format(value) for axis, value in point.coords}
            try:
                train(cfg, tags=tags, parent_run_id=parent_id)
            except Exception as exc:  # a failed point is recorded in its run; the rest go on
                error = f"{type(exc).__name__}: {exc}"
                log.error("ablation %s: point %s failed: %s", ablation.name, point.key, error)
                outcome.failed[point.key] = error
            else:
                outcome.trained.append(point.key)
    except KeyboardInterrupt:
        client.set_terminated(parent_id, "KILLED")
        raise
    client.set_terminated(parent_id, "FAILED" if outcome.failed else "FINISHED")
    return outcome
