"""Running cases: a fresh schema per run, one warm-up then N runs; statistics, the table, JSON lines."""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from .pg import fresh_schema

#: ``--smoke`` multiplies the issue's sizes by this (and ignores the floors): a few seconds in all.
SMOKE_SCALE = 0.001
#: The default ``--scale``: a tenth of the issue's sizes, about 10 minutes on 2 cores.
DEFAULT_SCALE = 0.1


@dataclass(frozen=True)
class Bench:
    """What the command line asked for."""

    dsn: str
    redis_url: str | None
    scale: float = DEFAULT_SCALE
    runs: int = 3
    warmups: int = 1
    smoke: bool = False

    def size(self, issue_n: int, floor: int = 0) -> int:
        """The job count for a workload the issue sizes at ``issue_n``.

        ``floor`` keeps latency workloads at enough samples for a p99 when scaled down.
        """
        if self.smoke:
            return max(10, round(issue_n * SMOKE_SCALE))
        return max(floor, round(issue_n * self.scale), 1)


@dataclass
class Measurement:
    """One run: how many jobs completed (checked in the database) in how many seconds."""

    jobs: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # shown after the run's mark in the progress line, e.g. "bloat 1.9x"

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 else 0.0


Measure = Callable[[Bench, str], Measurement]  # (bench, fresh migrated schema) -> one run


@dataclass(frozen=True)
class Case:
    """One line of the report: a workload variant and how to measure one run of it."""

    id: str  # unique, e.g. "W3/threads/c8"
    workload: str
    variant: str
    jobs: int
    measure: Measure = field(compare=False, repr=False)
    concurrency: int | None = None
    batch: int | None = None
    baseline: str | None = None  # id of the raw case this one is a ratio of
    latency: bool = False  # the ratio compares p50 latencies instead of throughput
    once: bool = False  # a long steady-state run (W6): one run, no warm-up, whatever --runs says


@dataclass
class Result:
    case: Case
    runs: list[Measurement]
    error: str | None = None
    ratio: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.runs)

    def seconds(self) -> list[float]:
        return [m.seconds for m in self.runs]

    def rates(self) -> list[float]:
        return [m.jobs_per_s for m in self.runs]

    @property
    def jobs_per_s(self) -> float:
        return statistics.median(self.rates()) if self.runs else 0.0

    def latency(self, percent: float) -> float | None:
        """A percentile of the latencies of every measured run together (None when not measured)."""
        samples = sorted(x for m in self.runs for x in m.latencies_ms)
        if not samples:
            return None
        rank = max(1, math.ceil(percent / 100 * len(samples)))
        return samples[rank - 1]

    def extra(self) -> dict[str, Any]:
        """Extra facts of the runs: one value when every run agrees, else the list of values."""
        merged: dict[str, Any] = {}
        for key in dict.fromkeys(k for m in self.runs for k in m.extra):
            values = [m.extra.get(key) for m in self.runs]
            merged[key] = values[0] if all(v == values[0] for v in values) else values
        return merged


