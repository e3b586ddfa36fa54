"""The Redis buffer's envelope: one JSON object per job, documented so any language can RPUSH one.

Full form (every key but ``task`` optional)::

    {"id": "<uuid>", "task": "emails.send", "args": [1], "kwargs": {"subject": "hi"},
     "queue": "emails", "priority": 0, "eta": "2026-01-01T08:00:00+00:00", "countdown": 30,
     "enqueued_at": "2026-01-01T07:59:59.123+00:00", "max_attempts": 4}

Short form: ``{"kind": "emails.send", "payload": {"subject": "hi"}}`` (payload = keyword arguments).

Decoding never drops anything: an envelope that cannot be turned into a job becomes a dead job
that keeps the raw text and says why.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from . import codec
from .exceptions import ConfigurationError
from .job import NewJob, new_job_id
from .options import TaskOptions, validate_key, validate_priority, validate_queue_name, validate_task_name

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping


class Declared(Protocol):
    """A registered task, as decoding sees it: its declared options (defaults for the envelope)."""

    @property
    def options(self) -> TaskOptions: ...


class _Undeclared:
    """The defaults for an envelope of a task the flushing app does not declare."""

    options = TaskOptions()


_UNDECLARED = _Undeclared()

#: Task name given to a dead job made from an envelope that could not be decoded at all.
UNDECODABLE_TASK = "taskpg.undecodable_envelope"
#: The longest delay an envelope may ask for (ten years).
MAX_COUNTDOWN = 10 * 365 * 86400.0
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: Envelopes whose text starts so bring their own id (taskpg's own do): no default id is made for them.
OWN_ID_PREFIX = b'{"id":"'

#: Bytes an envelope may take beyond ``max_payload_bytes`` for its other fields (its arguments are held
#: to the limit itself, as in a direct enqueue); a larger envelope is not parsed.
ENVELOPE_ROOM = 64 * 1024
#: How much of an envelope too large to keep whole its dead job keeps (characters, or bytes unparsed).
SAMPLE_BYTES = 4096
_KEPT_SAMPLE = f"args hold its first {SAMPLE_BYTES} characters"
_COUNTDOWN_RANGE = f"'countdown' must be between 0 and {MAX_COUNTDOWN:g} seconds"
_MAX_ATTEMPTS_RANGE = "'max_attempts' must be an integer from 1 to 2147483647"


def encode(job: NewJob, enqueued_at: str | None = None) -> str:
    """The envelope text for a job built by ``Task.build_job``: its JSON arguments are used as they are.

    ``id`` comes first: the flusher recognises envelopes that bring their own id by that prefix.
    ``enqueued_at`` is an ISO 8601 time (now, by default); ``encode_many`` takes it once per batch.
    """
    headers = "" if job.headers is None else f',"headers":{job.headers}'
    return (
        f'{{"id":"{job.id}","task":{_json_name(job.task)},"args":{job.args},"kwargs":{job.kwargs},'
        f'"queue":{_json_name(job.queue)},"priority":{job.priority:d},'
        f'"eta":{_json_or_null(job.eta and job.eta.isoformat())},'
        f'"countdown":{_json_or_null(job.countdown or None)},"max_attempts":{job.max_attempts:d},'
        f'"unique_key":{_json_or_null(job.unique_key)},"enqueued_at":"{enqueued_at or _now()}"{headers}}}'
    )


def encode_many(jobs: Iterable[NewJob]) -> list[str]:
    """The envelopes of a batch, all stamped with the same ``enqueued_at``."""
    now = _now()
    return [encode(job, now) for job in jobs]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


@functools.lru_cache(maxsize=1024)
def _json_name(name: str) -> str:
    """A task or queue name as JSON (few distinct ones: cached)."""
    return codec.dumps(name)


def _json_or_null(value: Any) -> str:
    return "null" if value is None else codec.dumps(value)


@dataclass(frozen=True)
class Rejected:
    """An envelope that cannot become a runnable job: stored as a dead job with the reason."""

    job: NewJob
    reason: str


def decode(
    raw: bytes | str,
    tasks: Mapping[str, Declared],
    max_bytes: int,
    make_id: Callable[[], str] = new_job_id,
) -> NewJob | Rejected:
    """Turn one envelope into a job, or into a Rejected (dead job) that keeps the raw payload.

    ``make_id`` gives the id of an envelope that carries none; the flusher derives it from the
    envelope's place in its batch, so that writing the same batch twice yields the same ids.
    """
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if size > max_bytes + ENVELOPE_ROOM:  # not even parsed: its arguments cannot be within the limit
        head = raw[:SAMPLE_BYTES]
        sample = head.decode("utf-8", "backslashreplace") if isinstance(head, bytes) else head
        reason = f"envelope takes {size} bytes, over the limit of {max_bytes} for its arguments; {_KEPT_SAMPLE}"
        return _rejected(sample, reason, make_id)
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:  # never replaced with U+FFFD and run: its bytes are kept, escaped
            reason = f"envelope is not UTF-8 ({exc.reason} at byte {exc.start}); kept with \\xNN escapes"
            return _rejected(raw.decode("utf-8", "backslashreplace"), reason, make_id)
    else:
        text = raw
    try:
        data = codec.loads(text)
    except Exception as exc:
        return _rejected(text, f"envelope is not JSON: {exc}", make_id)
    if not isinstance(data, dict):
        return _rejected(text, "envelope is not a JSON object", make_id)
    if "kind" in data and "task" not in data:  # short form
        data = {"task": data["kind"], "kwargs": data.get("payload") or {}, "id": data.get("id")}
    name = data.get("task")
    if not isinstance(name, str):
        return _rejected(text, "envelope has no task name ('task' or 'kind')", make_id)
    try:
        return _job(data, name, tasks, max_bytes, make_id)
    except Exception as exc:  # any other bad value: a dead job with the reason, never a stuck batch
        if size > max_bytes:  # too large to keep whole (its arguments are over the limit, say)
            return _rejected(text[:SAMPLE_BYTES], f"envelope is invalid: {exc}; {_KEPT_SAMPLE}", make_id, data)
        return _rejected(text, f"envelope is invalid: {exc}", make_id, data)


def _job(
    data: dict[str, Any], name: str, tasks: Mapping[str, Declared], max_bytes: int, make_id: Callable[[], str]
) -> NewJob:
    # A task this app does not declare is not the flusher's to judge (another app on the schema, a
    # partial import, an older release mid-deploy): it becomes an ordinary job with the envelope's
    # values, or the defaults, and the worker that claims it decides, as for a direct enqueue.
    declared = tasks.get(name)
    task = _UNDECLARED if declared is None else declared
    if declared is None:
        validate_task_name(name)
    args = data.get("args") or []
    kwargs = data.get("kwargs") or {}
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError("'args' must be a list and 'kwargs' an object")
    job_id = _job_id(data["id"]) if data.get("id") is not None else make_id()
    eta = _parse_time(data["eta"]) if data.get("eta") else None
    countdown = float(data.get("countdown") or 0)
    if not 0 <= countdown <= MAX_COUNTDOWN:
        raise ValueError(_COUNTDOWN_RANGE)
    enqueued_at = data.get("enqueued_at")
    if countdown and enqueued_at and eta is None:  # the delay counts from the push, not the flush
        eta = _parse_time(enqueued_at) + dt.timedelta(seconds=countdown)
        countdown = 0.0
    if eta is not None and eta.tzinfo is None:
        raise ValueError("'eta' and 'enqueued_at' need a time zone offset")
    max_attempts = data.get("max_attempts")
    max_attempts = task.options.max_attempts if max_attempts is None else max_attempts
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or not 1 <= max_attempts <= 2**31 - 1:
        raise ValueError(_MAX_ATTEMPTS_RANGE)
    priority = data.get("priority")
    args_json, kwargs_json = codec.encode_arguments(name, args, kwargs, max_bytes)  # the limit of a direct enqueue
    return NewJob(
        id=job_id,
        task=name,
        queue=validate_queue_name(data.get("queue") or task.options.queue),
        args=args_json,
        kwargs=kwargs_json,
        priority=validate_priority(task.options.priority if priority is None else priority),
        max_attempts=max_attempts,
        eta=eta,
        countdown=countdown,
        unique_key=_unique_key(data.get("unique_key")),
        headers=_headers(data.get("headers")),
    )


def refused(raw: bytes, job: NewJob, reason: str, max_bytes: int) -> Rejected:
    """The dead job of an envelope that decoded but that Postgres refused: its id, task and queue, and
    its raw text as its argument (the first SAMPLE_BYTES characters if it is too large to keep whole)."""
    text = raw.decode("utf-8", "backslashreplace")
    if len(raw) > max_bytes:
        text, reason = text[:SAMPLE_BYTES], f"{reason}; {_KEPT_SAMPLE}"
    return _rejected(text, reason, lambda: job.id, {"task": job.task, "queue": job.queue})


def _parse_time(value: Any) -> dt.datetime:
    """An ISO 8601 time; a ``Z`` suffix (JavaScript's ``toISOString()``) reads as UTC on every Python."""
    text = str(value)
    return dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)


