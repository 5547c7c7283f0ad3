"""A Celery worker SIGKILLed in the middle of delivering an alert, and another in the
middle of placing an order, while candles stream in.

One run (module fixture) of uvicorn, beat and one-process Celery workers (one task in
flight at a time, so each kill hits exactly the task named) on a private Redis, trading a
binance deployment against the Binance stub, with an SMTP server:

1. warm-up candles (real ETH/BTC 5m prices moved to now; no email recipient yet);
2. candles up to the first buy signal stream in, one per request, with slow email: worker
   1 is killed while an email is being sent; worker 2 starts;
3. the buy signal's candle: its entry order reaches the stub, which holds the reply;
   worker 2 is killed with the order placed at the exchange and PENDING in the database;
   worker 3 starts and the reconciliation (beat) settles the order before the next
   candle, as it does within one candle in production (every
   TRADING_RECONCILE_INTERVAL_S, after TRADING_UNKNOWN_GRACE_S);
4. the next candles carry buy signals again: a long must not be entered twice. (They need
   no decision: the dead worker's decision lock, trading:decide, is held until its 60 s
   expiry; on a real 1m-or-longer candle clock it has expired by the next candle.)

The run is then compared with what should have happened: the alerts the detectors find
offline on the stored series, and a reference deployment run in-process (no faults) over
the same candles for signals and orders.
"""

from __future__ import annotations

import csv
import json
import random
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from django.conf import settings

from tests.trading.binance_stub import API_KEY, API_SECRET, BinanceStub

