"""``sparsezoo bench``: time registered attention mechanisms against dense attention, side by side.

Every mechanism is built with the same attention shape and seed, and measured in one process,
interleaved (dense, m1, m2, dense, m1, m2, ...) after warm-up; the median of the repeats is the
reported time, and speedups are ratios against dense measured in the same rounds. Next to each
measured speedup the analytic cost model gives the theoretical one (dense over the mechanism:
attention FLOPs of the whole prefill for ``fwd``/``fwdbwd``, which are compute-bound; cached rows
read for the decode modes, which are memory-bound) and the share of it reached. Results go to a
rich table, a JSON file with every raw repeat time, a PNG plot, and an MLflow run tagged
``sparsezoo.kind=bench``.

Modes: ``fwd`` is the prefill forward of the whole mechanism module (projections, RoPE,
attention) without autograd; ``fwdbwd`` adds the backward of ``y.sum()`` (plus the mechanism's
auxiliary losses) w.r.t. the input and every parameter; ``decode`` is one new token against a
cache already holding T tokens, and ``decode_attn`` times only the part of that step that reads
the cache (the output of ``AttentionMechanism.decode_reader``): projections and the cache
append run untimed, since at B=1 the weights of a large model (2·C·HQ·D for Q and O) can
outweigh a long KV cache and hide the attention cost. Both decode modes read one kept cache,
reset in place to the filled state before each step (``restore_cache``), as a decoder's cache is
long-lived memory. Mechanisms whose training runs in phases are measured in the phase of
``train_step``, by default past every warm-up (DSA: sparse top-k attention, not its dense
warm-up stage). Legend: B batch, T time, C d_model.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from mlflow.entities import Metric
from rich.console import Console
from rich.table import Table

from sparsezoo.mechanisms.base import (
    AttentionMechanism,
    AttentionShape,
    KVCache,
    MechanismConfigError,
)
from sparsezoo.perf import PeakMemory, evict_caches, time_ms
from sparsezoo.registry import UnknownMechanismError, build_attention, get_mechanism
from sparsezoo.registry import list_mechanisms as registered_mechanisms
from sparsezoo.tracking import (
    MlflowClient,
    TrackingError,
    check_tracking,
    create_run,
    log_params,
    resolve_tracking_uri,
    run_status,
)

BASELINE = "dense"
MODES = ("fwd", "fwdbwd", "decode", "decode_attn")
DECODE_MODES = ("decode", "decode_attn")
# decode_attn is opt-in: it needs every benchmarked mechanism to split its decode step
DEFAULT_MODES = ("fwd", "fwdbwd", "decode")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda")
MLFLOW_BATCH = 1000  # MLflow's limit on metrics per log_batch call
# the training step a bench module is set to by default: past any mechanism's warm-up
FINAL_PHASE_STEP = 1 << 62
# CPUs other processes may keep busy at the start before the bench warns
_BUSY_CPUS = 0.5

# BenchConfig field -> the command-line flag that sets it, so errors name what the user typed.
_FLAGS = {
    "mechanisms": "--mechanisms",
    "modes": "--modes",
    "lengths": "--lengths",
    "batch_size": "--batch",
    "n_heads": "--heads",
    "n_kv_heads": "--kv-heads",
    "head_dim": "--head-dim",
    "d_model": "--d-model",
    "shape": "--heads/--kv-heads/--head-dim/--d-model",
    "dtype": "--dtype",
    "device": "--device",
    "warmup": "--warmup",
    "repeats": "--repeats",
    "seed": "--seed",
    "threads": "--threads",
    "train_step": "--train-step",
    "params": "--param",
    "out": "--out",
}


class BenchConfigError(ValueError):
    """A bench setting is invalid; ``field`` names the setting and the message the bad value."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class BenchConfig:
    """What to benchmark: mechanisms, modes, lengths, attention shape, precision, device, repeats.

    ``dense`` is always measured as the baseline, whether or not it is listed. ``d_model``
    defaults to ``n_heads * head_dim``; ``device="auto"`` picks CUDA when available;
    ``threads=0`` keeps torch's default thread count. ``params`` maps a mechanism name to its
    knobs (``{"sliding_window": {"window": 512}}``). ``train_step`` is the training step every
    module is set to (``set_step``), which decides the phase of phase-scheduled mechanisms;
    None means past every warm-up, so DSA is measured sparse whatever its ``warmup_steps``.
    """

    mechanisms: list[str] = field(default_factory=list)
    modes: list[str] = field(default_factory=lambda: list(DEFAULT_MODES))
    lengths: list[int] = field(default_factory=lambda: [4096, 8192, 16384])
    batch_size: int = 1
    n_heads: int = 16
    n_kv_heads: int = 1
    head_dim: int = 64
    d_model: int | None = None
    dtype: str = "float32"
    device: str = "auto"
    warmup: int = 1
    repeats: int = 5
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0
    threads: int = 0
    train_step: int | None = None

    def mechanism_names(self) -> list[str]:
        """The baseline first, then the requested mechanisms in order, each once."""
        return list(dict.fromkeys([BASELINE, *self.mechanisms]))

    def model_dim(self) -> int:
        """``d_model``, defaulting to ``n_heads * head_dim``."""
        return self.d_model if self.d_model is not None else self.n_heads * self.head_dim

    def shape(self) -> AttentionShape:
        """The attention shape every mechanism is built with (room for decode at the longest T)."""
        return AttentionShape(
            d_model=self.model_dim(),
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            max_seq_len=max(self.lengths) + 1,
        )

    def resolved_device(self) -> torch.device:
        """The device to measure on: ``auto`` means CUDA when available, else CPU."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def validate(self) -> None:
        """Raise BenchConfigError naming the first invalid field and its offending value."""
        if not self.modes:
            raise BenchConfigError("modes", f"at least one mode is needed; choose from {MODES}")
        for mode in self.modes:
            if mode not in MODES:
                raise BenchConfigError("modes", f"unknown mode {mode!r}; choose from {MODES}")
        if not self.lengths:
            raise BenchConfigError("lengths", "at least one sequence length is needed")
        for length in self.lengths:
            if isinstance(length, bool) or not isinstance(length, int) or length < 1:
                raise BenchConfigError("lengths", f"{length!r} is not a positive integer")
        minimums = {"batch_size": 1, "n_heads": 1, "n_kv_heads": 1, "head_dim": 1, "repeats": 1}
        minimums |= {"warmup": 0, "threads": 0, "d_model": 1, "train_step": 0}
        for name, low in minimums.items():
            value = getattr(self, name)
            if value is None and name in ("d_model", "train_step"):
                continue  # unset: derived from the shape / past every warm-up
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BenchConfigError(name, f"{value!r} is not an integer >= {low}")
        if self.dtype not in DTYPES:
            raise BenchConfigError("dtype", f"{self.dtype!r} is not one of {list(DTYPES)}")
        if self.device not in DEVICES:
            raise BenchConfigError("device", f"{self.device!r} is not one of {list(DEVICES)}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BenchConfigError("device", "'cuda' requested but CUDA is not available")
        try:
            shape = self.shape()
        except MechanismConfigError as exc:
            raise BenchConfigError("shape", str(exc)) from exc
        names = self.mechanism_names()
        for name in names:
            try:
                get_mechanism(name)
            except UnknownMechanismError as exc:
                raise BenchConfigError("mechanisms", str(exc)) from exc
        unsplit = [n for n in names if not _splits_decode(get_mechanism(n))]
        if "decode_attn" in self.modes and unsplit:
            raise BenchConfigError(
                "modes",
                f"decode_attn needs mechanisms that split their decode step (decode_reader); "
                f"{', '.join(unsplit)} do not: use decode for them",
            )
        for name, knobs in self.params.items():
            if name not in names:
                raise BenchConfigError(
                    "params", f"{name!r} is not benchmarked (benchmarked: {', '.join(names)})"
                )
            cls = get_mechanism(name)
            try:
                cls.Params.from_dict(dict(knobs)).validate(shape)
            except (MechanismConfigError, TypeError, ValueError) as exc:
                raise BenchConfigError("params", f"{name}: {exc}") from exc


@dataclass
class BenchRow:
    """One mechanism in one mode at one length: raw repeat times, median, ratios, memory.

    ``speedup`` is dense's median over this median (measured in the same rounds);
    ``speedup_min`` and ``speedup_max`` bound the paired ratios of single rounds (dense's time
    over this one's in the same round), so a target inside the machine's round-to-round spread
    shows as one; ``theoretical_speedup`` is the cost model's ratio (prefill FLOPs, or rows
    read per decode step) and ``share`` their quotient.
    ``peak_mem_mb`` (allocator bytes held at once) and ``peak_rss_mb`` (resident set, CPU only;
    0 on CUDA) are measured in one extra untimed call (see :class:`sparsezoo.perf.PeakMemory`).
    ``rows_read`` is the KV rows per KV head the decode step read.
    """

    mode: str
    seq_len: int
    mechanism: str
    times_ms: list[float]
    median_ms: float
    speedup: float
    speedup_min: float
    speedup_max: float
    theoretical_speedup: float
    share: float
    peak_mem_mb: float
    peak_rss_mb: float
    rows_read: int | None


@dataclass
class BenchResult:
    """The resolved config, the environment measured on, and one row per (mode, T, mechanism)."""

    config: BenchConfig
    environment: dict[str, Any]
    rows: list[BenchRow]

    def row(self, mode: str, seq_len: int, mechanism: str) -> BenchRow:
        """The row of ``mechanism`` in ``mode`` at length ``seq_len`` (KeyError when absent)."""
        for r in self.rows:
            if (r.mode, r.seq_len, r.mechanism) == (mode, seq_len, mechanism):
                return r
        raise KeyError(f"no bench row for mode={mode} T={seq_len} mechanism={mechanism}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: config, environment and rows (with every raw repeat time)."""
        return {
            "config": dataclasses.asdict(self.config),
            "environment": self.environment,
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }


