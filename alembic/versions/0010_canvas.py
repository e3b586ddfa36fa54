"""Canvas: links, chains and chords, carried out by Postgres in the transaction of the outcome that triggers them.

jobs.links: what to enqueue when the job ends, as job templates (JSON built by taskpg/canvas.py):
``{"success": [t...], "error": [t...], "chain": [[t...], ...]}``. On success the ``success`` templates and the
first step of ``chain`` (carrying the rest of the chain) are inserted with the job's result prepended to their
arguments (unless a template is immutable); when the job ends dead or cancelled, the ``error`` templates are
inserted with the job's id as their first argument. jobs.parent_id: the job whose end inserted this one.

chords: one row per chord; its header members carry chord_id and chord_index. When a member ends, the trigger
counts it under the chord row's lock (members ending at the same moment on different workers count one at a
time) and chord_counted keeps a member from being counted twice (a dead member retried later). The member that
brings the count to the size inserts the body with the list of the members' results, in index order; the first
member that ends dead or cancelled fails the chord at once: the body is written dead with a ChordError, and
never runs. Either happens exactly once, in the member's own outcome transaction.

The trigger is a BEFORE UPDATE row trigger that only fires for rows with links or a chord, on their change to a
finished state, so the jobs of plain tasks pay nothing but the WHEN test.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

FINISHED = "('succeeded', 'dead', 'cancelled')"

# canvas_spawn(templates, parent, prefix): insert one job per template (ids chosen by the caller, so a template
# inserted twice is one job), arguments prefixed with `prefix` unless the template is immutable, due at its eta or
# countdown seconds from now (the moment of the spawn, as Celery counts a linked task's countdown), and wake the
# queues of the jobs due now. Returns how many were inserted.
SPAWN = """
CREATE FUNCTION {s}.canvas_spawn(templates jsonb, parent uuid, prefix jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    inserted bigint;
BEGIN
    WITH spawned AS (
        INSERT INTO {s}.jobs (id, task, queue, args, kwargs, priority, max_attempts, state, run_at, links,
                              parent_id, chord_id, chord_index)
        SELECT (t->>'id')::uuid, t->>'task', t->>'queue',
               CASE WHEN coalesce((t->>'immutable')::boolean, false) THEN t->'args' ELSE prefix || (t->'args') END,
               t->'kwargs', (t->>'priority')::int, (t->>'max_attempts')::int,
               CASE WHEN due.run_at > clock_timestamp() THEN 'scheduled' ELSE 'available' END, due.run_at,
               CASE WHEN jsonb_typeof(t->'links') = 'object' THEN t->'links' END,
               parent, (t->>'chord_id')::uuid, (t->>'chord_index')::int
        FROM jsonb_array_elements(templates) AS t,
             LATERAL (SELECT coalesce((t->>'eta')::timestamptz,
                                      clock_timestamp() + coalesce((t->>'countdown')::float8, 0) * interval '1 second')
                      AS run_at) AS due
        ON CONFLICT DO NOTHING
        RETURNING queue, state
    ), woken AS (
        SELECT pg_notify({jobs_channel}, queue) FROM (SELECT DISTINCT queue FROM spawned WHERE state = 'available') q
    )
    SELECT (SELECT count(*) FROM spawned) + 0 * (SELECT count(*) FROM woken) INTO inserted;
    RETURN inserted;
END
$$
"""

# canvas_fail(template, cause): write a chord's body that will never run as dead, with a ChordError naming the
# member that failed the chord, and tell get() waiters.
FAIL = """
CREATE FUNCTION {s}.canvas_fail(template jsonb, cause uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {s}.jobs (id, task, queue, args, kwargs, priority, max_attempts, state, run_at, finished_at, errors,
                          parent_id)
    SELECT (template->>'id')::uuid, template->>'task', template->>'queue', template->'args', template->'kwargs',
           (template->>'priority')::int, (template->>'max_attempts')::int, 'dead', now(), now(),
           jsonb_build_array(jsonb_build_object(
               'type', 'ChordError', 'module', 'taskpg.exceptions', 'attempt', 0, 'at', now(),
               'message', 'chord member ' || cause || ' did not succeed: the chord body never runs')),
           cause
    ON CONFLICT DO NOTHING;
    PERFORM pg_notify({done_channel}, template->>'id');
END
$$
"""

# The trigger: links of a job that ends, and the count of a chord member.
STEP = """
CREATE FUNCTION {s}.canvas_step() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    follow jsonb;
    next_step jsonb;
    rest jsonb;
    chord record;
    results jsonb;
BEGIN
    IF NEW.links IS NOT NULL THEN
        IF NEW.state = 'succeeded' THEN
            follow := coalesce(NEW.links->'success', '[]'::jsonb);
            IF jsonb_array_length(coalesce(NEW.links->'chain', '[]'::jsonb)) > 0 THEN
                next_step := NEW.links->'chain'->0;
                rest := (NEW.links->'chain') - 0;
                IF jsonb_array_length(rest) > 0 THEN  -- a step of one template carries the rest of the chain
                    next_step := jsonb_build_array(jsonb_set(next_step->0, '{{links}}',
                        coalesce(next_step->0->'links', '{{}}'::jsonb) || jsonb_build_object('chain', rest)));
                END IF;
                follow := follow || next_step;
            END IF;
            PERFORM {s}.canvas_spawn(follow, NEW.id, jsonb_build_array(NEW.result));
        ELSE
            PERFORM {s}.canvas_spawn(coalesce(NEW.links->'error', '[]'::jsonb), NEW.id,
                                     jsonb_build_array(NEW.id::text));
        END IF;
    END IF;
    IF NEW.chord_id IS NOT NULL AND NOT NEW.chord_counted THEN
        NEW.chord_counted := true;
        -- The row lock of this UPDATE makes members that end at once count one after the other.
        UPDATE {s}.chords SET done = done + 1,
               failed_by = coalesce(failed_by, CASE WHEN NEW.state <> 'succeeded' THEN NEW.id END)
        WHERE id = NEW.chord_id
        RETURNING done, size, failed_by, body INTO chord;
        IF FOUND THEN
            IF chord.failed_by = NEW.id THEN  -- the first member that did not succeed: fail the chord now
                PERFORM {s}.canvas_fail(chord.body, NEW.id);
            ELSIF chord.failed_by IS NULL AND chord.done = chord.size THEN
                -- Members that ended earlier in this statement are visible here; this one is not yet.
                SELECT jsonb_agg(CASE WHEN j.id = NEW.id THEN NEW.result ELSE j.result END ORDER BY j.chord_index)
                INTO results FROM {s}.jobs AS j WHERE j.chord_id = NEW.chord_id;
                PERFORM {s}.canvas_spawn(jsonb_build_array(chord.body), NEW.id, jsonb_build_array(results));
            END IF;
        END IF;
    END IF;
    RETURN NEW;
END
$$
"""

TRIGGER = f"""
CREATE TRIGGER jobs_canvas BEFORE UPDATE OF state ON {{s}}.jobs
FOR EACH ROW
WHEN (NEW.state IN {FINISHED} AND OLD.state NOT IN {FINISHED} AND (NEW.links IS NOT NULL OR NEW.chord_id IS NOT NULL))
EXECUTE FUNCTION {{s}}.canvas_step()
"""


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def upgrade() -> None:
    schema = op.get_context().version_table_schema or "public"
    op.add_column("jobs", sa.Column("links", JSONB()), schema=schema)
    op.add_column("jobs", sa.Column("parent_id", UUID(as_uuid=False)), schema=schema)
    op.add_column("jobs", sa.Column("chord_id", UUID(as_uuid=False)), schema=schema)
    op.add_column("jobs", sa.Column("chord_index", sa.Integer()), schema=schema)
    op.add_column(
        "jobs", sa.Column("chord_counted", sa.Boolean(), nullable=False, server_default=sa.false()), schema=schema
    )
    op.create_index(
        "jobs_chord_idx",
        "jobs",
        ["chord_id", "chord_index"],
        schema=schema,
        postgresql_where=sa.text("chord_id IS NOT NULL"),
    )
    op.create_index(
        "jobs_parent_idx", "jobs", ["parent_id"], schema=schema, postgresql_where=sa.text("parent_id IS NOT NULL")
    )
    op.create_table(
        "chords",
        sa.Column("id", UUID(as_uuid=False), primary_key=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("failed_by", UUID(as_uuid=False)),
        sa.Column("body", JSONB(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        schema=schema,
    )
    names = {
        "s": _quoted(schema),
        "jobs_channel": _literal(f"taskpg_{schema}_jobs"),
        "done_channel": _literal(f"taskpg_{schema}_done"),
    }
    for statement in (SPAWN, FAIL, STEP, TRIGGER):
        op.execute(statement.format(**names))


def downgrade() -> None:
    schema = op.get_context().version_table_schema or "public"
    s = _quoted(schema)
    op.execute(f"DROP TRIGGER IF EXISTS jobs_canvas ON {s}.jobs")
    for function in ("canvas_step()", "canvas_fail(jsonb, uuid)", "canvas_spawn(jsonb, uuid, jsonb)"):
        op.execute(f"DROP FUNCTION IF EXISTS {s}.{function}")
    op.drop_table("chords", schema=schema)
    op.drop_index("jobs_parent_idx", table_name="jobs", schema=schema)
    op.drop_index("jobs_chord_idx", table_name="jobs", schema=schema)
    for column in ("chord_counted", "chord_index", "chord_id", "parent_id", "links"):
        op.drop_column("jobs", column, schema=schema)
