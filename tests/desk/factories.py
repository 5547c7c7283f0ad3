"""Desk test data: a rollout in its 50 % phase with real-price equity, and a rehearsal
day replayed from the bundled Binance candles."""

from __future__ import annotations

import csv
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from django.contrib.auth.models import User

MARKET = Path(__file__).resolve().parents[2] / "data" / "market"
STEP = timedelta(minutes=5)


def closes(name: str = "ETH_BTC-5m.csv", start: int = 0, n: int = 288) -> list[tuple[int, dict]]:
    with (MARKET / name).open() as fh:
        rows = list(csv.DictReader(fh))[start : start + n]
    return [(int(r["timestamp_ms"]), {k: float(v) for k, v in r.items()}) for r in rows]


def equity_path(prices: list[float], cash: float = 1.0, exposure: float = 0.5) -> list[tuple]:
    """(equity, peak, drawdown %) of a book holding ``exposure`` x cash in the asset."""
    out, peak = [], 0.0
    for p in prices:
        equity = cash * (1 + exposure * (p / prices[0] - 1))
        peak = max(peak, equity)
        out.append((equity, peak, (equity / peak - 1) * 100))
    return out


@dataclass
class Desk:
    deployment: Any
    rollout: Any
    phases: list[Any]
    users: dict[str, User]
    extra: dict[str, Any] = field(default_factory=dict)


def make_deployment(name: str = "smc-ethbtc", **extra: Any):
    from trading.models import Deployment

    values = {
        "exchange": "paper",
        "symbols": ["ETH/BTC", "LTC/BTC"],
        "timeframe": "5m",
        "full_order_notional": 0.05,
        "allocation": 0.5,
        "kill_switch": "ACTIVE",
        "starting_cash": 1.0,
        "cash": 0.62,
        "quote_currency": "BTC",
    }
    values.update(extra)
    return Deployment.objects.create(name=name, **values)


PLAN = [
    {"allocation": 0.1, "min_duration_s": 1800, "extension_s": 900, "needs_manual_promote": False},
    {"allocation": 0.5, "min_duration_s": 7200, "extension_s": 1800, "needs_manual_promote": False},
    {"allocation": 1.0, "min_duration_s": 0, "extension_s": 0, "needs_manual_promote": True},
]

GOOD = {
    "orders": 34,
    "latency_p95_ms": 212.0,
    "fill_rate": 0.985,
    "slippage_bps": 6.1,
    "confluence_avg": 3.45,
    "drawdown_pct": -0.42,
    "error_rate": 0.0,
    "critical_errors": 0,
    "stream_gap_s": 4.0,
    "db_ok": True,
}


