"""Live processing in the worker path: ingestion -> detectors -> rules -> deliveries."""

from __future__ import annotations

import pytest
from django.core import mail

from .helpers import MARKET, candle, engulfing_pair, quiet_then_spike

pytestmark = pytest.mark.django_db


def test_spike_after_quiet_candles_raises_a_volatility_alert_with_stamps(ingest, alert_settings):
    from alerts.models import Alert

    items = quiet_then_spike()
    ingest(items)
    alerts = list(Alert.objects.order_by("event_ms", "detector"))
    assert [(a.detector, a.direction) for a in alerts] == [("volatility", "up")]
    alert = alerts[0]
    assert alert.event_ms == items[-1]["open_time_ms"]
    assert alert.value > 2.0
    assert alert.severity == "warning"
    assert alert.candle.open_time_ms == items[-1]["open_time_ms"]
    assert alert.candle_close_at is not None and alert.ingested_at is not None
    assert alert.detected_at >= alert.ingested_at
    assert not alert.suppressed and alert.decision == "deliver"


def test_engulfing_pair_raises_an_engulfing_alert(ingest, alert_settings):
    from alerts.models import Alert

    ingest(engulfing_pair(0, 100.0))
    alert = Alert.objects.get()
    assert (alert.detector, alert.direction, alert.value) == ("engulfing", "up", None)
    assert alert.message == "bullish engulfing"


def test_reprocessing_never_realerts_and_late_candles_are_not_processed(ingest, alert_settings):
    from alerts.models import Alert
    from alerts.services import candles_process
    from trading.models import Candle

    items = quiet_then_spike()
    ingest(items)
    assert Alert.objects.count() == 1
    Candle.objects.update(processed_at=None)
    candles_process(candle_ids=list(Candle.objects.values_list("pk", flat=True)))
    assert Alert.objects.count() == 1

    late = candle(-5, 100.0, 130.0)  # huge move, but older than the stream's last candle
    result = ingest([late])
    assert result.late_ids
    stored = Candle.objects.get(pk=result.late_ids[0])
    assert stored.late and stored.processed_at is None
    assert Alert.objects.count() == 1


def test_rule_rows_replace_defaults_and_disable_detectors(ingest, alert_settings):
    from alerts.models import Alert, AlertRule

    AlertRule.objects.create(detector="volatility", enabled=False)
    AlertRule.objects.create(detector="engulfing", symbol="ETH/BTC", severity="critical")
    ingest(quiet_then_spike() + engulfing_pair(22, 105.0))
    assert list(Alert.objects.values_list("detector", "severity")) == [("engulfing", "critical")]


def _csv_items(path, n: int) -> list[dict]:
    rows = path.read_text().splitlines()[1 : n + 1]
    out = []
    for row in rows:
        ts, o, h, lo, c, v = row.split(",")[:6]
        out.append(
            {
                "exchange": "binance",
                "symbol": "ETH/BTC",
                "timeframe": "5m",
                "open_time_ms": int(ts),
                "open": float(o),
                "high": float(h),
                "low": float(lo),
                "close": float(c),
                "volume": float(v),
            }
        )
    return out


def test_live_path_equals_backtest_including_rate_limit_decisions(ingest, alert_settings):
    """Candles POSTed in batches give exactly the backtest's detections and decisions."""
    from alerts.backtest import run_backtest
    from alerts.detectors import load_csv
    from alerts.models import Alert, AlertRule

    alert_settings.ALERTS_RATE_LIMIT_S = 3600.0
    AlertRule.objects.create(detector="breakout", params={"window": 12}, rate_limit_s=1800)
    path = MARKET / "ETH_BTC-5m.csv"
    n = 600
    items = _csv_items(path, n)
    for start in range(0, n, 97):
        ingest(items[start : start + 97])
    arrays = {k: v[:n] for k, v in load_csv(path).items()}
    expected = run_backtest(
        arrays,
        symbol="ETH/BTC",
        timeframe="5m",
        rules=[r.as_spec() for r in AlertRule.objects.all()],
        default_rate_limit_s=3600.0,
    )
    live = Alert.objects.order_by("event_ms", "detector")
    got = [(a.event_ms, a.detector, a.direction, a.suppressed) for a in live]
    want = [(r.ts, r.detector, r.direction, r.suppressed) for r in expected]
    assert got == want
    assert any(s for *_, s in want) and not all(s for *_, s in want)
    assert {d for _, d, _, _ in want} == {"breakout", "engulfing", "volatility"}
    for a, r in zip(live, expected, strict=True):
        assert a.value == pytest.approx(r.value) if r.value is not None else a.value is None
        assert a.suppressed_reason == (r.reason if r.suppressed else "")


def test_silence_suppresses_with_reason_and_unsilence_ends_it(ingest, alert_settings, make_user):
    from alerts import services
    from alerts.models import Alert, Delivery

    ops = make_user("ops", "Ops", email="ops@example.com")
    silence = services.silence_create(
        actor=ops, symbol="ETH/BTC", detector="volatility", reason="known news", duration_s=600
    )
    ingest(quiet_then_spike())
    alert = Alert.objects.get()
    assert alert.suppressed and alert.decision == "silenced"
    assert "known news" in alert.suppressed_reason and alert.silence_id == silence.pk
    assert not Delivery.objects.exists()
    services.silence_end(silence_id=silence.pk, actor=ops)
    ingest(engulfing_pair(22, 105.0))
    assert Alert.objects.filter(suppressed=False, detector="engulfing").exists()


