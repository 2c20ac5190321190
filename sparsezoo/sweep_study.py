"""The study side of a sweep: objectives, sampler, pruner, storage and heartbeats from YAML.

A sweep YAML's ``sweep:`` section holds, besides ``space:`` and ``constraints:``
(:mod:`sparsezoo.sweep_space`)::

    sweep:
      study: nsa_knobs                        # default: the file name without .yaml
      objectives: [val/loss]                  # or [val/loss, perf/tokens_per_s], [.., attn/density]
      sampler: {type: tpe, seed: 0}           # tpe | random | nsga2, plus the sampler's options
      pruner: {type: median, n_startup_trials: 3, n_warmup_steps: 50}   # or none
      storage: sqlite:///optuna.db            # any Optuna RDB URL, or journal:PATH
      heartbeat: {interval: 60, grace_period: 180, max_retry: 1}       # or false

Everything is checked when the sweep is loaded; a bad value fails with ConfigError naming the
``sweep.<key>`` before anything trains. The Optuna objects are built here too, so the rules
(which options each sampler takes, which storages have heartbeats) live in one place.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial
from sqlalchemy.engine import make_url

from sparsezoo.config import ConfigError

DEFAULT_STORAGE = "sqlite:///optuna.db"
JOURNAL_PREFIX = "journal:"
SECTION_KEYS = (
    "study",
    "objectives",
    "sampler",
    "pruner",
    "storage",
    "heartbeat",
    "space",
    "constraints",
)
# metric logged by every training run -> the direction that is better
METRIC_DIRECTIONS: dict[str, str] = {
    "val/loss": "minimize",
    "val/ppl": "minimize",
    "train/loss": "minimize",
    "perf/tokens_per_s": "maximize",
    "perf/step_ms": "minimize",
    "perf/peak_mem_mb": "minimize",
    "attn/density": "minimize",
}
# validation metrics: the only ones a pruner can compare while a trial trains
PRUNABLE_METRICS = ("val/loss", "val/ppl")
SAMPLERS: dict[str, tuple[type[optuna.samplers.BaseSampler], tuple[str, ...]]] = {
    "tpe": (
        optuna.samplers.TPESampler,
        (
            "seed",
            "n_startup_trials",
            "n_ei_candidates",
            "multivariate",
            "group",
            "constant_liar",
            "consider_endpoints",
            "prior_weight",
        ),
    ),
    "random": (optuna.samplers.RandomSampler, ("seed",)),
    "nsga2": (
        optuna.samplers.NSGAIISampler,
        ("seed", "population_size", "crossover_prob", "swapping_prob", "mutation_prob"),
    ),
}
PRUNERS: dict[str, tuple[type[optuna.pruners.BasePruner], tuple[str, ...]]] = {
    "median": (
        optuna.pruners.MedianPruner,
        ("n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"),
    ),
    "percentile": (
        optuna.pruners.PercentilePruner,
        ("percentile", "n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"),
    ),
    "hyperband": (
        optuna.pruners.HyperbandPruner,
        ("min_resource", "max_resource", "reduction_factor"),
    ),
    "successive_halving": (
        optuna.pruners.SuccessiveHalvingPruner,
        ("min_resource", "reduction_factor", "min_early_stopping_rate"),
    ),
    "threshold": (
        optuna.pruners.ThresholdPruner,
        ("lower", "upper", "n_warmup_steps", "interval_steps"),
    ),
}


@dataclass(frozen=True)
class Heartbeat:
    """RDB heartbeats: a RUNNING trial whose worker stopped beating for ``grace_period`` seconds
    is marked FAIL by the next worker that starts a trial and re-queued (up to ``max_retry``)."""

    interval: int = 60
    grace_period: int = 180
    max_retry: int = 1


@dataclass(frozen=True)
class StudySettings:
    """The parsed ``sweep:`` section except the search space."""

    name: str
    objectives: tuple[str, ...] = ("val/loss",)
    sampler: dict[str, Any] = field(default_factory=lambda: {"type": "tpe", "seed": 0})
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "none"})
    storage: str = DEFAULT_STORAGE
    heartbeat: Heartbeat | None = field(default_factory=Heartbeat)

    @property
    def directions(self) -> list[str]:
        """``minimize``/``maximize`` per objective."""
        return [METRIC_DIRECTIONS[m] for m in self.objectives]

    @property
    def prunes(self) -> bool:
        """Whether trials report intermediate validation losses to a pruner."""
        return self.pruner["type"] != "none"

    def make_sampler(self, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
        """The configured sampler, seeded with its ``seed`` plus ``seed_offset``."""
        cls, _ = SAMPLERS[self.sampler["type"]]
        options = {k: v for k, v in self.sampler.items() if k != "type"}
        options["seed"] = int(options.get("seed", 0)) + seed_offset
        return cls(**options)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        """The configured pruner (NopPruner for ``none``)."""
        if not self.prunes:
            return optuna.pruners.NopPruner()
        cls, _ = PRUNERS[self.pruner["type"]]
        return cls(**{k: v for k, v in self.pruner.items() if k != "type"})


def _typed_options(
    where: str,
    raw: Any,
    table: dict[str, tuple[type, tuple[str, ...]]],
    default_type: str,
    extra_types: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Parse ``{type: NAME, option: value, ...}`` (or a bare NAME) against an allowlist."""
    if raw is None:
        raw = {"type": default_type}
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected {{type: NAME, ...}} or NAME, got {raw!r}")
    raw = {"type": default_type, **raw}
    kind = raw["type"]
    allowed_types = (*table, *extra_types)
    if kind not in allowed_types:
        raise ConfigError(f"{where}.type: unknown {kind!r}; allowed: {', '.join(allowed_types)}")
    allowed = table[kind][1] if kind in table else ()
    unknown = sorted(set(raw) - {"type", *allowed})
    if unknown:
        raise ConfigError(
            f"{where}: unknown option(s) {unknown} for {kind}; allowed: {', '.join(allowed)}"
        )
    return raw


