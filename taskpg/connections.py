"""Every connection taskpg opens, and the one policy for waiting and retrying after losing one.

- Postgres: the app's pool (``Connections.pooled``/``run``), dedicated autocommit connections owned
  by one background loop (``Dedicated``), the caller's own transaction (``caller_connection``,
  ``atomic``), and the SQLAlchemy engine Alembic migrates with (``sqlalchemy_engine``).
- Redis: ``redis_client`` and ``redis_errors`` (the failures that mean "Redis is not there").
- ``reconnecting`` and ``backoff``: one exponential backoff with jitter (tenacity), used by every loop.

Statements are not written here: the store (``store.py``) runs them on these connections.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
import tenacity
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool, PoolTimeout
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from .dsn import libpq_dsn, redact
from .exceptions import ConfigurationError, DatabaseUnavailable
from .sql import PING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    import redis
    from sqlalchemy.engine import Engine

logger = logging.getLogger("taskpg")
T = TypeVar("T")

#: A psycopg connection, as the store and the loops hold it.
Conn = psycopg.Connection[Any]

#: SQLSTATE classes of a statement refused for a value in it: data exception, integrity constraint
#: violation, program limit exceeded (a row or an index entry too large). Trying again will not help.
VALUE_REFUSED_CLASSES = frozenset({"22", "23", "54"})
#: SQLSTATE classes of a failed session or server, whatever the statement: connection exception, invalid
#: transaction state (25006: read-only), transaction rollback (serialization failure, deadlock),
#: insufficient resources, object not in prerequisite state, operator intervention (shutdown,
#: cancel), system error. The statement may well succeed after a reconnect.
SESSION_CLASSES = frozenset({"08", "25", "40", "53", "55", "57", "58"})


def refuses_value(exc: BaseException) -> bool:
    """Postgres refused the statement for a value in it (bad data, a constraint, a size limit). A full
    NOTIFY queue is SQLSTATE 54000 too, raised at commit, but it is the server's limit: not a value's."""
    state = getattr(exc, "sqlstate", None) if isinstance(exc, psycopg.Error) else None
    if state is None or state[:2] not in VALUE_REFUSED_CLASSES:
        return False
    return not (state == "54000" and "notify queue" in str(exc).lower())


def needs_reconnect(exc: BaseException) -> bool:
    """The session or the server failed, not the statement's values: reconnect and try again later.

    A lost connection, a shutdown, a read-only server (a standby, or ``default_transaction_read_only``),
    a serialization failure or a deadlock, too many connections. Never a value Postgres refuses.
    """
    if not isinstance(exc, psycopg.Error) or refuses_value(exc):
        return False
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return True
    state = getattr(exc, "sqlstate", None)
    return state is not None and state[:2] in SESSION_CLASSES


def describe_failure(exc: BaseException) -> str:
    """What a session failure means, for the one log line an outage gets."""
    state = getattr(exc, "sqlstate", None)
    if state == "25006":
        return f"Postgres is read-only (a standby, or default_transaction_read_only is on): {exc}"
    return f"{type(exc).__name__}: {exc}".strip()


#: TCP keepalives on every connection taskpg opens: a peer that vanished is noticed in ~25 s.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
#: Seconds a dedicated connection may take to open (libpq waits for ever by default).
CONNECT_TIMEOUT = 10


# -- the reconnect policy ------------------------------------------------------------------------

#: How long to wait before the n-th try after a lost connection: 50 ms doubling up to 5 s, plus up to
#: 100 ms of jitter so that many workers do not reconnect in step.
RECONNECT_WAIT = tenacity.wait_exponential(multiplier=0.05, max=5.0) + tenacity.wait_random(0, 0.1)


def backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` failures in a row (RECONNECT_WAIT)."""
    state = tenacity.RetryCallState(retry_object=tenacity.Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = max(1, failures)
    return float(RECONNECT_WAIT(state))


def reconnecting(
    work: Callable[[], T],
    what: str,
    reset: Callable[[], None],
    stop: threading.Event | None = None,
    retry_on: Callable[[BaseException], bool] = needs_reconnect,
    give_up_after: float | None = None,
) -> T:
    """Run ``work``; after an error ``retry_on`` accepts (a failed session, by default) call ``reset``
    and try again, waiting RECONNECT_WAIT.

    Tries until it succeeds, until ``stop`` is set, or until ``give_up_after`` seconds have passed
    (then the last error is raised). An outage is logged once, with its cause, and its end once. The
    first try is a plain call: the retry machinery is only built once a connection was lost.
    """
    try:
        return work()
    except Exception as exc:
        if not retry_on(exc) or (stop is not None and stop.is_set()):
            raise
        logger.warning("%s failed (%s); retrying with backoff", what, describe_failure(exc))
        reset()

    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0
        logger.debug("still failing while %s (%s); retrying in %.1f s", what, error, wait)
        reset()

    def give_up(state: tenacity.RetryCallState) -> bool:
        if stop is not None and stop.is_set():
            return True
        return give_up_after is not None and (state.seconds_since_start or 0.0) > give_up_after

    def sleep(seconds: float) -> None:
        if stop is None:
            tenacity.nap.sleep(seconds)
        else:
            stop.wait(seconds)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(retry_on),
        wait=RECONNECT_WAIT,
        stop=give_up,
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
    result = retrying(work)
    logger.warning("%s works again", what)
    return result


# -- Postgres ------------------------------------------------------------------------------------


def connect(dsn: str, **kwargs: Any) -> Conn:
    """A new autocommit connection with TCP keepalives."""
    return psycopg.connect(
        libpq_dsn(dsn), autocommit=True, **{**KEEPALIVES, "connect_timeout": CONNECT_TIMEOUT, **kwargs}
    )


class Dedicated:
    """One autocommit connection owned by one loop: opened on first use, reopened after ``reset()``.

    ``setup`` statements run once on each new connection (a planner setting, say). The connection
    shows as ``taskpg-<name>`` in ``pg_stat_activity``.
    """

    def __init__(self, dsn: str, name: str, setup: Sequence[str] = ()) -> None:
        self.dsn = dsn
        self.name = name
        self.setup = tuple(setup)
        self.opened = 0  # connections opened so far (the first, then one per reconnect)
        self._conn: Conn | None = None
        _dedicated.add(self)

    @property
    def conn(self) -> Conn:
        if self._conn is None or self._conn.closed:
            conn = connect(self.dsn, application_name=f"taskpg-{self.name}")
            for statement in self.setup:
                conn.execute(statement)
            self._conn = conn
            self.opened += 1
        return self._conn

    @property
    def is_open(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def reset(self) -> None:
        """Close the connection (quietly: it may be broken already); the next use opens a new one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    close = reset

    def _forget_after_fork(self) -> None:
        # A forked child shares the parent's socket: closing it would end the parent's session.
        if self._conn is not None:
            _inherited.append(self._conn)
        self._conn = None


_dedicated: weakref.WeakSet[Dedicated] = weakref.WeakSet()
_inherited: list[Conn] = []  # a forked child's copies of the parent's connections, never closed


def _after_fork_in_child() -> None:
    for dedicated in list(_dedicated):
        dedicated._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Connections:
    """The app's Postgres: a lazily opened pool, plus direct and dedicated connections to the same DSN."""

    def __init__(self, dsn: str, pool_size: int = 10, connect_timeout: float = 10.0) -> None:
        self.dsn = libpq_dsn(dsn)
        self.connect_timeout = connect_timeout
        self._pool_size = pool_size
        self._pool: ConnectionPool | None = None
        self._lock = threading.Lock()

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
    def pooled(self) -> Iterator[Conn]:
        """A pooled autocommit connection (a direct one while the pool waits out an outage)."""
        try:
            conn = self.pool.getconn(timeout=self.connect_timeout)
        except PoolTimeout:
            # The pool backs off between reconnection attempts after an outage; a direct connection
            # answers at once when the server is back.
            with self.direct() as direct:
                yield direct
            return
        try:
            yield conn
        finally:
            self.pool.putconn(conn)

    @contextlib.contextmanager
    def direct(self) -> Iterator[Conn]:
        """A short-lived connection of its own, closed after the block."""
        try:
            conn = connect(self.dsn, connect_timeout=max(1, int(self.connect_timeout)))
        except psycopg.Error as exc:
            if not needs_reconnect(exc):
                raise
            raise DatabaseUnavailable(f"cannot reach {redact(self.dsn)}: {exc}") from exc
        with conn:
            yield conn

    def run(self, work: Callable[[Conn], T], can_retry: Callable[[], bool] = lambda: True) -> T:
        """Run ``work`` on a pooled connection; after a lost connection (a Postgres restart, say)
        the pool is checked and ``work`` runs once more on a fresh connection.

        ``work`` must be safe to repeat: enqueues are, because job ids are made client-side and a
        repeated insert of a job that did commit is a no-op (``ON CONFLICT DO NOTHING``).
        """
        try:
            with self.pooled() as conn:
                return work(conn)
        except psycopg.Error as exc:
            if not needs_reconnect(exc):
                raise  # a statement refused as such: its own error, never "unavailable"
            if not can_retry():
                raise self._unavailable(exc) from exc
            self.pool.check()
        try:
            with self.pooled() as conn:
                return work(conn)
        except psycopg.Error as exc:
            if not needs_reconnect(exc):
                raise
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: BaseException) -> DatabaseUnavailable:
        return DatabaseUnavailable(f"lost the connection to {redact(self.dsn)}: {describe_failure(exc)}")

    def dedicated(self, name: str, setup: Sequence[str] = ()) -> Dedicated:
        """A connection of its own for one loop (see ``Dedicated``)."""
        return Dedicated(self.dsn, name, setup)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def caller_connection(session: Any = None, connection: Any = None) -> Conn | None:
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
def atomic(conn: Conn) -> Iterator[None]:
    """An all-or-nothing block that never commits a caller's transaction on its own.

    On a connection inside a transaction this is a savepoint; on an idle non-autocommit connection
    (a caller who has run nothing yet) the caller's transaction is opened first, so the block is a
    savepoint inside it and commits only when the caller commits; on an autocommit connection it
    is a transaction of its own.
    """
    if not conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
        conn.execute(PING)  # psycopg opens the caller's transaction with the first statement
    with conn.transaction():
        yield


def sqlalchemy_engine(dsn: str, **kwargs: Any) -> Engine:
    """A SQLAlchemy engine on psycopg 3 for any DSN form (URL or key=value), for Alembic."""
    target = libpq_dsn(dsn)
    return create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(target),
        poolclass=NullPool,
        **kwargs,
    )


# -- Redis ---------------------------------------------------------------------------------------


def redis_client(url: str) -> redis.Redis[bytes]:
    """A Redis client with short timeouts: an unreachable Redis must fail fast, not hang a request."""
    try:
        import redis as redis_module
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ConfigurationError("Redis features need the redis extra: pip install 'taskpg[redis]'") from exc
    return redis_module.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=5.0)


@functools.cache
def redis_errors() -> tuple[type[Exception], ...]:
    """Redis failures that mean "not there right now": unreachable, timed out, full, or read-only (a replica)."""
    import redis as redis_module
    from redis import exceptions

    return (
        redis_module.ConnectionError,
        redis_module.TimeoutError,
        getattr(exceptions, "OutOfMemoryError", redis_module.ConnectionError),  # missing from older stubs
        exceptions.ReadOnlyError,
    )
