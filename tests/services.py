"""Real services for integration tests: a throwaway PostgreSQL cluster and an ``mlflow server``.

Both run on loopback from temporary directories and are stopped when the context exits. The
PostgreSQL binaries are the machine's (PostgreSQL 15 on CI); as root, the cluster runs as the
``postgres`` system user, because ``initdb`` and ``postgres`` refuse to run as root.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PG_USER = "sparsezoo"
PG_DIRS = (Path("/usr/lib/postgresql/15/bin"), Path("/usr/local/bin"), Path("/usr/bin"))


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_binary(name: str) -> str | None:
    """Path of a PostgreSQL server program, or None when PostgreSQL is not installed."""
    for folder in PG_DIRS:
        if (folder / name).is_file():
            return str(folder / name)
    return shutil.which(name)


def _as_cluster_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def postgres(databases: tuple[str, ...], log: Path) -> Iterator[str]:
    """Run a PostgreSQL server with the given databases; yields ``host:port``.

    The cluster lives in its own temporary directory (pytest's are private to their owner,
    which the ``postgres`` user is not), removed afterwards; the server log is copied to
    ``log``.
    """
    root = Path(tempfile.mkdtemp(prefix="sparsezoo-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()
    run = {"check": True, "capture_output": True, "timeout": 120}
    subprocess.run(
        _as_cluster_owner(
            [pg_binary("initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust", "-E", "UTF8"]
        ),
        **run,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    ctl = pg_binary("pg_ctl")
    start = [ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"]
    subprocess.run(_as_cluster_owner(start), **run)
    try:
        for name in databases:
            subprocess.run(
                [pg_binary("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, name],
                **run,
            )
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run(
            _as_cluster_owner([ctl, "-D", str(data), "-m", "fast", "-w", "stop"]),
            capture_output=True,
            timeout=60,
        )
        if (root / "log").is_file():
            shutil.copyfile(root / "log", log)
        shutil.rmtree(root, ignore_errors=True)


def postgres_url(address: str, database: str) -> str:
    """The SQLAlchemy URL of a database on the server :func:`postgres` started."""
    return f"postgresql+psycopg2://{PG_USER}@{address}/{database}"


@contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, log: Path) -> Iterator[str]:
    """Run ``mlflow server`` on a free loopback port until the block ends; yields its URL."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", artifacts.as_uri(),
        "--serve-artifacts",
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
        "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
