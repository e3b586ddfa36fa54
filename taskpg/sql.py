"""Every statement taskpg runs, in one place (``store.py`` runs them: one method per statement).

Templates name tables as ``{jobs}`` / ``{workers}``; :class:`Queries` renders them once per
schema with ``psycopg.sql.Identifier`` (schema names are allow-listed too), so no value is
ever formatted into SQL text. Values travel as bind parameters; arrays let one statement
act on a whole batch (``unnest``), so the worker makes no per-job round trip.

Locking, in short: enqueue only inserts; claim locks candidate rows with
``FOR UPDATE SKIP LOCKED`` so concurrent workers never block on or share a row; every
write-back is fenced by ``state = 'running' AND lease = <token of this attempt>``, so a worker
that lost its lease (rescued job, newer attempt) changes nothing.
"""

from __future__ import annotations

from psycopg import sql

from .schema import validate_schema_name

# -- enqueue ---------------------------------------------------------------------------------

# One job. run_at comes from the database clock (eta, or now + countdown) so client clock skew
# does not matter; a job due now is 'available', a later one 'scheduled'. pg_notify wakes
# workers of the queue; Postgres folds identical notifications of one transaction into one,
# so a transaction that enqueues many jobs of a queue sends one NOTIFY. A transaction that
# notifies takes a database-wide lock at commit (concurrent notifying commits run one at a time),
# so with notify_debounce the app passes notify = false and announces after its commit instead
# (notifier.py); FILTER keeps pg_notify from being called at all then. ON CONFLICT DO NOTHING
# makes a repeated insert of the same id a no-op (a retry whose first reply was lost), and lets a
# unique job defer to the unfinished job that holds its unique_key. Returns how many were
# inserted, and how many of them are due now.
INSERT_JOB = """
WITH due AS (
    SELECT GREATEST(COALESCE(%(eta)s::timestamptz, clock_timestamp() + %(countdown)s * interval '1 second'),
                    %(not_before)s::timestamptz) AS run_at
), inserted AS (
    INSERT INTO {jobs} (id, task, queue, args, kwargs, priority, max_attempts, state, run_at, unique_key, headers,
                        links, expires_at)
    SELECT %(id)s, %(task)s, %(queue)s, %(args)s::jsonb, %(kwargs)s::jsonb, %(priority)s, %(max_attempts)s,
           CASE WHEN due.run_at > clock_timestamp() THEN 'scheduled' ELSE 'available' END, due.run_at,
           %(unique_key)s, %(headers)s::jsonb, %(links)s::jsonb,
           COALESCE(%(expires_at)s::timestamptz, clock_timestamp() + %(expires_in)s * interval '1 second')
    FROM due
    ON CONFLICT DO NOTHING
    RETURNING state, queue
)
SELECT count(*), count(*) FILTER (WHERE state = 'available'),
       count(pg_notify(%(channel)s, queue)) FILTER (WHERE state = 'available' AND %(notify)s)
FROM inserted
"""

# The unfinished job holding a unique key.
ACTIVE_UNIQUE = """
SELECT unique_key, id::text FROM {jobs}
WHERE unique_key = ANY(%(keys)s::text[]) AND state IN ('scheduled', 'available', 'running')
"""

# unique_for: take the key for %(seconds)s, unless another job holds it and its time has not run
# out. The row lock of ON CONFLICT serialises racing callers. Returns the holder's job id.
TAKE_UNIQUE_LOCK = """
WITH taken AS (
    INSERT INTO {unique_locks} (key, job_id, until)
    VALUES (%(key)s, %(job_id)s, clock_timestamp() + %(seconds)s * interval '1 second')
    ON CONFLICT (key) DO UPDATE SET job_id = EXCLUDED.job_id, until = EXCLUDED.until
    WHERE {unique_locks}.until <= clock_timestamp()
    RETURNING job_id
)
SELECT job_id::text FROM taken
UNION ALL
SELECT job_id::text FROM {unique_locks} WHERE key = %(key)s AND NOT EXISTS (SELECT 1 FROM taken)
"""

RELEASE_UNIQUE_LOCK = "DELETE FROM {unique_locks} WHERE key = %(key)s AND job_id = %(job_id)s"

# Throttle at enqueue: admit one job into a fixed window of %(period)s seconds (aligned to the
# epoch; %(ahead)s windows after the current one) unless it already holds %(limit)s. The row lock
# of ON CONFLICT makes the count exact across processes. Returns the window's start if admitted.
THROTTLE_ADMIT = """
INSERT INTO {throttle_windows} AS w (task, key, window_start, window_end, used)
SELECT %(task)s, %(key)s, start, start + %(period)s * interval '1 second', 1
FROM (SELECT to_timestamp((floor(extract(epoch FROM clock_timestamp()) / %(period)s) + %(ahead)s) * %(period)s)
      AS start) AS slot
ON CONFLICT (task, key, window_start) DO UPDATE SET used = w.used + 1 WHERE w.used < %(limit)s
RETURNING window_start, window_start > clock_timestamp()
"""

# Count a call the throttle turned away (shown by `taskpg status`).
THROTTLE_REJECTED = """
UPDATE {throttle_windows} SET rejected = rejected + 1
WHERE task = %(task)s AND key = %(key)s
  AND window_start = to_timestamp(floor(extract(epoch FROM clock_timestamp()) / %(period)s) * %(period)s)
"""

# Bulk path (delay_many): COPY rows straight into the jobs table (columns left out take their
# defaults). The columns that differ per row come first; the others are the same for the whole
# batch. A batch due now on the app's own connection leaves run_at out: its default, now(), is the
# start of the batch's own transaction.
COPY_JOBS = "COPY {jobs} (id, args, kwargs, task, queue, priority, max_attempts, state, run_at) FROM STDIN"
COPY_JOBS_DUE_NOW = "COPY {jobs} (id, args, kwargs, task, queue, priority, max_attempts, state) FROM STDIN"

# Dead-letter routing: a copy of a dead job, error history included, as a new job in another queue.
COPY_TO_QUEUE = """
WITH copied AS (
    INSERT INTO {jobs} (id, task, queue, args, kwargs, priority, max_attempts, state, run_at, errors)
    SELECT %(new_id)s, task, %(queue)s, args, kwargs, priority, max_attempts, 'available', now(), errors
    FROM {jobs} WHERE id = %(id)s
    RETURNING queue
)
SELECT pg_notify(%(channel)s, queue) FROM copied
"""

