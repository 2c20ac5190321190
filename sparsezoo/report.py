"""Comparison tables built from MLflow alone (no re-training).

``sparsezoo report <experiment>`` lists the experiment's training runs side by side: validation
loss and perplexity, throughput, step time, peak memory and the measured attention density.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import pandas as pd
from rich.table import Table

from sparsezoo.console import console
from sparsezoo.tracking import resolve_tracking_uri

# (column title, MLflow metric key, format) in display order
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("val loss", "val/loss", "{:.4f}"),
    ("val ppl", "val/ppl", "{:.2f}"),
    ("tokens/s", "perf/tokens_per_s", "{:,.0f}"),
    ("step ms", "perf/step_ms", "{:.1f}"),
    ("peak MB", "perf/peak_mem_mb", "{:,.0f}"),
    ("density", "attn/density", "{:.3f}"),
)


class ReportError(LookupError):
    """The experiment or run to report on does not exist or holds no training runs."""


@dataclass
class RunRow:
    """One training run's summary: identity, status and last logged value of each metric."""

    run_id: str
    run_name: str
    mechanism: str
    status: str
    metrics: dict[str, float]


def training_runs(experiment: str, uri: str | None = None, latest: bool = True) -> list[RunRow]:
    """Training runs of ``experiment``, newest first; with ``latest`` one per mechanism.

    Raises ReportError naming the experiment when it does not exist or has no training runs.
    """
    mlflow.set_tracking_uri(resolve_tracking_uri(uri))
    if mlflow.get_experiment_by_name(experiment) is None:
        raise ReportError(
            f"no MLflow experiment named {experiment!r} in {resolve_tracking_uri(uri)}"
        )
    df = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string="tags.`sparsezoo.kind` = 'train'",
        order_by=["attributes.start_time DESC"],
    )
    if df.empty:
        raise ReportError(f"experiment {experiment!r} has no training runs")
    rows: list[RunRow] = []
    seen: set[str] = set()
    for _, r in df.iterrows():
        mech = str(r.get("tags.sparsezoo.mechanism", "?"))
        if latest and mech in seen:
            continue
        seen.add(mech)
        metrics = {
            key: float(r[f"metrics.{key}"])
            for _, key, _ in COLUMNS
            if f"metrics.{key}" in r and pd.notna(r[f"metrics.{key}"])
        }
        rows.append(
            RunRow(r["run_id"], str(r.get("tags.mlflow.runName", "")), mech, r["status"], metrics)
        )
    return rows


def render_table(rows: list[RunRow], title: str) -> Table:
    """A rich table with one row per run and one column per compared metric."""
    table = Table(title=title)
    for col in ("mechanism", "run", "status", *(c[0] for c in COLUMNS)):
        table.add_column(col, justify="left" if col in ("mechanism", "run", "status") else "right")
    for row in rows:
        cells = [
            fmt.format(row.metrics[key]) if key in row.metrics else "-" for _, key, fmt in COLUMNS
        ]
        table.add_row(row.mechanism, row.run_name, row.status, *cells)
    return table


def print_report(experiment: str, uri: str | None = None, latest: bool = True) -> list[RunRow]:
    """Print the comparison table of ``experiment`` and return its rows."""
    rows = training_runs(experiment, uri, latest)
    console().print(render_table(rows, f"sparsezoo · {experiment}"))
    return rows
