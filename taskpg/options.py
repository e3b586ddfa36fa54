"""Task options: every ``@app.task(...)`` keyword, validated when the task is declared."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from .exceptions import ConfigurationError
from .periodic import DEFAULT_CATCH_UP, validate_catch_up, validate_cron, validate_timezone
from .rates import Rate, parse_rate
from .retry import DEFAULT_BACKOFF_MAX, DEFAULT_RETRY_DELAY, RetryPolicy

if TYPE_CHECKING:
    from collections.abc import Callable

QUEUE_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")  # fullmatch: "$" would let a trailing "\n" in
TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:\-<>]{0,254}")
UNLIMITED_ATTEMPTS = 2**31 - 1
VIA_CHOICES = ("db", "buffer")
THROTTLE_MODES = ("drop", "defer")


def validate_queue_name(name: Any, option: str = "queue") -> str:
    """Queue names are data (never SQL text), but keep them to a safe, printable alphabet."""
    if not isinstance(name, str) or not QUEUE_NAME.fullmatch(name):
        raise ConfigurationError(f"{option}={name!r}: use 1-64 characters of letters, digits and _ . : -")
    return name


def validate_task_name(name: Any) -> str:
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise ConfigurationError(
            f"task name {name!r}: use up to 255 letters, digits and _ . : - < >, starting with a letter or _"
        )
    return name


#: The most UTF-8 bytes a unique, throttle or rate-limit key may take as stored (``<task>:<key>`` for
#: unique and rate-limit keys): keys are indexed, and Postgres refuses an index entry over ~2.7 kB.
MAX_KEY_BYTES = 1024


def validate_key(key: str, option: str) -> str:
    """A rendered key Postgres can store and index: no NUL, UTF-8, at most MAX_KEY_BYTES."""
    try:
        size = len(key.encode())
    except UnicodeEncodeError:
        raise ConfigurationError(f"{option}: the key holds a lone surrogate, which is not UTF-8") from None
    if "\x00" in key:
        raise ConfigurationError(f"{option}: the key holds a NUL character, which Postgres cannot store")
    if size > MAX_KEY_BYTES:
        raise ConfigurationError(
            f"{option}: the key takes {size} bytes, over the limit of {MAX_KEY_BYTES}; "
            "hash long values (a callable key, or unique_key=True)"
        )
    return key


def validate_priority(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -32768 <= value <= 32767:
        raise ConfigurationError(f"priority={value!r}: expected an integer from -32768 to 32767 (higher runs first)")
    return value


def _positive_number(name: str, value: Any, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigurationError(f"{name}={value!r}: expected a positive number of seconds")
    return float(value)


def _key_template(name: str, value: Any) -> str | Callable[..., str] | None:
    if value is None or (isinstance(value, str) and value):
        return value
    if callable(value):
        template: Callable[..., str] = value
        return template
    raise ConfigurationError(f"{name}={value!r}: expected a format string such as 'user:{{user_id}}' or a callable")


@dataclass(frozen=True)
class TaskOptions:
    """What a task declares. Defaults follow Celery where Celery has the option."""

    queue: str = "default"
    priority: int = 0
    max_retries: int | None = 3
    autoretry_for: tuple[type[BaseException], ...] = ()
    retry_backoff: bool | float = False
    retry_backoff_max: float = DEFAULT_BACKOFF_MAX
    retry_jitter: bool = True
    default_retry_delay: float = DEFAULT_RETRY_DELAY
    retry_policy: Callable[[Any], float] | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    throttle_key: str | Callable[..., str] | None = None
    throttle: Rate | None = None
    throttle_mode: str = "drop"
    rate_limit: Rate | None = None
    rate_limit_key: str | Callable[..., str] | None = None
    unique_key: Literal[True] | str | Callable[..., str] | None = None
    unique_for: float | None = None
    cron: str | None = None
    every: float | None = None
    timezone: str | None = None
    catch_up: str = DEFAULT_CATCH_UP
    dead_letter: str | None = None
    bind: bool = False
    ignore_result: bool = False
    via: str | None = None
    max_snoozes: int = 100

    @property
    def max_attempts(self) -> int:
        """Attempts in all: the first run plus ``max_retries`` (None = no limit)."""
        return UNLIMITED_ATTEMPTS if self.max_retries is None else self.max_retries + 1

    @property
    def retry(self) -> RetryPolicy:
        backoff: float | None
        if self.retry_backoff is True:
            backoff = 1.0
        elif self.retry_backoff is False:
            backoff = None
        else:
            backoff = float(self.retry_backoff)
        return RetryPolicy(
            backoff=backoff,
            backoff_max=self.retry_backoff_max,
            jitter=self.retry_jitter,
            default_delay=self.default_retry_delay,
            wait=self.retry_policy,
        )

    @classmethod
    def build(cls, default_queue: str = "default", **raw: Any) -> TaskOptions:
        """Validate ``@app.task`` keywords; a bad value raises ConfigurationError naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigurationError(f"unknown task option(s): {', '.join(unknown)}")
        opts: dict[str, Any] = {**_DEFAULTS, "queue": default_queue, **raw}
        opts["queue"] = validate_queue_name(opts["queue"])
        opts["priority"] = validate_priority(opts["priority"])
        _check_retry_options(opts)
        _check_limits(opts)
        _check_keys_and_rates(opts)
        _check_schedule(opts)
        dead_letter = opts["dead_letter"]
        if dead_letter is not None and not (
            isinstance(dead_letter, str) and (QUEUE_NAME.fullmatch(dead_letter) or TASK_NAME.fullmatch(dead_letter))
        ):
            raise ConfigurationError(f"dead_letter={dead_letter!r}: expected a queue name or a task name")
        for flag in ("bind", "ignore_result", "retry_jitter"):
            if not isinstance(opts[flag], bool):
                raise ConfigurationError(f"{flag}={opts[flag]!r}: expected True or False")
        if opts["via"] is not None and opts["via"] not in VIA_CHOICES:
            raise ConfigurationError(f"via={opts['via']!r}: expected one of {VIA_CHOICES}")
        return cls(**opts)


