"""Typed experiment configs: OmegaConf structured dataclasses, YAML building blocks, overrides.

A run is described by one :class:`ExperimentConfig`. YAML files may ``include:`` other YAML files
(paths relative to the including file), which are merged first, in order; the file's own keys
win, and ``key=value`` overrides from the command line win over everything. Unknown keys and
values of the wrong type are rejected with the full key path and what is allowed; semantic rules
(ranges, mechanism names and knobs, layer specs) are checked by :func:`validate_config`.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from sparsezoo.data.synthetic import N_DIGITS, MQARSpec, PasskeySpec
from sparsezoo.mechanisms.base import AttentionShape, MechanismConfigError
from sparsezoo.registry import UnknownMechanismError, get_mechanism


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names the key and what is allowed."""


@dataclass
class ModelConfig:
    """Decoder-only Llama-style model: sizes, GQA, RoPE, tied embeddings."""

    name: str = "tiny"
    vocab_size: int = 0  # 0: take the tokenizer's vocabulary size
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # None: d_model // n_heads
    mlp_hidden: int | None = None  # None: 8/3 * d_model rounded up to a multiple of 32
    max_seq_len: int | None = None  # None: data.seq_len
    rope_theta: float = 10000.0
    rope_dim: int | None = None  # None: rotate all of head_dim; fewer: partial RoPE (even)
    short_conv: int = 0  # taps of a causal depthwise conv on each attention input; 0: none
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02