def seed_rollout(deployment, users: dict[str, User], now: datetime):
    from canary.engine import Thresholds
    from canary.models import Approval, GateEvaluation, Phase, PreflightRun, Rollout

    started = now - timedelta(minutes=75)
    rollout = Rollout.objects.create(
        deployment=deployment,
        name="ETH/BTC SMC go-live",
        plan=PLAN,
        thresholds=Thresholds().to_dict(),
        config_version=2,
        state="RUNNING",
        current_phase=2,
        created_by=users["Ops"],
        created_at=started - timedelta(hours=2),
        started_by=users["Ops"],
        started_at=started,
    )
    p1 = Phase.objects.create(
        rollout=rollout,
        index=1,
        allocation=0.1,
        min_duration_s=1800,
        extension_s=900,
        started_at=started,
        ends_at=started + timedelta(minutes=30),
        ended_at=started + timedelta(minutes=30),
        outcome="PASS",
    )
    p2 = Phase.objects.create(
        rollout=rollout,
        index=2,
        allocation=0.5,
        min_duration_s=7200,
        extension_s=1800,
        started_at=started + timedelta(minutes=30),
        ends_at=started + timedelta(minutes=150),
    )
    p3 = Phase.objects.create(
        rollout=rollout,
        index=3,
        allocation=1.0,
        min_duration_s=0,
        extension_s=0,
        needs_manual_promote=True,
    )
    evaluations = [
        (p1, started + timedelta(minutes=5), dict(GOOD, orders=6), "INCONCLUSIVE", "EXTEND"),
        (p1, started + timedelta(minutes=30), GOOD, "PASS", "PROMOTE"),
        (p2, now - timedelta(minutes=20), dict(GOOD, orders=41), "PASS", "NONE"),
        (
            p2,
            now - timedelta(minutes=1),
            dict(GOOD, orders=52, slippage_bps=18.4, latency_p95_ms=640.0, drawdown_pct=-0.9),
            "WARNING",
            "NONE",
        ),
    ]
    thresholds = Thresholds()
    from canary.engine import Metrics, evaluate

    for phase, at, metrics, _verdict, action in evaluations:
        verdict = evaluate(Metrics(**metrics), thresholds, phase.index)
        GateEvaluation.objects.create(
            rollout=rollout,
            phase=phase,
            evaluated_at=at,
            metrics=metrics,
            verdict=verdict.outcome.value,
            reasons=[r.message for r in verdict.reasons],
            action=action,
        )
    Approval.objects.create(
        rollout=rollout,
        role="alpha",
        user=users["Alpha"],
        comment="Backtest and paper week reviewed",
        evidence={"smc_alignment_pct": 86.0, "reward_risk": 3.4, "liquidation_sweep_errors": 0},
        config_version=2,
        created_at=started - timedelta(minutes=40),
    )
    Approval.objects.create(
        rollout=rollout,
        role="planner",
        user=users["Planner"],
        comment="On-call rota confirmed",
        evidence={"team_ready": True, "on_call": "ops, planner"},
        config_version=2,
        created_at=started - timedelta(minutes=25),
    )
    checks = [
        ("env", "PASS", "production mode: every required setting is present and valid", 3),
        ("database", "PASS", "postgresql: migrations applied, write/read round trip ok", 41),
        ("exchange_rest", "PASS", "binance: server time in 84 ms, clock skew 12 ms", 92),
        ("exchange_websocket", "PASS", "kline stream ETH/BTC 5m open in 310 ms", 318),
        ("signals", "PASS", "2 symbols scored on the last 500 candles", 120),
        ("order_test", "PASS", "test order ETH/BTC validated by the exchange", 140),
        ("backup", "PASS", "backup #7 verified: checksum and scratch restore ok", 2200),
        ("monitoring", "WARN", "beat heartbeat 12 s old (limit 30 s)", 2),
    ]
    checks = [
        {"name": n, "status": st, "critical": n != "monitoring", "detail": d, "duration_ms": ms}
        for n, st, d, ms in checks
    ]
    PreflightRun.objects.create(
        started_at=started - timedelta(minutes=50),
        ended_at=started - timedelta(minutes=49),
        decision="GO",
        checks=checks,
        actor="ops",
    )
    return rollout, [p1, p2, p3]


def seed_equity(deployment, now: datetime, n: int = 288) -> None:
    from trading.models import EquitySnapshot

    prices = [c["close"] for _, c in closes(start=3000, n=n)]
    rows = []
    for i, (equity, peak, dd) in enumerate(equity_path(prices)):
        rows.append(
            EquitySnapshot(
                deployment=deployment,
                ts=now - (n - 1 - i) * STEP,
                cash=0.62,
                positions_value=equity - 0.62,
                equity=equity,
                peak=peak,
                drawdown_pct=dd,
            )
        )
    EquitySnapshot.objects.bulk_create(rows)


def seed_positions(deployment) -> None:
    from trading.models import Position

    Position.objects.create(
        deployment=deployment,
        symbol="ETH/BTC",
        qty=0.85,
        avg_entry=0.09412,
        last_price=0.09527,
        realised_pnl=0.00131,
    )
    Position.objects.create(
        deployment=deployment,
        symbol="LTC/BTC",
        qty=-2.4,
        avg_entry=0.01705,
        last_price=0.01718,
        realised_pnl=-0.00022,
    )
    Position.objects.create(deployment=deployment, symbol="ADA/BTC", qty=0.0, avg_entry=0.0)


def seed_orders(deployment, now: datetime, n: int = 40, errors: int = 2) -> None:
    from trading.models import Order

    rows = [
        Order(
            deployment=deployment,
            client_order_id=uuid.uuid4().hex,
            symbol="ETH/BTC",
            side="buy" if i % 2 == 0 else "sell",
            requested_qty=0.1,
            filled_qty=0.0 if i < errors else 0.1,
            status="ERROR" if i < errors else "FILLED",
            error="exchange timeout" if i < errors else "",
            created_at=now - timedelta(minutes=i),
        )
        for i in range(n)
    ]
    Order.objects.bulk_create(rows)


def seed_desk(users: dict[str, User], now: datetime | None = None) -> Desk:
    from django.utils import timezone

    now = now or timezone.now()
    deployment = make_deployment()
    rollout, phases = seed_rollout(deployment, users, now)
    seed_equity(deployment, now)
    seed_positions(deployment)
    seed_orders(deployment, now)
    return Desk(deployment=deployment, rollout=rollout, phases=phases, users=users)