# The idempotent bulk path (Redis buffer flushes): COPY into a per-session staging table, then move
# rows whose id is not in the table yet. A batch flushed twice (flusher killed after the commit,
# before it cleaned up Redis) inserts nothing the second time.
CREATE_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS taskpg_staging
    (LIKE {jobs} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS
"""

COPY_STAGING = """
COPY taskpg_staging (id, task, queue, args, kwargs, priority, max_attempts, state, run_at, unique_key, errors,
                     finished_at, headers)
FROM STDIN
"""

INSERT_FROM_STAGING = """
WITH inserted AS (
    INSERT INTO {jobs} SELECT * FROM taskpg_staging ON CONFLICT DO NOTHING RETURNING queue, state
), woken AS (
    SELECT pg_notify(%(channel)s, queue) FROM (SELECT DISTINCT queue FROM inserted WHERE state = 'available') q
)
SELECT (SELECT count(*) FROM inserted), (SELECT count(*) FROM woken)
"""

# After INSERT_FROM_STAGING, in its transaction: the staged jobs that are not in the table now were
# turned away by a unique key (a re-flushed job is in the table). Each gets the holder of its key: the
# unfinished job, or, should it have finished a moment ago, the newest job with the key. Returns how
# many were recorded.
RECORD_DUPLICATES = """
WITH recorded AS (
    INSERT INTO {duplicates} (id, holder, unique_key)
    SELECT s.id, holder.id, s.unique_key
    FROM taskpg_staging AS s
    CROSS JOIN LATERAL (
        SELECT COALESCE(
            (SELECT j.id FROM {jobs} AS j
             WHERE j.unique_key = s.unique_key AND j.state IN ('scheduled', 'available', 'running')),
            (SELECT j.id FROM {jobs} AS j WHERE j.unique_key = s.unique_key ORDER BY j.created_at DESC LIMIT 1)
        ) AS id
    ) AS holder
    WHERE s.unique_key IS NOT NULL AND holder.id IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM {jobs} AS j WHERE j.id = s.id)
    ON CONFLICT (id) DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM recorded
"""

# Canvas (canvas.py, migration 0010): the first jobs of a chain, group or chord, from their templates, by the
# same function the jobs table's trigger calls when a job with links or a chord ends. Returns how many.
CANVAS_SPAWN = "SELECT {schema}.canvas_spawn(%(templates)s::jsonb, NULL, '[]'::jsonb)"

# A chord, before its header members are written: its size and its body's template.
INSERT_CHORD = "INSERT INTO {chords} (id, size, body) VALUES (%(id)s, %(size)s, %(body)s::jsonb)"

# Job events (events.py): one notification per payload, in one statement. Outside a transaction of
# its own it is an autocommit statement; in the caller's transaction it is delivered at its commit.
PUBLISH_EVENTS = "SELECT count(pg_notify(%(channel)s, payload)) FROM unnest(%(payloads)s::text[]) AS payload"

# Wake the workers of these queues (once per queue, after a COPY).
NOTIFY_QUEUES = "SELECT pg_notify(%(channel)s, queue) FROM unnest(%(queues)s::text[]) AS queue"

DB_NOW = "SELECT clock_timestamp()"

# -- results -----------------------------------------------------------------------------------

# The columns of a JobRecord (job.py), in its order.
JOB_RECORD = """
SELECT id::text AS id, task, queue, state, attempt, max_attempts, snoozes, priority, args, kwargs, result, errors,
       run_at, created_at, started_at, finished_at, worker_id, progress, parent_id::text
"""

# A job by id; the id of a buffered call that a unique key turned away reads as its holder.
GET_JOB = (
    JOB_RECORD
    + """
FROM {jobs} WHERE id = COALESCE((SELECT holder FROM {duplicates} WHERE id = %(id)s::uuid), %(id)s::uuid)
"""
)

# The first of some jobs that ended dead or cancelled (a canvas handle's parents: get() then raises its error).
FIRST_FAILED = (
    JOB_RECORD
    + """
FROM {jobs} WHERE id = ANY(%(ids)s::uuid[]) AND state IN ('dead', 'cancelled')
ORDER BY finished_at LIMIT 1
"""
)

# The jobs a job's end inserted (links, the next step of a chain), oldest first.
CHILDREN = "SELECT id::text FROM {jobs} WHERE parent_id = %(id)s::uuid ORDER BY created_at, id"

# A running job says how far it got: self.update_state() sets {"state", "meta"}, self.update_progress()
# sets {"progress"}; each keeps the other's keys. Only while it runs: a late call from an attempt that lost
# the job (rescued, finished) changes nothing. Returns whether it was written.
UPDATE_PROGRESS = """
UPDATE {jobs} SET progress = coalesce(progress, '{{}}'::jsonb) || %(progress)s::jsonb
WHERE id = %(id)s AND state = 'running'
"""

# Cancel a job that has not started. The state test runs under the row lock, so a job a
# worker claimed a moment ago is left alone.
REVOKE_JOB = """
WITH revoked AS (
    UPDATE {jobs} SET state = 'cancelled', finished_at = now()
    WHERE id = COALESCE((SELECT holder FROM {duplicates} WHERE id = %(id)s::uuid), %(id)s::uuid)
      AND state IN ('available', 'scheduled')
    RETURNING id
)
SELECT pg_notify(%(done_channel)s, id::text) FROM revoked
"""

# A condition of every statement that deletes finished jobs: members of a chord that is still open are
# kept, since its body reads the members' results from their rows when the last one ends.
KEEP_OPEN_CHORDS = """
      AND (chord_id IS NULL OR NOT EXISTS (SELECT 1 FROM {chords} AS c
                                           WHERE c.id = chord_id AND c.done < c.size AND c.failed_by IS NULL))
"""

# Forget a finished job (Celery's forget()): its row goes, result and history with it; its handle reads
# PENDING again. A job that has not finished is left alone, and so is a member of a chord that is still
# open (its body will read the members' results from their rows; retention keeps them too).
FORGET_JOB = (
    """
DELETE FROM {jobs} WHERE id = %(id)s::uuid AND state IN ('succeeded', 'dead', 'cancelled')"""
    + KEEP_OPEN_CHORDS
)

SCHEMA_VERSION = "SELECT version_num FROM {alembic_version}"

# A round trip that reads nothing: pings a LISTEN connection, and opens a caller's transaction
# (psycopg begins one with the first statement) before a savepoint.
PING = "SELECT 1"

UNLISTEN_ALL = "UNLISTEN *"

# -- claim and finish ------------------------------------------------------------------------

# Set on the session that runs the claim and the stager (a dedicated connection of the worker).
# Without fresh statistics (a new table, or autovacuum off) the planner may trade the claim's ordered
# walk of jobs_claim_idx, which stops at LIMIT, for a bitmap scan plus a sort of every available job
# (measured: 2.7 ms -> 18 ms per claim).
CLAIM_SESSION = "SET enable_bitmapscan = off"

# Claim up to %(limit)s jobs. For each queue served, a LATERAL subquery walks jobs_claim_idx
# (queue, priority DESC, run_at, id) in claim order and locks candidates with FOR UPDATE SKIP
# LOCKED: rows another worker holds are skipped, never waited for, and no sort of the backlog is
# needed (`queue = ANY(...)` alone would sort every available row). A paused queue (a row in
# queue_pauses, read by every claim: no worker caches it) is left out before its index is walked.
# The best %(limit)s across queues are then taken; candidates locked but not taken are released when the statement
# commits. Keeping the locking SELECT in a CTE pins the LIMIT: the UPDATE touches exactly those
# rows. Each claim mints a new lease token that fences every later write of this attempt.
CLAIM_JOBS = """
WITH candidates AS (
    SELECT c.id, c.priority, c.run_at, c.expired
    FROM (SELECT queue FROM unnest(%(queues)s::text[]) AS listed(queue)
          WHERE NOT EXISTS (SELECT 1 FROM {queue_pauses} AS p WHERE p.queue = listed.queue)) AS served,
         LATERAL (SELECT id, priority, run_at, coalesce(expires_at <= now(), false) AS expired FROM {jobs}
                  WHERE state = 'available' AND queue = served.queue
                  ORDER BY priority DESC, run_at, id
                  LIMIT %(limit)s
                  FOR UPDATE SKIP LOCKED) AS c
), expired AS (
    -- Candidates whose expires_at passed are never run: they end cancelled (REVOKED) with a JobExpired
    -- error, get() waiters are told, and the queue's workers are woken to claim again, since the jobs
    -- behind the expired ones may be due (RETURNING runs for every row: a data-modifying CTE always runs
    -- to completion; Postgres sends one notification per distinct payload). The canvas trigger fires for
    -- them as for any revoked job.
    UPDATE {jobs} AS j
    SET state = 'cancelled', finished_at = now(),
        errors = j.errors || jsonb_build_array(jsonb_build_object(
            'type', 'JobExpired', 'module', 'taskpg.exceptions', 'attempt', j.attempt, 'at', now(),
            'message', 'expired at ' || j.expires_at || ' before a worker started it'))
    FROM candidates AS e WHERE e.expired AND j.id = e.id
    RETURNING pg_notify(%(done_channel)s, j.id::text), pg_notify(%(jobs_channel)s, j.queue)
), picked AS (
    SELECT id FROM candidates WHERE NOT expired ORDER BY priority DESC, run_at, id LIMIT %(limit)s
), claimed AS (
    UPDATE {jobs} AS j
    SET state = 'running', attempt = j.attempt + 1, started_at = now(), lease = gen_random_uuid(),
        worker_id = %(worker_id)s
    FROM picked WHERE j.id = picked.id
    RETURNING j.id, j.task, j.queue, j.priority, j.run_at, j.args, j.kwargs, j.attempt, j.max_attempts,
              j.snoozes, j.lease, j.rate_slot, j.rescues, j.headers
)
-- Arguments far over the limit are not sent (the worker would hold them in memory only to refuse
-- them): an empty list and object come instead, with their size. Far over means both their text and
-- their binary size pass fetch_limit: jsonb's text spells numbers out (1e300 takes 301 bytes) and its
-- binary form takes ~12 bytes per small number, so either alone could wrong a job within the limit.
-- The binary size is taken of a fresh copy (`|| '[]'`: pg_column_size of the column itself would be
-- its compressed size), and only for the rare text over the limit. OFFSET 0 keeps the planner from
-- rendering each text twice.
SELECT c.id::text, c.task, c.queue, c.priority, c.run_at,
       CASE WHEN t.far_over THEN '[]' ELSE t.args END,
       CASE WHEN t.far_over THEN '{{}}' ELSE t.kwargs END,
       c.attempt, c.max_attempts, c.snoozes, c.lease::text, EXTRACT(EPOCH FROM c.rate_slot)::float8, c.rescues > 0,
       CASE WHEN t.far_over THEN t.size ELSE 0 END, c.headers::text
FROM claimed AS c,
     LATERAL (SELECT args, kwargs, size,
                     CASE WHEN size > %(fetch_limit)s
                          THEN pg_column_size(c.args || '[]'::jsonb) + pg_column_size(c.kwargs || '{{}}'::jsonb)
                               > %(fetch_limit)s
                          ELSE false END AS far_over
              FROM (SELECT args, kwargs, octet_length(args) + octet_length(kwargs) AS size
                    FROM (SELECT c.args::text AS args, c.kwargs::text AS kwargs OFFSET 0) AS text
                    OFFSET 0) AS sized) AS t
"""

# Write back a batch of outcomes in one statement. Each outcome row says the new state, a delay
# (for retry/snooze), a result or an error to append, whether to refund the attempt (snooze,
# rate-limit deferral, hand-back), whether it counts as a snooze, and whether the job keeps its run_at
# (a hand-back). Only rows still 'running'
# under the same lease change: a late write from a worker that lost its lease is a no-op.
# Returns the ids written, the finished ones (for AsyncResult.get()) and the queues that got a job
# back as available; ANNOUNCE tells about them after the commit. No NOTIFY in this transaction: a
# notifying transaction takes a cluster-wide lock at commit and holds it through its WAL flush, so
# concurrent notifying commits (other workers' finishes, enqueues) would run one at a time.
FINISH_JOBS = """
WITH outcome AS (
    -- One JSON array element per outcome (store.outcomes_json): a JSON text is much cheaper to
    -- build in Python than eight typed arrays. A missing key reads as NULL; "result": null is a job
    -- that returned None, no "result" key is a result not kept (ignore_result).
    SELECT (o ->> 'id')::uuid AS id, (o ->> 'lease')::uuid AS lease, o ->> 'state' AS state,
           coalesce((o ->> 'delay')::float8, 0) AS delay, o -> 'result' AS result, o -> 'error' AS error,
           coalesce((o ->> 'refund')::int, 0) AS refund, coalesce((o ->> 'snoozed')::int, 0) AS snoozed,
           coalesce((o ->> 'keep_place')::int, 0) = 1 AS keep_place,
           (o ->> 'slot_at')::float8 AS slot_at, (o ->> 'wake_at')::float8 AS wake_at
    FROM jsonb_array_elements(%(outcomes)s::jsonb) AS o
), finished AS (
    UPDATE {jobs} AS j
    SET state = o.state,
        -- A job handed back unstarted keeps its run_at, so it keeps its place among the queue's jobs.
        run_at = CASE WHEN o.keep_place THEN j.run_at
                      WHEN o.wake_at IS NOT NULL THEN to_timestamp(o.wake_at)
                      WHEN o.state IN ('scheduled', 'available') THEN now() + o.delay * interval '1 second'
                      ELSE j.run_at END,
        finished_at = CASE WHEN o.state IN ('succeeded', 'dead') THEN now() END,
        result = o.result,
        errors = CASE WHEN o.error IS NULL THEN j.errors ELSE j.errors || jsonb_build_array(o.error) END,
        attempt = j.attempt - o.refund,
        -- A job a rate limiter held back keeps the start it reserved (slot_at, epoch seconds on the
        -- limiter's clock); it wakes a little before (wake_at), so that it is claimed in time and waits
        -- for that start in place.
        rate_slot = CASE WHEN o.slot_at IS NOT NULL THEN to_timestamp(o.slot_at)
                         WHEN o.keep_place THEN j.rate_slot END,
        snoozes = j.snoozes + o.snoozed,
        worker_id = NULL
    FROM outcome AS o
    -- Find the rows through the primary key whatever the statistics say: "id = ANY(ids)" is a
    -- jobs_pkey probe per outcome. Joined on "j.id = o.id" alone, a table without statistics (new,
    -- or autovacuum off) got a hash join over a Seq Scan of every job (6-17 ms per batch at 20k
    -- rows, growing with the table). "(...) IS TRUE" keeps the planner from matching the partial
    -- jobs_running_idx: with many running jobs it would hash-join all of them.
    WHERE j.id = ANY (ARRAY(SELECT id FROM outcome)) AND j.id = o.id
      AND (j.state = 'running') IS TRUE AND j.lease = o.lease
    RETURNING j.id, j.state, j.queue
)
SELECT coalesce(array_agg(id::text), '{{}}'),
       coalesce(array_agg(id::text) FILTER (WHERE state IN ('succeeded', 'dead')), '{{}}'),
       coalesce(array_agg(DISTINCT queue) FILTER (WHERE state = 'available'), '{{}}')
FROM finished
"""

# Whether this attempt still holds the job: a job that waited long in a worker's buffer may have been
# rescued meanwhile (the worker was paused past --rescue-after) and claimed elsewhere.
LEASE_HELD = "SELECT EXISTS (SELECT 1 FROM {jobs} WHERE id = %(id)s AND state = 'running' AND lease = %(lease)s)"

# After a commit: announce finished ids on the done channel (payloads of at most 200 ids, under
# NOTIFY's 8000-byte limit) and wake queues; used for the worker's finishes and for debounced
# enqueues (notifier.py). Run on its own (autocommit) with synchronous_commit off for this one
# transaction: a notification is not durable anyway, so its commit need not wait for the WAL flush
# while it holds the notify lock.
ANNOUNCE = """
WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true))
SELECT (SELECT count(pg_notify(%(done_channel)s, payload)) FROM unnest(%(payloads)s::text[]) AS payload)
     + (SELECT count(pg_notify(%(jobs_channel)s, queue)) FROM unnest(%(queues)s::text[]) AS queue)
