"""MLflow tracking: URI resolution, reachability check, run lifecycle, params and artifacts.

The tracking URI is always explicit (config > ``MLFLOW_TRACKING_URI`` > ``sqlite:///mlflow.db``):
Lightning's MLFlowLogger would otherwise fall back to the rejected ``file:./mlruns`` store. Runs
are created here (so tags, params and the FAILED status are ours to set) and handed to the
logger by id.
"""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or used; raised before any training starts."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Config value, else ``MLFLOW_TRACKING_URI``, else the local SQLite store; a SQLite path
    made absolute (``sqlite:///mlflow.db`` is a file in the current directory), so what a run
    records in its run.json finds the store from any directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + os.path.abspath(os.path.expanduser(uri.removeprefix("sqlite:///")))
    return uri


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with TrackingError when the tracking store at ``uri`` is unusable.

    HTTP servers are probed at ``/health`` with a short timeout (MLflow's own client would retry
    for minutes); SQLite stores need a writable directory. File stores are rejected because
    MLflow 3 refuses them.
    """
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
                if r.status != 200:
                    raise TrackingError(f"tracking server {uri} answered HTTP {r.status}")
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(f"tracking server {uri} is unreachable: {exc}") from exc
    elif uri.startswith("sqlite:///"):
        parent = Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise TrackingError(f"tracking store {uri}: directory {parent} is not writable")
    elif uri.startswith("file:") or "://" not in uri:
        raise TrackingError(
            f"tracking URI {uri!r}: file stores are not supported by MLflow 3; "
            "use sqlite:///path.db or http(s)://server"
        )


def git_commit() -> str:
    """The current git commit of the working directory, or 'unknown' outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def experiment_id(client: MlflowClient, name: str) -> str:
    """Id of the MLflow experiment ``name``, created when missing."""
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else client.create_experiment(name)


def create_run(
    client: MlflowClient,
    experiment: str,
    run_name: str | None,
    tags: Mapping[str, str],
    parent_run_id: str | None = None,
) -> str:
    """Create a RUNNING run with the standard tags (git commit included); return its id."""
    all_tags = {"sparsezoo.git_commit": git_commit(), **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id(client, experiment), run_name=run_name, tags=all_tags)
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    """Log params in batches of MLflow's maximum size, values truncated to its length limit."""
    items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    """Set several tags on a run at once."""
    client.log_batch(run_id, tags=[RunTag(k, str(v)[:MAX_PARAM_LEN]) for k, v in tags.items()])


@contextmanager
def run_status(client: MlflowClient, run_id: str) -> Iterator[None]:
    """End the run FINISHED on success and FAILED (with the error as a tag) on any exception.

    KeyboardInterrupt marks the run KILLED so an interrupted run never stays RUNNING.
    """
    try:
        yield
    except KeyboardInterrupt:
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException as exc:
        client.set_tag(run_id, "sparsezoo.error", f"{type(exc).__name__}: {exc}"[:MAX_PARAM_LEN])
        client.set_terminated(run_id, "FAILED")
        raise
    else:
        client.set_terminated(run_id, "FINISHED")