from .harness import (
    ROOT,
    Streamer,
    flush_database,
    private_stack,
    slow_smtp_server,
    tail,
    user_token,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

FRAME_MS = 300_000
WARMUP = 40
AFTER = 11
ORDER = ("POST", "/api/v3/order")


def market_candles(count: int) -> list[dict[str, Any]]:
    """Real ETH/BTC 5m candles as the binance market, moved so that the warm-up ends with
    the bar open now (the router refuses signals of candles that closed long ago)."""
    with (ROOT / "data" / "market" / "ETH_BTC-5m.csv").open() as handle:
        rows = list(csv.DictReader(handle))[:count]
    now_ms = int(time.time() * 1000)
    base = now_ms - now_ms % FRAME_MS - (WARMUP - 1) * FRAME_MS
    return [
        {
            "exchange": "binance",
            "symbol": "ETH/BTC",
            "timeframe": "5m",
            "open_time_ms": base + i * FRAME_MS,
            **{k: float(row[k]) for k in ("open", "high", "low", "close", "volume")},
        }
        for i, row in enumerate(rows)
    ]


def first_buy(candles: list[dict[str, Any]]) -> int:
    from trading.signals import SignalEngine

    engine = SignalEngine()
    for i, c in enumerate(candles):
        keys = ("open_time_ms", "open", "high", "low", "close", "volume")
        hit = engine.update(tuple(c[k] for k in keys))
        if hit is not None and hit.side == "buy" and i >= WARMUP:
            return i
    raise AssertionError("no buy signal after the warm-up")


def post(live, token: str, items: list[dict[str, Any]]) -> None:
    status, body = live.request("POST", "/api/v1/market/candles", items, token)
    assert status in (200, 201), body


PIPELINE = ("alerts.process_candles", "alerts.deliver", "trading.process_candles_strategy")
TASK_LINE = re.compile(r"Task ([\w.]+)\[([0-9a-f-]+)\] (received|succeeded|raised|retry)")


def in_flight(stack, names: tuple[str, ...] = PIPELINE) -> int:
    """Tasks of these names received and not finished by the workers still running."""
    pending: set[str] = set()
    for name, proc in stack.procs.items():
        log = stack.log_dir / f"{name}.log"
        if not name.startswith("w") or proc.poll() is not None or not log.exists():
            continue
        for task, task_id, what in TASK_LINE.findall(log.read_text(errors="replace")):
            if task in names:
                (pending.add if what == "received" else pending.discard)(task_id)
    return len(pending)


def queued(client: Any, names: tuple[str, ...] = PIPELINE) -> int:
    """Messages of these tasks waiting in the broker's queues (deliveries have their own)."""
    waiting = 0
    for queue in ("celery", "alerts.deliver"):
        for raw in client.lrange(queue, 0, -1):
            task = json.loads(raw).get("headers", {}).get("task")
            waiting += task in names
    return waiting


def wait_idle(stack, broker: str, timeout: float = 60) -> None:
    """No pipeline task waits in the broker or runs (beat's periodic tasks may)."""
    import redis

    client = redis.Redis.from_url(broker)
    wait_for(lambda: queued(client) == 0 and in_flight(stack) == 0, timeout, "workers idle", 0.3)


@dataclass
class Outcome:
    got: list[tuple]
    want: list[tuple]
    signals: list[tuple]
    orders: list[tuple]
    reference: tuple[list[tuple], list[tuple]]
    order_in_flight: str
    stub_orders: list[tuple[str, str, str]]
    stub_base: float
    position: float
    deliveries: dict[int, list[str]]
    mails: Counter
    sending_at_kill: set[int]
    logs: str


def _signals(deployment_id: int) -> list[tuple]:
    from trading.models import Signal

    rows = Signal.objects.filter(deployment_id=deployment_id).select_related("candle")
    return sorted((s.candle.open_time_ms, s.side, s.score) for s in rows)


def _orders(deployment_id: int) -> list[tuple]:
    from trading.models import Order

    rows = Order.objects.filter(deployment_id=deployment_id).select_related("signal__candle")
    return [
        (
            o.purpose,
            o.side,
            o.signal.candle.open_time_ms if o.signal_id else None,
            round(o.reference_price or 0.0, 10),
            o.status,
        )
        for o in rows.order_by("created_at", "pk")
    ]


def _reference(deployment_kw: dict[str, Any]) -> tuple[list[tuple], list[tuple]]:
    """The same strategy over the same candles, in this process, on a paper exchange."""
    from canary import killswitch
    from trading import strategy
    from trading.models import Candle, Deployment, KillSwitch

    fields = {**deployment_kw, "name": "faults-kill-reference", "exchange": "paper",
              "kill_switch": KillSwitch.ACTIVE}  # fmt: skip
    ref = Deployment.objects.create(id=random.randint(10**8, 2 * 10**9), **fields)
    killswitch.write_redis(ref.pk, KillSwitch.ACTIVE)
    candles = list(Candle.objects.filter(late=False).order_by("open_time_ms"))
    strategy.reset_engines()
    strategy.stream_run(deployment=ref, candles=candles)
    return _signals(ref.pk), _orders(ref.pk)


def _expected_alerts() -> list[tuple]:
    from alerts.backtest import run_backtest
    from alerts.detectors import Candle as Bar
    from alerts.detectors import arrays_from_candles
    from trading.models import Candle

    stored = Candle.objects.order_by("open_time_ms")
    bars = [Bar(c.open_time_ms, c.open, c.high, c.low, c.close, c.volume) for c in stored]
    rows = run_backtest(
        arrays_from_candles(bars),
        symbol="ETH/BTC",
        timeframe="5m",
        rules=[],
        default_rate_limit_s=settings.ALERTS_RATE_LIMIT_S,
    )
    return sorted((r.ts, r.detector, r.direction, r.suppressed) for r in rows)


def _worker_env(stub: BinanceStub, smtp_port: int) -> dict[str, str]:
    return {
        "EMAIL_URL": f"smtp://127.0.0.1:{smtp_port}",
        "TRADING_EXCHANGE_BASE_URL": stub.base_url,
        "TRADING_EXCHANGE_API_KEY": API_KEY,
        "TRADING_EXCHANGE_API_SECRET": API_SECRET,
        "TRADING_EXCHANGE_TIMEOUT_MS": "15000",
        "TRADING_RECONCILE_INTERVAL_S": "2",
        "HEARTBEAT_INTERVAL_S": "5",
        "TRADING_UNKNOWN_GRACE_S": "1",
        "SAFETY_WATCHDOG_INTERVAL_S": "60",
        "CANARY_MONITOR_INTERVAL_S": "60",
        # The claim of the worker killed mid-send is taken over after this (120 s by
        # default; above a send's longest time here, so a live send is never taken over).
        "ALERTS_CLAIM_STALE_S": "15",
    }


def _start(stack, name: str, concurrency: int = 1) -> None:
    stack.start_worker(name=name, concurrency=concurrency)


def _kill_while_mailing(live, token: str, sink, candles: list[dict[str, Any]]) -> set[int]:
    """Stream `candles` with slow mail; kill worker 1 while an email is being sent."""
    from django.contrib.auth.models import User

    from alerts.models import Delivery

    User.objects.filter(username="ops").update(email="ops@example.com")
    sink.delay_s = 1.5
    streamer = Streamer(live, token, candles, pace_s=0.1).start()
    sending = Delivery.objects.filter(channel="email", status="sending")
    wait_for(sending.exists, 60, "an email being sent")
    live.stack.kill("w1", signal.SIGKILL)
    at_kill = set(sending.values_list("alert_id", flat=True))
    sink.delay_s = 0.0
    _start(live.stack, "w2")
    streamer.wait(timeout=60)
    assert streamer.sent == len(candles), streamer
    return at_kill


def _kill_while_ordering(live, token: str, stub: BinanceStub, entry: dict[str, Any]) -> str:
    """Post the entry candle; kill worker 2 while its order is at the exchange with the
    reply held back; worker 3 starts; wait for the reconciliation to settle the order."""
    from trading.models import Order

    stub.timeout_sleep_s = 5.0
    stub.accept_then_timeout()
    post(live, token, [entry])
    wait_for(lambda: stub.orders, 30, "the entry order at the exchange")
    live.stack.kill("w2", signal.SIGKILL)
    [in_flight] = Order.objects.all()
    _start(live.stack, "w3", concurrency=2)
    wait_for(
        lambda: Order.objects.get(pk=in_flight.pk).status != "PENDING",
        30,
        "the reconciliation settling the order of the dead worker",
    )
    return in_flight.status


def _wait_for_emails(timeout: float = 60) -> None:
    """The email of worker 1's kill is sent again by the sweeper (beat) once its claim is
    stale; the test on the deliveries says what is missing after the timeout."""
    import contextlib

    from alerts.models import Delivery

    waiting = Delivery.objects.filter(
        channel="email", status__in=["pending", "retrying", "sending"]
    )
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not waiting.exists(), timeout, "every email delivery done", 0.3)