FROM relaxed
"""

# Move scheduled jobs whose time has come to 'available' and wake their queues. SKIP LOCKED
# lets several workers run the stager at once without waiting on each other. Also returns the
# seconds until the next scheduled job is due (NULL when none is; the first row of
# jobs_scheduled_idx after now), so the stager can wake for it instead of at its next round. The
# subquery reads the statement's snapshot, in which the rows promoted here are still scheduled:
# "run_at > now()" leaves them (and due rows another stager holds) out.
PROMOTE_DUE = """
WITH due AS (
    SELECT id FROM {jobs}
    WHERE state = 'scheduled' AND run_at <= now()
    ORDER BY run_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), promoted AS (
    UPDATE {jobs} AS j SET state = 'available' FROM due WHERE j.id = due.id RETURNING j.queue
)
SELECT count(*), (SELECT count(pg_notify(%(channel)s, queue)) FROM (SELECT DISTINCT queue FROM promoted) q),
       (SELECT EXTRACT(EPOCH FROM min(run_at) - now())::float8 FROM {jobs} WHERE state = 'scheduled' AND run_at > now())
FROM promoted
"""

# -- rate limits and queue concurrency -----------------------------------------------------------

# A transaction-scoped advisory lock on a name: serialises capped claims for one queue across every
# worker.
# taskpg.testing's drain(with_scheduled=True): every scheduled job of these queues due now, whatever its time.
MAKE_DUE = """
WITH due AS (
    UPDATE {jobs} SET state = 'available', run_at = now()
    WHERE state = 'scheduled' AND queue = ANY(%(queues)s::text[])
    RETURNING 1
)
SELECT count(*) FROM due
"""

# The testing plugin's schemas, dropped after their test (store.drop_test_schema checks the name).
DROP_TEST_SCHEMA = "DROP SCHEMA IF EXISTS {schema} CASCADE"

ADVISORY_XACT_LOCK = "SELECT pg_advisory_xact_lock(hashtext(%(name)s))"

# Rate limits (Postgres backend): GCRA, the generic cell rate algorithm, without bursts: a key's tat
# (theoretical arrival time) is the earliest time of its next start, and starts are %(interval)s
# seconds apart. Each decision reserves the next start, max(tat, now), and moves tat one interval past
# it; the caller is told how many seconds from now its start is (0: now) and when it is (epoch
# seconds). One row per key, updated in one upsert whose row lock serialises concurrent decisions on
# that key: constant work per decision, whatever the rate. statement_timestamp() is one moment for
# the whole statement.
RATE_RESERVE = """
INSERT INTO {rate_limits} AS r (key, tat, granted)
VALUES (%(key)s, statement_timestamp() + %(interval)s * interval '1 second', 1)
ON CONFLICT (key) DO UPDATE
SET tat = GREATEST(r.tat, statement_timestamp()) + %(interval)s * interval '1 second', granted = r.granted + 1
RETURNING GREATEST(0, EXTRACT(EPOCH FROM r.tat - statement_timestamp())::float8 - %(interval)s),
          EXTRACT(EPOCH FROM r.tat)::float8 - %(interval)s
