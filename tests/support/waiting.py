"""Waiting in a test for something a worker thread does, with a deadline."""

from __future__ import annotations

import time
from typing import Any


def wait_for(predicate: Any, timeout: float = 10.0, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {message}"
        time.sleep(0.05)
