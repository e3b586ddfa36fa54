"""docs/operations.md: queue control (pause, resume, purge), `taskpg jobs`, `taskpg call`, the status counts,
and the CLI's refusal to start an embedded database nobody asked for."""

from __future__ import annotations

import json
import os
import threading
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from support.rows import job_row, jobs_by_id

from taskpg.cli import main
from taskpg.job import JobState

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import SimpleNamespace

    import psycopg

    from taskpg import TaskPG


@pytest.fixture
def ran(app: TaskPG) -> tuple[list[str], Any, Any]:
    """Tasks of queues a and b that note each run: (runs, task_a, task_b)."""
    runs: list[str] = []
    lock = threading.Lock()

    @app.task(name="qc.in_a", queue="a")
    def in_a(n: int) -> int:
        with lock:
            runs.append(f"a{n}")
        return n

    @app.task(name="qc.in_b", queue="b")
    def in_b(n: int) -> int:
        with lock:
            runs.append(f"b{n}")
        return n

    return runs, in_a, in_b


def test_a_paused_queue_is_claimed_by_no_worker_until_resumed_and_resume_wakes_them(
    app: TaskPG, run_worker: Any, db: psycopg.Connection, ran: tuple[list[str], Any, Any]
) -> None:
    runs, in_a, in_b = ran
    # A poll interval longer than the test: only the NOTIFY of resume can wake the worker for queue a.
    with run_worker(app, queues=["a", "b"], poll_interval=600):
        assert app.pause_queue("a") is True  # paused after the worker started: nothing cached at its start
        assert app.pause_queue("a") is False
        assert app.paused_queues() == ["a"]
        waiting = [in_a.delay(n) for n in range(3)]
        assert in_b.delay(1).get(timeout=15) == 1  # the worker claimed for both queues since a's jobs came
        assert runs == ["b1"]
        assert {job_row(db, app, h.id)["state"] for h in waiting} == {"available"}
        assert app.queue_status()["a"]["paused"] is True

        assert app.resume_queue("a") is True
        assert app.resume_queue("a") is False
        assert [h.get(timeout=15) for h in waiting] == [0, 1, 2]
    assert sorted(runs) == ["a0", "a1", "a2", "b1"]
    assert app.paused_queues() == []


def test_queue_pause_resume_and_list_from_the_cli(cli: Callable[..., SimpleNamespace], app: TaskPG) -> None:
    result = cli(app.schema, "queue", "pause", "emails", "reports")
    assert result.code == 0 and "queue 'emails': paused" in result.out and "'reports': paused" in result.out
    assert "was paused already" in cli(app.schema, "queue", "pause", "emails").out
    listed = cli(app.schema, "queue", "list")
    assert [line.split()[0] for line in listed.out.splitlines()[1:]] == ["emails", "reports"]
    assert "resumed" in cli(app.schema, "queue", "resume", "emails").out
    assert "was not paused" in cli(app.schema, "queue", "resume", "emails").out
    assert app.paused_queues() == ["reports"]
    bad = cli(app.schema, "queue", "pause", "no spaces")
    assert bad.code == 2 and "queue='no spaces'" in bad.err


def test_purge_cancels_the_waiting_jobs_it_names_and_nothing_else(
    app: TaskPG, cli: Callable[..., SimpleNamespace], db: psycopg.Connection, ran: tuple[list[str], Any, Any]
) -> None:
    _, in_a, in_b = ran
    due = [in_a.delay(n) for n in range(3)]
    later = in_a.apply_async((9,), countdown=3600)
    other = in_b.delay(1)
    (claimed,) = app.store.claim(["a"], 1, "a-worker")  # running: purge leaves it alone
    result = cli(app.schema, "purge", "-Q", "a", "-f")
    assert result.code == 0 and "3 waiting job(s) cancelled in queue(s) a" in result.out, result.out
    states = {job_id: row["state"] for job_id, row in jobs_by_id(db, app.schema).items()}
    assert states.pop(claimed.id) == "running"
    assert states.pop(other.id) == "available"
    assert set(states.values()) == {"cancelled"} and set(states) == {h.id for h in [*due, later]} - {claimed.id}
    assert app.AsyncResult(later.id).status == "REVOKED"

    assert cli(app.schema, "purge", "-Q", "a", "-f").out.startswith("0 waiting job(s) cancelled")
    assert app.purge(task="qc.in_b") == 1