"""

RUNNING_IN_QUEUE = "SELECT count(*) FROM {jobs} WHERE queue = %(queue)s AND state = 'running'"

# -- workers, heartbeats, rescue -------------------------------------------------------------

HEARTBEAT = """
INSERT INTO {workers} (id, hostname, pid, queues, concurrency)
VALUES (%(id)s, %(hostname)s, %(pid)s, %(queues)s, %(concurrency)s)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()
"""

DELETE_WORKER = "DELETE FROM {workers} WHERE id = %(id)s"

# The jobs a worker has started and not yet written an outcome for: rescue charges an attempt only to
# those. Written every few ms while they change, and before a job that was rescued before starts.
RECORD_RUNNING = "UPDATE {workers} SET running = %(running)s::uuid[] WHERE id = %(id)s"

# Running jobs whose worker stopped heartbeating (or is gone) are rescued. The worker's row says which
# of them it had started (workers.running):
# - a started job used its attempt and counts a crash; out of attempts, or after %(max_crashes)s crashes
#   (it kills its worker: os._exit, a crash in C code, the OOM killer), it goes dead;
# - a job that was only claimed (prefetched) gets its attempt back, with nothing recorded against it.
# Every rescued job counts a rescue (from then on its start is recorded before it runs) and comes back
# at a random moment within %(spread)s seconds, so that a crash batch is not claimed together again.
# FOR UPDATE OF j locks the job rows only; the UPDATE's re-check of state = 'running' leaves alone a
# job completed meanwhile.
RESCUE_JOBS = """
WITH stale AS (
    SELECT j.id, coalesce(j.id = ANY(w.running), false) AS started
    FROM {jobs} AS j LEFT JOIN {workers} AS w ON w.id = j.worker_id
    WHERE j.state = 'running'
      AND (w.id IS NULL OR w.heartbeat_at <= now() - %(after)s * interval '1 second')
    FOR UPDATE OF j SKIP LOCKED
), judged AS (
    SELECT s.id, s.started,
           s.started AND (j.crashes + 1 >= %(max_crashes)s OR j.attempt >= j.max_attempts) AS dies,
           s.started AND j.crashes + 1 >= %(max_crashes)s AS killer
    FROM stale AS s JOIN {jobs} AS j ON j.id = s.id
), rescued AS (
    UPDATE {jobs} AS j
    SET state = CASE WHEN r.dies THEN 'dead' ELSE 'scheduled' END,
        run_at = CASE WHEN r.dies THEN j.run_at ELSE now() + random() * %(spread)s * interval '1 second' END,
        finished_at = CASE WHEN r.dies THEN now() END,
        attempt = CASE WHEN r.started THEN j.attempt ELSE j.attempt - 1 END,
        rescues = j.rescues + 1,
        crashes = j.crashes + r.started::int,
        -- %(error)s is the fixed part of a failure record (failures.sql_template); the row adds its own part.
        errors = CASE WHEN NOT r.started THEN j.errors ELSE j.errors || jsonb_build_array(
            %(error)s::jsonb || jsonb_build_object(
                'attempt', j.attempt, 'worker', j.worker_id, 'at', now(), 'crashes', j.crashes + 1,
                'message', CASE WHEN r.killer
                                THEN format(%(killer_message)s, j.crashes + 1)
                                ELSE %(error)s::jsonb ->> 'message' END)) END,
        worker_id = NULL
    FROM judged AS r WHERE j.id = r.id AND j.state = 'running'
    RETURNING j.id, j.state, r.started
)
SELECT count(*), count(*) FILTER (WHERE started), array_agg(id::text) FILTER (WHERE state = 'dead') FROM rescued
"""

# Self-healing for a claim whose reply was lost with the connection: jobs this live worker holds
# in the database but not in memory go back to 'available' (their attempt stays counted). The
# age guard keeps a claim that is still on its way back to the worker out of reach.
RELEASE_UNKNOWN = """
UPDATE {jobs} SET state = 'available', worker_id = NULL
WHERE state = 'running' AND worker_id = %(worker_id)s AND started_at < now() - interval '30 seconds'
  AND NOT (id = ANY(%(held)s::uuid[]))
