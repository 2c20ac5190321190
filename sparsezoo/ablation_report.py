"""The ablation report, built from MLflow alone: a comparison table, CSV/Markdown, and plots.

Given an ablation's parent run (or an experiment, meaning its latest ablation), the children's
final metrics are grouped by grid point without the seed: per group the best validation loss
over seeds and its spread (max - min over finished seeds), the perplexity of the best seed, the
mean throughput, step time and measured density, the largest peak memory, and the mean of every
``eval/*`` metric any child logged. Plots: validation-loss curves by mechanism, quality against
wall-clock (step time) with the Pareto front, quality against measured density, and step time
against sequence length when ``data.seq_len`` is an axis. Everything is recomputed from the
tracking store, so a report can be rebuilt on another machine against a shared server.
"""

from __future__ import annotations

import csv
import io
import math
import re
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Run
from rich.table import Table

from sparsezoo.ablate import TAG_ABLATION, TAG_GRID, TAG_POINT
from sparsezoo.report import ReportError
from sparsezoo.tracking import resolve_tracking_uri

VAL_LOSS = "val/loss"
# (column title, metric key, how seeds are combined, format)
METRIC_COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("val ppl", "val/ppl", "best", "{:.2f}"),
    ("tokens/s", "perf/tokens_per_s", "mean", "{:,.0f}"),
    ("step ms", "perf/step_ms", "mean", "{:.1f}"),
    ("peak MB", "perf/peak_mem_mb", "max", "{:,.0f}"),
    ("density", "attn/density", "mean", "{:.3f}"),
)
PLOTS = ("val_loss_curves.png", "pareto_wallclock.png", "quality_vs_density.png")
LENGTH_PLOT = "cost_vs_length.png"
# extrapolation's main number of a task at a factor of the trained length (see eval/extrapolation)
_EXTRAPOLATION_HEADLINE = re.compile(r"eval/extrapolation/[^/]+/x\d+/[^/]+")


@dataclass
class ChildRun:
    """One grid point's run: identity, coordinates, status, error, final metrics."""

    run_id: str
    point: str
    mechanism: str
    coords: dict[str, str]
    status: str
    error: str
    metrics: dict[str, float]


@dataclass
class GroupRow:
    """One grid point over its seeds: the aggregated metrics the table shows."""

    mechanism: str
    point: str
    coords: dict[str, str]
    seeds: int
    finished: int
    metrics: dict[str, float] = field(default_factory=dict)
    spread: float = math.nan


@dataclass
class AblationReport:
    """The parent run, its children and the grouped rows, plus the eval metric keys seen."""

    parent_run_id: str
    name: str
    experiment_id: str
    children: list[ChildRun]
    rows: list[GroupRow]
    eval_keys: list[str]


def _is_run_id(ref: str) -> bool:
    return len(ref) == 32 and all(c in "0123456789abcdef" for c in ref)


def find_parent(client: MlflowClient, ref: str) -> Run:
    """The ablation parent run named by ``ref``: a run id, or an experiment (its latest one).

    Raises ReportError naming ``ref`` when it is neither an ablation run nor an experiment
    holding one.
    """
    if _is_run_id(ref):
        try:
            run = client.get_run(ref)
        except Exception as exc:
            raise ReportError(f"no MLflow run with id {ref!r}") from exc
        if run.data.tags.get("sparsezoo.kind") != "ablation":
            raise ReportError(f"run {ref} is not an ablation parent run")
        return run
    experiment = client.get_experiment_by_name(ref)
    if experiment is None:
        raise ReportError(f"no MLflow experiment named {ref!r} (and not a run id)")
    parents = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`sparsezoo.kind` = 'ablation'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not parents:
        raise ReportError(f"experiment {ref!r} has no ablation runs")
    return parents[0]


def _children(client: MlflowClient, parent: Run) -> list[ChildRun]:
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=10000,
    )
    latest: dict[str, Run] = {}
    for run in runs:  # a point retried on resume: its newest run counts
        latest[run.data.tags.get(TAG_POINT, run.info.run_id)] = run
    children = []
    for point, run in latest.items():
        tags = run.data.tags
        coords = {k[len(TAG_GRID) :]: v for k, v in tags.items() if k.startswith(TAG_GRID)}
        children.append(
            ChildRun(
                run.info.run_id,
                point,
                coords.get("mechanism", tags.get("sparsezoo.mechanism", "?")),
                coords,
                run.info.status,
                tags.get("sparsezoo.error", ""),
                dict(run.data.metrics),
            )
        )
    return children


