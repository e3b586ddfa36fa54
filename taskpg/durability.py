"""How safe the buffer's Redis keeps envelopes, and noticing when it lost some.

Two things, both cheap:

- ``findings(client)`` reads ``CONFIG GET`` once (at a flusher's start, in ``taskpg status``) and says
  what a setting can lose: no persistence, a snapshot-only or unsynced append-only file, an
  ``allkeys-*`` eviction policy. Managed Redis often refuses CONFIG: that is said too.
- ``LossWatch`` follows the buffer lists' lengths while one flusher holds the buffer's lock. Producers
  only append and only the lock holder removes, so a list that is shorter than it was, less what
  this flusher moved, lost envelopes (evicted, or a restart without its data); so did a buffer whose
  lock vanished with nobody holding it. Each loss is counted "at least": pushes after the last look
  cannot be seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .connections import redis_errors

if TYPE_CHECKING:
    from collections.abc import Sequence

#: Eviction policies under which Redis may drop the buffer lists themselves (they carry no TTL).
EVICTING = ("allkeys-lru", "allkeys-lfu", "allkeys-random")


def findings(client: Any) -> list[str]:
    """What this Redis can lose of the buffer, one sentence each (empty: durable as configured)."""
    try:
        config: dict[Any, Any] = {}
        for name in ("appendonly", "appendfsync", "save", "maxmemory-policy"):
            config.update(client.config_get(name))
    except redis_errors():
        raise  # Redis away: the caller's outage handling, not a finding
    except Exception as exc:  # CONFIG refused (a managed Redis, an ACL): say so, do not guess
        return [f"cannot read Redis' configuration ({exc}): check its persistence and eviction policy yourself"]
    settings = {_text(k): _text(v) for k, v in config.items()}
    said: list[str] = []
    aof = settings.get("appendonly") == "yes"
    if not aof and not settings.get("save"):
        said.append("Redis keeps nothing on disk (appendonly no, no save points): a restart loses every buffered job")
    elif not aof:
        said.append("Redis only snapshots (appendonly no): a crash loses the jobs pushed since the last snapshot")
    elif settings.get("appendfsync") == "no":
        said.append("Redis' append-only file is not synced (appendfsync no): a crash can lose ~30 s of pushes")
    policy = settings.get("maxmemory-policy", "")
    if policy in EVICTING:
        said.append(
            f"maxmemory-policy is {policy}: when memory runs short Redis may evict the buffer lists; use noeviction"
        )
    return said


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Loss:
    """Envelopes that vanished from a buffer list: at least ``count``, and why Redis seems to have dropped them."""

    list_name: str
    count: int
    cause: str


@dataclass
class LossWatch:
    """Follows the lists' lengths while this flusher holds the lock (see the module docstring)."""

    lists: Sequence[str]
    _floor: list[int] | None = None  # the least each list may hold now
    _redis: dict[str, int] = field(default_factory=dict)  # run_id hash and evicted_keys at the last look

    def reset(self) -> None:
        """Forget what was seen (the lock changed hands, or a move's reply was lost: envelopes may have
        moved without this flusher counting them). Redis' vitals are read again at the next look."""
        self._floor = None
        self._redis = {}

    def moved(self, index: int, count: int) -> None:
        """This flusher took ``count`` envelopes from list ``index``."""
        if self._floor is not None:
            self._floor[index] = max(0, self._floor[index] - count)

    def seen(self, lengths: Sequence[int], client: Any) -> list[Loss]:
        """The lists' lengths now; returns the losses since the last look."""
        losses: list[Loss] = []
        if self._floor is not None:
            short = [
                (name, floor - length) for name, floor, length in zip(self.lists, self._floor, lengths, strict=True)
            ]
            vanished = [(name, count) for name, count in short if count > 0]
            if vanished:
                cause = self._cause(client)
                losses = [Loss(name, count, cause) for name, count in vanished]
        self._floor = list(lengths)
        self._remember(client)
        return losses

    def lock_vanished(self, client: Any) -> list[Loss]:
        """The buffer's lock is gone and nobody holds it. If Redis restarted or evicted keys meanwhile,
        the envelopes last seen in the lists are lost unless they are still there; otherwise the lock
        simply expired (a long pause), and another flusher may have moved envelopes: nothing is told."""
        if self._floor is None:
            return []
        with client.pipeline(transaction=False) as pipe:
            for key in self.lists:
                pipe.llen(key)
            lengths = [int(n) for n in pipe.execute()]
        before, now = self._redis, _vitals(client)
        dropped_keys = before.get("run_id") != now.get("run_id") or now.get("evicted_keys", 0) > before.get(
            "evicted_keys", 0
        )
        losses = self.seen(lengths, client) if dropped_keys else []
        self.reset()
        return losses

    def _remember(self, client: Any) -> None:
        if not self._redis:
            self._redis = _vitals(client)

    def _cause(self, client: Any) -> str:
        before, now = self._redis, _vitals(client)
        self._redis = now
        if before.get("run_id") != now.get("run_id"):
            return "Redis restarted without them (no persistence, or a failover to a replica that lacked them)"
        if now.get("evicted_keys", 0) > before.get("evicted_keys", 0):
            return "Redis evicted keys (maxmemory reached under an allkeys-* policy)"
        return "removed by something other than taskpg's flusher (a FLUSHALL, a DEL, another consumer)"


def _vitals(client: Any) -> dict[str, int]:
    """Redis' run id (as a number) and its count of evicted keys."""
    try:
        server, stats = client.info("server"), client.info("stats")
    except Exception:
        return {}
    return {"run_id": hash(str(server.get("run_id"))), "evicted_keys": int(stats.get("evicted_keys", 0))}