@dataclass
class AttentionConfig:
    """Which mechanism every layer uses, and each mechanism's knobs.

    ``layers`` is a one-line per-layer spec: comma-separated names with optional ``*count``
    (``"nsa*6,dense*2"``); empty means every layer uses ``mechanism``. ``params`` maps a mechanism
    name to its knobs (``{sliding_window: {window: 128}}``).
    """

    mechanism: str = "dense"
    layers: str = ""
    params: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class CurriculumPhase:
    """A phase of a length curriculum: ``steps`` steps of rows of ``seq_len`` tokens.

    ``batch_size`` 0 means ``train.batch_size``; ``passkey_mix`` and ``passkey_near`` null mean
    the ``data`` section's values. ``attention_params`` sets mechanism knobs for the phase's
    steps, keyed like ``attention.params`` (``{nsa: {n_select: 4}}``), over those; only phase
    knobs (``knob(..., phase=True)``, column ``phase`` of ``sparsezoo mechanisms``), which
    leave the model's parameters unchanged: the same model trains through every phase.
    """

    seq_len: int = 256
    steps: int = 100
    batch_size: int = 0
    passkey_mix: float | None = None
    passkey_near: float | None = None
    attention_params: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Corpus, tokenizer and sequence length.

    ``corpus`` is ``["stdlib"]`` (the running interpreter's standard-library sources, offline) or
    a list of text/JSONL files, directories or globs. ``curriculum`` lists phases trained first,
    in order, at shorter lengths (cheap steps, where retrieval circuits form fast); the steps
    left of ``train.max_steps`` then train at ``seq_len`` with ``train.batch_size``.
    """

    corpus: list[str] = field(default_factory=lambda: ["stdlib"])
    jsonl_field: str = "text"
    max_bytes: int | None = 8_000_000
    vocab_size: int = 4096
    seq_len: int = 256
    val_fraction: float = 0.05
    cache_dir: str | None = None  # None: $SPARSEZOO_CACHE or ~/.cache/sparsezoo
    # fraction of training rows replaced by synthetic passkey sequences (loss on the answer only)
    passkey_mix: float = 0.0
    passkey_len: int = 5  # digits per passkey, in training rows and in the passkey eval
    # share of passkey rows with a log-uniform needle-to-query distance instead of uniform depth
    passkey_near: float = 0.0
    # all digits of a passkey different (training rows and the passkey eval): no repeated digit
    # to disambiguate when copying, so what is measured is finding the needle
    passkey_distinct: bool = False
    # share of passkey rows with the needle at depth 0 or 1 (the grid's 0% and 100% cells)
    passkey_edges: float = 0.0
    curriculum: list[CurriculumPhase] = field(default_factory=list)


@dataclass
class TrainConfig:
    """Optimisation and trainer settings (AdamW, linear warmup then cosine decay)."""

    max_steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"  # auto: 32-true on CPU, bf16-mixed on GPU
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    num_nodes: int = 1
    val_every: int = 50
    val_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 100
    progress_bar: bool = True
    threads: int = 0  # CPU threads for torch; 0 leaves torch's default


@dataclass
class TrackingConfig:
    """Where runs are logged: tracking URI (config > MLFLOW_TRACKING_URI > sqlite:///mlflow.db)."""

    uri: str | None = None
    enabled: bool = True


EVAL_SUITES = ("passkey", "mqar", "loss_by_position", "extrapolation")
EXTRAPOLATION_TASKS = ("passkey", "mqar", "loss_by_position")


@dataclass
class PasskeyEvalConfig:
    """Passkey grid: context lengths x needle depths (percent of the filler), samples per cell.

    Empty ``lengths`` means ``data.seq_len``; the passkey has ``data.passkey_len`` digits.
    """

    lengths: list[int] = field(default_factory=list)
    depths: list[float] = field(
        default_factory=lambda: [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    )
    samples: int = 4


@dataclass
class MQAREvalConfig:
    """MQAR grid: sequence lengths x numbers of key-value pairs, samples per cell.

    Empty ``lengths`` means ``data.seq_len``; every length must hold 4 x the largest pair count.
    """

    lengths: list[int] = field(default_factory=list)
    n_pairs: list[int] = field(default_factory=lambda: [4, 16, 64])
    samples: int = 16


@dataclass
class LossByPositionEvalConfig:
    """Mean token loss of held-out text windows in ``buckets`` equal position ranges.

    Empty ``lengths`` means ``data.seq_len``.
    """

    lengths: list[int] = field(default_factory=list)
    buckets: int = 8
    samples: int = 16


@dataclass
class ExtrapolationEvalConfig:
    """The ``tasks`` (each with its own settings) again at ``factors`` x ``data.seq_len``:
    by default every task, as the other suites run them."""

    factors: list[int] = field(default_factory=lambda: [2, 4])
    tasks: list[str] = field(default_factory=lambda: list(EXTRAPOLATION_TASKS))


@dataclass
class EvalConfig:
    """Evaluation suites and their settings.

    ``suites`` run at the end of training (empty: none); ``sparsezoo eval`` runs the suites it is
    given with the same settings. Batches of ``batch_size`` sequences, generators seeded from
    ``seed``; ``device`` is ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """

    suites: list[str] = field(default_factory=list)
    batch_size: int = 4
    seed: int = 1234
    device: str = "auto"
    passkey: PasskeyEvalConfig = field(default_factory=PasskeyEvalConfig)
    mqar: MQAREvalConfig = field(default_factory=MQAREvalConfig)
    loss_by_position: LossByPositionEvalConfig = field(default_factory=LossByPositionEvalConfig)
    extrapolation: ExtrapolationEvalConfig = field(default_factory=ExtrapolationEvalConfig)


@dataclass
class ExperimentConfig:
    """Everything one training run needs; the resolved form is saved with every run."""

    experiment: str = "sparsezoo"
    run_name: str | None = None
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
# Lightning strategy names sparsezoo runs and tests: ddp (one process per device, gloo on CPU,
# nccl on GPUs; multi-node with num_nodes) and fsdp (sharded parameters, GPUs)
STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true", "fsdp")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Load one YAML file with its ``include:`` list merged underneath it."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"include cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping, got a list")
    includes = raw.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    parts = [_read_yaml(path.parent / str(inc), (*seen, path)) for inc in includes]
    return OmegaConf.merge(*parts, raw) if parts else raw


def _valid_keys(key_path: str) -> list[str]:
    """The valid child keys at a dotted ``key_path`` of the ExperimentConfig schema."""
    cls: Any = ExperimentConfig
    for part in [p for p in key_path.split(".") if p][:-1]:
        hints = typing.get_type_hints(cls)
        cls = hints.get(part)
        if not dataclasses.is_dataclass(cls):
            return []
    return [f.name for f in dataclasses.fields(cls)]


def _list_item_path(item_cls: Any, cls: Any = None, prefix: str = "") -> str | None:
    """The schema path of the list whose items are ``item_cls`` (``data.curriculum[]``), if any."""
    for name, hint in typing.get_type_hints(cls or ExperimentConfig).items():
        args = typing.get_args(hint)
        if typing.get_origin(hint) is list and args and args[0] is item_cls:
            return f"{prefix}{name}[]"
        if dataclasses.is_dataclass(hint):
            found = _list_item_path(item_cls, hint, f"{prefix}{name}.")
            if found:
                return found
    return None


def _explain(exc: OmegaConfBaseException) -> ConfigError:
    """Turn an OmegaConf error into a ConfigError naming the key path and what is allowed."""
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    if isinstance(exc, ConfigKeyError):
        owner = getattr(exc, "object_type", None)
        item_path = _list_item_path(owner) if dataclasses.is_dataclass(owner) else None
        if item_path is not None and "." not in str(key):
            # OmegaConf reports a key inside a list item without its path
            valid = [f.name for f in dataclasses.fields(owner)]
            key = f"{item_path}.{key}"
        else:
            valid = _valid_keys(str(key))
        return ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(valid)}")
    if isinstance(exc, ValidationError):
        msg = str(exc).splitlines()[0]
        return ConfigError(f"invalid value for '{key}': {msg}")
    return ConfigError(f"config error at '{key}': {str(exc).splitlines()[0]}")


def parse_overrides(overrides: Sequence[str], prefix: str = "") -> list[tuple[str, Any]]:
    """``key=value`` overrides as (dotted key, value) pairs, values parsed as YAML the way
    OmegaConf's dotlist parses them.

    Raises ConfigError naming the override when it has no ``=`` or key, or its value is not
    valid YAML (e.g. a flow mapping written ``{a:{b: 1}}``, which YAML needs as ``{a: {b: 1}}``;
    ``{b:1}`` alone parses, as the key ``b:1``, which the schema then rejects by name);
    ``prefix`` is how the caller's keys were written, for the message.
    """
    pairs = []
    for ov in overrides:
        key, sep, text = ov.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {prefix + ov!r} must look like {prefix}key=value")
        try:
            parsed = OmegaConf.from_dotlist([f"v={text}"])
        except yaml.YAMLError as exc:
            problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
            raise ConfigError(
                f"override {prefix + ov!r}: the value is not valid YAML ({problem}); "
                "inside {...} and [...] put a space after each ':', e.g. {seq_len: 32}"
            ) from exc
        pairs.append((key, typing.cast(dict[str, Any], OmegaConf.to_container(parsed))["v"]))
    return pairs


def compose(
    sources: Sequence[DictConfig | dict[str, Any]], overrides: Sequence[str] = ()
) -> ExperimentConfig:
    """Merge config sources over the schema defaults, apply overrides, validate, return typed."""
    schema = OmegaConf.structured(ExperimentConfig)
    pairs = parse_overrides(overrides)
    try:
        dotlist = OmegaConf.create()
        for key, value in pairs:
            OmegaConf.update(dotlist, key, value, merge=True)
        merged = OmegaConf.merge(schema, *sources, dotlist)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _explain(exc) from exc
    assert isinstance(cfg, ExperimentConfig)
    validate_config(cfg)
    return cfg


def split_study_file(
    path: str | Path,
    section: str,
    overrides: Sequence[str] = (),
    path_keyed: Sequence[str] = (),
) -> tuple[DictConfig, dict[str, Any], list[str]]:
    """Read a study YAML (an ablation or a sweep): the base experiment config and its section.

    The file is an experiment config (``include:`` and every ExperimentConfig key) plus one
    top-level mapping named ``section`` (``ablation`` or ``sweep``) that describes the study.
    Overrides whose key starts with ``<section>.`` (``ablation.seeds=[0,1]``) edit the section
    itself, so a study can be cut or widened from the command line without copying its file;
    under a ``path_keyed`` entry (``axes``, ``space``: mappings keyed by config paths) the rest
    of the key is one config path (``ablation.axes.data.seq_len=[64]``).
    Returns the base config source, to be passed to :func:`compose` with each point's
    overrides, the section as a plain dict, and the other overrides (for the base config).
    Raises ConfigError naming the file when the section is missing or not a mapping, and naming
    a section override that is not ``key=value`` or that descends into a non-mapping.
    """
    raw = _read_yaml(Path(path))
    if section not in raw:
        raise ConfigError(f"{path}: no '{section}:' section (a {section} file needs one)")
    body = raw.pop(section)
    if not isinstance(body, DictConfig):
        raise ConfigError(f"{path}: '{section}' must be a mapping, got {type(body).__name__}")
    prefix = f"{section}."
    ours = [ov[len(prefix) :] for ov in overrides if ov.startswith(prefix)]
    study = typing.cast(dict[str, Any], OmegaConf.to_container(body, resolve=True))
    for key, value in parse_overrides(ours, prefix):
        _set_study_key(study, section, key, value, path_keyed)
    return raw, study, [ov for ov in overrides if not ov.startswith(prefix)]


def _set_study_key(
    study: dict[str, Any], section: str, key: str, value: Any, path_keyed: Sequence[str]
) -> None:
    """Set the dotted ``key`` of the study section to ``value``, creating mappings on the way;
    below a path-keyed mapping the rest of the key is one key (a config path)."""
    parts = key.split(".")
    if parts[0] in path_keyed and len(parts) > 1:
        parts = [parts[0], ".".join(parts[1:])]
    node = study
    for depth, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(
                f"override {section}.{key}: {section}.{where} is not a mapping, so it has no keys"
            )
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load an experiment config: embedded defaults < YAML file (with includes) < overrides.

    ``path=None`` uses the embedded defaults alone, so ``sparsezoo train`` runs with no file.
    """
    sources = [] if path is None else [_read_yaml(Path(path))]
    return compose(sources, overrides)


def parse_layer_spec(spec: str, default: str, n_layers: int) -> list[str]:
    """Expand a per-layer spec like ``"nsa*6,dense*2"`` into one mechanism name per layer."""
    if not spec.strip():
        return [default] * n_layers
    names: list[str] = []
    for item in spec.split(","):
        name, _, count = item.strip().partition("*")
        if not name or (count and not count.strip().isdigit()):
            raise ConfigError(
                f"attention.layers: bad item {item!r}; use name or name*count, e.g. 'nsa*6,dense*2'"
            )
        names += [name.strip()] * (int(count) if count else 1)
    if len(names) != n_layers:
        raise ConfigError(
            f"attention.layers={spec!r} names {len(names)} layers but model.n_layers={n_layers}"
        )
    return names


def attention_shape(cfg: ExperimentConfig) -> AttentionShape:
    """The attention geometry every layer of the model is built with."""
    m = cfg.model
    return AttentionShape(
        d_model=m.d_model,
        n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads,
        head_dim=m.head_dim or m.d_model // m.n_heads,
        max_seq_len=m.max_seq_len or cfg.data.seq_len,
        rope_theta=m.rope_theta,
        rope_dim=m.rope_dim,
    )


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid; allowed: {allowed}")


def validate_config(cfg: ExperimentConfig) -> None:
    """Check ranges and cross-field rules; raise ConfigError naming the key and allowed values."""
    m, d, t = cfg.model, cfg.data, cfg.train
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads"):
        _check(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), ">= 1")
    _check(
        m.short_conv == 0 or m.short_conv >= 2,
        "model.short_conv",
        m.short_conv,
        "0 (no convolution) or a width >= 2 (taps over the current and earlier tokens)",
    )
    _check(m.vocab_size >= 0, "model.vocab_size", m.vocab_size, ">= 0 (0 = from tokenizer)")
    _check(
        m.n_heads % m.n_kv_heads == 0,
        "model.n_kv_heads",
        m.n_kv_heads,
        f"a divisor of model.n_heads={m.n_heads}",
    )
    if m.head_dim is None:
        _check(
            m.d_model % m.n_heads == 0,
            "model.d_model",
            m.d_model,
            f"a multiple of model.n_heads={m.n_heads} (or set model.head_dim)",
        )
    _check(d.seq_len >= 1, "data.seq_len", d.seq_len, ">= 1")
    _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "0 < x < 1")
    _check(len(d.corpus) > 0, "data.corpus", d.corpus, "'stdlib' or a list of files/globs")
    _check(d.max_bytes is None or d.max_bytes > 0, "data.max_bytes", d.max_bytes, "> 0 or null")
    _check(256 < d.vocab_size <= 65535, "data.vocab_size", d.vocab_size, "257..65535")
    _check(0.0 <= d.passkey_mix <= 1.0, "data.passkey_mix", d.passkey_mix, "0..1 (0 = text only)")
    _check(d.passkey_len >= 1, "data.passkey_len", d.passkey_len, ">= 1")
    _check(
        not d.passkey_distinct or d.passkey_len <= N_DIGITS,
        "data.passkey_len",
        d.passkey_len,
        f"<= {N_DIGITS} with data.passkey_distinct (a passkey's digits are all different)",
    )
    _check(0.0 <= d.passkey_near <= 1.0, "data.passkey_near", d.passkey_near, "0..1")
    _check(0.0 <= d.passkey_edges <= 1.0, "data.passkey_edges", d.passkey_edges, "0..1")
    if d.passkey_mix > 0:
        vocab = m.vocab_size or d.vocab_size
        _check_spec(
            "data.passkey_mix",
            PasskeySpec,
            vocab,
            d.seq_len,
            0.0,
            d.passkey_len,
            d.passkey_distinct,
        )
    _check(t.max_steps >= 1, "train.max_steps", t.max_steps, ">= 1")
    _validate_curriculum(cfg)
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, ">= 1")
    _check(t.lr > 0, "train.lr", t.lr, "> 0")
    _check(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", t.min_lr_ratio, "0..1")
    _check(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, ">= 0")
    _check(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, ">= 0 (0 disables)")
    _check(t.precision in PRECISIONS, "train.precision", t.precision, ", ".join(PRECISIONS))
    _check(
        t.accelerator in ACCELERATORS, "train.accelerator", t.accelerator, ", ".join(ACCELERATORS)
    )
    _check(t.strategy in STRATEGIES, "train.strategy", t.strategy, ", ".join(STRATEGIES))
    if t.strategy == "fsdp" and t.accelerator == "cpu":
        raise ConfigError(
            "train.strategy=fsdp needs GPUs (Lightning 2.6 rejects FSDP on accelerator=cpu); "
            "use train.strategy=ddp on CPU"
        )
    for key in (
        "val_every",
        "val_batches",
        "log_every",
        "checkpoint_every",
        "devices",
        "num_nodes",
    ):
        _check(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), ">= 1")
    try:
        shape = attention_shape(cfg)
    except MechanismConfigError as exc:
        raise ConfigError(f"model: {exc}") from exc
    names = parse_layer_spec(cfg.attention.layers, cfg.attention.mechanism, m.n_layers)
    for name in {*names, *cfg.attention.params}:
        try:
            cls = get_mechanism(name)
        except UnknownMechanismError as exc:
            raise ConfigError(f"attention: {exc}") from exc
        try:
            cls.Params.from_dict(dict(cfg.attention.params.get(name, {}))).validate(shape)
        except (MechanismConfigError, TypeError) as exc:
            raise ConfigError(f"attention.params.{name}: {exc}") from exc
    for i, phase in enumerate(cfg.data.curriculum):
        for name, knobs in phase.attention_params.items():
            _validate_phase_knobs(cfg, shape, f"data.curriculum[{i}].attention_params", name, knobs)
    _validate_eval(cfg)


def _validate_phase_knobs(
    cfg: ExperimentConfig, shape: AttentionShape, key: str, name: str, knobs: dict[str, Any]
) -> None:
    """A phase's knobs for mechanism ``name``: phase knobs of a registered mechanism
    (``MechanismParams.phase_knobs``), valid over ``attention.params``."""
    try:
        cls = get_mechanism(name)
    except UnknownMechanismError as exc:
        raise ConfigError(f"{key}: {exc}") from exc
    allowed = cls.Params.phase_knobs()
    for knob_name, value in knobs.items():
        if knob_name not in allowed:
            raise ConfigError(
                f"{key}.{name}.{knob_name}={value!r} cannot change between phases; the knobs a "
                f"phase may set for {name}: {', '.join(allowed) or 'none'}"
            )
    try:
        cls.Params.from_dict({**cfg.attention.params.get(name, {}), **knobs}).validate(shape)
    except (MechanismConfigError, TypeError) as exc:
        raise ConfigError(f"{key}.{name}: {exc}") from exc


def _validate_curriculum(cfg: ExperimentConfig) -> None:
    """Each phase's length, steps, batch size and passkey mix; the last phase keeps >= 1 step."""
    d, t = cfg.data, cfg.train
    vocab = cfg.model.vocab_size or d.vocab_size
    for i, phase in enumerate(d.curriculum):
        key = f"data.curriculum[{i}]"
        _check(
            1 <= phase.seq_len <= d.seq_len,
            f"{key}.seq_len",
            phase.seq_len,
            f"1 .. data.seq_len={d.seq_len} (the model is built for data.seq_len)",
        )
        _check(phase.steps >= 1, f"{key}.steps", phase.steps, ">= 1")
        _check(phase.batch_size >= 0, f"{key}.batch_size", phase.batch_size, ">= 0 (0 = train's)")
        for name in ("passkey_mix", "passkey_near"):
            value = getattr(phase, name)
            _check(value is None or 0.0 <= value <= 1.0, f"{key}.{name}", value, "0..1 or null")
        if phase_passkey_mix(cfg, phase) > 0:
            spec = (vocab, phase.seq_len, 0.0, d.passkey_len, d.passkey_distinct)
            _check_spec(f"{key}.seq_len", PasskeySpec, *spec)
    steps = sum(phase.steps for phase in d.curriculum)
    _check(
        steps < t.max_steps,
        "train.max_steps",
        t.max_steps,
        f"> the data.curriculum phases' {steps} steps (the rest train at data.seq_len)",
    )


def phase_passkey_mix(cfg: ExperimentConfig, phase: CurriculumPhase) -> float:
    """A curriculum phase's share of passkey rows (its own, else ``data.passkey_mix``)."""
    return cfg.data.passkey_mix if phase.passkey_mix is None else phase.passkey_mix


def phase_attention_params(cfg: ExperimentConfig, step: int) -> dict[str, dict[str, Any]]:
    """The mechanism knobs the curriculum phase holding training step ``step`` sets, keyed by
    mechanism ({} from the end of the phases on)."""
    end = 0
    for phase in cfg.data.curriculum:
        end += phase.steps
        if step < end:
            return {name: dict(knobs) for name, knobs in phase.attention_params.items()}
    return {}


def trains_on_passkeys(cfg: ExperimentConfig) -> bool:
    """Whether any training step has passkey rows (then the loss is averaged per row)."""
    mixes = [cfg.data.passkey_mix, *(phase_passkey_mix(cfg, p) for p in cfg.data.curriculum)]
    return max(mixes) > 0


def eval_lengths(cfg: ExperimentConfig, task: str) -> list[int]:
    """The context lengths an eval task runs at: its own ``lengths``, else ``data.seq_len``."""
    return list(getattr(cfg.eval, task).lengths) or [cfg.data.seq_len]


def extrapolation_lengths(cfg: ExperimentConfig) -> list[int]:
    """The extrapolation suite's lengths: each factor times the training length."""
    return [factor * cfg.data.seq_len for factor in cfg.eval.extrapolation.factors]


def _check_spec(key: str, spec: type, *args: Any) -> None:
    """Build a synthetic task spec; its ValueError becomes a ConfigError naming ``key``."""
    try:
        spec(*args)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from exc


def _check_items(values: Sequence[Any], key: str, ok: Any, allowed: str) -> None:
    """A list setting must be non-empty, without repeats, and ``ok`` for every item."""
    _check(
        len(values) > 0 and len(set(values)) == len(values) and all(ok(v) for v in values),
        key,
        list(values),
        f"a non-empty list without repeats of {allowed}",
    )


def _validate_eval(cfg: ExperimentConfig) -> None:
    """Check the eval section: suite names, and the settings of every task that will run.

    Tasks that no named suite runs are not checked, so a short training config does not have to
    shrink the default grids of suites it never uses.
    """
    e = cfg.eval
    if e.suites:
        _check_items(e.suites, "eval.suites", lambda s: s in EVAL_SUITES, ", ".join(EVAL_SUITES))
    _check(e.batch_size >= 1, "eval.batch_size", e.batch_size, ">= 1")
    _check(e.seed >= 0, "eval.seed", e.seed, ">= 0")
    _check(e.device in ("auto", "cpu", "cuda"), "eval.device", e.device, "auto, cpu, cuda")
    lengths = {t: eval_lengths(cfg, t) if t in e.suites else [] for t in EXTRAPOLATION_TASKS}
    if "extrapolation" in e.suites:
        x = e.extrapolation
        _check_items(x.factors, "eval.extrapolation.factors", lambda f: f >= 2, "integers >= 2")
        allowed = ", ".join(EXTRAPOLATION_TASKS)
        _check_items(x.tasks, "eval.extrapolation.tasks", EXTRAPOLATION_TASKS.__contains__, allowed)
        for task in x.tasks:
            lengths[task] += extrapolation_lengths(cfg)
    for task, task_lengths in lengths.items():
        if task_lengths:
            _validate_eval_task(cfg, task, task_lengths)


def _validate_eval_task(cfg: ExperimentConfig, task: str, lengths: list[int]) -> None:
    """One eval task's settings, and that its sequences fit every length it will run at."""
    section, key = getattr(cfg.eval, task), f"eval.{task}"
    vocab = cfg.model.vocab_size or cfg.data.vocab_size
    if section.lengths:
        _check_items(section.lengths, f"{key}.lengths", lambda n: n >= 1, "integers >= 1")
    _check(section.samples >= 1, f"{key}.samples", section.samples, ">= 1")
    if task == "passkey":
        _check_items(section.depths, f"{key}.depths", lambda p: 0 <= p <= 100, "percents 0..100")
        for n in lengths:
            spec = (vocab, n, 0.0, cfg.data.passkey_len, cfg.data.passkey_distinct)
            _check_spec(f"{key} at length {n}", PasskeySpec, *spec)
    elif task == "mqar":
        _check_items(section.n_pairs, f"{key}.n_pairs", lambda p: p >= 1, "integers >= 1")
        for n in lengths:
            for pairs in section.n_pairs:
                _check_spec(f"{key} at length {n}", MQARSpec, vocab, n, pairs)
    else:
        shortest = min(lengths)
        _check(
            1 <= section.buckets <= shortest,
            f"{key}.buckets",
            section.buckets,
            f"1 .. the shortest length evaluated ({shortest})",
        )


def to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (saved with every run, loadable by :func:`load_config`)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: ExperimentConfig) -> dict[str, str]:
    """The resolved config as flat ``a.b.c -> str(value)`` pairs (MLflow params)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, DictConfig):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, ListConfig):
            out[prefix[:-1]] = ",".join(str(x) for x in node)
        else:
            out[prefix[:-1]] = str(node)

    walk(OmegaConf.structured(cfg), "")
    return out