class _Case:
    """One mechanism in one mode at one length: an untimed ``prepare`` and a timed ``step``."""

    def __init__(
        self, module: AttentionMechanism, mode: str, x_BTC: torch.Tensor, token_B1C: torch.Tensor
    ) -> None:
        self.module = module
        self.mode = mode
        self.x_BTC = x_BTC
        self.token_B1C = token_B1C
        self.cache: KVCache | None = None
        self.filled: KVCache | None = None
        self.reader: Callable[[], torch.Tensor] | None = None
        # Inference modes run in eval mode, training in train mode, as a model would.
        module.train(mode == "fwdbwd")
        if mode == "fwdbwd":
            self.x_BTC = x_BTC.detach().clone().requires_grad_(True)
        if mode in DECODE_MODES:
            B, T, _ = x_BTC.shape
            self.filled = module.new_cache(B, T + 1)
            module.fill_cache(x_BTC, self.filled)
            self.cache = copy.deepcopy(self.filled)

    def prepare(self) -> None:
        """Reset state outside the timed region so every step does identical work."""
        if self.mode == "fwdbwd":
            self.module.zero_grad(set_to_none=True)
            self.x_BTC.grad = None
        elif self.mode in DECODE_MODES:
            assert self.cache is not None and self.filled is not None
            # The filled cache's whole state copied back, rather than rewinding ``length``,
            # because mechanisms may subclass KVCache with state a rewind would leave stale; so
            # every step decodes against exactly T cached tokens.
            restore_cache(self.cache, self.filled)
            # cold, as in a model whose other layers ran since: restoring left part of it hot
            evict_caches(self.x_BTC.device)
            if self.mode == "decode_attn":
                with torch.no_grad():
                    self.reader = self.module.decode_reader(self.token_B1C, self.cache)

    def step(self) -> None:
        """The measured work of this mode."""
        if self.mode == "fwd":
            # no_grad rather than inference_mode: tensors a mechanism caches during this call
            # stay usable when the same module is later measured with autograd.
            with torch.no_grad():
                self.module(self.x_BTC)
        elif self.mode == "fwdbwd":
            y_BTC = self.module(self.x_BTC)
            # The auxiliary losses are part of what a training step differentiates.
            loss = sum(self.module.aux_losses.values(), y_BTC.sum())
            loss.backward()
        elif self.mode == "decode":
            with torch.no_grad():
                self.module(self.token_B1C, cache=self.cache)
        else:
            with torch.no_grad():
                self.reader()

    @property
    def rows_read(self) -> int | None:
        """KV rows the last decode step read (None outside decode)."""
        return None if self.cache is None else int(self.cache.rows_read)

    def release(self) -> None:
        """Drop gradients and caches so the next mode starts from the same memory."""
        self.module.zero_grad(set_to_none=True)
        self.cache = self.filled = self.reader = None


