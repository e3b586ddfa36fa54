"""docs/operations.md: the operations CLI, called in-process: migrate, status, inspect."""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from support.rows import jobs_by_id, tables

from taskpg.schema import SCHEMA_REVISION

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import SimpleNamespace

    import psycopg

    from taskpg import TaskPG


def counts(db: psycopg.Connection, schema: str) -> dict[str, dict[str, int]]:
    found: dict[str, dict[str, int]] = {}
    for queue, state, count in db.execute(f'SELECT queue, state, count(*) FROM "{schema}".jobs GROUP BY 1, 2'):
        found.setdefault(queue, {})[state] = count
    return found


def test_migrate_upgrade_current_downgrade_and_upgrade_again(
    cli: Callable[..., SimpleNamespace], db: psycopg.Connection, schema: str
) -> None:
    result = cli(schema, "migrate")
    assert result.code == 0
    assert f"schema {schema!r}" in result.out and f"revision {SCHEMA_REVISION}" in result.out, result.out
    assert {"jobs", "workers", "alembic_version"} <= tables(db, schema)

    result = cli(schema, "migrate", "current")
    assert (result.code, result.out.strip().rsplit(" ", 1)[-1]) == (0, SCHEMA_REVISION), result.out
    assert {"jobs", "workers"} <= tables(db, schema)

    result = cli(schema, "migrate", "downgrade", "base")
    assert result.code == 0 and "revision none (not migrated)" in result.out, result.out
    assert not {"jobs", "workers"} & tables(db, schema)

    result = cli(schema, "migrate", "upgrade")
    assert result.code == 0 and f"revision {SCHEMA_REVISION}" in result.out, result.out
    assert {"jobs", "workers", "alembic_version"} <= tables(db, schema)
    assert db.execute(f'SELECT version_num FROM "{schema}".alembic_version').fetchall() == [(SCHEMA_REVISION,)]


def test_status_lists_queues_and_states_as_text_and_json(
    cli: Callable[..., SimpleNamespace],
    db: psycopg.Connection,
    app: TaskPG,
    run_worker: Any,
    mixed: SimpleNamespace,
) -> None:
    expected = counts(db, app.schema)
    assert expected == {"default": {"dead": 2, "succeeded": 1, "available": 1}, "other": {"dead": 1}}

    result = cli(app.schema, "status")
    assert result.code == 0
    lines = result.out.splitlines()
    states = ["available", "scheduled", "running", "succeeded", "dead", "cancelled"]
    jobs_at = lines.index("jobs:")
    assert lines[jobs_at + 1].split() == ["queue", *states], result.out
    table = {line.split()[0]: line.split()[1:] for line in lines[jobs_at + 2 : lines.index("", jobs_at)]}
    assert table == {q: [str(expected[q].get(s, 0)) for s in states] for q in expected}, result.out
    assert "workers:" in lines

    result = cli(app.schema, "status", "--json")
    assert result.code == 0
    status = json.loads(result.out)
    no_losses = {"lost": 0, "events": 0, "last_at": None, "last_list": None, "last_cause": None}
    assert status == {"jobs": expected, "workers": [], "buffer": None, "buffer_losses": no_losses, "tasks": {}}

    with run_worker(app, queues=["nothing-here"]) as worker:
        status = json.loads(cli(app.schema, "status", "--json").out)
        assert [(w["id"], w["queues"], w["alive"]) for w in status["workers"]] == [(worker.id, ["nothing-here"], True)]
        text = cli(app.schema, "status").out
        assert worker.id[:8] in text and "nothing-here" in text and "alive" in text, text


def test_status_of_an_unmigrated_schema_says_to_migrate(cli: Callable[..., SimpleNamespace], schema: str) -> None:
    result = cli(schema, "status")
    assert result.code == 2
    assert "taskpg migrate" in result.err and schema in result.err, result.err


def test_inspect_prints_the_job_with_its_errors(
    cli: Callable[..., SimpleNamespace], app: TaskPG, db: psycopg.Connection, mixed: SimpleNamespace
) -> None:
    job_id = mixed.boom[0]
    result = cli(app.schema, "inspect", job_id)
    assert result.code == 0
    shown = json.loads(result.out)
    row = jobs_by_id(db, app.schema)[job_id]
    assert (shown["id"], shown["task"], shown["state"], shown["attempt"]) == (job_id, "cli.boom", "dead", 1)
    assert shown["errors"] == row["errors"] and len(shown["errors"]) == 1
    assert (shown["errors"][0]["type"], shown["errors"][0]["message"]) == ("ValueError", "boom 0")
    assert "raise ValueError" in shown["errors"][0]["traceback"]

    unknown = str(uuid.uuid4())
    result = cli(app.schema, "inspect", unknown)
    assert (result.code, result.out) == (1, "")
    assert unknown in result.err


def test_version_and_celerys_short_worker_options(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    from taskpg.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"taskpg {version('taskpg')}"
    args = build_parser().parse_args(["worker", "-A", "m", "-P", "processes", "-B"])
    assert (args.pool, args.beat) == ("processes", True)
