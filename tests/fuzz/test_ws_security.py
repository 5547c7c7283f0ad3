"""Who may open /ws/alerts/ (the real ASGI application, in process): a wrong, deleted or
inactive user's token and an expired session are closed with 4401 like an anonymous
client; a user without view_desk gets 4403. The same holds for a connection already open:
the user, and the token or login session it came with (a logout or a password change ends
the session), are checked again before each message and every ALERTS_PRESENCE_TTL_S / 3
seconds (the refusal recorded in the audit trail).
(Anonymous and wrong-origin connections to a real server: tests/e2e/test_alert_slice.py.)"""

from __future__ import annotations

import json
import secrets
from datetime import timedelta
from typing import Any

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


SILENCE = {"type": "silence", "symbol": "ETH/BTC", "duration_s": 60, "reason": "x"}


def _until_closed(sock: Socket, message: dict[str, Any]) -> list[dict[str, Any]]:
    """The frames answered to ``message``, up to and including the close ({"close": code})."""

    async def exchange() -> list[dict[str, Any]]:
        await sock._send(json.dumps(message))
        frames: list[dict[str, Any]] = []
        while True:
            out = await sock.comm.receive_output(timeout=10)
            if out["type"] == "websocket.close":
                return [*frames, {"close": out.get("code")}]
            frames.append(json.loads(out["text"]))

    return sock.run(exchange())


def _refusals() -> list[tuple[str, bool, dict]]:
    from audit.models import AuditEvent

    rows = AuditEvent.objects.filter(action="permission.refused").order_by("seq")
    return [(e.actor, e.actor_user_id is not None, e.payload) for e in rows]


def _connected(api_token) -> tuple[Socket, str]:
    key = api_token("ops", "Ops")
    sock = Socket(token_headers(key))
    assert sock.first is not None and sock.first["type"] == "snapshot"
    return sock, key


@pytest.mark.parametrize(
    "message",
    [SILENCE, {"type": "ack", "id": 1}, {"type": "subscribe"}, {"type": "unsilence", "id": 1}],
)
def test_a_deactivated_users_message_is_refused_recorded_and_closed_4401(api_token, message):
    from django.contrib.auth.models import User

    from alerts.models import Silence

    sock, _ = _connected(api_token)
    try:
        User.objects.filter(username="ops").update(is_active=False)
        frames = _until_closed(sock, message)
    finally:
        sock.close()
    op = message["type"]
    assert frames == [
        {"type": "error", "error": "forbidden: the user is no longer active", "op": op},
        {"close": 4401},
    ]
    assert not Silence.objects.exists()
    assert _refusals() == [
        (
            "ops",
            True,
            {
                "op": f"websocket {op}",
                "reason": "the user is no longer active",
                "permission": "audit.view_desk",
            },
        )
    ]


def test_a_deleted_users_message_is_refused_recorded_and_closed_4401(api_token):
    from django.contrib.auth.models import User

    sock, _ = _connected(api_token)
    try:
        User.objects.filter(username="ops").delete()
        frames = _until_closed(sock, SILENCE)
    finally:
        sock.close()
    assert frames[-1] == {"close": 4401}, frames
    assert frames[0]["error"] == "forbidden: the user no longer exists"
    assert [(actor, linked, p["op"]) for actor, linked, p in _refusals()] == [
        ("ops", False, "websocket silence")
    ]


def test_a_deleted_token_closes_its_connection_4401(api_token):
    from rest_framework.authtoken.models import Token

    sock, key = _connected(api_token)
    try:
        Token.objects.filter(key=key).delete()
        frames = _until_closed(sock, SILENCE)
    finally:
        sock.close()
    assert frames[-1] == {"close": 4401}, frames
    assert frames[0]["error"] == "forbidden: the token is no longer valid"


def test_a_user_who_lost_view_desk_is_closed_4403(api_token):
    from django.contrib.auth.models import User

    sock, _ = _connected(api_token)
    try:
        User.objects.get(username="ops").groups.clear()
        frames = _until_closed(sock, {"type": "subscribe"})
    finally:
        sock.close()
    assert frames[-1] == {"close": 4403}, frames
    assert [p["reason"] for _, _, p in _refusals()] == ["needs the audit.view_desk permission"]


def test_permissions_are_those_of_the_moment_of_the_message(api_token):
    """Ops -> Viewer while connected: the socket stays open (view_desk) but silencing is
    refused by the service (alerts.refused), and a ping still answers."""
    from django.contrib.auth.models import Group, User

    from alerts.models import Silence
    from audit.models import AuditEvent

    sock, _ = _connected(api_token)
    try:
        assert [r["type"] for r in sock.send(text=json.dumps(SILENCE))] == ["result"]
        user = User.objects.get(username="ops")
        user.groups.set([Group.objects.get(name="Viewer")])
        replies = sock.send(text=json.dumps(SILENCE))
    finally:
        sock.close()
    assert [(r["type"], r["error"].startswith("forbidden: silence needs")) for r in replies] == [
        ("error", True)
    ], replies
    assert Silence.objects.count() == 1
    assert AuditEvent.objects.filter(action="alerts.refused", actor="ops").count() == 1


def _cookie_connected(client, make_user, settings) -> Socket:
    key = _session_cookie(client, make_user, settings)
    sock = Socket(_cookie_headers(settings.SESSION_COOKIE_NAME, key))
    assert sock.first is not None and sock.first["type"] == "snapshot"
    return sock


def test_a_logout_closes_the_sessions_open_connection_4401(client, make_user, settings):
    """The session is checked again before each message, as the token is: logging out
    ends the desk's socket too (the refusal recorded)."""
    sock = _cookie_connected(client, make_user, settings)
    try:
        replies = sock.send(text=json.dumps({"type": "subscribe"}))
        assert [r["type"] for r in replies] == ["subscribed", "snapshot"]
        client.logout()
        frames = _until_closed(sock, SILENCE)
    finally:
        sock.close()
    assert frames == [
        {"type": "error", "error": "forbidden: the session has ended", "op": "silence"},
        {"close": 4401},
    ]
    assert [(actor, p["reason"]) for actor, _, p in _refusals()] == [
        ("ops", "the session has ended")
    ]


def test_a_password_change_closes_the_sessions_open_connection_4401(client, make_user, settings):
    """As django.contrib.auth does for the session's next request."""
    from django.contrib.auth.models import User

    sock = _cookie_connected(client, make_user, settings)
    try:
        user = User.objects.get(username="ops")
        user.set_password("a-new-password-for-the-test")
        user.save()
        frames = _until_closed(sock, {"type": "subscribe"})
    finally:
        sock.close()
    assert frames[-1] == {"close": 4401}, frames
    assert frames[0]["error"] == "forbidden: the session has ended"


def test_the_periodic_check_closes_a_silent_connection_whose_session_ended(
    client, make_user, settings
):
    """A socket that sends nothing is checked every ALERTS_PRESENCE_TTL_S / 3 seconds."""
    settings.ALERTS_PRESENCE_TTL_S = 0.3
    sock = _cookie_connected(client, make_user, settings)
    try:
        client.logout()

        async def closed() -> int | None:
            while True:
                out = await sock.comm.receive_output(timeout=10)
                if out["type"] == "websocket.close":
                    return out.get("code")

        code = sock.run(closed())
    finally:
        sock.close()
    assert code == 4401