def restore_cache(cache: KVCache, filled: KVCache) -> None:
    """Reset ``cache`` (a deep copy of ``filled``) to ``filled``'s state, in place.

    Tensors are copied into the cache's own buffers, so every decode step reads the same
    long-lived memory, as a decoder's cache is; other attributes (and tensors a step replaced
    by one of another shape or dtype) are deep-copied. A fresh deep copy per step instead read
    K/V from memory allocated just before the step, which on this project's CPU machines was
    measured 3-4x slower to gather from than a kept buffer (DSA's 64k decode read: 22-30 ms
    from fresh copies, 6.4-7.1 ms from one kept cache), a cost no decoder pays.
    """
    for name, value in vars(filled).items():
        mine = getattr(cache, name, None)
        same = (
            isinstance(value, torch.Tensor)
            and isinstance(mine, torch.Tensor)
            and (mine.shape, mine.dtype) == (value.shape, value.dtype)
        )
        if same:
            mine.copy_(value)
        else:
            setattr(cache, name, copy.deepcopy(value))


def _splits_decode(cls: type[AttentionMechanism]) -> bool:
    """Whether ``cls`` overrides ``decode_reader``, so ``decode_attn`` can time its cache read."""
    return cls.decode_reader is not AttentionMechanism.decode_reader


