"""The issue's targets, judged from the results: met, not met, or not measured."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .limits import DELIVERED_TARGET, W9_VARIANTS
from .steady import BLOAT_TARGET, DEBOUNCE_TARGET, PRUNE_KEEP, RECOVERED
from .workloads import W1_BATCHES

if TYPE_CHECKING:
    from .runner import Result


@dataclass(frozen=True)
class Target:
    workload: str
    goal: str
    measured: str
    met: bool | None  # None: reported only, or not measured


def evaluate(results: list[Result]) -> list[Target]:
    found = {r.case.id: r for r in results if r.ok}
    targets: list[Target] = []
    for check in (_w1, _w1b, _w2, _w3, _w3b, _w4, _w5, _w6, _w7, _w9):
        targets += check(found)
    return targets


def _rate(r: Result) -> str:
    return f"{r.jobs_per_s:,.0f} jobs/s"


def _ratio(r: Result) -> float:
    return r.ratio or 0.0


def _w1(found: dict[str, Result]) -> list[Target]:
    targets = []
    for batch in W1_BATCHES:
        r, raw = found.get(f"W1/taskpg/b{batch}"), found.get(f"W1/raw/b{batch}")
        if r and raw:
            measured = f"{_rate(r)} = {_ratio(r):.1%} of raw COPY ({_rate(raw)})"
            targets.append(Target("W1", f"delay_many batch {batch:,} >= 60% of raw COPY", measured, _ratio(r) >= 0.6))
    return targets


def _w1b(found: dict[str, Result]) -> list[Target]:
    r = found.get("W1b/taskpg")
    if r is None:
        return []
    extra = r.extra()
    lost, duplicated = extra.get("lost"), extra.get("duplicated")
    measured = f"{_rate(r)} (push {extra.get('push_jobs_per_s')}/s), lost {lost}, duplicated {duplicated}"
    met = r.jobs_per_s >= 100_000 and lost == 0 and duplicated == 0
    return [Target("W1b", "flush >= 100k jobs/s, lost = duplicated = 0", measured, met)]


def _w2(found: dict[str, Result]) -> list[Target]:
    targets = []
    for key, label in (("auto", "autocommit"), ("tx", "in a transaction")):
        r, raw = found.get(f"W2/taskpg/{key}"), found.get(f"W2/raw/{key}")
        if r is None:
            continue
        p50, p99 = r.latency(50) or 0.0, r.latency(99) or 0.0
        measured = f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"
        if raw is not None:
            measured += f" (raw INSERT: p50 {raw.latency(50) or 0:.2f}, p99 {raw.latency(99) or 0:.2f})"
        targets.append(Target("W2", f".delay() {label}: p50 <= 0.5 ms, p99 <= 2 ms", measured, p50 <= 0.5 and p99 <= 2))
    return targets


def _w3(found: dict[str, Result]) -> list[Target]:
    targets = []
    for case_id, label in (("W3/threads/c8", "threads"), ("W3/async/c8", "async")):
        r = found.get(case_id)
        if r:
            measured = f"{_rate(r)} = {_ratio(r):.1%} of the raw ceiling"
            met = r.jobs_per_s >= 20_000 and _ratio(r) >= 0.4
            targets.append(Target("W3", f"{label} -c 8 >= 20k jobs/s and >= 40% of raw", measured, met))
    c8, c64 = found.get("W3/threads/c8"), found.get("W3/threads/c64")
    if c8 and c64:
        measured = f"-c 64 {_rate(c64)} vs -c 8 {_rate(c8)} ({c64.jobs_per_s / c8.jobs_per_s:.2f}x)"
        met = c64.jobs_per_s >= 0.8 * c8.jobs_per_s
        targets.append(Target("W3", "no collapse at -c 64 (>= 80% of -c 8)", measured, met))
    return targets


def _w3b(found: dict[str, Result]) -> list[Target]:
    one, two = found.get("W3b/p1"), found.get("W3b/p2")
    if not (one and two):
        return []
    speedup = two.jobs_per_s / one.jobs_per_s
    measured = f"2 processes {_rate(two)} vs 1 process {_rate(one)} = {speedup:.2f}x"
    return [Target("W3b", "2 worker processes >= 1.6x one", measured, speedup >= 1.6)]


def _w4(found: dict[str, Result]) -> list[Target]:
    targets = []
    r = found.get("W4/notify")
    if r:
        p50, p99 = r.latency(50) or 0.0, r.latency(99) or 0.0
        measured = f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"
        targets.append(Target("W4", "LISTEN/NOTIFY: p50 <= 2 ms, p99 <= 10 ms", measured, p50 <= 2 and p99 <= 10))
    for case_id, result in sorted(found.items()):
        if case_id.startswith("W4/poll"):
            measured = f"p50 {result.latency(50) or 0:.1f} ms, p99 {result.latency(99) or 0:.1f} ms"
            targets.append(Target("W4", f"report {result.case.variant}", measured, None))
    return targets


def _w5(found: dict[str, Result]) -> list[Target]:
    r, w3 = found.get("W5/threads/c8"), found.get("W3/threads/c8")
    if r is None:
        return []
    targets = []
    if w3 is not None:
        share = r.jobs_per_s / w3.jobs_per_s
        measured = f"{_rate(r)} = {share:.1%} of W3 -c 8 ({_rate(w3)})"
        targets.append(Target("W5", "drain with backlog >= 80% of W3 at -c 8", measured, share >= 0.8))
    plans = r.extra()
    measured = ", ".join(f"{k}: {v}" for k, v in plans.items())
    claim, finish = str(plans.get("claim")), str(plans.get("finish"))
    drained = str(plans.get("claim_no_stats_drained"))
    ordered = "jobs_claim_idx" in claim and "bitmap" not in claim and "seq scan" not in claim
    targets.append(Target("W5", "after ANALYZE the claim walks jobs_claim_idx in order (EXPLAIN)", measured, ordered))
    ordered = "jobs_claim_idx" in drained and "bitmap" not in drained and "seq scan" not in drained
    targets.append(
        Target("W5", "(extra) without statistics the claim still walks jobs_claim_idx in order", drained, ordered)
    )
    finish_ok = "jobs_pkey" in finish and "jobs_running_idx" not in finish and "seq scan" not in finish
    targets.append(Target("W5", "(extra) after ANALYZE the finish looks jobs up by jobs_pkey", finish, finish_ok))
    return targets


def _bloat(r: Result) -> str:
    e = r.extra()
    return (
        f"{e['bloat']}x: {e['total_mb']} MB (heap {e['heap_mb']}, indexes {e['indexes_mb']}) vs {e['live_mb']} MB"
        f" of {e['live_rows']:,} live rows repacked; autovacuum={e['autovacuum']}"
    )


def _w6(found: dict[str, Result]) -> list[Target]:
    targets = []
    r, raw, pruned = found.get("W6/taskpg"), found.get("W6/raw"), found.get("W6/pruned")
    goal = f"heap + indexes <= {BLOAT_TARGET:g}x live data after a steady 5k jobs/s"
    if r is not None:
        measured = _bloat(r) + (f"; raw cycle {raw.extra()['bloat']}x" if raw else "")
        targets.append(Target("W6", goal, measured, r.extra()["bloat"] <= BLOAT_TARGET))
    if pruned is not None:
        measured = f"{_bloat(pruned)}; {pruned.extra()['pruned']:,} pruned"
        met = pruned.extra()["bloat"] <= BLOAT_TARGET
        targets.append(Target("W6", f"(extra) {goal}, finished jobs pruned after {PRUNE_KEEP:g} s", measured, met))
    long_tx = found.get("W6/longtx")
    if long_tx is not None:
        e = long_tx.extra()
        measured = (
            f"before {e['before_jobs_per_s']:,} jobs/s, during {e['during_jobs_per_s']:,} ({e['long_tx_s']} s),"
            f" after {e['after_jobs_per_s']:,} = {e['after_vs_before']:.0%}; lag p99 ms before/during/after"
            f" {e['before_lag_ms'][1]}/{e['during_lag_ms'][1]}/{e['after_lag_ms'][1]}"
        )
        goal = f"throughput recovers after a long transaction (after >= {RECOVERED:.0%} of before)"
        targets.append(Target("W6", goal, measured, bool(e["recovered"])))
    return targets


def _w7(found: dict[str, Result]) -> list[Target]:
    per_tx, debounced = found.get("W7/taskpg/notify"), found.get("W7/taskpg/debounced")
    if per_tx is None:
        return []
    goal = f"8 clients: debounced NOTIFY >= {DEBOUNCE_TARGET:g}x NOTIFY per transaction"
    if debounced is None:
        return [Target("W7", goal, f"per transaction {_rate(per_tx)}; debounced skipped (no notify_debounce)", None)]
    speedup = debounced.jobs_per_s / per_tx.jobs_per_s
    measured = f"debounced {_rate(debounced)} vs per transaction {_rate(per_tx)} = {speedup:.2f}x"
    return [Target("W7", goal, measured, speedup >= DEBOUNCE_TARGET)]


def table(targets: list[Target]) -> str:
    lines = ["| workload | target | measured | met |", "| --- | --- | --- | --- |"]
    for t in targets:
        verdict = {True: "met", False: "NOT met", None: "-"}[t.met]
        lines.append(f"| {t.workload} | {t.goal} | {t.measured} | {verdict} |")
    return "\n".join(lines)


def json_line(target: Target) -> str:
    return json.dumps({"kind": "target", **target.__dict__})


def _w9(found: dict[str, Result]) -> list[Target]:
    targets = []
    for case_id, _, _ in W9_VARIANTS:
        r = found.get(case_id)
        if r is None:
            continue
        e = r.extra()
        measured = (
            f"{e['delivered_per_s']}/s of {e['limit_per_s']}/s = {e['delivered_vs_limit']:.1%}; most in a period"
            f" {e['most_in_a_period']} of {e['limit_per_period']}; {e['updates_per_job']} row updates per job"
        )
        met = DELIVERED_TARGET <= e["delivered_vs_limit"] <= 1.0 and e["most_in_a_period"] <= e["limit_per_period"]
        targets.append(Target("W9", f"{r.case.variant}: within 5 % of the limit, never over", measured, met))
    return targets
