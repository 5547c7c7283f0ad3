"""The snapshot a WebSocket client gets on connecting and on subscribing: the latest
unacknowledged, delivered alerts that match its filters, newest first."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

pytestmark = pytest.mark.django_db


def _alert(n: int, severity: str, detected_at, **extra):
    from alerts.models import Alert

    fields = {"symbol": "ETH/BTC", "detector": "engulfing", "severity": severity}
    return Alert.objects.create(
        dedupe_key=f"snapshot-{n}", detected_at=detected_at, **(fields | extra)
    )


@pytest.mark.parametrize("minimum", ["warning", "critical"])
def test_an_older_alert_at_the_minimum_severity_is_not_pushed_out_by_newer_lesser_ones(minimum):
    from alerts.rules import Filters
    from alerts.selectors import snapshot

    now = timezone.now()
    kept = _alert(0, minimum, now - timedelta(hours=1))
    for n in range(1, 200):
        _alert(n, "info", now - timedelta(seconds=n))
    _alert(200, "critical", now, acknowledged_at=now)  # acknowledged: not in a snapshot

    assert [a["id"] for a in snapshot(Filters(min_severity=minimum), 50)] == [kept.pk]
    assert len(snapshot(Filters(), 50)) == 50
