"""The sparsezoo command line: exit codes, error messages, listing, report, UI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from sparsezoo.cli import main


def test_train_bad_key_exits_2_naming_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "model.dmodel=3"]) == 2
    err = capsys.readouterr().err
    assert "model.dmodel" in err and "d_model" in err


def test_train_bad_value_and_unknown_mechanism(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert main(["train", "attention.mechanism=nsa2"]) == 2
    err = capsys.readouterr().err
    assert "nsa2" in err and "dense" in err and "sliding_window" in err


def test_train_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_train_cli_end_to_end_then_report(
    tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "experiments/demo.yaml", *tiny_overrides]) == 0
    out = capsys.readouterr().out
    assert "val/loss" in out
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["report", "test", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "val loss" in out and "FINISHED" in out
    assert main(["report", "nosuch", "--tracking-uri", uri]) == 2
    assert "nosuch" in capsys.readouterr().err


def test_failed_run_exits_1_and_is_marked_failed(
    tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a sequence longer than the whole token stream is only found when the data loader is
    # built, i.e. after the MLflow run has started: the run must end FAILED, not RUNNING
    ov = [o for o in tiny_overrides if not o.startswith("data.seq_len")]
    assert main(["train", *ov, "data.seq_len=100000"]) == 1
    assert "seq_len" in capsys.readouterr().err
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["test"])
    assert list(runs["status"]) == ["FAILED"]


def test_mechanisms_lists_knobs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mechanisms"]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "sliding_window" in out and "window" in out and "512" in out
    assert "phase" in out
    nsa = out[out.index("nsa —") : out.index("sliding_window —")]
    phase_rows = [line for line in nsa.splitlines() if "│ yes" in line]
    assert sorted(line.split("│")[1].strip() for line in phase_rows) == ["n_select", "window"]


def test_ui_serves_the_store_on_loopback(tmp_path: Path, free_port: int) -> None:
    uri = f"sqlite:///{tmp_path / 'ui.db'}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sparsezoo.cli",
            "ui",
            "--tracking-uri",
            uri,
            "--port",
            str(free_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{free_port}" in first
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{free_port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.time() < deadline, "MLflow UI did not come up"
                assert proc.poll() is None, "sparsezoo ui exited early"
                time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
