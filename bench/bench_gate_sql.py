"""Gate evaluation in SQL and rehearsal speed: ``python -m bench.bench_gate_sql``.

1. One evaluation of a phase holding 10,000 orders: the phase metrics in SQL alone, and a
   whole monitor step (lock, metrics, verdict, decision, stored evaluation). Goal < 50 ms
   on PostgreSQL. Runs in a scratch PostgreSQL database ``bench_gate`` that it creates and
   drops (server: BENCH_PG_URL, default postgres://postgres@127.0.0.1:5432/postgres), or
   in a temporary SQLite file when PostgreSQL is unreachable (the figure says which).
   The window holds 10,000 orders (mixed outcomes, 2,000 signals), 10,000 older orders of
   the same deployment and 10,000 of another, and 720 equity marks.
2. Rehearsal speed: ``manage.py rehearse --speed max`` over data/market/ETH_BTC-5m.csv to
   a complete rollout (gates this strategy can pass), with a monitor step after every
   candle and with the default cadence (a step whenever the verdict may have changed, at
   each phase end, at least every candle-hour); and the goal's command itself (default
   thresholds: the rollout pauses after ~130 phase-1 extensions). Goal >= 2,000 candles/s.
   Each figure says the rehearsal's CPU time and the load average: on a shared machine
   the wall time also waits for other processes (and for the private Redis).

``run() -> list[dict]`` rows {"figure", "value", "unit", "goal", "ok"}; printed as a table.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/postgres")
SCRATCH = "bench_gate"
ORDERS = 10_000
ROUNDS = 25
EVALUATION_GOAL_MS = 50.0
REHEARSAL_GOAL = 2000.0
REHEARSAL_THRESHOLDS = {"min_orders": 3, "confluence_avg_target": 3.0, "confluence_avg_fail": 2.5}


def _row(figure: str, value: Any, unit: str, goal: str = "-", ok: bool = True) -> dict:
    return {"figure": figure, "value": value, "unit": unit, "goal": goal, "ok": ok}


def _postgres_reachable(url: str) -> bool:
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=2):
            return True
    except Exception:  # noqa: BLE001 - any failure: fall back to SQLite
        return False


def setup_django(tmp: Path) -> str:
    """Point Django at PostgreSQL (scratch database created later) or a temp SQLite file."""
    vendor = "postgresql" if _postgres_reachable(PG_URL) else "sqlite"
    os.environ["DATABASE_URL"] = (
        PG_URL if vendor == "postgresql" else f"sqlite:///{tmp / 'x.sqlite3'}"
    )
    os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
    os.environ.setdefault("DEBUG", "true")
    os.environ.setdefault("SECRET_KEY", f"bench-{uuid.uuid4().hex}")
    os.environ["VAR_DIR"] = str(tmp / "var")
    os.environ["LOG_LEVEL"] = "WARNING"
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    return vendor


def create_scratch(tmp: Path) -> str:
    from django.db import connection
    from django.test.utils import setup_test_environment

    setup_test_environment(debug=False)
    test = connection.settings_dict.setdefault("TEST", {})
    test["NAME"] = SCRATCH if connection.vendor == "postgresql" else str(tmp / f"{SCRATCH}.sqlite3")
    old = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    return old


def drop_scratch(old_name: str) -> None:
    from django.db import connection
    from django.test.utils import teardown_test_environment

    connection.creation.destroy_test_db(old_name, verbosity=0)
    teardown_test_environment()


# --- data ---------------------------------------------------------------------------------


def _orders(
    deployment: Any, signals: list[Any], start: datetime, rng: random.Random, n: int
) -> list[Any]:
    from trading.models import Order

    statuses = ["FILLED"] * 94 + ["PARTIAL"] * 3 + ["CANCELED", "ERROR", "REJECTED"]
    rows = []
    for i in range(n):
        status = rng.choice(statuses)
        submitted = start + timedelta(milliseconds=rng.randrange(3_590_000))
        latency = rng.lognormvariate(4.5, 0.5)
        requested = rng.uniform(0.01, 0.2)
        filled = requested if status == "FILLED" else (requested / 2 if status == "PARTIAL" else 0)
        rows.append(
            Order(
                deployment=deployment,
                signal=rng.choice(signals),
                client_order_id=f"b{deployment.pk}-{start.timestamp():.0f}-{i}",
                purpose="entry" if i % 2 else "exit",
                symbol="ETH/BTC",
                side="buy",
                requested_qty=requested,
                filled_qty=filled,
                slippage_bps=rng.gauss(2, 3),
                status=status,
                critical=False,
                created_at=submitted,
                submitted_at=submitted,
                acked_at=submitted + timedelta(milliseconds=latency),
                latency_ms=latency if i % 10 else None,
            )
        )
    return rows


def seed(now: datetime) -> int:
    """A RUNNING rollout whose phase 1 started an hour before ``now``; returns its id."""
    from canary.models import Phase, Rollout
    from trading.models import Deployment, EquitySnapshot, MarketStream, Order, Signal

    rng = random.Random(11)
    start = now - timedelta(hours=1)
    deployments = [
        Deployment.objects.create(name=name, symbols=["ETH/BTC"], full_order_notional=0.1)
        for name in ("bench", "other")
    ]
    for deployment in deployments:
        signals = Signal.objects.bulk_create(
            Signal(
                deployment=deployment,
                symbol="ETH/BTC",
                side="buy",
                entry=0.1,
                stop=0.09,
                target=0.14,
                reward_risk=4.0,
                score=rng.choice((3, 4, 4)),
                ts_ms=i,
                created_at=start,
            )
            for i in range(2000)
        )
        Order.objects.bulk_create(_orders(deployment, signals, start, rng, ORDERS), batch_size=2000)
        if deployment.name == "bench":
            older = start - timedelta(hours=1)
            Order.objects.bulk_create(
                _orders(deployment, signals, older, rng, ORDERS), batch_size=2000
            )
    bench = deployments[0]
    EquitySnapshot.objects.bulk_create(
        EquitySnapshot(
            deployment=bench,
            ts=start + timedelta(seconds=5 * i),
            cash=1.0,
            positions_value=0.0,
            equity=1.0 + rng.gauss(0, 0.001),
            peak=1.0,
            drawdown_pct=0.0,
        )
        for i in range(720)
    )
    MarketStream.objects.create(
        exchange="paper", symbol="ETH/BTC", timeframe="5m", last_received_at=now
    )
    rollout = Rollout.objects.create(
        deployment=bench,
        name="bench",
        plan=[
            {"allocation": a, "min_duration_s": 86400, "extension_s": 600} for a in (0.1, 0.5, 1.0)
        ],
        thresholds={},
        state="RUNNING",
        current_phase=1,
        created_at=start,
        started_at=start,
    )
    Phase.objects.create(
        rollout=rollout,
        index=1,
        allocation=0.1,
        min_duration_s=86400,
        extension_s=600,
        started_at=start,
        ends_at=start + timedelta(days=1),
    )
    return rollout.pk


def _median_ms(work: Any, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def evaluation_rows(tmp: Path, rounds: int) -> list[dict]:
    vendor = setup_django(tmp)
    old = create_scratch(tmp)
    try:
        from canary.engine import Thresholds, evaluate
        from canary.metrics import phase_metrics
        from canary.models import Phase, Rollout
        from canary.monitor import monitor_step

        now = datetime.now(UTC)
        rollout_id = seed(now)
        rollout = Rollout.objects.select_related("deployment").get(pk=rollout_id)
        phase = Phase.objects.get(rollout=rollout)
        metrics = phase_metrics(deployment=rollout.deployment, since=phase.started_at, now=now)
        assert metrics.orders == ORDERS, metrics
        sql_ms = _median_ms(
            lambda: phase_metrics(deployment=rollout.deployment, since=phase.started_at, now=now),
            rounds,
        )
        step = monitor_step(rollout_id=rollout_id, now=now)
        assert step.error is None and step.evaluation_id, step
        step_ms = _median_ms(lambda: monitor_step(rollout_id=rollout_id, now=now), rounds)
        verdict = evaluate(metrics, Thresholds(), 1).outcome.value
    finally:
        drop_scratch(old)
    where = "PostgreSQL" if vendor == "postgresql" else "SQLite (PostgreSQL unreachable)"
    goal = f"< {EVALUATION_GOAL_MS:g} ms" if vendor == "postgresql" else "-"
    return [
        _row(f"phase metrics in SQL, {ORDERS:,} orders, {where}", round(sql_ms, 2), "ms (median)"),
        _row(
            f"one evaluation (monitor step), {ORDERS:,} orders, {where}",
            round(step_ms, 2),
            "ms (median)",
            goal,
            step_ms < EVALUATION_GOAL_MS or vendor != "postgresql",
        ),
        _row("  its verdict", verdict, f"{metrics.orders} orders"),
    ]


def rehearsal_row(
    tmp: Path, label: str, *args: str, thresholds: dict[str, Any] | None = REHEARSAL_THRESHOLDS
) -> dict:
    name = f"rehearsal-{uuid.uuid4().hex[:8]}"
    report = tmp / f"{name}.json"
    argv = [
        sys.executable,
        "manage.py",
        "rehearse",
        "--data",
        str(ROOT / "data" / "market" / "ETH_BTC-5m.csv"),
        "--speed",
        "max",
        "--json",
        str(report),
        *args,
    ]
    if thresholds is not None:
        path = tmp / f"{name}-thresholds.json"
        path.write_text(json.dumps(thresholds))
        argv += ["--thresholds", str(path)]
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "VAR_DIR")}
    env.setdefault("DEBUG", "true")
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or not report.exists():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return _row(
            f"rehearsal ({label}): failed: {tail[:100]}", None, "", f">= {REHEARSAL_GOAL:g}", False
        )
    data = json.loads(report.read_text())
    speed = data["speed"]
    state = data["rollout"]["state"]
    per_s = speed["candles_per_s"] or 0.0
    load = os.getloadavg()[0]
    return _row(
        f"rehearsal ETH/BTC 5m to {state}, {label} ({speed['candles']} candles, "
        f"{speed['monitor_steps']} steps; strategy {speed['strategy_s']} s, monitor "
        f"{speed['monitor_s']} s, CPU {speed.get('cpu_s')} s; load {load:.1f})",
        per_s,
        "candles/s",
        f">= {REHEARSAL_GOAL:g}",
        per_s >= REHEARSAL_GOAL,
    )


def run(rounds: int = ROUNDS) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp:
        rows = [
            rehearsal_row(Path(tmp), "monitor after every candle", "--monitor-every", "0"),
            rehearsal_row(Path(tmp), "default cadence: events, phase ends, every candle-hour"),
            rehearsal_row(Path(tmp), "the goal's command: default thresholds", thresholds=None),
        ]
        return evaluation_rows(Path(tmp), rounds) + rows


def format_table(rows: list[dict]) -> str:
    headers = ("figure", "value", "unit", "goal", "ok")
    cells = [[str(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(run()))
