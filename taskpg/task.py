"""``Task``: a registered function plus its options; ``delay``/``apply_async``/``delay_many``."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime as dt
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, NoReturn, ParamSpec, Protocol, TypeVar

from . import canvas, codec, events, guards, hooks
from .canvas import Signature
from .connections import caller_connection
from .enqueue import copy_batch, insert_job, insert_jobs
from .events import JobEvent
from .exceptions import ConfigurationError, NotRegistered, Retry, SerializationError, Snooze
from .job import JobBatch, NewJob, Request, Row, Status, job_id_sequence, new_job_id, validate_job_id
from .options import VIA_CHOICES, TaskOptions, validate_priority, validate_queue_name
from .result import AsyncResult

if TYPE_CHECKING:
    from .buffer import BufferProducer
    from .enqueue import Announce
    from .guards import Guard, Planned
    from .store import Store

logger = logging.getLogger("taskpg.enqueue")
P = ParamSpec("P")
R = TypeVar("R")


class TaskHost(Protocol):
    """What a task needs from its app (``TaskPG`` is one): where and how jobs are written."""

    tasks: TaskRegistry
    default_via: str
    default_queue: str
    max_payload_bytes: int
    middleware: tuple[Callable[..., Any], ...]
    send_events: bool

    @property
    def store(self) -> Store: ...

    @property
    def buffer(self) -> BufferProducer: ...

    @property
    def announce(self) -> Announce | None: ...

    def send_task(
        self, name: str, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult: ...


class TaskRegistry(dict[str, "Task[Any, Any]"]):
    """Task name -> Task. A missing name raises ``NotRegistered``."""

    def __missing__(self, name: str) -> Task[Any, Any]:
        raise NotRegistered(name)


_current_request: contextvars.ContextVar[Request | None] = contextvars.ContextVar("taskpg_request", default=None)


class Task(Generic[P, R]):
    """A task function registered with an app. Calling it runs the function inline."""

    def __init__(self, app: TaskHost, fn: Callable[..., R], name: str, options: TaskOptions) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self.options = options
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.options.queue}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.run(args, kwargs)

    def run(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> R:
        """Call the function (with ``self`` first when ``bind=True``)."""
        if self.options.bind:
            return self.fn(self, *args, **kwargs)
        return self.fn(*args, **kwargs)

    # -- inside a running task (bind=True) ---------------------------------------------------

    @property
    def request(self) -> Request:
        """The running job's id, attempt and arguments (an empty Request outside a worker)."""
        return _current_request.get() or Request(task=self.name)

    def retry(
        self, countdown: float | None = None, exc: BaseException | None = None, max_retries: int | None = None
    ) -> NoReturn:
        """Ask for another attempt; raises ``Retry`` (Celery: ``raise self.retry(exc=e)`` works too)."""
        raise Retry(countdown=countdown, exc=exc, max_retries=max_retries)

    def update_state(self, state: str = "PROGRESS", meta: Any = None, task_id: str | None = None) -> bool:
        """Celery's: record a state of your own (and JSON ``meta``) for the running job, say
        ``self.update_state(state="PROGRESS", meta={"done": 40, "total": 100})``. Its handle reports the
        state (``status``) and the meta (``info``) until the job finishes; a ``progress`` event is sent
        with ``events=True``. Returns False when the job is not running (any more)."""
        if not isinstance(state, str) or not 0 < len(state) <= 64 or state in Status.__members__:
            raise ConfigurationError(
                f"update_state(state={state!r}): use a name of your own (1-64 characters), not one of taskpg's "
                f"statuses ({', '.join(Status.__members__)})"
            )
        return self._say("update_state", {"state": state, "meta": meta}, task_id)

    def update_progress(self, progress: Any, task_id: str | None = None) -> bool:
        """BullMQ's ``job.updateProgress``: record how far the running job got (a number such as 42, or any
        JSON); its handle's ``progress`` reads it, also once the job finished. A ``progress`` event is sent
        with ``events=True``. Returns False when the job is not running (any more)."""
        return self._say("update_progress", {"progress": progress}, task_id)

    def _say(self, what: str, said: dict[str, Any], task_id: str | None) -> bool:
        """Write what the running job says of itself to its row, and publish it as a ``progress`` event."""
        job_id = task_id or self.request.id
        if job_id is None:
            raise ConfigurationError(f"{what}() outside a running job needs task_id=")
        try:
            written = self.app.store.update_progress(job_id, said)
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"task {self.name!r}: {what} takes JSON: {exc}") from exc
        if written and self.app.send_events:
            request = self.request
            event = JobEvent("progress", job_id, self.name, request.queue or "", request.attempt, time.time(), said)
            try:
                self.app.store.publish_events(events.payloads([event]))
            except Exception as exc:
                logger.warning("task %s: progress recorded, but its event could not be published: %s", self.name, exc)
        return written

    def snooze(self, seconds: float) -> NoReturn:
        """Run again after ``seconds`` without spending an attempt; raises ``Snooze``."""
        raise Snooze(seconds)

    # -- enqueue ---------------------------------------------------------------------------------

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult:
        """Enqueue with the task's default options (Celery's shortcut)."""
        return self.apply_async(args=args, kwargs=kwargs)

    # -- signatures (canvas.py) ------------------------------------------------------------------

    def signature(
        self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> Signature:
        """A call of this task to pass around or put in a canvas (Celery's ``signature``); ``immutable=True``
        keeps a parent's result out of its arguments."""
        immutable = bool(options.pop("immutable", False))
        return Signature(self, args, kwargs, options, immutable=immutable, app=self.app)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """``signature(args, kwargs)``: ``add.s(2)`` is a partial, completed when called (``add.s(2).delay(8)``)."""
        return Signature(self, args, kwargs, app=self.app)

    def map(self, items: Iterable[Any]) -> Signature:
        """Celery's ``task.map(items)``: one job that calls this task with each item; its result is the list."""
        return canvas.map(self, items)

    def starmap(self, items: Iterable[Sequence[Any]]) -> Signature:
        """Celery's ``task.starmap(items)``: one job that calls ``task(*item)`` for each item."""
        return canvas.starmap(self, items)

    def chunks(self, items: Iterable[Sequence[Any]], n: int) -> canvas.chunks:
        """Celery's ``task.chunks(items, n)``: the items in parts of ``n``, one starmap job per part, as a group."""
        return canvas.chunks(self, items, n)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature: call-time arguments and a parent's result are not added to its own."""
        return Signature(self, args, kwargs, immutable=True, app=self.app)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: dt.datetime | None = None,
        queue: str | None = None,
        priority: int | None = None,
        session: Any = None,
        connection: Any = None,
        via: str | None = None,
        task_id: str | None = None,
        link: Any = None,
        link_error: Any = None,
        expires: float | dt.datetime | None = None,
    ) -> AsyncResult:
        """Enqueue one job.

        ``countdown`` (seconds) or ``eta`` (an aware datetime) delay it; ``queue``/``priority``
        override the task's. With ``session=`` (SQLAlchemy) or ``connection=`` (psycopg) the job is
        written in the caller's transaction and exists only if that transaction commits.
        ``via="buffer"`` pushes it onto the Redis buffer instead (one round trip; see docs/buffer.md).
        ``task_id`` chooses the job's id (a second enqueue with the same id is the same job).
        ``link``/``link_error``: signatures (or lists of them) enqueued when this job succeeds (with its
        result prepended to their arguments) or ends dead or revoked (with its id), in the transaction
        that records its outcome (docs/canvas.md). ``expires`` (seconds, or an aware datetime): a job no
        worker started by then is never run; it ends revoked (``JobExpired``).
        """
        planned = self.build_job(
            args or (), kwargs, countdown=countdown, eta=eta, queue=queue, priority=priority, job_id=task_id
        )
        job, guard = planned.job, planned.guard
        links = canvas.plan_links(self.app, link, link_error) if link or link_error else None
        if links is not None or expires is not None:
            if via == "buffer":
                raise ConfigurationError("link=, link_error= and expires= go straight to Postgres: drop via='buffer'")
            via = "db"
            job = dataclasses.replace(job, links=links, expires=_checked_expiry(expires))
        buffered = self._through_buffer(via, session, connection, guard)
        header = self._header(job, buffered, args or (), kwargs or {}) if hooks.publishing() else None
        if header is not None:
            job = self._with_headers(job, header)
        if buffered:
            holder: str | None = self.app.buffer.push(job, planned.dedupe_key, self.options.unique_for, guard)
        else:
            store = self._store(session, connection)
            holder = insert_job(store, job, guard, self.app.announce)
            if self.app.send_events and holder == job.id:  # a buffered job's is told by the flusher
                self._tell_enqueued(store, [job.id], job.queue)
        if header is not None and holder == job.id:  # a job was written (not a unique twin or a throttled call)
            hooks.after_publish(header, args or (), kwargs or {})
        if holder is None:
            return AsyncResult(self.app, job.id, self.name, throttled=True)
        return AsyncResult(self.app, holder, self.name)

    def _with_headers(self, job: NewJob, header: dict[str, Any]) -> NewJob:
        """The job with the headers publish receivers added (a traceparent), as JSON stored in its row."""
        added = hooks.added_headers(header)
        if not added:
            return job
        try:
            text = codec.dumps(added)
        except (TypeError, ValueError) as exc:
            raise SerializationError(
                f"task {self.name!r}: headers a publish receiver added are not JSON: {exc}"
            ) from exc
        if len(text) > codec.MAX_HEADERS_BYTES:
            raise SerializationError(
                f"task {self.name!r}: headers take {len(text)} bytes, over the limit of {codec.MAX_HEADERS_BYTES}"
            )
        return dataclasses.replace(job, headers=text)

    def _tell_enqueued(self, store: Store, ids: Sequence[str | None], queue: str) -> None:
        """Publish ``enqueued`` events (``events=True``): in the caller's transaction when the store is
        bound to it, else right after the write. A failure is logged: the job is written already."""
        jobs = [JobEvent("enqueued", job_id, self.name, queue, 0, time.time()) for job_id in ids if job_id]
        try:
            store.publish_events(events.payloads(jobs))
        except Exception as exc:
            logger.warning(
                "task %s: %d job(s) enqueued, but their events could not be published: %s", self.name, len(jobs), exc
            )

    def _header(self, job: NewJob, buffered: bool, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The publish signals' headers for a job about to be written; sends before_task_publish."""
        header = hooks.headers(
            job.id, self.name, job.queue, job.eta, job.countdown, job.priority, "buffer" if buffered else "db"
        )
        hooks.before_publish(header, args, kwargs)
        return header

    def _store(self, session: Any, connection: Any) -> Store:
        """The app's store, bound to the caller's connection when one is given."""
        target = caller_connection(session, connection)
        return self.app.store if target is None else self.app.store.on(target)

    def _through_buffer(self, via: str | None, session: Any, connection: Any, guard: Guard | None) -> bool:
        chosen = via or self.options.via or self.app.default_via
        if chosen not in VIA_CHOICES:
            raise ConfigurationError(f"via={chosen!r}: expected one of {VIA_CHOICES}")
        if chosen == "buffer" and (session is not None or connection is not None):
            if via == "buffer":
                raise ConfigurationError("via='buffer' cannot join your transaction: drop session=/connection=")
            return False  # a transactional enqueue always goes straight to Postgres
        if chosen == "buffer" and guard is not None and guard.throttle is not None:
            return False  # a throttle is decided in Postgres at enqueue time, so throttled calls go direct
        return chosen == "buffer"

    def delay_many(
        self,
        calls: Iterable[Sequence[Any] | Mapping[str, Any]],
        *,
        countdown: float | None = None,
        eta: dt.datetime | None = None,
        queue: str | None = None,
        priority: int | None = None,
        session: Any = None,
        connection: Any = None,
        via: str | None = None,
    ) -> list[str | None]:
        """Enqueue many jobs with one COPY, in one transaction; returns their ids in order.

        Each item is the positional arguments of one call (a tuple or list), or its keyword
        arguments (a dict). Nothing is written if any item fails to encode. Tasks with a throttle
        or a unique key are written row by row in one transaction instead of by COPY: the id of a
        call that collided is the existing job's, and None marks a call a throttle turned away.
        """
        store = self._store(session, connection)
        guarded = self.options.throttle is not None or self.options.unique_key is not None
        # With publish receivers, each job may get headers of its own: row by row rather than one COPY.
        if not guarded and not hooks.publishing() and not self._through_buffer(via, session, connection, None):
            return self._copy_many(calls, countdown, eta, queue, priority, store)

        planned: list[Planned] = []

        published: list[tuple[dict[str, Any], Sequence[Any], Mapping[str, Any]]] = []
        buffered = self._through_buffer(via, session, connection, self._sample_guard())
        hooked = hooks.publishing()

        def jobs() -> Iterator[NewJob]:
            for index, call in enumerate(calls):
                args, kwargs = _split_call(index, call)
                try:
                    one = self.build_job(args, kwargs, countdown=countdown, eta=eta, queue=queue, priority=priority)
                except SerializationError as exc:
                    raise _item_error(index, exc) from exc
                if hooked:
                    header = self._header(one.job, buffered, args, kwargs)
                    one = dataclasses.replace(one, job=self._with_headers(one.job, header))
                    published.append((header, args, kwargs))
                planned.append(one)
                yield one.job

        if buffered:
            if guarded:
                list(jobs())
                unique_for = self.options.unique_for
                ids = [self.app.buffer.push(p.job, p.dedupe_key, unique_for, p.guard) for p in planned]
            else:
                self.app.buffer.push_many(jobs())
                ids = [p.job.id for p in planned]
        else:
            batch = list(jobs())
            ids = insert_jobs(store, batch, [p.guard for p in planned], self.app.announce)
        if self.app.send_events and not buffered:  # a buffered job's is told by the flusher
            new = [job_id for job_id, p in zip(ids, planned, strict=True) if job_id == p.job.id]
            self._tell_enqueued(store, new, self._queue(queue))
        written = set(ids)  # a unique twin returns its holder's id, a throttled call None
        for header, args, kwargs in published:
            if header["id"] in written:
                hooks.after_publish(header, args, kwargs)
        return ids

    def _copy_many(
        self,
        calls: Iterable[Sequence[Any] | Mapping[str, Any]],
        countdown: float | None,
        eta: dt.datetime | None,
        queue: str | None,
        priority: int | None,
        store: Store,
    ) -> list[str | None]:
        """delay_many's fast path (no throttle, no unique key, no publish receiver, straight to Postgres):
        the options are checked once for the batch, ids are made in bulk, and rows stream into one COPY."""
        _check_timing(countdown, eta)
        ids: list[str | None] = []
        batch = JobBatch(
            task=self.name,
            queue=self._queue(queue),
            priority=self._priority(priority),
            max_attempts=self.options.max_attempts,
            rows=self._rows(calls, ids),
            eta=eta,
            countdown=float(countdown or 0.0),
        )
        copy_batch(store, batch, self.app.announce)
        if self.app.send_events:
            self._tell_enqueued(store, ids, batch.queue)
        return ids

    def _rows(self, calls: Iterable[Sequence[Any] | Mapping[str, Any]], ids: list[str | None]) -> Iterator[Row]:
        """(id, args JSON, kwargs JSON) per call, recording each id in ``ids`` as it is made."""
        index = 0
        try:
            for index, (call, job_id) in enumerate(zip(calls, job_id_sequence(), strict=False)):
                args_json, kwargs_json = self._encode(*_split_call(index, call))
                ids.append(job_id)
                yield job_id, args_json, kwargs_json
        except SerializationError as exc:
            raise _item_error(index, exc) from exc

    def _encode(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[str, str]:
        """The JSON of a call's arguments (or the error naming the bad one)."""
        return codec.encode_arguments(self.name, args, kwargs, self.app.max_payload_bytes)

    def _sample_guard(self) -> Guard | None:
        """Whether calls of this task carry a throttle (for routing; the key does not matter)."""
        if self.options.throttle is None:
            return None
        return guards.Guard(self.name, throttle=guards.Throttle("", self.options.throttle, False))

    def build_job(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: dt.datetime | None = None,
        queue: str | None = None,
        priority: int | None = None,
        job_id: str | None = None,
    ) -> Planned:
        """The job one call would write (arguments encoded, options checked), with the throttle and
        unique-key checks its enqueue must make; nothing is written. ``apply_async`` and beat use it."""
        kwargs = kwargs or {}
        args_json, kwargs_json = self._encode(args, kwargs)
        _check_timing(countdown, eta)
        job = NewJob(
            id=new_job_id() if job_id is None else validate_job_id(job_id),
            task=self.name,
            queue=self._queue(queue),
            args=args_json,
            kwargs=kwargs_json,
            priority=self._priority(priority),
            max_attempts=self.options.max_attempts,
            eta=eta,
            countdown=float(countdown or 0.0),
        )
        return guards.plan(job, self.fn, self.options, args, kwargs)

    def _queue(self, queue: str | None) -> str:
        return self.options.queue if queue is None else validate_queue_name(queue)

    def _priority(self, priority: int | None) -> int:
        return self.options.priority if priority is None else validate_priority(priority)


def _check_timing(countdown: float | None, eta: dt.datetime | None) -> None:
    """Reject a negative or non-numeric countdown, a naive eta, or both at once."""
    if countdown is not None and (
        isinstance(countdown, bool) or not isinstance(countdown, (int, float)) or not countdown >= 0
    ):
        raise ConfigurationError(f"countdown={countdown!r}: expected a number of seconds >= 0")
    if eta is not None and countdown is not None:
        raise ConfigurationError("give countdown= or eta=, not both")
    if eta is not None and eta.tzinfo is None:
        raise ConfigurationError("eta= must be a timezone-aware datetime")


def _checked_expiry(expires: float | dt.datetime | None) -> float | dt.datetime | None:
    """``expires=``: seconds from now (a number >= 0) or a timezone-aware datetime."""
    if expires is None or (isinstance(expires, dt.datetime) and expires.tzinfo is not None):
        return expires
    if isinstance(expires, bool) or not isinstance(expires, (int, float)) or not expires >= 0:
        raise ConfigurationError(f"expires={expires!r}: expected seconds >= 0 or a timezone-aware datetime")
    return float(expires)


def _split_call(index: int, call: Sequence[Any] | Mapping[str, Any]) -> tuple[Sequence[Any], Mapping[str, Any]]:
    """A delay_many item as (args, kwargs): a tuple or list is positional, a mapping is keywords."""
    if isinstance(call, (tuple, list)):
        return call, {}
    if isinstance(call, Mapping):
        return (), call
    raise ConfigurationError(
        f"delay_many item {index}: items are argument tuples or keyword dicts; got {type(call).__name__}"
    )


def _item_error(index: int, exc: SerializationError) -> SerializationError:
    """The same error, saying which delay_many item it is about."""
    return SerializationError(f"delay_many item {index}: {exc}")


def current_request() -> Request | None:
    """The request of the job running in this thread or task, if any (for log records)."""
    return _current_request.get()


@contextlib.contextmanager
def request_context(request: Request) -> Iterator[None]:
    """Make ``request`` what ``self.request`` returns while a worker runs the job."""
    token = _current_request.set(request)
    try:
        yield
    finally:
        _current_request.reset(token)