"""

DELETE_STALE_WORKERS = """
DELETE FROM {workers} WHERE heartbeat_at < now() - %(after)s * interval '1 second'
"""


# -- periodic schedules (beat) -----------------------------------------------------------------

# Leadership among beat processes: a session-level advisory lock, held for as long as the leader's
# connection lives (a killed leader's session ends and frees it). It only saves work: correctness
# comes from the primary key of periodic_ticks below.
TRY_BEAT_LEADER = "SELECT pg_try_advisory_lock(hashtext(%(key)s))"

LAST_TICKS = """
SELECT schedule, max(tick), max(tick) FILTER (WHERE job_id IS NOT NULL)
FROM {periodic_ticks} WHERE schedule = ANY(%(schedules)s::text[]) GROUP BY schedule
"""

# Claim one tick of one schedule. The primary key (schedule, tick) lets exactly one claimant in;
# it enqueues the tick's job in the same transaction, so a tick and its job commit together.
CLAIM_TICK = """
INSERT INTO {periodic_ticks} (schedule, tick, job_id) VALUES (%(schedule)s, %(tick)s, %(job_id)s)
ON CONFLICT DO NOTHING RETURNING job_id
"""

SET_TICK_JOB = """
UPDATE {periodic_ticks} SET job_id = %(job_id)s WHERE schedule = %(schedule)s AND tick = %(tick)s
"""

# -- retention --------------------------------------------------------------------------------

# Delete finished jobs of one state older than a given age, in batches (short transactions).
PRUNE_BY_AGE = (
    """
