"""Checks made when a job is enqueued, inside the enqueue's own transaction.

- A **throttle** (``throttle_key`` + ``throttle="N/period"``) admits at most N jobs per key per
  fixed window (windows aligned to the epoch). An extra call writes nothing (``drop``, the
  default) or is scheduled into the first window with room (``defer``).
- A **unique** job (``unique_key``) has no twin: while an unfinished job holds the key (default),
  or for ``unique_for`` seconds after the first enqueue, an enqueue returns the holder's id.

Keys are rendered from the call's arguments (a format string over the function's parameters, or
a callable). Limits checked when jobs *start* (rate limits, queue caps) are in ``limiter.py``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import inspect
import re
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import codec
from .exceptions import ConfigurationError
from .options import validate_key

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from .job import NewJob
    from .options import TaskOptions
    from .rates import Rate
    from .store import Store

#: Most windows a deferred throttled call looks ahead for room.
DEFER_WINDOWS = 1000
KEY_OPTIONS = ("throttle_key", "unique_key", "rate_limit_key")


@dataclass(frozen=True)
class Throttle:
    key: str
    rate: Rate
    defer: bool


@dataclass(frozen=True)
class Guard:
    """Checks made in the enqueue's own transaction: a throttle, a time-bound unique key."""

    task: str
    throttle: Throttle | None = None
    unique_for_key: str | None = None
    unique_for: float | None = None


@dataclass(frozen=True)
class Planned:
    """A job built for one call, with the checks its enqueue must make."""

    job: NewJob
    guard: Guard | None

    @property
    def dedupe_key(self) -> str | None:
        """The key a buffered push is deduplicated on: the job's own, or its ``unique_for`` key."""
        return self.job.unique_key or (self.guard.unique_for_key if self.guard is not None else None)


@dataclass(frozen=True)
class Written:
    """What one enqueue wrote: the id standing for the call (None: a throttle turned it away)
    and whether a new job is due now (its queue should be woken)."""

    holder: str | None
    due: bool


# -- keys ----------------------------------------------------------------------------------------


def render_key(
    template: str | Callable[..., str],
    task: str,
    fn: Callable[..., Any],
    bind: bool,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    option: str,
) -> str:
    """A throttle/unique/rate-limit key from the call's arguments (format string or callable)."""
    if callable(template):
        return str(template(*args, **kwargs))
    try:
        bound = inspect.signature(fn).bind(*([None] if bind else []), *args, **kwargs)
    except TypeError as exc:
        raise ConfigurationError(f"task {task!r}: arguments do not fit its signature: {exc}") from exc
    bound.apply_defaults()
    try:
        return template.format(**bound.arguments)
    except (KeyError, IndexError, AttributeError) as exc:
        raise ConfigurationError(f"task {task!r}: {option}={template!r} names {exc}, not an argument") from exc


def check_key_templates(task: str, fn: Callable[..., Any], options: TaskOptions) -> None:
    """Fail at declaration when a key format string names something that is not an argument."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    parameters = list(signature.parameters.values())[1 if options.bind else 0 :]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return  # **kwargs: any name may be an argument
    names = {p.name for p in parameters}
    for option in KEY_OPTIONS:
        template = getattr(options, option)
        if not isinstance(template, str):
            continue
        for _, field, _, _ in string.Formatter().parse(template):
            root = re.split(r"[.\[]", field, maxsplit=1)[0] if field else ""
            if root and root not in names:
                raise ConfigurationError(
                    f"task {task!r}: {option}={template!r} names {root!r}, which is not one of its arguments "
                    f"({', '.join(sorted(names)) or 'none'})"
                )


def unique_key_for(
    task: str, fn: Callable[..., Any], options: TaskOptions, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> str | None:
    """The job's unique key: ``task:<rendered key>``, or a hash of the arguments for ``unique_key=True``."""
    option = options.unique_key
    if option is None:
        return None
    if option is True:
        digest = hashlib.sha256(codec.dumps([list(args), dict(sorted(kwargs.items()))]).encode()).hexdigest()
        return f"{task}:{digest[:32]}"
    key = f"{task}:{render_key(option, task, fn, options.bind, args, kwargs, 'unique_key')}"
    return validate_key(key, f"task {task!r}: unique_key")


def plan(
    job: NewJob, fn: Callable[..., Any], options: TaskOptions, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> Planned:
    """The checks one call needs: a unique key held by unfinished jobs goes on the job itself; a
    throttle or a ``unique_for`` key becomes a Guard (None when there is nothing to check)."""
    unique = unique_key_for(job.task, fn, options, args, kwargs)
    throttle = None
    if options.throttle_key is not None and options.throttle is not None:
        key = render_key(options.throttle_key, job.task, fn, options.bind, args, kwargs, "throttle_key")
        validate_key(key, f"task {job.task!r}: throttle_key")
        throttle = Throttle(key, options.throttle, options.throttle_mode == "defer")
    if unique is not None and options.unique_for is None:
        job = dataclasses.replace(job, unique_key=unique)
        unique = None
    if throttle is None and unique is None:
        return Planned(job, None)
    return Planned(job, Guard(job.task, throttle=throttle, unique_for_key=unique, unique_for=options.unique_for))


# -- the guarded insert --------------------------------------------------------------------------

DROPPED = "dropped"


def admit_throttle(store: Store, task: str, throttle: Throttle) -> dt.datetime | str | None:
    """Take a place in the throttle window: None = run as asked, a datetime = run then (deferred),
    ``DROPPED`` = turned away. Call inside the enqueue's transaction."""
    for ahead in range(DEFER_WINDOWS if throttle.defer else 1):
        slot = store.throttle_admit(task, throttle.key, throttle.rate, ahead)
        if slot is not None:
            return slot.window_start if slot.in_future else None
    store.throttle_rejected(task, throttle.key, throttle.rate)
    return DROPPED


def insert_guarded(store: Store, job: NewJob, guard: Guard | None, notify: bool) -> Written:
    """Write one job with its checks, all-or-nothing, on the store's connection.

    Uniqueness first: a call that collides returns the holder and takes no throttle place.
    """
    with store.transaction() as tx:
        if job.unique_key is not None:
            existing = tx.active_unique([job.unique_key]).get(job.unique_key)
            if existing is not None:
                return Written(existing, False)
        if guard is not None and guard.unique_for_key is not None and guard.unique_for is not None:
            holder = tx.take_unique_lock(guard.unique_for_key, job.id, guard.unique_for)
            if holder != job.id:
                return Written(holder, False)
        if guard is not None and guard.throttle is not None:
            admitted = admit_throttle(tx, guard.task, guard.throttle)
            if admitted == DROPPED:
                if guard.unique_for_key is not None:  # no job: do not hold its unique key either
                    tx.release_unique_lock(guard.unique_for_key, job.id)
                return Written(None, False)
            if isinstance(admitted, dt.datetime):
                job = dataclasses.replace(job, not_before=admitted)  # its window's start, or later if asked
        for _ in range(3):  # the holder of a unique key may finish between our insert and our look-up
            inserted = tx.insert_job(job, notify)
            if inserted.inserted:
                return Written(job.id, inserted.due)
            if job.unique_key is None:
                return Written(job.id, False)
            existing = tx.active_unique([job.unique_key]).get(job.unique_key)
            if existing is not None:
                return Written(existing, False)
    raise RuntimeError(f"could not settle unique key {job.unique_key!r}")  # pragma: no cover - a livelock guard
