"""Builders of trading records and rollouts for the canary lifecycle tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from canary import services
from canary.models import PreflightRun, Rollout
from trading.models import Deployment, EquitySnapshot, MarketStream, Order, OrderStatus, Signal


@pytest.fixture
def fast_passwords(settings):
    """make_user hashes a password per user; the slow default hasher is not under test."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
GOOD_EVIDENCE = {"smc_alignment_pct": 85.0, "reward_risk": 3.5, "liquidation_sweep_errors": 0}
SHORT_PLAN = [
    {"allocation": 0.1, "min_duration_s": 60, "extension_s": 30},
    {"allocation": 0.5, "min_duration_s": 120, "extension_s": 30},
    {"allocation": 1.0, "min_duration_s": 180, "extension_s": 60},
]


def at(seconds: float, base: datetime = T0) -> datetime:
    return base + timedelta(seconds=seconds)


def make_deployment(
    name: str = "eth-canary", symbols: tuple[str, ...] = ("ETH/BTC",), **extra
) -> Deployment:
    values: dict[str, Any] = {
        "name": name,
        "exchange": "paper",
        "symbols": list(symbols),
        "timeframe": "5m",
        "params": {"min_score": 3},
        "full_order_notional": 1.0,
        "starting_cash": 10.0,
        "cash": 10.0,
    }
    values.update(extra)
    return Deployment.objects.create(**values)


def add_signal(deployment: Deployment, *, score: int = 4, when: datetime = T0) -> Signal:
    return Signal.objects.create(
        deployment=deployment,
        symbol="ETH/BTC",
        side="buy",
        entry=0.1,
        stop=0.09,
        target=0.14,
        reward_risk=4.0,
        score=score,
        ts_ms=int(when.timestamp() * 1000),
        created_at=when,
    )


def order(
    deployment: Deployment,
    *,
    when: datetime,
    status: str = OrderStatus.FILLED,
    requested: float = 1.0,
    filled: float | None = None,
    latency_ms: float | None = 100.0,
    acked_after_ms: float | None = None,
    slippage_bps: float | None = 2.0,
    signal: Signal | None = None,
    purpose: str = "entry",
    critical: bool = False,
) -> Order:
    """An unsaved order submitted at ``when``."""
    if filled is None:
        filled = requested if status == OrderStatus.FILLED else 0.0
    acked = None
    if acked_after_ms is not None:
        acked = when + timedelta(milliseconds=acked_after_ms)
    elif latency_ms is not None:
        acked = when + timedelta(milliseconds=latency_ms)
    return Order(
        deployment=deployment,
        signal=signal,
        client_order_id=uuid.uuid4().hex,
        purpose=purpose,
        symbol="ETH/BTC",
        side="buy",
        requested_qty=requested,
        filled_qty=filled,
        slippage_bps=slippage_bps,
        status=status,
        critical=critical,
        error="boom" if status in (OrderStatus.ERROR, OrderStatus.REJECTED) else "",
        created_at=when,
        submitted_at=when,
        acked_at=acked,
        latency_ms=latency_ms,
    )


def add_orders(deployment: Deployment, orders: list[Order]) -> list[Order]:
    return Order.objects.bulk_create(orders)


def healthy_orders(
    deployment: Deployment, n: int, *, start: datetime, step_s: float = 1.0, score: int = 4
) -> list[Order]:
    signal = add_signal(deployment, score=score, when=start)
    return add_orders(
        deployment,
        [order(deployment, when=at(i * step_s, start), signal=signal) for i in range(n)],
    )


def add_equity(deployment: Deployment, *, when: datetime, equity: float) -> EquitySnapshot:
    return EquitySnapshot.objects.create(
        deployment=deployment,
        ts=when,
        cash=equity,
        positions_value=0.0,
        equity=equity,
        peak=equity,
        drawdown_pct=0.0,
    )


def touch_stream(symbol: str = "ETH/BTC", *, when: datetime, timeframe: str = "5m") -> MarketStream:
    stream, _ = MarketStream.objects.update_or_create(
        exchange="binance",
        symbol=symbol,
        timeframe=timeframe,
        defaults={"last_received_at": when},
    )
    return stream


def go_preflight(when: datetime, decision: str = "GO") -> PreflightRun:
    return PreflightRun.objects.create(
        started_at=when - timedelta(seconds=5), ended_at=when, decision=decision, checks=[]
    )


def new_rollout(deployment: Deployment, *, actor: Any = "tests", **extra) -> Rollout:
    extra.setdefault("plan", SHORT_PLAN)
    extra.setdefault("now", T0)
    return services.rollout_create(deployment=deployment, name="canary v1", actor=actor, **extra)


def approve_both(rollout: Rollout, alpha: Any, planner: Any, *, when: datetime = T0) -> None:
    services.approval_record(
        rollout=rollout, role="alpha", actor=alpha, evidence=GOOD_EVIDENCE, now=when
    )
    services.approval_record(rollout=rollout, role="planner", actor=planner, now=when)
