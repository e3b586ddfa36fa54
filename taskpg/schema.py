"""The database schema, defined once with SQLAlchemy Core.

Alembic migrations in ``alembic/versions`` create exactly these tables; a test compares the
migrated database with this metadata so the two cannot drift apart.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

from .exceptions import ConfigurationError
from .job import FINISHED_STATES, UNFINISHED_STATES, JobState

if TYPE_CHECKING:
    from collections.abc import Iterable

#: The Alembic revision this version of taskpg needs (the head of ``alembic/versions``).
SCHEMA_REVISION = "0011"

DEFAULT_SCHEMA = "taskpg"
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,39}")  # fullmatch: "$" would let a trailing "\n" in


def _state_in(states: Iterable[JobState]) -> str:
    """``state IN ('a', 'b')`` for a partial index or the check constraint (values from JobState)."""
    return "state IN ({})".format(", ".join(f"'{state.value}'" for state in sorted(states, key=_STATE_ORDER.index)))


_STATE_ORDER = list(JobState)


def validate_schema_name(name: str) -> str:
    """Schema names are identifiers we put in SQL: allow-list them."""
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise ConfigurationError(
            f"schema name {name!r} is not allowed: use 1-40 characters of a-z, 0-9 and _, not starting with a digit"
        )
    return name


def build_metadata(schema: str = DEFAULT_SCHEMA) -> MetaData:
    """The taskpg tables in the given Postgres schema."""
    validate_schema_name(schema)
    metadata = MetaData(schema=schema)
    Table(
        "jobs",
        metadata,
        Column("id", UUID(as_uuid=False), primary_key=True),
        Column("task", Text, nullable=False),
        Column("queue", Text, nullable=False),
        Column("args", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
        Column("kwargs", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
        Column("state", Text, nullable=False),
        Column("priority", SmallInteger, nullable=False, server_default=text("0")),
        Column("attempt", Integer, nullable=False, server_default=text("0")),
        Column("max_attempts", Integer, nullable=False, server_default=text("1")),
        Column("snoozes", Integer, nullable=False, server_default=text("0")),
        Column("run_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
        Column("started_at", DateTime(timezone=True)),
        Column("finished_at", DateTime(timezone=True)),
        Column("lease", UUID(as_uuid=False)),
        Column("worker_id", Text),
        Column("result", JSONB),
        Column("errors", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
        Column("unique_key", Text),
        # The start a rate limiter reserved for this job when it held it back: the job is not asked again.
        Column("rate_slot", DateTime(timezone=True)),
        # Rescues from a worker that stopped heartbeating; crashes: those while the job was running.
        Column("rescues", Integer, nullable=False, server_default=text("0")),
        Column("crashes", Integer, nullable=False, server_default=text("0")),
        # Small JSON metadata set at enqueue by before_task_publish receivers (a traceparent): 0008.
        Column("headers", JSONB),
        # {"state": ..., "meta": ...} from self.update_state() while the job runs: 0008.
        Column("progress", JSONB),
        # Canvas (0010): templates of the jobs to insert when this one ends (canvas.py), the job whose end
        # inserted this one, and the chord this job is a header member of (counted once, by the trigger).
        Column("links", JSONB),
        Column("parent_id", UUID(as_uuid=False)),
        Column("chord_id", UUID(as_uuid=False)),
        Column("chord_index", Integer),
        Column("chord_counted", Boolean, nullable=False, server_default=text("false")),
        # Not started by then, never run: the claim cancels it (0011).
        Column("expires_at", DateTime(timezone=True)),
        CheckConstraint(_state_in(JobState), name="jobs_state_check"),
        # The claim query walks this index in claim order and stops after LIMIT rows.
        Index(
            "jobs_claim_idx",
            "queue",
            text("priority DESC"),
            "run_at",
            "id",
            postgresql_where=text(f"state = '{JobState.AVAILABLE}'"),
        ),
        # The stager promotes due scheduled jobs in run_at order.
        Index("jobs_scheduled_idx", "run_at", postgresql_where=text(f"state = '{JobState.SCHEDULED}'")),
        # Unique jobs: one unfinished job per unique_key.
        Index(
            "jobs_unique_active_idx",
            "unique_key",
            unique=True,
            postgresql_where=text(f"unique_key IS NOT NULL AND {_state_in(UNFINISHED_STATES)}"),
        ),
        # A chord's body gathers its members' results in index order.
        Index("jobs_chord_idx", "chord_id", "chord_index", postgresql_where=text("chord_id IS NOT NULL")),
        # A job's children: the jobs its end inserted (AsyncResult.children).
        Index("jobs_parent_idx", "parent_id", postgresql_where=text("parent_id IS NOT NULL")),
        # Rescue looks up running jobs by the worker that holds them.
        Index("jobs_running_idx", "worker_id", postgresql_where=text(f"state = '{JobState.RUNNING}'")),
        # Retention and dead-letter listings scan finished jobs by age; with the queue included, the
        # counts per queue and the recent throughput are index-only scans (0009).
        Index(
            "jobs_finished_idx",
            "state",
            "finished_at",
            postgresql_where=text(_state_in(FINISHED_STATES)),
            postgresql_include=["queue"],
        ),
    )
    Table(
        "workers",
        metadata,
        Column("id", Text, primary_key=True),
        Column("hostname", Text, nullable=False),
        Column("pid", Integer, nullable=False),
        Column("queues", ARRAY(Text), nullable=False),
        Column("concurrency", Integer, nullable=False),
        Column("started_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
        Column("heartbeat_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
        # The jobs this worker has started and not yet written an outcome for (rescue reads it).
        Column("running", ARRAY(UUID(as_uuid=False))),
    )
    # One row per fired tick of a periodic schedule: the primary key is what makes a tick fire once,
    # however many beat processes run. A row with no job_id marks when a schedule was first seen.
    Table(
        "periodic_ticks",
        metadata,
        Column("schedule", Text, primary_key=True),
        Column("tick", DateTime(timezone=True), primary_key=True),
        Column("job_id", UUID(as_uuid=False)),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    )
    # Throttles at enqueue: jobs admitted (and calls turned away) per task, key and fixed window.
    Table(
        "throttle_windows",
        metadata,
        Column("task", Text, primary_key=True),
        Column("key", Text, primary_key=True),
        Column("window_start", DateTime(timezone=True), primary_key=True),
        Column("window_end", DateTime(timezone=True), nullable=False),
        Column("used", Integer, nullable=False, server_default=text("0")),
        Column("rejected", Integer, nullable=False, server_default=text("0")),
    )
    # unique_for: a key stays taken by its job until `until`, whatever the job's state.
    Table(
        "unique_locks",
        metadata,
        Column("key", Text, primary_key=True),
        Column("job_id", UUID(as_uuid=False), nullable=False),
        Column("until", DateTime(timezone=True), nullable=False),
    )
    # Rate limits without Redis: per limiter key, its theoretical arrival time (GCRA) and starts granted.
    Table(
        "rate_limits",
        metadata,
        Column("key", Text, primary_key=True),
        Column("tat", DateTime(timezone=True), nullable=False),
        Column("granted", BigInteger, nullable=False, server_default=text("0")),
    )
    # Buffered calls a unique key turned away at flush: the call's job id -> the job holding the key.
    Table(
        "duplicates",
        metadata,
        Column("id", UUID(as_uuid=False), primary_key=True),
        Column("holder", UUID(as_uuid=False), nullable=False),
        Column("unique_key", Text, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    )
    # Envelopes the buffer's Redis lost (evicted, a restart without persistence), as a flusher saw them.
    Table(
        "buffer_losses",
        metadata,
        Column("id", BigInteger, Identity(), primary_key=True),
        Column("detected_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
        Column("list_name", Text, nullable=False),
        Column("lost", BigInteger, nullable=False),
        Column("cause", Text, nullable=False),
    )
    # Chords (0010): members counted so far, the first member that did not succeed, the body's template.
    Table(
        "chords",
        metadata,
        Column("id", UUID(as_uuid=False), primary_key=True),
        Column("size", Integer, nullable=False),
        Column("done", Integer, nullable=False, server_default=text("0")),
        Column("failed_by", UUID(as_uuid=False)),
        Column("body", JSONB, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    )
    # Paused queues: the claim takes no job of a queue listed here (0009).
    Table(
        "queue_pauses",
        metadata,
        Column("queue", Text, primary_key=True),
        Column("paused_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    )
    return metadata