def _combine(values: list[float], how: str) -> float:
    if not values:
        return math.nan
    return {"mean": statistics.fmean, "max": max, "best": min}[how](values)


def _group(children: list[ChildRun], eval_keys: list[str]) -> list[GroupRow]:
    groups: dict[str, list[ChildRun]] = defaultdict(list)
    for child in children:
        key = ",".join(f"{a}={v}" for a, v in child.coords.items() if a != "seed")
        groups[key].append(child)
    rows = []
    for key, members in groups.items():
        coords = {a: v for a, v in members[0].coords.items() if a not in ("seed", "mechanism")}
        done = [c for c in members if c.status == "FINISHED" and VAL_LOSS in c.metrics]
        row = GroupRow(members[0].mechanism, key, coords, len(members), len(done))
        if done:
            losses = [c.metrics[VAL_LOSS] for c in done]
            best = min(done, key=lambda c: c.metrics[VAL_LOSS])
            row.metrics[VAL_LOSS] = best.metrics[VAL_LOSS]
            row.spread = max(losses) - min(losses)
            for _, metric, how, _ in METRIC_COLUMNS:
                if how == "best":
                    if metric in best.metrics:
                        row.metrics[metric] = best.metrics[metric]
                    continue
                values = [c.metrics[metric] for c in done if metric in c.metrics]
                if values:
                    row.metrics[metric] = _combine(values, how)
            for metric in eval_keys:
                values = [c.metrics[metric] for c in done if metric in c.metrics]
                if values:
                    row.metrics[metric] = statistics.fmean(values)
        rows.append(row)
    rows.sort(key=lambda r: r.metrics.get(VAL_LOSS, math.inf))
    return rows


def build_report(ref: str, uri: str | None = None) -> AblationReport:
    """Collect the ablation named by ``ref`` from the tracking store and group its points."""
    client = MlflowClient(resolve_tracking_uri(uri))
    parent = find_parent(client, ref)
    children = _children(client, parent)
    eval_keys = sorted({k for c in children for k in c.metrics if k.startswith("eval/")})
    return AblationReport(
        parent.info.run_id,
        parent.data.tags.get(TAG_ABLATION, parent.info.run_name),
        parent.info.experiment_id,
        children,
        _group(children, eval_keys),
        eval_keys,
    )


def headline_eval_keys(keys: list[str]) -> list[str]:
    """The suites' summary metrics, ``eval/<suite>/<metric>`` and extrapolation's main number
    per task and factor (``eval/extrapolation/passkey/x2/acc``), without the per-cell ones
    (``eval/passkey/L4096/D50``): a passkey grid alone is 40 columns per length, more than a
    console table can show."""
    return [k for k in keys if k.count("/") <= 2 or _EXTRAPOLATION_HEADLINE.fullmatch(k)]


def _header(eval_keys: list[str]) -> list[str]:
    titles = [c[0] for c in METRIC_COLUMNS]
    fixed = ["mechanism", "point", "seeds ok", "val loss (best)", "spread"]
    return [*fixed, *titles, *eval_keys]


def _cells(report: AblationReport, row: GroupRow, eval_keys: list[str]) -> list[str]:
    def fmt(metric: str, pattern: str) -> str:
        value = row.metrics.get(metric, math.nan)
        return "-" if math.isnan(value) else pattern.format(value)

    coords = ",".join(f"{a}={v}" for a, v in row.coords.items()) or "-"
    spread = "-" if math.isnan(row.spread) else f"{row.spread:.4f}"
    return [
        row.mechanism,
        coords,
        f"{row.finished}/{row.seeds}",
        fmt(VAL_LOSS, "{:.4f}"),
        spread,
        *(fmt(metric, pattern) for _, metric, _, pattern in METRIC_COLUMNS),
        *(fmt(metric, "{:.4f}") for metric in eval_keys),
    ]


def render_table(report: AblationReport) -> Table:
    """The grouped rows as a rich table, best validation loss first; of the eval metrics only
    the headline ones (:func:`headline_eval_keys`), the caption says where the rest are."""
    table = Table(title=f"sparsezoo ablation · {report.name} · parent {report.parent_run_id}")
    keys = headline_eval_keys(report.eval_keys)
    for i, title in enumerate(_header(keys)):
        table.add_column(title, justify="left" if i < 3 else "right")
    for row in report.rows:
        table.add_row(*_cells(report, row, keys))
    if len(keys) < len(report.eval_keys):
        table.caption = (
            f"{len(report.eval_keys) - len(keys)} per-cell eval metrics: in report/report.csv "
            "and report/report.md of the parent run"
        )
    failed = [c for c in report.children if c.status != "FINISHED"]
    for child in failed:
        table.caption = (table.caption or "") + f"\n{child.point}: {child.status} {child.error}"
    return table