def test_email_recipients_follow_permissions_and_subscriptions(ingest, alert_settings, make_user):
    from alerts.models import AlertSubscription, Delivery

    make_user("ops", "Ops", email="ops@example.com")
    make_user("noemail", "Ops")
    make_user("viewer", "Viewer", email="viewer@example.com")
    picky = make_user("picky", "Viewer", email="picky@example.com")
    AlertSubscription.objects.create(user=picky, min_severity="warning")
    make_user("nobody", None, email="nobody@example.com")
    ingest(quiet_then_spike() + engulfing_pair(22, 105.0))
    sent = sorted(
        Delivery.objects.filter(channel="email").values_list("alert__detector", "recipient")
    )
    assert sent == [
        ("engulfing", "ops@example.com"),
        ("volatility", "ops@example.com"),
        ("volatility", "picky@example.com"),
    ]
    assert set(Delivery.objects.values_list("status", flat=True)) == {"sent"}
    assert len(mail.outbox) == 3
    assert any("VOLATILITY" in m.subject.upper() for m in mail.outbox)


def test_accounts_sharing_an_address_get_one_email_and_processing_goes_on(
    ingest, alert_settings, make_user, django_capture_on_commit_callbacks
):
    """One person, two accounts (e.g. alice and alice-admin) with one address: a delivery
    is unique per alert, channel and recipient, so the address gets one email per alert,
    the first matching account's."""
    from alerts.models import Alert, AlertSubscription, Delivery
    from alerts.services import alert_raise
    from trading.models import Candle

    alice = make_user("alice", "Ops", email="alice@example.com")
    admin = make_user("alice-admin", "Ops", email="alice@example.com")
    make_user("alice-old", "Ops", email="ALICE@example.com")  # the same mailbox
    AlertSubscription.objects.create(user=alice, min_severity="critical")  # picky account
    ingest(quiet_then_spike())
    assert not Candle.objects.filter(processed_at__isnull=True).exists()
    [spike] = Alert.objects.filter(detector="volatility")
    assert list(Delivery.objects.filter(alert=spike, channel="email").values_list(
        "recipient", "user_id")) == [("alice@example.com", admin.pk)]  # fmt: skip
    with django_capture_on_commit_callbacks(execute=True):
        raised = alert_raise(source="canary", key="shared-address", message="breaker tripped")
    assert list(Delivery.objects.filter(alert=raised, channel="email").values_list(
        "recipient", "user_id")) == [("alice@example.com", alice.pk)]  # fmt: skip
    assert len(mail.outbox) == 2


def test_pending_queue_overflow_is_recorded_and_raises_a_warning(
    ingest, alert_settings, make_user, django_capture_on_commit_callbacks
):
    from alerts.models import Alert, Delivery
    from trading.services import candles_ingest

    alert_settings.ALERTS_PENDING_LIMIT = 2
    for i in range(3):
        make_user(f"ops{i}", "Ops", email=f"ops{i}@example.com")
    candles_ingest(items=quiet_then_spike(), actor="test")  # deliveries not run: stay pending
    from alerts.services import candles_process
    from trading.models import Candle

    candles_process(candle_ids=list(Candle.objects.values_list("pk", flat=True)))
    statuses = sorted(Delivery.objects.values_list("status", flat=True))
    assert statuses.count("pending") == 2
    assert statuses.count("overflow") >= 1
    overflow = Delivery.objects.filter(status="overflow").first()
    assert "pending queue full" in overflow.error
    warning = Alert.objects.get(source="alerts")
    assert warning.severity == "warning" and "overflowed" in warning.message


def test_alert_raise_dedupes_by_key_and_defaults_canary_to_critical(
    alert_settings, make_user, django_capture_on_commit_callbacks
):
    from alerts.models import Alert, Delivery
    from alerts.services import alert_raise

    make_user("ops", "Ops", email="ops@example.com")
    with django_capture_on_commit_callbacks(execute=True):
        first = alert_raise(
            source="canary", key="phase-1:fail", message="drawdown -3.2%", payload={"dd": -3.2}
        )
        again = alert_raise(source="canary", key="phase-1:fail", message="drawdown -3.2%")
        other = alert_raise(source="canary", key="phase-1:warn", message="slippage")
    assert first.pk == again.pk and other.pk != first.pk
    assert first.severity == "critical" and not other.suppressed
    assert first.payload == {"dd": -3.2, "key": "phase-1:fail"}
    assert Alert.objects.count() == 2
    assert Delivery.objects.filter(alert=first, channel="email", status="sent").count() == 1
    assert len(mail.outbox) == 2
    with pytest.raises(ValueError, match="severity"):
        alert_raise(source="canary", key="x", severity="loud", message="m")


def test_a_stored_rule_that_cannot_work_is_skipped_not_fatal(ingest, alert_settings):
    from alerts.models import Alert, AlertRule

    AlertRule.objects.create(detector="volatility", params={"window": 1})  # bypasses clean()
    ingest(quiet_then_spike())
    assert list(Alert.objects.values_list("detector", flat=True)) == ["volatility"]


def test_who_gets_what_is_read_only_for_candles_with_detections(
    ingest, alert_settings, monkeypatch
):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from alerts import presence
    from alerts.models import Alert
    from trading.models import Candle

    reads = []
    live = presence.live_connections
    monkeypatch.setattr(presence, "live_connections", lambda: reads.append(1) or live())
    items = quiet_then_spike()
    with CaptureQueriesContext(connection) as quiet:
        ingest(items[:-1])
    assert Candle.objects.filter(processed_at__isnull=False).count() == len(items) - 1
    assert not Alert.objects.exists()
    assert not reads
    assert not [q for q in quiet.captured_queries if "alerts_silence" in q["sql"]]

    with CaptureQueriesContext(connection) as spike:
        ingest(items[-1:])
    assert Alert.objects.get().detector == "volatility"
    assert reads == [1]
    assert [q for q in spike.captured_queries if "alerts_silence" in q["sql"]]