DELETE FROM {jobs} WHERE id IN (
    SELECT id FROM {jobs}
    WHERE state = %(state)s AND finished_at < now() - %(age)s * interval '1 second'
      AND (%(queue)s::text IS NULL OR queue = %(queue)s) AND NOT (queue = ANY(%(other_queues)s::text[]))"""
    + KEEP_OPEN_CHORDS
    + """
    LIMIT %(batch)s
)
"""
)

# Keep at most %(keep)s finished jobs of one state per queue, the newest.
PRUNE_BY_COUNT = (
    """
DELETE FROM {jobs} WHERE id IN (
    SELECT id FROM (
        SELECT id, row_number() OVER (PARTITION BY queue ORDER BY finished_at DESC) AS newest
        FROM {jobs}
        WHERE state = %(state)s AND (%(queue)s::text IS NULL OR queue = %(queue)s)
          AND NOT (queue = ANY(%(other_queues)s::text[]))"""
    + KEEP_OPEN_CHORDS
    + """
    ) AS ranked
    WHERE newest > %(keep)s
    LIMIT %(batch)s
)
"""
)

# Whether autovacuum can look after the jobs table: on for the server (with the statistics it
# needs) and not disabled on the table. When it cannot, the maintenance chore vacuums it instead.
AUTOVACUUM_ACTIVE = """
SELECT current_setting('autovacuum')::bool AND current_setting('track_counts')::bool
       AND coalesce((SELECT option_value::bool FROM pg_options_to_table(c.reloptions)
                     WHERE option_name = 'autovacuum_enabled'), true)
FROM pg_class AS c WHERE c.oid = %(table)s::regclass
"""

# Makes the space of pruned and updated rows reusable and refreshes the planner's statistics. Takes a
# SHARE UPDATE EXCLUSIVE lock: enqueues, claims and finishes go on while it runs.
VACUUM_JOBS = "VACUUM (ANALYZE) {jobs}"

PRUNE_TICKS = """
DELETE FROM {periodic_ticks} AS t
WHERE t.created_at < now() - %(age)s * interval '1 second'
  AND t.tick < (SELECT max(tick) FROM {periodic_ticks} AS newest WHERE newest.schedule = t.schedule)
"""

# -- operations (CLI) --------------------------------------------------------------------------
# Filters are optional: a NULL parameter means "any".

# Per task: calls turned away by throttles (windows still kept), and snoozes of jobs still kept.
TASK_LIMIT_STATS = """
SELECT task, sum(throttled)::bigint, sum(snoozed)::bigint FROM (
    SELECT task, rejected AS throttled, 0 AS snoozed FROM {throttle_windows} WHERE rejected > 0
    UNION ALL
    SELECT task, 0, snoozes FROM {jobs} WHERE snoozes > 0
) AS counts GROUP BY task ORDER BY task
"""

PRUNE_LIMITS = """
WITH windows AS (DELETE FROM {throttle_windows} WHERE window_end < now() - interval '1 day'),
     locks AS (DELETE FROM {unique_locks} WHERE until < now()),
     rates AS (DELETE FROM {rate_limits} WHERE tat < now() - interval '1 day'),
     duplicates AS (DELETE FROM {duplicates} WHERE created_at < now() - interval '7 days')
SELECT 1
"""

# The flusher saw envelopes vanish from a buffer list (durability.py).
RECORD_BUFFER_LOSS = """
INSERT INTO {buffer_losses} (list_name, lost, cause) VALUES (%(list_name)s, %(lost)s, %(cause)s)
"""

# For `taskpg status`: all losses ever recorded, and the latest.
BUFFER_LOSSES = """
SELECT total.lost, total.events, latest.detected_at, latest.list_name, latest.cause
FROM (SELECT coalesce(sum(lost), 0)::bigint AS lost, count(*) AS events FROM {buffer_losses}) AS total
LEFT JOIN LATERAL (SELECT detected_at, list_name, cause FROM {buffer_losses} ORDER BY id DESC LIMIT 1) AS latest
    ON true
"""

# Jobs per queue in the states that hold few rows (available, scheduled, running), each read through
# the partial index whose predicate it matches (claim, scheduled, running), never the finished rows; for
# available, the age of the oldest due job.
BOUNDED_COUNTS = """
SELECT queue, 'available', count(*), EXTRACT(EPOCH FROM now() - min(run_at))::float8
FROM {jobs} WHERE state = 'available' GROUP BY queue
UNION ALL
SELECT queue, 'scheduled', count(*), NULL FROM {jobs} WHERE state = 'scheduled' GROUP BY queue
UNION ALL
SELECT queue, 'running', count(*), NULL FROM {jobs} WHERE state = 'running' GROUP BY queue
"""

# Queue depths for metrics: those, and the dead jobs through the finished index.
QUEUE_DEPTHS = (
    BOUNDED_COUNTS
    + """UNION ALL
SELECT queue, 'dead', count(*), NULL FROM {jobs} WHERE state = 'dead' GROUP BY queue
"""
)

# taskpg demo's mark on the schemas it creates: it never touches a schema without it.
MARK_DEMO_SCHEMA = "COMMENT ON SCHEMA {schema} IS 'created by taskpg demo'"
IS_DEMO_SCHEMA = """
SELECT coalesce(obj_description(n.oid, 'pg_namespace') = 'created by taskpg demo', false)
FROM pg_namespace AS n WHERE n.nspname = %(schema)s
"""

# The status API's counts: those, and 'recent': the jobs that finished (succeeded or dead) within
# %(window)s seconds, read from the finished index's newest end (index-only: the index includes the queue).
QUEUE_COUNTS = (
    BOUNDED_COUNTS
    + """UNION ALL