def _collect(deployment, stub: BinanceStub, sink, logs: str, **kw: Any) -> Outcome:
    from alerts.models import Alert, Delivery
    from trading.models import Position

    deliveries: dict[int, list[str]] = {}
    for alert_id, status in Delivery.objects.filter(channel="email").values_list(
        "alert_id", "status"
    ):
        deliveries.setdefault(alert_id, []).append(status)
    alerts = Alert.objects.filter(source="detector")
    free, locked = stub.balance("ETH")
    return Outcome(
        got=sorted(alerts.values_list("event_ms", "detector", "direction", "suppressed")),
        want=_expected_alerts(),
        signals=_signals(deployment.pk),
        orders=_orders(deployment.pk),
        stub_orders=[(o.client_order_id, o.side, o.status) for o in stub.orders.values()],
        stub_base=float(free + locked),
        position=sum(Position.objects.filter(deployment=deployment).values_list("qty", flat=True)),
        deliveries=deliveries,
        mails=Counter(m.message["X-Alert-Id"] for m in sink.messages),
        logs=logs,
        **kw,
    )


DEPLOYMENT = {
    "name": "faults-kill",
    "symbols": ["ETH/BTC"],
    "timeframe": "5m",
    "params": {},
    "full_order_notional": 0.1,
    "allocation": 0.1,
    "starting_cash": 1.0,
    "cash": 1.0,
    "quote_currency": "BTC",
}


def _run() -> Outcome:
    from django.test import override_settings

    from canary import killswitch
    from canary.heartbeat import redis_client
    from trading.models import Candle, Deployment, KillSwitch

    token = user_token("ops", "Ops")
    candles = market_candles(WARMUP + AFTER)
    entry_at = first_buy(candles)
    with (
        BinanceStub(balances={"BTC": 1.0}) as stub,
        slow_smtp_server() as (sink, smtp_port),
        private_stack(_worker_env(stub, smtp_port), worker=False, beat=True) as (live, redis),
        override_settings(REDIS_URL=redis.url, TRADING_PAPER_MARKET_EXCHANGE="binance"),
    ):
        redis_client.cache_clear()
        deployment = Deployment.objects.create(
            id=random.randint(10**8, 2 * 10**9),
            exchange="binance",
            kill_switch=KillSwitch.ACTIVE,
            **DEPLOYMENT,
        )
        killswitch.write_redis(deployment.pk, KillSwitch.ACTIVE)
        _start(live.stack, "w1")
        try:
            post(live, token, candles[:WARMUP])
            sending_at_kill = _kill_while_mailing(live, token, sink, candles[WARMUP:entry_at])
            wait_idle(live.stack, redis.url)
            order_in_flight = _kill_while_ordering(live, token, stub, candles[entry_at])
            for item in candles[entry_at + 1 :]:
                post(live, token, [item])
            unprocessed = Candle.objects.filter(processed_at__isnull=True)
            wait_for(lambda: not unprocessed.exists(), 60, "every candle processed")
            _wait_for_emails()
            wait_idle(live.stack, redis.url)
        finally:
            logs = tail(live.stack)
        outcome = _collect(
            deployment, stub, sink, logs,
            order_in_flight=order_in_flight, sending_at_kill=sending_at_kill,
            reference=_reference(DEPLOYMENT),
        )  # fmt: skip
        redis_client.cache_clear()
    return outcome


