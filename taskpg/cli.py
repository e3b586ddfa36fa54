"""The ``taskpg`` command: worker, beat, migrate, status, jobs, inspect, queue, purge, call, dead, demo..."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
import threading
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

from . import control, deadletter, durability, embedded, logs, metrics, migrate, ops
from .app import TaskPG
from .beat import Beat, describe_schedules
from .dsn import configured_dsn, redact
from .exceptions import TaskpgError
from .flusher import Flusher
from .job import FINISHED_STATES, JobState
from .pools import POOL_CHOICES
from .rates import parse_duration
from .task import current_request
from .worker import TIME_LIMIT_POOLS, Worker, WorkerSettings

if TYPE_CHECKING:
    from collections.abc import Sequence

#: The job states ``taskpg status`` shows, in this order.
STATUS_COLUMNS = (
    JobState.AVAILABLE,
    JobState.SCHEDULED,
    JobState.RUNNING,
    JobState.SUCCEEDED,
    JobState.DEAD,
    JobState.CANCELLED,
)
#: taskpg's log level when -l is not given (taskpg demo is quieter: its planned failures are not news).
DEFAULT_LOGLEVEL = "warning"
#: The worker options' defaults, read from WorkerSettings (so each default is stated once).
WORKER_DEFAULTS = WorkerSettings()


def load_app(spec: str) -> tuple[TaskPG, str]:
    """``module`` or ``module:attribute`` -> (app, module name). Without an attribute, the
    module's ``app`` (or its only TaskPG instance) is used."""
    module_name, _, attribute = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    module = importlib.import_module(module_name)
    if attribute:
        app = getattr(module, attribute, None)
    else:
        app = getattr(module, "app", None)
        if not isinstance(app, TaskPG):
            found = [v for v in vars(module).values() if isinstance(v, TaskPG)]
            app = found[0] if len(found) == 1 else None
    if not isinstance(app, TaskPG):
        raise SystemExit(f"taskpg: no TaskPG app found in {spec!r}: name it as MODULE:ATTRIBUTE")
    return app, module_name


_opened: list[TaskPG] = []  # apps made by this command, closed when it ends


def app_from_args(args: argparse.Namespace) -> TaskPG:
    """The -A app (its tasks registered), with --dsn/--schema overriding its settings."""
    app = _app_from_args(args)
    _opened.append(app)
    return app


def _app_from_args(args: argparse.Namespace) -> TaskPG:
    if not args.app:
        if configured_dsn(args.dsn) is None and not args.embedded and not _embedded_cluster_exists():
            raise SystemExit(
                f"taskpg {args.command}: no database to work on: set TASKPG_DSN (or DATABASE_URL, or --dsn), "
                f"name your app with -A MODULE[:APP], or pass --embedded to start an embedded Postgres in "
                f"{embedded.default_data_dir()}"
            )
        return TaskPG(args.dsn, schema=args.schema, redis_url=args.redis_url)
    app, _ = load_app(args.app)
    app.configure(dsn=args.dsn, schema=args.schema, redis_url=args.redis_url)
    return app


def _embedded_cluster_exists() -> bool:
    """Whether an embedded cluster was made here before (its data directory holds a PG_VERSION)."""
    return any(embedded.default_data_dir().glob("*/PG_VERSION"))