def parse_storage(url: Any) -> str:
    """Check a storage URL's form: ``journal:PATH`` or an SQLAlchemy URL Optuna's RDB accepts."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"storage {url!r}: give sqlite:///PATH.db, an RDB URL or journal:PATH")
    if url.startswith(JOURNAL_PREFIX):
        if not journal_path(url).name:
            raise ConfigError(f"storage {url!r}: journal:PATH needs a file path")
        return url
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError as exc:
        raise ConfigError(
            f"storage {url!r} is not a URL; use sqlite:///PATH.db, "
            "postgresql+psycopg2://USER:PASS@HOST/DB, mysql+pymysql://... or journal:PATH"
        ) from exc
    if parsed.get_backend_name() not in ("sqlite", "postgresql", "mysql"):
        raise ConfigError(
            f"storage {url!r}: unknown database {parsed.get_backend_name()!r}; use "
            "sqlite:///PATH.db, postgresql+psycopg2://..., mysql+pymysql://... or journal:PATH"
        )
    return url


def journal_path(url: str) -> Path:
    """The file of a ``journal:PATH`` storage (``journal:///abs/path`` also works)."""
    path = url[len(JOURNAL_PREFIX) :]
    return Path("/" + path.lstrip("/") if path.startswith("//") else path).expanduser()


def display_storage(url: str) -> str:
    """The storage URL without its password, for logs, tags and messages."""
    if url.startswith(JOURNAL_PREFIX):
        return url
    return make_url(url).render_as_string(hide_password=True)


def parse_heartbeat(raw: Any) -> Heartbeat | None:
    """``false`` disables heartbeats; a mapping overrides the defaults (all positive ints)."""
    if raw is False:
        return None
    if raw is None or raw is True:
        return Heartbeat()
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep.heartbeat: expected a mapping or false, got {raw!r}")
    names = ("interval", "grace_period", "max_retry")
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"sweep.heartbeat: unknown key(s) {unknown}; allowed: {names}")
    beat = Heartbeat(**raw)
    for name in names:
        value = getattr(beat, name)
        low = 0 if name == "max_retry" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"sweep.heartbeat.{name}={value!r} must be an integer >= {low}")
    if beat.grace_period <= beat.interval:
        raise ConfigError(
            f"sweep.heartbeat.grace_period={beat.grace_period} must exceed "
            f"interval={beat.interval}, or live trials would be failed"
        )
    return beat


