"""The search space of a sweep: distributions keyed by config dot-path, and validity constraints.

A sweep YAML's ``space:`` maps a config dot-path to a distribution::

    space:
      train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      train.warmup_steps: {type: int, low: 0, high: 40, step: 10}
      attention.mechanism: [nsa, moba]                 # a list is a categorical
      attention.params.nsa.window: {type: int, low: 16, high: 128, log: true}
    constraints:
      - attention.params.nsa.n_select * attention.params.nsa.select_size < data.seq_len

A path under ``attention.params.<mechanism>.`` is *conditional*: a trial samples it only when that
mechanism is used by the trial's layers (``attention.mechanism`` / ``attention.layers``, which may
themselves be sampled). A constraint that names a mechanism's knobs is checked only when the
mechanism is used. Constraints are Python-like expressions over dot-paths, numbers, arithmetic,
comparisons, ``and``/``or``/``not`` and ``min``/``max``/``abs``; they are parsed into a small
whitelisted evaluator, never handed to ``eval``. Everything is checked against the experiment's
base config when the sweep is loaded, so a bad space fails before any training.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import operator
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sparsezoo.config import ConfigError, ExperimentConfig, _explain, parse_layer_spec
from sparsezoo.mechanisms.base import MechanismConfigError
from sparsezoo.registry import UnknownMechanismError, get_mechanism

DISTRIBUTION_KEYS: dict[str, tuple[str, ...]] = {
    "int": ("type", "low", "high", "step", "log"),
    "float": ("type", "low", "high", "step", "log"),
    "categorical": ("type", "choices"),
}
PARAMS_PREFIX = "attention.params."


def conditional_mechanism(path: str) -> str | None:
    """The mechanism whose knob ``path`` names (``attention.params.<m>.<knob>``), else None."""
    if not path.startswith(PARAMS_PREFIX):
        return None
    return path[len(PARAMS_PREFIX) :].split(".", 1)[0]


def nested(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "a.c": 2}`` -> ``{"a": {"b": 1, "c": 2}}``: a config source for compose."""
    out: dict[str, Any] = {}
    for path, value in values.items():
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def resolve_path(cfg: ExperimentConfig, path: str) -> Any:
    """The value at a dot-path of a resolved config; mechanism knobs fall back to their defaults.

    Raises ConfigError naming the path when it does not exist.
    """
    mechanism = conditional_mechanism(path)
    if mechanism is not None:
        knob = path[len(PARAMS_PREFIX) + len(mechanism) + 1 :]
        try:
            params = get_mechanism(mechanism).Params.from_dict(
                dict(cfg.attention.params.get(mechanism, {}))
            )
        except (UnknownMechanismError, MechanismConfigError, TypeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        names = [f.name for f in dataclasses.fields(params)]
        if knob not in names:
            raise ConfigError(f"{path}: {mechanism} has no knob {knob!r}; knobs: {names}")
        return getattr(params, knob)
    node: Any = cfg
    for part in path.split("."):
        if not dataclasses.is_dataclass(node) or part not in {
            f.name for f in dataclasses.fields(node)
        }:
            raise ConfigError(f"unknown config path {path!r}")
        node = getattr(node, part)
    if dataclasses.is_dataclass(node):
        raise ConfigError(f"{path!r} is a config section, not a value")
    return node


@dataclass(frozen=True)
class ParamSpec:
    """One searched config value: its dot-path and an int, float or categorical distribution."""

    path: str
    kind: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    @property
    def mechanism(self) -> str | None:
        """The mechanism this value is conditional on, or None for a shared value."""
        return conditional_mechanism(self.path)

    def probes(self) -> list[Any]:
        """Representative values (the bounds, or every choice) used to check the path's type."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def chosen_mechanisms(self) -> set[str]:
        """Mechanism names the choices of ``attention.mechanism``/``attention.layers`` select."""
        if self.path == "attention.mechanism":
            return {str(c) for c in self.choices}
        if self.path != "attention.layers":
            return set()
        return {
            item.strip().partition("*")[0].strip()
            for choice in self.choices
            for item in str(choice).split(",")
            if item.strip()
        }

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The equivalent Optuna distribution (its constructor re-checks the bounds)."""
        if self.kind == "int":
            return optuna.distributions.IntDistribution(
                int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        if self.kind == "float":
            return optuna.distributions.FloatDistribution(
                self.low, self.high, log=self.log, step=self.step
            )
        return optuna.distributions.CategoricalDistribution(self.choices)

    def suggest(self, trial: optuna.Trial) -> Any:
        """Sample this value in ``trial`` under its dot-path as the Optuna parameter name."""
        if self.kind == "int":
            return trial.suggest_int(
                self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        if self.kind == "float":
            return trial.suggest_float(
                self.path, float(self.low), float(self.high), step=self.step, log=self.log
            )
        return trial.suggest_categorical(self.path, self.choices)


def _number(where: str, key: str, value: Any, integer: bool) -> float:
    """A bound or step checked to be a (whole, for int) number."""
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value):
        raise ConfigError(f"{where}: {key}={value!r} must be {kind}")
    return value


def parse_param(path: str, raw: Any) -> ParamSpec:
    """Parse one ``space:`` entry (a mapping with ``type:``, or a list meaning categorical).

    Raises ConfigError naming ``sweep.space.<path>`` and the offending key for an unknown
    distribution type, unknown keys, missing or non-numeric bounds, ``low > high``, a log scale
    with ``low <= 0`` or with a step, and empty, duplicated or non-scalar choices.
    """
    where = f"sweep.space.{path}"
    if isinstance(raw, list):
        raw = {"type": "categorical", "choices": raw}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: expected {{type: int|float|categorical, ...}} or a list of choices, "
            f"got {raw!r}"
        )
    kind = raw.get("type")
    if kind not in DISTRIBUTION_KEYS:
        raise ConfigError(
            f"{where}: unknown distribution type {kind!r}; allowed: {', '.join(DISTRIBUTION_KEYS)}"
        )
    unknown = sorted(set(raw) - set(DISTRIBUTION_KEYS[kind]))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown} for a {kind} distribution; "
            f"allowed: {', '.join(DISTRIBUTION_KEYS[kind])}"
        )
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list, got {choices!r}")
        for choice in choices:
            if choice is not None and not isinstance(choice, (bool, int, float, str)):
                raise ConfigError(
                    f"{where}: choice {choice!r} must be a number, string, bool or null"
                )
        if len({repr(c) for c in choices}) != len(choices):
            raise ConfigError(f"{where}: choices {choices} contain duplicates")
        return ParamSpec(path, kind, choices=tuple(choices))
    integer = kind == "int"
    for key in ("low", "high"):
        if key not in raw:
            raise ConfigError(f"{where}: a {kind} distribution needs '{key}'")
    low = _number(where, "low", raw["low"], integer)
    high = _number(where, "high", raw["high"], integer)
    step = raw.get("step")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log={log!r} must be true or false")
    if low > high:
        raise ConfigError(f"{where}: low={low!r} > high={high!r}")
    if step is not None and _number(where, "step", step, integer) <= 0:
        raise ConfigError(f"{where}: step={step!r} must be > 0")
    if log and low <= 0:
        raise ConfigError(f"{where}: log=true needs low > 0, got low={low!r}")
    if log and step is not None and not (integer and step == 1):
        raise ConfigError(f"{where}: log=true cannot be combined with step={step!r}")
    spec = ParamSpec(path, kind, low=low, high=high, step=step, log=log)
    try:
        spec.distribution()
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return spec


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_FUNCTIONS: dict[str, Callable[..., Any]] = {"min": min, "max": max, "abs": abs}


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` as written in an expression, or None when the node is not a dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


@dataclass(frozen=True)
class Constraint:
    """A validity rule over config dot-paths, e.g. ``attention.params.nsa.window <= data.seq_len``.

    ``paths`` are the dot-paths it reads; ``mechanisms`` the mechanisms whose knobs it names (the
    rule applies only to trials that use all of them).
    """

    expr: str
    tree: ast.expr
    paths: tuple[str, ...]

    @property
    def mechanisms(self) -> frozenset[str]:
        """Mechanisms whose knobs the rule reads."""
        return frozenset(m for p in self.paths if (m := conditional_mechanism(p)) is not None)

    @classmethod
    def parse(cls, expr: Any, where: str) -> Constraint:
        """Parse and whitelist an expression; ConfigError naming ``where`` if it is not allowed."""
        if not isinstance(expr, str) or not expr.strip():
            raise ConfigError(f"{where}: a constraint must be an expression string, got {expr!r}")
        try:
            tree = ast.parse(expr.strip(), mode="eval").body
        except SyntaxError as exc:
            raise ConfigError(f"{where}: cannot parse {expr!r}: {exc.msg}") from exc
        paths: list[str] = []
        cls._check(tree, expr, where, paths)
        return cls(expr.strip(), tree, tuple(dict.fromkeys(paths)))

    @classmethod
    def _check(cls, node: ast.expr, expr: str, where: str, paths: list[str]) -> None:
        """Reject every node outside the whitelist; collect the dot-paths read."""
        path = _dotted(node)
        if path is not None:
            paths.append(path)
            return
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
            return
        children: list[ast.expr]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            children = [node.left, node.right]
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            children = [node.operand]
        elif isinstance(node, ast.BoolOp):
            children = list(node.values)
        elif isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            children = [node.left, *node.comparators]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCTIONS
            and not node.keywords
        ):
            children = list(node.args)
        else:
            raise ConfigError(
                f"{where}: {ast.unparse(node)!r} is not allowed in a constraint ({expr!r}); use "
                "dot-paths, numbers, + - * / // % **, comparisons, and/or/not, min/max/abs"
            )
        for child in children:
            cls._check(child, expr, where, paths)

    def holds(self, cfg: ExperimentConfig) -> bool:
        """Evaluate the rule on a resolved config (ConfigError for an unknown path)."""
        return bool(self._eval(self.tree, cfg))

    def _eval(self, node: ast.expr, cfg: ExperimentConfig) -> Any:
        path = _dotted(node)
        if path is not None:
            return resolve_path(cfg, path)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](self._eval(node.left, cfg), self._eval(node.right, cfg))
        if isinstance(node, ast.UnaryOp):
            value = self._eval(node.operand, cfg)
            return -value if isinstance(node.op, ast.USub) else not value
        if isinstance(node, ast.BoolOp):
            values = (self._eval(v, cfg) for v in node.values)
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, cfg)
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                right = self._eval(right_node, cfg)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        return _FUNCTIONS[node.func.id](*(self._eval(a, cfg) for a in node.args))


def _check_schema_path(spec: ParamSpec, base: DictConfig) -> None:
    """A non-mechanism path must be a value of the ExperimentConfig schema of the probes' type."""
    where = f"sweep.space.{spec.path}"
    schema = OmegaConf.structured(ExperimentConfig)
    node = OmegaConf.select(schema, spec.path, default=None)
    if isinstance(node, DictConfig) or spec.path.startswith("attention.params"):
        raise ConfigError(
            f"{where}: names a config section; search a value "
            "(e.g. train.lr or attention.params.<mechanism>.<knob>)"
        )
    for probe in spec.probes():
        try:
            OmegaConf.to_object(OmegaConf.merge(schema, base, nested({spec.path: probe})))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{where}: {_explain(exc)}") from exc


def _check_knob_path(spec: ParamSpec) -> None:
    """A mechanism path must name a registered mechanism's knob; types and ranges must fit it."""
    where = f"sweep.space.{spec.path}"
    mechanism = spec.mechanism
    assert mechanism is not None
    knob = spec.path[len(PARAMS_PREFIX) + len(mechanism) + 1 :]
    try:
        params_cls = get_mechanism(mechanism).Params
    except UnknownMechanismError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    if knob not in fields:
        raise ConfigError(
            f"{where}: {mechanism} has no knob {knob!r}; knobs: {', '.join(fields)} "
            f"(paths look like attention.params.{mechanism}.<knob>)"
        )
    expected = typing.get_type_hints(params_cls)[knob]
    meta = fields[knob].metadata
    # a float knob takes ints too; bool is an int subclass but never a number here
    accepted = (int, float) if expected is float else (expected,)
    for probe in spec.probes():
        if isinstance(probe, bool) is not (expected is bool) or not isinstance(probe, accepted):
            raise ConfigError(
                f"{where}: value {probe!r} does not fit knob {knob!r} of type {expected.__name__}"
            )
        if meta.get("choices") is not None and probe not in meta["choices"]:
            raise ConfigError(f"{where}: {probe!r} is not one of {list(meta['choices'])}")
        low, high = meta.get("low"), meta.get("high")
        if (low is not None and probe < low) or (high is not None and probe > high):
            raise ConfigError(
                f"{where}: {probe!r} is outside the knob's allowed range "
                f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
            )


@dataclass(frozen=True)
class SearchSpace:
    """The sweep's distributions (shared first, then mechanism-conditional) and constraints."""

    params: tuple[ParamSpec, ...]
    constraints: tuple[Constraint, ...]

    @property
    def paths(self) -> tuple[str, ...]:
        """Every searched dot-path."""
        return tuple(p.path for p in self.params)

    @property
    def conditional(self) -> bool:
        """Whether some values are sampled only for some mechanisms."""
        return any(p.mechanism is not None for p in self.params)

    def active_mechanisms(self, values: Mapping[str, Any], base: ExperimentConfig) -> set[str]:
        """Mechanisms the trial's layers use, given its shared sampled ``values`` over ``base``."""

        def value(path: str) -> Any:
            return values[path] if path in values else resolve_path(base, path)

        return set(
            parse_layer_spec(
                value("attention.layers"), value("attention.mechanism"), value("model.n_layers")
            )
        )

    def sample(self, trial: optuna.Trial, base: ExperimentConfig) -> dict[str, Any]:
        """Sample the shared values, then the knobs of the mechanisms the trial uses.

        Raises ConfigError when the sampled layer spec itself is invalid (an invalid point).
        """
        values = {p.path: p.suggest(trial) for p in self.params if p.mechanism is None}
        active = self.active_mechanisms(values, base)
        for p in self.params:
            if p.mechanism in active:
                values[p.path] = p.suggest(trial)
        return values

    def violation(self, cfg: ExperimentConfig) -> str | None:
        """The first constraint the composed trial config breaks, as a reason, or None."""
        active = set(
            parse_layer_spec(cfg.attention.layers, cfg.attention.mechanism, cfg.model.n_layers)
        )
        for c in self.constraints:
            if not c.mechanisms <= active:
                continue
            try:
                if not c.holds(cfg):
                    return f"constraint violated: {c.expr}"
            except (TypeError, ZeroDivisionError) as exc:
                return f"constraint {c.expr} cannot be evaluated: {exc}"
        return None

    def reachable_mechanisms(self, base: ExperimentConfig) -> set[str]:
        """Every mechanism some trial can use: the base's, and any a sampled choice selects."""
        mechanisms = set(self.active_mechanisms({}, base))
        for spec in self.params:
            mechanisms |= spec.chosen_mechanisms()
        return mechanisms


def parse_space(
    space: Any,
    constraints: Any,
    base_source: DictConfig,
    base: ExperimentConfig,
    overrides: Sequence[str] = (),
) -> SearchSpace:
    """Parse and check ``space:`` and ``constraints:`` against the sweep's base config.

    Fails with ConfigError (naming the key) on an empty space, a bad distribution, an unknown
    config path or knob, a value type that does not fit the path, a knob range outside the
    mechanism's allowed range, a conditional knob of a mechanism no trial can use, a ``key=value``
    override of a searched path, or a constraint that cannot be parsed or evaluated.
    """
    if space is None or (isinstance(space, dict) and not space):
        raise ConfigError("sweep.space is empty: declare at least one searched config value")
    if not isinstance(space, dict):
        raise ConfigError(f"sweep.space must map config dot-paths to distributions, got {space!r}")
    specs = [parse_param(str(path), raw) for path, raw in space.items()]
    for spec in specs:
        if spec.mechanism is None:
            _check_schema_path(spec, base_source)
        else:
            _check_knob_path(spec)
    overridden = {ov.split("=", 1)[0].strip() for ov in overrides}
    for spec in specs:
        if spec.path in overridden:
            raise ConfigError(
                f"override {spec.path}=... sets a searched value; remove it from the command "
                "line or from sweep.space"
            )
    # shared values first: they decide which mechanisms' knobs a trial samples
    ordered = tuple(sorted(specs, key=lambda s: s.mechanism is not None))
    if constraints is None:
        constraints = []
    if not isinstance(constraints, list):
        raise ConfigError(f"sweep.constraints must be a list of expressions, got {constraints!r}")
    rules = tuple(
        Constraint.parse(expr, f"sweep.constraints[{i}]") for i, expr in enumerate(constraints)
    )
    result = SearchSpace(ordered, rules)
    for spec in specs:
        for name in sorted(spec.chosen_mechanisms()):
            try:
                get_mechanism(name)
            except UnknownMechanismError as exc:
                raise ConfigError(f"sweep.space.{spec.path}: {exc}") from exc
    reachable = result.reachable_mechanisms(base)
    for spec in specs:
        if spec.mechanism is not None and spec.mechanism not in reachable:
            raise ConfigError(
                f"sweep.space.{spec.path}: no trial uses {spec.mechanism} (trials use "
                f"{sorted(reachable)}); sample attention.mechanism or drop this knob"
            )
    for i, rule in enumerate(rules):
        try:
            rule.holds(base)
        except (ConfigError, TypeError, ZeroDivisionError) as exc:
            raise ConfigError(f"sweep.constraints[{i}] ({rule.expr}): {exc}") from exc
    return result