def test_purge_asks_first_and_refuses_without_a_terminal(
    app: TaskPG, cli: Callable[..., SimpleNamespace], monkeypatch: pytest.MonkeyPatch, ran: tuple[list[str], Any, Any]
) -> None:
    _, in_a, _ = ran
    handles = [in_a.delay(n) for n in range(2)]
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    with pytest.raises(SystemExit, match=r"2 waiting job\(s\) in every queue; add -f"):
        cli(app.schema, "purge")
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert cli(app.schema, "purge").out.strip() == "nothing cancelled"
    assert {app.AsyncResult(h.id).status for h in handles} == {"PENDING"}
    asked: list[str] = []
    monkeypatch.setattr("builtins.input", lambda prompt: asked.append(prompt) or "y")
    assert "2 waiting job(s) cancelled" in cli(app.schema, "purge").out
    assert asked == ["cancel 2 waiting job(s) in every queue? [y/N] "]
    assert cli(app.schema, "purge").out.strip() == "no waiting job in every queue"


def test_call_enqueues_by_name_with_json_arguments_and_options(
    cli: Callable[..., SimpleNamespace], app: TaskPG, db: psycopg.Connection
) -> None:
    result = cli(app.schema, "call", "billing.charge", "--args", '[7, "x"]', "--kwargs", '{"cents": 250}')
    assert result.code == 0
    row = job_row(db, app, result.out.strip())
    assert (row["task"], row["queue"], row["args"], row["kwargs"], row["state"]) == (
        "billing.charge",
        "default",
        [7, "x"],
        {"cents": 250},
        "available",
    )
    later = cli(app.schema, "call", "billing.charge", "--countdown", "3600", "--queue", "slow", "--priority", "5")
    row = job_row(db, app, later.out.strip())
    assert (row["queue"], row["priority"], row["state"]) == ("slow", 5, "scheduled")

    with pytest.raises(SystemExit, match="--args and --kwargs take JSON"):
        cli(app.schema, "call", "billing.charge", "--args", "[1,")
    with pytest.raises(SystemExit, match="--args takes a JSON array"):
        cli(app.schema, "call", "billing.charge", "--args", '{"a": 1}')
    bad = cli(app.schema, "call", "no such name!")
    assert bad.code == 2 and "task name 'no such name!'" in bad.err


def test_call_with_an_app_refuses_a_task_it_does_not_have(cli: Callable[..., SimpleNamespace], app: TaskPG) -> None:
    with pytest.raises(SystemExit, match=r"no task 'proc_tasks.nope' in proc_tasks \(its tasks: .*proc_tasks.record"):
        cli(app.schema, "call", "proc_tasks.nope", "-A", "proc_tasks")
    # A registered task goes through its own options (queue).
    result = cli(app.schema, "call", "proc_tasks.record", "-A", "proc_tasks", "--args", "[1]")
    assert result.code == 0, result.err
    assert app.AsyncResult(result.out.strip()).status == "PENDING"


def test_jobs_lists_one_state_with_filters_and_as_json(
    cli: Callable[..., SimpleNamespace], app: TaskPG, mixed: SimpleNamespace
) -> None:
    dead = cli(app.schema, "jobs", "--state", "dead")
    assert dead.code == 0
    assert dead.out.splitlines()[0].split() == ["id", "task", "queue", "attempt", "ended", "worker", "last", "error"]
    assert {line.split()[0] for line in dead.out.splitlines()[1:]} == set(mixed.dead)
    assert "ValueError: boom" in dead.out

    only_other = json.loads(cli(app.schema, "jobs", "--state", "dead", "-Q", "other", "--json").out)
    assert [(j["id"], j["queue"], j["error_type"]) for j in only_other] == [(mixed.boom[1], "other", "ValueError")]
    by_task = json.loads(cli(app.schema, "jobs", "--state", "dead", "--task", "cli.bust", "--json").out)
    assert [j["id"] for j in by_task] == [mixed.bust]
    found = json.loads(cli(app.schema, "jobs", "--state", "available", "--search", mixed.available[:8], "--json").out)
    assert [j["id"] for j in found] == [mixed.available]
    assert json.loads(cli(app.schema, "jobs", "--state", "available", "--search", "zz<>", "--json").out) == []
    limited = cli(app.schema, "jobs", "--state", "dead", "--limit", "2")
    assert len(limited.out.splitlines()) == 4 and "--limit for more" in limited.out
    assert cli(app.schema, "jobs").out.splitlines() == ["id  task  queue  attempt  started  worker  last error"]