SELECT queue, 'recent', count(*), NULL FROM {jobs}
WHERE state IN ('succeeded', 'dead') AND finished_at > now() - %(window)s * interval '1 second' GROUP BY queue
"""
)

# Finished states can hold millions of rows, so they are counted in two steps. First, whether a state
# holds more than %(cap)s rows, reading at most that many entries of the finished index.
FINISHED_OVER = "SELECT count(*) > %(cap)s FROM (SELECT 1 FROM {jobs} WHERE state = %(state)s LIMIT %(cap)s + 1) AS c"

# Up to the cap, exactly: an index-only scan of that state's slice of the finished index.
FINISHED_COUNTS = "SELECT queue, count(*) FROM {jobs} WHERE state = %(state)s GROUP BY queue"

# Over it, an estimate from a sample of about %(pages)s of the table's pages (TABLESAMPLE SYSTEM reads
# whole random pages): the counts found, to be scaled by 100 / %(percent)s. The table's size in pages
# comes from TABLE_PAGES (its current size, not planner statistics, which go stale without autovacuum).
TABLE_PAGES = "SELECT pg_relation_size(%(table)s::regclass) / current_setting('block_size')::bigint"
FINISHED_SAMPLE = """
SELECT queue, count(*) FROM {jobs} TABLESAMPLE SYSTEM (%(percent)s) WHERE state = %(state)s GROUP BY queue
"""

# -- queue control -----------------------------------------------------------------------------

# Pause a queue: from this statement's commit on, no claim takes its jobs (CLAIM_JOBS reads this
# table). Jobs already claimed run to their end. Returns 1 when the queue was not paused yet.
PAUSE_QUEUE = "INSERT INTO {queue_pauses} (queue) VALUES (%(queue)s) ON CONFLICT (queue) DO NOTHING"

# Resume a queue and wake its workers (the NOTIFY is sent at the commit, after the row is gone).
RESUME_QUEUE = """
WITH resumed AS (DELETE FROM {queue_pauses} WHERE queue = %(queue)s RETURNING queue)
SELECT pg_notify(%(channel)s, queue) FROM resumed
"""

PAUSED_QUEUES = "SELECT queue, paused_at FROM {queue_pauses} ORDER BY queue"

# Cancel waiting jobs (available and scheduled) of some queues and/or a task: `taskpg purge`. The
# state test runs under each row's lock, so a job a worker claimed a moment ago is left alone (as in
# REVOKE_JOB). Returns the ids cancelled, for AsyncResult.get() waiters (announced after the commit).
PURGE_WAITING = """
UPDATE {jobs} SET state = 'cancelled', finished_at = now()
WHERE state IN ('available', 'scheduled')
  AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[]))
  AND (%(task)s::text IS NULL OR task = %(task)s)
RETURNING id::text
"""

# What PURGE_WAITING would cancel now (the number `taskpg purge` asks to confirm).
COUNT_WAITING = """
SELECT count(*) FROM {jobs}
WHERE state IN ('available', 'scheduled')
  AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[]))
  AND (%(task)s::text IS NULL OR task = %(task)s)
"""

# Jobs in one state, newest activity first for finished ones and in run order for the others, with
# optional filters: queues, a task, and the start of an id. Each order follows the index of its state
# (claim, scheduled, running by worker, finished by state and finished_at), so a page of a million
# finished jobs is read from the index's end. {order} is filled from JOB_ORDER, never from input.
LIST_JOBS = """
SELECT id::text, task, queue, state, attempt, max_attempts, priority, run_at, created_at, started_at, finished_at,
       worker_id, errors -> -1 ->> 'type', errors -> -1 ->> 'message'
FROM {jobs}
WHERE state = %(state)s
  AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[]))
  AND (%(task)s::text IS NULL OR task = %(task)s)
  AND (%(id_prefix)s::text IS NULL OR id::text LIKE %(id_prefix)s || '%%')
ORDER BY {order}
LIMIT %(limit)s OFFSET %(offset)s
"""
JOB_ORDER = {
    "available": "priority DESC, run_at, id",
    "scheduled": "run_at, id",
    "running": "started_at, id",
    "succeeded": "finished_at DESC, id",
    "dead": "finished_at DESC, id",
    "cancelled": "finished_at DESC, id",
}

LIST_WORKERS = """
SELECT id, hostname, pid, queues, concurrency, started_at, heartbeat_at,
       heartbeat_at > now() - %(alive_within)s * interval '1 second' AS alive,
       coalesce(cardinality(running), 0) AS in_flight
FROM {workers} ORDER BY started_at
"""

DEAD_LIST = """
SELECT id::text, task, queue, attempt, finished_at, errors -> -1 ->> 'type', errors -> -1 ->> 'message'
FROM {jobs}
WHERE state = 'dead' AND (%(queue)s::text IS NULL OR queue = %(queue)s) AND (%(task)s::text IS NULL OR task = %(task)s)
ORDER BY finished_at DESC
LIMIT %(limit)s
"""

# Bring dead jobs back: a fresh set of attempts, the error history kept.
DEAD_RETRY = """
WITH retried AS (
    UPDATE {jobs}
    SET state = 'available', attempt = 0, snoozes = 0, run_at = now(), finished_at = NULL, worker_id = NULL
    WHERE state = 'dead'
      -- A failed chord's body never ran and holds no results to run with: it is not retried (retry the chord).
      AND errors -> -1 ->> 'type' IS DISTINCT FROM 'ChordError'
      AND (%(ids)s::uuid[] IS NULL OR id = ANY(%(ids)s::uuid[]))
      AND (%(queue)s::text IS NULL OR queue = %(queue)s) AND (%(task)s::text IS NULL OR task = %(task)s)
    RETURNING id, queue
), woken AS (
    SELECT pg_notify(%(channel)s, queue) FROM (SELECT DISTINCT queue FROM retried) q
)
SELECT count(*), (SELECT count(*) FROM woken) FROM retried
"""

# Delete dead jobs: older than %(older_than)s seconds, or the ones named (the dashboard's purge).
DEAD_PURGE = """
DELETE FROM {jobs}
WHERE state = 'dead' AND finished_at < now() - %(older_than)s * interval '1 second'
  AND (%(ids)s::uuid[] IS NULL OR id = ANY(%(ids)s::uuid[]))
  AND (%(queue)s::text IS NULL OR queue = %(queue)s) AND (%(task)s::text IS NULL OR task = %(task)s)
