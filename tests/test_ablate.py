"""Tests of ``sparsezoo ablate`` and the ablation report: grid expansion, validation before
training, nested MLflow runs with the right tags, failed points recorded while the rest go on,
``--resume``, and a report rebuilt from MLflow alone equal to the children's logged metrics."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from sparsezoo import registry
from sparsezoo.ablate import TAG_ABLATION, TAG_POINT, load_ablation
from sparsezoo.ablation_report import (
    AblationReport,
    ChildRun,
    GroupRow,
    build_report,
    headline_eval_keys,
    pareto_front,
    render_table,
    to_csv,
    to_markdown,
)
from sparsezoo.cli import main
from sparsezoo.config import ConfigError
from sparsezoo.mechanisms.dense import DenseAttention

GRID = """
experiment: abl
ablation:
  name: grid
  mechanisms: [dense, sliding_window]
  params:
    sliding_window: {window: [8, 16]}
  axes:
    data.seq_len: [32, 64]
  seeds: [0, 1]
"""


def write(tmp_path: Path, text: str, name: str = "ablation.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_grid_crosses_knobs_only_with_their_mechanism(tmp_path, tiny_overrides) -> None:
    ablation = load_ablation(write(tmp_path, GRID), tiny_overrides)
    keys = [p.key for p in ablation.points]
    # dense: 2 lengths x 2 seeds; sliding_window: 2 windows x 2 lengths x 2 seeds
    assert len(keys) == 4 + 8 == len(set(keys))
    assert keys[0] == "mechanism=dense,data.seq_len=32,seed=0"
    assert "mechanism=sliding_window,sliding_window.window=16,data.seq_len=64,seed=1" in keys
    for point, cfg in zip(ablation.points, ablation.configs, strict=True):
        coords = dict(point.coords)
        assert cfg.attention.mechanism == coords["mechanism"]
        assert cfg.seed == coords["seed"]
        assert cfg.data.seq_len == coords["data.seq_len"]
        # the base config trains 4 x 64 tokens per step; every point keeps that budget
        assert cfg.train.batch_size * cfg.data.seq_len == 4 * 64
        if coords["mechanism"] == "sliding_window":
            assert (
                cfg.attention.params["sliding_window"]["window"] == coords["sliding_window.window"]
            )
    assert len({cfg.run_name for cfg in ablation.configs}) == len(keys)


def test_ablation_overrides_edit_the_grid_from_the_command_line(tmp_path, tiny_overrides) -> None:
    # ablation.* overrides cut or widen the grid; the rest still apply to every point
    ablation = load_ablation(
        write(tmp_path, GRID),
        [
            *tiny_overrides,
            "ablation.mechanisms=[sliding_window]",
            "ablation.seeds=[3]",
            "ablation.params.sliding_window.window=[4]",
            "ablation.axes.data.seq_len=[32, 64]",
            "train.lr=0.002",
        ],
    )
    assert [p.key for p in ablation.points] == [
        "mechanism=sliding_window,sliding_window.window=4,data.seq_len=32,seed=3",
        "mechanism=sliding_window,sliding_window.window=4,data.seq_len=64,seed=3",
    ]
    assert all(cfg.train.lr == 0.002 for cfg in ablation.configs)
    assert "ablation.seeds=[3]" in ablation.overrides


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ablation.=3", "'ablation.=3' must look like ablation.key=value"),
        ("ablation.grids={}", "unknown key(s) grids"),
        ("ablation.seeds.x=1", "ablation.seeds is not a mapping"),
        ("ablation.mechanisms=[dense, nope]", "nope"),
        ("ablation.params={sliding_window:{window: [8]}}", "'ablation.params={sliding_window"),
        ("data.curriculum=[{seq_len: 32, attention_params:{nsa: {}}}]", "not valid YAML"),
    ],
)
def test_bad_command_line_override_names_it(
    tmp_path, tiny_overrides, capsys, override: str, message: str
) -> None:
    path = write(tmp_path, GRID)
    with pytest.raises(ConfigError) as info:
        load_ablation(path, [*tiny_overrides, override])
    assert message in str(info.value)
    assert main(["ablate", str(path), *tiny_overrides, override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("  mechanisms: [dense]\n  grids: {}\n", "unknown key(s) grids"),
        ("  mechanisms: []\n", "non-empty list"),
        ("  mechanisms: [dense]\n  axes: {data.seq_len: []}\n", "ablation.axes.data.seq_len"),
        ("  mechanisms: [dense]\n  axes: {model.nope: [1, 2]}\n", "model.nope"),
        ("  mechanisms: [dense, nope]\n", "nope"),
        (
            "  mechanisms: [sliding_window]\n  params: {sliding_window: {window: [8, 0]}}\n",
            "window",
        ),
        ("  mechanisms: [dense]\n  params: {sliding_window: {window: [8]}}\n", "not in"),
        ("  mechanisms: [dense]\n  axes: {data.seq_len: [48]}\n", "token budget"),
        ("  mechanisms: [dense]\n  axes: {seed: [1, 2]}\n", "ablation.seeds"),
        ("  name: 'a b'\n  mechanisms: [dense]\n", "ablation.name"),
        ("  mechanisms: [dense]\n  seeds: 3\n", "ablation.seeds"),
    ],
)
def test_invalid_ablation_fails_before_training(
    tmp_path, tiny_overrides, capsys, section: str, message: str
) -> None:
    path = write(tmp_path, "experiment: abl\nablation:\n" + section)
    with pytest.raises(ConfigError, match=None) as info:
        load_ablation(path, tiny_overrides)
    assert message in str(info.value)
    assert main(["ablate", str(path), *tiny_overrides]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "runs").exists()


def test_missing_section_names_it(tmp_path, tiny_overrides) -> None:
    with pytest.raises(ConfigError, match="no 'ablation:' section"):
        load_ablation(write(tmp_path, "experiment: abl\n"), tiny_overrides)


class Flaky(DenseAttention):
    """Dense attention that raises during training while ``Flaky.broken`` is set."""

    broken = True

    def attend(self, q_BTHD, k_BTHD, v_BTHD) -> torch.Tensor:
        if Flaky.broken:
            raise RuntimeError("flaky mechanism exploded")
        return super().attend(q_BTHD, k_BTHD, v_BTHD)


@pytest.fixture
def flaky() -> Iterator[type[Flaky]]:
    registry.register_mechanism("flaky_for_test")(Flaky)
    Flaky.broken = True
    try:
        yield Flaky
    finally:
        registry._registered.pop("flaky_for_test", None)


def _uri(overrides: list[str]) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("tracking.uri="))


def test_ablation_end_to_end_with_a_failing_point_then_resume(
    tmp_path, tiny_overrides, flaky, capsys
) -> None:
    path = write(
        tmp_path,
        "experiment: abl\nablation:\n  name: e2e\n"
        "  mechanisms: [dense, sliding_window, flaky_for_test]\n"
        "  params: {sliding_window: {window: [8]}}\n",
    )
    assert main(["ablate", str(path), *tiny_overrides]) == 1
    err = capsys.readouterr().err
    assert "mechanism=flaky_for_test,seed=0 failed" in err and "exploded" in err

    client = MlflowClient(_uri(tiny_overrides))
    experiment = client.get_experiment_by_name("test")
    parents = client.search_runs([experiment.experiment_id], "tags.`sparsezoo.kind` = 'ablation'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FAILED" and parent.data.tags[TAG_ABLATION] == "e2e"
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    by_point = {c.data.tags[TAG_POINT]: c for c in children}
    assert set(by_point) == {
        "mechanism=dense,seed=0",
        "mechanism=sliding_window,sliding_window.window=8,seed=0",
        "mechanism=flaky_for_test,seed=0",
    }
    failed = by_point["mechanism=flaky_for_test,seed=0"]
    assert failed.info.status == "FAILED"
    assert "exploded" in failed.data.tags["sparsezoo.error"]
    window = by_point["mechanism=sliding_window,sliding_window.window=8,seed=0"]
    assert window.info.status == "FINISHED"
    assert window.data.tags["sparsezoo.mechanism"] == "sliding_window"
    assert window.data.tags["sparsezoo.grid.sliding_window.window"] == "8"
    assert window.data.tags["sparsezoo.kind"] == "train"

    # the report's numbers are the children's logged metrics, rebuilt from MLflow alone, eval
    # metrics logged into a child after training (as sparsezoo eval does) included
    dense_id = by_point["mechanism=dense,seed=0"].info.run_id
    client.log_metric(dense_id, "eval/passkey/acc", 0.75)
    client.log_metric(dense_id, "eval/extrapolation/passkey/x2/acc", 0.25)
    report = build_report(parent.info.run_id, _uri(tiny_overrides))
    rows = {r.mechanism: r for r in report.rows}
    assert report.eval_keys == ["eval/extrapolation/passkey/x2/acc", "eval/passkey/acc"]
    assert rows["dense"].metrics["eval/passkey/acc"] == 0.75
    assert "eval/passkey/acc" not in rows["sliding_window"].metrics
    for mech, point in (("dense", "mechanism=dense,seed=0"), ("sliding_window", window)):
        child = by_point[point] if isinstance(point, str) else point
        assert rows[mech].metrics["val/loss"] == child.data.metrics["val/loss"]
        assert rows[mech].metrics["perf/step_ms"] == child.data.metrics["perf/step_ms"]
        assert rows[mech].metrics["attn/density"] == child.data.metrics["attn/density"]
    assert rows["flaky_for_test"].finished == 0
    table = list(csv.reader(io.StringIO(to_csv(report))))
    assert table[0][:4] == ["mechanism", "point", "seeds ok", "val loss (best)"]
    dense_line = next(line for line in table if line[0] == "dense")
    assert dense_line[3] == f"{by_point['mechanism=dense,seed=0'].data.metrics['val/loss']:.4f}"
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    for name in ("report.csv", "report.md", "val_loss_curves.png", "pareto_wallclock.png"):
        assert f"report/{name}" in logged
    assert main(["report", parent.info.run_id, "--tracking-uri", _uri(tiny_overrides)]) == 0
    printed = capsys.readouterr().out
    assert dense_line[3] in printed and "flaky_for_test" in printed

    # fixed and resumed: the same parent, finished points skipped, the failed one retrained
    flaky.broken = False
    assert main(["ablate", "--resume", str(path), *tiny_overrides]) == 0
    assert "skipped 2 finished point(s)" in capsys.readouterr().out
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 4
    report = build_report("test", _uri(tiny_overrides))
    assert report.parent_run_id == parent.info.run_id
    assert all(r.finished == 1 for r in report.rows)


def test_report_of_an_unknown_reference_fails(tmp_path, capsys) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["report", "0" * 32, "--tracking-uri", uri]) == 2
    assert "no MLflow experiment named" in capsys.readouterr().err


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [(3.0, 1.0), (1.0, 3.0), (2.0, 2.0), (2.5, 2.5), (1.5, 3.5)]
    assert pareto_front(points) == [(1.0, 3.0), (2.0, 2.0), (3.0, 1.0)]


@pytest.mark.parametrize(
    ("name", "points"), [("quickstart", 5), ("mechanism_shootout", 15), ("hybrid_layers", 10)]
)
def test_shipped_ablations_are_valid(name: str, points: int) -> None:
    root = Path(__file__).resolve().parents[1] / "experiments"
    ablation = load_ablation(root / f"{name}.yaml")
    assert len(ablation.points) == points
    assert ablation.experiment == name
    assert (root / f"{name}.md").is_file()
    if name == "quickstart":
        mechanisms = [c.attention.mechanism for c in ablation.configs]
        assert mechanisms == ["dense", "sliding_window", "nsa", "moba", "dsa"]


def test_console_table_shows_headline_eval_metrics_and_the_artifacts_every_cell() -> None:
    """A passkey grid's per-cell metrics (eval/passkey/L<len>/D<depth>) stay out of the console
    table, whose caption counts them; the CSV and Markdown keep every eval column."""
    keys = sorted(
        ["eval/passkey/acc", "eval/passkey/min_acc", "eval/mqar/acc"]
        + [f"eval/passkey/L1024/D{d}" for d in (0, 50, 100)]
        + ["eval/passkey/L1024/acc", "eval/extrapolation/passkey/x2/acc"]
        + ["eval/extrapolation/passkey/L2048/D50", "eval/extrapolation/passkey/acc"]
    )
    metrics = {k: 0.5 for k in keys} | {"val/loss": 2.0}
    child = ChildRun("r" * 32, "mechanism=dense,seed=0", "dense", {}, "FINISHED", "", metrics)
    row = GroupRow("dense", "mechanism=dense", {}, 1, 1, metrics)
    report = AblationReport("p" * 32, "grid", "0", [child], [row], keys)
    assert headline_eval_keys(keys) == [
        "eval/extrapolation/passkey/x2/acc",
        "eval/mqar/acc",
        "eval/passkey/acc",
        "eval/passkey/min_acc",
    ]
    table = render_table(report)
    titles = [str(column.header) for column in table.columns]
    assert [t for t in titles if t.startswith("eval/")] == headline_eval_keys(keys)
    assert table.caption.startswith("6 per-cell eval metrics")
    csv_header = next(csv.reader(io.StringIO(to_csv(report))))
    assert [t for t in csv_header if t.startswith("eval/")] == keys
    assert "eval/passkey/L1024/D50" in to_markdown(report)
