"""``python -m benchmarks``: run the workloads, print the table and the targets, write JSON lines."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import targets
from .limits import LIMIT_WORKLOADS
from .pg import server_info
from .runner import DEFAULT_SCALE, Bench, json_line, run_cases, table
from .steady import STEADY_WORKLOADS, debounce_supported
from .workloads import FLOORS, ISSUE_SIZES, WORKLOADS, Workload

if TYPE_CHECKING:
    from collections.abc import Sequence

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
ALL_WORKLOADS = [*WORKLOADS, *STEADY_WORKLOADS, *LIMIT_WORKLOADS]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="taskpg against the raw-SQL ceiling.")
    parser.add_argument("--dsn", default=os.environ.get("TASKPG_DSN") or DEFAULT_DSN, help="Postgres (TASKPG_DSN)")
    parser.add_argument("--redis-url", default=os.environ.get("TASKPG_REDIS_URL") or DEFAULT_REDIS_URL)
    parser.add_argument(
        "--scale", type=float, default=DEFAULT_SCALE, help=f"multiplier on the issue's sizes (default {DEFAULT_SCALE})"
    )
    parser.add_argument("--only", help="comma-separated workloads, e.g. W1,W3")
    parser.add_argument("--runs", type=int, default=3, help="measured runs per case, after one warm-up")
    parser.add_argument("--json-out", type=Path, help="write the JSON lines here (default: stdout, after the tables)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 run, no warm-up (for CI)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.scale <= 0:
        parser.error("--runs must be >= 1 and --scale > 0")
    return args


def select(only: str | None) -> list[Workload]:
    if not only:
        return list(ALL_WORKLOADS)
    by_id = {w.id.lower(): w for w in ALL_WORKLOADS}
    wanted = [name.strip().lower() for name in only.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in by_id]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; choose from {', '.join(w.id for w in ALL_WORKLOADS)}")
    return [w for w in ALL_WORKLOADS if w.id.lower() in wanted]


def redis_reachable(url: str) -> bool:
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception:
        return False
    return True


def machine() -> dict[str, Any]:
    memory = "?"
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return {
        "cores": os.cpu_count(),
        "memory": memory,
        "loadavg_1m": round(os.getloadavg()[0], 2),  # another process busy on the box skews every number
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def quiet_logs() -> None:
    """Worker start/stop warnings would drown the progress lines; errors still show."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("taskpg").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs()
    bench = Bench(
        dsn=args.dsn,
        redis_url=args.redis_url,
        scale=args.scale,
        runs=1 if args.smoke else args.runs,
        warmups=0 if args.smoke else 1,
        smoke=args.smoke,
    )
    workloads = select(args.only)
    if any(w.needs_redis for w in workloads) and not redis_reachable(args.redis_url):
        print(f"no Redis at {args.redis_url}: skipping W1b", file=sys.stderr)
        workloads = [w for w in workloads if not w.needs_redis]
    if any(w.id == "W7" for w in workloads) and not debounce_supported():
        print("TaskPG has no notify_debounce option: skipping W7's debounced variant", file=sys.stderr)
    server = server_info(args.dsn)
    meta = {"kind": "meta", "machine": machine(), **server, "scale": "smoke" if args.smoke else args.scale}
    meta["sizes"] = {w: bench.size(n, FLOORS.get(w, 0)) for w, n in ISSUE_SIZES.items()}
    print(f"taskpg benchmarks: {json.dumps(meta)}", file=sys.stderr)
    if not server["durable"]:
        print("WARNING: fsync or synchronous_commit is off: these are relaxed, not durable, numbers", file=sys.stderr)
    cases = [case for workload in workloads for case in workload.cases(bench)]
    results = run_cases(bench, cases)
    meta["machine"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    verdicts = targets.evaluate(results)
    print(table(results))
    print()
    print(targets.table(verdicts))
    lines = [json.dumps(meta), *(json_line(r, bench, server) for r in results), *map(targets.json_line, verdicts)]
    if args.json_out:
        args.json_out.write_text("\n".join(lines) + "\n")
    else:
        print()
        print("\n".join(lines))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