def _prefill_flops(module: AttentionMechanism, max_len: int) -> list[float]:
    """Cumulative attention FLOPs of a causal prefill: element T sums cost(t).flops, t <= T."""
    cumulative = [0.0]
    for t in range(1, max_len + 1):
        cumulative.append(cumulative[-1] + module.cost(t).flops)
    return cumulative


def _build(name: str, cfg: BenchConfig, device: torch.device) -> AttentionMechanism:
    """Build ``name`` with the bench shape, knobs and seed, on the device in the bench dtype."""
    shape = cfg.shape()
    # The same seed for every mechanism gives them identical shared projections, and the forked
    # RNG keeps the caller's random state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(cfg.seed)
        module = build_attention(
            name,
            d_model=shape.d_model,
            n_heads=shape.n_heads,
            n_kv_heads=shape.n_kv_heads,
            head_dim=shape.head_dim,
            max_seq_len=shape.max_seq_len,
            **cfg.params.get(name, {}),
        )
    # a freshly built DSA sits at step 0, in its dense warm-up: the bench measures the phase
    # the user asked for, by default the one the mechanism trains and decodes in after it
    module.set_step(FINAL_PHASE_STEP if cfg.train_step is None else cfg.train_step)
    return module.to(device=device, dtype=DTYPES[cfg.dtype])


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else the platform's processor or machine."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _busy_cpus(window_s: float = 0.5) -> float | None:
    """CPUs other processes kept busy over ``window_s`` while this one slept (from /proc/stat;
    None where it does not exist). Unlike the load average it does not count this process's
    own work of the last minute, e.g. a bench run just before."""
    stat = Path("/proc/stat")
    if not stat.is_file():
        return None

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle and iowait
        return sum(fields) - idle, sum(fields)

    busy0, total0 = sample()
    time.sleep(window_s)
    busy1, total1 = sample()
    return (os.cpu_count() or 1) * (busy1 - busy0) / max(1, total1 - total0)


def _environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on, including how busy other processes kept the machine
    at the start: they skew multi-threaded kernels, dense's among them, more than the
    single-threaded workers of the sparse mechanisms."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "busy_cpus_start": _busy_cpus(),
        "started": datetime.now().isoformat(timespec="seconds"),
    }


