"""Rates such as ``"100/s"`` or ``"1/h"``: parsing shared by throttles and rate limits."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .exceptions import ConfigurationError

_PERIODS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*$")


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
        if value <= 0:
            raise ConfigurationError(f"{option}={value!r} must be positive")
        return Rate(int(value), 1.0) if float(value).is_integer() else Rate(1, 1.0 / float(value))
    match = _RATE.match(value) if isinstance(value, str) else None
    if not match or match.group(3) not in _PERIODS or int(match.group(1)) <= 0 or match.group(2) in ("0", "00"):
        raise ConfigurationError(f"{option}={value!r}: expected 'N/period' such as '100/s', '20/m' or '1/h'")
    multiplier = int(match.group(2)) if match.group(2) else 1
    return Rate(int(match.group(1)), _PERIODS[match.group(3)] * multiplier)