def parse_settings(section: dict[str, Any], default_name: str) -> StudySettings:
    """Parse the ``sweep:`` section (except the space); ConfigError naming the bad key."""
    unknown = sorted(set(section) - set(SECTION_KEYS))
    if unknown:
        raise ConfigError(f"sweep: unknown key(s) {unknown}; allowed: {', '.join(SECTION_KEYS)}")
    name = section.get("study") or default_name
    if not isinstance(name, str):
        raise ConfigError(f"sweep.study={name!r} must be a string")
    objectives = section.get("objectives", ["val/loss"])
    if isinstance(objectives, str):
        objectives = [objectives]
    if not isinstance(objectives, list) or not objectives:
        raise ConfigError(f"sweep.objectives must be a non-empty list, got {objectives!r}")
    for metric in objectives:
        if metric not in METRIC_DIRECTIONS:
            raise ConfigError(
                f"sweep.objectives: unknown metric {metric!r}; allowed: "
                + ", ".join(f"{m} ({d})" for m, d in METRIC_DIRECTIONS.items())
            )
    if len(set(objectives)) != len(objectives):
        raise ConfigError(f"sweep.objectives {objectives} repeats a metric")
    sampler = _typed_options("sweep.sampler", section.get("sampler"), SAMPLERS, "tpe")
    multi = len(objectives) > 1
    pruner = _typed_options(
        "sweep.pruner", section.get("pruner"), PRUNERS, "none" if multi else "median", ("none",)
    )
    if pruner["type"] != "none" and multi:
        raise ConfigError(
            f"sweep.pruner={pruner['type']}: Optuna prunes single-objective studies only; "
            f"set pruner: none for objectives {objectives}"
        )
    if pruner["type"] != "none" and objectives[0] not in PRUNABLE_METRICS:
        raise ConfigError(
            f"sweep.pruner={pruner['type']}: pruning compares intermediate validation losses, "
            f"but the objective is {objectives[0]}; use {' or '.join(PRUNABLE_METRICS)} or "
            "pruner: none"
        )
    settings = StudySettings(
        name=name,
        objectives=tuple(objectives),
        sampler=sampler,
        pruner=pruner,
        storage=parse_storage(section.get("storage", DEFAULT_STORAGE)),
        heartbeat=parse_heartbeat(section.get("heartbeat")),
    )
    builders = {"sweep.sampler": settings.make_sampler, "sweep.pruner": settings.make_pruner}
    for where, build in builders.items():
        try:
            build()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    return settings


def open_storage(
    url: str,
    heartbeat: Heartbeat | None,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> optuna.storages.BaseStorage:
    """Open (creating if needed) the study storage; ConfigError naming the URL when it fails.

    RDB storages get the heartbeat and ``on_stale`` (called with each stale trial, see
    run_sweep); Optuna's journal storage has no heartbeat, so a journal study relies on workers
    ending their trials themselves (a killed worker's trial stays RUNNING).
    """
    url = parse_storage(url)
    shown = display_storage(url)
    if url.startswith(JOURNAL_PREFIX):
        path = journal_path(url)
        if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
            raise ConfigError(f"storage {shown}: directory {path.parent} is not writable")
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        parent = Path(url.removeprefix("sqlite:///")).expanduser().resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise ConfigError(f"storage {shown}: directory {parent} is not writable")
    beat: dict[str, Any] = {}
    if heartbeat is not None:
        beat = {
            "heartbeat_interval": heartbeat.interval,
            "grace_period": heartbeat.grace_period,
            "heartbeat_stale_trial_callback": on_stale,
        }
    try:
        return RDBStorage(url, **beat)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        raise ConfigError(f"storage {shown} cannot be opened: {exc}".splitlines()[0]) from exc
