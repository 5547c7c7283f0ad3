"""Email and webhook delivery against real local servers: content, signature, retries
for transient failures, none for permanent ones, timeouts."""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest

from .servers import smtp_server, webhook_server

pytestmark = pytest.mark.django_db

SECRET = "s3cret-for-tests"


@pytest.fixture
def smtp(settings):
    with smtp_server() as (sink, port):
        settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
        settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", port
        settings.EMAIL_USE_TLS = settings.EMAIL_USE_SSL = False
        settings.EMAIL_HOST_USER = settings.EMAIL_HOST_PASSWORD = ""
        yield sink, port


@pytest.fixture
def hooks(settings):
    with webhook_server(hang_s=2.0) as (received, port):
        base = f"http://127.0.0.1:{port}"
        settings.ALERTS_WEBHOOK_URLS = [f"{base}/ok", f"{base}/fail", f"{base}/bad", f"{base}/hang"]
        settings.ALERTS_WEBHOOK_SECRET = SECRET
        settings.ALERTS_WEBHOOK_TIMEOUT_S = 0.5
        yield received


@pytest.fixture
def delivery_settings(settings):
    settings.ALERTS_MAX_ATTEMPTS = 3
    settings.ALERTS_RETRY_BASE_S = 0.01
    return settings


def _alert():
    from django.utils import timezone

    from alerts.models import Alert

    now = timezone.now()
    return Alert.objects.create(
        source="detector",
        symbol="ETH/BTC",
        timeframe="5m",
        detector="volatility",
        direction="up",
        value=3.5,
        severity="warning",
        message="log return +3.50 sigma from the mean",
        dedupe_key=f"t:{time.monotonic_ns()}",
        event_ms=1,
        detected_at=now,
        ingested_at=now,
    )


def _delivery(channel: str, recipient: str):
    from django.utils import timezone

    from alerts.models import Delivery

    return Delivery.objects.create(
        alert=_alert(), channel=channel, recipient=recipient, created_at=timezone.now()
    )


def _send_until_done(delivery_id: int) -> list[str]:
    from alerts.services import delivery_send

    statuses = []
    while True:
        outcome = delivery_send(delivery_id=delivery_id)
        statuses.append(outcome.status)
        if outcome.retry_in is None:
            return statuses


def test_email_reaches_a_real_smtp_server_with_the_alert(smtp, delivery_settings):
    from alerts.models import Delivery

    sink, _ = smtp
    d = _delivery("email", "ops@example.com")
    assert _send_until_done(d.pk) == ["sent"]
    [got] = sink.messages
    assert got.rcpt == ["ops@example.com"]
    assert got.message["X-Alert-Id"] == str(d.alert_id)
    assert (
        "[WARNING] volatility up" in got.message["Subject"] and "ETH/BTC" in got.message["Subject"]
    )
    assert f"alert id: {d.alert_id}" in got.body and "sigma" in got.body
    d = Delivery.objects.get(pk=d.pk)
    assert d.status == "sent" and d.sent_at is not None and d.attempts == 1
    [attempt] = d.tries.all()
    assert attempt.ok and attempt.latency_ms > 0


def test_email_connection_is_kept_between_deliveries_and_replaced_when_dropped(
    smtp, delivery_settings
):
    sink, _ = smtp
    first, second = _delivery("email", "a@example.com"), _delivery("email", "b@example.com")
    assert _send_until_done(first.pk) == _send_until_done(second.pk) == ["sent"]
    assert sink.messages[0].peer == sink.messages[1].peer
    sink.restart()  # the server drops the kept connection
    third = _delivery("email", "c@example.com")
    assert _send_until_done(third.pk) == ["sent"]
    assert [m.rcpt for m in sink.messages] == [
        ["a@example.com"],
        ["b@example.com"],
        ["c@example.com"],
    ]
    assert sink.messages[2].peer != sink.messages[1].peer


def test_email_refused_permanently_is_not_retried(smtp, delivery_settings):
    from alerts.models import Delivery

    d = _delivery("email", "refuse@example.com")
    assert _send_until_done(d.pk) == ["failed"]
    d = Delivery.objects.get(pk=d.pk)
    assert d.attempts == 1 and "550" in d.error
    assert d.tries.get().permanent


def test_email_transient_refusal_is_retried_then_failed(smtp, delivery_settings):
    from alerts.models import Delivery

    d = _delivery("email", "later@example.com")
    assert _send_until_done(d.pk) == ["retrying", "retrying", "failed"]
    d = Delivery.objects.get(pk=d.pk)
    assert d.attempts == 3 and d.tries.count() == 3 and "451" in d.error


def test_smtp_server_down_is_transient(settings, delivery_settings):
    from stack import free_port

    from alerts.models import Delivery

    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", free_port()
    d = _delivery("email", "ops@example.com")
    assert _send_until_done(d.pk) == ["retrying", "retrying", "failed"]
    assert "Connection" in Delivery.objects.get(pk=d.pk).error


def test_webhook_is_signed_with_hmac(hooks, delivery_settings):
    from alerts.transports.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER

    d = _delivery("webhook", "webhook:0")
    assert _send_until_done(d.pk) == ["sent"]
    [hook] = hooks
    stamp = hook.headers[TIMESTAMP_HEADER]
    expected = hmac.new(SECRET.encode(), stamp.encode() + b"." + hook.body, hashlib.sha256)
    assert hook.headers[SIGNATURE_HEADER] == "sha256=" + expected.hexdigest()
    body = hook.json()
    assert body["type"] == "alert" and body["alert"]["id"] == d.alert_id
    assert body["alert"]["detector"] == "volatility"


def test_webhook_slack_payload(hooks, delivery_settings):
    delivery_settings.ALERTS_WEBHOOK_FORMAT = "slack"
    d = _delivery("webhook", "webhook:0")
    assert _send_until_done(d.pk) == ["sent"]
    text = hooks[0].json()["text"]
    assert "[WARNING] volatility up" in text and f"alert {d.alert_id}" in text


def test_webhook_server_error_is_retried_client_error_is_not(hooks, delivery_settings):
    from alerts.models import Delivery

    failing = _delivery("webhook", "webhook:1")
    assert _send_until_done(failing.pk) == ["retrying", "retrying", "failed"]
    assert Delivery.objects.get(pk=failing.pk).error == "HTTP 500"
    bad = _delivery("webhook", "webhook:2")
    assert _send_until_done(bad.pk) == ["failed"]
    assert Delivery.objects.get(pk=bad.pk).tries.get().permanent


def test_hanging_webhook_times_out_and_is_retried(hooks, delivery_settings):
    from alerts.models import Delivery

    delivery_settings.ALERTS_MAX_ATTEMPTS = 2
    d = _delivery("webhook", "webhook:3")
    started = time.monotonic()
    assert _send_until_done(d.pk) == ["retrying", "failed"]
    assert time.monotonic() - started < 3.0
    assert "timed out" in Delivery.objects.get(pk=d.pk).error


def test_a_delivery_is_sent_once_even_if_its_task_runs_twice(hooks, delivery_settings):
    from alerts.services import delivery_send

    d = _delivery("webhook", "webhook:0")
    assert delivery_send(delivery_id=d.pk).status == "sent"
    assert delivery_send(delivery_id=d.pk).status == "skipped"
    assert len(hooks) == 1


def test_backoff_is_exponential_and_capped(settings):
    from alerts.services import backoff_s

    settings.ALERTS_RETRY_BASE_S, settings.ALERTS_RETRY_MAX_S = 2.0, 10.0
    assert [backoff_s(n) for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 10.0]
