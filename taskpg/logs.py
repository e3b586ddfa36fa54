"""Logging for taskpg's commands: quiet by default, with job context, and never able to stall a job.

``configure(level, fmt)`` (the CLI calls it; so does each child process of the processes pool) puts one
handler on the root logger. It does not write: it hands each record to a bounded queue, served by one
writer thread. A sink that blocks (a pipe nobody drains, a slow disk) stalls only that thread; once the
queue is full, records are dropped and counted, and the count is written as soon as the sink takes
lines again. Runner threads, heartbeats and the outcome writer never wait on a log line.

Levels: ``taskpg.*`` loggers at the chosen level (``warning`` by default, as Celery's worker), every
other logger at WARNING, or DEBUG with ``debug`` (Alembic's and pgserver's chatter stays out). Records
logged while a job runs (the task's own ``logging`` calls included) carry ``job_id``, ``task``,
``queue`` and ``attempt``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import logging.handlers
import os
import queue
import sys
import threading
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from .job import Request

#: Records waiting for the writer; past this many, new ones are dropped (and counted).
QUEUE_SIZE = 10_000
FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
JOB_FIELDS = ("job_id", "task", "queue", "attempt")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse_level(name: str) -> int:
    """``debug``/``info``/``warning``/``error`` (any case) as a logging level."""
    if str(name).lower() not in LEVELS:
        raise ValueError(f"log level {name!r}: expected one of {', '.join(LEVELS)}")
    return int(getattr(logging, str(name).upper()))


class JobContext(logging.Filter):
    """Adds the running job's id, task, queue and attempt to records logged while it runs."""

    def __init__(self, current: Callable[[], Request | None]) -> None:
        super().__init__()
        self._current = current

    def filter(self, record: logging.LogRecord) -> bool:
        request = self._current()
        if request is not None and request.id is not None and not hasattr(record, "job_id"):
            record.job_id, record.task = request.id, request.task
            record.queue, record.attempt = request.queue, request.attempt
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, then ``[job=… task=… attempt=…]`` inside a job."""

    def __init__(self) -> None:
        super().__init__(_TEXT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        job_id = getattr(record, "job_id", None)
        if job_id is None:
            return text
        head, _, rest = text.partition("\n")
        context = f" [job={job_id} task={getattr(record, 'task', '')} attempt={getattr(record, 'attempt', '')}]"
        return head + context + ("\n" + rest if rest else "")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the job fields inside a job, the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in JOB_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["traceback"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


class QueuedHandler(logging.handlers.QueueHandler):
    """Hands records to the writer without ever waiting: a full queue drops the record and counts it."""

    def __init__(self, records: queue.Queue[logging.LogRecord | None]) -> None:
        super().__init__(records)
        self.dropped = 0
        self._lock = threading.Lock()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # In the logging thread: the message and traceback become text now (the arguments may change
        # after the call, and a traceback must not keep the job's frames alive); fields stay for JSON.
        prepared = logging.makeLogRecord(record.__dict__)
        prepared.msg, prepared.args = record.getMessage(), None
        if record.exc_info:
            prepared.exc_text = logging.Formatter().formatException(record.exc_info)
        prepared.exc_info = None
        return prepared

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """A record that cannot be queued (the queue is full, or its message does not format): counted and
        dropped. Never logging's default, which writes to stderr in the caller's thread and could block."""
        with self._lock:
            self.dropped += 1


class Writer:
    """The one thread that writes log lines; reports the records dropped while the sink was stuck."""

    def __init__(self, records: queue.Queue[logging.LogRecord | None], handler: QueuedHandler, stream: IO[str]) -> None:
        self.records = records
        self.handler = handler
        self.stream = stream
        self.formatter: logging.Formatter = TextFormatter()
        self.reported = 0
        self.thread = threading.Thread(target=self._run, name="taskpg-log-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            record = self.records.get()
            if record is None:
                return
            self._write(self.formatter.format(record))
            dropped = self.handler.dropped
            if dropped > self.reported:
                self._write(
                    f"{dt.datetime.now().isoformat(sep=' ', timespec='milliseconds')} WARNING taskpg: "
                    f"{dropped - self.reported} log record(s) dropped: the log output did not keep up "
                    f"(a pipe nobody reads, a slow disk); {dropped} in all"
                )
                self.reported = dropped

    def _write(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # the sink is gone (closed pipe): nothing to tell it any more
            pass

    def stop(self, timeout: float = 2.0) -> None:
        """Write what waits, for at most ``timeout`` seconds (a stuck sink must not hold the exit)."""
        try:
            self.records.put(None, timeout=timeout)
        except queue.Full:
            return
        self.thread.join(timeout)


def _own_stderr() -> IO[str]:
    """A stream of its own on stderr's file descriptor, so that a writer stuck on a full pipe holds no lock
    of ``sys.stderr`` (the interpreter flushes that at exit); ``sys.stderr`` itself if it has no descriptor."""
    try:
        return open(os.dup(sys.stderr.fileno()), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    except (AttributeError, OSError, ValueError):
        return sys.stderr


_installed: tuple[QueuedHandler, Writer] | None = None
_settings: tuple[str, str] | None = None


def configure(
    level: str = "warning",
    fmt: str = "text",
    current: Callable[[], Request | None] = lambda: None,
    stream: IO[str] | None = None,
) -> QueuedHandler:
    """Set up logging for a taskpg command (see the module docstring); ``current`` returns the running
    job's request (``task.current_request``). Returns the handler, whose ``dropped`` counts the records
    the writer could not keep up with. Calling it again replaces the level and format."""
    global _installed, _settings
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    chosen = parse_level(level)
    if _installed is None:
        records: queue.Queue[logging.LogRecord | None] = queue.Queue(QUEUE_SIZE)
        handler = QueuedHandler(records)
        handler.addFilter(JobContext(current))
        _installed = (handler, Writer(records, handler, stream or _own_stderr()))
        root = logging.getLogger()
        for old in list(root.handlers):
            root.removeHandler(old)
        root.addHandler(handler)
    handler, writer = _installed
    writer.formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    logging.getLogger().setLevel(logging.DEBUG if chosen == logging.DEBUG else logging.WARNING)
    logging.getLogger("taskpg").setLevel(chosen)
    _settings = (level, fmt)
    return handler


def settings() -> tuple[str, str] | None:
    """The level and format ``configure`` was given in this process (None: logging is the caller's).
    Child processes of the processes pool configure theirs the same way."""
    return _settings


def flush(timeout: float = 2.0) -> None:
    """At exit: write the lines still queued, waiting at most ``timeout`` seconds for the sink."""
    if _installed is not None:
        _installed[1].stop(timeout)
