"""REST API and admin for alerts: operator actions with permissions, refusals audited,
rule validation through the detectors' params, latency read-out."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient

from .helpers import engulfing_pair, quiet_then_spike

pytestmark = pytest.mark.django_db


@pytest.fixture
def client_for(api_token):
    def make(username: str, role: str) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {api_token(username, role)}")
        return client

    return make


@pytest.fixture
def alerts(ingest, alert_settings):
    from alerts.models import Alert

    ingest(quiet_then_spike() + engulfing_pair(22, 105.0))
    return list(Alert.objects.order_by("event_ms"))


def _refusals() -> list[tuple[str, dict]]:
    from audit.models import AuditEvent

    return list(AuditEvent.objects.filter(action="alerts.refused").values_list("actor", "payload"))


def test_list_detail_and_ack(client_for, alerts):
    ops = client_for("ops", "Ops")
    listed = ops.get("/api/v1/alerts/?unacknowledged=1").json()["results"]
    assert [a["detector"] for a in listed] == ["engulfing", "volatility"]
    target = alerts[0]
    acked = ops.post(f"/api/v1/alerts/{target.pk}/ack")
    assert acked.status_code == 200 and acked.json()["acknowledged_by"] is not None
    assert len(ops.get("/api/v1/alerts/?unacknowledged=1").json()["results"]) == 1
    ops.post(f"/api/v1/alerts/{target.pk}/comments", {"text": "looked at it"}, format="json")
    detail = ops.get(f"/api/v1/alerts/{target.pk}/").json()
    assert detail["comments"][0]["text"] == "looked at it"
    assert detail["decision"] == "deliver" and detail["event_ms"] == target.event_ms
    assert ops.post("/api/v1/alerts/999999/ack").status_code == 404


def test_viewer_is_refused_with_403_and_the_refusal_is_audited(client_for, alerts):
    viewer = client_for("viewer", "Viewer")
    assert viewer.get("/api/v1/alerts/").status_code == 200
    refused = viewer.post(f"/api/v1/alerts/{alerts[0].pk}/ack")
    assert refused.status_code == 403 and "handle_alerts" in refused.json()["error"]
    silence = viewer.post(
        "/api/v1/alerts/silences/", {"symbol": "ETH/BTC", "duration_s": 60, "reason": "x"}
    )
    assert silence.status_code == 403
    rule = viewer.post("/api/v1/alerts/rules/", {"detector": "gap"}, format="json")
    assert rule.status_code == 403
    assert [(actor, p["op"]) for actor, p in _refusals()] == [
        ("viewer", "acknowledge"),
        ("viewer", "silence"),
        ("viewer", "save rule"),
    ]
    assert APIClient().get("/api/v1/alerts/").status_code == 401
    assert not alerts[0].__class__.objects.filter(acknowledged_at__isnull=False).exists()


def test_silence_and_unsilence_over_the_api(client_for, alerts):
    from audit.models import AuditEvent

    ops = client_for("ops", "Ops")
    bad = ops.post("/api/v1/alerts/silences/", {"symbol": "ETH/BTC", "reason": "x"}, format="json")
    assert bad.status_code == 400 and "duration_s" in bad.json()["errors"]
    for short in (1e-300, 0.5, 0, -1):
        too_short = ops.post(
            "/api/v1/alerts/silences/",
            {"symbol": "ETH/BTC", "duration_s": short, "reason": "x"},
            format="json",
        )
        assert too_short.status_code == 400, short
        assert ">= 1 and <=" in str(too_short.json()["errors"]["duration_s"])
    made = ops.post(
        "/api/v1/alerts/silences/",
        {"symbol": "ETH/BTC", "detector": "volatility", "duration_s": 600, "reason": "news"},
        format="json",
    )
    assert made.status_code == 201, made.json()
    silence_id = made.json()["id"]
    assert [s["id"] for s in ops.get("/api/v1/alerts/silences/").json()["results"]] == [silence_id]
    assert ops.post(f"/api/v1/alerts/silences/{silence_id}/end").status_code == 200
    assert ops.get("/api/v1/alerts/silences/").json()["results"] == []
    actions = set(AuditEvent.objects.values_list("action", flat=True))
    assert {"alert.silence", "alert.unsilence"} <= actions


def test_the_silences_listed_are_the_active_ones(client_for):
    from alerts.models import Silence

    ops = client_for("ops", "Ops")
    ids = [
        ops.post(
            "/api/v1/alerts/silences/",
            {"symbol": symbol, "duration_s": 600, "reason": "news"},
            format="json",
        ).json()["id"]
        for symbol in ("ETH/BTC", "LTC/BTC")
    ]
    Silence.objects.filter(pk=ids[0]).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert [s["id"] for s in ops.get("/api/v1/alerts/silences/").json()["results"]] == [ids[1]]


def test_rules_are_validated_with_the_field_named(client_for):
    from alerts.models import AlertRule
    from audit.models import AuditEvent

    ops = client_for("ops", "Ops")
    bad_window = ops.post(
        "/api/v1/alerts/rules/", {"detector": "volatility", "params": {"window": 1}}, format="json"
    )
    assert bad_window.status_code == 400
    assert bad_window.json()["errors"]["params"] == ["params.window: must be in 2..10000, got 1"]
    for params, named in (
        ({"window": 10**19}, "params.window: must be in 2..10000, got 10000000000000000000"),
        ({"k": 10**400}, "params.k: must be a finite number > 0, got 10000000000000000000..."),
    ):
        huge = ops.post(
            "/api/v1/alerts/rules/", {"detector": "volatility", "params": params}, format="json"
        )
        assert huge.status_code == 400, huge.content
        assert huge.json()["errors"]["params"][0].startswith(named)
    bad_k = ops.post(
        "/api/v1/alerts/rules/", {"detector": "volatility", "params": {"k": 0}}, format="json"
    )
    assert "params.k" in bad_k.json()["errors"]["params"][0]
    made = ops.post(
        "/api/v1/alerts/rules/",
        {"detector": "volatility", "params": {"window": 30, "k": 3}, "symbol": "ETH/BTC"},
        format="json",
    )
    assert made.status_code == 201, made.json()
    rule_id = made.json()["id"]
    patched = ops.patch(f"/api/v1/alerts/rules/{rule_id}/", {"params": {"k": -1}}, format="json")
    assert patched.status_code == 400
    assert AlertRule.objects.get().params == {"window": 30, "k": 3}
    assert ops.delete(f"/api/v1/alerts/rules/{rule_id}/").status_code == 204
    actions = list(AuditEvent.objects.values_list("action", flat=True))
    assert "alert_rule.create" in actions and "alert_rule.delete" in actions


def test_admin_refuses_an_impossible_rule_and_saves_a_good_one(client, make_user):
    from alerts.models import AlertRule

    admin_user = make_user("boss", "Ops", is_staff=True)
    client.force_login(admin_user)
    form = {
        "detector": "volatility",
        "params": '{"window": 1, "k": 2}',
        "symbol": "",
        "timeframe": "",
        "enabled": "on",
        "severity": "info",
        "rate_limit_s": "",
    }
    refused = client.post("/admin/alerts/alertrule/add/", form)
    assert refused.status_code == 200
    assert "params.window: must be in 2..10000, got 1" in refused.content.decode()
    form["params"] = '{"window": 25, "k": 2.5}'
    saved = client.post("/admin/alerts/alertrule/add/", form)
    assert saved.status_code == 302
    assert AlertRule.objects.get().params == {"window": 25, "k": 2.5}


def test_admin_acknowledge_action(client, make_user, alerts):
    from alerts.models import Alert

    admin_user = make_user("boss", "Ops", is_staff=True)
    client.force_login(admin_user)
    response = client.post(
        "/admin/alerts/alert/",
        {"action": "acknowledge", "_selected_action": [a.pk for a in alerts]},
    )
    assert response.status_code == 302
    assert Alert.objects.filter(acknowledged_by=admin_user).count() == len(alerts)


def test_latency_selector_endpoint_and_command(client_for, alerts, make_user):
    from django.utils import timezone

    from alerts.models import Delivery
    from alerts.selectors import latency_stats

    for alert in alerts:
        Delivery.objects.create(
            alert=alert,
            channel="email",
            recipient="ops@example.com",
            status="sent",
            created_at=timezone.now(),
            sent_at=timezone.now(),
        )
    stats = latency_stats()
    email = stats["email"]["ingest_to_sent"]
    assert email["count"] == len(alerts) and email["p50"] >= 0 and email["p99"] >= email["p50"]
    assert set(stats["email"]) == {"ingest_to_sent", "close_to_sent", "detect_to_sent"}
    body = client_for("ops", "Ops").get("/api/v1/alerts/latency?channel=email").json()
    assert body["email"]["detect_to_sent"]["count"] == len(alerts)
    out = StringIO()
    call_command("alerts_latency", stdout=out)
    assert "email" in out.getvalue() and "p95 ms" in out.getvalue()


def test_admin_subscription_save_is_audited(client, make_user):
    from alerts.models import AlertSubscription
    from audit.models import AuditEvent

    boss = make_user("boss", "Ops", is_staff=True)
    viewer = make_user("viewer", "Viewer", email="v@example.com")
    client.force_login(boss)
    form = {"user": viewer.pk, "email": "on", "symbols": '["ETH/BTC"]', "detectors": "[]"}
    saved = client.post("/admin/alerts/alertsubscription/add/", {**form, "min_severity": "warning"})
    assert saved.status_code == 302
    assert AlertSubscription.objects.get().symbols == ["ETH/BTC"]
    refused = client.post("/admin/alerts/alertsubscription/add/", {**form, "symbols": "[1]"})
    assert refused.status_code == 200 and "non-empty strings" in refused.content.decode()
    event = AuditEvent.objects.get(action="alert_subscription.save")
    assert event.actor == "boss" and event.payload["min_severity"] == "warning"