class Progress:
    """A line per case on stderr, a mark per run: ``W3 threads -c 8 (20000 jobs): w 5.1k/s | 5.2k/s ...``."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream

    def start(self, case: Case, index: int, total: int) -> None:
        self._began = time.perf_counter()
        self.stream.write(f"[{index}/{total}] {case.workload} {case.variant} ({case.jobs} jobs):")
        self.stream.flush()

    def run(self, measurement: Measurement, warmup: bool) -> None:
        mark = "warm-up " if warmup else ""
        if measurement.latencies_ms:
            p50 = statistics.median(measurement.latencies_ms)
            text = f" {mark}p50 {p50:.2f} ms"
        else:
            text = f" {mark}{_rate(measurement.jobs_per_s)}/s"
        if measurement.note:
            text += f" ({measurement.note})"
        self.stream.write(text + " |")
        self.stream.flush()

    def end(self, result: Result) -> None:
        self.stream.write(" failed\n" if result.error else f" {time.perf_counter() - self._began:.0f} s\n")
        self.stream.flush()


def run_case(bench: Bench, case: Case, progress: Progress) -> Result:
    """Warm-ups then measured runs, each on a fresh schema; an exception ends the case as failed."""
    measured: list[Measurement] = []
    warmups, runs = (0, 1) if case.once else (bench.warmups, bench.runs)
    try:
        for index in range(warmups + runs):
            with fresh_schema(bench.dsn) as schema:
                measurement = case.measure(bench, schema)
            warmup = index < warmups
            progress.run(measurement, warmup)
            if not warmup:
                measured.append(measurement)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        return Result(case, measured, error=f"{type(exc).__name__}: {exc}")
    return Result(case, measured)


def run_cases(bench: Bench, cases: list[Case], progress: Progress | None = None) -> list[Result]:
    progress = progress or Progress()
    results = []
    for index, case in enumerate(cases, 1):
        progress.start(case, index, len(cases))
        result = run_case(bench, case, progress)
        progress.end(result)
        results.append(result)
    set_ratios(results)
    return results


def set_ratios(results: list[Result]) -> None:
    """taskpg as a fraction of its raw baseline: throughput / raw throughput, or raw p50 / p50."""
    by_id = {r.case.id: r for r in results}
    for result in results:
        base = by_id.get(result.case.baseline or "")
        if base is None or not (base.ok and result.ok):
            continue
        if result.case.latency:
            mine, raw = result.latency(50), base.latency(50)
            result.ratio = raw / mine if mine and raw else None
        else:
            result.ratio = result.jobs_per_s / base.jobs_per_s if base.jobs_per_s else None


# -- reporting ---------------------------------------------------------------------------------


def _rate(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def table(results: Iterable[Result]) -> str:
    """A Markdown table: medians with min-max."""
    header = ["workload", "variant", "c", "batch", "jobs", "seconds", "jobs/s (min-max)", "p50 ms", "p99 ms", "ratio"]
    rows = [header, ["---"] * len(header)]
    for r in results:
        c = r.case
        if not r.ok:
            rows.append([c.workload, c.variant, str(c.concurrency or ""), f"{c.batch or ''}", f"{c.jobs:,}"] + [""] * 4)
            rows[-1].append(f"FAILED: {r.error}")
            continue
        seconds, rates = r.seconds(), r.rates()
        rows.append(
            [
                c.workload,
                c.variant,
                str(c.concurrency or ""),
                f"{c.batch:,}" if c.batch else "",
                f"{c.jobs:,}",
                f"{statistics.median(seconds):.2f}",
                f"{r.jobs_per_s:,.0f} ({min(rates):,.0f}-{max(rates):,.0f})",
                _ms(r.latency(50)),
                _ms(r.latency(99)),
                "" if r.ratio is None else f"{r.ratio:.2f}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [("-" * w if cell == "---" else cell.ljust(w)) for cell, w in zip(row, widths, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def json_line(result: Result, bench: Bench, server: dict[str, Any]) -> str:
    """One result as a JSON object: medians, min-max, percentiles, the ratio and the server facts."""
    c = result.case
    rates, seconds = result.rates(), result.seconds()
    record: dict[str, Any] = {
        "kind": "result",
        "workload": c.workload,
        "variant": c.variant,
        "concurrency": c.concurrency,
        "batch": c.batch,
        "jobs": c.jobs,
        "runs": len(result.runs),
        "seconds": statistics.median(seconds) if seconds else None,
        "seconds_min": min(seconds, default=None),
        "seconds_max": max(seconds, default=None),
        "jobs_per_s": round(result.jobs_per_s, 1) if rates else None,
        "jobs_per_s_min": round(min(rates), 1) if rates else None,
        "jobs_per_s_max": round(max(rates), 1) if rates else None,
        "p50_ms": _round(result.latency(50)),
        "p99_ms": _round(result.latency(99)),
        "ratio": _round(result.ratio),
        "ratio_of": c.baseline,
        "scale": "smoke" if bench.smoke else bench.scale,
        **server,
    }
    if result.extra():
        record["extra"] = result.extra()
    if result.error:
        record["error"] = result.error
    return json.dumps(record, default=str)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