def test_inspect_with_a_celery_subcommand_shows_the_jobs_command_instead(
    cli: Callable[..., SimpleNamespace], app: TaskPG, ran: tuple[list[str], Any, Any]
) -> None:
    _, in_a, _ = ran
    handle = in_a.delay(1)
    app.store.claim(["a"], 1, "w-1")
    result = cli(app.schema, "inspect", "active")
    assert result.code == 0
    assert "Celery's `inspect active` is `taskpg jobs --state running`" in result.err
    assert handle.id in result.out and "w-1" in result.out
    scheduled = cli(app.schema, "inspect", "scheduled")
    assert "`taskpg jobs --state scheduled`" in scheduled.err
    bad = cli(app.schema, "inspect", "not-a-job")
    assert bad.code == 2 and "is not a taskpg job id" in bad.err


def test_queue_status_uses_bullmqs_names_and_lists_known_and_paused_queues(
    app: TaskPG, mixed: SimpleNamespace, ran: tuple[list[str], Any, Any]
) -> None:
    _, in_a, _ = ran
    in_a.apply_async((1,), countdown=3600)
    app.queue("limited", rate_limit="10/s", concurrency=3)
    app.pause_queue("idle")
    status = app.queue_status()
    assert set(status) == {"default", "other", "a", "b", "limited", "idle"}
    default = status["default"]
    assert {k: default[k] for k in ("waiting", "active", "completed", "failed", "delayed", "cancelled")} == {
        "waiting": 1,
        "active": 0,
        "completed": 1,
        "failed": 2,
        "delayed": 0,
        "cancelled": 0,
    }
    assert default["finished_last_minute"] == 3 and default["paused"] is False
    assert default["oldest_waiting_seconds"] is not None and default["oldest_waiting_seconds"] >= 0
    assert status["a"]["delayed"] == 1 and status["a"]["oldest_waiting_seconds"] is None
    assert (status["limited"]["rate_limit"], status["limited"]["concurrency"]) == ("10/1s", 3)
    assert status["idle"]["paused"] is True and status["idle"]["waiting"] == 0


def test_operator_commands_without_a_database_fail_instead_of_creating_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("TASKPG_DSN", "DATABASE_URL", "TASKPG_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    for argv in (["status"], ["jobs"], ["queue", "list"], ["purge", "-f"], ["dead", "list"]):
        with pytest.raises(SystemExit) as failure:
            main(argv)
        message = str(failure.value)
        assert "TASKPG_DSN" in message and "-A MODULE" in message and "--embedded" in message, message
    assert os.listdir(tmp_path) == []  # no cluster, no directory


def test_send_task_of_an_unregistered_name_cannot_be_run_here(app: TaskPG, db: psycopg.Connection) -> None:
    handle = app.send_task("elsewhere.job", [1], {"b": 2}, queue="remote")
    row = job_row(db, app, handle.id)
    assert (row["task"], row["queue"], row["args"], row["kwargs"]) == ("elsewhere.job", "remote", [1], {"b": 2})
    assert uuid.UUID(handle.id)
    assert "elsewhere.job" not in app.tasks
    assert app.AsyncResult(handle.id).status == "PENDING" and JobState(row["state"]) is JobState.AVAILABLE


def test_finished_states_with_too_many_rows_are_estimated_from_a_sample(
    app: TaskPG, db: psycopg.Connection, ran: tuple[list[str], Any, Any]
) -> None:
    db.execute(
        f'INSERT INTO "{app.schema}".jobs (id, task, queue, args, kwargs, priority, max_attempts, state, run_at, '
        "finished_at) SELECT gen_random_uuid(), 't', 'q' || (i % 2), '[]', '{}', 0, 1, 'succeeded', now(), now() "
        "FROM generate_series(1, 30) AS i"
    )
    exact = {(r.queue, r.state): (r.count, r.estimated) for r in app.store.queue_counts(60)}
    assert exact == {
        ("q0", "succeeded"): (15, False),
        ("q1", "succeeded"): (15, False),
        ("q0", "recent"): (15, False),
        ("q1", "recent"): (15, False),
    }
    # Over the cap: sampled. The table is smaller than the sample, so every page is read and the
    # estimate is the count.
    sampled = {(r.queue, r.state): (r.count, r.estimated) for r in app.store.queue_counts(60, exact_up_to=10)}
    assert sampled[("q0", "succeeded")] == (15, True) and sampled[("q1", "succeeded")] == (15, True)
    assert sampled[("q0", "recent")] == (15, False)