def run_bench(cfg: BenchConfig, progress: bool = True) -> BenchResult:
    """Measure every mechanism of ``cfg`` against dense in every mode at every length.

    For each length and mode all mechanisms are warmed up, then timed interleaved within each
    repeat; their peak memory is measured in one extra untimed call. Nothing is written: the
    result holds the resolved config, the environment and one row per (mode, T, mechanism).
    With ``progress`` a line per (mode, T) goes to stderr.
    """
    cfg.validate()
    device = cfg.resolved_device()
    names = cfg.mechanism_names()
    resolved = dataclasses.replace(
        cfg, mechanisms=names, d_model=cfg.model_dim(), device=device.type
    )
    console = Console(stderr=True, highlight=False) if progress else None
    default_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        environment = _environment(device)
        busy = environment["busy_cpus_start"]
        if console is not None and busy is not None and busy > _BUSY_CPUS:
            console.print(
                f"warning: other processes keep {busy:.1f} of {environment['cpu_count']} CPUs "
                "busy: ratios against multi-threaded kernels are unreliable"
            )
        modules = {name: _build(name, resolved, device) for name in names}
        # every knob each module runs with, defaults included, goes with the result
        knobs = {name: dataclasses.asdict(m.params) for name, m in modules.items()}
        resolved = dataclasses.replace(resolved, params={n: k for n, k in knobs.items() if k})
        max_len = max(cfg.lengths)
        prefill_flops = (
            {name: _prefill_flops(m, max_len) for name, m in modules.items()}
            if {"fwd", "fwdbwd"} & set(cfg.modes)
            else {}
        )
        rows: list[BenchRow] = []
        generator = torch.Generator().manual_seed(cfg.seed)
        for T in cfg.lengths:
            x_BTC = torch.randn(cfg.batch_size, T + 1, resolved.model_dim(), generator=generator)
            x_BTC = x_BTC.to(device=device, dtype=DTYPES[cfg.dtype])
            for mode in cfg.modes:
                cases = {
                    name: _Case(module, mode, x_BTC[:, :T], x_BTC[:, T:])
                    for name, module in modules.items()
                }
                times = _measure(cases, cfg.warmup, cfg.repeats, device)
                peaks = _peak_memory(cases, device)
                for name, module in modules.items():
                    if mode in DECODE_MODES:
                        # the rows the step read (measured: MoBA's heads of a group may route
                        # to different blocks) plus the cost model's side rows (DSA's indexer)
                        read = cases[name].rows_read + module.cost(T + 1).side_rows
                        theory = cases[BASELINE].rows_read / read
                    else:
                        theory = prefill_flops[BASELINE][T] / prefill_flops[name][T]
                    rows.append(
                        _row(mode, T, name, times, theory, peaks[name], cases[name].rows_read)
                    )
                for case in cases.values():
                    case.release()
                if console is not None:
                    done = "  ".join(
                        f"{r.mechanism} {r.median_ms:.2f} ms" for r in rows[-len(names) :]
                    )
                    console.print(f"{mode:<7} T={T:<7} {done}")
    finally:
        torch.set_num_threads(default_threads)
    return BenchResult(config=resolved, environment=environment, rows=rows)


def _row(
    mode: str,
    seq_len: int,
    name: str,
    times: dict[str, list[float]],
    theory: float,
    peak: tuple[float, float],
    rows_read: int | None,
) -> BenchRow:
    """Summarize one mechanism's repeat times against the baseline's from the same rounds."""
    median = statistics.median(times[name])
    speedup = statistics.median(times[BASELINE]) / median
    paired = [base / ms for base, ms in zip(times[BASELINE], times[name], strict=True)]
    return BenchRow(
        mode=mode,
        seq_len=seq_len,
        mechanism=name,
        times_ms=times[name],
        median_ms=median,
        speedup=speedup,
        speedup_min=min(paired),
        speedup_max=max(paired),
        theoretical_speedup=theory,
        share=speedup / theory,
        peak_mem_mb=peak[0],
        peak_rss_mb=peak[1],
        rows_read=rows_read,
    )


