"""The team stack's docker-compose.yml, validated without a Docker engine.

``docker-compose config`` (Debian's docker-compose package; CI installs it and sets
SPARSEZOO_REQUIRE_COMPOSE=1 so this cannot silently skip there) resolves the file against
.env.example; the resolved file is then checked for what the README promises: loopback-only
ports by default, healthchecks, health-gated start order, the MLflow server flags.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = shutil.which("docker-compose")
required = os.environ.get("SPARSEZOO_REQUIRE_COMPOSE") == "1"
pytestmark = pytest.mark.skipif(
    COMPOSE is None and not required, reason="docker-compose is not installed"
)


def resolved(env_file: Path, tmp_path: Path) -> dict:
    assert COMPOSE is not None, "SPARSEZOO_REQUIRE_COMPOSE=1 but docker-compose is missing"
    out = subprocess.run(
        [COMPOSE, "--env-file", str(env_file), "--project-directory", str(ROOT), "config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_compose_file_resolves_with_the_example_env(tmp_path: Path) -> None:
    config = resolved(ROOT / ".env.example", tmp_path)
    services = config["services"]
    assert set(services) == {
        "postgres", "rustfs", "create-bucket", "mlflow", "optuna-dashboard", "worker",
    }  # fmt: skip
    for name, service in services.items():
        for port in service.get("ports", []):
            host_ip = port["host_ip"] if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["mlflow"]
    mlflow_deps = services["mlflow"]["depends_on"]
    assert mlflow_deps["postgres"]["condition"] == "service_healthy"
    assert mlflow_deps["create-bucket"]["condition"] == "service_completed_successfully"
    assert services["worker"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    command = services["mlflow"]["command"]
    for flag in ("--serve-artifacts", "--allowed-hosts", "--artifacts-destination"):
        assert flag in command
    assert command[command.index("--backend-store-uri") + 1].startswith("postgresql+psycopg2://")
    assert "mlflow:5000" in command[command.index("--allowed-hosts") + 1]
    worker = services["worker"]
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["command"][0] == "sweep" and "--storage" in worker["command"]


def test_missing_secrets_are_named(tmp_path: Path) -> None:
    env = tmp_path / "partial.env"
    env.write_text("POSTGRES_USER=sparsezoo\n")
    out = subprocess.run(
        [COMPOSE or "docker-compose", "--env-file", str(env), "--project-directory", str(ROOT),
         "config"],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in out.stderr or "S3_" in out.stderr


def test_example_env_holds_no_real_secrets_and_env_is_ignored() -> None:
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert example["POSTGRES_PASSWORD"].startswith("change-me")
    assert example["S3_SECRET_KEY"].startswith("change-me")
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, check=False)
    assert ignored.returncode == 0
