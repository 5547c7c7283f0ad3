"""Alert delivery end to end on a stack of its own (uvicorn + Celery worker on the test
database and the real Redis) wired to a real SMTP server (aiosmtpd) and a real webhook
receiver: content over every channel, no WebSocket message lost, failing endpoints
retried without holding up the others, operator actions and bad input over the socket."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import websockets
from asgiref.sync import sync_to_async
from stack import Stack, free_port

from tests.alerts.helpers import engulfing_pair, quiet_then_spike
from tests.alerts.servers import smtp_server, webhook_server

from .conftest import ROOT, LiveStack, _stack_env, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SECRET = "e2e-webhook-secret"


@pytest.fixture(scope="module")
def delivery_stack(django_db_setup, django_db_blocker, request):
    if request.config.redis_problem:
        pytest.skip(request.config.redis_problem)
    with smtp_server() as (sink, smtp_port), webhook_server(hang_s=5.0) as (hooks, hook_port):
        base = f"http://127.0.0.1:{hook_port}"
        stack = Stack(env={}, log_dir=ROOT / "var" / "test-logs" / uuid.uuid4().hex[:8])
        try:
            # A private Redis: this stack's worker shares its broker queue with nobody
            # (the session's live stack has no SMTP or webhooks configured).
            stack.env = _stack_env(stack.start_redis(stack.log_dir / "redis"))
            stack.env.update(
                EMAIL_URL=f"smtp://127.0.0.1:{smtp_port}",
                ALERTS_WEBHOOK_URLS=f"{base}/ok,{base}/fail,{base}/hang",
                ALERTS_WEBHOOK_SECRET=SECRET,
                ALERTS_WEBHOOK_TIMEOUT_S="1",
                ALERTS_MAX_ATTEMPTS="3",
                ALERTS_RETRY_BASE_S="0.3",
                ALERTS_WS_RATE="5",
                ALERTS_WS_BURST="10",
            )
            port = free_port()
            stack.start_worker(name="alerts-worker", concurrency=2)
            stack.start_web(port)
            yield LiveStack(stack=stack, port=port), sink, hooks
        finally:
            stack.stop()


async def _connect(live: LiveStack, token: str):
    ws = await websockets.connect(
        f"{live.ws_url}/ws/alerts/",
        additional_headers={"Authorization": f"Token {token}"},
        origin=live.base_url,
        open_timeout=10,
    )
    assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "snapshot"
    return ws


async def _send(ws, message: dict, want: str, timeout: float = 10.0) -> dict:
    await ws.send(json.dumps(message))
    return await _expect(ws, want, timeout)


async def _expect(ws, want: str, timeout: float = 10.0) -> dict:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if frame["type"] == want:
            return frame


async def _drain(ws, seconds: float) -> list[dict]:
    alerts = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        try:
            frame = json.loads(await asyncio.wait_for(ws.recv(), left))
        except TimeoutError:
            break
        if frame["type"] == "alert":
            alerts.append(frame["alert"])
    return alerts


def test_alert_reaches_every_channel_and_no_websocket_message_is_lost(
    delivery_stack, api_token, make_user
):
    from django.contrib.auth.models import User

    from alerts.models import Alert, Delivery, DeliveryAttempt

    live, sink, hooks = delivery_stack
    ops_token = api_token("ops", "Ops")
    User.objects.filter(username="ops").update(email="ops@example.com")
    viewer_token = api_token("viewer", "Viewer")
    spike = quiet_then_spike()
    pair = engulfing_pair(len(spike), spike[-1]["close"])

    async def scenario():
        ops_ws = await _connect(live, ops_token)
        viewer_ws = await _connect(live, viewer_token)
        reply = await _send(
            ops_ws, {"type": "subscribe", "detectors": ["volatility"]}, "subscribed"
        )
        assert reply["filters"]["detectors"] == ["volatility"]
        status, body = await sync_to_async(live.request)(
            "POST", "/api/v1/market/candles", spike + pair, ops_token
        )
        assert status == 201, body
        got = await asyncio.gather(_drain(ops_ws, 4), _drain(viewer_ws, 4))
        await ops_ws.close()
        await viewer_ws.close()
        return got

    ops_got, viewer_got = asyncio.run(scenario())
    assert [a["detector"] for a in ops_got] == ["volatility"]
    assert [a["detector"] for a in viewer_got] == ["volatility", "engulfing"]
    alerts = {a.detector: a for a in Alert.objects.all()}
    ws_rows = Delivery.objects.filter(channel="websocket", status="sent")
    by_user = {
        name: {d.alert_id for d in ws_rows if d.user.username == name} for name in ("ops", "viewer")
    }
    assert by_user["ops"] == {a["id"] for a in ops_got}
    assert by_user["viewer"] == {a["id"] for a in viewer_got}

    # Email (Ops default subscription) and the healthy webhook arrive promptly, while the
    # failing and hanging webhooks are retried, then marked failed.
    wait_until(lambda: len(sink.messages) == 2, timeout=20)
    subjects = sorted(m.message["Subject"] for m in sink.messages)
    assert subjects[0].startswith("[INFO] engulfing up ETH/BTC 5m")
    assert subjects[1].startswith("[WARNING] volatility up ETH/BTC 5m")
    assert all(m.rcpt == ["ops@example.com"] for m in sink.messages)
    volatility_mail = next(m for m in sink.messages if "volatility" in m.message["Subject"])
    assert volatility_mail.message["X-Alert-Id"] == str(alerts["volatility"].pk)
    wait_until(
        lambda: Delivery.objects.filter(channel="webhook", status="failed").count() == 4,
        timeout=40,
    )
    webhook = Delivery.objects.filter(channel="webhook")
    assert sorted(webhook.values_list("recipient", "status", "attempts")) == [
        ("webhook:0", "sent", 1),
        ("webhook:0", "sent", 1),
        ("webhook:1", "failed", 3),
        ("webhook:1", "failed", 3),
        ("webhook:2", "failed", 3),
        ("webhook:2", "failed", 3),
    ]
    ok_hooks = [h for h in hooks if h.path == "/ok"]
    assert sorted(h.json()["alert"]["detector"] for h in ok_hooks) == ["engulfing", "volatility"]
    assert all(h.headers["X-Alerts-Signature"].startswith("sha256=") for h in ok_hooks)
    last_failure = max(
        DeliveryAttempt.objects.filter(delivery__status="failed").values_list(
            "finished_at", flat=True
        )
    )
    email_sent = max(Delivery.objects.filter(channel="email").values_list("sent_at", flat=True))
    assert email_sent < last_failure
    assert all(
        d.tries.count() == 3 and "timed out" in d.error
        for d in webhook.filter(recipient="webhook:2")
    )


def test_operator_actions_and_bad_input_over_the_websocket(delivery_stack, api_token):
    from alerts.models import Alert, Silence
    from audit.models import AuditEvent

    live, _, _ = delivery_stack
    ops_token = api_token("ops", "Ops")
    viewer_token = api_token("viewer", "Viewer")
    status, body = live.request("POST", "/api/v1/market/candles", engulfing_pair(0, 1.0), ops_token)
    assert status == 201, body
    alert = wait_until(lambda: Alert.objects.first())

    async def scenario():
        ops = await _connect(live, ops_token)
        viewer = await _connect(live, viewer_token)
        refused = await _send(viewer, {"type": "ack", "id": alert.pk}, "error")
        assert refused["error"].startswith("forbidden") and refused["op"] == "ack"
        assert (await _send(viewer, {"type": "ping"}, "pong")) == {"type": "pong"}
        done = await _send(ops, {"type": "ack", "id": alert.pk}, "result")
        assert done == {"type": "result", "op": "ack", "id": alert.pk, "ok": True}
        comment = await _send(ops, {"type": "comment", "id": alert.pk, "text": "seen"}, "result")
        assert comment["op"] == "comment"
        silence = await _send(
            ops,
            {"type": "silence", "symbol": "ETH/BTC", "duration_s": 60, "reason": "maintenance"},
            "result",
        )
        ended = await _send(ops, {"type": "unsilence", "id": silence["id"]}, "result")
        assert ended == {"type": "result", "op": "unsilence", "id": silence["id"]}
        bad_silence = await _send(
            ops, {"type": "silence", "symbol": "X", "duration_s": -1}, "error"
        )
        assert "invalid" in bad_silence["error"]
        await ops.send("{not json")
        assert (await _expect(ops, "error"))["error"] == "malformed JSON"
        assert (await _send(ops, {"type": "nope"}, "error"))["error"] == "unknown message type"
        assert (await _send(ops, {"type": "ack", "id": "x"}, "error"))["error"].startswith(
            "invalid: id"
        )
        for _ in range(30):
            await ops.send(json.dumps({"type": "ping"}))
        frames = [json.loads(await asyncio.wait_for(ops.recv(), 5)) for _ in range(30)]
        assert {"type": "error", "error": "throttled"} in frames
        await asyncio.sleep(1.0)
        assert (await _send(ops, {"type": "ping"}, "pong")) == {"type": "pong"}
        await ops.close()
        await viewer.close()

    asyncio.run(scenario())
    alert.refresh_from_db()
    assert alert.acknowledged_by.username == "ops"
    assert Silence.objects.get().ended_by.username == "ops"
    actions = list(AuditEvent.objects.values_list("action", "actor"))
    assert ("alerts.refused", "viewer") in actions
    for action in ("alert.acknowledge", "alert.comment", "alert.silence", "alert.unsilence"):
        assert (action, "ops") in actions