def printable(value: Any) -> str:
    """A cell as text with control characters escaped: a task name or error message stored by another
    producer must not move the cursor, clear the screen or forge lines in an operator's terminal."""
    text = "" if value is None else str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _print_table(rows: list[list[Any]], header: list[str]) -> None:
    table = [header, *[[printable(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


# -- commands ----------------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace) -> int:
    app = app_from_args(args)
    module = args.app.partition(":")[0]
    settings = WorkerSettings(
        queues=[q.strip() for q in args.queues.split(",") if q.strip()],
        concurrency=args.concurrency,
        pool=args.pool,
        prefetch=args.prefetch,
        poll_interval=args.poll_interval,
        heartbeat_interval=args.heartbeat,
        rescue_after=args.rescue_after,
        grace=args.grace,
        modules=[module],
        flush_buffer=not args.no_flush,
        time_limit_pool=args.time_limit_pool,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        events=args.events,
    )
    if not args.beat:
        return Worker(app, settings).run()
    beat = Beat(app, flush_buffer=False)  # the worker runs the flusher already
    thread = threading.Thread(target=beat.run, name="taskpg-beat", daemon=True)
    thread.start()
    try:
        return Worker(app, settings).run()
    finally:
        beat.stop()
        thread.join(10)


def cmd_events(args: argparse.Namespace) -> int:
    """Print job events until interrupted (apps and workers publish them with events=True / -E)."""
    app = app_from_args(args)
    app.store.check_schema()

    def ready() -> None:
        print(f"listening for job events of schema {app.schema!r}", flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        for event in app.events(_names(args.queues), _names(args.types), on_listening=ready):
            print(json.dumps(dataclasses.asdict(event)), flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    """Serve the queue depths (read from Postgres at each scrape) until interrupted."""
    app = app_from_args(args)
    app.store.check_schema()
    server = metrics.serve(lambda: metrics.queue_metrics(app.store.queue_depths()), args.host, args.port)
    print(f"serving the queues of schema {app.schema!r} at http://{args.host}:{args.port}/metrics", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Serve the dashboard, the status API and /metrics until interrupted."""
    from .dashboard import Dashboard, serve

    app = app_from_args(args)
    app.store.check_schema()
    token = args.token or os.environ.get("TASKPG_DASHBOARD_TOKEN") or None
    basic = args.basic_auth or os.environ.get("TASKPG_DASHBOARD_AUTH") or None
    server = serve(Dashboard(app, token=token, basic_auth=basic), args.host, args.port)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"taskpg dashboard of schema {app.schema!r} at http://{shown}:{server.server_port}/", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    app = app_from_args(args)
    if args.action == "upgrade":
        migrate.upgrade(app.dsn, app.schema, args.revision or "head")
    elif args.action == "downgrade":
        migrate.downgrade(app.dsn, app.schema, args.revision or "-1")
    revision = migrate.current(app.dsn, app.schema)
    print(f"schema {app.schema!r} in {redact(app.dsn)}: revision {revision or 'none (not migrated)'}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    app = app_from_args(args)
    report = ops.status_report(app.store)
    buffer: dict[str, Any] | None = None
    if app.redis_url is not None:
        depth, oldest = app.buffer.depth()
        buffer = {"depth": depth, "oldest_enqueued_at": oldest, "durability": durability.findings(app.buffer.client)}
    report["buffer"] = buffer
    losses = app.store.buffer_losses()  # kept in Postgres: shown even when Redis is not configured here
    report["buffer_losses"] = dataclasses.asdict(losses)
    if args.json:
        print(json.dumps(report, default=str, indent=2))
        return 0
    counts, workers, limits = report["jobs"], report["workers"], report["tasks"]
    states = [state.value for state in STATUS_COLUMNS]
    print("jobs:")
    _print_table([[q, *[counts[q].get(s, 0) for s in states]] for q in sorted(counts)], ["queue", *states])
    print("\nworkers:")
    _print_table(
        [
            [
                w["id"][:8],
                w["hostname"],
                w["pid"],
                ",".join(w["queues"]),
                w["concurrency"],
                w["heartbeat_at"],
                "alive" if w["alive"] else "silent",
            ]
            for w in workers
        ],
        ["id", "host", "pid", "queues", "concurrency", "last heartbeat", "state"],
    )
    if limits:
        print("\nthrottled and snoozed, per task:")
        _print_table([[t, s["throttled"], s["snoozed"]] for t, s in limits.items()], ["task", "throttled", "snoozed"])
    if buffer is not None:
        print(f"\nredis buffer: {buffer['depth']} envelope(s) waiting; oldest pushed at {buffer['oldest_enqueued_at']}")
        for finding in buffer["durability"]:
            print(f"redis buffer: not durable: {finding}")
    if losses.events:
        print(
            f"redis buffer: lost at least {losses.lost} envelope(s) in {losses.events} event(s); the latest at "
            f"{losses.last_at}, from {printable(losses.last_list or '')}: {losses.last_cause}"
        )
    return 0


#: Celery's ``inspect`` subcommands -> the state ``taskpg jobs`` lists for them.
CELERY_INSPECT = {"active": "running", "reserved": "running", "scheduled": "scheduled"}
#: ``taskpg jobs --state``: taskpg's states, and Celery's names for some of them.
JOB_STATE_CHOICES = (*[s.value for s in JobState], *CELERY_INSPECT)


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.job_id in CELERY_INSPECT:
        state = CELERY_INSPECT[args.job_id]
        print(
            f"taskpg inspect takes a job id; Celery's `inspect {args.job_id}` is `taskpg jobs --state {state}`:",
            file=sys.stderr,
        )
        args.state, args.queues, args.task, args.search, args.limit, args.json = state, None, None, None, 50, False
        return cmd_jobs(args)
    app = app_from_args(args)
    job = ops.inspect_job(app.store, args.job_id)
    if job is None:
        print(f"taskpg: no job {args.job_id}", file=sys.stderr)
        return 1
    print(json.dumps(dataclasses.asdict(job), default=str, indent=2))
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    """Jobs in one state, filtered (Celery's ``inspect active/scheduled/reserved``)."""
    app = app_from_args(args)
    state = JobState(CELERY_INSPECT.get(args.state, args.state))
    jobs = ops.list_jobs(app.store, state, _names(args.queues), args.task, args.search, args.limit)
    if args.json:
        print(json.dumps([dataclasses.asdict(j) for j in jobs], default=str, indent=2))
        return 0
    when = {JobState.RUNNING: "started", JobState.AVAILABLE: "due", JobState.SCHEDULED: "runs at"}.get(state, "ended")

    def moment(job: Any) -> Any:
        if state in FINISHED_STATES:
            return job.finished_at
        return job.started_at if state is JobState.RUNNING else job.run_at

    _print_table(
        [
            [j.id, j.task, j.queue, f"{j.attempt}/{j.max_attempts}", moment(j), j.worker_id or "", _last_error(j)]
            for j in jobs
        ],
        ["id", "task", "queue", "attempt", when, "worker", "last error"],
    )
    if len(jobs) == args.limit:
        print(f"(the first {args.limit}; --limit for more)")
    return 0


def _last_error(job: Any) -> str:
    return f"{job.error_type}: {job.error_message}" if job.error_type else ""


def _names(text: str | None) -> list[str] | None:
    """A comma-separated option as a list (None when not given)."""
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def cmd_queue(args: argparse.Namespace) -> int:
    """Pause, resume or list paused queues."""
    app = app_from_args(args)
    if args.action == "list":
        paused = control.paused_queues(app.store)
        _print_table([[q, at] for q, at in paused.items()], ["paused queue", "since"])
        return 0
    if not args.names:
        raise SystemExit(f"taskpg queue {args.action}: name the queue(s)")
    for name in args.names:
        if args.action == "pause":
            changed = control.pause_queue(app.store, name)
            print(f"queue {name!r}: {'paused' if changed else 'was paused already'}; jobs already claimed finish")
        else:
            changed = control.resume_queue(app.store, name)
            print(f"queue {name!r}: {'resumed, workers woken' if changed else 'was not paused'}")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    """Cancel waiting jobs (Celery's ``purge``), after a confirmation unless -f."""
    app = app_from_args(args)
    queues = _names(args.queues)
    where = f"queue(s) {', '.join(queues)}" if queues else "every queue"
    where += f", task {args.task}" if args.task else ""
    if not args.force:
        count = control.count_waiting(app.store, queues, args.task)
        if count == 0:
            print(f"no waiting job in {where}")
            return 0
        if not sys.stdin.isatty():
            raise SystemExit(f"taskpg purge: {count} waiting job(s) in {where}; add -f to cancel them (no terminal)")
        answer = input(f"cancel {count} waiting job(s) in {where}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing cancelled")
            return 1
    print(f"{control.purge(app.store, queues, args.task)} waiting job(s) cancelled in {where}")
    return 0


def cmd_call(args: argparse.Namespace) -> int:
    """Enqueue one job by task name (Celery's ``call``); prints its id."""
    app = app_from_args(args)
    try:
        call_args = json.loads(args.args)
        call_kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"taskpg call: --args and --kwargs take JSON: {exc}") from None
    if not isinstance(call_args, list) or not isinstance(call_kwargs, dict):
        raise SystemExit("taskpg call: --args takes a JSON array and --kwargs a JSON object")
    if args.app and args.task not in app.tasks:
        known = ", ".join(sorted(app.tasks)) or "none"
        raise SystemExit(f"taskpg call: no task {args.task!r} in {args.app} (its tasks: {known})")
    result = app.send_task(
        args.task, call_args, call_kwargs, countdown=args.countdown, queue=args.queue, priority=args.priority
    )
    print(result.id)
    return 0


def cmd_dead(args: argparse.Namespace) -> int:
    app = app_from_args(args)
    if args.action == "list":
        jobs = deadletter.list_dead(app.store, args.queue, args.task, args.limit)
        _print_table(
            [[j.id, j.task, j.queue, j.attempts, j.died_at, f"{j.error_type}: {j.error_message}"] for j in jobs],
            ["id", "task", "queue", "attempts", "died at", "last error"],
        )
    elif args.action == "retry":
        if not args.ids and not args.all:
            raise SystemExit("taskpg dead retry: name job ids, or --all (optionally with --queue/--task)")
        count = deadletter.retry_dead(app.store, None if args.all else args.ids, args.queue, args.task)
        print(f"{count} dead job(s) made available again")
    elif args.action == "purge":
        if args.older_than is None:
            raise SystemExit("taskpg dead purge: --older-than is required (e.g. --older-than 7d)")
        count = deadletter.purge_dead(app.store, parse_duration(args.older_than), args.queue, args.task)
        print(f"{count} dead job(s) deleted")
    return 0


def cmd_beat(args: argparse.Namespace) -> int:
    app = app_from_args(args)
    if args.list:
        return cmd_schedules(args)
    return Beat(app, leader_election=not args.no_leader, flush_buffer=not args.no_flush).run()


def cmd_schedules(args: argparse.Namespace) -> int:
    app = app_from_args(args)
    rows = describe_schedules(app.store, app.schedules())
    _print_table(
        [[r["name"], r["task"], r["when"], r["catch_up"], r["last"] or "never", r["next"]] for r in rows],
        ["schedule", "task", "when", "catch-up", "last fired", "next"],
    )
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    app = app_from_args(args)
    if app.redis_url is None:
        raise SystemExit("taskpg flush: no Redis configured (redis_url=, TASKPG_REDIS_URL or --redis-url)")
    count = Flusher(app).drain()
    print(f"flushed {count} envelope(s) into Postgres")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    demo.app.configure(dsn=args.dsn, schema=args.schema)
    if args.loglevel is None:  # the worker's lines about the demo's planned failures, only when asked for
        logging.getLogger("taskpg").setLevel(logging.CRITICAL)
    return demo.run(jobs=args.jobs, concurrency=args.concurrency, reset=args.reset, dsn=args.dsn)


# -- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-A", "--app", help="MODULE[:ATTRIBUTE] holding the TaskPG app")
    common.add_argument("--dsn", help="database DSN (default: the app's, TASKPG_DSN, DATABASE_URL)")
    common.add_argument("--schema", help="Postgres schema of taskpg's tables (default: taskpg)")
    common.add_argument("--redis-url", help="Redis of the spike buffer (default: the app's, TASKPG_REDIS_URL)")
    common.add_argument(
        "-l",
        "--loglevel",
        default=None,
        type=str.lower,
        choices=logs.LEVELS,
        help="taskpg's log level (default: warning)",
    )
    common.add_argument("--log-format", default="text", choices=logs.FORMATS, help="text lines or JSON lines")
    common.add_argument(
        "--embedded", action="store_true", help="with no DSN and no app: use (or start) the embedded Postgres here"
    )

    parser = argparse.ArgumentParser(prog="taskpg", description="A Celery-style task queue on PostgreSQL.")
    parser.add_argument("--version", action="version", version=f"taskpg {version('taskpg')}")
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", parents=[common], help="run jobs")
    w = WORKER_DEFAULTS
    worker.add_argument(
        "-Q", "--queues", default=",".join(w.queues), help="comma-separated queues (default: %(default)s)"
    )
    worker.add_argument(
        "-c", "--concurrency", type=int, default=w.concurrency, help="jobs run at once (default: %(default)s)"
    )
    worker.add_argument("-P", "--pool", choices=POOL_CHOICES, default=w.pool)
    worker.add_argument(
        "--time-limit-pool",
        choices=TIME_LIMIT_POOLS,
        default=w.time_limit_pool,
        help="where the threads and async pools run tasks with a time_limit (default: %(default)s: exact limits)",
    )
    worker.add_argument(
        "--prefetch",
        type=int,
        default=w.prefetch,
        help="extra jobs buffered (default: 4 x concurrency, deeper for jobs under ~5 ms; 0 for long jobs)",
    )
    worker.add_argument(
        "--grace", type=float, default=w.grace, help="seconds running jobs get at shutdown (default: %(default)s)"
    )
    worker.add_argument(
        "--poll-interval", type=float, default=w.poll_interval, help="safety-net poll when idle, s (%(default)s)"
    )
    worker.add_argument(
        "--heartbeat", type=float, default=w.heartbeat_interval, help="heartbeat interval, s (%(default)s)"
    )
    worker.add_argument(
        "--rescue-after", type=float, default=w.rescue_after, help="rescue jobs of workers silent this long (s)"
    )
    worker.add_argument("-B", "--beat", action="store_true", help="also run the periodic scheduler in this process")
    worker.add_argument("--no-flush", action="store_true", help="do not run the Redis buffer flusher here")
    worker.add_argument(
        "-E", "--events", action="store_true", help="publish job events (started, outcomes) for `taskpg events`"
    )
    worker.add_argument("--metrics-port", type=int, help="serve Prometheus metrics of this worker at :PORT/metrics")
    worker.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics listen on (default: loopback)")
    worker.set_defaults(func=cmd_worker)

    watch = sub.add_parser("events", parents=[common], help="print job events as JSON lines as they happen")
    watch.add_argument("-Q", "--queues", help="only these queues (comma-separated)")
    watch.add_argument("--types", help="only these event types (comma-separated)")
    watch.set_defaults(func=cmd_events)

    served = sub.add_parser("metrics", parents=[common], help="serve the queues' depths as Prometheus metrics")
    served.add_argument("--port", type=int, default=9808, help="default: 9808")
    served.add_argument("--host", default="127.0.0.1", help="default: loopback; 0.0.0.0 for every address")
    served.set_defaults(func=cmd_metrics)

    board = sub.add_parser("dashboard", parents=[common], help="the web dashboard, the status API and /metrics")
    board.add_argument("--port", type=int, default=8008, help="default: 8008")
    board.add_argument("--host", default="127.0.0.1", help="default: loopback (others need --token or --basic-auth)")
    board.add_argument("--token", help="a secret of 16+ characters (Bearer, or ?token= once); TASKPG_DASHBOARD_TOKEN")
    board.add_argument("--basic-auth", help="USER:PASSWORD for the browser's login prompt; TASKPG_DASHBOARD_AUTH")
    board.set_defaults(func=cmd_dashboard)

    beat = sub.add_parser("beat", parents=[common], help="enqueue periodic jobs, exactly once per tick")
    beat.add_argument("--list", action="store_true", help="show the schedules with their last and next ticks")
    beat.add_argument("--no-leader", action="store_true", help="skip leader election (ticks stay exactly-once)")
    beat.add_argument("--no-flush", action="store_true", help="do not run the Redis buffer flusher here")
    beat.set_defaults(func=cmd_beat)

    schedules = sub.add_parser("schedules", parents=[common], help="the periodic schedules (= beat --list)")
    schedules.set_defaults(func=cmd_schedules)

    flush = sub.add_parser("flush", parents=[common], help="move everything in the Redis buffer into Postgres once")
    flush.set_defaults(func=cmd_flush)

    mig = sub.add_parser("migrate", parents=[common], help="apply or inspect database migrations")
    mig.add_argument("action", nargs="?", choices=["upgrade", "downgrade", "current"], default="upgrade")
    mig.add_argument("revision", nargs="?", help="target (default: head for upgrade, -1 for downgrade)")
    mig.set_defaults(func=cmd_migrate)

    status = sub.add_parser("status", parents=[common], help="jobs per queue and state, workers")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    insp = sub.add_parser("inspect", parents=[common], help="one job with its error history")
    insp.add_argument("job_id", help="a job id (Celery's `inspect active/scheduled/reserved`: see `taskpg jobs`)")
    insp.set_defaults(func=cmd_inspect)

    jobs = sub.add_parser("jobs", parents=[common], help="jobs in one state (Celery's inspect active/scheduled)")
    jobs.add_argument("--state", choices=JOB_STATE_CHOICES, default="running", help="default: running")
    jobs.add_argument("-Q", "--queues", help="only these queues (comma-separated)")
    jobs.add_argument("--task", help="only this task")
    jobs.add_argument("--search", help="only ids starting with this")
    jobs.add_argument("--limit", type=int, default=50, help="at most this many (default: 50)")
    jobs.add_argument("--json", action="store_true")
    jobs.set_defaults(func=cmd_jobs)

    queue = sub.add_parser("queue", parents=[common], help="pause or resume queues, list the paused ones")
    queue.add_argument("action", choices=["pause", "resume", "list"])
    queue.add_argument("names", nargs="*", help="queue names")
    queue.set_defaults(func=cmd_queue)

    purge = sub.add_parser("purge", parents=[common], help="cancel waiting jobs (available and scheduled)")
    purge.add_argument("-Q", "--queues", help="only these queues (comma-separated; default: every queue)")
    purge.add_argument("--task", help="only this task")
    purge.add_argument("-f", "--force", action="store_true", help="do not ask for a confirmation")
    purge.set_defaults(func=cmd_purge)

    call = sub.add_parser("call", parents=[common], help="enqueue one job by task name; prints its id")
    call.add_argument("task", help="the task's registered name")
    call.add_argument("--args", default="[]", help="positional arguments as a JSON array")
    call.add_argument("--kwargs", default="{}", help="keyword arguments as a JSON object")
    call.add_argument("--countdown", type=float, help="seconds before it may start")
    call.add_argument("--queue", help="queue (default: the task's, else the app's default queue)")
    call.add_argument("--priority", type=int)
    call.set_defaults(func=cmd_call)

    dead = sub.add_parser("dead", parents=[common], help="list, retry or purge dead jobs")
    dead.add_argument("action", choices=["list", "retry", "purge"])
    dead.add_argument("ids", nargs="*", help="job ids (retry)")
    dead.add_argument("--all", action="store_true", help="retry every dead job matching the filters")
    dead.add_argument("--queue")
    dead.add_argument("--task")
    dead.add_argument("--limit", type=int, default=100)
    dead.add_argument("--older-than", help="purge: age such as 7d, 24h, 30m")
    dead.set_defaults(func=cmd_dead)

    demo = sub.add_parser("demo", parents=[common], help="a self-contained tour on the embedded Postgres")
    demo.add_argument("--jobs", type=int, default=300)
    demo.add_argument("-c", "--concurrency", type=int, default=8)
    demo.add_argument("--reset", action="store_true", help="empty the demo's schema first (only a schema it created)")
    demo.set_defaults(func=cmd_demo)
    return parser


def run() -> int:
    """The ``taskpg`` command (and ``python -m taskpg``): ``main`` with taskpg's logging set up."""
    return main(configure_logging=True)


def main(argv: Sequence[str] | None = None, *, configure_logging: bool = False) -> int:
    """Run one command. ``configure_logging`` sets up this process' logging from ``-l`` and
    ``--log-format`` (logs.py); called in-process (tests, your code), logging is left as it is."""
    args = build_parser().parse_args(argv)
    if configure_logging:
        logs.configure(args.loglevel or DEFAULT_LOGLEVEL, args.log_format, current_request)
    if args.command in ("worker", "beat", "schedules") and not args.app:
        raise SystemExit(f"taskpg {args.command}: -A MODULE[:APP] is required")
    try:
        code: int = args.func(args)
    except (TaskpgError, ValueError, TimeoutError) as exc:
        print(f"taskpg: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__module__.startswith("redis"):
            print(f"taskpg: Redis error: {exc}", file=sys.stderr)
            return 2
        raise
    finally:
        while _opened:
            _opened.pop().close()
        if configure_logging:
            logs.flush()
    return code
