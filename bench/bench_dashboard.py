"""Server time of the desk's first load: ``python -m bench.bench_dashboard``.

Seeds a throwaway database with a rollout in its 50 % phase, 10,000 orders, 10,000
alerts, 10,000 equity snapshots, 2,000 gate evaluations and 20,000 audit events, then
times the page (GET /, the HTML with the embedded first state) and the state poll (GET
/desk/state.json) through Django's request handler in this process (server time, no
network). Goal: first load < 300 ms. Also counts the queries of one load (no N+1: the
same count with 10 or 10,000 rows).

Runs against whatever DATABASE_URL says, in a scratch database (a temp file for SQLite;
``bench_dashboard`` on PostgreSQL, created and dropped here):

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres python -m bench.bench_dashboard
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.common import scratch_database, setup_django

ROOT = Path(__file__).resolve().parent.parent
ORDERS = ALERTS = EQUITY = 10_000
EVALUATIONS = 2_000
AUDIT = 20_000
ROUNDS = 30
GOAL_MS = 300.0


def _users() -> dict[str, Any]:
    from django.contrib.auth.models import Group, User

    from audit.roles import ensure_roles

    ensure_roles()
    users = {}
    for role in ("Ops", "Viewer", "Alpha", "Planner"):
        user = User.objects.create_user(username=role.lower(), email=f"{role.lower()}@x.test")
        user.groups.add(Group.objects.get(name=role))
        users[role] = user
    return users


def _bulk(model: Any, rows: Iterator[Any]) -> None:
    model.objects.bulk_create(rows, batch_size=2000)


def seed(orders: int, alerts: int, equity: int, evaluations: int, audit: int) -> Any:
    """The desk of the tests, grown to the given sizes."""
    from django.utils import timezone

    from alerts.models import Alert
    from audit.models import AuditEvent
    from canary.models import GateEvaluation
    from tests.desk.factories import GOOD, seed_desk
    from trading.models import EquitySnapshot, Order

    now = timezone.now()
    desk = seed_desk(_users(), now)
    dep, ops = desk.deployment, desk.users["Ops"]
    _bulk(
        Order,
        (
            Order(
                deployment=dep,
                client_order_id=uuid.uuid4().hex,
                symbol="ETH/BTC" if i % 2 else "LTC/BTC",
                side="buy" if i % 3 else "sell",
                requested_qty=0.1,
                filled_qty=0.1,
                status="FILLED" if i % 50 else "ERROR",
                created_at=now - timedelta(seconds=30 * i),
                submitted_at=now - timedelta(seconds=30 * i),
                latency_ms=150.0 + i % 200,
            )
            for i in range(orders)
        ),
    )
    _bulk(
        Alert,
        (
            Alert(
                detector=("volatility", "engulfing", "breakout")[i % 3],
                symbol="ETH/BTC",
                timeframe="5m",
                message="bench",
                dedupe_key=f"bench:{i}",
                event_ms=int((now - timedelta(seconds=60 * i)).timestamp() * 1000),
                detected_at=now - timedelta(seconds=60 * i),
                acknowledged_at=now - timedelta(seconds=60 * i - 5) if i % 4 else None,
                acknowledged_by=ops if i % 4 else None,
            )
            for i in range(alerts)
        ),
    )
    _bulk(
        EquitySnapshot,
        (
            EquitySnapshot(
                deployment=dep,
                ts=now - timedelta(hours=25, seconds=30 * i),
                cash=1.0,
                positions_value=0.0,
                equity=1.0 + (i % 97) / 1000,
                peak=1.1,
                drawdown_pct=-((i % 89) / 100),
            )
            for i in range(equity)
        ),
    )
    _bulk(
        GateEvaluation,
        (
            GateEvaluation(
                rollout=desk.rollout,
                phase=desk.phases[0],
                evaluated_at=now - timedelta(hours=2, seconds=10 * i),
                metrics=GOOD,
                verdict="PASS",
            )
            for i in range(evaluations)
        ),
    )
    _bulk(
        AuditEvent,
        (
            AuditEvent(
                seq=1_000_000 + i,
                created_at=now - timedelta(seconds=i),
                actor="bench",
                action="alert.create" if i % 10 else "alert.acknowledge",
                payload={},
                prev_hash="0" * 64,
                hash=uuid.uuid4().hex * 2,
            )
            for i in range(audit)
        ),
    )
    return desk


def _time(call: Callable[[], Any], rounds: int, before: Callable[[], None]) -> list[float]:
    samples = []
    for _ in range(rounds):
        before()
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def _queries(client: Any, path: str) -> int:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as ctx:
        client.get(path, HTTP_ACCEPT="application/json")
    return len(ctx.captured_queries)


def _p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20)[-1]


def _row(figure: str, value: float, unit: str, goal: str, ok: bool) -> dict:
    return {"figure": figure, "value": round(value, 1), "unit": unit, "goal": goal, "ok": ok}


def measure() -> list[dict]:
    from django.test import Client

    from canary import dashboard

    desk = seed(ORDERS, ALERTS, EQUITY, EVALUATIONS, AUDIT)
    client = Client()
    client.force_login(desk.users["Ops"])

    def get(path: str) -> Callable[[], Any]:
        def call() -> None:
            response = client.get(path, HTTP_ACCEPT="text/html,application/json")
            assert response.status_code == 200, response.status_code

        return call

    def cold() -> None:
        dashboard._health_cache.clear()

    get("/")()  # warm: templates, imports, connection
    page = _time(get("/"), ROUNDS, cold)
    state = _time(get("/desk/state.json"), ROUNDS, lambda: None)
    queries = _queries(client, "/")
    sizes = "10k orders, 10k alerts, 10k equity, 20k audit"
    return [
        _row(
            f"desk first load (GET /, cold health check), p95 ({sizes})",
            _p95(page),
            "ms",
            f"< {GOAL_MS:.0f} ms",
            _p95(page) < GOAL_MS,
        ),
        _row(
            "desk first load, median",
            statistics.median(page),
            "ms",
            f"< {GOAL_MS:.0f} ms",
            statistics.median(page) < GOAL_MS,
        ),
        _row(
            "desk state poll (GET /desk/state.json), p95",
            _p95(state),
            "ms",
            f"< {GOAL_MS:.0f} ms",
            _p95(state) < GOAL_MS,
        ),
        _row("queries per first load", queries, "queries", "<= 22, constant", queries <= 22),
    ]


def run() -> list[dict]:
    setup_django()
    with scratch_database("bench_dashboard"):
        return measure()


if __name__ == "__main__":
    for row in run():
        mark = "ok" if row["ok"] else "FALLS SHORT"
        print(f"{row['figure']}: {row['value']} {row['unit']} (goal {row['goal']}) {mark}")
