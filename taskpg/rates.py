"""Rates such as ``"100/s"`` and durations such as ``"24h"``: one grammar of time units.

Units: ``s``/``sec``, ``m``/``min``, ``h``/``hour``, ``d``/``day``, ``w``/``week``. A rate is
``N/[multiplier]unit`` (``"5/10s"`` is 5 per 10 seconds); a duration is a number with an optional
unit (seconds without one). Throttles, rate limits and ``taskpg dead purge --older-than`` all read them here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .exceptions import ConfigurationError

UNIT_SECONDS = {
    "s": 1.0,
    "sec": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "w": 604800.0,
    "week": 604800.0,
}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


@dataclass(frozen=True)
class Rate:
    """At most ``count`` per ``seconds``."""

    count: int
    seconds: float

    def __str__(self) -> str:
        return f"{self.count}/{self.seconds:g}s"


def parse_rate(value: str | int | float, option: str = "rate") -> Rate:
    """``"100/s"``, ``"20/m"``, ``"1/h"``, ``"5/10s"`` (5 per 10 seconds), or a number (per second)."""
    if isinstance(value, bool):
        raise ConfigurationError(f"{option}={value!r}: expected 'N/period' such as '100/s' or '1/h'")
    if isinstance(value, (int, float)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigurationError(f"{option}={value!r} must be a positive number")
        return Rate(int(value), 1.0) if float(value).is_integer() else Rate(1, 1.0 / float(value))
    match = _RATE.match(value) if isinstance(value, str) else None
    zero_multiplier = bool(match and match.group(2)) and int(match.group(2)) == 0  # type: ignore[union-attr]
    if not match or match.group(3) not in UNIT_SECONDS or int(match.group(1)) <= 0 or zero_multiplier:
        raise ConfigurationError(f"{option}={value!r}: expected 'N/period' such as '100/s', '20/m' or '1/h'")
    multiplier = int(match.group(2)) if match.group(2) else 1
    return Rate(int(match.group(1)), UNIT_SECONDS[match.group(3)] * multiplier)


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``24h``, ``7d``, ``2w`` -> seconds."""
    match = _DURATION.match(text)
    if not match or (match.group(2) and match.group(2) not in UNIT_SECONDS):
        raise ConfigurationError(f"{text!r} is not a duration: use e.g. 3600, 30m, 24h or 7d")
    return float(match.group(1)) * UNIT_SECONDS.get(match.group(2), 1.0)
