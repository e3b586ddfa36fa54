"""docs/canvas.md: signatures, chain, group, chord, link and link_error, run by real workers on real Postgres.

The examples follow Celery's "Canvas" guide (next steps and user guide) with only the import changed.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from support.rows import job_row

from taskpg import (
    AsyncResult,
    ChordError,
    ConfigurationError,
    GroupResult,
    Signature,
    Status,
    TimeoutError,
    chain,
    chord,
    group,
    signature,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import SimpleNamespace

    import psycopg

    from taskpg import TaskPG
    from taskpg.worker import Worker


@pytest.fixture
def t(app: TaskPG) -> SimpleNamespace:
    """Celery's guide tasks: add, mul, xsum, plus sub (order matters), boom (always fails), noted (records)."""
    from types import SimpleNamespace

    noted: list[Any] = []
    lock = threading.Lock()

    @app.task(name="canvas.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="canvas.sub")
    def sub(x: int, y: int) -> int:
        return x - y

    @app.task(name="canvas.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="canvas.xsum")
    def xsum(numbers: list[int]) -> int:
        return sum(numbers)

    @app.task(name="canvas.boom", max_retries=0)
    def boom(*args: Any) -> None:
        raise ValueError(f"boom {args}")

    @app.task(name="canvas.note")
    def note(*args: Any) -> str:
        with lock:
            noted.append(args)
        return "noted"

    return SimpleNamespace(add=add, sub=sub, mul=mul, xsum=xsum, boom=boom, note=note, noted=noted)


@pytest.fixture
def worker(app: TaskPG, run_worker: Any) -> Iterator[Worker]:
    with run_worker(app, concurrency=8) as running:
        yield running


# -- signatures ----------------------------------------------------------------------------------------


def test_a_signature_is_a_json_dict_that_comes_back_as_a_signature(app: TaskPG, t: SimpleNamespace) -> None:
    sig = t.add.s(2, 2)
    assert sig == {
        "task": "canvas.add",
        "args": [2, 2],
        "kwargs": {},
        "options": {},
        "subtask_type": None,
        "immutable": False,
    }
    back = signature(json.loads(json.dumps(sig)), app=app)
    assert isinstance(back, Signature) and back == sig and back() == 4  # calling runs it here
    assert t.add.signature((2, 2), countdown=10) == {**sig, "options": {"countdown": 10}}
    assert t.add.si(2, 2).immutable and not sig.immutable
    assert repr(t.add.s(2, y=3)) == "canvas.add(2, y=3)"
    chained = t.add.s(2, 2) | t.mul.s(8)
    again = signature(json.loads(json.dumps(chained)), app=app)
    assert isinstance(again, chain) and [s.task for s in again.tasks] == ["canvas.add", "canvas.mul"]
    with pytest.raises(ConfigurationError, match="unknown option"):
        t.add.s(1, 2).set(retries_forever=True)


def test_partials_prepend_call_time_arguments_and_options_travel(
    app: TaskPG, t: SimpleNamespace, worker: Worker, db: psycopg.Connection
) -> None:
    assert t.sub.s(2).delay(8).get(timeout=15) == 6  # sub(8, 2): Celery's rule, new arguments first
    assert t.sub.si(2, 1).delay(100).get(timeout=15) == 1  # immutable: 100 is not added
    partial = t.add.s(2).set(queue="default", priority=5)
    handle = partial.apply_async((3,))
    assert handle.get(timeout=15) == 5 and job_row(db, app, handle.id)["priority"] == 5
    twin = partial.clone(args=(10,), countdown=0)
    assert twin.args == [10, 2] and twin.options == {"queue": "default", "priority": 5, "countdown": 0}
    assert partial.args == [2]  # clone leaves the original alone
    frozen = t.add.s(1, 1)
    promised = frozen.freeze()
    assert frozen.delay().id == promised.id and promised.get(timeout=15) == 2


# -- chains -------------------------------------------------------------------------------------------


def test_a_chain_passes_each_result_on_and_keeps_its_parents(t: SimpleNamespace, worker: Worker) -> None:
    res = chain(t.add.s(4, 4), t.mul.s(8), t.mul.s(10))()
    assert res.get(timeout=15) == 640
    assert res.parent is not None and res.parent.get(timeout=15) == 64
    assert res.parent.parent is not None and res.parent.parent.get(timeout=15) == 8
    piped = (t.add.s(4, 4) | t.mul.s(8) | t.mul.s(10)).apply_async()
    assert piped.get(timeout=15) == 640
    assert (t.add.s(2, 2) | t.add.s(4) | t.add.s(8)).delay().get(timeout=15) == 16
    assert chain(t.add.s(4), t.mul.s(2)).delay(1).get(timeout=15) == 10  # the partial goes to the first step
    # The parent of a step is also in the database, for handles made from an id alone.
    assert AsyncResult(res.app, res.id).parent == res.parent


def test_a_chain_stops_at_a_failed_step_and_get_raises_its_error(
    app: TaskPG, t: SimpleNamespace, worker: Worker, db: psycopg.Connection
) -> None:
    res = (t.add.s(1, 1) | t.boom.s() | t.note.s("never")).apply_async()
    with pytest.raises(ValueError, match=r"boom \(2,\)"):
        res.get(timeout=15)
    assert res.parent is not None and res.parent.status == Status.FAILURE
    assert not _exists(db, app, res.id)  # the last step was never written
    assert t.noted == []


def test_a_thousand_step_chain(app: TaskPG, t: SimpleNamespace, worker: Worker, db: psycopg.Connection) -> None:
    res = chain(t.add.s(0, 1), *[t.add.s(1) for _ in range(999)]).apply_async()
    assert res.get(timeout=120) == 1000
    (count,) = db.execute(f'SELECT count(*) FROM "{app.schema}".jobs WHERE task = %s', ["canvas.add"]).fetchone()
    assert count == 1000


# -- groups and chords ----------------------------------------------------------------------------------


def test_a_group_runs_in_parallel_and_lists_its_results_in_order(t: SimpleNamespace, worker: Worker) -> None:
    res = group(t.add.s(i, i) for i in range(10))()
    assert isinstance(res, GroupResult) and len(res) == 10
    assert res.get(timeout=15) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert res.ready() and res.successful() and not res.failed() and res.completed_count() == 10
    assert group(t.add.s(2), t.add.s(4))(10).get(timeout=15) == [12, 14]  # a partial applied to every member
    mixed = group(t.add.s(1, 1), t.boom.s()).apply_async()
    assert isinstance(mixed.get(timeout=15, propagate=False)[1], ValueError)
    assert mixed.failed() and mixed.completed_count() == 1
    with pytest.raises(ValueError, match="boom"):
        mixed.join(timeout=15)


def test_a_chord_gives_the_header_results_to_its_body(
    app: TaskPG, t: SimpleNamespace, worker: Worker, db: psycopg.Connection
) -> None:
    res = chord(t.add.s(i, i) for i in range(100))(t.xsum.s())
    assert res.get(timeout=30) == 9900
    assert isinstance(res.parent, GroupResult) and res.parent.get(timeout=15)[:3] == [0, 2, 4]
    assert (group(t.add.s(i, i) for i in range(10)) | t.xsum.s()).delay().get(timeout=15) == 90
    # A chord's body takes a partial too; an immutable body ignores the results.
    assert chord([t.add.s(1, 1), t.add.s(2, 2)], t.note.si("done")).apply_async().get(timeout=15) == "noted"
    assert t.noted == [("done",)]
    assert chord([], t.xsum.s()).apply_async().get(timeout=15) == 0  # no member: the body gets []
    (left,) = db.execute(f'SELECT count(*) FROM "{app.schema}".chords WHERE done < size').fetchone()
    assert left == 0


def test_a_chord_whose_member_dies_fails_and_its_body_never_runs(
    app: TaskPG, t: SimpleNamespace, worker: Worker, db: psycopg.Connection
) -> None:
    res = chord([t.add.s(1, 1), t.boom.s(), t.add.s(2, 2)], t.note.s())()
    with pytest.raises(ChordError, match="did not succeed: the chord body never runs"):
        res.get(timeout=15)
    assert job_row(db, app, res.id)["state"] == "dead" and t.noted == []
    assert res.parent is not None and res.parent.failed()


def test_nested_canvases(t: SimpleNamespace, worker: Worker) -> None:
    # A chain inside a group: each member's last step is the member's result.
    assert group(chain(t.add.s(1, 1), t.mul.s(2)), t.add.s(3, 3))().get(timeout=15) == [4, 6]
    # A group inside a chain, followed by a step: a chord.
    assert chain(t.add.s(1, 1), group(t.mul.s(2), t.mul.s(3)), t.xsum.s()).delay().get(timeout=15) == 10
    # A group at the end of a chain: the parent's result goes to every member.
    last = (t.add.s(2, 3) | group(t.mul.s(2), t.mul.s(10))).apply_async()
    assert isinstance(last, GroupResult) and last.get(timeout=15) == [10, 50]
    # A chord followed by more steps, and a chain as a chord's body.
    tail = (chord([t.add.s(1, 2), t.add.s(3, 4)], t.xsum.s()) | t.mul.s(10)).apply_async()
    assert tail.get(timeout=15) == 100
    body = chord([t.add.s(1, 1)], t.xsum.s() | t.add.s(5)).apply_async()
    assert body.get(timeout=15) == 7


# -- linking ---------------------------------------------------------------------------------------------


def test_link_runs_a_callback_with_the_result_and_link_error_with_the_job_id(
    t: SimpleNamespace, worker: Worker
) -> None:
    res = t.add.apply_async((2, 2), link=t.add.s(16))
    assert res.get(timeout=15) == 4
    (child,) = _wait_children(res)
    assert child.get(timeout=15) == 20 and child.parent == res
    failed = t.boom.apply_async((1,), link=t.note.s("no"), link_error=[t.note.s("err"), t.note.si("fixed")])
    with pytest.raises(ValueError):
        failed.get(timeout=15)
    assert sorted(c.get(timeout=15) for c in _wait_children(failed, 2)) == ["noted", "noted"]
    assert sorted(t.noted, key=str) == sorted([(failed.id, "err"), ("fixed",)], key=str)
    sig = t.add.s(1, 1)
    sig.link(t.mul.s(3))
    linked = sig.delay()
    assert linked.get(timeout=15) == 2 and _wait_children(linked)[0].get(timeout=15) == 6


def test_a_canvas_in_the_callers_transaction_exists_only_if_it_commits(
    app: TaskPG, t: SimpleNamespace, pg_dsn: str, db: psycopg.Connection
) -> None:
    import psycopg

    with psycopg.connect(pg_dsn) as conn:
        res = (t.add.s(1, 1) | t.mul.s(2)).apply_async(connection=conn)
        grouped = group(t.add.s(1, 1), t.add.s(2, 2)).apply_async(connection=conn)
        conn.rollback()
    assert not _exists(db, app, res.parent.id) and not _exists(db, app, grouped[0].id)
    with psycopg.connect(pg_dsn) as conn:
        res = chord([t.add.s(1, 1)], t.xsum.s()).apply_async(connection=conn)
        conn.commit()
    assert job_row(db, app, res.parent[0].id)["state"] == "available"


# -- ids ---------------------------------------------------------------------------------------------------


def test_an_id_that_names_no_job_is_pending(app: TaskPG) -> None:
    for unknown in ("some-id", str(uuid.uuid4())):
        handle = app.AsyncResult(unknown)
        assert handle.status == Status.PENDING and handle.state == "PENDING" and handle.result is None
        assert handle.revoke() is False and handle.children == [] and handle.parent is None
        with pytest.raises(TimeoutError):
            handle.get(timeout=0.2)


def test_a_caller_chosen_id_is_one_job(app: TaskPG, t: SimpleNamespace, db: psycopg.Connection) -> None:
    chosen = str(uuid.uuid4())
    first = t.add.apply_async((1, 2), task_id=chosen)
    second = t.add.apply_async((5, 5), task_id=chosen)
    assert first.id == second.id == chosen
    assert db.execute(f'SELECT args FROM "{app.schema}".jobs').fetchall() == [([1, 2],)]
    with pytest.raises(ConfigurationError, match="not a taskpg job id"):
        t.add.apply_async((1, 2), task_id="order-42")


def _wait_children(handle: AsyncResult, count: int = 1) -> list[AsyncResult]:
    """The children of a finished job: written in its outcome's transaction, so there as soon as it ended."""
    children = handle.children
    assert len(children) == count, children
    return children


def _exists(db: psycopg.Connection, app: TaskPG, job_id: str) -> bool:
    return db.execute(f'SELECT count(*) FROM "{app.schema}".jobs WHERE id = %s', [job_id]).fetchone() == (1,)


# -- expiry ------------------------------------------------------------------------------------------------


def test_a_job_not_started_by_its_expiry_is_never_run_and_ends_revoked(
    app: TaskPG, t: SimpleNamespace, run_worker: Any, db: psycopg.Connection
) -> None:
    import datetime as dt

    from taskpg import JobExpired, TaskRevoked

    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    expired = t.note.apply_async(("late",), expires=past, link_error=t.note.s("expired"))
    later = t.note.apply_async(("in time",), expires=3600)
    with run_worker(app, concurrency=2):
        assert later.get(timeout=15) == "noted"
        with pytest.raises(JobExpired, match="before a worker started it"):
            expired.get(timeout=15)
        (errback,) = expired.children
        assert errback.get(timeout=15) == "noted"
    assert isinstance(expired.result, TaskRevoked) and expired.status == Status.REVOKED
    row = job_row(db, app, expired.id)
    assert (row["state"], row["attempt"], row["errors"][-1]["type"]) == ("cancelled", 0, "JobExpired")
    assert ("late",) not in t.noted and ("in time",) in t.noted and (expired.id, "expired") in t.noted
    assert job_row(db, app, later.id)["expires_at"] is not None
    for bad in (-1, "soon", dt.datetime(2030, 1, 1)):
        with pytest.raises(ConfigurationError, match="expires="):
            t.note.apply_async(expires=bad)
    with pytest.raises(ConfigurationError, match="not inside a canvas yet"):
        chain(t.add.s(1, 1), t.add.s(1).set(expires=10)).apply_async()


# -- map, starmap, chunks ----------------------------------------------------------------------------------


def test_map_starmap_and_chunks(app: TaskPG, t: SimpleNamespace, worker: Worker) -> None:
    @app.task(name="canvas.double")
    def double(n: int) -> int:
        return 2 * n

    assert double.map([1, 2, 3]).delay().get(timeout=15) == [2, 4, 6]  # one job for the three calls
    assert t.add.starmap([(2, 2), (4, 4)]).apply_async().get(timeout=15) == [4, 8]
    res = t.add.chunks(zip(range(100), range(100), strict=True), 10)()
    assert isinstance(res, GroupResult) and len(res) == 10
    assert res.get(timeout=30) == [[2 * (10 * p + i) for i in range(10)] for p in range(10)]
    assert isinstance(t.add.chunks([(1, 1)], 1).group(), group)
    # In a canvas like any signature: the mapped results feed the next step.
    assert (double.map([1, 2]) | t.xsum.s()).delay().get(timeout=15) == 6
    with pytest.raises(ConfigurationError, match="size of a part"):
        t.add.chunks([(1, 1)], 0)


def test_the_canvas_example_runs(pg_dsn: str, schema: str) -> None:
    from support.example_runner import run_example

    out = run_example("canvas_pipeline.py", TASKPG_DSN=pg_dsn, TASKPG_SCHEMA=schema)
    assert out.splitlines() == [
        "receipt: order 7, 30 EUR",
        "order 13 stopped: card declined for order 13",
        "order 13 failed: card declined for order 13",
    ]


def test_expired_jobs_at_the_head_of_a_queue_do_not_hold_up_the_jobs_behind(
    app: TaskPG, t: SimpleNamespace, run_worker: Any, db: psycopg.Connection
) -> None:
    import datetime as dt

    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    expired = [t.note.apply_async((n,), expires=past) for n in range(60)]
    behind = t.note.apply_async(("behind",))
    # Claims of 2 at a time, and no poll in the test's time: only the claims' own wake-ups move on.
    with run_worker(app, concurrency=1, prefetch=1, poll_interval=600):
        assert behind.get(timeout=30) == "noted"
    states = {job_row(db, app, h.id)["state"] for h in expired}
    assert states == {"cancelled"} and t.noted == [("behind",)]


def test_canvas_shapes_and_options_not_supported_yet_are_refused_not_dropped(t: SimpleNamespace) -> None:
    refused = [
        (chord([chain(t.add.s(1, 1), t.mul.s(2))], t.xsum.s()), "chain of several steps as a chord's header member"),
        (chord([chord([t.add.s(1, 1)], t.xsum.s())], t.xsum.s()), "a chord as a member of another chord"),
        (chain(t.add.s(1, 1), t.mul.s(2)).set(link=t.note.s()), "link on a whole chain"),
        (group(t.add.s(1, 1)).set(link_error=t.note.s()), "link_error on a whole group"),
        (chord([t.add.s(1, 1)], t.xsum.s()).set(task_id=str(uuid.uuid4())), "task_id on a whole chord"),
    ]
    for canvas, message in refused:
        with pytest.raises(ConfigurationError, match=message):
            canvas.apply_async()
    with pytest.raises(ConfigurationError, match="freeze"):
        chain(t.add.s(1, 1), t.mul.s(2)).freeze()


def test_a_failed_chords_body_is_not_retried_and_open_chords_keep_their_members(
    app: TaskPG, t: SimpleNamespace, worker: Worker, db: psycopg.Connection
) -> None:
    from taskpg import deadletter, retention

    failed = chord([t.boom.s(), t.add.s(1, 1)], t.xsum.s())()
    with pytest.raises(ChordError):
        failed.get(timeout=15)
    assert deadletter.retry_dead(app.store, [failed.id]) == 0  # it holds no results to run with
    assert job_row(db, app, failed.id)["state"] == "dead"

    # An open chord: its finished member stays through forget() and retention until the chord is done.
    open_chord = chord([t.add.s(2, 2), t.add.si(0, 0).set(countdown=3600)], t.xsum.s())()
    first = open_chord.parent[0]
    assert first.get(timeout=15) == 4
    assert first.forget() is False
    retention.prune(app.store, {None: retention.Retention(succeeded=0.0)})
    assert _exists(db, app, first.id)
