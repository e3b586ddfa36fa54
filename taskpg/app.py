"""``TaskPG``: settings, the task registry and ``@app.task``."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

from . import canvas, codec, control, embedded, migrate, ops
from . import events as events_module
from .buffer import BufferProducer, buffer_key
from .connections import Connections
from .dsn import configured_dsn
from .exceptions import ConfigurationError
from .guards import check_key_templates
from .limiter import QueueOptions
from .notifier import Notifier
from .options import VIA_CHOICES, TaskOptions, validate_queue_name, validate_task_name
from .periodic import DEFAULT_CATCH_UP, DEFAULT_CATCH_UP_LIMIT, DEFAULT_TIMEZONE, Schedule
from .rates import parse_rate
from .result import AsyncResult
from .retention import Retention
from .schema import DEFAULT_SCHEMA, validate_schema_name
from .store import Store
from .task import Task, TaskRegistry

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from .enqueue import Announce
    from .events import JobEvent

logger = logging.getLogger("taskpg")
F = TypeVar("F", bound=Callable[..., Any])


class TaskPG:
    """A taskpg application: where jobs are stored and which tasks exist.

    ``dsn`` falls back to TASKPG_DSN, then DATABASE_URL; with none of them an embedded
    Postgres is started under ``data_dir`` (and migrated automatically). ``schema`` is the
    Postgres schema holding taskpg's tables (default ``taskpg``, or TASKPG_SCHEMA).
    ``redis_url`` (or TASKPG_REDIS_URL) enables the Redis spike buffer; ``default_via="buffer"``
    sends every enqueue through it unless a task or a call says otherwise. ``notify_debounce``
    (seconds, or TASKPG_NOTIFY_DEBOUNCE) moves the NOTIFY of enqueues on the app's own connections
    out of their transactions, at most one per queue per window (see docs/enqueueing.md).
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str | None = None,
        default_queue: str = "default",
        pool_size: int = 10,
        max_payload_bytes: int | None = None,
        auto_migrate: bool | None = None,
        data_dir: str | Path | None = None,
        redis_url: str | None = None,
        default_via: str = "db",
        notify_debounce: float | None = None,
        buffer_lists: Sequence[str] | None = None,
        middleware: Sequence[Callable[..., Any]] = (),
        events: bool | None = None,
    ) -> None:
        self.schema = validate_schema_name(schema or os.environ.get("TASKPG_SCHEMA") or DEFAULT_SCHEMA)
        self.default_queue = validate_queue_name(default_queue, "default_queue")
        self.max_payload_bytes = _payload_limit(max_payload_bytes)
        self.pool_size = pool_size
        self.auto_migrate = auto_migrate
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.redis_url = redis_url or os.environ.get("TASKPG_REDIS_URL") or None
        if default_via not in VIA_CHOICES:
            raise ConfigurationError(f"default_via={default_via!r}: expected one of {VIA_CHOICES}")
        if default_via == "buffer" and self.redis_url is None:
            raise ConfigurationError("default_via='buffer' needs redis_url= (or TASKPG_REDIS_URL)")
        self.default_via = default_via
        self.notify_debounce = _debounce(notify_debounce)
        #: Publish job events (enqueued here; started and finished by this app's workers): events.py.
        self.send_events = events if events is not None else os.environ.get("TASKPG_EVENTS", "") in ("1", "true", "yes")
        self._notifier: Notifier | None = None
        self._buffer: BufferProducer | None = None
        self._buffer_lists = _list_names(buffer_lists, os.environ.get("TASKPG_BUFFER_LISTS"))
        #: Callables ``(call_next, request)`` around every run of this app's tasks (see hooks.py).
        self.middleware: tuple[Callable[..., Any], ...] = tuple(middleware)
        if not all(callable(m) for m in self.middleware):
            raise ConfigurationError("middleware= takes callables (call_next, request) -> result")
        self.tasks = TaskRegistry()
        canvas.register_builtins(self)  # taskpg.map and taskpg.starmap, behind task.map/starmap/chunks
        self._periodic: list[Schedule] = []
        self.queues: dict[str, QueueOptions] = {}
        self.retention: dict[str | None, Retention] = {None: Retention()}
        self._dsn = configured_dsn(dsn)
        self._store: Store | None = None
        self._lock = threading.Lock()

    # -- where the data lives ----------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """The database DSN; starts the embedded Postgres on first use when none is configured."""
        if self._dsn is None:
            with self._lock:
                if self._dsn is None:
                    self._dsn = embedded.start(self.data_dir)
                    if self.auto_migrate is None:
                        self.auto_migrate = True
        return self._dsn

    @property
    def store(self) -> Store:
        """Where statements run: the connection pool and the schema's statements (made on first use)."""
        if self._store is None:
            dsn = self.dsn
            with self._lock:
                if self._store is None:
                    if self.auto_migrate:
                        migrate.upgrade(dsn, self.schema)
                    self._store = Store(Connections(dsn, self.pool_size), self.schema)
        return self._store

    def configure(self, dsn: str | None = None, schema: str | None = None, redis_url: str | None = None) -> None:
        """Point the app elsewhere before it is first used (what the CLI's --dsn/--schema do)."""
        if not (dsn or schema or redis_url):
            return
        if self._store is not None or self._buffer is not None:
            raise ConfigurationError("configure() must come before the app's first use of the database or Redis")
        if dsn:
            self._dsn = dsn
        if schema:
            self.schema = validate_schema_name(schema)
        if redis_url:
            self.redis_url = redis_url

    @property
    def buffer_lists(self) -> tuple[str, ...]:
        """The Redis lists of the buffer: producers push to the first, flushers read them all."""
        return self._buffer_lists or (buffer_key(self.schema),)

    @property
    def buffer(self) -> BufferProducer:
        """The Redis buffer producer (needs ``redis_url``)."""
        if self._buffer is None:
            if self.redis_url is None:
                raise ConfigurationError("via='buffer' needs an app with redis_url= (or TASKPG_REDIS_URL)")
            store = self.store
            with self._lock:
                if self._buffer is None:
                    self._buffer = BufferProducer(store, self.redis_url, self.buffer_lists)
        return self._buffer

    @property
    def announce(self) -> Announce | None:
        """With ``notify_debounce``: the function that announces a queue's new jobs after their
        commit (one background notifier per app); None when enqueues NOTIFY in their transaction."""
        if self.notify_debounce is None:
            return None
        if self._notifier is None:
            store = self.store
            with self._lock:
                if self._notifier is None:
                    self._notifier = Notifier(store, self.notify_debounce)
        return self._notifier.announce

    def migrate(self, revision: str = "head") -> None:
        """Apply the Alembic migrations to this app's schema (what ``taskpg migrate`` does)."""
        migrate.upgrade(self.dsn, self.schema, revision)

    def close(self) -> None:
        """Send pending debounced NOTIFYs, then close the connection pool."""
        if self._notifier is not None:
            self._notifier.close()
            self._notifier = None
        if self._store is not None:
            self._store.connections.close()
            self._store = None

    # -- tasks ---------------------------------------------------------------------------------

    @overload
    def task(self, fn: F) -> Task[Any, Any]: ...

    @overload
    def task(self, fn: None = None, *, name: str | None = None, **options: Any) -> Callable[[F], Task[Any, Any]]: ...

    def task(
        self, fn: Callable[..., Any] | None = None, *, name: str | None = None, **options: Any
    ) -> Task[Any, Any] | Callable[[Callable[..., Any]], Task[Any, Any]]:
        """Register a function as a task: ``@app.task`` or ``@app.task(queue=..., max_retries=...)``.

        The default name is ``module.qualname`` (as in Celery); registering a name twice is an
        error. Options are validated here, so a bad value fails at import time.
        """
        task_options = TaskOptions.build(default_queue=self.default_queue, **options)

        def register(function: Callable[..., Any]) -> Task[Any, Any]:
            task_name = validate_task_name(f"{function.__module__}.{function.__qualname__}" if name is None else name)
            if task_name in self.tasks:
                raise ConfigurationError(f"a task named {task_name!r} is already registered")
            check_key_templates(task_name, function, task_options)
            task: Task[Any, Any] = Task(self, function, task_name, task_options)
            self.tasks[task_name] = task
            return task

        return register(fn) if fn is not None else register

    def add_periodic(
        self,
        task: Task[Any, Any],
        *,
        cron: str | None = None,
        every: float | timedelta | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
        timezone: str = DEFAULT_TIMEZONE,
        catch_up: str = DEFAULT_CATCH_UP,
        catch_up_limit: int = DEFAULT_CATCH_UP_LIMIT,
    ) -> Schedule:
        """Run ``task`` with these arguments on a schedule (Celery's ``add_periodic_task``).

        ``catch_up`` says what happens to ticks missed while no beat ran: ``latest`` runs the most
        recent one once, ``skip`` runs none, ``all`` runs each (at most ``catch_up_limit``).
        """
        seconds = float(every.total_seconds() if isinstance(every, timedelta) else every) if every is not None else None
        codec.encode_arguments(task.name, args, kwargs or {})  # JSON check now, not at the first tick
        schedule = Schedule(
            name=name or f"{task.name}[{cron or ('' if seconds is None else f'every {seconds:g}s')}]",
            task=task.name,
            cron=cron,
            every=seconds,
            timezone=timezone,
            args=tuple(args),
            kwargs=dict(kwargs or {}),
            catch_up=catch_up,
            catch_up_limit=catch_up_limit,
        )
        if any(existing.name == schedule.name for existing in self.schedules()):
            raise ConfigurationError(f"a periodic schedule named {schedule.name!r} already exists")
        self._periodic.append(schedule)
        return schedule

    def schedules(self) -> list[Schedule]:
        """Every periodic schedule: tasks declared with cron=/every=, then ``add_periodic`` ones."""
        declared = [
            Schedule(
                name=t.name,
                task=t.name,
                cron=t.options.cron,
                every=t.options.every,
                timezone=t.options.timezone or DEFAULT_TIMEZONE,
                catch_up=t.options.catch_up,
            )
            for t in self.tasks.values()
            if t.options.cron is not None or t.options.every is not None
        ]
        names = [s.name for s in declared + self._periodic]
        if len(names) != len(set(names)):
            raise ConfigurationError(
                f"two periodic schedules share a name: {sorted(n for n in names if names.count(n) > 1)}"
            )
        return declared + list(self._periodic)

    def queue(self, name: str, *, rate_limit: str | float | None = None, concurrency: int | None = None) -> None:
        """Limits for every job of a queue, across all workers: ``rate_limit`` ("N/period", starts
        spaced evenly, at most N in any window of the period) and ``concurrency`` (most jobs running at once)."""
        validate_queue_name(name)
        if concurrency is not None and (
            isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
        ):
            raise ConfigurationError(f"concurrency={concurrency!r}: expected an integer >= 1")
        rate = parse_rate(rate_limit, "rate_limit") if rate_limit is not None else None
        self.queues[name] = QueueOptions(name, rate, concurrency)

    def set_retention(self, queue: str | None = None, **rule: Any) -> None:
        """How long finished jobs are kept (seconds per state; ``max_count`` per state and queue),
        for one queue or (queue=None) for every queue without a rule of its own. Beat prunes."""
        rule = {k: v.total_seconds() if isinstance(v, timedelta) else v for k, v in rule.items()}
        try:
            self.retention[queue] = Retention(**rule)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"set_retention({queue!r}): {exc}") from exc

    def send_task(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Enqueue a job by task name (Celery's ``send_task``): the task need not be registered here,
        only in the workers that run it. Takes ``apply_async``'s options; the queue defaults to the
        registered task's, else the app's default queue."""
        task = self.tasks.get(name)
        if task is None:
            task = Task(self, _not_here(name), validate_task_name(name), TaskOptions.build(self.default_queue))
        return task.apply_async(args, kwargs, **options)

    # -- queue control and status --------------------------------------------------------------

    def pause_queue(self, name: str) -> bool:
        """Stop every worker from claiming ``name``'s jobs (BullMQ's ``queue.pause()``) until
        ``resume_queue``; jobs already claimed finish. False when it was paused already."""
        return control.pause_queue(self.store, name)

    def resume_queue(self, name: str) -> bool:
        """Let ``name``'s jobs be claimed again, waking its workers; False when it was not paused."""
        return control.resume_queue(self.store, name)

    def paused_queues(self) -> list[str]:
        """The names of the paused queues."""
        return list(control.paused_queues(self.store))

    def purge(self, queues: Sequence[str] | None = None, task: str | None = None) -> int:
        """Cancel the waiting jobs (available and scheduled) of ``queues`` (every queue when None)
        and/or of one ``task`` (Celery's ``purge``); returns how many. Running jobs are left alone."""
        return control.purge(self.store, queues, task)

    def queue_status(self) -> dict[str, dict[str, Any]]:
        """Per queue: waiting, active, completed, failed, delayed (BullMQ's ``getJobCounts``),
        cancelled, paused, oldest waiting age, jobs finished in the last minute, and its limits."""
        limits = {name: (_text(q.rate_limit), q.concurrency) for name, q in self.queues.items()}
        known = [self.default_queue, *(t.options.queue for t in self.tasks.values())]
        return ops.queue_status(self.store, limits, known)

    def AsyncResult(self, id: str) -> AsyncResult:
        """A handle for an existing job id."""
        return AsyncResult(self, str(id))

    def events(
        self,
        queues: Sequence[str] | None = None,
        types: Sequence[str] | None = None,
        timeout: float | None = None,
        on_listening: Callable[[], None] | None = None,
    ) -> Iterator[JobEvent]:
        """Yield job events (enqueued, started, succeeded, failed, retried, snoozed, dead) as apps with
        ``events=True`` and their workers publish them, from LISTEN on a connection of its own; only
        those of ``queues`` and ``types`` if given. Ends after ``timeout`` seconds without an event
        (never, by default). ``on_listening`` is called once LISTEN is active."""
        return events_module.listen(self.store, queues, types, timeout, on_listening)

    def aevents(
        self,
        queues: Sequence[str] | None = None,
        types: Sequence[str] | None = None,
        timeout: float | None = None,
        on_listening: Callable[[], None] | None = None,
    ) -> AsyncIterator[JobEvent]:
        """``events`` for asyncio code (``async for event in app.aevents(...)``): the LISTEN runs in a
        thread of its own, so the event loop never blocks."""
        return events_module.alisten(self.store, queues, types, timeout, on_listening)


def _text(value: object | None) -> str | None:
    return None if value is None else str(value)


def _not_here(name: str) -> Callable[..., Any]:
    def not_registered(*args: Any, **kwargs: Any) -> Any:
        raise ConfigurationError(f"task {name!r} is not registered in this process: it runs in a worker")

    return not_registered


def _debounce(value: float | None) -> float | None:
    """``notify_debounce``: the argument, else TASKPG_NOTIFY_DEBOUNCE; a number of seconds >= 0."""
    if value is None:
        text = os.environ.get("TASKPG_NOTIFY_DEBOUNCE", "").strip()
        if not text:
            return None
        try:
            value = float(text)
        except ValueError:
            raise ConfigurationError(f"TASKPG_NOTIFY_DEBOUNCE={text!r}: expected a number of seconds") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 60:
        raise ConfigurationError(f"notify_debounce={value!r}: expected a number of seconds from 0 to 60, or None")
    return float(value)


def _payload_limit(given: int | None) -> int:
    """``max_payload_bytes``: as given, else ``TASKPG_MAX_PAYLOAD_BYTES``, else 1,000,000."""
    text = os.environ.get("TASKPG_MAX_PAYLOAD_BYTES")
    if given is None and text:
        try:
            given = int(text)
        except ValueError:
            raise ConfigurationError(f"TASKPG_MAX_PAYLOAD_BYTES={text!r} is not a whole number of bytes") from None
    limit = codec.DEFAULT_MAX_PAYLOAD_BYTES if given is None else given
    if isinstance(limit, bool) or not 0 < limit <= codec.MAX_PAYLOAD_BYTES:
        raise ConfigurationError(
            f"max_payload_bytes={limit!r}: must be from 1 to {codec.MAX_PAYLOAD_BYTES:,} (the most a jsonb value holds)"
        )
    return limit


_LIST_NAME = re.compile(r"[!-~]{1,512}")  # printable ASCII, no spaces: a Redis key a shell can type


def _list_names(given: Sequence[str] | None, from_env: str | None) -> tuple[str, ...]:
    """``buffer_lists``: as given, else ``TASKPG_BUFFER_LISTS`` (comma-separated); () for the default."""
    names = tuple(given) if given is not None else tuple(n.strip() for n in (from_env or "").split(",") if n.strip())
    if given is not None and not names:
        raise ConfigurationError("buffer_lists=[]: name at least one Redis list, or leave it out for the default")
    for name in names:
        if not isinstance(name, str) or not _LIST_NAME.fullmatch(name):
            raise ConfigurationError(f"buffer list {name!r}: use 1-512 printable ASCII characters without spaces")
        if name.startswith("taskpg:") and not name.endswith(":buffer"):
            raise ConfigurationError(f"buffer list {name!r}: names under taskpg: are taskpg's own keys")
    if len(set(names)) != len(names):
        raise ConfigurationError(f"buffer_lists={list(names)!r}: a list is named twice")
    return names