def _measure(
    cases: dict[str, _Case], warmup: int, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Warm every case up, then time them interleaved, one step each per repeat round; each
    round starts one case later than the previous, so none always runs first."""
    for _ in range(warmup):
        for case in cases.values():
            case.prepare()
            case.step()
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(repeats):
        first = r % len(names)
        for name in names[first:] + names[:first]:
            cases[name].prepare()
            times[name].append(time_ms(cases[name].step, device))
    return times


def _peak_memory(cases: dict[str, _Case], device: torch.device) -> dict[str, tuple[float, float]]:
    """Peak (allocator, RSS) MB of one untimed step per case (sampling would perturb the timed
    ones)."""
    peaks = {}
    for name, case in cases.items():
        case.prepare()
        # Collect garbage first so the baseline taken at entry is not inflated by dead objects.
        gc.collect()
        with PeakMemory(device) as peak:
            case.step()
        peaks[name] = (peak.peak_mb, peak.peak_rss_mb)
    return peaks


def render_table(result: BenchResult) -> Table:
    """The result as a rich table: one line per (mode, T, mechanism), with ratios and memory."""
    cfg = result.config
    table = Table(
        title=(
            f"sparsezoo bench: {result.environment['device']} {cfg.dtype}, B={cfg.batch_size}, "
            f"HQ={cfg.n_heads}, H={cfg.n_kv_heads}, D={cfg.head_dim}, C={cfg.d_model}, "
            f"median of {cfg.repeats} (warm-up {cfg.warmup})"
        )
    )
    for header in ("mode", "T", "mechanism"):
        table.add_column(header, no_wrap=True)
    numeric = (
        "median ms",
        "speedup",
        "rounds",
        "theoretical",
        "share",
        "peak MB",
        "RSS MB",
        "rows read",
    )
    for header in numeric:
        table.add_column(header, justify="right")
    for r in result.rows:
        table.add_row(
            r.mode,
            str(r.seq_len),
            r.mechanism,
            f"{r.median_ms:.2f}",
            f"{r.speedup:.2f}x",
            f"{r.speedup_min:.2f}-{r.speedup_max:.2f}x",
            f"{r.theoretical_speedup:.2f}x",
            f"{r.share:.0%}",
            f"{r.peak_mem_mb:.1f}",
            f"{r.peak_rss_mb:.1f}",
            "-" if r.rows_read is None else str(r.rows_read),
        )
    return table


def _plot(result: BenchResult, path: Path) -> None:
    """Median ms against T per mechanism, one log-log subplot per mode, saved as PNG."""
    modes = result.config.modes
    # A bare Figure renders through Agg without touching pyplot's global backend state.
    fig = Figure(figsize=(5 * len(modes), 4), layout="constrained")
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    for ax, mode in zip(axes, modes, strict=True):
        for name in result.config.mechanisms:
            points = sorted(
                (r.seq_len, r.median_ms)
                for r in result.rows
                if (r.mode, r.mechanism) == (mode, name)
            )
            ax.plot([t for t, _ in points], [ms for _, ms in points], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(mode)
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel("median ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    cfg = result.config
    fig.suptitle(
        f"{result.environment['device']} {cfg.dtype}, B={cfg.batch_size}, HQ={cfg.n_heads}, "
        f"H={cfg.n_kv_heads}, D={cfg.head_dim}"
    )
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def write_outputs(result: BenchResult, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``bench.json`` (config, environment, rows with raw times) and ``bench.png``.

    Each file is written to a temporary name and renamed, so an interrupted write never leaves
    a truncated file behind. Returns the JSON and PNG paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "bench.json", out / "bench.png"
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    os.replace(tmp, json_path)
    _plot(result, png_path)
    return json_path, png_path


def flatten_config(cfg: BenchConfig) -> dict[str, str]:
    """The config as flat MLflow params: lists comma-joined, knobs as ``params.<mech>.<knob>``."""
    flat: dict[str, str] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "params":
            for name, knobs in sorted(value.items()):
                for knob, knob_value in sorted(knobs.items()):
                    flat[f"params.{name}.{knob}"] = str(knob_value)
        elif isinstance(value, list):
            flat[f.name] = ",".join(str(v) for v in value)
        else:
            flat[f.name] = str(value)
    return flat


def bench_metrics(result: BenchResult) -> dict[str, float]:
    """Metrics under stable keys ``bench/<mode>/<mechanism>/T<len>/<name>``.

    Names are ``ms`` (median), ``speedup``, ``speedup_min`` and ``speedup_max`` (the range of
    single rounds' paired ratios), ``theoretical_speedup``, ``peak_mem_mb``, ``peak_rss_mb``,
    and ``rows_read`` for decode rows.
    """
    metrics: dict[str, float] = {}
    for r in result.rows:
        prefix = f"bench/{r.mode}/{r.mechanism}/T{r.seq_len}"
        metrics[f"{prefix}/ms"] = r.median_ms
        metrics[f"{prefix}/speedup"] = r.speedup
        metrics[f"{prefix}/speedup_min"] = r.speedup_min
        metrics[f"{prefix}/speedup_max"] = r.speedup_max
        metrics[f"{prefix}/theoretical_speedup"] = r.theoretical_speedup
        metrics[f"{prefix}/peak_mem_mb"] = r.peak_mem_mb
        metrics[f"{prefix}/peak_rss_mb"] = r.peak_rss_mb
        if r.rows_read is not None:
            metrics[f"{prefix}/rows_read"] = float(r.rows_read)
    return metrics


def log_to_mlflow(
    result: BenchResult,
    paths: Sequence[str | os.PathLike[str]],
    uri: str | None = None,
    experiment: str = "bench",
) -> str:
    """Log the result as one MLflow run tagged ``sparsezoo.kind=bench``; return its run id.

    Params are the flattened resolved config, metrics come from :func:`bench_metrics`, and
    ``paths`` (the JSON and the PNG) become artifacts. The run ends FAILED if logging fails.
    Raises TrackingError when the store at ``uri`` (resolved as everywhere in sparsezoo) is
    unusable.
    """
    uri = resolve_tracking_uri(uri)
    check_tracking(uri)
    client = MlflowClient(tracking_uri=uri)
    tags = {"sparsezoo.kind": "bench", "sparsezoo.mechanism": ",".join(result.config.mechanisms)}
    run_name = f"bench-{datetime.now():%Y%m%d-%H%M%S}"
    run_id = create_run(client, experiment, run_name, tags)
    with run_status(client, run_id):
        log_params(client, run_id, flatten_config(result.config))
        stamp = int(time.time() * 1000)
        metrics = [Metric(k, v, stamp, 0) for k, v in bench_metrics(result).items()]
        for i in range(0, len(metrics), MLFLOW_BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + MLFLOW_BATCH])
        for path in paths:
            client.log_artifact(run_id, str(path))
    return run_id


def parse_list(text: str) -> list[str]:
    """Split a comma-separated flag value, dropping blanks (``"a, b,"`` -> ``["a", "b"]``)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_lengths(text: str) -> list[int]:
    """Parse ``"4096,8k,16K"`` into token counts (``k`` means 1024); BenchConfigError otherwise."""
    lengths = []
    for item in parse_list(text):
        digits, multiplier = (item[:-1], 1024) if item[-1] in "kK" else (item, 1)
        if not digits.isdigit() or int(digits) < 1:
            raise BenchConfigError(
                "lengths", f"{item!r} is not a positive length (e.g. 4096 or 4k)"
            )
        lengths.append(int(digits) * multiplier)
    return lengths


def parse_param(text: str) -> tuple[str, str, Any]:
    """Parse ``"mechanism.knob=value"``; the value is a Python literal when it parses as one.

    ``window=512`` gives the int 512 and ``backend=torch`` the string ``"torch"``. Raises
    BenchConfigError for anything not of the form MECHANISM.KNOB=VALUE.
    """
    key, sep, raw = text.partition("=")
    name, dot, knob = key.strip().partition(".")
    if not (sep and dot and name and knob and raw.strip()):
        raise BenchConfigError("params", f"{text!r} is not of the form MECHANISM.KNOB=VALUE")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return name, knob.strip(), value


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``sparsezoo bench`` flags to ``parser`` (values are checked by bench_command)."""
    defaults = BenchConfig()
    parser.add_argument(
        "--mechanisms",
        default=None,
        help="comma-separated mechanisms to compare with dense (default: every registered one)",
    )
    parser.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help=f"comma-separated subset of {', '.join(MODES)} (default: {','.join(DEFAULT_MODES)})",
    )
    parser.add_argument(
        "--lengths",
        default="4k,8k,16k",
        help="comma-separated lengths, k = 1024 (default: 4k,8k,16k)",
    )
    parser.add_argument("--batch", type=int, default=defaults.batch_size, help="batch size")
    parser.add_argument("--heads", type=int, default=defaults.n_heads, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=defaults.n_kv_heads, help="KV heads")
    parser.add_argument("--head-dim", type=int, default=defaults.head_dim, help="head dim")
    parser.add_argument("--d-model", type=int, default=None, help="default: heads * head-dim")
    parser.add_argument("--dtype", choices=list(DTYPES), default=defaults.dtype)
    parser.add_argument("--device", choices=list(DEVICES), default=defaults.device)
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed calls")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed calls")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--threads", type=int, default=defaults.threads, help="torch threads (0: torch default)"
    )
    parser.add_argument(
        "--train-step",
        type=int,
        default=None,
        help="training step the mechanisms are set to, which picks the phase of phased ones "
        "(DSA: dense warm-up below warmup_steps; default: past every warm-up)",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="MECHANISM.KNOB=VALUE",
        help="a mechanism knob, e.g. sliding_window.window=512 (repeatable)",
    )
    parser.add_argument(
        "--out", default=None, help="output directory (default: bench_results/<timestamp>)"
    )
    parser.add_argument("--experiment", default="bench", help="MLflow experiment name")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Build and validate a BenchConfig from parsed ``sparsezoo bench`` arguments."""
    params: dict[str, dict[str, Any]] = {}
    for text in args.param:
        name, knob, value = parse_param(text)
        params.setdefault(name, {})[knob] = value
    mechanisms = registered_mechanisms() if args.mechanisms is None else parse_list(args.mechanisms)
    cfg = BenchConfig(
        mechanisms=mechanisms,
        modes=parse_list(args.modes),
        lengths=parse_lengths(args.lengths),
        batch_size=args.batch,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        d_model=args.d_model,
        dtype=args.dtype,
        device=args.device,
        warmup=args.warmup,
        repeats=args.repeats,
        params=params,
        seed=args.seed,
        threads=args.threads,
        train_step=args.train_step,
    )
    cfg.validate()
    return cfg


def bench_command(args: argparse.Namespace) -> int:
    """Run ``sparsezoo bench`` from parsed arguments; return the process exit code.

    Every input (and the tracking store, unless ``--no-mlflow``) is checked before measuring;
    a bad one prints an error naming the flag and value and returns 2 with nothing written.
    Prints the table, writes the JSON and PNG, and logs the MLflow run.
    """
    try:
        cfg = config_from_args(args)
        out_dir = (
            Path(args.out)
            if args.out
            else Path("bench_results") / datetime.now().strftime("%Y%m%d-%H%M%S")
        )
        if out_dir.exists() and not out_dir.is_dir():
            raise BenchConfigError("out", f"{str(out_dir)!r} exists and is not a directory")
        uri = None
        if not args.no_mlflow:
            uri = resolve_tracking_uri(args.tracking_uri)
            check_tracking(uri)
    except BenchConfigError as exc:
        print(
            f"sparsezoo bench: error: {_FLAGS.get(exc.field, exc.field)}: {exc.message}",
            file=sys.stderr,
        )
        return 2
    except TrackingError as exc:
        print(f"sparsezoo bench: error: --tracking-uri: {exc}", file=sys.stderr)
        return 2
    result = run_bench(cfg, progress=True)
    console = Console(highlight=False)
    if not console.is_terminal:
        # Rich assumes 80 columns when output is piped, which would truncate the table in logs.
        console.width = max(console.width, 140)
    console.print(render_table(result))
    json_path, png_path = write_outputs(result, out_dir)
    console.print(f"wrote {json_path} and {png_path}")
    if uri is not None:
        run_id = log_to_mlflow(result, (json_path, png_path), uri, args.experiment)
        console.print(f"MLflow run {run_id} (experiment {args.experiment!r}, {uri})")
    return 0
