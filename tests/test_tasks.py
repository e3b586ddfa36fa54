"""docs/tasks.md: declaring tasks: names, options validated at decoration time, inline calls."""

from __future__ import annotations

from datetime import timedelta

import pytest
import tenacity

from taskpg import ConfigurationError, Retry, Snooze, TaskPG
from taskpg.options import UNLIMITED_ATTEMPTS


@pytest.fixture
def bare_app() -> TaskPG:
    # No database is touched while declaring tasks.
    return TaskPG("postgresql://nobody@127.0.0.1:1/none", schema="unused")


def test_default_name_is_module_and_qualname(bare_app: TaskPG) -> None:
    @bare_app.task
    def send(x: int) -> int:
        return x

    assert send.name == f"{__name__}.test_default_name_is_module_and_qualname.<locals>.send"
    assert bare_app.tasks[send.name] is send
    assert send.options.queue == "default"


def test_explicit_name_and_options(bare_app: TaskPG) -> None:
    @bare_app.task(
        name="emails.send",
        queue="emails",
        priority=5,
        max_retries=7,
        retry_backoff=2,
        retry_jitter=False,
        autoretry_for=(KeyError,),
        time_limit=10,
        soft_time_limit=5,
        throttle_key="user:{user_id}",
        throttle="1/h",
        rate_limit="100/m",
        cron="*/5 * * * *",
        timezone="Europe/Madrid",
        dead_letter="emails_dead",
        bind=True,
        ignore_result=True,
    )
    def send(self: object, user_id: int) -> None:
        return None

    opts = send.options
    assert (opts.queue, opts.priority, opts.max_attempts) == ("emails", 5, 8)
    assert opts.throttle is not None and (opts.throttle.count, opts.throttle.seconds) == (1, 3600.0)
    assert opts.rate_limit is not None and (opts.rate_limit.count, opts.rate_limit.seconds) == (100, 60.0)
    assert opts.autoretry_for == (KeyError,)
    assert opts.retry.delay(3) == 8.0  # base 2 s doubled twice, no jitter


def test_duplicate_name_is_an_error(bare_app: TaskPG) -> None:
    bare_app.task(name="same")(lambda: None)
    with pytest.raises(ConfigurationError, match="already registered"):
        bare_app.task(name="same")(lambda: None)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"queue": "bad queue!"}, "queue="),
        ({"queue": ""}, "queue="),
        ({"priority": "high"}, "priority="),
        ({"priority": 10**6}, "priority="),
        ({"max_retries": -1}, "max_retries="),
        ({"autoretry_for": ("ValueError",)}, "autoretry_for="),
        ({"retry_backoff": -3}, "retry_backoff="),
        ({"time_limit": 0}, "time_limit="),
        ({"soft_time_limit": 10, "time_limit": 5}, "soft_time_limit"),
        ({"throttle": "1/h"}, "throttle_key= and throttle="),
        ({"throttle_key": "k", "throttle": "often"}, "throttle="),
        ({"rate_limit": "100/fortnight"}, "rate_limit="),
        ({"rate_limit_key": "t:{tenant}"}, "rate_limit_key= needs rate_limit="),
        ({"cron": "61 * * * *"}, "cron="),
        ({"cron": "* * * * *", "every": 5}, "either cron= or every="),
        ({"timezone": "Mars/Olympus"}, "timezone="),
        ({"dead_letter": "no spaces"}, "dead_letter="),
        ({"bind": "yes"}, "bind="),
        ({"via": "carrier-pigeon"}, "via="),
        ({"retries": 3}, "unknown task option"),
    ],
)
def test_bad_option_fails_at_decoration(bare_app: TaskPG, options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        bare_app.task(**options)


def test_every_accepts_timedelta_and_max_retries_none_is_unlimited(bare_app: TaskPG) -> None:
    @bare_app.task(every=timedelta(minutes=2), max_retries=None)
    def tick() -> None:
        return None

    assert tick.options.every == 120.0
    assert tick.options.max_attempts == UNLIMITED_ATTEMPTS


def test_retry_policy_accepts_tenacity_wait(bare_app: TaskPG) -> None:
    @bare_app.task(retry_policy=tenacity.wait_exponential(multiplier=1, max=30))
    def flaky() -> None:
        return None

    assert [flaky.options.retry.delay(n) for n in (1, 2, 3, 10)] == [1.0, 2.0, 4.0, 30.0]


def test_calling_the_task_runs_inline(bare_app: TaskPG) -> None:
    @bare_app.task
    def add(a: int, b: int) -> int:
        return a + b

    @bare_app.task(bind=True)
    def whoami(self: object) -> object:
        return self

    assert add(2, 3) == 5
    assert whoami() is whoami
    assert whoami.request.id is None


def test_retry_and_snooze_raise_control_exceptions(bare_app: TaskPG) -> None:
    @bare_app.task(bind=True)
    def job(self: object) -> None:
        return None

    with pytest.raises(Retry) as retry:
        job.retry(countdown=5, exc=ValueError("x"))
    assert retry.value.countdown == 5 and isinstance(retry.value.exc, ValueError)
    with pytest.raises(Snooze) as snooze:
        job.snooze(30)
    assert snooze.value.seconds == 30.0


def test_unknown_task_lookup_raises_not_registered(bare_app: TaskPG) -> None:
    from taskpg import NotRegistered

    with pytest.raises(NotRegistered, match="nope"):
        bare_app.tasks["nope"]
