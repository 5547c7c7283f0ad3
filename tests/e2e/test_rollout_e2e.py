"""A rollout end to end on real processes: uvicorn, a Celery worker and beat on the test
database and the real Redis. Candles are POSTed to the API; the worker runs the strategy
and places paper orders; beat drives the canary monitor. Phase durations are seconds."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from .conftest import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parents[2]
EVIDENCE = {"smc_alignment_pct": 84.0, "reward_risk": 3.4, "liquidation_sweep_errors": 0}
FAST_PLAN = [
    {"allocation": 0.1, "min_duration_s": 3, "extension_s": 2},
    {"allocation": 0.5, "min_duration_s": 3, "extension_s": 2},
    {"allocation": 1.0, "min_duration_s": 3, "extension_s": 2},
]
# This strategy's signals score 3 of 4: the confluence gate is set where they pass.
THRESHOLDS = {"min_orders": 1, "confluence_avg_target": 3.0, "confluence_avg_fail": 2.5}


class Candles:
    """Real ETH/BTC 5m prices, POSTed one candle at a time as the paper market. Their times
    are moved to now (the warm-up ends with the candle open now, the rest follow 5 min
    apart): the order router refuses signals of candles that closed long ago."""

    FRAME_MS = 300_000
    WARMUP = 40

    def __init__(self, live_stack, token: str):
        with (ROOT / "data" / "market" / "ETH_BTC-5m.csv").open() as handle:
            self.rows = list(csv.DictReader(handle))
        self.live_stack, self.token, self.next = live_stack, token, 0
        now_ms = int(time.time() * 1000)
        self.base_ms = now_ms - now_ms % self.FRAME_MS - (self.WARMUP - 1) * self.FRAME_MS

    def post(self, count: int = 1) -> None:
        items = []
        for index in range(self.next, self.next + count):
            row = self.rows[index]
            items.append(
                {
                    "exchange": "paper",
                    "symbol": "ETH/BTC",
                    "timeframe": "5m",
                    "open_time_ms": self.base_ms + index * self.FRAME_MS,
                    **{k: float(row[k]) for k in ("open", "high", "low", "close", "volume")},
                }
            )
        self.next += count
        status, body = self.live_stack.request("POST", "/api/v1/market/candles", items, self.token)
        assert status == 201, body


def _start_beat(live_stack) -> None:
    if "beat" not in live_stack.stack.procs:
        live_stack.stack.env["CANARY_MONITOR_INTERVAL_S"] = "1"
    live_stack.start_beat()


def _gate_one(live_stack, make_user, api_token, plan, thresholds):
    """Deployment, rollout, pre-flight against the paper exchange, both approvals and the
    start, through the services and the API as people would."""
    from canary import services
    from canary.preflight import preflight_run
    from trading.models import Deployment

    tokens = {role: api_token(role.lower(), role) for role in ("Alpha", "Planner", "Ops")}
    deployment = Deployment.objects.create(
        name="e2e-canary",
        exchange="paper",
        symbols=["ETH/BTC"],
        timeframe="5m",
        params={},
        full_order_notional=0.1,
        starting_cash=1.0,
        cash=1.0,
    )
    rollout = services.rollout_create(
        deployment=deployment, name="e2e", plan=plan, thresholds=thresholds, actor="e2e"
    )
    candles = Candles(live_stack, tokens["Ops"])
    candles.post(Candles.WARMUP)  # the signal engine's warm-up; a price for the paper exchange
    wait_until(lambda: _stored_candles() == Candles.WARMUP, timeout=30)
    run = preflight_run(
        actor=make_user("preflighter", "Ops"),
        deployment=deployment,
        names=["env", "exchange_rest", "database", "order_test"],
    )
    assert run.decision == "GO", run.checks
    base = f"/api/v1/rollouts/{rollout.pk}"
    status, body = live_stack.request(
        "POST", f"{base}/approvals", {"role": "alpha", "evidence": EVIDENCE}, tokens["Alpha"]
    )
    assert status == 201, body
    status, body = live_stack.request(
        "POST", f"{base}/approvals", {"role": "planner"}, tokens["Planner"]
    )
    assert status == 201, body
    status, body = live_stack.request("POST", f"{base}/start", {}, tokens["Ops"])
    assert status == 200, body
    assert (body["state"], body["current_phase"]) == ("RUNNING", 1)
    return rollout, candles, tokens


def _stored_candles() -> int:
    from trading.models import Candle

    return Candle.objects.count()


def _kill_switch(deployment_id: int) -> str:
    from canary import killswitch

    return killswitch.read_state(deployment_id).value


def test_rollout_through_gate_one_and_three_phases_to_live(live_stack, make_user, api_token):
    from audit.models import AuditEvent
    from canary.models import GateEvaluation, Phase, Rollout
    from trading.models import Deployment, Order

    rollout, candles, tokens = _gate_one(live_stack, make_user, api_token, FAST_PLAN, THRESHOLDS)
    assert wait_until(lambda: _kill_switch(rollout.deployment_id) == "ACTIVE", timeout=10)
    _start_beat(live_stack)
    deadline = time.monotonic() + 75
    while time.monotonic() < deadline:
        state = Rollout.objects.values_list("state", flat=True).get(pk=rollout.pk)
        if state not in ("RUNNING",):
            break
        candles.post()
        time.sleep(0.25)
    rollout.refresh_from_db()
    assert rollout.state == "LIVE", (rollout.state, rollout.state_reason, live_stack.stack.dead())

    phases = list(Phase.objects.filter(rollout=rollout).order_by("index"))
    assert [(p.index, p.allocation, p.outcome) for p in phases] == [
        (1, 0.1, "PROMOTED"),
        (2, 0.5, "PROMOTED"),
        (3, 1.0, "LIVE"),
    ]
    decisions = list(
        GateEvaluation.objects.filter(rollout=rollout)
        .exclude(action="NONE")
        .exclude(action="EXTEND")
        .order_by("evaluated_at")
        .values_list("phase__index", "verdict", "action")
    )
    assert decisions == [(1, "PASS", "PROMOTE"), (2, "PASS", "PROMOTE"), (3, "PASS", "MARK_LIVE")]
    for phase in phases:
        orders = Order.objects.filter(
            deployment_id=rollout.deployment_id, submitted_at__gt=phase.started_at
        ).exclude(purpose="flatten")
        if phase.ended_at:
            orders = orders.filter(submitted_at__lte=phase.ended_at)
        assert orders.exists(), f"no paper order in phase {phase.index}"
    deployment = Deployment.objects.get(pk=rollout.deployment_id)
    assert (deployment.allocation, deployment.kill_switch) == (1.0, "ACTIVE")
    assert _kill_switch(deployment.pk) == "ACTIVE"
    trail = list(
        AuditEvent.objects.filter(target_type="canary.Rollout", target_id=str(rollout.pk))
        .order_by("seq")
        .values_list("action", "actor")
    )
    assert ("rollout.start", "ops") in trail
    assert [a for a in trail if a[0] in ("rollout.promote", "rollout.live")] == [
        ("rollout.promote", "canary-monitor"),
        ("rollout.promote", "canary-monitor"),
        ("rollout.live", "canary-monitor"),
    ]
    status, exported = live_stack.request(
        "GET", f"/api/v1/rollouts/{rollout.pk}/export", token=tokens["Ops"]
    )
    assert status == 200
    assert [p["outcome"] for p in exported["phases"]] == ["PROMOTED", "PROMOTED", "LIVE"]


def test_breaker_trip_starts_the_rollback(live_stack, make_user, api_token):
    from canary.models import GateEvaluation, Rollback, Rollout
    from trading.models import EquitySnapshot

    slow_plan = [dict(p, min_duration_s=600) for p in FAST_PLAN]
    rollout, candles, _ = _gate_one(live_stack, make_user, api_token, slow_plan, THRESHOLDS)
    _start_beat(live_stack)
    assert wait_until(lambda: GateEvaluation.objects.filter(rollout=rollout).exists(), timeout=30)
    from django.utils import timezone

    for equity in (1.0, 0.95):  # marked to market: -5 %, past the -3 % breaker
        EquitySnapshot.objects.create(
            deployment_id=rollout.deployment_id,
            ts=timezone.now(),
            cash=equity,
            positions_value=0.0,
            equity=equity,
            peak=1.0,
            drawdown_pct=(equity - 1.0) * 100,
        )

    def rolled_back():
        candles.post()
        return Rollback.objects.filter(rollout=rollout).first()

    rollback = wait_until(rolled_back, timeout=45, interval=0.5)
    assert rollback.trigger == "gate"
    assert "drawdown_pct -5.0 <= -3.0 (circuit breaker)" in rollback.reasons
    rollout.refresh_from_db()
    assert rollout.state in ("ROLLING_BACK", "ROLLED_BACK")
    failed = GateEvaluation.objects.filter(rollout=rollout, verdict="FAIL").get()
    assert failed.action == "ROLLBACK"
    assert wait_until(
        lambda: _kill_switch(rollout.deployment_id) in ("REDUCING", "HALTED"), timeout=10
    )
    assert Rollout.objects.get(pk=rollout.pk).current_phase == 1
