"""An embedded Postgres for machines with no database configured.

First choice is the ``pgserver`` package (extra ``[embedded]``; wheels for Python 3.10-3.12),
which bundles Postgres binaries. Otherwise a locally installed ``initdb``/``pg_ctl`` is used.
The server keeps its data under a local directory (``TASKPG_DATA_DIR``, default ``./.taskpg``)
and listens on a Unix socket inside it only, so nothing is exposed on the network.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import pwd
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

from .exceptions import ConfigurationError

logger = logging.getLogger("taskpg.embedded")

INSTALL_HINT = (
    "no database is configured (TASKPG_DSN / DATABASE_URL / dsn=) and no embedded Postgres is available: "
    "install the extra with `pip install 'taskpg[embedded]'` (Python 3.10-3.12), or install PostgreSQL's "
    "initdb/pg_ctl, or point TASKPG_DSN at a server"
)


def default_data_dir() -> Path:
    return Path(os.environ.get("TASKPG_DATA_DIR") or Path.cwd() / ".taskpg").resolve()


def start(data_dir: Path | None = None) -> str:
    """Start (or reuse) the embedded Postgres and return its DSN."""
    data_dir = data_dir or default_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    pgserver = _import_pgserver()
    if pgserver is not None:
        pgdata = data_dir / "pgserver"
        pgdata.mkdir(exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = pgserver.get_server(pgdata, cleanup_mode="stop")
        dsn = str(server.get_uri())
        logger.warning("taskpg: using embedded Postgres (pgserver) with data in %s", pgdata)
        return dsn
    binaries = _local_binaries()
    if binaries is None:
        raise ConfigurationError(INSTALL_HINT)
    return _start_local(data_dir / "pgdata", binaries)


def _import_pgserver() -> Any:
    try:
        with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on servers
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError:
        return None
    return pgserver


def _local_binaries() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, or Debian's /usr/lib/postgresql/*/bin."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(folder, "initdb").exists() and Path(folder, "pg_ctl").exists():
            return Path(folder)
    return None


class LocalCluster:
    """A Postgres cluster in a local folder, run with the machine's own initdb/pg_ctl.

    It listens on a Unix socket inside its data folder only. Postgres refuses to run as root, so
    when we are root it runs as the 'postgres' system user.
    """

    def __init__(self, pgdata: Path, binaries: Path | None = None) -> None:
        found = binaries or _local_binaries()
        if found is None:
            raise ConfigurationError(INSTALL_HINT)
        self.pgdata = pgdata
        self.binaries = found
        self.owner: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError as exc:
                raise ConfigurationError(
                    "embedded Postgres cannot run as root and there is no 'postgres' user to run it as; " + INSTALL_HINT
                ) from exc
            self.owner = "postgres"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.pgdata}"

    def _run(self, *argv: str) -> None:
        command = [*argv]
        if self.owner is not None:
            command = ["runuser", "-u", self.owner, "--", *command]
        subprocess.run(command, check=True, capture_output=True, text=True)

    def _pg_ctl(self, *args: str) -> None:
        options = f"-c listen_addresses='' -k {self.pgdata} -c unix_socket_permissions=0777"
        self._run(
            str(self.binaries / "pg_ctl"),
            "-D",
            str(self.pgdata),
            "-l",
            str(self.pgdata / "server.log"),
            "-w",
            "-o",
            options,
            *args,
        )

    def is_running(self) -> bool:
        try:
            self._run(str(self.binaries / "pg_ctl"), "-D", str(self.pgdata), "status")
        except subprocess.CalledProcessError:
            return False
        return True

    def start(self) -> str:
        """initdb once, then start; safe to call from several processes at once. Returns the DSN."""
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self.owner is not None:
            shutil.chown(self.pgdata, self.owner)
            self.pgdata.chmod(0o700)
        with open(self.pgdata.parent / "embedded.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (self.pgdata / "PG_VERSION").exists():
                logger.warning("taskpg: creating an embedded Postgres cluster in %s", self.pgdata)
                self._run(
                    str(self.binaries / "initdb"),
                    "-D",
                    str(self.pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                )
            if not self.is_running():
                self._pg_ctl("start")
        return self.dsn

    def stop(self) -> None:
        self._pg_ctl("stop", "-m", "fast")

    def restart(self) -> None:
        self._pg_ctl("restart", "-m", "fast")


def _start_local(pgdata: Path, binaries: Path) -> str:
    cluster = LocalCluster(pgdata, binaries)
    dsn = cluster.start()
    logger.warning(
        "taskpg: using embedded Postgres (%s) with data in %s; stop it with `%s -D %s stop`",
        binaries,
        pgdata,
        binaries / "pg_ctl",
        pgdata,
    )
    return dsn
