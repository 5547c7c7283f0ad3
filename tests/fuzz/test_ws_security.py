"""Who may open /ws/alerts/ (the real ASGI application, in process): a wrong, deleted or
inactive user's token and an expired session are closed with 4401 like an anonymous
client; a user without view_desk gets 4403. (Anonymous and wrong-origin connections to a
real server: tests/e2e/test_alert_slice.py.)"""

from __future__ import annotations

import secrets
from datetime import timedelta

import pytest

from .websocket import Socket, token_headers

pytestmark = [pytest.mark.django_db(transaction=True)]


def _close_code(headers: list[tuple[bytes, bytes]]) -> tuple[bool, int | None, dict | None]:
    sock = Socket(headers)
    try:
        return sock.accepted, sock.close_code, sock.first
    finally:
        sock.close()


def test_a_valid_token_gets_the_snapshot(api_token):
    accepted, code, first = _close_code(token_headers(api_token("ops", "Ops")))
    assert accepted and code is None and first == {"type": "snapshot", "alerts": []}


def test_a_wrong_token_is_closed_4401(api_token):
    api_token("ops", "Ops")
    assert _close_code(token_headers(secrets.token_hex(20)))[:2] == (True, 4401)


def test_a_deleted_token_is_closed_4401(api_token):
    from rest_framework.authtoken.models import Token

    key = api_token("ops", "Ops")
    Token.objects.filter(key=key).delete()
    assert _close_code(token_headers(key))[:2] == (True, 4401)


def test_an_inactive_users_token_is_closed_4401(api_token):
    from django.contrib.auth.models import User

    key = api_token("ops", "Ops")
    User.objects.filter(username="ops").update(is_active=False)
    assert _close_code(token_headers(key))[:2] == (True, 4401)


def test_a_user_without_view_desk_is_closed_4403(api_token, make_user):
    from rest_framework.authtoken.models import Token

    key = Token.objects.create(user=make_user("nobody")).key
    assert _close_code(token_headers(key))[:2] == (True, 4403)


def _session_cookie(client, make_user, settings) -> str:
    settings.SESSION_COOKIE_SECURE = False
    user = make_user("ops", "Ops")
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


def _cookie_headers(name: str, value: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"host", b"127.0.0.1"),
        (b"origin", b"http://127.0.0.1"),
        (b"cookie", f"{name}={value}".encode()),
    ]


def test_a_live_session_cookie_gets_the_snapshot(client, make_user, settings):
    key = _session_cookie(client, make_user, settings)
    accepted, code, first = _close_code(_cookie_headers(settings.SESSION_COOKIE_NAME, key))
    assert accepted and code is None and first is not None and first["type"] == "snapshot"


def test_an_expired_session_cookie_is_closed_4401(client, make_user, settings):
    from django.contrib.sessions.models import Session
    from django.utils import timezone

    key = _session_cookie(client, make_user, settings)
    Session.objects.filter(session_key=key).update(
        expire_date=timezone.now() - timedelta(seconds=1)
    )
    assert _close_code(_cookie_headers(settings.SESSION_COOKIE_NAME, key))[:2] == (True, 4401)


def test_a_forged_session_cookie_is_closed_4401(client, make_user, settings):
    _session_cookie(client, make_user, settings)
    headers = _cookie_headers(settings.SESSION_COOKIE_NAME, secrets.token_hex(16))
    assert _close_code(headers)[:2] == (True, 4401)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="GAP: authentication happens once, at connect: a user deactivated (and whose token "
    "is deleted) while connected keeps the open socket and can still silence alerts over it "
    "(alerts/consumers.py keeps the user object of the handshake; services.require_permission "
    "checks has_perm on it, which ignores is_active changes made since)",
)
def test_a_user_deactivated_while_connected_can_no_longer_act(api_token, settings):
    from django.contrib.auth.models import User
    from rest_framework.authtoken.models import Token

    key = api_token("ops", "Ops")
    sock = Socket(token_headers(key))
    try:
        assert sock.first is not None
        User.objects.filter(username="ops").update(is_active=False)
        Token.objects.filter(key=key).delete()
        replies = sock.send(
            text='{"type": "silence", "symbol": "ETH/BTC", "duration_s": 60, "reason": "x"}'
        )
    except AssertionError:
        replies = [{"type": "closed"}]
    finally:
        sock.close()
    assert all(r["type"] != "result" for r in replies), replies
