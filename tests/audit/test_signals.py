"""Logins, logouts and failed logins land in the audit trail, without passwords."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import User
from django.test import Client

from audit.models import AuditEvent
from audit.services import audit_verify

PASSWORD = "correct-horse-battery-staple-91"
WRONG = "wrong-horse-battery-staple-17"
AGENT = "pytest-browser/1.0"


@pytest.fixture
def alice(db) -> User:
    return User.objects.create_user(username="alice", password=PASSWORD, is_staff=True)


def events(action: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action))


def assert_no_password_stored() -> None:
    everything = json.dumps(list(AuditEvent.objects.values()), default=str)
    assert PASSWORD not in everything
    assert WRONG not in everything
    assert "********" not in everything


def test_client_login_is_recorded(client: Client, alice: User):
    assert client.login(username="alice", password=PASSWORD)

    [event] = events("user.login")
    assert (event.actor, event.actor_user_id) == ("alice", alice.pk)
    assert (event.target_type, event.target_id) == ("auth.User", str(alice.pk))
    assert event.payload == {}
    assert_no_password_stored()
    assert audit_verify() is None


def test_admin_login_page_records_ip_and_user_agent(client: Client, alice: User):
    response = client.post(
        "/admin/login/?next=/admin/",
        {"username": "alice", "password": PASSWORD},
        HTTP_USER_AGENT=AGENT,
        REMOTE_ADDR="203.0.113.9",
    )

    assert response.status_code == 302
    [event] = events("user.login")
    assert (event.actor, event.ip, event.user_agent) == ("alice", "203.0.113.9", AGENT)
    assert_no_password_stored()


def test_failed_admin_login_records_the_attempted_username_only(client: Client, alice: User):
    response = client.post(
        "/admin/login/?next=/admin/",
        {"username": "alice", "password": WRONG},
        HTTP_USER_AGENT=AGENT,
        REMOTE_ADDR="198.51.100.4",
    )

    assert response.status_code == 200
    assert events("user.login") == []
    [event] = events("user.login_failed")
    assert event.payload == {"username": "alice"}
    assert (event.actor, event.actor_user_id) == ("anonymous", None)
    assert (event.ip, event.user_agent) == ("198.51.100.4", AGENT)
    assert_no_password_stored()


def test_failed_client_login_for_an_unknown_user_is_recorded(client: Client, db):
    assert not client.login(username="nobody", password=WRONG)

    [event] = events("user.login_failed")
    assert event.payload == {"username": "nobody"}
    assert event.ip is None
    assert_no_password_stored()


def test_logout_is_recorded(client: Client, alice: User):
    client.login(username="alice", password=PASSWORD)

    client.logout()

    [event] = events("user.logout")
    assert (event.actor, event.actor_user_id) == ("alice", alice.pk)
    assert [e.action for e in AuditEvent.objects.all()] == ["user.login", "user.logout"]
    assert audit_verify() is None


def test_admin_logout_is_recorded_with_request_details(client: Client, alice: User):
    client.force_login(alice)

    client.post("/admin/logout/", HTTP_USER_AGENT=AGENT)

    [event] = events("user.logout")
    assert (event.actor, event.user_agent, event.ip) == ("alice", AGENT, "127.0.0.1")


def test_logout_without_a_session_records_nothing(client: Client, db):
    client.post("/admin/logout/")

    assert not AuditEvent.objects.exists()
