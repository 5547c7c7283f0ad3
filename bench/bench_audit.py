"""What audit_record adds to a service call: ``python -m bench.bench_audit``.

Times N small service-like transactions (create an auth Group) with and without an
audit_record call in the same transaction, alternating the two so drift hits both alike,
and reports the mean and p95 difference. Goal: < 2 ms added. The calls are split into
rounds and each figure is its median over the rounds, so one burst of load from elsewhere
on the machine does not decide it.

Runs against whatever DATABASE_URL says, in a throwaway database (a temp file for SQLite;
a scratch database ``bench_audit`` on PostgreSQL, created and dropped here). The README
figure is measured on PostgreSQL:

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres python -m bench.bench_audit
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from bench.common import format_table, scratch_database, setup_django

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = 2_000
ROUNDS = 5
WARMUP = 100
GOAL_MS = 2.0


def _plain_call(name: str) -> None:
    from django.contrib.auth.models import Group
    from django.db import transaction

    with transaction.atomic():
        Group.objects.create(name=name)


def _audited_call(name: str, inner_ns: list[int]) -> None:
    from django.contrib.auth.models import Group
    from django.db import transaction

    from audit.services import audit_record

    with transaction.atomic():
        group = Group.objects.create(name=name)
        start = time.perf_counter_ns()
        audit_record(
            action="group.create", actor="bench", target=group, payload={"name": group.name}
        )
        inner_ns.append(time.perf_counter_ns() - start)


def _timed(call: Callable[[], None]) -> float:
    start = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - start) / 1e6


def measure(samples: int, warmup: int = 0) -> dict[str, list[float]]:
    """Milliseconds per call: plain, audited, and the audit_record call alone; the first
    `warmup` calls of each kind are made but not counted."""
    plain: list[float] = []
    audited: list[float] = []
    inner_ns: list[int] = []
    run_id = uuid.uuid4().hex[:8]
    for i in range(warmup + samples):
        plain_ms = _timed(lambda i=i: _plain_call(f"bench-{run_id}-plain-{i}"))
        audited_ms = _timed(lambda i=i: _audited_call(f"bench-{run_id}-audited-{i}", inner_ns))
        if i >= warmup:
            plain.append(plain_ms)
            audited.append(audited_ms)
    inner = [ns / 1e6 for ns in inner_ns[warmup:]]
    return {"plain": plain, "audited": audited, "inner": inner}


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[94]


def round_figures(times: dict[str, list[float]]) -> dict[str, float]:
    plain, audited = times["plain"], times["audited"]
    figures = {
        "plain_mean": statistics.fmean(plain),
        "plain_p95": p95(plain),
        "audited_mean": statistics.fmean(audited),
        "audited_p95": p95(audited),
        "inner_p95": p95(times["inner"]),
    }
    figures["added_mean"] = figures["audited_mean"] - figures["plain_mean"]
    figures["added_p95"] = figures["audited_p95"] - figures["plain_p95"]
    return figures


def _row(figure: str, value: object, unit: str, goal: str = "-", ok: bool = True) -> dict:
    return {"figure": figure, "value": value, "unit": unit, "goal": goal, "ok": ok}


def _goal_row(figure: str, ms: float) -> dict:
    return _row(figure, ms, "ms", f"< {GOAL_MS:g} ms", ms < GOAL_MS)


def summarise(
    rounds: list[dict[str, float]], vendor: str, samples: int, chain_ok: bool
) -> list[dict]:
    """Each figure is its median over the rounds."""
    fig = {key: round(statistics.median(r[key] for r in rounds), 3) for key in rounds[0]}
    return [
        _row("database", vendor, f"{samples} calls each, {len(rounds)} rounds"),
        _row("service call without audit, mean", fig["plain_mean"], "ms"),
        _row("service call without audit, p95", fig["plain_p95"], "ms"),
        _row("service call with audit, mean", fig["audited_mean"], "ms"),
        _row("service call with audit, p95", fig["audited_p95"], "ms"),
        _goal_row("added by audit_record, mean", fig["added_mean"]),
        _goal_row("added by audit_record, p95", fig["added_p95"]),
        _row("audit_record() call alone, p95", fig["inner_p95"], "ms (before commit)"),
        _row("audit chain verifies afterwards", chain_ok, "-", "True", chain_ok),
    ]


def run(samples: int = SAMPLES, rounds: int = ROUNDS) -> list[dict]:
    setup_django()
    from audit.services import audit_verify

    per_round = max(samples // rounds, 20)
    with scratch_database("bench_audit") as vendor:
        measure(0, warmup=WARMUP)
        figures = [round_figures(measure(per_round)) for _ in range(rounds)]
        chain_ok = audit_verify() is None
    return summarise(figures, vendor, per_round * rounds, chain_ok)


if __name__ == "__main__":
    print(format_table(run()))
