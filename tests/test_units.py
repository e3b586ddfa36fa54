"""Unit tests of taskpg's pure parts: no Postgres, no Redis.

Apps here point at a DSN nothing listens on: ``TaskPG`` opens connections lazily (``app.store`` is
the first use) and ``@app.task`` only validates options and fills the in-memory registry, so none
of these tests ever connects. Do not use the ``app``/``db``/``pg_dsn``/``redis_url`` fixtures here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import re
import sys
import time
import types
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import tenacity

from taskpg import TaskPG, failures
from taskpg.envelope import MAX_COUNTDOWN, OWN_ID_PREFIX, UNDECODABLE_TASK, Rejected, decode, encode, encode_many
from taskpg.exceptions import (
    ChildProcessDied,
    ConfigurationError,
    NotRegistered,
    Reject,
    Retry,
    Snooze,
    SoftTimeLimitExceeded,
    TaskError,
    TimeLimitExceeded,
)
from taskpg.executor import Call, Executor
from taskpg.guards import Guard, Throttle, check_key_templates, plan, render_key, unique_key_for
from taskpg.job import (
    FINISHED_STATES,
    UNFINISHED_STATES,
    ClaimedJob,
    JobState,
    NewJob,
    Outcome,
    Request,
    Status,
    job_id_sequence,
    new_job_id,
    status_of,
    validate_job_id,
)
from taskpg.limiter import QueueOptions, RateLimiter, interval_seconds, tolerance_seconds, window_seconds
from taskpg.options import TaskOptions
from taskpg.pools import WAIT_IN_PLACE, Pool, PoolSetup
from taskpg.rates import Rate, parse_duration, parse_rate
from taskpg.retry import DEFAULT_RETRY_DELAY, RetryPolicy
from taskpg.schema import build_metadata, validate_schema_name
from taskpg.store import RateSlot, outcomes_json

if TYPE_CHECKING:
    from pathlib import Path

    from taskpg.limiter import RateBackend
    from taskpg.task import Task

NOWHERE = "postgresql://nowhere/none"
UTC = dt.timezone.utc
WORKER = "worker-1"
JOB_ID = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"


@pytest.fixture
def offline() -> TaskPG:
    """An app whose DSN nothing listens on: it must never be used to connect."""
    return TaskPG(NOWHERE, schema="units")


def claimed(
    task: str = "units.add",
    *,
    args: str = "[]",
    kwargs: str = "{}",
    attempt: int = 1,
    max_attempts: int = 4,
    snoozes: int = 0,
    queue: str = "default",
) -> ClaimedJob:
    """A claimed job as the claim statement would return it."""
    return ClaimedJob(
        id=new_job_id(),
        task=task,
        queue=queue,
        priority=0,
        run_at=dt.datetime(2026, 1, 1, 8, tzinfo=UTC),
        args=args,
        kwargs=kwargs,
        attempt=attempt,
        max_attempts=max_attempts,
        snoozes=snoozes,
        lease=str(uuid.uuid4()),
    )


def call_of(task: Task[Any, Any], job: ClaimedJob, *args: Any, **kwargs: Any) -> Call:
    request = Request.of(job, list(args), kwargs)
    return Call(job, task, request)


def executor_of(app: TaskPG, max_payload_bytes: int = 1_000_000) -> Executor:
    return Executor(app.tasks, WORKER, max_payload_bytes)


def test_offline_app_registers_tasks_without_a_store(offline: TaskPG) -> None:
    @offline.task(name="units.add")
    def add(a: int, b: int) -> int:
        return a + b

    assert offline.tasks["units.add"] is add
    assert add(1, 2) == 3
    assert offline._store is None  # nothing connected


# -- failures ------------------------------------------------------------------------------------


class Outer:
    class InnerError(Exception):
        pass


class NeedsTwoArguments(Exception):
    def __init__(self, a: str, b: str) -> None:
        super().__init__(a, b)


def test_record_has_every_field() -> None:
    at = dt.datetime(2026, 1, 1, 8, tzinfo=UTC)
    rec = failures.record("LostWorker", "the worker stopped", 3, WORKER, traceback_text="tb", at=at)
    assert rec == {
        "attempt": 3,
        "type": "LostWorker",
        "module": failures.TASKPG_MODULE,
        "message": "the worker stopped",
        "traceback": "tb",
        "worker": WORKER,
        "at": "2026-01-01T08:00:00+00:00",
    }


def test_record_defaults_to_an_aware_now_and_no_traceback() -> None:
    rec = failures.record("X", "m", 1)
    assert rec["traceback"] is None
    assert rec["worker"] is None
    assert dt.datetime.fromisoformat(rec["at"]).tzinfo is not None


def test_from_exception_names_type_module_message_and_traceback() -> None:
    def explode() -> None:
        raise ValueError("bad value")

    try:
        explode()
    except ValueError as exc:
        rec = failures.from_exception(exc, 2, WORKER)
    assert rec["type"] == "ValueError"
    assert rec["module"] == "builtins"
    assert rec["message"] == "bad value"
    assert rec["attempt"] == 2
    assert rec["worker"] == WORKER
    assert rec["traceback"].startswith("Traceback (most recent call last)")
    assert "in explode" in rec["traceback"]
    assert rec["traceback"].endswith("ValueError: bad value\n")


def test_from_exception_uses_the_qualified_name_of_a_nested_class() -> None:
    rec = failures.from_exception(Outer.InnerError("inner"), 1)
    assert rec["type"] == "Outer.InnerError"
    assert rec["module"] == __name__


def test_from_exception_can_leave_the_traceback_out() -> None:
    assert failures.from_exception(KeyError("k"), 1, with_traceback=False)["traceback"] is None


def test_nul_characters_are_made_storable() -> None:
    rec = failures.record("X", "a\x00b", 1, traceback_text="t\x00b")
    assert rec["message"] == "a\\x00b"
    assert rec["traceback"] == "t\\x00b"
    assert "\x00" not in failures.from_exception(ValueError("nul\x00here"), 1)["message"]


def test_sql_template_leaves_the_row_parts_to_the_statement() -> None:
    fixed = json.loads(failures.sql_template("WorkerLost", "the worker's heartbeat stopped"))
    assert fixed == {
        "type": "WorkerLost",
        "module": failures.TASKPG_MODULE,
        "message": "the worker's heartbeat stopped",
        "traceback": None,
    }
    assert not {"attempt", "worker", "at"} & fixed.keys()


def test_rebuild_gives_a_builtin_exception_back_as_itself() -> None:
    exc = failures.rebuild({"type": "ValueError", "module": "builtins", "message": "bad"})
    assert type(exc) is ValueError
    assert str(exc) == "bad"


def test_rebuild_gives_an_imported_class_back_as_itself() -> None:
    exc = failures.rebuild(failures.from_exception(Outer.InnerError("inner"), 1))
    assert type(exc) is Outer.InnerError
    assert str(exc) == "inner"
    not_registered = failures.rebuild(
        {"type": "NotRegistered", "module": "taskpg.exceptions", "message": "unknown task 'x': none"}
    )
    assert type(not_registered) is NotRegistered
    assert str(not_registered) == "unknown task 'x': none"


def test_rebuild_of_an_unknown_class_is_a_task_error_of_that_name() -> None:
    module = "taskpg_units_nowhere.errors"
    exc = failures.rebuild({"type": "PaymentDeclined", "module": module, "message": "card refused"})
    assert isinstance(exc, TaskError)
    assert type(exc).__name__ == "PaymentDeclined"
    assert type(exc).__module__ == module
    assert str(exc) == "card refused"
    assert module not in sys.modules
    assert "taskpg_units_nowhere" not in sys.modules
    again = failures.rebuild({"type": "PaymentDeclined", "module": module, "message": "other"})
    assert type(again) is type(exc)  # one stand-in class per name


def test_rebuild_never_imports_the_module_it_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "taskpg_units_importable.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Boom(Exception):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    exc = failures.rebuild({"type": "Boom", "module": "taskpg_units_importable", "message": "m"})
    assert isinstance(exc, TaskError)
    assert type(exc).__name__ == "Boom"
    assert "taskpg_units_importable" not in sys.modules
    assert not marker.exists()


def test_rebuild_never_calls_a_non_exception_attribute() -> None:
    exc = failures.rebuild({"type": "system", "module": "os", "message": "echo hi"})
    assert isinstance(exc, TaskError)
    assert str(exc) == "echo hi"


def test_rebuild_of_a_class_refusing_the_message_is_a_stand_in() -> None:
    exc = failures.rebuild({"type": "NeedsTwoArguments", "module": __name__, "message": "only one"})
    assert not isinstance(exc, NeedsTwoArguments)
    assert isinstance(exc, TaskError)
    assert type(exc).__name__ == "NeedsTwoArguments"


def test_rebuild_of_an_empty_record_is_a_task_error() -> None:
    exc = failures.rebuild({})
    assert isinstance(exc, TaskError)
    assert str(exc) == ""


def test_rebuild_keeps_the_remote_traceback() -> None:
    exc = failures.rebuild({"type": "KeyError", "module": "builtins", "message": "k", "traceback": "Traceback..."})
    assert type(exc) is KeyError
    assert exc.remote_traceback == "Traceback..."  # type: ignore[attr-defined]


# -- executor: conclude ----------------------------------------------------------------------------


def test_conclude_success_stores_the_result_as_json(offline: TaskPG) -> None:
    @offline.task(name="units.pair")
    def pair() -> dict[str, Any]:
        return {}

    outcome = executor_of(offline).conclude(call_of(pair, claimed("units.pair")), {"a": [1, "é"]})
    assert outcome.state is JobState.SUCCEEDED
    assert outcome.result is not None
    assert json.loads(outcome.result) == {"a": [1, "é"]}
    assert outcome.error is None
    assert outcome.refund == 0


def test_conclude_success_of_an_unserialisable_result_keeps_its_repr(offline: TaskPG) -> None:
    @offline.task(name="units.obj")
    def obj() -> object:
        return object()

    outcome = executor_of(offline).conclude(call_of(obj, claimed("units.obj")), {1, 2})
    assert outcome.result is not None
    assert json.loads(outcome.result) == {"__taskpg_unserialisable__": "{1, 2}"}


def test_conclude_success_with_ignore_result_stores_nothing(offline: TaskPG) -> None:
    @offline.task(name="units.quiet", ignore_result=True)
    def quiet() -> int:
        return 1

    outcome = executor_of(offline).conclude(call_of(quiet, claimed("units.quiet")), 42)
    assert outcome.state is JobState.SUCCEEDED
    assert outcome.result is None


def test_conclude_snooze_refunds_the_attempt(offline: TaskPG) -> None:
    @offline.task(name="units.snoozy", max_snoozes=3)
    def snoozy() -> None: ...

    job = claimed("units.snoozy", snoozes=2)
    outcome = executor_of(offline).conclude(call_of(snoozy, job), exc=Snooze(7))
    assert outcome == Outcome(job, JobState.SCHEDULED, delay=7.0, refund=1, snoozed=1)


def test_conclude_snooze_past_max_snoozes_is_dead(offline: TaskPG) -> None:
    @offline.task(name="units.snoozy", max_snoozes=3)
    def snoozy() -> None: ...

    outcome = executor_of(offline).conclude(call_of(snoozy, claimed("units.snoozy", snoozes=3)), exc=Snooze(7))
    assert outcome.state is JobState.DEAD
    assert outcome.refund == 0
    assert outcome.error is not None
    assert outcome.error["type"] == "TooManySnoozes"
    assert "snoozed 3 times; the limit is 3" in outcome.error["message"]


def test_conclude_snooze_with_max_snoozes_zero_is_dead_at_once(offline: TaskPG) -> None:
    @offline.task(name="units.never", max_snoozes=0)
    def never() -> None: ...

    outcome = executor_of(offline).conclude(call_of(never, claimed("units.never")), exc=Snooze(1))
    assert outcome.state is JobState.DEAD


def test_conclude_reject_is_dead_whatever_attempts_remain(offline: TaskPG) -> None:
    @offline.task(name="units.picky")
    def picky() -> None: ...

    job = claimed("units.picky", attempt=1, max_attempts=10)
    outcome = executor_of(offline).conclude(call_of(picky, job), exc=Reject("malformed order"))
    assert outcome.state is JobState.DEAD
    assert outcome.error is not None
    assert outcome.error["type"] == "Reject"
    assert outcome.error["module"] == "taskpg.exceptions"
    assert outcome.error["message"] == "malformed order"
    assert outcome.error["attempt"] == 1
    assert outcome.error["worker"] == WORKER


def test_conclude_retry_with_countdown_is_scheduled(offline: TaskPG) -> None:
    @offline.task(name="units.flaky")
    def flaky() -> None: ...

    job = claimed("units.flaky", attempt=1, max_attempts=4)
    outcome = executor_of(offline).conclude(call_of(flaky, job), exc=Retry(countdown=5, exc=ValueError("later")))
    assert outcome.state is JobState.SCHEDULED
    assert outcome.delay == 5
    assert outcome.refund == 0
    assert outcome.error is not None
    assert outcome.error["type"] == "ValueError"  # the cause, not the Retry
    assert outcome.error["message"] == "later"


def test_conclude_retry_with_zero_countdown_is_available_now(offline: TaskPG) -> None:
    @offline.task(name="units.flaky")
    def flaky() -> None: ...

    outcome = executor_of(offline).conclude(call_of(flaky, claimed("units.flaky")), exc=Retry(countdown=0))
    assert outcome.state is JobState.AVAILABLE
    assert outcome.delay == 0
    assert outcome.error is not None
    assert outcome.error["type"] == "Retry"


def test_conclude_retry_without_countdown_uses_the_default_delay(offline: TaskPG) -> None:
    @offline.task(name="units.flaky", default_retry_delay=42)
    def flaky() -> None: ...

    outcome = executor_of(offline).conclude(call_of(flaky, claimed("units.flaky")), exc=Retry())
    assert outcome.state is JobState.SCHEDULED
    assert outcome.delay == 42


def test_conclude_retry_on_the_last_attempt_is_dead(offline: TaskPG) -> None:
    @offline.task(name="units.flaky")
    def flaky() -> None: ...

    job = claimed("units.flaky", attempt=4, max_attempts=4)
    outcome = executor_of(offline).conclude(call_of(flaky, job), exc=Retry(countdown=1, exc=OSError("gone")))
    assert outcome.state is JobState.DEAD
    assert outcome.error is not None
    assert outcome.error["type"] == "OSError"


def test_conclude_retry_max_retries_overrides_the_jobs_attempts(offline: TaskPG) -> None:
    @offline.task(name="units.flaky")
    def flaky() -> None: ...

    ex = executor_of(offline)
    second = ex.conclude(call_of(flaky, claimed("units.flaky", attempt=2, max_attempts=10)), exc=Retry(1, None, 2))
    third = ex.conclude(call_of(flaky, claimed("units.flaky", attempt=3, max_attempts=10)), exc=Retry(1, None, 2))
    assert second.state is JobState.SCHEDULED
    assert third.state is JobState.DEAD  # max_retries=2: three attempts in all


def test_conclude_autoretry_for_uses_the_tasks_backoff(offline: TaskPG) -> None:
    @offline.task(name="units.net", autoretry_for=(ConnectionError,), retry_backoff=2, retry_jitter=False)
    def net() -> None: ...

    ex = executor_of(offline)
    first = ex.conclude(call_of(net, claimed("units.net", attempt=1)), exc=ConnectionError("down"))
    third = ex.conclude(call_of(net, claimed("units.net", attempt=3)), exc=ConnectionRefusedError("refused"))
    assert (first.state, first.delay) == (JobState.SCHEDULED, 2.0)
    assert (third.state, third.delay) == (JobState.SCHEDULED, 8.0)  # a subclass is retried too
    assert third.error is not None
    assert third.error["type"] == "ConnectionRefusedError"


def test_conclude_autoretry_on_the_last_attempt_is_dead(offline: TaskPG) -> None:
    @offline.task(name="units.net", autoretry_for=(ConnectionError,))
    def net() -> None: ...

    job = claimed("units.net", attempt=4, max_attempts=4)
    outcome = executor_of(offline).conclude(call_of(net, job), exc=ConnectionError("down"))
    assert outcome.state is JobState.DEAD


def test_conclude_an_unlisted_exception_is_dead_at_once(offline: TaskPG) -> None:
    @offline.task(name="units.net", autoretry_for=(ConnectionError,))
    def net() -> None: ...

    job = claimed("units.net", attempt=1, max_attempts=10)
    outcome = executor_of(offline).conclude(call_of(net, job), exc=ZeroDivisionError("division by zero"))
    assert outcome.state is JobState.DEAD
    assert outcome.delay == 0
    assert outcome.error is not None
    assert outcome.error["type"] == "ZeroDivisionError"


@pytest.mark.parametrize(
    "exc", [TimeLimitExceeded("ran too long"), SoftTimeLimitExceeded("soft"), ChildProcessDied("killed")]
)
def test_conclude_attempt_failures_are_retried_while_attempts_remain(offline: TaskPG, exc: BaseException) -> None:
    @offline.task(name="units.slow", default_retry_delay=9)
    def slow() -> None: ...

    outcome = executor_of(offline).conclude(call_of(slow, claimed("units.slow", attempt=2, max_attempts=4)), exc=exc)
    assert outcome.state is JobState.SCHEDULED
    assert outcome.delay == 9
    assert outcome.error is not None
    assert outcome.error["type"] == type(exc).__name__


@pytest.mark.parametrize("exc", [TimeLimitExceeded("ran too long"), ChildProcessDied("killed")])
def test_conclude_attempt_failures_on_the_last_attempt_are_dead(offline: TaskPG, exc: BaseException) -> None:
    @offline.task(name="units.slow")
    def slow() -> None: ...

    outcome = executor_of(offline).conclude(call_of(slow, claimed("units.slow", attempt=4, max_attempts=4)), exc=exc)
    assert outcome.state is JobState.DEAD


# -- executor: dead / failed / deferred / handed_back ------------------------------------------------


def test_dead_records_taskpgs_own_reason(offline: TaskPG) -> None:
    job = claimed(attempt=2)
    outcome = executor_of(offline).dead(job, "PayloadDecodeError", "nope")
    assert outcome.state is JobState.DEAD
    assert outcome.error is not None
    assert outcome.error["type"] == "PayloadDecodeError"
    assert outcome.error["module"] == failures.TASKPG_MODULE
    assert (outcome.error["attempt"], outcome.error["worker"]) == (2, WORKER)


def test_failed_is_retried_while_attempts_remain_then_dead(offline: TaskPG) -> None:
    ex = executor_of(offline)
    assert ex.failed(claimed(attempt=1, max_attempts=2), "WorkerStopped", "m").state is JobState.AVAILABLE
    assert ex.failed(claimed(attempt=2, max_attempts=2), "WorkerStopped", "m").state is JobState.DEAD


def test_deferred_and_handed_back_refund_the_attempt() -> None:
    job = claimed()
    assert Executor.deferred(job, 1.5) == Outcome(job, JobState.SCHEDULED, delay=1.5, refund=1)
    assert Executor.handed_back(job) == Outcome(job, JobState.AVAILABLE, refund=1, keep_place=True)


# -- executor: prepare / adopt -----------------------------------------------------------------------


def test_prepare_of_an_unknown_task_is_dead_not_registered(offline: TaskPG) -> None:
    outcome = executor_of(offline).prepare(claimed("units.missing"))
    assert isinstance(outcome, Outcome)
    assert outcome.state is JobState.DEAD
    assert outcome.error is not None
    assert outcome.error["type"] == "NotRegistered"
    assert "'units.missing'" in outcome.error["message"]


@pytest.mark.parametrize(("args", "kwargs"), [("not json", "{}"), ("[]", "{oops"), ('{"a": 1}', "{}"), ("[]", "[1]")])
def test_prepare_of_undecodable_arguments_is_dead_payload_decode_error(offline: TaskPG, args: str, kwargs: str) -> None:
    @offline.task(name="units.add")
    def add(a: int = 0, b: int = 0) -> int:
        return a + b

    outcome = executor_of(offline).prepare(claimed("units.add", args=args, kwargs=kwargs))
    assert isinstance(outcome, Outcome)
    assert outcome.state is JobState.DEAD
    assert outcome.error is not None
    assert outcome.error["type"] == "PayloadDecodeError"


@pytest.mark.parametrize(("args", "kwargs"), [("[1]", "{}"), ("[1, 2, 3]", "{}"), ("[1, 2]", '{"c": 3}')])
def test_prepare_of_arguments_that_do_not_fit_is_dead_argument_mismatch(
    offline: TaskPG, args: str, kwargs: str
) -> None:
    @offline.task(name="units.add")
    def add(a: int, b: int) -> int:
        return a + b

    outcome = executor_of(offline).prepare(claimed("units.add", args=args, kwargs=kwargs))
    assert isinstance(outcome, Outcome)
    assert outcome.state is JobState.DEAD
    assert outcome.error is not None
    assert outcome.error["type"] == "ArgumentMismatch"
    assert outcome.error["message"].startswith("arguments do not fit units.add")


def test_prepare_of_an_oversized_payload_is_dead_payload_too_large(offline: TaskPG) -> None:
    @offline.task(name="units.echo")
    def echo(text: str) -> str:
        return text

    outcome = executor_of(offline, max_payload_bytes=50).prepare(claimed("units.echo", args=json.dumps(["x" * 60])))
    assert isinstance(outcome, Outcome)
    assert outcome.state is JobState.DEAD
    assert outcome.error is not None
    assert outcome.error["type"] == "PayloadTooLarge"
    assert "over the limit of 50" in outcome.error["message"]


def test_prepare_measures_the_payload_as_enqueue_did_not_as_postgres_prints_it(offline: TaskPG) -> None:
    @offline.task(name="units.many")
    def many(*numbers: int) -> int:
        return sum(numbers)

    spaced = "[1, 2, 3, 4, 5, 6, 7]"  # 21 characters; compact JSON '[1,2,3,4,5,6,7]' + '{}' is 17 bytes
    assert isinstance(executor_of(offline, max_payload_bytes=20).prepare(claimed("units.many", args=spaced)), Call)


def test_prepare_of_a_good_job_is_a_call_with_its_request(offline: TaskPG) -> None:
    @offline.task(name="units.add", queue="maths")
    def add(a: int, b: int) -> int:
        return a + b

    job = claimed("units.add", args="[1]", kwargs='{"b": 2}', attempt=2, max_attempts=5, queue="maths")
    call = executor_of(offline).prepare(job)
    assert isinstance(call, Call)
    assert call.job is job
    assert call.task is add
    assert call.request == Request(
        id=job.id, task="units.add", queue="maths", attempt=2, max_attempts=5, args=[1], kwargs={"b": 2}
    )
    assert call.request.retries == 1


def test_prepare_of_a_bound_task_leaves_room_for_self(offline: TaskPG) -> None:
    @offline.task(name="units.bound", bind=True)
    def bound(self: Task[Any, Any], a: int) -> int:
        return a

    assert isinstance(executor_of(offline).prepare(claimed("units.bound", args="[1]")), Call)
    mismatch = executor_of(offline).prepare(claimed("units.bound", args="[1, 2]"))
    assert isinstance(mismatch, Outcome)
    assert mismatch.error is not None
    assert mismatch.error["type"] == "ArgumentMismatch"


def test_adopt_builds_the_call_without_decoding(offline: TaskPG) -> None:
    @offline.task(name="units.add")
    def add(a: int, b: int) -> int:
        return a + b

    job = claimed("units.add", args="not json at all")
    request = Request(id=job.id, task=job.task, args=[1, 2])
    call = executor_of(offline).adopt(job, request)
    assert call == Call(job, add, request)


def test_adopt_of_an_unknown_task_is_dead_not_registered(offline: TaskPG) -> None:
    job = claimed("units.missing")
    outcome = executor_of(offline).adopt(job, Request(id=job.id))
    assert isinstance(outcome, Outcome)
    assert outcome.error is not None
    assert outcome.error["type"] == "NotRegistered"


# -- executor: running -------------------------------------------------------------------------------


def prepared(executor: Executor, job: ClaimedJob) -> Call:
    call = executor.prepare(job)
    assert isinstance(call, Call), call
    return call


def test_run_sync_calls_the_task_and_stores_its_result(offline: TaskPG) -> None:
    @offline.task(name="units.add")
    def add(a: int, b: int) -> int:
        return a + b

    ex = executor_of(offline)
    call = prepared(ex, claimed("units.add", args="[2, 3]"))
    assert not ex.is_async(call)
    outcome = ex.run_sync(call)
    assert outcome.state is JobState.SUCCEEDED
    assert outcome.result == "5"


def test_run_sync_gives_a_bound_task_its_request(offline: TaskPG) -> None:
    @offline.task(name="units.whoami", bind=True)
    def whoami(self: Task[Any, Any]) -> list[Any]:
        return [self.request.id, self.request.attempt]

    job = claimed("units.whoami", attempt=3)
    outcome = executor_of(offline).run_sync(prepared(executor_of(offline), job))
    assert outcome.result is not None
    assert json.loads(outcome.result) == [job.id, 3]
    assert whoami.request.id is None  # the request context is gone after the call


def test_run_sync_concludes_a_raised_exception(offline: TaskPG) -> None:
    @offline.task(name="units.fail")
    def fail() -> None:
        raise RuntimeError("broken")

    outcome = executor_of(offline).run_sync(prepared(executor_of(offline), claimed("units.fail")))
    assert outcome.state is JobState.DEAD
    assert outcome.error is not None
    assert (outcome.error["type"], outcome.error["message"]) == ("RuntimeError", "broken")
    assert "in fail" in outcome.error["traceback"]


def test_run_sync_concludes_a_self_retry(offline: TaskPG) -> None:
    @offline.task(name="units.again", bind=True)
    def again(self: Task[Any, Any]) -> None:
        self.retry(countdown=3, exc=ValueError("not yet"))

    outcome = executor_of(offline).run_sync(prepared(executor_of(offline), claimed("units.again")))
    assert (outcome.state, outcome.delay) == (JobState.SCHEDULED, 3)


def test_run_sync_concludes_system_exit_as_dead(offline: TaskPG) -> None:
    @offline.task(name="units.exits")
    def exits() -> None:
        sys.exit(3)

    outcome = executor_of(offline).run_sync(prepared(executor_of(offline), claimed("units.exits")))
    assert outcome.state is JobState.DEAD
    assert outcome.error is not None
    assert outcome.error["type"] == "SystemExit"


def test_run_async_awaits_the_task(offline: TaskPG) -> None:
    @offline.task(name="units.aadd")
    async def aadd(a: int, b: int) -> int:
        return a + b

    ex = executor_of(offline)
    call = prepared(ex, claimed("units.aadd", args="[2, 3]"))
    assert ex.is_async(call)
    outcome = asyncio.run(ex.run_async(call))
    assert outcome.state is JobState.SUCCEEDED
    assert outcome.result == "5"


def test_run_async_past_its_timeout_is_a_retried_time_limit(offline: TaskPG) -> None:
    @offline.task(name="units.hang", default_retry_delay=11)
    async def hang() -> None:
        await asyncio.Event().wait()  # never set: only the timeout ends it

    ex = executor_of(offline)
    outcome = asyncio.run(ex.run_async(prepared(ex, claimed("units.hang", attempt=1, max_attempts=3)), timeout=0.001))
    assert (outcome.state, outcome.delay) == (JobState.SCHEDULED, 11)
    assert outcome.error is not None
    assert outcome.error["type"] == "TimeLimitExceeded"
    assert outcome.error["module"] == "taskpg.exceptions"


def test_run_async_past_its_timeout_on_the_last_attempt_is_dead(offline: TaskPG) -> None:
    @offline.task(name="units.hang")
    async def hang() -> None:
        await asyncio.Event().wait()

    ex = executor_of(offline)
    outcome = asyncio.run(ex.run_async(prepared(ex, claimed("units.hang", attempt=3, max_attempts=3)), timeout=0.001))
    assert outcome.state is JobState.DEAD
    assert outcome.error is not None
    assert outcome.error["type"] == "TimeLimitExceeded"


def test_run_async_concludes_a_raised_exception(offline: TaskPG) -> None:
    @offline.task(name="units.afail")
    async def afail() -> None:
        raise LookupError("missing")

    ex = executor_of(offline)
    outcome = asyncio.run(ex.run_async(prepared(ex, claimed("units.afail"))))
    assert outcome.state is JobState.DEAD
    assert outcome.error is not None
    assert outcome.error["type"] == "LookupError"


def test_run_async_a_timeout_error_raised_by_the_task_is_its_own_failure(offline: TaskPG) -> None:
    @offline.task(name="units.upstream")
    async def upstream() -> None:
        raise TimeoutError("the upstream API did not answer")

    ex = executor_of(offline)
    outcome = asyncio.run(ex.run_async(prepared(ex, claimed("units.upstream", attempt=1, max_attempts=4))))
    assert outcome.error is not None
    assert outcome.error["type"] == "TimeoutError"
    assert outcome.error["message"] == "the upstream API did not answer"
    assert outcome.state is JobState.DEAD  # not in autoretry_for


# -- envelope ----------------------------------------------------------------------------------------


@pytest.fixture
def declared(offline: TaskPG) -> TaskPG:
    @offline.task(name="emails.send", queue="emails", priority=3, max_retries=2)
    def send(subject: str = "", to: str = "") -> None: ...

    return offline


def fixed_id() -> str:
    return JOB_ID


def test_decode_full_form(declared: TaskPG) -> None:
    raw = json.dumps(
        {
            "id": "6ba7b810-9dad-71d1-80b4-00c04fd430c8",
            "task": "emails.send",
            "args": [1],
            "kwargs": {"subject": "hi"},
            "queue": "bulk",
            "priority": 5,
            "eta": "2026-01-01T08:00:00+00:00",
            "max_attempts": 7,
            "unique_key": "emails.send:1",
        }
    )
    assert decode(raw, declared.tasks, 10_000) == NewJob(
        id="6ba7b810-9dad-71d1-80b4-00c04fd430c8",
        task="emails.send",
        queue="bulk",
        args="[1]",
        kwargs='{"subject":"hi"}',
        priority=5,
        max_attempts=7,
        eta=dt.datetime(2026, 1, 1, 8, tzinfo=UTC),
        countdown=0.0,
        unique_key="emails.send:1",
    )


def test_decode_takes_missing_options_from_the_task(declared: TaskPG) -> None:
    job = decode('{"task": "emails.send"}', declared.tasks, 10_000, fixed_id)
    assert job == NewJob(
        id=JOB_ID, task="emails.send", queue="emails", args="[]", kwargs="{}", priority=3, max_attempts=3
    )


def test_decode_short_form_payload_is_the_keyword_arguments(declared: TaskPG) -> None:
    job = decode(b'{"kind": "emails.send", "payload": {"subject": "hi"}}', declared.tasks, 10_000, fixed_id)
    assert isinstance(job, NewJob)
    assert (job.id, job.task, job.args, job.kwargs) == (JOB_ID, "emails.send", "[]", '{"subject":"hi"}')


def test_decode_missing_id_gets_make_id(declared: TaskPG) -> None:
    made: list[str] = []

    def make_id() -> str:
        made.append(str(uuid.uuid4()))
        return made[-1]

    job = decode('{"task": "emails.send"}', declared.tasks, 10_000, make_id)
    assert isinstance(job, NewJob)
    assert made == [job.id]


def test_decode_puts_an_id_in_canonical_form(declared: TaskPG) -> None:
    job = decode('{"id": "6BA7B810-9DAD-71D1-80B4-00C04FD430C8", "task": "emails.send"}', declared.tasks, 10_000)
    assert isinstance(job, NewJob)
    assert job.id == "6ba7b810-9dad-71d1-80b4-00c04fd430c8"


def test_decode_countdown_counts_from_enqueued_at(declared: TaskPG) -> None:
    raw = '{"task": "emails.send", "countdown": 30, "enqueued_at": "2026-01-01T07:59:59+00:00"}'
    job = decode(raw, declared.tasks, 10_000)
    assert isinstance(job, NewJob)
    assert job.eta == dt.datetime(2026, 1, 1, 8, 0, 29, tzinfo=UTC)
    assert job.countdown == 0.0


def test_decode_countdown_without_enqueued_at_stays_a_countdown(declared: TaskPG) -> None:
    job = decode('{"task": "emails.send", "countdown": 30}', declared.tasks, 10_000)
    assert isinstance(job, NewJob)
    assert (job.eta, job.countdown) == (None, 30.0)


def test_decode_accepts_a_z_suffixed_eta(declared: TaskPG) -> None:
    job = decode('{"task": "emails.send", "eta": "2026-01-01T08:00:00.000Z"}', declared.tasks, 10_000)
    assert isinstance(job, NewJob)
    assert job.eta == dt.datetime(2026, 1, 1, 8, tzinfo=UTC)


def assert_rejected(result: NewJob | Rejected, raw: str, reason: str, task: str = UNDECODABLE_TASK) -> Rejected:
    assert isinstance(result, Rejected), result
    assert reason in result.reason
    assert json.loads(result.job.args) == [raw]  # the raw text is kept
    assert result.job.kwargs == "{}"
    assert result.job.task == task
    assert result.job.max_attempts == 1
    return result


def test_decode_not_json_is_rejected(declared: TaskPG) -> None:
    rejected = assert_rejected(decode("{not json", declared.tasks, 10_000, fixed_id), "{not json", "is not JSON")
    assert rejected.job.id == JOB_ID
    assert rejected.job.queue == "default"


def test_decode_not_an_object_is_rejected(declared: TaskPG) -> None:
    assert_rejected(decode("[1, 2]", declared.tasks, 10_000), "[1, 2]", "not a JSON object")


@pytest.mark.parametrize("raw", ['{"args": [1]}', '{"task": 5}', '{"kind": null}'])
def test_decode_without_a_task_name_is_rejected(declared: TaskPG, raw: str) -> None:
    assert_rejected(decode(raw, declared.tasks, 10_000), raw, "no task name")


def test_decode_of_a_task_this_app_does_not_declare_is_an_ordinary_job(declared: TaskPG) -> None:
    raw = '{"id": "6ba7b810-9dad-71d1-80b4-00c04fd430c8", "task": "emails.gone", "queue": "bulk", "args": [1]}'
    job = decode(raw, declared.tasks, 10_000)
    assert isinstance(job, NewJob), job  # the worker that claims it decides, not the flusher
    assert (job.id, job.task, job.queue, job.args, job.max_attempts) == (
        "6ba7b810-9dad-71d1-80b4-00c04fd430c8",
        "emails.gone",
        "bulk",
        "[1]",
        4,  # the default: the flushing app knows no declaration
    )
    bad = '{"task": "emails.gone\\n"}'  # a name no task can have is still refused
    assert_rejected(decode(bad, declared.tasks, 10_000), bad, "task name")


@pytest.mark.parametrize("countdown", ["-1", str(MAX_COUNTDOWN * 2), '"soon"', "NaN", "Infinity"])
def test_decode_bad_countdown_is_rejected(declared: TaskPG, countdown: str) -> None:
    raw = f'{{"task": "emails.send", "countdown": {countdown}}}'
    assert_rejected(decode(raw, declared.tasks, 10_000), raw, "envelope is invalid", "emails.send")


@pytest.mark.parametrize(
    "timing",
    ['"eta": "2026-01-01T08:00:00"', '"countdown": 5, "enqueued_at": "2026-01-01T08:00:00"'],
)
def test_decode_naive_eta_is_rejected(declared: TaskPG, timing: str) -> None:
    raw = f'{{"task": "emails.send", {timing}}}'
    assert_rejected(decode(raw, declared.tasks, 10_000), raw, "need a time zone offset", "emails.send")


@pytest.mark.parametrize("max_attempts", ["0", "-3", "true", '"3"', "2.5", str(2**31)])
def test_decode_bad_max_attempts_is_rejected(declared: TaskPG, max_attempts: str) -> None:
    raw = f'{{"task": "emails.send", "max_attempts": {max_attempts}}}'
    assert_rejected(decode(raw, declared.tasks, 10_000), raw, "'max_attempts' must be", "emails.send")


@pytest.mark.parametrize(
    "extra",
    ['"args": {"a": 1}', '"kwargs": [1]', '"priority": 40000', '"queue": "no spaces"', '"unique_key": 5', '"id": "x"'],
)
def test_decode_other_bad_values_are_rejected(declared: TaskPG, extra: str) -> None:
    raw = f'{{"task": "emails.send", {extra}}}'
    rejected = assert_rejected(decode(raw, declared.tasks, 10_000, fixed_id), raw, "envelope is invalid", "emails.send")
    assert rejected.job.id == JOB_ID
    assert rejected.job.queue == "default"


def test_decode_holds_arguments_to_the_limit_by_their_utf8_size_as_a_direct_enqueue(declared: TaskPG) -> None:
    raw = '{"task": "emails.send", "kwargs": {"subject": "ééééé"}}'  # 5 characters, 10 bytes
    size = len("[]") + len('{"subject":"ééééé"}'.encode())  # compact JSON, as delay() measures
    assert isinstance(decode(raw, declared.tasks, size), NewJob)
    reason = f"arguments take {size} bytes as JSON"
    assert_rejected(decode(raw.encode(), declared.tasks, size - 1), raw, reason, task="emails.send")


def test_decode_does_not_parse_an_envelope_far_over_the_limit(declared: TaskPG) -> None:
    from taskpg.envelope import ENVELOPE_ROOM, SAMPLE_BYTES

    raw = json.dumps({"task": "emails.send", "args": ["é" * ENVELOPE_ROOM]}).encode()  # \u00e9 escapes: 6 bytes each
    rejected = decode(raw, declared.tasks, 100)
    assert isinstance(rejected, Rejected)
    assert rejected.reason.startswith(f"envelope takes {len(raw)} bytes, over the limit of 100 for its arguments")
    assert json.loads(rejected.job.args) == [raw[:SAMPLE_BYTES].decode()]


def test_decode_invalid_utf8_is_kept_with_its_bytes_escaped(declared: TaskPG) -> None:
    rejected = decode(b'{"task": "\xff"', declared.tasks, 10_000)  # never U+FFFD: the byte stays readable
    assert_rejected(rejected, '{"task": "\\xff"', "is not UTF-8 (invalid start byte at byte 10)")


def test_encode_round_trips_through_decode(declared: TaskPG) -> None:
    eta = dt.datetime(2026, 1, 1, 8, tzinfo=UTC)
    job = declared.tasks["emails.send"].build_job(("hi",), {"to": "ö@x"}, eta=eta, queue="bulk", priority=-2).job
    text = encode(job, "2026-01-01T07:00:00+00:00")
    assert text.encode().startswith(OWN_ID_PREFIX)
    assert decode(text, declared.tasks, 10_000) == job


def test_encode_round_trip_turns_a_countdown_into_an_eta_from_enqueued_at(declared: TaskPG) -> None:
    job = declared.tasks["emails.send"].build_job((), {"subject": "x"}, countdown=90).job
    decoded = decode(encode(job, "2026-01-01T08:00:00+00:00"), declared.tasks, 10_000)
    assert decoded == dataclasses.replace(job, eta=dt.datetime(2026, 1, 1, 8, 1, 30, tzinfo=UTC), countdown=0.0)


def test_encode_round_trip_keeps_the_unique_key(offline: TaskPG) -> None:
    @offline.task(name="units.once", unique_key="user:{user_id}")
    def once(user_id: int) -> None: ...

    job = once.build_job((7,)).job
    assert job.unique_key == "units.once:user:7"
    assert decode(encode(job), offline.tasks, 10_000) == job


def test_encode_many_stamps_one_enqueued_at(declared: TaskPG) -> None:
    task = declared.tasks["emails.send"]
    jobs = [task.build_job((str(n),)).job for n in range(3)]
    envelopes = [json.loads(text) for text in encode_many(jobs)]
    assert [e["id"] for e in envelopes] == [j.id for j in jobs]
    assert len({e["enqueued_at"] for e in envelopes}) == 1
    assert dt.datetime.fromisoformat(envelopes[0]["enqueued_at"]).tzinfo is not None


# -- rate limits -----------------------------------------------------------------------------------


class FakeRates:
    """GCRA in memory, on a clock the test moves: the RateBackend protocol, like RedisRates and PostgresRates."""

    def __init__(self) -> None:
        self.now = 0.0
        self.tat: dict[str, float] = {}
        self.asked: list[tuple[str, float]] = []

    def reserve(self, key: str, interval: float) -> RateSlot:
        self.asked.append((key, interval))
        start = max(self.tat.get(key, 0.0), self.now)
        self.tat[key] = start + interval
        return RateSlot(start - self.now, start)


def wait_of(slot: RateSlot | None) -> float:
    assert slot is not None
    return slot.wait


@pytest.mark.parametrize(
    ("rate", "window"),
    [
        (Rate(10, 1.0), 1.04),  # 2 % of 1 s is below the 0.04 s minimum
        (Rate(1, 2.0), 2.04),  # 2 % of 2 s is exactly the minimum
        (Rate(100, 60.0), 61.2),  # 2 %
        (Rate(1, 3600.0), 3672.0),
    ],
)
def test_window_seconds_adds_two_percent_and_at_least_four_hundredths(rate: Rate, window: float) -> None:
    assert window_seconds(rate) == pytest.approx(window)


def test_starts_are_spaced_by_the_window_over_n() -> None:
    assert interval_seconds(Rate(20, 1.0)) == pytest.approx(1.04 / 20)
    assert interval_seconds(Rate(20000, 60.0)) == pytest.approx(61.2 / 20000)


def test_admit_reserves_evenly_spaced_starts(offline: TaskPG) -> None:
    @offline.task(name="units.api", rate_limit="2/s")
    def api() -> None: ...

    rates = FakeRates()
    backend: RateBackend = rates
    limiter = RateLimiter(backend, {})
    waits = [wait_of(limiter.admit(api, (), {}, "default")) for _ in range(4)]
    assert waits == pytest.approx([0.0, 0.52, 1.04, 1.56])  # each call reserves the next start
    assert rates.asked[0] == ("units.api", pytest.approx(0.52))
    rates.now = 10.0  # a quiet while later: the next start is now again
    assert limiter.admit(api, (), {}, "default") == RateSlot(0.0, 10.0)


def test_any_window_of_the_period_holds_at_most_n_reserved_starts(offline: TaskPG) -> None:
    @offline.task(name="units.api", rate_limit="20/s")
    def api() -> None: ...

    rates = FakeRates()
    limiter = RateLimiter(rates, {})
    starts = [wait_of(limiter.admit(api, (), {}, "default")) for _ in range(200)]
    assert max(sum(1 for t in starts if left <= t < left + 1.0) for left in starts) == 20
    assert starts[-1] == pytest.approx(199 * 1.04 / 20)  # and the limit is delivered: 19.2 starts a second


def test_admit_without_limits_asks_nothing(offline: TaskPG) -> None:
    @offline.task(name="units.free")
    def free() -> None: ...

    rates = FakeRates()
    limiter = RateLimiter(rates, {"default": QueueOptions("default", concurrency=2)})
    assert limiter.admit(free, (), {}, "default") is None
    assert rates.asked == []


def test_admit_reserves_under_the_task_and_the_queue_and_waits_for_the_later(offline: TaskPG) -> None:
    @offline.task(name="units.api", rate_limit="10/s", queue="io")
    def api() -> None: ...

    rates = FakeRates()
    limiter = RateLimiter(rates, {"io": QueueOptions("io", rate_limit=Rate(1, 60.0))})
    assert wait_of(limiter.admit(api, (), {}, "io")) == 0.0
    assert limiter.admit(api, (), {}, "io") == RateSlot(pytest.approx(61.2), pytest.approx(61.2))  # the queue's
    assert [key for key, _ in rates.asked] == ["units.api", "queue:io", "units.api", "queue:io"]


def test_admit_renders_rate_limit_key_per_argument(offline: TaskPG) -> None:
    @offline.task(name="units.per_user", rate_limit="1/h", rate_limit_key="user:{user_id}")
    def per_user(user_id: int, note: str = "") -> None: ...

    rates = FakeRates()
    limiter = RateLimiter(rates, {})
    assert wait_of(limiter.admit(per_user, (7,), {}, "default")) == 0.0
    assert wait_of(limiter.admit(per_user, (), {"user_id": 8, "note": "x"}, "default")) == 0.0
    assert wait_of(limiter.admit(per_user, (7,), {"note": "again"}, "default")) > 0
    assert set(rates.tat) == {"units.per_user:user:7", "units.per_user:user:8"}


def test_admit_renders_a_callable_rate_limit_key(offline: TaskPG) -> None:
    @offline.task(name="units.per_host", rate_limit="5/s", rate_limit_key=lambda url: url.split("/")[2])
    def per_host(url: str) -> None: ...

    rates = FakeRates()
    RateLimiter(rates, {}).admit(per_host, ("https://example.com/a",), {}, "default")
    assert set(rates.tat) == {"units.per_host:example.com"}


def test_applies_to_needs_a_task_or_queue_rate_limit(offline: TaskPG) -> None:
    @offline.task(name="units.limited", rate_limit="1/s")
    def limited() -> None: ...

    @offline.task(name="units.free")
    def free() -> None: ...

    limiter = RateLimiter(
        FakeRates(),
        {"slow": QueueOptions("slow", rate_limit=Rate(1, 1.0)), "capped": QueueOptions("capped", concurrency=1)},
    )
    assert limiter.applies_to(limited, "default")
    assert not limiter.applies_to(free, "default")
    assert limiter.applies_to(free, "slow")
    assert limiter.applies_to(None, "slow")
    assert not limiter.applies_to(None, "default")
    assert not limiter.applies_to(free, "capped")  # a concurrency cap is applied at claim time


def test_a_start_may_be_late_by_three_quarters_of_the_margin() -> None:
    assert tolerance_seconds(Rate(20, 1.0)) == pytest.approx(0.03)
    assert tolerance_seconds(Rate(20000, 60.0)) == pytest.approx(0.9)


# On time, late by almost the whole margin (0.04 s at 20/s), and later than that.
@pytest.mark.parametrize(("late", "most"), [(0.0, 20), (0.039, 20), (0.05, 21)])
def test_starts_late_by_less_than_the_margin_keep_the_limit(late: float, most: int) -> None:
    rate = Rate(20, 1.0)
    slots = [n * interval_seconds(rate) for n in range(200)]
    # the worst case: every 21st start as late as allowed, the ones after it on time
    starts = [slot + (late if n % 21 == 0 else 0.0) for n, slot in enumerate(slots)]
    assert max(sum(1 for t in starts if left <= t < left + rate.seconds) for left in starts) == most


def limited_pool(offline: TaskPG, rates: FakeRates, queue_rate: Rate | None = None) -> Pool:
    queues = {} if queue_rate is None else {"io": QueueOptions("io", rate_limit=queue_rate)}
    setup = PoolSetup(executor_of(offline), 1, lambda outcome: None, lambda: None, RateLimiter(rates, queues))
    return Pool(setup)


def test_pool_admit_starts_a_job_whose_reserved_start_is_now_without_asking(offline: TaskPG) -> None:
    @offline.task(name="units.api", rate_limit="20/s")
    def api() -> None: ...

    rates = FakeRates()
    job = dataclasses.replace(claimed("units.api"), slot_at=time.time() - 0.01)  # 10 ms late: within the tolerance
    assert limited_pool(offline, rates).admit(call_of(api, job)) == call_of(api, job)
    assert rates.asked == []


def test_pool_admit_reserves_again_for_a_job_that_missed_its_start(offline: TaskPG) -> None:
    @offline.task(name="units.api", rate_limit="20/s")
    def api() -> None: ...

    rates = FakeRates()
    rates.tat["units.api"] = 5.0  # the next free start is 5 s away
    job = dataclasses.replace(claimed("units.api"), slot_at=time.time() - 0.3)  # 0.3 s late: it would crowd
    outcome = limited_pool(offline, rates).admit(call_of(api, job))
    assert isinstance(outcome, Outcome) and outcome.state is JobState.SCHEDULED and outcome.refund == 1
    assert outcome.slot_at == 5.0 and outcome.delay == pytest.approx(5.0 - WAIT_IN_PLACE)
    assert [key for key, _ in rates.asked] == ["units.api"]


def test_pool_admit_sends_a_job_whose_rate_limit_key_cannot_be_rendered_dead(offline: TaskPG) -> None:
    @offline.task(name="units.keyed", rate_limit="5/s", rate_limit_key="{tenant}")
    def keyed(**kwargs: Any) -> None: ...  # **kwargs: the template cannot be checked at declaration

    rates = FakeRates()
    outcome = limited_pool(offline, rates).admit(call_of(keyed, claimed("units.keyed"), other=1))
    assert isinstance(outcome, Outcome) and outcome.state is JobState.DEAD, outcome  # not retried for ever
    assert outcome.error is not None and outcome.error["type"] == "ConfigurationError"
    assert "names 'tenant', not an argument" in outcome.error["message"]
    assert rates.asked == []


def test_pool_admit_puts_a_job_back_until_just_before_a_later_start(offline: TaskPG) -> None:
    @offline.task(name="units.api", rate_limit="10/s", queue="io")
    def api() -> None: ...

    rates = FakeRates()
    pool = limited_pool(offline, rates, queue_rate=Rate(1, 60.0))
    job = claimed("units.api", queue="io")
    assert pool.admit(call_of(api, job)) == call_of(api, job)  # both limits free: it starts now
    outcome = pool.admit(call_of(api, job))
    assert isinstance(outcome, Outcome) and outcome.slot_at == pytest.approx(61.2)  # the queue's start
    assert outcome.wake_at == pytest.approx(61.2 - WAIT_IN_PLACE)


# -- rates ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("100/s", Rate(100, 1.0)),
        ("20/m", Rate(20, 60.0)),
        ("1/h", Rate(1, 3600.0)),
        ("3/d", Rate(3, 86400.0)),
        ("2/week", Rate(2, 604800.0)),
        ("5/10s", Rate(5, 10.0)),
        (" 7 / 2 min ", Rate(7, 120.0)),
        (5, Rate(5, 1.0)),
        (2.0, Rate(2, 1.0)),
        (0.5, Rate(1, 2.0)),
    ],
)
def test_parse_rate(text: str | float, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize(
    "text", ["", "abc", "5", "5/", "0/s", "-1/s", "5/0s", "5/00s", "5/x", "5/S", "1.5/s", True, 0, -2, None]
)
def test_parse_rate_refuses_bad_values_naming_the_option(text: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"^throttle="):
        parse_rate(text, "throttle")


def test_parse_rate_refuses_any_zero_multiplier() -> None:
    with pytest.raises(ConfigurationError):
        parse_rate("5/000s")


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_parse_rate_refuses_non_finite_numbers(value: float) -> None:
    with pytest.raises(ConfigurationError):
        parse_rate(value)


def test_rate_str() -> None:
    assert str(Rate(100, 1.0)) == "100/1s"
    assert str(Rate(5, 3600.0)) == "5/3600s"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("24h", 86400.0),
        ("7d", 604800.0),
        ("2w", 1209600.0),
        ("1.5h", 5400.0),
        (" 30 min ", 1800.0),
        ("0", 0.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "5x", "-5", "1e3", "h", "1.h"])
def test_parse_duration_refuses_bad_text(text: str) -> None:
    with pytest.raises(ConfigurationError, match="is not a duration"):
        parse_duration(text)


# -- retry ---------------------------------------------------------------------------------------------


def test_retry_delay_without_backoff_is_the_default_delay() -> None:
    assert RetryPolicy().delay(1) == DEFAULT_RETRY_DELAY
    assert RetryPolicy(default_delay=5).delay(9) == 5


def test_retry_delay_backoff_doubles_up_to_the_max() -> None:
    policy = RetryPolicy(backoff=1.0, backoff_max=10.0, jitter=False)
    assert [policy.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert policy.delay(0) == 1.0


def test_retry_delay_jitter_scales_the_delay_by_the_random_draw() -> None:
    policy = RetryPolicy(backoff=2.0, jitter=True)
    assert policy.delay(3, rand=lambda: 0.25) == 2.0
    assert policy.delay(3, rand=lambda: 0.0) == 0.0


def test_retry_delay_uses_a_tenacity_wait_strategy() -> None:
    policy = RetryPolicy(wait=tenacity.wait_exponential(multiplier=2, max=60))
    assert [policy.delay(n) for n in (1, 2, 3, 10)] == [2.0, 4.0, 8.0, 60.0]
    assert RetryPolicy(wait=tenacity.wait_fixed(7)).delay(4) == 7.0


def test_task_options_retry_policy_follows_celerys_knobs() -> None:
    assert TaskOptions.build(retry_backoff=True).retry.backoff == 1.0
    assert TaskOptions.build(retry_backoff=3).retry.backoff == 3.0
    assert TaskOptions.build().retry.backoff is None


# -- jobs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "attempt", "status"),
    [
        ("scheduled", 0, Status.PENDING),
        ("available", 0, Status.PENDING),
        ("available", 1, Status.RETRY),
        ("scheduled", 2, Status.RETRY),
        ("running", 1, Status.STARTED),
        ("succeeded", 1, Status.SUCCESS),
        ("dead", 3, Status.FAILURE),
        ("cancelled", 0, Status.REVOKED),
    ],
)
def test_status_of(state: str, attempt: int, status: Status) -> None:
    assert status_of(state, attempt) is status


def test_status_of_an_unknown_state_is_an_error() -> None:
    with pytest.raises(ValueError):
        status_of("lost", 0)


def uuid_of(job_id: str) -> uuid.UUID:
    value = uuid.UUID(job_id)
    assert str(value) == job_id  # canonical form
    assert value.version == 7
    assert value.variant == uuid.RFC_4122
    return value


def at_millis(monkeypatch: pytest.MonkeyPatch, millis: int) -> None:
    monkeypatch.setattr("taskpg.job.time", types.SimpleNamespace(time_ns=lambda: millis * 1_000_000 + 123))


def test_new_job_id_is_a_uuid7_carrying_the_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    at_millis(monkeypatch, 1_767_254_400_000)
    value = uuid_of(new_job_id())
    assert value.int >> 80 == 1_767_254_400_000


def test_new_job_ids_are_unique() -> None:
    ids = [new_job_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for job_id in ids[:100]:
        uuid_of(job_id)


def test_new_job_ids_of_a_later_millisecond_sort_after(monkeypatch: pytest.MonkeyPatch) -> None:
    at_millis(monkeypatch, 1_767_254_400_000)
    earlier = [new_job_id() for _ in range(50)]
    at_millis(monkeypatch, 1_767_254_400_001)
    later = [new_job_id() for _ in range(50)]
    assert max(earlier) < min(later)
    assert max(uuid.UUID(i) for i in earlier) < min(uuid.UUID(i) for i in later)


def test_job_id_sequence_sorts_in_the_order_made_and_is_unique(monkeypatch: pytest.MonkeyPatch) -> None:
    at_millis(monkeypatch, 1_767_254_400_000)
    sequence = job_id_sequence()
    ids = [next(sequence) for _ in range(5_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    values = [uuid_of(job_id) for job_id in ids]
    assert all(v.int >> 80 == 1_767_254_400_000 for v in values)
    assert [v.int - values[0].int for v in values[:3]] == [0, 1, 2]


def test_job_id_sequences_of_a_later_millisecond_sort_after(monkeypatch: pytest.MonkeyPatch) -> None:
    at_millis(monkeypatch, 1_767_254_400_000)
    first = job_id_sequence()
    earlier = [next(first) for _ in range(10)]
    at_millis(monkeypatch, 1_767_254_400_001)
    later = next(job_id_sequence())
    assert max(earlier) < later
    assert new_job_id() > max(earlier)


@pytest.mark.parametrize(
    "given",
    [
        "6ba7b810-9dad-71d1-80b4-00c04fd430c8",
        "6BA7B810-9DAD-71D1-80B4-00C04FD430C8",
        "{6ba7b810-9dad-71d1-80b4-00c04fd430c8}",
        "6ba7b8109dad71d180b400c04fd430c8",
        "urn:uuid:6ba7b810-9dad-71d1-80b4-00c04fd430c8",
    ],
)
def test_validate_job_id_gives_the_canonical_form(given: str) -> None:
    assert validate_job_id(given) == "6ba7b810-9dad-71d1-80b4-00c04fd430c8"


@pytest.mark.parametrize("given", ["", "nope", "6ba7b810-9dad-71d1-80b4", "1'; DROP TABLE jobs; --", "12"])
def test_validate_job_id_refuses_what_is_not_a_uuid(given: str) -> None:
    with pytest.raises(ConfigurationError, match="is not a taskpg job id"):
        validate_job_id(given)


def test_job_state_prints_as_its_value() -> None:
    assert str(JobState.DEAD) == "dead"
    assert f"{JobState.SCHEDULED}" == "scheduled"
    assert f"[{JobState.DEAD:>6}]" == "[  dead]"
    assert "state = '{}'".format(JobState.RUNNING) == "state = 'running'"  # noqa: UP032
    assert JobState("available") is JobState.AVAILABLE
    assert JobState.SUCCEEDED == "succeeded"


def test_unfinished_and_finished_states_partition_job_states() -> None:
    unfinished = set(UNFINISHED_STATES)
    assert unfinished.isdisjoint(FINISHED_STATES)
    assert unfinished | FINISHED_STATES == set(JobState)


# -- guards --------------------------------------------------------------------------------------------


def signup(user_id: int, region: str = "eu", **extra: Any) -> None: ...


def test_render_key_formats_the_bound_arguments_with_defaults() -> None:
    assert render_key("{region}:{user_id}", "t", signup, False, (7,), {}, "unique_key") == "eu:7"
    assert render_key("{region}:{user_id}", "t", signup, False, (), {"user_id": 8, "region": "us"}, "o") == "us:8"


def test_render_key_supports_indexing_and_attributes() -> None:
    def order(customer: dict[str, Any], when: dt.date) -> None: ...

    key = render_key("{customer[id]}:{when.year}", "t", order, False, ({"id": 3}, dt.date(2026, 5, 1)), {}, "o")
    assert key == "3:2026"


def test_render_key_of_a_bound_task_skips_self() -> None:
    def bound(self: Any, user_id: int) -> None: ...

    assert render_key("u{user_id}", "t", bound, True, (5,), {}, "throttle_key") == "u5"


def test_render_key_calls_a_callable_with_the_arguments() -> None:
    assert render_key(lambda user_id, region="eu": f"{region}/{user_id}", "t", signup, False, (1,), {}, "o") == "eu/1"


def test_render_key_of_arguments_that_do_not_fit_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="arguments do not fit its signature"):
        render_key("{user_id}", "t", signup, False, (), {}, "unique_key")


@pytest.mark.parametrize("template", ["{missing}", "{0}", "{user_id.nope}"])
def test_render_key_naming_no_argument_is_a_configuration_error(template: str) -> None:
    def plain(user_id: int) -> None: ...

    with pytest.raises(ConfigurationError, match=r"^task 't': unique_key="):
        render_key(template, "t", plain, False, (1,), {}, "unique_key")


def test_check_key_templates_refuses_a_name_that_is_not_an_argument() -> None:
    def plain(user_id: int) -> None: ...

    check_key_templates("t", plain, TaskOptions.build(unique_key="u:{user_id}"))
    with pytest.raises(ConfigurationError, match=r"throttle_key='u:\{uid\}' names 'uid'.*\(user_id\)"):
        check_key_templates("t", plain, TaskOptions.build(throttle_key="u:{uid}", throttle="1/h"))


def test_check_key_templates_of_a_bound_task_does_not_count_self() -> None:
    def bound(self: Any, user_id: int) -> None: ...

    with pytest.raises(ConfigurationError, match="names 'self'"):
        check_key_templates("t", bound, TaskOptions.build(bind=True, unique_key="{self}"))


def test_check_key_templates_accepts_anything_with_var_keywords() -> None:
    check_key_templates("t", signup, TaskOptions.build(unique_key="{anything}"))


def test_registering_a_task_checks_its_key_templates(offline: TaskPG) -> None:
    with pytest.raises(ConfigurationError, match="names 'nope'"):

        @offline.task(name="units.bad", rate_limit="1/s", rate_limit_key="{nope}")
        def bad(user_id: int) -> None: ...

    assert "units.bad" not in offline.tasks


def test_unique_key_for_without_unique_key_is_none() -> None:
    assert unique_key_for("t", signup, TaskOptions.build(), (1,), {}) is None


def test_unique_key_for_true_hashes_the_arguments_ignoring_keyword_order() -> None:
    options = TaskOptions.build(unique_key=True)
    key = unique_key_for("t", signup, options, (1,), {"a": 1, "b": 2})
    assert key is not None
    assert re.fullmatch(r"t:[0-9a-f]{32}", key)
    assert unique_key_for("t", signup, options, [1], {"b": 2, "a": 1}) == key
    assert unique_key_for("t", signup, options, (2,), {"a": 1, "b": 2}) != key
    assert unique_key_for("other", signup, options, (1,), {"a": 1, "b": 2}) != key


def test_unique_key_for_a_template_is_prefixed_by_the_task() -> None:
    assert unique_key_for("t", signup, TaskOptions.build(unique_key="u:{user_id}"), (9,), {}) == "t:u:9"


def new_job(task: str = "t") -> NewJob:
    return NewJob(id=JOB_ID, task=task, queue="default", args="[]", kwargs="{}", priority=0, max_attempts=1)


def test_plan_without_checks_has_no_guard() -> None:
    job = new_job()
    planned = plan(job, signup, TaskOptions.build(), (1,), {})
    assert planned.job is job
    assert planned.guard is None
    assert planned.dedupe_key is None


def test_plan_puts_an_unfinished_unique_key_on_the_job() -> None:
    planned = plan(new_job(), signup, TaskOptions.build(unique_key="u:{user_id}"), (4,), {})
    assert planned.job.unique_key == "t:u:4"
    assert planned.guard is None
    assert planned.dedupe_key == "t:u:4"


def test_plan_makes_a_unique_for_key_a_guard() -> None:
    planned = plan(new_job(), signup, TaskOptions.build(unique_key="u:{user_id}", unique_for=60), (4,), {})
    assert planned.job.unique_key is None
    assert planned.guard == Guard("t", unique_for_key="t:u:4", unique_for=60.0)
    assert planned.dedupe_key == "t:u:4"


@pytest.mark.parametrize(("mode", "defer"), [("drop", False), ("defer", True)])
def test_plan_makes_a_throttle_a_guard(mode: str, defer: bool) -> None:
    options = TaskOptions.build(throttle_key="u:{user_id}", throttle="2/h", throttle_mode=mode)
    planned = plan(new_job(), signup, options, (), {"user_id": 3})
    assert planned.guard == Guard("t", throttle=Throttle("u:3", Rate(2, 3600.0), defer))
    assert planned.job.unique_key is None
    assert planned.dedupe_key is None


# -- outcomes_json ---------------------------------------------------------------------------------


def test_outcomes_json_of_a_success_carries_the_result() -> None:
    job = claimed()
    items = json.loads(outcomes_json([Outcome(job, JobState.SUCCEEDED, result='{"a":[1,"é"]}')]))
    assert items == [{"id": job.id, "lease": job.lease, "state": "succeeded", "result": {"a": [1, "é"]}}]


def test_outcomes_json_leaves_default_keys_out() -> None:
    job = claimed()
    (item,) = json.loads(outcomes_json([Outcome(job, JobState.AVAILABLE)]))
    assert item == {"id": job.id, "lease": job.lease, "state": "available"}


def test_outcomes_json_keeps_a_null_result() -> None:
    (item,) = json.loads(outcomes_json([Outcome(claimed(), JobState.SUCCEEDED, result="null")]))
    assert "result" in item
    assert item["result"] is None


def test_outcomes_json_of_a_snooze_and_a_failure() -> None:
    snoozed, failed = claimed(), claimed()
    error = failures.record('Bad"Type', 'quote " backslash \\ nul \x00 é', 2, WORKER)
    items = json.loads(
        outcomes_json(
            [
                Outcome(snoozed, JobState.SCHEDULED, delay=5, refund=1, snoozed=1),
                Outcome(failed, JobState.SCHEDULED, delay=0.25, error=error),
            ]
        )
    )
    assert items == [
        {"id": snoozed.id, "lease": snoozed.lease, "state": "scheduled", "delay": 5.0, "refund": 1, "snoozed": 1},
        {"id": failed.id, "lease": failed.lease, "state": "scheduled", "error": error, "delay": 0.25},
    ]


def test_outcomes_json_of_no_outcomes_is_an_empty_array() -> None:
    assert outcomes_json([]) == "[]"


# -- schema ------------------------------------------------------------------------------------------


def quoted_states(clause: str) -> list[str]:
    return re.findall(r"'([a-z]+)'", clause)


@pytest.fixture
def jobs_table() -> Any:
    metadata = build_metadata("units_schema")
    return metadata.tables["units_schema.jobs"]


def index_where(table: Any, name: str) -> str:
    (index,) = [i for i in table.indexes if i.name == name]
    return str(index.dialect_options["postgresql"]["where"])


def test_build_metadata_puts_every_table_in_the_schema() -> None:
    metadata = build_metadata("units_schema")
    assert set(metadata.tables) == {
        f"units_schema.{name}"
        for name in (
            "jobs",
            "workers",
            "periodic_ticks",
            "throttle_windows",
            "unique_locks",
            "rate_limits",
            "duplicates",
            "buffer_losses",
            "queue_pauses",
            "chords",
        )
    }


def test_state_check_constraint_lists_every_job_state_in_order(jobs_table: Any) -> None:
    (check,) = [c for c in jobs_table.constraints if c.name == "jobs_state_check"]
    assert str(check.sqltext) == "state IN ({})".format(", ".join(f"'{s.value}'" for s in JobState))
    assert quoted_states(str(check.sqltext)) == [state.value for state in JobState]


@pytest.mark.parametrize(
    ("index", "state"),
    [
        ("jobs_claim_idx", JobState.AVAILABLE),
        ("jobs_scheduled_idx", JobState.SCHEDULED),
        ("jobs_running_idx", JobState.RUNNING),
    ],
)
def test_single_state_partial_indexes_come_from_job_state(jobs_table: Any, index: str, state: JobState) -> None:
    assert index_where(jobs_table, index) == f"state = '{state.value}'"


def test_unique_index_holds_keys_of_unfinished_jobs_only(jobs_table: Any) -> None:
    where = index_where(jobs_table, "jobs_unique_active_idx")
    assert where.startswith("unique_key IS NOT NULL AND state IN (")
    assert quoted_states(where) == [state.value for state in UNFINISHED_STATES]
    (index,) = [i for i in jobs_table.indexes if i.name == "jobs_unique_active_idx"]
    assert index.unique


def test_finished_index_covers_exactly_the_finished_states(jobs_table: Any) -> None:
    states = quoted_states(index_where(jobs_table, "jobs_finished_idx"))
    assert {JobState(s) for s in states} == FINISHED_STATES
    assert states == [s.value for s in JobState if s in FINISHED_STATES]  # in JobState's order


@pytest.mark.parametrize("name", ["Bad", "1abc", "a-b", "", "a" * 41, 'x"; drop'])
def test_schema_names_are_allow_listed(name: str) -> None:
    with pytest.raises(ConfigurationError, match="is not allowed"):
        build_metadata(name)


def test_schema_name_of_forty_characters_is_allowed() -> None:
    assert validate_schema_name("a" * 40) == "a" * 40
    assert validate_schema_name("_tenant_7") == "_tenant_7"


@pytest.mark.parametrize("seconds", [float("inf"), float("nan"), -1.0])
def test_snooze_and_retry_refuse_waits_that_are_not_finite_seconds(seconds: float) -> None:
    # An infinite or NaN delay would make the outcome batch invalid JSON for every job in it.
    with pytest.raises(ValueError, match="finite"):
        Snooze(seconds)
    with pytest.raises(ValueError, match="finite"):
        Retry(countdown=seconds)


@pytest.mark.parametrize("bad", ["default\n", "default\r\n", "\ndefault", "de fault"])
def test_names_with_a_line_break_are_refused_everywhere(offline: TaskPG, bad: str) -> None:
    """A "$"-anchored pattern lets a trailing newline through: a job on queue "default\\n" would wait for ever."""

    @offline.task(name="units.named")
    def named() -> None: ...

    with pytest.raises(ConfigurationError, match="queue="):
        named.apply_async(queue=bad)
    with pytest.raises(ConfigurationError, match="queue="):
        offline.queue(bad, concurrency=1)
    with pytest.raises(ConfigurationError, match="task name"):
        offline.task(name=f"units.{bad}")(lambda: None)
    with pytest.raises(ConfigurationError):
        validate_schema_name(bad.replace("default", "taskpg"))


def test_a_full_notify_queue_is_the_servers_limit_not_a_bad_value() -> None:
    """Postgres raises both as SQLSTATE 54000; only the value's refusal may send a batch down the split path."""
    import psycopg

    from taskpg.connections import refuses_value

    assert refuses_value(psycopg.errors.ProgramLimitExceeded("index row size 3000 exceeds btree version 4 maximum"))
    assert not refuses_value(psycopg.errors.ProgramLimitExceeded("too many notifications in the NOTIFY queue"))


