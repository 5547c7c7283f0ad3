"""Fan-out of processed candles: WebSocket rows written with the alert and marked after
the broadcast, a backlog recorded in one go, the alerts queue. Real Redis (presence
registry, broadcast channel); the web processes are played by a subscriber."""

from __future__ import annotations

import asyncio
import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from .helpers import engulfing_pair

pytestmark = pytest.mark.django_db


@pytest.fixture
def web(redis_url):
    """A subscriber to the alert broadcast, as each web process holds."""
    from alerts import hub, presence

    pubsub = presence.sync_client().pubsub()
    pubsub.subscribe(hub._channel())
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"

    def received() -> list[list[dict]]:
        got = []
        while (message := pubsub.get_message(timeout=0.5)) is not None:
            got.append(json.loads(message["data"]))
        return got

    yield received
    pubsub.close()


def _connect(channel: str, user, **filters) -> None:
    from alerts import presence
    from alerts.rules import parse_filters

    assert asyncio.run(presence.announce(channel, user.pk, parse_filters(filters)))


def _stored(items: list[dict], django_capture_on_commit_callbacks) -> list[int]:
    """Candles stored, their processing not run."""
    from trading.services import candles_ingest

    with django_capture_on_commit_callbacks(execute=False):
        return candles_ingest(items=items, actor="test").created_ids


def _websocket_rows() -> list[tuple[str, str, str]]:
    from alerts.models import Delivery

    rows = Delivery.objects.filter(channel="websocket")
    return sorted(rows.values_list("user__username", "status", "error"))


def test_websocket_rows_are_written_with_the_alert_and_marked_sent_after_the_broadcast(
    alert_settings, make_user, web, django_capture_on_commit_callbacks
):
    from alerts.models import Alert
    from alerts.services import candles_process
    from audit.models import AuditEvent

    _connect("c1", make_user("viewer", "Viewer"))
    _connect("c2", make_user("picky", "Viewer"), detectors=["volatility"])
    _connect("c3", make_user("gone", "Viewer", is_active=False))
    ids = _stored(engulfing_pair(0, 100.0), django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=False) as after_commit:
        [alert] = candles_process(candle_ids=ids)
    assert _websocket_rows() == [("viewer", "pending", "")]
    assert web() == []

    for callback in after_commit:
        callback()
    [[message]] = web()
    assert message["id"] == alert.pk and message["detector"] == "engulfing"
    assert _websocket_rows() == [("viewer", "sent", "")]
    row = Alert.objects.get().deliveries.get(channel="websocket")
    assert row.sent_at is not None and row.attempts == 1
    audit = AuditEvent.objects.get(action="alerts.websocket_sent")
    assert audit.payload["alerts"] == [alert.pk] and audit.payload["deliveries"] == 1


def test_a_broadcast_no_web_process_hears_is_recorded_failed(
    alert_settings, make_user, redis_url, django_capture_on_commit_callbacks
):
    from alerts.services import candles_process
    from audit.models import AuditEvent

    _connect("c1", make_user("viewer", "Viewer"))
    ids = _stored(engulfing_pair(0, 100.0), django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=True):
        candles_process(candle_ids=ids)
    error = "no web process is subscribed to the alert broadcast"
    assert _websocket_rows() == [("viewer", "failed", error)]
    assert AuditEvent.objects.get(action="alerts.websocket_failed").payload["error"] == error


def test_a_backlog_is_recorded_in_one_go_and_its_other_tasks_stop_early(
    alert_settings, make_user, web, django_capture_on_commit_callbacks
):
    from alerts.models import Alert, Delivery
    from alerts.services import candles_process
    from audit.models import AuditEvent

    make_user("ops", "Ops", email="ops@example.com")
    _connect("c1", make_user("viewer", "Viewer"))
    batches = [
        _stored(engulfing_pair(2 * i, 100.0), django_capture_on_commit_callbacks) for i in range(3)
    ]
    with (
        CaptureQueriesContext(connection) as queries,
        django_capture_on_commit_callbacks(execute=True),
    ):
        alerts = candles_process(candle_ids=batches[-1])
    assert len(alerts) == Alert.objects.count() == 3  # one per pair
    inserts = [q["sql"].split(" (")[0] for q in queries if q["sql"].startswith("INSERT")]
    assert inserts.count('INSERT INTO "alerts_alert"') == 1
    assert inserts.count('INSERT INTO "alerts_delivery"') == 2  # email, then WebSocket
    [broadcast] = web()
    assert [m["id"] for m in broadcast] == [a.pk for a in alerts]
    assert Delivery.objects.filter(channel="websocket", status="sent").count() == 3
    assert Delivery.objects.filter(channel="email", status="sent").count() == 3
    assert AuditEvent.objects.filter(action="alert.create").count() == 3

    with CaptureQueriesContext(connection) as queries:
        assert candles_process(candle_ids=batches[0]) == []
    assert len(queries) == 1


def test_candles_and_deliveries_have_queues_every_plain_worker_consumes(settings):
    from config.celery import app

    queues = {q.name for q in settings.CELERY_TASK_QUEUES}
    for task, queue in (
        ("alerts.process_candles", "alerts.candles"),
        ("alerts.deliver", "alerts.deliver"),
    ):
        assert app.amqp.router.route({}, task)["queue"].name == queue
        assert queue in queues
    assert app.amqp.router.route({}, "trading.process_candles_strategy")["queue"].name == "celery"
