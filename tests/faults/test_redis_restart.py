"""Redis restarted while candles stream in.

One run (module fixture) of uvicorn, a Celery worker, beat, an SMTP server and two
WebSocket clients on a private Redis (configured as `make run` configures its own: no
persistence).
Candles are POSTed one by one; while email deliveries are being sent and others wait in
the queue, Redis is stopped for 3 s and started again on its port. The feed retries what
failed, the clients reconnect; a worker that exited is started again, as a process
supervisor would. The delivery messages lost with Redis are queued again by the sweeper
(beat, every ALERTS_SWEEP_INTERVAL_S; a claim of a dead worker is taken over after
ALERTS_CLAIM_STALE_S, shortened here as a time scale). The tests below read what that run
left behind.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field

import pytest
import redis as redis_lib
from django.conf import settings

from .harness import (
    Streamer,
    Watcher,
    WatcherThread,
    engulfing_series,
    flush_database,
    private_stack,
    restart_if_dead,
    slow_smtp_server,
    tail,
    user_token,
    wait_for,
)

# The mark makes pytest-django create the test database; the tests themselves only read
# what the module's run collected.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CANDLES = 96
SLOW_AT = 32
DOWN_S = 3.0
SMTP_DELAY_S = 2.0
DEPLOYMENT_ID = 1_900_000_001
DELIVER_QUEUE = "alerts.deliver"  # config/settings.py CELERY_TASK_ROUTES
# Above a send's longest time here (SMTP_DELAY_S), so a claim still sending is never taken
# over; 120 s by default.
CLAIM_STALE_S = 15


Sample = tuple[float, float, bool, str]


@dataclass
class SwitchSampler:
    """Reads the kill switch through the order router's own reader every 20 ms and keeps
    (start, end, allowed, state) of each read."""

    deployment_id: int
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def run(self) -> None:
        from canary.killswitch import KillSwitchUnreadable, allows, read_state

        while not self._stop.is_set():
            started = time.monotonic()
            try:
                state = read_state(self.deployment_id)
                allowed, label = allows(state, reduce_only=False), state.value
            except KillSwitchUnreadable as exc:
                allowed, label = False, f"unreadable: {exc}"
            self.samples.append((started, time.monotonic(), allowed, label))
            time.sleep(0.02)

    def start(self) -> SwitchSampler:
        self._thread = threading.Thread(target=self.run, name="switch-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def within(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s[0] and s[1] <= end]


@dataclass
class ClientView:
    username: str
    live: list[int]
    snapshots: list[list[int]]
    seen: set[int]
    drops: int
    errors: list[str]
    sent_rows: set[int]


@dataclass
class Outcome:
    statuses: list[int]
    failures: int
    unprocessed: int
    got: list[tuple]
    want: list[tuple]
    delivered: set[int]
    email: dict[int, str]
    waiting_at_stop: dict[int, str]
    queued_at_stop: int
    clients: list[ClientView]
    before: list[Sample]
    during: list[Sample]
    after: list[Sample]
    worker_exited: bool
    logs: str


def _expected(stored: list) -> list[tuple]:
    from alerts.backtest import run_backtest
    from alerts.detectors import Candle as Bar
    from alerts.detectors import arrays_from_candles

    bars = [Bar(c.open_time_ms, c.open, c.high, c.low, c.close, c.volume) for c in stored]
    rows = run_backtest(
        arrays_from_candles(bars),
        symbol="ETH/BTC",
        timeframe="5m",
        rules=[],
        default_rate_limit_s=settings.ALERTS_RATE_LIMIT_S,
    )
    return sorted((r.ts, r.detector, r.direction, r.suppressed) for r in rows)


def _email_states() -> dict[int, str]:
    from alerts.models import Delivery

    rows = Delivery.objects.filter(channel="email", recipient="ops@example.com")
    return dict(rows.values_list("alert_id", "status"))


def _client_views(watchers: list[Watcher]) -> list[ClientView]:
    from alerts.models import Delivery

    views = []
    for watcher, username in zip(watchers, ("ops", "viewer"), strict=True):
        sent = Delivery.objects.filter(channel="websocket", user__username=username, status="sent")
        views.append(
            ClientView(
                username,
                list(watcher.live),
                list(watcher.snapshots),
                watcher.seen,
                watcher.drops,
                watcher.errors[:5],
                set(sent.values_list("alert_id", flat=True)),
            )  # fmt: skip
        )
    return views


def _run() -> Outcome:
    from django.test import override_settings

    from alerts.models import Alert, Delivery
    from canary import killswitch
    from canary.heartbeat import redis_client
    from trading.models import Candle, KillSwitch

    ops = user_token("ops", "Ops", email="ops@example.com")
    viewer = user_token("viewer", "Viewer")
    with (
        slow_smtp_server() as (sink, smtp_port),
        private_stack(
            {
                "EMAIL_URL": f"smtp://127.0.0.1:{smtp_port}",
                "ALERTS_CLAIM_STALE_S": str(CLAIM_STALE_S),
            },
            beat=True,
        ) as (live, redis),
        override_settings(REDIS_URL=redis.url),
    ):
        redis_client.cache_clear()
        killswitch.write_redis(DEPLOYMENT_ID, KillSwitch.ACTIVE)
        url = f"{live.ws_url}/ws/alerts/"
        watchers = [Watcher(url, token, live.base_url) for token in (ops, viewer)]
        clients = WatcherThread(watchers).start()
        sampler = SwitchSampler(DEPLOYMENT_ID).start()
        try:
            wait_for(
                lambda: all(w.connects for w in watchers),
                15,
                lambda: f"both clients connected ({[w.errors[-1:] for w in watchers]})",
            )
            streamer = Streamer(live, ops, engulfing_series(CANDLES), pace_s=0.08).start()
            wait_for(lambda: streamer.sent >= SLOW_AT, 60, f"{SLOW_AT} candles sent")
            sink.delay_s = SMTP_DELAY_S
            broker = redis_lib.Redis.from_url(redis.url)
            sending = Delivery.objects.filter(channel="email", status="sending")
            wait_for(
                lambda: sending.exists() and broker.llen(DELIVER_QUEUE) >= 3,
                20,
                "an email being sent while three wait in the broker",
            )
            waiting = Delivery.objects.filter(channel="email", status__in=["pending", "sending"])
            queued_at_stop = broker.llen(DELIVER_QUEUE)
            redis.stop()
            down_at = time.monotonic()
            waiting_at_stop = dict(waiting.values_list("alert_id", "status"))
            time.sleep(DOWN_S)
            up_at = time.monotonic()
            sink.delay_s = 0.0
            redis.start()
            time.sleep(1.5)
            worker_exited = restart_if_dead(live.stack)
            streamer.wait(timeout=120)
            assert streamer.done and streamer.sent == CANDLES, streamer
            unprocessed = Candle.objects.filter(processed_at__isnull=True)
            try:
                wait_for(lambda: not unprocessed.exists(), 30, "every candle processed")
                wait_for(lambda: all(w.connects >= 2 for w in watchers), 15, "clients back")
                time.sleep(2.0)  # the last broadcasts
                undelivered = Delivery.objects.filter(
                    channel="email", status__in=["pending", "retrying", "sending"]
                )
                wait_for(lambda: not undelivered.exists(), 60, "every email delivery done")
            except AssertionError:
                pass  # the tests say what is missing
        finally:
            clients.stop()
            sampler.stop()
            logs = tail(live.stack)
        redis_client.cache_clear()
        alerts = list(Alert.objects.filter(source="detector"))
        return Outcome(
            statuses=streamer.statuses,
            failures=streamer.failures,
            unprocessed=unprocessed.count(),
            got=sorted((a.event_ms, a.detector, a.direction, a.suppressed) for a in alerts),
            want=_expected(list(Candle.objects.order_by("open_time_ms"))),
            delivered={a.pk for a in alerts if not a.suppressed},
            email=_email_states(),
            waiting_at_stop=waiting_at_stop,
            queued_at_stop=queued_at_stop,
            clients=_client_views(watchers),
            before=sampler.within(0.0, down_at),
            during=sampler.within(down_at, up_at),
            after=sampler.within(up_at, time.monotonic()),
            worker_exited=worker_exited,
            logs=logs,
        )


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
    if result.worker_exited:
        warnings.warn(
            "the Celery worker died when Redis went away (kombu restore_unacked on a closed "
            "connection: 'Unrecoverable error'); the run restarted it as a supervisor would",
            stacklevel=1,
        )
    print(
        f"\nredis restart: {result.failures} failed POSTs retried; {len(result.delivered)} "
        f"alerts; email states {sorted(result.email.values())}; waiting at stop "
        f"{result.waiting_at_stop}; worker exited: {result.worker_exited}; ws live/snapshots "
        f"{[(len(c.live), len(c.snapshots)) for c in result.clients]}; switch after restart: "
        f"{result.after[-1][3] if result.after else '-'}"
    )
    return result


def test_every_candle_is_processed_and_the_alerts_are_the_offline_ones(outcome: Outcome):
    assert outcome.failures > 0, "the outage never touched the feed"
    assert set(outcome.statuses) <= {200, 201}, outcome.statuses
    assert outcome.unprocessed == 0, outcome.logs
    assert outcome.got == outcome.want, outcome.logs
    assert len(outcome.delivered) >= CANDLES // 4 - 1


def test_every_alert_has_its_delivery_rows_and_clients_reconcile(outcome: Outcome):
    assert set(outcome.email) == outcome.delivered
    for client in outcome.clients:
        name = client.username
        assert client.drops >= 1 and len(client.snapshots) >= 2, (name, client.errors)
        assert len(client.live) == len(set(client.live)), f"{name}: an alert received twice"
        assert outcome.delivered <= client.seen, (
            f"{name}: never saw {outcome.delivered - client.seen}"
        )
        assert client.sent_rows <= client.seen, f"{name}: sent per the database, never received"
        assert set(client.live) <= client.sent_rows, f"{name}: received live, no Delivery row"


def test_kill_switch_never_reads_allowed_while_redis_is_down(outcome: Outcome):
    assert len(outcome.during) >= 10, "too few reads during the outage"
    assert any(s[2] for s in outcome.before), "the switch was never ACTIVE before the outage"
    assert not [s for s in outcome.during if s[2]]
    assert not [s for s in outcome.after if s[2]], "allowed again with the key lost"


def test_every_email_delivery_is_sent_after_the_restart(outcome: Outcome):
    assert outcome.queued_at_stop > 0, "no delivery message was in the broker at the stop"
    assert set(outcome.email.values()) == {"sent"}, outcome.email