def test_decode_keeps_an_envelopes_headers_and_refuses_bad_ones(declared: TaskPG) -> None:
    good = decode('{"task": "emails.send", "headers": {"traceparent": "00-abc-def-01"}}', declared.tasks, 10_000)
    assert isinstance(good, NewJob) and json.loads(good.headers or "") == {"traceparent": "00-abc-def-01"}
    for headers in ('["not", "an", "object"]', json.dumps({"big": "x" * 9000})):
        bad = decode(f'{{"task": "emails.send", "headers": {headers}}}', declared.tasks, 100_000)
        assert isinstance(bad, Rejected) and "'headers'" in bad.reason


def test_encode_carries_headers_through_decode(declared: TaskPG) -> None:
    job = dataclasses.replace(declared.tasks["emails.send"].build_job(("hi",)).job, headers='{"k":"v"}')
    decoded = decode(encode(job), declared.tasks, 10_000)
    assert isinstance(decoded, NewJob) and decoded.headers == '{"k":"v"}'


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://app:s3cret@db/app", "postgresql://app:***@db/app"),
        ("postgresql://app:p@ss:w/rd@db:5432/app?sslmode=require", "postgresql://app:***@db:5432/app?sslmode=require"),
        ("postgresql://app@db/app", "postgresql://app@db/app"),
        (
            "postgresql://db/app?user=app&password=secret&sslmode=require",
            "postgresql://db/app?user=app&password=***&sslmode=require",
        ),
        ("host=db password='my secret' dbname=app", "host=db password=*** dbname=app"),
        ("host=db password=plain dbname=app", "host=db password=*** dbname=app"),
        ("host=db password='it\\'s' dbname=app", "host=db password=*** dbname=app"),
        ("postgresql+psycopg://u:x@h/d", "postgresql+psycopg://u:***@h/d"),
    ],
)
def test_redact_hides_every_form_of_password(dsn: str, shown: str) -> None:
    from taskpg.dsn import redact

    assert redact(dsn) == shown
    assert all(
        secret not in redact(dsn) for secret in ("s3cret", "p@ss", "w/rd", "secret", "my secret", "plain", "it\\'s")
    )


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app:s3cret@db/app",
        "postgresql://app:p%40ss%3Aw@db:5432/app",
        "postgresql://db/app?user=app&password=secret&sslmode=require",
        "host=db password='my secret' dbname=app",
        "host=db password = 'spaced out' dbname=app",
        "host=db password='it\\'s' dbname=app",
        "host=db password='back\\\\slash' dbname=app",
        "password=first host=db",
        "host=db dbname=app password=last",
    ],
)
def test_redact_hides_the_password_psycopg_reads(dsn: str) -> None:
    """Cross-checked with libpq's own parser (psycopg.conninfo): whatever password it would send is not shown."""
    from psycopg.conninfo import conninfo_to_dict

    from taskpg.dsn import redact

    password = str(conninfo_to_dict(dsn)["password"])
    assert password and password not in redact(dsn), (password, redact(dsn))
    assert "***" in redact(dsn)
