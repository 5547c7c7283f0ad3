"""The alert slice end to end through real processes: candles POSTed to the ASGI server
are stored, run through the real detectors by the Celery worker, and their alerts arrive
at a real WebSocket client, each with a Delivery row."""

import asyncio
import json

import pytest
import websockets
from asgiref.sync import sync_to_async

from tests.alerts.helpers import engulfing_pair, quiet_then_spike

from .conftest import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


async def _connect(live_stack, token):
    return await websockets.connect(
        f"{live_stack.ws_url}/ws/alerts/",
        additional_headers={"Authorization": f"Token {token}"},
        origin=live_stack.base_url,
        open_timeout=10,
    )


async def _next_alerts(ws, n: int, timeout: float = 20.0) -> list[dict]:
    found = []
    while len(found) < n:
        message = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if message["type"] == "alert":
            found.append(message["alert"])
    return found


def test_spike_and_engulfing_alerts_reach_websocket_client(live_stack, api_token):
    from alerts.models import Alert, Delivery
    from audit.models import AuditEvent

    token = api_token("ops", "Ops")
    spike = quiet_then_spike()
    pair = engulfing_pair(len(spike), spike[-1]["close"])

    async def scenario():
        async with await _connect(live_stack, token) as ws:
            snapshot = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert snapshot == {"type": "snapshot", "alerts": []}
            status, body = await sync_to_async(live_stack.request)(
                "POST", "/api/v1/market/candles", spike + pair, token
            )
            assert status == 201, body
            return await _next_alerts(ws, 2), body

    received, body = asyncio.run(scenario())
    volatility, engulfing = received
    assert volatility["detector"] == "volatility" and volatility["direction"] == "up"
    assert volatility["open_time_ms"] == spike[-1]["open_time_ms"]
    assert volatility["value"] > 2.0 and volatility["severity"] == "warning"
    assert volatility["symbol"] == "ETH/BTC" and volatility["timeframe"] == "5m"
    assert engulfing["detector"] == "engulfing" and engulfing["direction"] == "up"
    assert engulfing["open_time_ms"] == pair[-1]["open_time_ms"]
    assert engulfing["message"] == "bullish engulfing"
    stored = {a.pk: a for a in Alert.objects.all()}
    assert set(stored) == {volatility["id"], engulfing["id"]}
    assert stored[volatility["id"]].candle_id == body["ids"][len(spike) - 1]
    wait_until(lambda: Delivery.objects.filter(channel="websocket", status="sent").count() == 2)
    rows = Delivery.objects.filter(channel="websocket")
    assert {d.alert_id for d in rows} == set(stored)
    assert {d.user.username for d in rows} == {"ops"}
    actions = set(AuditEvent.objects.values_list("action", flat=True))
    assert {"candles.ingest", "alert.create", "alerts.websocket_sent"} <= actions


def test_anonymous_websocket_is_closed_with_code(live_stack):
    async def scenario():
        async with websockets.connect(
            f"{live_stack.ws_url}/ws/alerts/", origin=live_stack.base_url, open_timeout=10
        ) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            return closed.value.rcvd.code

    assert asyncio.run(scenario()) == 4401


def test_wrong_origin_websocket_is_refused(live_stack, api_token):
    token = api_token("ops", "Ops")

    async def scenario():
        await websockets.connect(
            f"{live_stack.ws_url}/ws/alerts/",
            additional_headers={"Authorization": f"Token {token}"},
            origin="http://evil.example",
            open_timeout=10,
        )

    with pytest.raises(websockets.InvalidStatus) as refused:
        asyncio.run(scenario())
    assert refused.value.response.status_code == 403