@pytest.fixture(scope="module")
def outcome(django_db_setup, django_db_blocker, request) -> Outcome:
    if request.config.redis_problem:
        pytest.skip(request.config.redis_problem)
    with django_db_blocker.unblock():
        try:
            result = _run()
        except Exception as exc:  # not an AssertionError: no xfail may swallow it
            raise RuntimeError(f"the scenario did not run: {exc}") from exc
        finally:
            flush_database()
    print(
        f"\nworker kill: order at kill 1 {result.order_in_flight}; orders {len(result.orders)} "
        f"(reference {len(result.reference[1])}); signals {len(result.signals)}; "
        f"emails per status {Counter(s for v in result.deliveries.values() for s in v)}; "
        f"sending at kill 2 {result.sending_at_kill}\n  orders {result.orders}\n  "
        f"reference {result.reference[1]}"
    )
    return result


def test_no_alert_is_missing_or_doubled(outcome: Outcome):
    assert outcome.got == outcome.want, outcome.logs


def test_the_order_of_the_dead_worker_is_settled_once_and_nothing_is_doubled(outcome: Outcome):
    assert outcome.order_in_flight == "PENDING"
    ids = [cid for cid, _, _ in outcome.stub_orders]
    assert len(ids) == len(set(ids)), "a client order id reached the exchange twice"
    assert all(status == "FILLED" for _, _, status in outcome.stub_orders)
    assert outcome.stub_base == pytest.approx(outcome.position, abs=1e-9)
    assert all(o[-1] in ("FILLED", "REJECTED") for o in outcome.orders), outcome.orders


def test_no_signal_or_order_is_missing_or_doubled(outcome: Outcome):
    reference_signals, reference_orders = outcome.reference
    assert outcome.signals == reference_signals
    placed = [o[:4] for o in outcome.orders if o[-1] == "FILLED"]
    wanted = [o[:4] for o in reference_orders if o[-1] == "FILLED"]
    assert placed == wanted
    assert placed, "the run placed no order"


def test_no_email_is_doubled(outcome: Outcome):
    assert outcome.sending_at_kill
    assert all(len(rows) == 1 for rows in outcome.deliveries.values())
    assert all(count == 1 for count in outcome.mails.values()), outcome.mails


def test_every_email_delivery_ends_sent(outcome: Outcome):
    assert outcome.sending_at_kill
    statuses = Counter(s for rows in outcome.deliveries.values() for s in rows)
    assert set(statuses) == {"sent"}, statuses


def _signal(deployment, candle, now) -> Any:
    from trading.models import Signal

    return Signal.objects.create(
        deployment=deployment, candle=candle, symbol=candle.symbol, side="buy",
        entry=candle.close, stop=candle.close * 0.98, target=candle.close * 1.08,
        reward_risk=4.0, score=3, ts_ms=candle.open_time_ms, created_at=now,
    )  # fmt: skip


def test_an_entry_left_pending_by_a_dead_worker_blocks_the_next_entry(
    deployment_factory, redis_url, settings
):
    from datetime import timedelta

    from django.utils import timezone

    from canary import killswitch
    from tests.safety.helpers import fresh_market
    from trading import execution
    from trading.models import Candle, KillSwitch, Order

    now = timezone.now()
    deployment = deployment_factory()
    killswitch.write_redis(deployment.pk, KillSwitch.ACTIVE)
    fresh_market(deployment, now=now, bars=3)
    older, latest = Candle.objects.order_by("-open_time_ms")[1::-1]
    settings.TRADING_SIGNAL_MAX_AGE_S = 3600.0
    first = _signal(deployment, older, now)
    dead = Order.objects.create(
        deployment=deployment, signal=first, client_order_id=execution.entry_client_id(first),
        symbol=first.symbol, side="buy", requested_qty=1.0, reference_price=first.entry,
        created_at=now - timedelta(seconds=20),
    )  # fmt: skip
    second = _signal(deployment, latest, now)
    try:
        placed = execution.order_for_signal(signal=second, now=now)
    except execution.OrderRefused:
        placed = None
    assert placed is None, f"second entry {placed.status} while {dead.client_order_id} PENDING"
