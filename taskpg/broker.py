"""Connections to Postgres: the app's pool, callers' transactions, LISTEN, schema checks."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool, PoolTimeout

from .dsn import libpq_dsn, redact
from .exceptions import ConfigurationError, DatabaseUnavailable, SchemaNotReady
from .reconnect import CONNECTION_ERRORS
from .schema import SCHEMA_REVISION
from .sql import Queries

T = TypeVar("T")


#: TCP keepalives on every connection taskpg opens: a peer that vanished is noticed in ~25 s.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}


def connect(dsn: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """A dedicated autocommit connection (for LISTEN and the worker's loops), with TCP keepalives so
    that a peer that vanished is noticed in about half a minute instead of hours."""
    return psycopg.connect(libpq_dsn(dsn), autocommit=True, **{**KEEPALIVES, **kwargs})


def caller_connection(session: Any = None, connection: Any = None) -> psycopg.Connection[Any] | None:
    """The psycopg connection behind a caller's SQLAlchemy Session/Connection or psycopg connection.

    Statements run on it join the caller's transaction: they commit or roll back with it.
    """
    if connection is not None:
        if not isinstance(connection, psycopg.Connection):
            raise ConfigurationError(
                f"connection= takes a psycopg 3 connection, not {type(connection).__name__}; "
                "pass a SQLAlchemy Session or Connection as session="
            )
        return connection
    if session is None:
        return None
    # Session.connection() starts (or joins) the session's transaction on its bound connection.
    sa_connection = session.connection() if hasattr(session, "get_bind") else session
    if hasattr(sa_connection, "in_transaction") and not sa_connection.in_transaction():
        # Make SQLAlchemy aware of the transaction our statement opens, so that the
        # caller's commit() / rollback() applies to it.
        sa_connection.begin()
    driver_connection = getattr(getattr(sa_connection, "connection", None), "driver_connection", None)
    if not isinstance(driver_connection, psycopg.Connection):
        raise ConfigurationError(
            "session= needs SQLAlchemy on psycopg 3 (a 'postgresql+psycopg://' URL); "
            f"this session uses {type(driver_connection).__name__}"
        )
    return driver_connection


@contextlib.contextmanager
def atomic(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """An all-or-nothing block that never commits a caller's transaction on its own.

    On a connection inside a transaction this is a savepoint; on an idle non-autocommit connection
    (a caller who has run nothing yet) the caller's transaction is opened first, so the block is a
    savepoint inside it and commits only when the caller commits; on an autocommit connection it
    is a transaction of its own.
    """
    if not conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
        conn.execute("SELECT 1")  # psycopg opens the caller's transaction with the first statement
    with conn.transaction():
        yield


class Database:
    """The app's view of Postgres: a lazily opened pool plus the rendered statements."""

    def __init__(self, dsn: str, schema: str, pool_size: int = 10, connect_timeout: float = 10.0) -> None:
        self.dsn = libpq_dsn(dsn)
        self.connect_timeout = connect_timeout
        self.queries = Queries(schema)
        self._pool_size = pool_size
        self._pool: ConnectionPool | None = None
        self._lock = threading.Lock()
        self._schema_checked = False

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ConnectionPool(
                        self.dsn,
                        min_size=1,
                        max_size=self._pool_size,
                        kwargs={"autocommit": True, **KEEPALIVES},
                        name="taskpg",
                        open=True,
                    )
        return self._pool

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled autocommit connection, schema-checked on first use."""
        self.check_schema()
        try:
            conn = self.pool.getconn(timeout=self.connect_timeout)
        except PoolTimeout:
            # The pool backs off between reconnection attempts after an outage; a direct connection
            # answers at once when the server is back.
            with self._direct_connection() as direct:
                yield direct
            return
        try:
            yield conn
        finally:
            self.pool.putconn(conn)

    @contextlib.contextmanager
    def _direct_connection(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            conn = connect(self.dsn, connect_timeout=max(1, int(self.connect_timeout)))
        except CONNECTION_ERRORS as exc:
            raise DatabaseUnavailable(f"cannot reach {redact(self.dsn)}: {exc}") from exc
        with conn:
            yield conn

    def run(self, work: Callable[[psycopg.Connection[Any]], T], can_retry: Callable[[], bool] = lambda: True) -> T:
        """Run ``work`` on a pooled connection; after a lost connection (a Postgres restart, say)
        the pool is checked and ``work`` runs once more on a fresh connection.

        ``work`` must be safe to repeat: enqueues are, because job ids are made client-side and a
        repeated insert of a job that did commit fails on its primary key (see ``enqueue.py``).
        """
        try:
            with self.connection() as conn:
                return work(conn)
        except CONNECTION_ERRORS as exc:
            if not can_retry():
                raise DatabaseUnavailable(f"lost the connection to {redact(self.dsn)}: {exc}") from exc
            self.pool.check()
        try:
            with self.connection() as conn:
                return work(conn)
        except CONNECTION_ERRORS as exc:
            raise DatabaseUnavailable(f"lost the connection to {redact(self.dsn)}: {exc}") from exc

    def check_schema(self) -> None:
        """Fail clearly when the database is not migrated to the revision this code needs."""
        if self._schema_checked:
            return
        found = self.schema_revision()
        if found != SCHEMA_REVISION:
            state = "is not migrated" if found is None else f"is at revision {found}"
            raise SchemaNotReady(
                f"taskpg schema {self.queries.schema!r} in {redact(self.dsn)} {state}; this taskpg needs "
                f"revision {SCHEMA_REVISION}: run `taskpg migrate` (or `alembic upgrade head`)"
            )
        self._schema_checked = True

    def schema_revision(self) -> str | None:
        """The Alembic revision of the schema, or None when taskpg was never migrated there."""
        try:
            with self._direct_connection() as conn:
                row = conn.execute(self.queries.schema_version).fetchone()
        except pg_errors.UndefinedTable:
            return None
        return None if row is None else str(row[0])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