"""


class Queries:
    """The statements above rendered for one schema, as plain attributes."""

    def __init__(self, schema: str) -> None:
        self.schema = validate_schema_name(schema)
        self.jobs_channel = f"taskpg_{schema}_jobs"
        self.done_channel = f"taskpg_{schema}_done"
        self.events_channel = f"taskpg_{schema}_events"
        self.insert_job = self._render(INSERT_JOB)
        self.active_unique = self._render(ACTIVE_UNIQUE)
        self.take_unique_lock = self._render(TAKE_UNIQUE_LOCK)
        self.release_unique_lock = self._render(RELEASE_UNIQUE_LOCK)
        self.throttle_admit = self._render(THROTTLE_ADMIT)
        self.throttle_rejected = self._render(THROTTLE_REJECTED)
        self.copy_jobs = self._render(COPY_JOBS)
        self.copy_jobs_due_now = self._render(COPY_JOBS_DUE_NOW)
        self.copy_to_queue = self._render(COPY_TO_QUEUE)
        self.create_staging = self._render(CREATE_STAGING)
        self.copy_staging = self._render(COPY_STAGING)
        self.insert_from_staging = self._render(INSERT_FROM_STAGING)
        self.record_duplicates = self._render(RECORD_DUPLICATES)
        self.notify_queues = self._render(NOTIFY_QUEUES)
        self.canvas_spawn = self._render(CANVAS_SPAWN)
        self.insert_chord = self._render(INSERT_CHORD)
        self.publish_events = self._render(PUBLISH_EVENTS)
        self.db_now = self._render(DB_NOW)
        self.get_job = self._render(GET_JOB)
        self.first_failed = self._render(FIRST_FAILED)
        self.children = self._render(CHILDREN)
        self.update_progress = self._render(UPDATE_PROGRESS)
        self.revoke_job = self._render(REVOKE_JOB)
        self.forget_job = self._render(FORGET_JOB)
        self.schema_version = self._render(SCHEMA_VERSION)
        self.claim_jobs = self._render(CLAIM_JOBS)
        self.finish_jobs = self._render(FINISH_JOBS)
        self.lease_held = self._render(LEASE_HELD)
        self.announce = self._render(ANNOUNCE)
        self.promote_due = self._render(PROMOTE_DUE)
        self.make_due = self._render(MAKE_DUE)
        self.drop_test_schema = self._render(DROP_TEST_SCHEMA)
        self.heartbeat = self._render(HEARTBEAT)
        self.delete_worker = self._render(DELETE_WORKER)
        self.record_running = self._render(RECORD_RUNNING)
        self.rescue_jobs = self._render(RESCUE_JOBS)
        self.release_unknown = self._render(RELEASE_UNKNOWN)
        self.delete_stale_workers = self._render(DELETE_STALE_WORKERS)
        self.advisory_xact_lock = self._render(ADVISORY_XACT_LOCK)
        self.rate_reserve = self._render(RATE_RESERVE)
        self.running_in_queue = self._render(RUNNING_IN_QUEUE)
        self.try_beat_leader = self._render(TRY_BEAT_LEADER)
        self.last_ticks = self._render(LAST_TICKS)
        self.claim_tick = self._render(CLAIM_TICK)
        self.set_tick_job = self._render(SET_TICK_JOB)
        self.prune_by_age = self._render(PRUNE_BY_AGE)
        self.prune_by_count = self._render(PRUNE_BY_COUNT)
        self.autovacuum_active = self._render(AUTOVACUUM_ACTIVE)
        self.vacuum_jobs = self._render(VACUUM_JOBS)
        self.prune_ticks = self._render(PRUNE_TICKS)
        self.task_limit_stats = self._render(TASK_LIMIT_STATS)
        self.prune_limits = self._render(PRUNE_LIMITS)
        self.record_buffer_loss = self._render(RECORD_BUFFER_LOSS)
        self.buffer_losses = self._render(BUFFER_LOSSES)
        self.queue_counts = self._render(QUEUE_COUNTS)
        self.finished_over = self._render(FINISHED_OVER)
        self.finished_counts = self._render(FINISHED_COUNTS)
        self.table_pages = self._render(TABLE_PAGES)
        self.finished_sample = self._render(FINISHED_SAMPLE)
        self.pause_queue = self._render(PAUSE_QUEUE)
        self.resume_queue = self._render(RESUME_QUEUE)
        self.paused_queues = self._render(PAUSED_QUEUES)
        self.purge_waiting = self._render(PURGE_WAITING)
        self.count_waiting = self._render(COUNT_WAITING)
        self.list_jobs = {state: self._render(LIST_JOBS.replace("{order}", by)) for state, by in JOB_ORDER.items()}
        self.mark_demo_schema = self._render(MARK_DEMO_SCHEMA)
        self.is_demo_schema = self._render(IS_DEMO_SCHEMA)
        self.queue_depths = self._render(QUEUE_DEPTHS)
        self.list_workers = self._render(LIST_WORKERS)
        self.dead_list = self._render(DEAD_LIST)
        self.dead_retry = self._render(DEAD_RETRY)
        self.dead_purge = self._render(DEAD_PURGE)

    def _render(self, template: str) -> str:
        return (
            sql.SQL(template)
            .format(
                schema=sql.Identifier(self.schema),
                jobs=sql.Identifier(self.schema, "jobs"),
                workers=sql.Identifier(self.schema, "workers"),
                periodic_ticks=sql.Identifier(self.schema, "periodic_ticks"),
                unique_locks=sql.Identifier(self.schema, "unique_locks"),
                throttle_windows=sql.Identifier(self.schema, "throttle_windows"),
                rate_limits=sql.Identifier(self.schema, "rate_limits"),
                duplicates=sql.Identifier(self.schema, "duplicates"),
                buffer_losses=sql.Identifier(self.schema, "buffer_losses"),
                queue_pauses=sql.Identifier(self.schema, "queue_pauses"),
                chords=sql.Identifier(self.schema, "chords"),
                alembic_version=sql.Identifier(self.schema, "alembic_version"),
            )
            .as_string()
        )

    @staticmethod
    def listen(channel: str) -> str:
        """``LISTEN <channel>`` with the channel quoted as an identifier."""
        return sql.SQL("LISTEN {}").format(sql.Identifier(channel)).as_string()
