"""docs/getting-started.md: the quickstart example runs as a user would run it, so it cannot rot; the embedded
Postgres is private to the user who starts it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
from support.example_runner import run_example

from taskpg import ConfigurationError, embedded

if TYPE_CHECKING:
    from collections.abc import Iterator


def test_quickstart(pg_dsn: str, schema: str) -> None:
    out = run_example("quickstart.py", TASKPG_DSN=pg_dsn, TASKPG_SCHEMA=schema)
    assert "2 + 3 = 5" in out
    assert "sum of 100 doubled numbers = 9900" in out
    assert "divide(1, 0) failed after retries: division by zero | status: FAILURE" in out


# -- the embedded Postgres is private to its user ------------------------------------------------------


def _as_nobody_psql(socket_dir: Path) -> subprocess.CompletedProcess[str]:
    """psql run by another OS user (nobody) against the cluster's socket."""
    conninfo = f"host={socket_dir} user=postgres dbname=postgres connect_timeout=5"
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", "psql", conninfo, "-Atc", "SELECT 1"],
        capture_output=True,
        text=True,
        timeout=30,
    )


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another OS user (nobody) needs root")
needs_binaries = pytest.mark.skipif(embedded._local_binaries() is None, reason="needs PostgreSQL's initdb/pg_ctl")


@pytest.fixture
def private_folder() -> Iterator[Path]:
    """A folder under /tmp every user may traverse (so that only the cluster's own rules keep others out)."""
    folder = Path(tempfile.mkdtemp(prefix="taskpg-emb-", dir="/tmp"))
    folder.chmod(0o755)
    clusters: list[embedded.LocalCluster] = []
    yield folder
    for pgdata in folder.rglob("PG_VERSION"):
        clusters.append(embedded.LocalCluster(pgdata.parent))
    for cluster in clusters:
        if cluster.is_running():
            cluster.stop()
        if cluster.socket_dir != cluster.pgdata:
            shutil.rmtree(cluster.socket_dir, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@needs_root
@needs_binaries
@pytest.mark.parametrize("long_path", [False, True], ids=["short-path", "path-too-long-for-a-socket"])
def test_another_os_user_cannot_connect_to_the_embedded_postgres(private_folder: Path, long_path: bool) -> None:
    parent = private_folder / ("d" * 60) / ("e" * 40) if long_path else private_folder
    parent.mkdir(parents=True, exist_ok=True)
    for folder in (parent, *parent.parents):
        if folder == private_folder:
            break
        folder.chmod(0o755)
    cluster = embedded.LocalCluster(parent / "pgdata")
    dsn = cluster.start()
    assert (cluster.socket_dir == cluster.pgdata) is not long_path
    with psycopg.connect(dsn) as conn:  # its own user gets in
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)  # no TCP at all
        assert conn.execute("SHOW unix_socket_permissions").fetchone() == ("0700",)
    refused = _as_nobody_psql(cluster.socket_dir)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused
    info = os.lstat(cluster.socket_dir)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == cluster.uid
    hba = (cluster.pgdata / "pg_hba.conf").read_text().splitlines()
    host_lines = [line.split() for line in hba if line.startswith("host")]
    assert host_lines and all(line[-1] == "reject" for line in host_lines)  # TCP logins refused even if enabled
    conf = (cluster.pgdata / "postgresql.conf").read_text()
    assert "listen_addresses = ''" in conf  # so a start by hand stays private too


@pytest.mark.slow
@needs_root
@needs_binaries
def test_a_socket_directory_someone_else_made_first_is_refused(private_folder: Path) -> None:
    parent = private_folder / ("f" * 60) / ("g" * 40)
    parent.mkdir(parents=True)
    cluster = embedded.LocalCluster(parent / "pgdata")
    assert cluster.socket_dir != cluster.pgdata
    cluster.socket_dir.mkdir(mode=0o777)  # squatted: made by another user, open to all
    try:
        os.chown(cluster.socket_dir, 65534, 65534)
        with pytest.raises(ConfigurationError, match="not a directory only its user can enter"):
            cluster.start()
        assert not cluster.is_running()
    finally:
        shutil.rmtree(cluster.socket_dir)


@needs_root
@needs_binaries
def test_embedded_postgres_never_widens_a_private_folder(private_folder: Path) -> None:
    private = private_folder / "mine"
    private.mkdir(mode=0o700)
    with pytest.raises(ConfigurationError, match="does not widen it"):
        embedded.LocalCluster(private / "data" / "pgdata").start()
    assert stat.S_IMODE(private.stat().st_mode) == 0o700


@pytest.mark.slow
@needs_root
@needs_binaries
def test_as_root_the_embedded_postgres_is_never_pgserver(private_folder: Path) -> None:
    """pgserver, run as root, widens folders above its data and makes its socket directory world-writable."""
    dsn = embedded.start(private_folder / "data")
    assert f"host={private_folder / 'data' / 'pgdata'}" in dsn
    assert not (private_folder / "data" / "pgserver").exists()
    assert _as_nobody_psql(private_folder / "data" / "pgdata").returncode != 0


def test_pgserver_is_refused_where_it_cannot_keep_the_data_private(tmp_path: Path) -> None:
    long = tmp_path / ("h" * 120)
    assert embedded._pgserver_refusal(long) is not None  # too long a path (or root)
    if os.geteuid() != 0:
        assert embedded._pgserver_refusal(Path("/tmp/short")) is None
    else:
        assert "as root" in (embedded._pgserver_refusal(Path("/tmp/short")) or "")
