"""Periodic schedules and their tick arithmetic: pure functions of a schedule and a clock.

Cron expressions are read by croniter in the schedule's time zone, so daylight-saving changes
behave as croniter documents (a time skipped by the spring change fires at the next valid time; a
time repeated by the autumn change fires for each occurrence). ``every`` schedules tick on
multiples of their period since the Unix epoch, so every beat process agrees on the tick times.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

CATCH_UP_POLICIES = ("latest", "skip", "all")
DEFAULT_CATCH_UP = "latest"
DEFAULT_CATCH_UP_LIMIT = 100
DEFAULT_TIMEZONE = "UTC"
#: Under ``catch_up="skip"`` a tick later than this is a missed tick and is not run.
SKIP_LATER_THAN = dt.timedelta(seconds=5)


def validate_cron(cron: Any, owner: str = "") -> str:
    """A cron expression croniter can read (``"*/5 * * * *"``)."""
    if not isinstance(cron, str) or not croniter.is_valid(cron):
        raise ConfigurationError(f"{owner}cron={cron!r} is not a valid cron expression (e.g. '*/5 * * * *')")
    return cron


def validate_timezone(zone: Any, owner: str = "") -> str:
    """An IANA time zone name (``"Europe/Madrid"``)."""
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"{owner}timezone={zone!r} is not a known IANA time zone") from exc
    return str(zone)


def validate_catch_up(policy: Any, owner: str = "") -> str:
    """One of CATCH_UP_POLICIES."""
    if policy not in CATCH_UP_POLICIES:
        raise ConfigurationError(f"{owner}catch_up={policy!r}: expected one of {CATCH_UP_POLICIES}")
    return str(policy)


@dataclass(frozen=True)
class Schedule:
    """When to enqueue one task with fixed arguments."""

    name: str
    task: str
    cron: str | None = None
    every: float | None = None
    timezone: str = DEFAULT_TIMEZONE
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    catch_up: str = DEFAULT_CATCH_UP
    catch_up_limit: int = DEFAULT_CATCH_UP_LIMIT

    def __post_init__(self) -> None:
        owner = f"schedule {self.name!r}: "
        if (self.cron is None) == (self.every is None):
            raise ConfigurationError(f"{owner}give exactly one of cron= or every=")
        if self.cron is not None:
            validate_cron(self.cron, owner)
        if self.every is not None and not self.every > 0:
            raise ConfigurationError(f"{owner}every= must be a positive number of seconds")
        validate_catch_up(self.catch_up, owner)
        if self.catch_up_limit < 1:
            raise ConfigurationError(f"{owner}catch_up_limit must be at least 1")
        validate_timezone(self.timezone, owner)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def describe(self) -> str:
        return f"cron {self.cron!r} ({self.timezone})" if self.cron else f"every {self.every:g} s"

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        """The first tick strictly after ``moment`` (an aware datetime), in UTC."""
        if self.every is not None:
            seconds = moment.timestamp()
            following = (math.floor(seconds / self.every) + 1) * self.every
            return dt.datetime.fromtimestamp(following, dt.timezone.utc)
        assert self.cron is not None
        tick: dt.datetime = croniter(self.cron, moment.astimezone(self.zone)).get_next(dt.datetime)
        return tick.astimezone(dt.timezone.utc)

    def recent_ticks(self, after: dt.datetime, until: dt.datetime, limit: int) -> list[dt.datetime]:
        """The last ``limit`` ticks with ``after < tick <= until``, oldest first, in UTC."""
        if self.every is not None:
            last = math.floor(until.timestamp() / self.every)
            first = max(math.floor(after.timestamp() / self.every) + 1, last - limit + 1)
            return [dt.datetime.fromtimestamp(n * self.every, dt.timezone.utc) for n in range(first, last + 1)]
        assert self.cron is not None
        walker = croniter(self.cron, (until + dt.timedelta(seconds=1)).astimezone(self.zone))
        ticks: list[dt.datetime] = []
        while len(ticks) < limit:
            tick = walker.get_prev(dt.datetime).astimezone(dt.timezone.utc)
            if tick <= after:
                break
            if tick <= until:
                ticks.append(tick)
        return ticks[::-1]

    def due(self, last: dt.datetime, now: dt.datetime) -> list[dt.datetime]:
        """The ticks to fire now, given the last tick already handled, under the catch-up policy.

        ``latest`` (default): of the ticks missed since ``last``, only the most recent one.
        ``skip``: only a tick that is not late (within ``SKIP_LATER_THAN``); missed ones are dropped.
        ``all``: every tick since ``last``, oldest first, but at most the ``catch_up_limit`` most recent.
        """
        if self.catch_up == "all":
            return self.recent_ticks(last, now, self.catch_up_limit)
        ticks = self.recent_ticks(last, now, 1)
        if self.catch_up == "skip" and ticks and now - ticks[0] > SKIP_LATER_THAN:
            return []
        return ticks
