"""The ASGI application's HTTP side (config.asgi_handler): the middleware chain is built
synchronously and handed one thread per request, and a request through the ASGI app gets
what the middleware and the API do (headers, authentication, a stored candle)."""

from __future__ import annotations

import asyncio
import json

import pytest

URL = "/api/v1/market/candles"
CANDLE = {
    "exchange": "binance",
    "symbol": "ETH/BTC",
    "timeframe": "1m",
    "open_time_ms": 1_600_000_000_000,
    "open": 1.0,
    "high": 1.1,
    "low": 0.9,
    "close": 1.05,
    "volume": 3.0,
}


def asgi_request(method: str, path: str, body: bytes = b"", token: str = "") -> tuple[int, dict]:
    from config.asgi import application

    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
    headers.append((b"content-length", str(len(body)).encode()))
    if token:
        headers.append((b"authorization", f"Token {token}".encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    sent: list[dict] = []

    async def run() -> None:
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        await application(scope, receive, send)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}


def test_the_middleware_chain_is_synchronous():
    from asgiref.sync import iscoroutinefunction

    from config.asgi import django_asgi_app
    from config.asgi_handler import SyncChainASGIHandler

    assert isinstance(django_asgi_app, SyncChainASGIHandler)
    assert not iscoroutinefunction(django_asgi_app._middleware_chain)


@pytest.mark.django_db(transaction=True)
def test_a_request_through_the_asgi_app(api_token):
    from trading.models import Candle

    body = json.dumps([CANDLE]).encode()
    status, headers = asgi_request("POST", URL, body)
    assert status == 401
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    status, _ = asgi_request("POST", URL, body, token=api_token())
    assert status == 201
    assert Candle.objects.filter(symbol="ETH/BTC", open_time_ms=CANDLE["open_time_ms"]).exists()