# --------------------------------------------------------------------------- rehearsal day

REHEARSAL_DAY = date(2018, 1, 16)


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def rehearsal_candles(day: date = REHEARSAL_DAY, symbol: str = "ETH/BTC") -> list[dict]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    first, last = _ms(start), _ms(start + timedelta(days=1))
    name = symbol.replace("/", "_") + "-5m.csv"
    with (MARKET / name).open() as fh:
        rows = [r for r in csv.DictReader(fh) if first <= int(r["timestamp_ms"]) < last]
    return [
        {
            "exchange": "binance",
            "symbol": symbol,
            "timeframe": "5m",
            "open_time_ms": int(r["timestamp_ms"]),
            "open": float(r["open"]),
            "high": float(r["high"]),
            "low": float(r["low"]),
            "close": float(r["close"]),
            "volume": float(r["volume"]),
        }
        for r in rows
    ]


def _trade(deployment, ts: datetime, side: str, qty: float, price: float, purpose: str):
    from trading.models import Fill, Order

    order = Order.objects.create(
        deployment=deployment,
        client_order_id=uuid.uuid4().hex,
        purpose=purpose,
        symbol="ETH/BTC",
        side=side,
        requested_qty=qty,
        filled_qty=qty,
        reference_price=price,
        avg_fill_price=price,
        fee=qty * price * 0.001,
        status="FILLED",
        created_at=ts,
        submitted_at=ts,
        acked_at=ts + timedelta(milliseconds=180),
        latency_ms=180.0,
    )
    Fill.objects.create(order=order, qty=qty, price=price, fee=order.fee, ts=ts)
    return order


def seed_rehearsal_day(deployment, candles: list[dict]) -> dict[str, int]:
    """On the candle clock: a long entry every 24 candles closed 12 candles later, two
    rejected orders, equity snapshots per candle, gate evaluations every 30 min with a
    FAIL and the rollback it triggered."""
    from canary.models import GateEvaluation, Rollback, Rollout
    from trading.models import EquitySnapshot, Order

    times = [datetime.fromtimestamp(c["open_time_ms"] / 1000 + 300, tz=UTC) for c in candles]
    prices = [c["close"] for c in candles]
    for i in range(0, len(candles) - 12, 24):
        _trade(deployment, times[i], "buy", 1.0, prices[i], "entry")
        _trade(deployment, times[i + 12], "sell", 1.0, prices[i + 12], "exit")
    for i in (40, 41):
        Order.objects.create(
            deployment=deployment,
            client_order_id=uuid.uuid4().hex,
            symbol="ETH/BTC",
            side="buy",
            requested_qty=1.0,
            status="REJECTED",
            error="insufficient balance",
            created_at=times[i],
        )
    EquitySnapshot.objects.bulk_create(
        EquitySnapshot(
            deployment=deployment,
            ts=times[i],
            cash=0.5,
            positions_value=e - 0.5,
            equity=e,
            peak=peak,
            drawdown_pct=dd,
        )
        for i, (e, peak, dd) in enumerate(equity_path(prices, exposure=0.25))
    )
    rollout = Rollout.objects.create(
        deployment=deployment,
        name="rehearsal 2018-01-16",
        plan=PLAN,
        state="ROLLED_BACK",
        current_phase=2,
        rehearsal=True,
        created_at=times[0],
        started_at=times[0],
    )
    for i in range(0, len(times), 6):
        verdict = "FAIL" if i == 216 else ("WARNING" if i % 60 == 0 else "PASS")
        reasons = (
            ["drawdown_pct -3.1 <= -3.0 (circuit breaker)"]
            if verdict == "FAIL"
            else ["slippage_bps 16.2 >= 15.0 (target < 15.0)"]
            if verdict == "WARNING"
            else []
        )
        GateEvaluation.objects.create(
            rollout=rollout,
            evaluated_at=times[i],
            metrics=GOOD,
            verdict=verdict,
            reasons=reasons,
            action="ROLLBACK" if verdict == "FAIL" else "NONE",
        )
    Rollback.objects.create(
        deployment=deployment,
        rollout=rollout,
        trigger="gate",
        cause="drawdown_pct -3.1 <= -3.0 (circuit breaker)",
        requested_by="canary.monitor",
        state="COMPLETED",
        started_at=times[216],
        stage1_ended_at=times[216] + timedelta(seconds=11.4),
        ended_at=times[216] + timedelta(seconds=95),
    )
    return {"entries": len(range(0, len(candles) - 12, 24))}
