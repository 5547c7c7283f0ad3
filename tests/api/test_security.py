"""Security: failed logins throttled per username and IP (refused, recorded, then allowed
again), CSRF on every state-changing form and session-authenticated API call, no secret
(password, token) in API responses, audit payloads or logs."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
import time_machine
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from audit.models import AuditEvent
from tests.permissions.conftest import Scene

pytestmark = pytest.mark.django_db
PASSWORD = "correct-Horse-7-battery"


@pytest.fixture
def olga(make_user):
    user = make_user("olga", "Ops", is_staff=True)
    user.set_password(PASSWORD)
    user.save()
    return user


def login(client: Client, password: str, ip: str = "127.0.0.1"):
    return client.post(
        "/admin/login/?next=/admin/",
        {"username": "olga", "password": password},
        REMOTE_ADDR=ip,
    )


def signed_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


def test_failed_logins_are_throttled_per_username_and_ip(olga, settings):
    client = Client()
    for _ in range(settings.LOGIN_FAILURE_LIMIT):
        assert login(client, "wrong").status_code == 200
    refused = login(client, PASSWORD)
    assert refused.status_code == 200 and not signed_in(client)
    throttled = AuditEvent.objects.get(action="user.login_throttled")
    assert throttled.payload["username"] == "olga" and throttled.ip == "127.0.0.1"
    assert PASSWORD not in str(throttled.payload)

    other_ip = Client()
    assert login(other_ip, PASSWORD, ip="10.1.2.3").status_code == 302 and signed_in(other_ip)

    later = timezone.now() + timedelta(seconds=settings.LOGIN_FAILURE_WINDOW_S + 60)
    with time_machine.travel(later, tick=False):
        again = Client()
        assert login(again, PASSWORD).status_code == 302 and signed_in(again)


def test_fewer_failures_than_the_limit_do_not_lock(olga, settings):
    client = Client()
    for _ in range(settings.LOGIN_FAILURE_LIMIT - 1):
        login(client, "wrong")
    assert login(client, PASSWORD).status_code == 302
    assert not AuditEvent.objects.filter(action="user.login_throttled").exists()


def test_session_api_calls_need_the_csrf_token(olga, make_user):
    rollout = Scene(make_user).running()
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(olga)
    assert client.get("/api/v1/rollouts/").status_code == 200
    refused = client.post(f"/api/v1/rollouts/{rollout.pk}/pause", {"reason": "x"}, format="json")
    assert refused.status_code == 403 and "CSRF" in refused.json()["error"]
    rollout.refresh_from_db()
    assert rollout.state == "RUNNING"


def test_admin_action_forms_carry_and_need_the_csrf_token(olga, make_user):
    rollout = Scene(make_user).running()
    client = Client(enforce_csrf_checks=True)
    client.force_login(olga)
    page = client.get("/admin/canary/rollout/")
    token = page.cookies["csrftoken"].value
    form = {"action": "pause", "_selected_action": [rollout.pk], "index": "0"}
    confirm = client.post("/admin/canary/rollout/", {**form, "csrfmiddlewaretoken": token})
    assert confirm.status_code == 200
    assert 'name="csrfmiddlewaretoken"' in confirm.content.decode()
    assert "reason" in confirm.content.decode()
    posted = {"action": "pause", "_selected_action": [rollout.pk], "confirm": "yes"}
    refused = client.post("/admin/canary/rollout/", {**posted, "reason": "news"})
    assert refused.status_code == 403
    rollout.refresh_from_db()
    assert rollout.state == "RUNNING"
    done = client.post(
        "/admin/canary/rollout/", {**posted, "reason": "news", "csrfmiddlewaretoken": token}
    )
    assert done.status_code == 302
    rollout.refresh_from_db()
    assert rollout.state == "PAUSED"
    assert AuditEvent.objects.get(action="rollout.pause").payload["reason"] == "news"


def test_preflight_run_page_asks_before_running(olga):
    from canary.models import PreflightRun

    client = Client()
    client.force_login(olga)
    page = client.get("/admin/canary/preflightrun/run/")
    assert page.status_code == 200 and 'name="csrfmiddlewaretoken"' in page.content.decode()
    assert not PreflightRun.objects.exists()
    listing = client.get("/admin/canary/preflightrun/").content.decode()
    assert "/admin/canary/preflightrun/run/" in listing


def test_no_secret_in_responses_audit_or_logs(olga, make_user, caplog):
    from rest_framework.authtoken.models import Token

    caplog.set_level(logging.DEBUG)
    scene = Scene(make_user)
    rollout = scene.running()
    token = Token.objects.create(user=olga).key
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    login(Client(), "not-" + PASSWORD)
    login(Client(), PASSWORD)
    bodies = [
        api.post(f"/api/v1/rollouts/{rollout.pk}/pause", {"reason": "x"}, format="json"),
        api.post("/api/v1/rollouts/999/pause", {"reason": "x"}, format="json"),
        api.post(f"/api/v1/rollouts/{rollout.pk}/promote", {"reason": ["bad"]}, format="json"),
        api.get("/api/v1/rollouts/"),
        api.get(f"/api/v1/rollouts/{rollout.pk}/export"),
        api.get("/api/v1/audit/events/?limit=500"),
        api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json"),
    ]
    bodies.append(api.get("/api/v1/audit/export"))
    text = "".join(
        b"".join(r.streaming_content).decode() if r.streaming else r.content.decode()
        for r in bodies
    )
    for secret in (token, PASSWORD, olga.password):
        assert secret not in text
        assert secret not in caplog.text
        for event in AuditEvent.objects.all():
            assert secret not in str(event.payload) and secret not in event.user_agent