def _job_id(value: Any) -> str:
    """The envelope's id in canonical form (taskpg's own envelopes already have it: no parsing)."""
    if isinstance(value, str) and _CANONICAL_UUID.fullmatch(value):
        return value
    return str(uuid.UUID(str(value)))


def _headers(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise ValueError("'headers' must be an object")
    text = codec.dumps(value)
    if len(text) > codec.MAX_HEADERS_BYTES:
        raise ValueError(f"'headers' take {len(text)} bytes, over the limit of {codec.MAX_HEADERS_BYTES}")
    return text


def _unique_key(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("'unique_key' must be a string")
    return validate_key(value, "'unique_key'")


def _rejected(raw: str, reason: str, make_id: Callable[[], str], data: dict[str, Any] | None = None) -> Rejected:
    task = data.get("task") if data and isinstance(data.get("task"), str) else UNDECODABLE_TASK
    try:
        task = validate_task_name(task)
    except ConfigurationError:  # a name Postgres or a terminal cannot take: the raw text keeps it
        task = UNDECODABLE_TASK
    queue = data.get("queue") if data and isinstance(data.get("queue"), str) else "default"
    try:
        queue = validate_queue_name(queue)
    except ConfigurationError:
        queue = "default"
    job_id = None
    if data and data.get("id"):
        with contextlib.suppress(ValueError):
            job_id = str(uuid.UUID(str(data["id"])))
    job = NewJob(
        id=job_id or make_id(),
        task=str(task),
        queue=queue,
        args=codec.dumps([codec.storable_text(raw)]),  # a raw NUL or lone surrogate must not block the batch
        kwargs="{}",
        priority=0,
        max_attempts=1,
    )
    return Rejected(job, reason)