def to_csv(report: AblationReport) -> str:
    """The table as CSV text: the console table's columns and every per-cell eval metric."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(_header(report.eval_keys))
    writer.writerows(_cells(report, row, report.eval_keys) for row in report.rows)
    return buffer.getvalue()


def to_markdown(report: AblationReport) -> str:
    """The table as a Markdown document, with failed points listed under it."""
    header = _header(report.eval_keys)
    lines = [
        f"# Ablation {report.name}",
        "",
        f"Parent run `{report.parent_run_id}`; best validation loss over seeds, "
        "spread = max - min.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += [
        "| " + " | ".join(_cells(report, row, report.eval_keys)) + " |" for row in report.rows
    ]
    failed = [c for c in report.children if c.status != "FINISHED"]
    if failed:
        lines += ["", "Points that did not finish:", ""]
        lines += [f"- `{c.point}`: {c.status} {c.error}" for c in failed]
    return "\n".join(lines) + "\n"


def _colors(report: AblationReport) -> dict[str, str]:
    mechanisms = sorted({c.mechanism for c in report.children})
    palette = [f"C{i % 10}" for i in range(len(mechanisms))]
    return dict(zip(mechanisms, palette, strict=True))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates (lower is better), by x."""
    front = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def _scatter(report: AblationReport, metric: str, xlabel: str, path: Path, front: bool) -> None:
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    colors = _colors(report)
    xy = []
    for row in report.rows:
        if metric in row.metrics and VAL_LOSS in row.metrics:
            x, y = row.metrics[metric], row.metrics[VAL_LOSS]
            xy.append((x, y))
            ax.scatter(x, y, color=colors[row.mechanism], label=row.mechanism)
            label = ",".join(f"{v}" for v in row.coords.values())
            if label:
                ax.annotate(label, (x, y), fontsize=7)
    if front and xy:
        fx, fy = zip(*pareto_front(xy), strict=True)
        ax.plot(fx, fy, "k--", lw=1, label="Pareto front")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("val loss (best over seeds)")
    ax.set_title(report.name)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def write_plots(report: AblationReport, client: MlflowClient, out: Path) -> list[Path]:
    """Write the report's PNGs into ``out``; returns their paths."""
    colors = _colors(report)
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    seen = set()
    for child in report.children:
        history = client.get_metric_history(child.run_id, VAL_LOSS)
        if not history:
            continue
        history.sort(key=lambda m: m.step)
        label = child.mechanism if child.mechanism not in seen else None
        seen.add(child.mechanism)
        steps, values = [m.step for m in history], [m.value for m in history]
        ax.plot(steps, values, color=colors[child.mechanism], label=label, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel(VAL_LOSS)
    ax.set_title(f"{report.name}: validation loss")
    if seen:
        ax.legend(fontsize=8)
    paths = [out / PLOTS[0]]
    fig.savefig(paths[0], dpi=110, bbox_inches="tight")
    _scatter(report, "perf/step_ms", "step ms (wall-clock)", out / PLOTS[1], front=True)
    _scatter(report, "attn/density", "measured attention density", out / PLOTS[2], front=False)
    paths += [out / PLOTS[1], out / PLOTS[2]]
    if any("data.seq_len" in row.coords for row in report.rows):
        fig = Figure(figsize=(6.5, 4.5))
        ax = fig.add_subplot()
        by_mech: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for row in report.rows:
            if "data.seq_len" in row.coords and "perf/step_ms" in row.metrics:
                by_mech[row.mechanism].append(
                    (int(row.coords["data.seq_len"]), row.metrics["perf/step_ms"])
                )
        for mech, xy in sorted(by_mech.items()):
            xs, ys = zip(*sorted(xy), strict=True)
            ax.plot(xs, ys, "o-", color=colors[mech], label=mech)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("step ms")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
        ax.set_title(f"{report.name}: cost vs sequence length")
        fig.savefig(out / LENGTH_PLOT, dpi=110, bbox_inches="tight")
        paths.append(out / LENGTH_PLOT)
    return paths


def log_report(report: AblationReport, uri: str | None = None) -> None:
    """Write the CSV, Markdown and plots and log them on the parent run under ``report/``."""
    client = MlflowClient(resolve_tracking_uri(uri))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "report.csv").write_text(to_csv(report))
        (out / "report.md").write_text(to_markdown(report))
        write_plots(report, client, out)
        client.log_artifacts(report.parent_run_id, tmp, artifact_path="report")
