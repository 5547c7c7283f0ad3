"""The delivery sweeper: which deliveries it queues again (their task lost with Redis or a
dead worker), how often, how many; and that a re-queued delivery is still sent once."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest

pytestmark = pytest.mark.django_db

_keys = itertools.count()


@pytest.fixture
def sweep_settings(alert_settings):
    alert_settings.ALERTS_SWEEP_AFTER_S = 10.0
    alert_settings.ALERTS_CLAIM_STALE_S = 120.0
    alert_settings.ALERTS_SWEEP_BATCH = 200
    return alert_settings


def _alert(now):
    from alerts.models import Alert

    return Alert.objects.create(
        source="detector", symbol="ETH/BTC", timeframe="5m", detector="volatility",
        direction="up", value=3.5, severity="warning", message="log return +3.50 sigma",
        dedupe_key=f"sweep:{next(_keys)}", event_ms=1, detected_at=now,
    )  # fmt: skip


def _row(now, status="pending", channel="email", age_s=0.0, **fields):
    from alerts.models import Delivery

    return Delivery.objects.create(
        alert=_alert(now),
        channel=channel,
        recipient="user:1" if channel == "websocket" else f"ops{next(_keys)}@example.com",
        status=status,
        created_at=now - timedelta(seconds=age_s),
        **fields,
    )


def _ago(now, seconds):
    return now - timedelta(seconds=seconds)


def _sweep(now, **kw):
    from alerts.services import deliveries_sweep

    return deliveries_sweep(now=now, **kw)


def test_only_lost_deliveries_are_queued_again(sweep_settings, django_capture_on_commit_callbacks):
    from django.utils import timezone

    from alerts.models import Delivery

    now = timezone.now()
    lost = {
        "pending 30 s": _row(now, age_s=30),
        "webhook pending 30 s": _row(now, channel="webhook", age_s=30),
        "retry overdue 20 s": _row(
            now, "retrying", age_s=60, attempts=1, next_attempt_at=_ago(now, 20)
        ),
        "sending, claimed 200 s ago": _row(
            now, "sending", age_s=300, attempts=1, claimed_at=_ago(now, 200)
        ),
        "queued again 30 s ago": _row(now, age_s=90, requeued_at=_ago(now, 30)),
    }
    kept = {
        "pending 3 s": _row(now, age_s=3),
        "retry due in 30 s": _row(
            now, "retrying", age_s=60, attempts=1, next_attempt_at=now + timedelta(seconds=30)
        ),
        "retry due 2 s ago": _row(
            now, "retrying", age_s=60, attempts=1, next_attempt_at=_ago(now, 2)
        ),
        "sending, claimed 60 s ago": _row(
            now, "sending", age_s=300, attempts=1, claimed_at=_ago(now, 60)
        ),
        "queued again 3 s ago": _row(now, age_s=90, requeued_at=_ago(now, 3)),
        "sent": _row(now, "sent", age_s=300, attempts=1, claimed_at=_ago(now, 290)),
        "failed": _row(now, "failed", age_s=300, attempts=5, claimed_at=_ago(now, 290)),
        "overflow": _row(now, "overflow", age_s=300),
        "websocket pending": _row(now, channel="websocket", age_s=300),
    }
    with django_capture_on_commit_callbacks() as callbacks:
        queued = _sweep(now)
    assert len(callbacks) == 1
    names = {row.pk: name for name, row in {**lost, **kept}.items()}
    assert sorted(names[pk] for pk in queued) == sorted(lost)
    requeued = Delivery.objects.filter(requeued_at=now).values_list("pk", flat=True)
    assert set(requeued) == {row.pk for row in lost.values()}
    untouched = Delivery.objects.filter(pk__in=[r.pk for r in kept.values()])
    assert [d.status for d in untouched] == [r.status for r in kept.values()]


def test_a_delivery_is_queued_again_at_most_once_per_sweep_after(sweep_settings):
    from django.utils import timezone

    now = timezone.now()
    row = _row(now, age_s=30)
    assert _sweep(now) == [row.pk]
    assert _sweep(now + timedelta(seconds=5)) == []
    assert _sweep(now + timedelta(seconds=11)) == [row.pk]


def test_a_sweep_is_bounded_and_takes_the_oldest_first(sweep_settings):
    from django.utils import timezone

    now = timezone.now()
    rows = [_row(now, age_s=age) for age in (40, 60, 20, 50)]
    oldest = [rows[1].pk, rows[3].pk, rows[0].pk]
    assert _sweep(now, limit=3) == oldest
    assert _sweep(now, limit=3) == [rows[2].pk]
    sweep_settings.ALERTS_SWEEP_BATCH = 2
    assert _sweep(now + timedelta(seconds=30)) == oldest[:2]


def test_a_lost_delivery_is_sent_once_when_queued_again(
    sweep_settings, django_capture_on_commit_callbacks
):
    from django.core import mail
    from django.utils import timezone

    from alerts.models import Delivery
    from alerts.tasks import deliver
    from audit.models import AuditEvent

    now = timezone.now()
    pending = _row(now, age_s=30)
    stale = _row(now, "sending", age_s=300, attempts=1, claimed_at=_ago(now, 200))
    with django_capture_on_commit_callbacks(execute=True):  # eager Celery: sent here
        assert _sweep(now) == [stale.pk, pending.pk]  # the oldest first
    assert sorted(m.to[0] for m in mail.outbox) == sorted([pending.recipient, stale.recipient])
    rows = {d.pk: d for d in Delivery.objects.filter(pk__in=[pending.pk, stale.pk])}
    assert [rows[pending.pk].status, rows[pending.pk].attempts] == ["sent", 1]
    assert [rows[stale.pk].status, rows[stale.pk].attempts] == ["sent", 2]
    event = AuditEvent.objects.get(action="delivery.requeue")
    assert event.payload["deliveries"] == [stale.pk, pending.pk]
    # The first message was not lost after all: it arrives late and sends nothing.
    assert deliver.apply(args=(pending.pk,)).get() == "skipped"
    assert deliver.apply(args=(stale.pk,)).get() == "skipped"
    with django_capture_on_commit_callbacks(execute=True):
        assert _sweep(now + timedelta(seconds=60)) == []
    assert len(mail.outbox) == 2


def test_a_retry_is_not_claimed_before_it_is_due(sweep_settings):
    from django.core import mail
    from django.utils import timezone

    from alerts.models import Delivery
    from alerts.services import delivery_send

    now = timezone.now()
    row = _row(now, "retrying", age_s=60, attempts=1, next_attempt_at=now + timedelta(seconds=30))
    assert delivery_send(delivery_id=row.pk).status == "skipped"
    assert Delivery.objects.get(pk=row.pk).attempts == 1
    Delivery.objects.filter(pk=row.pk).update(next_attempt_at=_ago(now, 1))
    assert delivery_send(delivery_id=row.pk).status == "sent"
    assert len(mail.outbox) == 1


def test_the_sweep_task_is_scheduled_by_beat(sweep_settings, django_capture_on_commit_callbacks):
    from django.conf import settings
    from django.utils import timezone

    from config.celery import app

    entries = [e for e in settings.CELERY_BEAT_SCHEDULE.values()]
    assert {"task": "alerts.sweep_deliveries"}.items() <= next(
        e for e in entries if e["task"] == "alerts.sweep_deliveries"
    ).items()
    row = _row(timezone.now(), age_s=30)
    with django_capture_on_commit_callbacks(execute=True):
        assert app.tasks["alerts.sweep_deliveries"].apply().get() == 1
    row.refresh_from_db()
    assert row.status == "sent"


def test_production_refuses_a_claim_stale_time_below_the_send_time_limit():
    from tests.config.test_settings import PRODUCTION, manage

    result = manage("check", env=PRODUCTION | {"ALERTS_CLAIM_STALE_S": "30"})
    assert result.returncode != 0
    assert "ALERTS_CLAIM_STALE_S must exceed" in result.stderr


def test_which_deliveries_a_task_claims(sweep_settings):
    from django.utils import timezone

    from alerts.models import Delivery
    from alerts.services import _claim

    now = timezone.now()
    soon = now + timedelta(seconds=30)
    rows = {
        "pending": (_row(now), True),
        "retrying, no time": (_row(now, "retrying", attempts=1), True),
        "retrying, due": (_row(now, "retrying", attempts=1, next_attempt_at=_ago(now, 5)), True),
        "retrying, due within a second": (
            _row(now, "retrying", attempts=1, next_attempt_at=now + timedelta(seconds=0.5)),
            True,
        ),
        "retrying, later": (_row(now, "retrying", attempts=1, next_attempt_at=soon), False),
        "sending, stale": (_row(now, "sending", attempts=1, claimed_at=_ago(now, 200)), True),
        "sending, fresh": (_row(now, "sending", attempts=1, claimed_at=_ago(now, 60)), False),
        "sent": (_row(now, "sent", attempts=1), False),
        "failed": (_row(now, "failed", attempts=5), False),
        "overflow": (_row(now, "overflow"), False),
        "websocket, pending": (_row(now, channel="websocket"), False),
    }
    claimed = {name: _claim(row.pk) for name, (row, _) in rows.items()}
    assert {name: got is not None for name, got in claimed.items()} == {
        name: expected for name, (_, expected) in rows.items()
    }
    for name, (row, expected) in rows.items():
        stored = Delivery.objects.get(pk=row.pk)
        if not expected:
            assert (stored.status, stored.attempts) == (row.status, row.attempts), name
            continue
        got = claimed[name]
        assert (stored.status, stored.attempts) == ("sending", row.attempts + 1), name
        assert now <= stored.claimed_at <= timezone.now()
        assert (got.pk, got.status, got.attempts) == (row.pk, "sending", row.attempts + 1)
        assert (got.claimed_at, got.recipient, got.created_at) == (
            stored.claimed_at,
            row.recipient,
            row.created_at,
        )
        assert got.alert.as_message() == row.alert.as_message()
        assert got.alert_id == row.alert_id