#: Every option's declared default, read from the dataclass (so each default is stated once).
_DEFAULTS = {f.name: f.default for f in fields(TaskOptions)}


def _check_retry_options(opts: dict[str, Any]) -> None:
    max_retries = opts["max_retries"]
    if max_retries is not None and (
        isinstance(max_retries, bool) or not isinstance(max_retries, int) or not 0 <= max_retries < 2**31 - 2
    ):
        raise ConfigurationError(f"max_retries={max_retries!r}: expected an integer >= 0, or None for no limit")
    autoretry = opts["autoretry_for"]
    if isinstance(autoretry, type):
        autoretry = (autoretry,)
    if not isinstance(autoretry, (tuple, list)) or not all(
        isinstance(exc, type) and issubclass(exc, BaseException) for exc in autoretry
    ):
        raise ConfigurationError(f"autoretry_for={autoretry!r}: expected a tuple of exception classes")
    opts["autoretry_for"] = tuple(autoretry)
    backoff = opts["retry_backoff"]
    if not isinstance(backoff, bool):
        _positive_number("retry_backoff", backoff, allow_none=False)
    for name in ("retry_backoff_max", "default_retry_delay"):
        if opts[name] != 0:
            _positive_number(name, opts[name], allow_none=False)
        opts[name] = float(opts[name])
    policy = opts["retry_policy"]
    if policy is not None and not callable(policy):
        raise ConfigurationError(f"retry_policy={policy!r}: expected a tenacity wait strategy (a callable)")


def _check_limits(opts: dict[str, Any]) -> None:
    soft = _positive_number("soft_time_limit", opts["soft_time_limit"])
    hard = _positive_number("time_limit", opts["time_limit"])
    if soft is not None and hard is not None and soft >= hard:
        raise ConfigurationError(f"soft_time_limit={soft} must be below time_limit={hard}")
    max_snoozes = opts["max_snoozes"]
    if isinstance(max_snoozes, bool) or not isinstance(max_snoozes, int) or max_snoozes < 0:
        raise ConfigurationError(f"max_snoozes={max_snoozes!r}: expected an integer >= 0")


def _check_keys_and_rates(opts: dict[str, Any]) -> None:
    for name in ("throttle_key", "rate_limit_key"):
        opts[name] = _key_template(name, opts[name])
    if (opts["throttle_key"] is None) != (opts["throttle"] is None):
        raise ConfigurationError(
            "throttle_key= and throttle= go together (e.g. throttle_key='user:{user_id}', throttle='1/h')"
        )
    if opts["throttle"] is not None:
        opts["throttle"] = parse_rate(opts["throttle"], "throttle")
    if opts["rate_limit"] is not None:
        opts["rate_limit"] = parse_rate(opts["rate_limit"], "rate_limit")
    if opts["rate_limit_key"] is not None and opts["rate_limit"] is None:
        raise ConfigurationError("rate_limit_key= needs rate_limit= (e.g. rate_limit='100/s')")
    if opts["throttle_mode"] not in THROTTLE_MODES:
        raise ConfigurationError(f"throttle_mode={opts['throttle_mode']!r}: expected one of {THROTTLE_MODES}")
    unique = opts["unique_key"]
    if unique is False:
        opts["unique_key"] = None
    elif unique is not None and unique is not True:
        opts["unique_key"] = _key_template("unique_key", unique)
    opts["unique_for"] = _positive_number("unique_for", opts["unique_for"])


def _check_schedule(opts: dict[str, Any]) -> None:
    if opts["cron"] is not None:
        validate_cron(opts["cron"])
    every = opts["every"]
    if isinstance(every, timedelta):
        every = every.total_seconds()
    opts["every"] = _positive_number("every", every)
    if opts["cron"] is not None and opts["every"] is not None:
        raise ConfigurationError("give either cron= or every=, not both")
    validate_catch_up(opts["catch_up"])
    if opts["timezone"] is not None:
        validate_timezone(opts["timezone"])
